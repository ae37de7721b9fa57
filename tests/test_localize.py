"""`sslocal localize`: inputs prepared as for evaluation, maps equal to a PyTorch reference
model's, overlays and videos written, clear errors; a briefly trained model follows a moving
sounding object."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import scipy.signal
from flax import nnx
from PIL import Image

from configs import default
from sslocal import checkpointing, localize, report
from sslocal.data import synthetic
from sslocal.models import factory
from sslocal.models.av_model import AudioVisualModel

torch = pytest.importorskip("torch", reason="the reference-model tests need torch")
from torch.nn import functional as F  # noqa: E402

from tests.torch_reference import TorchEZVSL, TorchResNet18, randomize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
S = 64  # model input size of the untrained-model tests
WIDTH, DIM = 8, 16
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ---------------------------------------------------------------- pure helpers


def test_overlay_uses_the_reports_colours():
    frame = np.random.default_rng(5).integers(0, 256, (20, 30, 3), np.uint8)
    heat = np.linspace(0, 1, 600).reshape(20, 30)
    np.testing.assert_array_equal(localize.overlay(frame, heat), report.blend(frame, heat))


def test_overlay_blends_at_frame_resolution():
    frame = np.full((30, 50, 3), [100, 20, 240], np.uint8)
    out = localize.overlay(frame, np.ones((224, 224), np.float32))
    assert out.shape == (30, 50, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to([114, 10, 120], (30, 50, 3)))
    # a map that is 1 on its left half only: red on the left, blue on the right of the frame
    half = np.zeros((224, 224), np.float32)
    half[:, :112] = 1
    out = localize.overlay(np.zeros((30, 50, 3), np.uint8), half)
    np.testing.assert_array_equal(out[:, 0], np.broadcast_to([64, 0, 0], (30, 3)))
    np.testing.assert_array_equal(out[:, -1], np.broadcast_to([0, 0, 64], (30, 3)))


def test_peak_in_frame_pixels():
    m = np.zeros((224, 224))
    m[10, 200] = 1.0
    # the map squashes the frame: x = (col + 0.5) * W / 224, y = (row + 0.5) * H / 224
    assert localize.peak(m, 112, 448) == pytest.approx((200.5 * 2, 10.5 / 2))


def test_model_inputs_match_scipy_and_pil():
    """A clip prepared as `sslocal prepare` stores a test clip: the squashed uint8 frame and
    the float16 log spectrogram."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (37, 90, 3), dtype=np.uint8)
    audio = rng.uniform(-0.5, 0.5, 48000).astype(np.float32)
    image, spec = localize.model_inputs(frame, audio, 48)
    np.testing.assert_array_equal(
        image, np.asarray(Image.fromarray(frame).resize((48, 48), Image.BICUBIC)))
    _, _, s = scipy.signal.spectrogram(audio.astype(np.float64), fs=16000, nperseg=512,
                                       noverlap=274)
    assert spec.shape == (257, 200, 1) and spec.dtype == np.float16
    np.testing.assert_allclose(spec[..., 0], np.log(s + 1e-7), rtol=2**-10, atol=1e-4)


# ---------------------------------------------------------------- a PyTorch reference model


def minmax(x):
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo)


def upsample(maps):
    """EZ-VSL's inference: bilinear, align_corners=True, to 224 x 224."""
    return F.interpolate(maps[:, None], size=(224, 224), mode="bilinear",
                         align_corners=True)[:, 0]


