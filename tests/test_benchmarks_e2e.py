"""The benchmark sets since 2023 end to end (docs/protocol.md section 9): a synthetic model,
trained a few steps through `sslocal train`, scored through `sslocal evaluate` on synthetic
sets written in IS3's and AVSBench S4's distributed layouts and on a VGG-SS-layout set, with
the negative-audio and retrieval passes and the report; every benchmark number of metrics.json
recomputed in float64 from the per-sample files, a sample of the per-sample values recomputed
from the model's maps, and the report's sections checked.

The scenes are the synthetic demo's (sslocal.data.synthetic, the tiny preset's categories): an
IS3 image is a scene with two objects, each object's category sound one of its pairs; an
AVSBench video is a scene held for five frames with the sounding object's box as its mask.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
from PIL import Image

from configs import tiny
from sslocal import evaluator, sharding
from sslocal.data import annotations, builders, pipeline, prepare, synthetic
from sslocal.data.builders import _benchmark
from sslocal.models import load
from tests.test_benchmark_sets import (
    _iiou_reference,
    _mask_reference,
    _pia_reference,
    write_is3_tree,
    write_s4_tree,
)

REPO = Path(__file__).resolve().parent.parent
SR = 16000
SIZE = 224  # the distributed sets' frame and box grid
NEGATIVES = ("silence", "noise", "offscreen")
# MS3 is scored by the very path S4 is (its layout: tests/test_benchmark_sets.py).
SETS = ("is3/test", "avsbench/s4", "vggss/test")


def _scenes(objects, count, seed):
    """`count` scenes of the tiny preset's categories with exactly `objects` objects."""
    config = synthetic.SceneConfig(num_categories=4, image_size=64, min_objects=objects,
                                   max_objects=objects, seed=seed)
    return [synthetic.make_scene(config, i) for i in range(count)], synthetic.categories(4)


def _frame(scene):
    return Image.fromarray(scene["frame"]).resize((SIZE, SIZE), Image.BICUBIC)


def _box(box, scale=SIZE / 64):
    return [int(round(v * scale)) for v in box]


