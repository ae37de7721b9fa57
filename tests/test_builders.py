"""TFDS builders on fixture trees written here: counts, manifests, decoded features.

Expected values are computed independently in the tests (scipy spectrogram, PIL resizes, the
box formulas of docs/protocol.md section 6 written out), never taken from a previous run.
"""

import io
import json
import os
import shutil

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal
from PIL import Image

from sslocal.data import annotations, builders, prepare
from sslocal.data.builders import _clips

SR = 16000
T = np.arange(3 * SR) / SR


def _image(w, h, seed):
    """A smooth random RGB image (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    return small.resize((w, h), Image.BICUBIC)


def _tone(freq, seconds=3.0, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _reference_log_spec(wave):
    _, _, s = scipy.signal.spectrogram(wave.astype(np.float64), fs=SR, nperseg=512, noverlap=274)
    return np.log(s + 1e-7)


def _peak_bin(log_spec):
    return int(np.argmax(np.asarray(log_spec, np.float64).mean(axis=1)))


def _write_clip(root, clip_id, image=None, wave=None, sr=SR, image_format="JPEG"):
    if image is not None:
        image.save(os.path.join(root, "frames", f"{clip_id}.jpg"), format=image_format, quality=95)
    if wave is not None:
        scipy.io.wavfile.write(os.path.join(root, "audio", f"{clip_id}.wav"), sr, wave)


def _xml(boxes_256):
    """A SoundNet-Flickr style XML: one <object> per annotator, <bbox> with a leading child."""
    objects = "".join(
        "<object><bbox><name>x</name>" + "".join(f"<v>{v}</v>" for v in box) + "</bbox></object>"
        for box in boxes_256)
    return f"<annotation>{objects}</annotation>"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """ROOT/frames, ROOT/audio, ROOT/Annotations with good and broken clips of every kind."""
    root = tmp_path_factory.mktemp("root")
    for sub in ("frames", "audio", "Annotations"):
        (root / sub).mkdir()
    r = os.fspath(root)
    images = {"good1": _image(320, 240, 1), "good2": _image(240, 320, 2),
              "png_as_jpg": _image(200, 150, 3), "six_ch": _image(64, 48, 4)}
    waves = {"good1": _tone(440), "good2": _tone(2000), "png_as_jpg": _tone(440)}
    for cid in ("good1", "good2"):
        _write_clip(r, cid, images[cid], waves[cid])
    _write_clip(r, "png_as_jpg", images["png_as_jpg"], waves["png_as_jpg"], image_format="PNG")
    # 6 channels at 48 kHz, 4 s, a 1 kHz tone on every channel.
    six = np.repeat(_tone(1000, 4.0, 48000)[:, None], 6, axis=1)
    _write_clip(r, "six_ch", images["six_ch"], six, sr=48000)
    _write_clip(r, "short_wav", _image(64, 48, 5), _tone(440, 0.05))
    _write_clip(r, "bad_wav", _image(64, 48, 6))
    (root / "audio" / "bad_wav.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEgarbage-not-a-wav")
    buf = io.BytesIO()
    _image(64, 48, 7).save(buf, format="JPEG")
    (root / "frames" / "trunc_jpg.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _write_clip(r, "trunc_jpg", None, _tone(440))
    (root / "frames" / "empty_jpg.jpg").write_bytes(b"")
    _write_clip(r, "empty_jpg", None, _tone(440))
    _write_clip(r, "no_audio", _image(64, 48, 8), None)
    # A file name that is not UTF-8.
    bad = os.fsdecode(b"bad\xff")
    _write_clip(r, bad, _image(64, 48, 9), _tone(440))
    xml = {"good1": [(10, 20, 100, 200), (30, 40, 120, 220)],
           "good2": [(-20, 10, 100, 300), (200, 50, 100, 150)]}  # outside, swapped
    for cid, boxes in xml.items():
        (root / "Annotations" / f"{cid}.xml").write_text(_xml(boxes))
    (root / "Annotations" / "png_as_jpg.xml").write_text("<annotation><object/></annotation>")
    # The frames as decoded from disk (JPEG is lossy): what the builder starts from.
    on_disk = {cid: Image.open(root / "frames" / f"{cid}.jpg").convert("RGB") for cid in images}
    return {"root": r, "images": on_disk, "waves": waves, "xml": xml, "bad_name": bad}


def _examples(builder, split):
    source = builder.as_data_source()[split]
    out = {}
    for i in range(len(source)):
        ex = source[i]
        out[ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"]] = ex
    return out


def _decode(data):
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")), im.format


def _build(dataset, tree, tmp_path, **kwargs):
    builder = builders.get_builder(dataset, data_dir=os.fspath(tmp_path), root=tree["root"],
                                   num_workers=1, **kwargs)
    manifest = builder.download_and_prepare()
    return builder, manifest


def test_train_frame_size_follows_torchvision_resize():
    assert _clips.train_frame_size(320, 240, 224) == (328, 246)
    assert _clips.train_frame_size(240, 320, 224) == (246, 328)
    assert _clips.train_frame_size(100, 100, 224) == (246, 246)
    assert _clips.train_frame_size(333, 250, 224) == (327, 246)  # int(246 * 333 / 250) = 327
    assert _clips.train_frame_size(64, 48, 32) == (46, 35)  # int(1.1 * 32) = 35


def test_check_boxes_clips_and_reports():
    boxes, warnings = _clips.check_boxes([(10, 20, 30, 40)])
    np.testing.assert_array_equal(boxes, [[10, 20, 30, 40]])
    assert boxes.dtype == np.float32 and warnings == []
    boxes, warnings = _clips.check_boxes([(-5, 3, 250, 40), (50, 10, 20, 30)])
    np.testing.assert_array_equal(boxes, [[0, 3, 224, 40], [50, 10, 20, 30]])
    assert len(warnings) == 2 and "clipped" in warnings[0] and "swapped" in warnings[1]
    boxes, warnings = _clips.check_boxes([])
    assert boxes.shape == (0, 4) and warnings == []
    with pytest.raises(ValueError, match="non-finite"):
        _clips.check_boxes([(0, 0, np.nan, 1)])


def test_vggsound_full_reports_and_skips_bad_files(tree, tmp_path):
    builder, manifest = _build("vggsound/full", tree, tmp_path)
    entry = manifest["splits"]["train"]
    assert entry["requested"] == 10 and entry["found"] == 9 and entry["written"] == 4
    assert entry["missing"] == [{"id": "no_audio", "files": ["audio/no_audio.wav"]}]
    unreadable = {u["id"]: u for u in entry["unreadable"]}
    assert set(unreadable) == {"short_wav", "bad_wav", "trunc_jpg", "empty_jpg", "bad\\xff"}
    assert unreadable["short_wav"]["file"] == "audio/short_wav.wav"
    assert "0.1" in unreadable["short_wav"]["error"]
    assert unreadable["bad_wav"]["file"] == "audio/bad_wav.wav"
    assert unreadable["trunc_jpg"]["file"] == "frames/trunc_jpg.jpg"
    assert "truncated" in unreadable["trunc_jpg"]["error"]
    assert unreadable["empty_jpg"]["file"] == "frames/empty_jpg.jpg"
    assert "UTF-8" in unreadable["bad\\xff"]["error"]
    # The manifest lies beside the dataset, and says the same.
    on_disk = json.loads((builder.data_path / builders.MANIFEST).read_text())
    assert on_disk == manifest and on_disk["data_dir"] == os.fspath(builder.data_path)

    examples = _examples(builder, "train")
    assert sorted(examples) == ["good1", "good2", "png_as_jpg", "six_ch"]
    for ex in examples.values():
        assert ex["spectrogram"].dtype == np.float16 and ex["spectrogram"].shape == (257, 200)
        assert ex["boxes"].dtype == np.float32 and ex["boxes"].shape == (0, 4)
        assert ex["label"] == -1 and bool(ex["sounding"])
        image, fmt = _decode(ex["image"])
        assert fmt == "JPEG" and min(image.shape[:2]) == 246
    # Training frame: shorter side 246, bicubic, as PIL does it here; JPEG q95 loses little.
    stored, _ = _decode(examples["good1"]["image"])
    expected = np.asarray(tree["images"]["good1"].resize((328, 246), Image.BICUBIC), np.float64)
    assert stored.shape == (246, 328, 3)
    assert np.abs(stored - expected).mean() < 2.0
    assert _decode(examples["good2"]["image"])[0].shape == (328, 246, 3)
    # A PNG named .jpg is decoded by content.
    stored, _ = _decode(examples["png_as_jpg"]["image"])
    expected = np.asarray(tree["images"]["png_as_jpg"].resize((328, 246), Image.BICUBIC))
    assert np.abs(stored - expected.astype(np.float64)).mean() < 2.0
    # Spectrogram of a 3 s 16 kHz mono file = scipy's, to float16 precision.
    ref = _reference_log_spec(tree["waves"]["good1"])
    np.testing.assert_allclose(examples["good1"]["spectrogram"].astype(np.float64), ref,
                               rtol=1e-3, atol=2e-2)
    # 6 channels at 48 kHz: mono 16 kHz, the 1 kHz tone in bin 1000 / (16000 / 512) = 32.
    assert _peak_bin(examples["six_ch"]["spectrogram"]) == 32
    assert _peak_bin(examples["good2"]["spectrogram"]) == 64
    assert builder.info.metadata["image_size"] == 224


def test_vggsound_list_config_and_ids_override(tree, tmp_path):
    builder, manifest = _build("vggsound/10k", tree, tmp_path, ids=["good1", "good2", "absent"])
    entry = manifest["splits"]["train"]
    assert (entry["requested"], entry["found"], entry["written"]) == (3, 2, 2)
    assert entry["missing"] == [{"id": "absent", "files": ["frames/absent.jpg",
                                                             "audio/absent.wav"]}]
    assert len(builder.as_data_source()["train"]) == 2
    # Without the override, the config's shipped list is requested.
    listed = builders.get_builder("vggsound/10k", data_dir=os.fspath(tmp_path / "x"))
    jobs = listed._jobs(tree["root"])["train"]
    assert len(jobs) == 10000 and jobs[0]["id"] == "00H4-cKmeNg_000153"


def test_flickr_test_boxes_and_frames(tree, tmp_path):
    builder, manifest = _build("flickr_soundnet/test", tree, tmp_path,
                               ids=["good1", "good2", "png_as_jpg", "six_ch"])
    entry = manifest["splits"]["test"]
    assert entry["written"] == 2
    assert entry["missing"] == [{"id": "six_ch", "files": ["Annotations/six_ch.xml"]}]
    assert [u["id"] for u in entry["unreadable"]] == ["png_as_jpg"]
    assert entry["unreadable"][0]["file"] == "Annotations/png_as_jpg.xml"
    warned = [w for w in entry["warnings"] if w["id"] == "good2"]
    assert len(warned) == 2 and not [w for w in entry["warnings"] if w["id"] == "good1"]
    assert builder.info.metadata["gt_format"] == "flickr"

    examples = _examples(builder, "test")
    to224 = lambda v: int(224 * v / 256)  # docs/protocol.md section 6
    np.testing.assert_array_equal(examples["good1"]["boxes"],
                                  [[to224(v) for v in b] for b in tree["xml"]["good1"]])
    # (-20, 10, 100, 300) -> (-17, 8, 87, 262) -> clipped; the swapped box is kept as it is.
    np.testing.assert_array_equal(examples["good2"]["boxes"],
                                  [[0, 8, 87, 224], [175, 43, 87, 131]])
    for cid in ("good1", "good2"):
        ex = examples[cid]
        assert ex["sounding"] and ex["boxes"].dtype == np.float32
        source = tree["images"][cid]
        stored, fmt = _decode(ex["image"])  # lossless: exactly the bicubic squash
        assert fmt == "PNG"
        np.testing.assert_array_equal(stored, np.asarray(source.resize((224, 224),
                                                                       Image.BICUBIC)))
        w, h = source.size
        scaled = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
        big = source.resize(scaled, Image.BICUBIC)
        left, top = (scaled[0] - 224) // 2, (scaled[1] - 224) // 2
        crop, _ = _decode(ex["image_center_crop"])
        np.testing.assert_array_equal(crop, np.asarray(big)[top:top + 224, left:left + 224])


def test_flickr_plus_silent_pairs_frame_with_other_audio(tree, tmp_path):
    builder, manifest = _build(
        "flickr_soundnet/test_plus_silent", tree, tmp_path, ids=["good1"],
        silent_pairs=[("good1", "good2", "non-sounding"), ("good1", "nowhere", "non-sounding")])
    entry = manifest["splits"]["test"]
    assert entry["written"] == 2
    assert entry["missing"] == [{"id": "good1+nowhere", "files": ["audio/nowhere.wav"]}]
    examples = _examples(builder, "test")
    sounding, silent = examples["good1"], examples["good1+good2"]
    assert sounding["sounding"] and not silent["sounding"]
    assert silent["boxes"].shape == (0, 4) and len(sounding["boxes"]) == 2
    assert silent["image"] == sounding["image"]  # good1's frame ...
    assert _peak_bin(silent["spectrogram"]) == 64  # ... with good2's 2 kHz audio
    assert _peak_bin(sounding["spectrogram"]) == 14  # 440 Hz


def test_vggss_boxes_labels_and_missing_annotation(tree, tmp_path):
    meta = json.loads((annotations.metadata_dir() / "vggss.json").read_text())
    chosen = meta[:2]
    root = tmp_path / "vggss_root"
    shutil.copytree(tree["root"], root, ignore=shutil.ignore_patterns("bad*"))
    for entry in chosen:
        for sub, src, ext in (("frames", "good1", "jpg"), ("audio", "good1", "wav")):
            shutil.copy(root / sub / f"{src}.{ext}", root / sub / f"{entry['file']}.{ext}")
    ids = [e["file"] for e in chosen] + ["good2"]  # good2 has files but no vggss.json entry
    builder = builders.get_builder("vggss/test", data_dir=os.fspath(tmp_path / "d"),
                                   root=os.fspath(root), ids=ids, num_workers=1)
    manifest = builder.download_and_prepare()
    entry = manifest["splits"]["test"]
    assert entry["written"] == 2
    assert entry["missing"][0]["id"] == "good2" and "vggss.json" in entry["missing"][0]["files"][0]
    classes = sorted({e["class"] for e in meta})
    examples = _examples(builder, "test")
    for e in chosen:
        ex = examples[e["file"]]
        expected = (np.clip(np.array(e["bbox"], np.float64), 0, 1) * 224).astype(int)
        np.testing.assert_array_equal(ex["boxes"], expected)
        assert ex["label"] == classes.index(e["class"])
        assert ex["sounding"]


def test_vggss_plus_silent_lists(tmp_path):
    builder = builders.get_builder("vggss/plus_silent", data_dir=os.fspath(tmp_path))
    jobs = builder._jobs(os.fspath(tmp_path))["test"]
    sounding = [j for j in jobs if j["sounding"]]
    silent = [j for j in jobs if not j["sounding"]]
    rows = (annotations.metadata_dir() / "vggss_test_plus_silent.csv").read_text().split()[1:]
    pairs = [r.split(",") for r in rows]
    assert len(sounding) == 5158 and len(silent) == len(pairs) == 5158
    assert all(label == "non-sounding" for _, _, label in pairs)
    assert all(j["boxes"] == [] for j in silent)
    video, audio = silent[0]["id"].split("+")
    assert [video, audio] == pairs[0][:2]
    assert silent[0]["frame"].endswith(f"frames/{video}.jpg")
    assert silent[0]["audio"].endswith(f"audio/{audio}.wav")


def test_registry_and_prepare(tree, tmp_path):
    expected = {"vggsound/10k", "vggsound/144k", "vggsound/full", "vggsound/heard110",
                "flickr_soundnet/full", "flickr_soundnet/10k", "flickr_soundnet/144k",
                "flickr_soundnet/test", "flickr_soundnet/test_plus_silent", "vggss/test",
                "vggss/heard_test", "vggss/unheard_test", "vggss/plus_silent"}
    assert expected <= set(builders.DATASETS)
    assert prepare.gt_format("flickr_soundnet/test") == "flickr"
    assert prepare.gt_format("vggss/test") == "vggss"
    assert prepare.image_size("vggsound/144k") == 224
    with pytest.raises(ValueError, match="unknown dataset"):
        builders.parse_dataset("vggsound/145k")
    data_dir = os.fspath(tmp_path)
    with pytest.raises(FileNotFoundError, match="sslocal prepare"):
        prepare.load_split("vggsound/10k", "train", data_dir)
    manifest = prepare.prepare("vggsound/10k", root=tree["root"], data_dir=data_dir,
                               ids=["good1", "six_ch"], num_workers=1)
    assert manifest["splits"]["train"]["written"] == 2
    # Prepared data is reused (and its manifest returned) rather than rebuilt.
    again = prepare.prepare("vggsound/10k", root=tree["root"], data_dir=data_dir,
                            ids=["good1"], num_workers=1)
    assert again == manifest
    source = prepare.load_split("vggsound/10k", "train", data_dir)
    assert len(source) == 2
    with pytest.raises(ValueError, match="no split"):
        prepare.load_split("vggsound/10k", "test", data_dir)


def _all_examples(builder):
    sources = builder.as_data_source()
    return {split: _examples(builder, split) for split in sources}


def test_synthetic_is_deterministic_and_goes_through_the_real_path(tmp_path):
    kwargs = {"num_train": 6, "num_test": 3}
    first = builders.get_builder("synthetic_av/tiny", data_dir=os.fspath(tmp_path / "a"),
                                 num_workers=1, **kwargs)
    manifest = first.download_and_prepare()
    assert {s: e["written"] for s, e in manifest["splits"].items()} == {"train": 6, "test": 3}
    # A second build, on two worker processes, gives the same examples id by id.
    second = builders.get_builder("synthetic_av/tiny", data_dir=os.fspath(tmp_path / "b"),
                                  num_workers=2, **kwargs)
    second.download_and_prepare()
    a, b = _all_examples(first), _all_examples(second)
    assert a.keys() == b.keys() and all(a[s].keys() == b[s].keys() for s in a)
    for split in a:
        for cid in a[split]:
            for key, value in a[split][cid].items():
                np.testing.assert_array_equal(np.asarray(value), np.asarray(b[split][cid][key]))

    from sslocal.data import synthetic
    from sslocal.data.builders.synthetic_av import scene_config

    size = synthetic.PRESETS["tiny"].image_size
    assert first.info.metadata["image_size"] == size == 64
    for split, n in (("train", 6), ("test", 3)):
        assert sorted(a[split]) == [f"{split}_{i:06d}" for i in range(n)]
        for i in range(n):
            ex = a[split][f"{split}_{i:06d}"]
            scene = synthetic.make_scene(scene_config("tiny", split), i)
            expected = (np.clip(scene["boxes"] / size, 0, 1) * 224).astype(int)
            np.testing.assert_array_equal(ex["boxes"], expected.reshape(-1, 4))
            assert ex["label"] == scene["category"] and ex["sounding"] == scene["sounding"]
            # The frame as the builder finds it on disk (write_scene's JPEG).
            frame_path, _ = synthetic.write_scene(tmp_path / "scene", "x", scene)
            written, _ = _decode(frame_path.read_bytes())
            image, fmt = _decode(ex["image"])
            if split == "test":  # lossless S x S PNG: exactly the frame read from disk
                assert fmt == "PNG"
                np.testing.assert_array_equal(image, written)
            else:  # shorter side int(1.1 * S) = 70, bicubic, JPEG
                expected = Image.fromarray(written).resize((70, 70), Image.BICUBIC)
                assert fmt == "JPEG" and image.shape == (70, 70, 3)
                mse = np.mean((image - np.asarray(expected, np.float64)) ** 2)
                assert 10 * np.log10(255**2 / mse) > 35  # PSNR of a quality-95 JPEG
            # The spectrogram is the scene's audio (through a 16-bit WAV) under scipy's recipe.
            diff = np.abs(ex["spectrogram"].astype(np.float64)
                          - _reference_log_spec(scene["audio"]))
            assert np.median(diff) < 0.05 and np.percentile(diff, 99) < 1.0
    # Test and train scenes differ (seed + 1), and the test split keeps both frame variants.
    assert not np.array_equal(a["test"]["test_000000"]["spectrogram"],
                              a["train"]["train_000000"]["spectrogram"])
    assert a["train"]["train_000000"]["image_center_crop"] == b""
    # Written uncompressed (the loader's reads cost a third of zstd's), and TFDS's own
    # ArrayRecord writer is back in place after the build.
    from array_record.python import array_record_module
    from tensorflow_datasets.core import file_adapters

    for path in (tmp_path / "a").rglob("*.array_record-*"):
        options = array_record_module.ArrayRecordReader(str(path)).writer_options_string()
        assert "uncompressed" in options and "zstd" not in options, options
    fmt = file_adapters.FileFormat.ARRAY_RECORD
    assert file_adapters.ADAPTER_FOR_FORMAT[fmt] is file_adapters.ArrayRecordFileAdapter


def _write_mp4(path, colours, seconds=4.0, freq=1000.0, fps=4, sr=44100):
    """Flat-colour frames (colours[i] for frame i, lossless x264) and an AAC stereo tone."""
    import av

    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt, v.options = 64, 48, "yuv444p", {"crf": "0"}
        a = c.add_stream("aac", rate=sr)
        a.layout = "stereo"
        for colour in colours:
            img = np.broadcast_to(np.array(colour, np.uint8), (48, 64, 3)).copy()
            c.mux(v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(v.encode())
        t = np.arange(int(seconds * sr)) / sr
        wave = np.stack([0.5 * np.sin(2 * np.pi * freq * t)] * 2).astype(np.float32)
        for k in range(0, wave.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, k:k + 1024]),
                                               format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = sr, k
            c.mux(a.encode(frame))
        c.mux(a.encode())


def test_video_fallback_when_frames_and_audio_are_absent(tmp_path):
    root = tmp_path / "root"
    (root / "video").mkdir(parents=True)
    colours = [(15 * i, 200 - 10 * i, 90) for i in range(16)]  # 4 s at 4 fps
    _write_mp4(root / "video" / "vid.mp4", colours)
    (root / "video" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    builder = builders.get_builder("vggsound/full", data_dir=os.fspath(tmp_path / "d"),
                                   root=os.fspath(root), num_workers=1)
    manifest = builder.download_and_prepare()
    entry = manifest["splits"]["train"]
    assert entry["written"] == 1 and entry["missing"] == []
    assert [(u["id"], u["file"]) for u in entry["unreadable"]] == [("broken", "video/broken.mp4")]
    (ex,) = _examples(builder, "train").values()
    image, _ = _decode(ex["image"])
    assert image.shape == (246, 328, 3)  # 64 x 48 -> shorter side 246
    # The centre frame (t = 2 s: frame 8), and the 1 kHz tone in bin 32.
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), colours[8], atol=4)
    assert _peak_bin(ex["spectrogram"]) == 32


def test_a_split_without_any_usable_clip_fails_clearly(tree, tmp_path):
    builder = builders.get_builder("vggsound/10k", data_dir=os.fspath(tmp_path),
                                   root=tree["root"], ids=["absent", "trunc_jpg"], num_workers=1)
    with pytest.raises(ValueError, match="no usable clip.*2 requested, 1 missing, 1 unreadable"):
        builder.download_and_prepare()
    failed = json.loads((tmp_path / "vggsound" / "10k" / "manifest.failed.json").read_text())
    assert [m["id"] for m in failed["splits"]["train"]["missing"]] == ["absent"]
    assert not builder.is_prepared()