def torch_maps(model, ogl_net, image, spec):
    """The reference's AV map and OGL map (mean |layer4| of an ImageNet ResNet18, fused
    minmax(0.4 AV + 0.6 OBJ)) for one preprocessed (image, spec) pair, in float64."""
    image = (image / 255.0 - MEAN) / STD  # the normalisation the evaluator's step does
    spec = spec.astype(np.float64) / 12.0
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].double()
        y = torch.from_numpy(spec).permute(2, 0, 1)[None].double()
        v, a = model.double()(x, y)
        av_map = minmax(upsample(torch.einsum("bchw,bc->bhw", v, a)))
        obj = minmax(upsample(ogl_net.double().features(x).abs().mean(dim=1)))
        return av_map[0].numpy(), minmax(0.4 * av_map + 0.6 * obj)[0].numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random reference-format checkpoint, converted by `sslocal convert`, and a torchvision
    ResNet18 file for OGL; the config to use them (image size S)."""
    root = tmp_path_factory.mktemp("reference")
    model = randomize(TorchEZVSL(WIDTH, DIM), seed=1)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, root / "ezvsl.pth")
    factory.convert_checkpoint(str(root / "ezvsl.pth"), str(root / "converted"))
    described = json.loads((root / "converted" / "model.json").read_text())
    described["image_size"] = S  # trained at S, not at the paper's 224 a conversion assumes
    (root / "converted" / "model.json").write_text(json.dumps(described))
    ogl_net = randomize(TorchResNet18(3, WIDTH), seed=2)
    torch.save(ogl_net.state_dict(), root / "resnet18.pth")
    config = default.get_config()
    config.image_size = S
    config.model.width, config.model.embed_dim = WIDTH, DIM
    config.eval.ogl_weights = str(root / "resnet18.pth")
    return {"model": model, "ogl_net": ogl_net, "dir": root / "converted", "config": config}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A synthetic scene's frame (stretched to 81 x 50, odd on purpose) and its audio (WAV)."""
    root = tmp_path_factory.mktemp("clip")
    scene = synthetic.make_scene(synthetic.PRESETS["tiny"], 3)
    frame = np.asarray(Image.fromarray(scene["frame"]).resize((81, 50), Image.BICUBIC))
    Image.fromarray(frame).save(root / "frame.png")
    synthetic.write_wav(root / "audio.wav", scene["audio"])
    return {"frame": frame, "audio": scene["audio"], "image_path": root / "frame.png",
            "audio_path": root / "audio.wav", "root": root}


# ---------------------------------------------------------------- image + audio


def test_converted_reference_checkpoint_gives_the_reference_maps(reference, clip_files,
                                                                 tmp_path):
    out = tmp_path / "out"
    summary = localize.main(checkpoint=str(reference["dir"]), image=str(clip_files["image_path"]),
                            audio=str(clip_files["audio_path"]), ogl=True, out=str(out),
                            config=reference["config"])
    assert summary["image_size"] == S and summary["maps"] == ["av", "ogl"]
    image, spec = localize.model_inputs(clip_files["frame"], clip_files["audio"], S)
    want_av, want_ogl = torch_maps(reference["model"], reference["ogl_net"], image, spec)
    got_av, got_ogl = np.load(out / "map.npy"), np.load(out / "map_ogl.npy")
    assert got_av.shape == got_ogl.shape == (224, 224)
    np.testing.assert_allclose(got_av, want_av, atol=2e-4)
    np.testing.assert_allclose(got_ogl, want_ogl, atol=2e-4)
    for name, m in (("overlay.png", got_av), ("overlay_ogl.png", got_ogl)):
        png = np.asarray(Image.open(out / name))
        np.testing.assert_array_equal(png, localize.overlay(clip_files["frame"], m))
        assert png.shape == (50, 81, 3)  # the frame's own resolution
    step = json.loads((out / "localize.json").read_text())["steps"][0]
    assert step["peak_xy"] == pytest.approx(list(localize.peak(got_av, 50, 81)))


# ---------------------------------------------------------------- video