def _sound(category, seconds, seed):
    """A category's sound, `seconds` long (3 s renders joined)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    wave = np.concatenate([synthetic.render_audio(category, rng)
                           for _ in range(-(-n // synthetic.CLIP_SAMPLES))])
    return wave[:n]


def _mask(box):
    m = np.zeros((SIZE, SIZE), np.uint8)
    xmin, ymin, xmax, ymax = _box(box)
    m[ymin:ymax, xmin:xmax] = 255
    return Image.fromarray(m)


def _video(scene, cats, seed):
    """Five frames of one scene, the sounding object's box as each frame's mask (the last
    one empty: a silent frame), five seconds of its sound."""
    masks = [_mask(scene["boxes"][0]) for _ in range(4)]
    masks.append(Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)))
    return [_frame(scene)] * 5, masks, _sound(cats[scene["category"]], 5.0, seed)


# Compile time dominates these tiny models (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


def _sslocal(*args, log=None):
    """`python -m sslocal ...` on one CPU device with XLA's optimisations off (the compile
    dominates these tiny steps; the arithmetic is the same). With `log` (an open file), in the
    background, its output going there."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SSLOCAL_DEBUG")},
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    cmd = [sys.executable, "-m", "sslocal", *map(str, args)]
    if log is not None:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _write_sets(root):
    """The three sets in their distributed layouts under root; returns {set: (root, ids)}."""
    # IS3: three two-object scenes, each object a pair named <image>_c<its category>.
    scenes, cats = _scenes(2, 3, seed=11)
    pairs = []
    for i, scene in enumerate(scenes):
        for j, (box, c) in enumerate(zip(scene["object_boxes"], scene["object_categories"],
                                         strict=True)):
            pairs.append((f"syn{i}_c{int(c)}", _box(box), _frame(scene),
                          _sound(cats[int(c)], 3.0, 100 * i + j)))
    write_is3_tree(root / "is3", pairs)
    # AVSBench S4: two videos of two categories.
    scenes, cats = _scenes(1, 2, seed=12)
    assert scenes[0]["category"] != scenes[1]["category"]  # an off-screen class exists
    write_s4_tree(root / "avsbench", [
        (f"vid{i}", f"c{scene['category']}", "test", *_video(scene, cats, i))
        for i, scene in enumerate(scenes)])
    # VGG-SS: frames/ and audio/ under ids of the shipped list, one clip per class (the boxes
    # are the shipped ones: they do not match these scenes, and need not for these passes).
    ids, seen = [], set()
    for e in json.loads((annotations.metadata_dir() / "vggss.json").read_text()):
        if e["class"] not in seen and len(ids) < 6:
            seen.add(e["class"])
            ids.append(e["file"])
    scenes, _ = _scenes(1, 6, seed=13)
    for clip_id, scene in zip(ids, scenes, strict=True):
        synthetic.write_scene(root / "vggss", clip_id,
                              {**scene, "frame": np.asarray(_frame(scene))})
    return {"is3/test": (root / "is3", None), "avsbench/s4": (root / "avsbench", None),
            "vggss/test": (root / "vggss", ids)}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """`sslocal train` (4 steps of the tiny config, in the background) while the three sets
    are written and prepared; then `sslocal evaluate` on all three at once with the three
    negative audios, retrieval and the report."""
    root = tmp_path_factory.mktemp("bench")
    data_dir, workdir, out = root / "tfds", root / "run", root / "eval"
    train_log = root / "train.log"
    with train_log.open("w") as log:  # synthetic_av/tiny built in a data_dir of its own
        trainer = _sslocal("train", "--config", "configs/tiny.py", "--workdir", workdir,
                           f"--config.data_dir={root / 'train_tfds'}",
                           "--config.test_datasets=()", "--config.max_steps=4",
                           "--config.checkpoint_every_steps=4", log=log)
        try:
            for name, (path, ids) in _write_sets(root).items():
                builders.get_builder(name, data_dir=os.fspath(data_dir), root=os.fspath(path),
                                     ids=ids, num_workers=1).download_and_prepare()
            trainer.wait(timeout=300)
        finally:
            if trainer.poll() is None:
                trainer.kill()
    assert trainer.returncode == 0, train_log.read_text()[-3000:]
    proc = _sslocal("evaluate", "--config", "configs/tiny.py", f"--config.data_dir={data_dir}",
                    f"--dataset={','.join(SETS)}", f"--config.eval.negative_audio={NEGATIVES}",
                    "--config.eval.retrieval=True", f"--checkpoint={workdir}", "--report",
                    f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_sample = {name: json.loads((out / "per_sample" / f"run_{name.replace('/', '_')}.json")
                                   .read_text()) for name in SETS}
    return {"out": out, "stdout": proc.stdout, "data_dir": data_dir, "workdir": workdir,
            "metrics": json.loads((out / "metrics.json").read_text()), "per_sample": per_sample}


# -------------------------------------------------------- independent float64 scoring


def _threshold64(pred, rule, gt=None):
    """The protocol's median index (S*S // 2 of the ascending sort) or the adaptive rule's
    S*S - |G| (|G| = S*S // 2 for an empty gt), on a float64 copy."""
    flat = np.sort(np.asarray(pred, np.float64).ravel())
    if rule == "adaptive":
        n_gt = int(np.count_nonzero(gt)) or flat.size // 2
        return flat[flat.size - n_gt]
    return flat[flat.size // 2]


def _ciou64(pred, gt, rule):
    pred = np.asarray(pred, np.float64)
    thr = _threshold64(pred, rule, gt)
    b = (pred > thr) if rule == "adaptive" else (pred >= thr)
    return np.sum(b * gt) / (np.sum(gt) + np.sum(b * (gt == 0)))


def _gt64(boxes):
    gt = np.zeros((SIZE, SIZE))
    for xmin, ymin, xmax, ymax in np.asarray(boxes).reshape(-1, 4).astype(int):
        gt[ymin:ymax, xmin:xmax] = 1.0
    return gt


def _recall64(queries, items, k):
    """Ranks by cosine, ties against the query, written out."""
    hits = []
    for i in range(len(queries)):
        s = [float(np.dot(queries[i], items[j]) / np.linalg.norm(queries[i])
                   / np.linalg.norm(items[j])) for j in range(len(items))]
        hits.append(sum(1 for j in range(len(items)) if s[j] >= s[i]) <= k)
    return float(np.mean(hits))


# ------------------------------------------------------------------------------------ tests


def test_metrics_json_names_every_benchmark_and_its_variant(evaluated):
    m = {name: evaluated["metrics"][f"run / {name}"] for name in SETS}
    is3, s4, vggss = m["is3/test"], m["avsbench/s4"], m["vggss/test"]
    assert (is3["N"], is3["N_images"], is3["sources"]) == (6, 3, {"2": 3})
    assert is3["adaptive"]["threshold_rule"].startswith("map > sorted(map)[S*S - |G|]")
    assert "minimum over its sources" in is3["iIoU_rule"]
    for name in ("avsbench/s4",):
        mask = m[name]["mask"]
        assert (mask["N"], mask["N_F"], mask["variant"]) == (10, 8, "frames")
        assert mask["threshold"] == "median_gt" and mask["fscore_input"] == "binarised"
        assert set(mask["other_variants"]) == {"sslalignment", "per_batch"}
        assert "known bug" in mask["other_variants"]["per_batch"]["rule"]
    for name in SETS:
        neg = m[name]["negative_audio"]
        assert neg["threshold"].startswith("positive: eval.threshold median_ge")
        assert set(neg) >= set(NEGATIVES) and "vssl_eval" in neg["rule"]
        assert len(neg["silence"]["curve"]) == 21 and sum(neg["noise"]["histogram"]) == \
            m[name]["N"]
        assert m[name]["retrieval"]["pooling"] == "mean"
        assert "(mean)" in m[name]["retrieval"]["rule"]
        assert m[name]["protocol_variant"]["prediction_threshold"] == "median_ge"
    assert "iIoU" not in vggss and "mask" not in vggss and "mIoU" not in is3
    for name, rule in (("vggss/test", "a clip of another class"),
                       ("avsbench/s4", "a clip of another class"),
                       ("is3/test", "a source class absent from the image")):
        assert rule in m[name]["negative_audio"]["offscreen"]["audio"]
    assert s4["mIoU"] == pytest.approx(s4["mask"]["other_variants"]["sslalignment"]["mIoU"])
    out = evaluated["stdout"]
    assert "IS3 interactive: iIoU" in out and "masks (frames, median_gt)" in out
    assert "negative audio (threshold positive" in out and "retrieval (mean pooling" in out


def test_numbers_equal_a_float64_recomputation_from_the_per_sample_files(evaluated):
    m = {name: evaluated["metrics"][f"run / {name}"] for name in SETS}
    ps = evaluated["per_sample"]
    # IS3: SSLalignment's loops over each image's pairs, both thresholds.
    is3 = ps["is3/test"]
    for cious, summary in ((is3["cIoU_av"], m["is3/test"]),
                           (is3["cIoU_adaptive_av"], m["is3/test"]["adaptive"])):
        iiou, iauc = _iiou_reference(cious, is3["image_id"])
        assert summary["iIoU"] == pytest.approx(iiou, abs=1e-12)
        assert summary["iAUC"] == pytest.approx(iauc, abs=1e-12)
        assert summary["cIoU"] == pytest.approx(np.mean(np.array(cious) >= 0.5), abs=1e-12)
    assert is3["image_id"] == [i.rsplit("_", 1)[0] for i in is3["ids"]]
    # AVSBench: a frame's F-curve is F0 at threshold 0 and F above; averaged, then maximised.
    for name in ("avsbench/s4",):
        f = ps[name]
        nonempty = np.array(f["mask_nonempty"])
        assert m[name]["mIoU"] == pytest.approx(np.mean(f["mask_iou_av"]), abs=1e-12)
        curve = [np.mean(np.array(f["mask_F0_av"])[nonempty]),
                 np.mean(np.array(f["mask_F_av"])[nonempty])]
        assert m[name]["F"] == pytest.approx(max(curve), abs=1e-12)
        # Each video's fifth frame has an empty mask: the background's IoU, no F-curve.
        assert nonempty.tolist() == [not i.endswith("_5") for i in f["ids"]]
    # Negative audio: the mean, vssl_eval's AOC loop, the quantiles.
    for name in SETS:
        for kind in NEGATIVES:
            pia = np.array(ps[name][f"pIA_{kind}"])
            entry = m[name]["negative_audio"][kind]
            fractions = [np.sum(pia <= 0.05 * i) / pia.size for i in range(21)]
            aoc = sum(0.05 * (fractions[i] + fractions[i + 1]) / 2 for i in range(20))
            assert entry["pIA"] == pytest.approx(pia.mean(), abs=1e-12)
            assert entry["AOC"] == pytest.approx(aoc, abs=1e-12)
            assert entry["quantiles"]["median"] == pytest.approx(np.median(pia), abs=1e-12)
    # Retrieval: the written embeddings, ranked by a loop.
    for name in SETS:
        with np.load(evaluated["out"] / "per_sample" /
                     f"run_{name.replace('/', '_')}.embeddings.npz") as npz:
            image, audio = npz["image"].astype(np.float64), npz["audio"].astype(np.float64)
        r = m[name]["retrieval"]
        for k in (1, 5, 10):
            assert r["audio_to_image"][f"R@{k}"] == pytest.approx(_recall64(audio, image, k))
            assert r["image_to_audio"][f"R@{k}"] == pytest.approx(_recall64(image, audio, k))


def test_off_screen_sounds_are_another_class_recorded_and_never_the_picture(evaluated):
    ps, data_dir = evaluated["per_sample"], os.fspath(evaluated["data_dir"])
    is3 = ps["is3/test"]
    shown = {}
    for clip in is3["ids"]:
        image, source = clip.rsplit("_", 1)
        shown.setdefault(image, set()).add(source)
    for clip, other in zip(is3["ids"], is3["offscreen_id"], strict=True):
        image, _ = clip.rsplit("_", 1)
        other_image, other_source = other.rsplit("_", 1)
        assert other_image != image and other_source not in shown[image]
    source = prepare.load_split("vggss/test", "test", data_dir)
    label = {pipeline.record_id(source[i]): int(source[i]["label"]) for i in range(len(source))}
    v = ps["vggss/test"]
    assert all(label[a] != label[b] for a, b in zip(v["ids"], v["offscreen_id"], strict=True))
    for name in ("avsbench/s4",):  # another video, never a frame of its own
        f = ps[name]
        assert all(a.rsplit("_", 1)[0] != b.rsplit("_", 1)[0]
                   for a, b in zip(f["ids"], f["offscreen_id"], strict=True))


def test_per_sample_values_equal_float64_scoring_of_the_models_maps(evaluated):
    """The trained model's maps, computed here through the evaluator's step (one compilation
    for every pass), scored by the float64 code above with negative audio made here: the
    per-sample values `sslocal evaluate` wrote."""
    data_dir = os.fspath(evaluated["data_dir"])
    config = tiny.get_config()
    config.eval.retrieval = True
    mesh = sharding.make_mesh(1)  # as the command ran (a CPU machine's one device)
    scorer = evaluator.Evaluator(config, mesh)
    model = load.load_model(evaluated["workdir"], mesh=mesh)
    ps = evaluated["per_sample"]

    def maps_of(name, specs=None):
        source = prepare.load_split(name, "test", data_dir)
        records = [source[i] for i in range(min(len(source), 8))]
        if specs is None:
            specs = [pipeline.stored_spectrogram(r["spectrogram"]) for r in records]
        return records, scorer.maps(model, [pipeline.decode_image(r["image"]) for r in records],
                                    np.stack(specs))

    records, out = maps_of("is3/test")
    for i, r in enumerate(records):
        gt = _gt64(r["boxes"])
        assert ps["is3/test"]["cIoU_av"][i] == pytest.approx(_ciou64(out["av"][i], gt,
                                                                     "median"), abs=1e-12)
        assert ps["is3/test"]["cIoU_adaptive_av"][i] == pytest.approx(
            _ciou64(out["av"][i], gt, "adaptive"), abs=1e-12)
    records, out = maps_of("avsbench/s4")
    masks = np.stack([_benchmark.decode_mask(r["mask"]) for r in records]).astype(bool)
    _, _, iou = _mask_reference(np.asarray(out["av"], np.float64), masks, "frames", 64,
                                "binarised")
    np.testing.assert_allclose(ps["avsbench/s4"]["mask_iou_av"][:8], iou, rtol=1e-12)
    # VGG-SS with silence, noise (N(0, 1), seeded (seed, 1, index)) and the recorded
    # off-screen clip's stored spectrogram, each through the protocol's log spectrogram.
    v = ps["vggss/test"]
    source = prepare.load_split("vggss/test", "test", data_dir)
    by_id = {pipeline.record_id(source[i]): i for i in range(len(source))}

    def log_spec(wave):
        _, _, spec = scipy.signal.spectrogram(wave, fs=SR, nperseg=512, noverlap=274)
        return np.log(spec + 1e-7).astype(np.float32).astype(np.float16)[..., None]

    records, positive = maps_of("vggss/test")
    audios = {"silence": [log_spec(np.zeros(48000)) for _ in records],
              "noise": [log_spec(np.random.default_rng([config.seed, 1, i]).standard_normal(
                  48000)) for i in range(len(records))],
              "offscreen": [np.asarray(source[by_id[o]]["spectrogram"])[..., None]
                            for o in v["offscreen_id"][:len(records)]]}
    for kind, specs in audios.items():
        _, negative = maps_of("vggss/test", specs)
        pia, _ = _pia_reference(np.asarray(negative["raw"], np.float64),
                                np.asarray(positive["raw"], np.float64))
        np.testing.assert_allclose(v[f"pIA_{kind}"][:len(records)], pia, rtol=0, atol=1e-12)
    # The pooled image map and the audio vector, from the towers themselves.
    with np.load(evaluated["out"] / "per_sample" / "run_vggss_test.embeddings.npz") as npz:
        np.testing.assert_allclose(npz["image"][:len(records)], positive["image_embedding"],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(npz["audio"][:len(records)], positive["audio_embedding"],
                                   rtol=1e-5, atol=1e-6)
    assert scorer.num_traces == 1  # positive and negative audio, three sets: one compilation


def test_report_has_a_section_per_set(evaluated):
    html = (evaluated["out"] / "report.html").read_text()
    sections = re.findall(r'<section id="set-\d+"><h2>([^<]+)</h2>(.*?)</section>', html, re.S)
    assert [name for name, _ in sections] == list(SETS)
    body = dict(sections)
    for name in SETS:
        for heading in ("Negative audio (threshold", "Cross-modal retrieval (mean pooling)"):
            assert heading in body[name]
        for plot in ("pia", "recall"):
            assert f"plots/{plot}-" in body[name]
    assert "IS3: both sources of every image" in body["is3/test"]
    assert "plots/iiou-" in body["is3/test"]
    # IS3: a row per shown image holding both of its sources, each with its own map.
    rows = re.findall(r'<div class="row pair"><p class="meta">([^<]+)</p>(.*?)</div>',
                      body["is3/test"], re.S)
    assert len(rows) == 3
    for image, row in rows:
        frames = re.findall(r'alt="(syn\d_c\d)"', row)
        assert len(frames) == 2 and all(f.startswith(image + "_") for f in frames)
        assert len(re.findall(r'alt="run map of ', row)) == 2
    for name in ("avsbench/s4",):
        assert "AVSBench masks (threshold median_gt" in body[name]
        assert "white outlines: ground-truth masks" in body[name]
        assert "plots/miou-" in body[name] and "plots/fcurve-" in body[name]
    for src in re.findall(r'src="([^"]+)"', html):
        assert (evaluated["out"] / src).is_file()
    # The mask's outline is drawn (white), not its box, on the frames with a mask: the
    # outline of the box-shaped synthetic mask, 2 px inside its edge.
    source = prepare.load_split("avsbench/s4", "test", os.fspath(evaluated["data_dir"]))
    masks = {pipeline.record_id(source[i]): _benchmark.decode_mask(source[i]["mask"])
             for i in range(len(source))}
    shown = re.findall(r'<img src="(overlays/[^"]+-frame.png)" alt="(vid\d_[1-4])"',
                       body["avsbench/s4"])
    assert shown
    for src, clip in shown:
        white = (np.asarray(Image.open(evaluated["out"] / src).convert("RGB"))[:SIZE]
                 == 255).all(axis=-1)
        ys, xs = np.nonzero(masks[clip])
        assert white[ys.min(), xs.min()] and white[ys.max(), xs.max()]  # its corners
        assert not white[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2]