def write_video(path, frames, fps, wave=None, sr=16000):
    """uint8 frames as H.264 and mono float audio as AAC, with PyAV."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.height, v.width = frames[0].shape[:2]
        v.pix_fmt, v.options = "yuv444p", {"crf": "12"}  # 4:4:4 takes odd sizes
        a = None
        if wave is not None:
            a = c.add_stream("aac", rate=sr)
            a.layout = "mono"
        for f in frames:
            c.mux(v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(v.encode())
        if a is not None:
            for k in range(0, len(wave), 1024):
                chunk = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(wave[None, k:k + 1024], np.float32), format="fltp",
                    layout="mono")
                chunk.sample_rate, chunk.pts = sr, k
                c.mux(a.encode(chunk))
            c.mux(a.encode())
    return path


def test_video_steps_pngs_maps_and_overlay_video(reference, tmp_path):
    rng = np.random.default_rng(0)
    fps, seconds = 8, 2.5
    frames = [np.full((49, 83, 3), (30 * i) % 256, np.uint8) for i in range(int(fps * seconds))]
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(16000 * seconds)) / 16000)
    wave = (wave + 0.01 * rng.standard_normal(wave.shape)).astype(np.float32)
    video_path = write_video(tmp_path / "clip.mp4", frames, fps, wave)
    out = tmp_path / "out"
    summary = localize.main(checkpoint=str(reference["dir"]), video=str(video_path), every=1.0,
                            out=str(out), config=reference["config"])
    assert [s["t"] for s in summary["steps"]] == [0.0, 1.0, 2.0]
    maps = np.load(out / "maps.npy")
    assert maps.shape == (3, 224, 224) and maps.min() >= 0 and maps.max() <= 1
    for k in range(3):
        assert np.asarray(Image.open(out / f"step_{k:04d}.png")).shape == (49, 83, 3)
    with av.open(str(out / "overlay.mp4")) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
        assert c.streams.audio[0].codec_context.name == "aac"
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        audio_seconds = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    assert len(decoded) == 3 and decoded[0].shape == (48, 82, 3)  # even sizes for H.264
    assert abs(audio_seconds - seconds) < 0.1  # the original audio, whole
    step1 = np.asarray(Image.open(out / "step_0001.png"))[:48, :82].astype(int)
    assert np.abs(decoded[1].astype(int) - step1).mean() < 6  # the step's overlay, lossy


def test_single_step_video_writes_no_overlay_video(reference, tmp_path):
    frames = [np.full((32, 32, 3), 90, np.uint8)] * 4
    wave = 0.2 * np.sin(np.arange(8000) / 5.0).astype(np.float32)
    video_path = write_video(tmp_path / "short.mp4", frames, 8, wave)
    out = tmp_path / "out"
    summary = localize.main(checkpoint=str(reference["dir"]), video=str(video_path), every=1.0,
                            out=str(out), config=reference["config"])
    assert len(summary["steps"]) == 1 and summary["videos"] == {}
    assert (out / "step_0000.png").exists() and not (out / "overlay.mp4").exists()


# ---------------------------------------------------------------- errors through the CLI


def run_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "SSLOCAL_DEBUG"}
    return subprocess.Popen([sys.executable, "-m", "sslocal", "localize", *map(str, args)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_errors_are_one_line_without_traceback(reference, clip_files, tmp_path):
    root = clip_files["root"]
    ok_image, ok_audio = clip_files["image_path"], clip_files["audio_path"]
    silent = write_video(tmp_path / "silent.mp4", [np.zeros((32, 32, 3), np.uint8)] * 8, 8)
    synthetic.write_wav(tmp_path / "short.wav", np.zeros(800, np.float32))  # 0.05 s
    (tmp_path / "bad.jpg").write_bytes(b"this is not an image")
    # a model directory whose model.json says width 16 over width-8 arrays
    model = AudioVisualModel(width=WIDTH, embed_dim=DIM, rngs=nnx.Rngs(0))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    checkpointing.save_model(tmp_path / "liar", {"width": 16, "embed_dim": DIM}, params,
                             batch_stats)
    good = reference["dir"]
    cases = {  # message: (checkpoint, input flags)
        "video file not found": (good, ["--video", root / "nope.mp4"]),
        "image file not found": (good, ["--image", root / "nope.jpg", "--audio", ok_audio]),
        "audio file not found": (good, ["--image", ok_image, "--audio", root / "nope.wav"]),
        "checkpoint not found": (root / "nope", ["--image", ok_image, "--audio", ok_audio]),
        "no audio stream": (good, ["--video", silent]),
        "shorter than 0.1 s": (good, ["--image", ok_image, "--audio", tmp_path / "short.wav"]),
        "cannot read image file": (good, ["--image", tmp_path / "bad.jpg", "--audio", ok_audio]),
        "does not fit the model": (tmp_path / "liar", ["--image", ok_image, "--audio", ok_audio]),
    }
    procs = {message: run_cli("--checkpoint", checkpoint, *args, "--out", tmp_path / "o")
             for message, (checkpoint, args) in cases.items()}
    ok = run_cli("--checkpoint", good, "--image", ok_image, "--audio", ok_audio,
                 "--out", tmp_path / "ok")
    for message, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode != 0, message
        assert message in stderr, (message, stderr[-2000:])
        assert "Traceback" not in stderr, (message, stderr[-2000:])
    stdout, stderr = ok.communicate(timeout=300)
    assert ok.returncode == 0, stderr[-2000:]
    assert (tmp_path / "ok" / "overlay.png").exists() and "1 step(s)" in stdout


# ---------------------------------------------------------------- a briefly trained model

TRAIN_PRESET = "small"  # 112 px: a 7 x 7 response map (the demo config), so the peak can say where
TRAIN_SCENES, TRAIN_STEPS = 1024, 800


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """marginNCE from scratch on synthetic_av/small (a reduced split) through the CLI with the
    demo's config, keeping the checkpoint with the best test cIoU as training does; returns the
    workdir. One device (not the suite's 8 fake ones): the same model, 2x faster on CI."""
    import time

    from sslocal.data import builders

    root = tmp_path_factory.mktemp("trained")
    start = time.perf_counter()
    builders.get_builder(f"synthetic_av/{TRAIN_PRESET}", data_dir=root / "data",
                         num_train=TRAIN_SCENES, num_test=32).download_and_prepare()
    overrides = {"data_dir": root / "data", "train_dataset": f"synthetic_av/{TRAIN_PRESET}",
                 "test_datasets": f"('synthetic_av/{TRAIN_PRESET}',)",
                 "image_size": synthetic.PRESETS[TRAIN_PRESET].image_size,
                 "model.width": WIDTH, "model.embed_dim": 32, "batch_size": 16,
                 "eval_batch_size": 16, "learning_rate": 1e-3, "lr_schedule": "constant",
                 "num_epochs": 1000,
                 "max_steps": TRAIN_STEPS, "eval.report": False, "eval.baselines": False,
                 "log_every_steps": 10_000, "checkpoint_every_steps": 10_000}
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-m", "sslocal", "train", "--config", REPO / "configs" / "synthetic.py",
         "--workdir", root / "run", *(f"--config.{k}={v}" for k, v in overrides.items())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"\ntraining fixture: {time.perf_counter() - start:.0f} s")
    return root / "run"


def moving_object_video(path, sounding, distractor, *, top, seed, size=112, fps=10,
                        seconds=4.5):
    """A sounding object (box 1/4 of the frame) crossing one half of the frame, left to right,
    while a silent one crosses the other half the other way; the audio is the sounding
    category's sound throughout. Returns the sounding box of every frame."""
    cats = synthetic.categories(synthetic.PRESETS[TRAIN_PRESET].num_categories)
    background = synthetic._background(np.random.default_rng(seed), size)
    half, n = size // 2, round(fps * seconds)
    frames, boxes = [], []
    for i in range(n):
        x = round(i / (n - 1) * (size - half))
        y, y_other = (0, half) if top else (half, 0)
        box = np.array([x, y, x + half, y + half])
        other = np.array([size - half - x, y_other, size - x, y_other + half])
        img = background.copy()
        # fixed generators: each object looks the same in every frame
        synthetic._draw(img, other, cats[distractor], np.random.default_rng(seed + 1))
        synthetic._draw(img, box, cats[sounding], np.random.default_rng(seed + 2))
        frames.append(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
        boxes.append(box)
    sound = np.concatenate([synthetic.render_audio(cats[sounding], np.random.default_rng(seed + k))
                            for k in (3, 4)])[: round(seconds * 16000)]
    write_video(path, frames, fps, sound)
    return np.array(boxes)


@pytest.mark.slow
def test_trained_model_follows_the_moving_sounding_object(trained, tmp_path):
    hits, chance, per_video = [], [], []
    pairs = [(0, 1, True), (2, 3, False), (4, 5, True), (6, 7, False)]
    for j, (sounding, distractor, top) in enumerate(pairs):
        path = tmp_path / f"moving_{j}.mp4"
        boxes = moving_object_video(path, sounding, distractor, top=top, seed=10 * j)
        summary = localize.main(checkpoint=str(trained), video=str(path), every=0.5,
                                out=str(tmp_path / f"out_{j}"))
        assert summary["image_size"] == 112  # from the run's config.json
        for step in summary["steps"]:
            box = boxes[round(step["t"] * 10)]  # the frame shown at t (10 fps)
            x, y = step["peak_xy"]
            hits.append(box[0] <= x < box[2] and box[1] <= y < box[3])
            chance.append((box[2] - box[0]) * (box[3] - box[1]) / 112**2)
        per_video.append(int(sum(hits[-len(summary["steps"]):])))
        assert (tmp_path / f"out_{j}" / "overlay.mp4").exists()
    rate = float(np.mean(hits))
    print(f"\npeak inside the sounding box: {sum(hits)}/{len(hits)} = {rate:.2f} "
          f"(chance, the box's share of the frame: {np.mean(chance):.2f}); per video {per_video}")
    assert rate >= 0.6
