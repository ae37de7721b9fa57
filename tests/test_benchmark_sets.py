"""The benchmark sets since 2023 (docs/protocol.md section 9): the IS3 and AVSBench builders on
fixture trees written here in each distributed layout, and the metrics of IS3 (iIoU / iAUC),
AVSBench (mIoU / F-score), negative audio (pIA / AOC) and cross-modal retrieval.

Each metric is checked on hand-made inputs with numbers worked out by hand, and against an
independent float64 implementation below: per-sample loops transcribing the authors' code
(kaistmm/SSLalignment utils.py, OpenNLPLab/AVSBench utility.py, xavijuanola/vssl_eval
eval_utils.py) or the definition.
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal
from PIL import Image

from sslocal import metrics
from sslocal.data import builders
from sslocal.data.builders import _benchmark, avsbench, is3

SR = 16000


def _tone(freq, seconds, sr=SR):
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _reference_log_spec(wave):
    _, _, s = scipy.signal.spectrogram(np.asarray(wave, np.float64), fs=SR, nperseg=512,
                                       noverlap=274)
    return np.log(s + 1e-7)


def _assert_spec(stored, wave):
    np.testing.assert_allclose(np.asarray(stored, np.float64), _reference_log_spec(wave),
                               rtol=1e-3, atol=2e-2)


def _solid(colour, size=(224, 224)):
    return Image.new("RGB", size, colour)


def _examples(builder):
    source = builder.as_data_source()["test"]
    out = {}
    for i in range(len(source)):
        ex = source[i]
        key = ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"]
        out[key] = ex
    return out


def _text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def _trapezoid(x, y):
    """sklearn.metrics.auc written out: sum of (x[i+1] - x[i]) * (y[i] + y[i+1]) / 2."""
    return sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))


# -- IS3 -----------------------------------------------------------------------------------------

IS3_ENTRIES = [  # (name, gt_box, tone Hz, colour); SSLalignment's absolute paths, float boxes
    ("dog_piano_1_dog", [10.0, 20.0, 100.0, 120.0], 500, (200, 30, 30)),
    ("dog_piano_1_piano", [120.0, 40.0, 224.0, 200.0], 3000, (30, 200, 30)),
    ("cat_bus_7_cat", [0.0, 0.0, 60.0, 80.0], 1000, (30, 30, 200)),
    ("cat_bus_7_bus", [50.0, 50.0, 150.0, 150.0], 2000, (200, 200, 30)),
    ("babylaughter_oceanburbling_baby", [56.0, 113.0, 147.0, 215.0], 1500, (30, 200, 200)),
    ("babylaughter_oceanburbling_ocean", [4.0, 111.0, 221.0, 224.0], 4000, (200, 30, 200)),
]
IS3_NO_AUDIO = "cat_bus_7_bus"
IS3_NO_IMAGE = "babylaughter_oceanburbling_ocean"


def write_is3_tree(root, pairs):
    """The IS3 zip's layout under root: images/<name>.jpg, audio_wav/<name>.wav and
    SSLalignment's synthetic3240_bbox.json (its absolute paths, as distributed). pairs: (name,
    gt_box in 224 px, PIL image or None (absent), 16 kHz wave or None (absent)), in json
    order."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio_wav").mkdir(exist_ok=True)
    entries = []
    for name, box, image, wave in pairs:
        entries.append({"image": f"/mnt/lynx2/users/arda/synthetic3241/visual_frames/{name}.jpg",
                        "audio": f"/mnt/lynx2/users/arda/synthetic3241/audio_wav/{name}.wav",
                        "gt_box": box})
        if image is not None:
            image.save(root / "images" / f"{name}.jpg", quality=95)
        if wave is not None:
            scipy.io.wavfile.write(root / "audio_wav" / f"{name}.wav", SR, wave)
    (root / "synthetic3240_bbox.json").write_text(json.dumps(entries))
    return root


@pytest.fixture(scope="module")
def is3_tree(tmp_path_factory):
    """The IS3 zip's layout: ROOT/images, ROOT/audio_wav, and SSLalignment's json."""
    root = tmp_path_factory.mktemp("is3")
    waves = {name: _tone(freq, 4.0) for name, _, freq, _ in IS3_ENTRIES}
    write_is3_tree(root, [(name, box, None if name == IS3_NO_IMAGE else _solid(colour),
                           None if name == IS3_NO_AUDIO else waves[name])
                          for name, box, _, colour in IS3_ENTRIES])
    return {"root": os.fspath(root), "waves": waves}


def test_is3_split_name_is_sslalignments_short_name():
    assert is3.split_name("accordion_female_10438_accordion") == ("accordion_female_10438",
                                                                   "accordion")
    assert is3.split_name("fox_train_subway") == ("fox_train", "subway")


def test_is3_builder_pairs_each_image_with_its_own_audio(is3_tree, tmp_path):
    builder = builders.get_builder("is3/test", data_dir=os.fspath(tmp_path),
                                   root=is3_tree["root"], num_workers=1)
    manifest = builder.download_and_prepare()
    entry = manifest["splits"]["test"]
    assert entry["requested"] == 6 and entry["written"] == 4
    assert sorted(entry["missing"], key=lambda m: m["id"]) == [
        {"id": IS3_NO_IMAGE, "files": [f"images/{IS3_NO_IMAGE}.jpg"]},
        {"id": IS3_NO_AUDIO, "files": [f"audio_wav/{IS3_NO_AUDIO}.wav"]}]
    assert manifest["layout"]["images"] == "images" and manifest["layout"]["audio"] == "audio_wav"
    assert manifest["layout"]["images_in_annotation"] == 3
    assert builder.info.metadata["gt_format"] == "vggss"

    examples = _examples(builder)
    assert set(examples) == {"dog_piano_1_dog", "dog_piano_1_piano", "cat_bus_7_cat",
                             "babylaughter_oceanburbling_baby"}
    expected = {name: (box, colour) for name, box, _, colour in IS3_ENTRIES}
    sources = {"dog_piano_1_dog": ("dog_piano_1", 0, "dog"),
               "dog_piano_1_piano": ("dog_piano_1", 1, "piano"),
               "cat_bus_7_cat": ("cat_bus_7", 0, "cat"),
               "babylaughter_oceanburbling_baby": ("babylaughter_oceanburbling", 0, "baby")}
    for name, ex in examples.items():
        box, colour = expected[name]
        np.testing.assert_array_equal(ex["boxes"], [[int(v) for v in box]])
        assert (_text(ex["image_id"]), int(ex["source"]), _text(ex["source_name"])) == \
            sources[name]
        # Its own image (each source has its own file: here a colour of its own) ...
        stored = np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB"), np.float64)
        np.testing.assert_allclose(stored.reshape(-1, 3).mean(0), colour, atol=3)
        # ... and its own audio: the protocol's centred 3 s of a 4 s file.
        _assert_spec(ex["spectrogram"], is3_tree["waves"][name][8000:56000])

    # The pairs regroup by image_id: iIoU takes each image's minimum.
    ids = [_text(examples[n]["image_id"]) for n in sorted(examples)]
    result = metrics.iiou_iauc([0.9, 0.3, 0.8, 0.7], ids)
    assert result["N_images"] == 3 and result["sources"] == {1: 2, 2: 1}


def test_is3_ids_without_an_entry_are_listed_missing(is3_tree, tmp_path):
    builder = builders.get_builder("is3/test", data_dir=os.fspath(tmp_path),
                                   root=is3_tree["root"], num_workers=1,
                                   ids=["dog_piano_1_piano", "nope_x"])
    entry = builder.download_and_prepare()["splits"]["test"]
    assert entry["written"] == 1
    assert entry["missing"] == [
        {"id": "nope_x", "files": ["synthetic3240_bbox.json (no entry for this id)"]}]


def test_is3_annotation_errors_are_clear(tmp_path):
    bad = tmp_path / "synthetic3240_bbox.json"
    bad.write_text(json.dumps([{"image": "a_b_c.jpg", "audio": "a_b_c.wav"}]))
    with pytest.raises(ValueError, match="gt_box"):
        is3.load_is3_annotations(bad)
    bad.write_text(json.dumps([{"image": "a_b_c.jpg", "audio": "a_b_c.wav",
                                "gt_box": [1, 2, 3]}]))
    with pytest.raises(ValueError, match="bad gt_box"):
        is3.load_is3_annotations(bad)


# -- AVSBench ------------------------------------------------------------------------------------

def _rect_mask(x0, y0, x1, y1, size=(224, 224)):
    m = np.zeros((size[1], size[0]), bool)
    m[y0:y1, x0:x1] = True
    return m


S4_FREQS = (400, 800, 1600, 3200, 6400)  # one tone per second of vidA's 5 s wav


def write_s4_tree(root, videos, extra_rows=()):
    """avsbench_data/Single-source under root: s4_meta_data.csv and s4_data/{visual_frames,
    audio_wav,gt_masks}/<split>/<category>/... videos: (name, category, split, frames, masks,
    wave): five PIL frames and five PIL masks (None: absent), a 16 kHz wave (None: absent).
    extra_rows: further csv rows (name, category, split) without files."""
    base = Path(root) / "Single-source"
    data = base / "s4_data"
    base.mkdir(parents=True, exist_ok=True)
    rows = [(v[0], v[1], v[2]) for v in videos] + list(extra_rows)
    (base / "s4_meta_data.csv").write_text(
        "name,start,category,split\n" + "".join(f"{n},0,{c},{sp}\n" for n, c, sp in rows))
    for name, cat, split, frames, masks, wave in videos:
        for sub in ("visual_frames", "gt_masks"):
            (data / sub / split / cat / name).mkdir(parents=True, exist_ok=True)
        for k, (frame, mask) in enumerate(zip(frames, masks, strict=True), start=1):
            if frame is not None:
                frame.save(data / "visual_frames" / split / cat / name / f"{name}_{k}.png")
            if mask is not None:
                mask.save(data / "gt_masks" / split / cat / name / f"{name}_{k}.png")
        if wave is not None:
            (data / "audio_wav" / split / cat).mkdir(parents=True, exist_ok=True)
            scipy.io.wavfile.write(data / "audio_wav" / split / cat / f"{name}.wav", SR, wave)
    return Path(root)


def write_ms3_tree(base, videos, extra_rows=()):
    """Multi-sources under base (the folder itself): ms3_meta_data.csv and ms3_data/:
    visual_frames/<name>/<name>.mp4_<k>.png (no split folder), audio_wav/<split>/<name>.wav,
    gt_masks/<split>/<name>/<name>_<k>.png. videos: (name, split, frames, masks, wave) as in
    write_s4_tree; extra_rows: (name, split) without files."""
    base = Path(base)
    data = base / "ms3_data"
    base.mkdir(parents=True, exist_ok=True)
    rows = [(v[0], v[1]) for v in videos] + list(extra_rows)
    (base / "ms3_meta_data.csv").write_text(
        "name,split\n" + "".join(f"{n},{sp}\n" for n, sp in rows))
    for name, split, frames, masks, wave in videos:
        (data / "visual_frames" / name).mkdir(parents=True, exist_ok=True)
        (data / "gt_masks" / split / name).mkdir(parents=True, exist_ok=True)
        (data / "audio_wav" / split).mkdir(parents=True, exist_ok=True)
        for k, (frame, mask) in enumerate(zip(frames, masks, strict=True), start=1):
            if frame is not None:
                frame.save(data / "visual_frames" / name / f"{name}.mp4_{k}.png")
            if mask is not None:
                mask.save(data / "gt_masks" / split / name / f"{name}_{k}.png")
        if wave is not None:
            scipy.io.wavfile.write(data / "audio_wav" / split / f"{name}.wav", SR, wave)
    return base


@pytest.fixture(scope="module")
def s4_tree(tmp_path_factory):
    """avsbench_data/Single-source: the csv, visual_frames, audio_wav and gt_masks trees."""
    root = tmp_path_factory.mktemp("avsbench_data")
    masks, videos = {}, []
    for name, cat in (("vidA", "helicopter"), ("vidB", "dog_barking")):
        frames, images = [], []
        for k in range(1, 6):
            frames.append(_solid((40 * k, 100, 200 - 30 * k)))
            mask = _rect_mask(10 * k, 20, 100 + 10 * k, 150)
            if name == "vidA" and k == 2:
                mask = np.zeros((224, 224), bool)  # an empty mask: a silent frame
            if name == "vidA" and k == 3:
                image = Image.fromarray(mask)  # mode "1"
            elif name == "vidA" and k == 4:
                image = Image.fromarray(np.zeros((200, 200), np.uint8))  # wrong size
            elif name == "vidA" and k == 5:
                grey = mask.astype(np.uint8) * 255
                grey[20, 20:30] = 200  # inside: stays foreground (>= 128)
                grey[0, 0:4] = 100  # outside: stays background
                mask = mask.copy()
                mask[20, 20:30] = True
                image = Image.fromarray(grey)
            else:
                image = Image.fromarray(mask.astype(np.uint8) * 255)  # mode "L"
            images.append(image)
            masks[f"{name}_{k}"] = mask
        videos.append((name, cat, "test", frames, images, None))
    wave = np.concatenate([_tone(f, 1.0) for f in S4_FREQS])
    videos[0] = (*videos[0][:5], wave)  # vidB's wav is absent
    write_s4_tree(root, videos, extra_rows=[("vidT", "helicopter", "train")])
    return {"root": os.fspath(root), "masks": masks, "wave": wave}


def test_avsbench_s4_frames_masks_and_per_second_audio(s4_tree, tmp_path):
    builder = builders.get_builder("avsbench/s4", data_dir=os.fspath(tmp_path),
                                   root=s4_tree["root"], num_workers=1)
    manifest = builder.download_and_prepare()
    entry = manifest["splits"]["test"]
    assert entry["requested"] == 10 and entry["written"] == 4  # vidT is a train video
    # vidB's wav is missing: its five frames are listed, never paired with another wav.
    wav = "Single-source/s4_data/audio_wav/test/dog_barking/vidB.wav"
    assert entry["missing"] == [{"id": f"vidB_{k}", "files": [wav]} for k in range(1, 6)]
    # The wrong-size mask: listed with both sizes, not resized to fit.
    assert entry["unreadable"] == [{
        "id": "vidA_4", "file": "Single-source/s4_data/gt_masks/test/helicopter/vidA/vidA_4.png",
        "error": "ValueError: mask is 200 x 200, its frame 224 x 224"}]
    assert [w["id"] for w in entry["warnings"]] == ["vidA_5"]
    assert "binarised at >= 128" in entry["warnings"][0]["warning"]
    assert manifest["layout"]["audio_window"] == "second"

    examples = _examples(builder)
    assert set(examples) == {"vidA_1", "vidA_2", "vidA_3", "vidA_5"}
    n = s4_tree["wave"].size
    for k in (1, 2, 3, 5):
        ex = examples[f"vidA_{k}"]
        mask = s4_tree["masks"][f"vidA_{k}"]
        np.testing.assert_array_equal(_benchmark.decode_mask(ex["mask"]), mask.astype(np.uint8))
        ys, xs = np.nonzero(mask)
        box = [] if ys.size == 0 else [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
        np.testing.assert_array_equal(ex["boxes"].reshape(-1, 4), np.reshape(box, (-1, 4)))
        assert int(ex["frame_index"]) == k and _text(ex["video_id"]) == "vidA"
        assert int(ex["label"]) == 1  # sorted categories: dog_barking, helicopter
        # Frame k with the 3 s centred on the middle of second k, kept inside the file.
        start = min(max(int(round((k - 0.5) * SR)) - 24000, 0), n - 48000)
        _assert_spec(ex["spectrogram"], s4_tree["wave"][start:start + 48000])
        assert start == {1: 0, 2: 0, 3: 16000, 5: 32000}[k]
    # The scored ground truth of an empty-mask frame is empty, the others' are the masks.
    gt = np.stack([_benchmark.decode_mask(examples[f"vidA_{k}"]["mask"]) for k in (1, 2)])
    assert gt[1].sum() == 0 and gt[0].sum() == s4_tree["masks"]["vidA_1"].sum()


def test_avsbench_ms3_centre_layout_and_missing_mask(tmp_path):
    """MS3's layout (frames without a split folder, "<name>.mp4_<k>.png"), ROOT given as the
    Multi-sources folder itself, every frame with the wav's centred 3 s."""
    base = tmp_path / "Multi-sources"
    wave = _tone(700, 4.0)
    frames = [_solid((30 * k, 60, 90)) for k in range(1, 6)]
    masks = [None if k == 2 else Image.fromarray(_rect_mask(0, 0, 50, 60).astype(np.uint8) * 255)
             for k in range(1, 6)]
    write_ms3_tree(base, [("abc_1", "test", frames, masks, wave)], extra_rows=[("zzz_2", "val")])
    builder = builders.get_builder("avsbench/ms3_centre", data_dir=os.fspath(tmp_path / "out"),
                                   root=os.fspath(base), num_workers=1)
    entry = builder.download_and_prepare()["splits"]["test"]
    assert entry["written"] == 4
    assert entry["missing"] == [{"id": "abc_1_2", "files": ["ms3_data/gt_masks/test/abc_1/"
                                                            "abc_1_2.png"]}]
    examples = _examples(builder)
    for k in (1, 3, 4, 5):
        ex = examples[f"abc_1_{k}"]
        _assert_spec(ex["spectrogram"], wave[8000:56000])  # the protocol's centred clip
        np.testing.assert_array_equal(ex["boxes"], [[0, 0, 50, 60]])
        assert int(ex["label"]) == -1


def test_avsbench_reading_helpers(tmp_path):
    assert avsbench.audio_centre(3, "second") == 2.5
    assert avsbench.audio_centre(3, "clip_centre") is None
    with pytest.raises(ValueError, match="audio window"):
        avsbench.audio_centre(1, "middle")
    path = tmp_path / "m.csv"
    path.write_text("name,start,category,split\nv1,3,cat_meowing,test\n")
    assert avsbench.read_metadata(path, "s4") == [{"name": "v1", "split": "test",
                                                   "category": "cat_meowing"}]
    path.write_text("name,category\nv1,x\n")
    with pytest.raises(ValueError, match="split"):
        avsbench.read_metadata(path, "s4")
    small = np.zeros((2, 3), bool)
    small[0, 1] = True  # nearest-neighbour resize to 224 keeps the block structure
    big = _benchmark.resize_mask(small)
    assert big.shape == (224, 224) and big[:112, 75:149].all() and big.sum() == 112 * 74
    assert _benchmark.mask_box(np.zeros((4, 4), bool)) == []


# -- iIoU / iAUC (IS3) ---------------------------------------------------------------------------

def _iiou_reference(cious, names):
    """SSLalignment's Evaluator_iiou.finalize_cIoU / finalize_IAUC, written out."""
    groups = {}
    for c, name in zip(cious, names, strict=True):
        groups.setdefault(name, []).append(c)
    iiou = []
    for pair in groups.values():
        pair = np.array(pair, np.float64)
        b = np.where(pair >= 0.5, 1.0, 0.0)
        iiou.append(np.min(b))
    iious = []
    for i in range(21):
        iiou_t = []
        for pair in groups.values():
            pair = np.array(pair, np.float64)
            iiou_t.append(np.min(np.where(pair >= 0.05 * i, 1.0, 0.0)))
        iious.append(np.mean(iiou_t))
    return np.mean(iiou), _trapezoid([0.05 * i for i in range(21)], iious)


def test_iiou_iauc_hand_made():
    cious = [0.62, 0.7, 0.9, 0.42, 0.52, 0.55]
    ids = ["a", "a", "b", "b", "c", "c"]  # minima 0.62, 0.42, 0.52
    result = metrics.iiou_iauc(cious, ids)
    assert result["iIoU"] == pytest.approx(2 / 3, abs=1e-15)
    # success(t): 1 for t <= 0.40 (9 points), 2/3 at 0.45, 0.50, 1/3 at 0.55, 0.60, then 0:
    # 0.05 * (sum - (first + last) / 2) = 0.05 * (11 - 0.5).
    assert result["iAUC"] == pytest.approx(0.525, abs=1e-15)
    assert (result["N_images"], result["N"], result["sources"]) == (3, 6, {2: 3})
    # The per-sample cIoU (5 of the 6 samples >= 0.5) is higher than the per-image one.
    assert metrics.summarize(cious)["cIoU"] == pytest.approx(5 / 6)


def test_iiou_iauc_against_sslalignments_loops():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n_images = 40
        names = [f"img{i}" for i in range(n_images) for _ in range(2)] + ["lonely"]
        cious = np.round(rng.random(len(names)), 2)  # on the 0.05 grid too: ties at t
        result = metrics.iiou_iauc(cious, names)
        ref_iiou, ref_iauc = _iiou_reference(cious, names)
        assert result["iIoU"] == pytest.approx(ref_iiou, abs=1e-15)
        assert result["iAUC"] == pytest.approx(ref_iauc, abs=1e-12)
    with pytest.raises(ValueError, match="lengths"):
        metrics.iiou_iauc([0.1, 0.2], ["a"])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.iiou_iauc([np.nan], ["a"])


# -- mIoU / F-score (AVSBench) -------------------------------------------------------------------

def _mask_reference(pred, masks, variant, batch_size, fscore_input):
    """SSLalignment's Evaluator_miou (commit 59e9efd) written out per frame, in float64:
    median threshold, strict >, mask_iou with the empty-mask branch, _eval_pr over
    linspace(0, 1 - 1e-10, 255), F = 1.3 P R / (0.3 P + R) with NaN -> 0."""
    n = pred.shape[0]
    thlist = np.linspace(0, 1 - 1e-10, 255)
    ious, curves = [], []
    for i in range(n):
        infer, gt = pred[i].astype(np.float64), masks[i].astype(np.float64)
        thr = np.sort(infer.flatten())[int(infer.shape[0] * infer.shape[1] / 2)]
        p = (infer > thr).astype(np.float64)
        num_pixels = infer.size
        if gt.sum() == 0:
            inter, union = ((1 - gt) * (1 - p)).sum(), num_pixels
        else:
            inter, union = (p * gt).sum(), np.maximum(p, gt).sum()
        ious.append(inter / (union + 1e-7))
        if gt.sum() == 0:
            curves.append(None)
            continue
        y_pred = p if fscore_input == "binarised" else infer
        f = np.zeros(255)
        for j, th in enumerate(thlist):
            y = (y_pred >= th).astype(np.float64)
            tp = (y * gt).sum()
            prec, rec = tp / (y.sum() + 1e-20), tp / (gt.sum() + 1e-20)
            with np.errstate(invalid="ignore"):
                f[j] = (1 + 0.3) * prec * rec / (0.3 * prec + rec)
            if f[j] != f[j]:
                f[j] = 0.0
        curves.append(f)
    batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if variant == "frames":
        miou = np.mean(ious)
    else:
        miou = np.sum([np.sum([ious[i] for i in b]) / len(b) for b in batches]) / len(batches)
    if variant == "per_batch":
        scores = []
        for b in batches:
            avg_f, img_num, score = 0.0, 0, np.zeros(255)
            for i in b:
                if curves[i] is None:
                    continue
                avg_f = avg_f + curves[i]
                img_num += 1
                score = avg_f / img_num
            scores.append(np.max(score))
        fscore = np.mean(scores)
    else:
        fscore = np.max(np.mean([c for c in curves if c is not None], axis=0))
    return miou, fscore, np.array(ious)


def test_mask_miou_fscore_hand_made():
    m1 = np.arange(16, dtype=np.float64).reshape(4, 4)  # thr = sorted[8] = 8: 9..15 predicted
    g1 = m1 >= 10
    g1[0, 0] = True  # 7 pixels: inter 6, union 8
    g2 = np.zeros((4, 4), bool)  # empty: the background's IoU, 9 of 16 pixels unpredicted
    g3 = np.ones((4, 4), bool)  # inter 7, union 16
    pred, masks = np.stack([m1, m1[::-1], m1]), np.stack([g1, g2, g3])
    eps = 1e-7
    iou = [6 / (8 + eps), 9 / (16 + eps), 7 / (16 + eps)]
    # F-curves of the binarised prediction: at th = 0 the whole frame, above it the prediction.
    f1 = (1.3 * (7 / 16) / (0.3 * 7 / 16 + 1), 6 / 7)
    f3 = (1.0, 1.3 * (7 / 16) / (0.3 + 7 / 16))
    r = metrics.mask_miou_fscore(pred, masks)
    np.testing.assert_allclose(r["iou"], iou, rtol=1e-15)
    assert r["mIoU"] == pytest.approx(np.mean(iou), rel=1e-15)
    assert r["F"] == pytest.approx((f1[1] + f3[1]) / 2, rel=1e-14)  # 0.814...
    assert (r["N"], r["N_F"]) == (3, 2)
    assert r["f_curve"][0] == pytest.approx((f1[0] + f3[0]) / 2, rel=1e-14)
    # Per batch of 2 (the old computation): max per batch, then the mean over batches.
    old = metrics.mask_miou_fscore(pred, masks, variant="per_batch", batch_size=2)
    assert old["F"] == pytest.approx((6 / 7 + 1.0) / 2, rel=1e-14)  # 0.929 > 0.814
    assert old["mIoU"] == pytest.approx(((iou[0] + iou[1]) / 2 + iou[2]) / 2, rel=1e-15)
    ssl = metrics.mask_miou_fscore(pred, masks, variant="sslalignment", batch_size=2)
    assert ssl["mIoU"] == old["mIoU"] and ssl["F"] == r["F"]
    # No frame with a mask: no F-score.
    assert metrics.mask_miou_fscore(pred[1:2], masks[1:2])["F"] is None


@pytest.mark.parametrize("variant", metrics.MASK_VARIANTS)
@pytest.mark.parametrize("fscore_input", metrics.MASK_FSCORE_INPUTS)
def test_mask_miou_fscore_against_the_authors_loops(variant, fscore_input):
    rng = np.random.default_rng(1)
    n = 13
    pred = np.round(rng.random((n, 12, 12)), 1)  # quantised: ties at the median and at th_j
    masks = rng.random((n, 12, 12)) < rng.random((n, 1, 1))
    masks[[2, 7]] = False
    masks[4] = True
    r = metrics.mask_miou_fscore(pred, masks, variant=variant, batch_size=4,
                                 fscore_input=fscore_input)
    ref_miou, ref_f, ref_iou = _mask_reference(pred, masks, variant, 4, fscore_input)
    np.testing.assert_allclose(r["iou"], ref_iou, rtol=1e-14)
    assert r["mIoU"] == pytest.approx(ref_miou, rel=1e-14)
    assert r["F"] == pytest.approx(ref_f, rel=1e-12)


def test_mask_scores_batch_by_batch_aggregate_to_the_whole_set():
    """The evaluator scores frames per eval batch (mask_frame_scores) and aggregates once
    (mask_aggregate): the same numbers as the whole set at once, for every variant, against
    the authors' loops."""
    rng = np.random.default_rng(4)
    pred = np.round(rng.random((11, 8, 8)), 2)
    masks = rng.random((11, 8, 8)) < 0.3
    masks[3] = False
    parts = [metrics.mask_frame_scores(pred[i:i + 4], masks[i:i + 4]) for i in range(0, 11, 4)]
    joined = {k: np.concatenate([part[k] for part in parts]) for k in ("iou", "f", "nonempty")}
    for variant in metrics.MASK_VARIANTS:
        got = metrics.mask_aggregate(joined["iou"], joined["f"], joined["nonempty"],
                                     variant=variant, batch_size=3)
        ref_miou, ref_f, _ = _mask_reference(pred, masks, variant, 3, "binarised")
        assert got["mIoU"] == pytest.approx(ref_miou, rel=1e-14)
        assert got["F"] == pytest.approx(ref_f, rel=1e-12)
    with pytest.raises(ValueError, match="variant"):
        metrics.mask_aggregate(joined["iou"], joined["f"], joined["nonempty"], variant="x")


def test_pia_summary_of_per_batch_values():
    pia = np.array([0.0, 0.25, 0.5, 0.5, 1.0])
    r = metrics.pia_summary(pia)
    fractions = [np.mean(pia <= 0.05 * i) for i in range(21)]
    assert r["AOC"] == pytest.approx(_trapezoid([0.05 * i for i in range(21)], fractions),
                                     abs=1e-15)
    assert r["pIA"] == 0.45 and r["quantiles"] == {"min": 0.0, "q25": 0.25, "median": 0.5,
                                                    "q75": 0.5, "max": 1.0}
    assert r["histogram"].tolist() == [1] + [0] * 4 + [1] + [0] * 4 + [2] + [0] * 8 + [1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.pia_summary([0.5, 1.5])


def test_mask_miou_fscore_rejects_bad_inputs():
    pred = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match="binary"):
        metrics.mask_miou_fscore(pred, np.full((2, 4, 4), 2))
    with pytest.raises(ValueError, match="shape"):
        metrics.mask_miou_fscore(pred, np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="variant"):
        metrics.mask_miou_fscore(pred, np.zeros((2, 4, 4)), variant="batches")


# -- pIA / AOC (negative audio) ------------------------------------------------------------------

def _pia_reference(neg, pos):
    """vssl_eval: thr = np.sort(pred.flatten())[int(H * W * 0.5)] of the positive map;
    compute_pIA((neg > thr)) = sum / size; compute_AUC_pIA: auc over 0.05 i of the fraction
    of samples with pIA <= 0.05 i."""
    pias = []
    for n_map, p_map in zip(neg, pos, strict=True):
        thr = np.sort(p_map.flatten())[int(p_map.shape[0] * p_map.shape[1] * 0.5)]
        binarized = (n_map > thr).astype(int)
        pias.append(np.sum(binarized) / binarized.size)
    fractions = [np.sum(np.array(pias) <= 0.05 * i) / len(pias) for i in range(21)]
    return np.array(pias), _trapezoid([0.05 * i for i in range(21)], fractions)


def test_negative_audio_pia_hand_made():
    maps = np.stack([np.arange(16).reshape(4, 4) / 15, np.zeros((4, 4)), np.ones((4, 4))])
    r = metrics.negative_audio_pia(maps, 0.5)
    np.testing.assert_array_equal(r["pia"], [0.5, 0.0, 1.0])  # 8/15..15/15 > 0.5
    assert r["pIA"] == 0.5 and r["N"] == 3
    # C(t) = 1/3 for t < 0.5 (10 points), 2/3 for 0.5 <= t < 1 (10 points), 1 at t = 1.
    assert r["AOC"] == pytest.approx(0.05 * (11 - (1 / 3 + 1) / 2), abs=1e-15)
    assert r["quantiles"]["median"] == 0.5
    assert r["histogram"].sum() == 3 and r["histogram"][0] == 1 and r["histogram"][-1] == 1
    # The positive's threshold per sample: here each map's own median, strict.
    own = metrics.negative_audio_pia(maps[:1], "median_gt", positive_maps=maps[:1])
    assert own["pia"][0] == 7 / 16  # above sorted[8] = 8/15: 9/15..15/15
    per_sample = metrics.negative_audio_pia(maps, np.array([1.0, -1.0, 0.0]))
    np.testing.assert_array_equal(per_sample["pia"], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive_maps"):
        metrics.negative_audio_pia(maps, "median_gt")


def test_negative_audio_pia_against_vssl_eval_loops():
    rng = np.random.default_rng(2)
    pos = rng.normal(size=(30, 16, 16)).astype(np.float32)
    neg = (rng.normal(size=(30, 16, 16)) + rng.normal(size=(30, 1, 1))).astype(np.float32)
    neg[0] = pos[0]  # the same map: half the pixels, bar the threshold's own
    r = metrics.negative_audio_pia(neg, "median_gt", positive_maps=pos)
    ref_pia, ref_aoc = _pia_reference(neg, pos)
    np.testing.assert_allclose(r["pia"], ref_pia, rtol=0, atol=0)
    assert r["AOC"] == pytest.approx(ref_aoc, abs=1e-12)
    assert r["pIA"] == pytest.approx(ref_pia.mean(), rel=1e-15)


# -- retrieval -----------------------------------------------------------------------------------

def test_retrieval_recall_hand_made():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    audios = np.array([[1.0, 0.1], [1.0, 0.0], [2.0, 2.0]])  # norms do not matter: cosine
    r = metrics.retrieval_recall(images, audios, ks=(1, 2, 3))
    # audio 0 -> image 0 first; audio 1 (cos 0 with image 1) ranks it 3rd; audio 2 -> image 2.
    assert r["audio_to_image"] == {"R@1": 2 / 3, "R@2": 2 / 3, "R@3": 1.0, "MedR": 1.0}
    # image 0: audio 1 (cos 1) before audio 0 (0.995): rank 2; image 1: rank 3; image 2: 1.
    assert r["image_to_audio"] == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0, "MedR": 2.0}
    # Ties count against the query: two identical items both rank 2.
    tied = metrics.retrieval_recall(np.ones((2, 3)), np.ones((2, 3)), ks=(1, 2))
    assert tied["audio_to_image"]["R@1"] == 0.0 and tied["audio_to_image"]["R@2"] == 1.0


def test_retrieval_recall_and_pooling_against_loops():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(60, 3, 3, 8))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    a = rng.normal(size=(60, 8)) + 0.8 * v.mean(axis=(1, 2))
    pooled = metrics.pooled_image_embeddings(v)
    for i in range(3):  # the spatial mean of V_i, L2-normalised
        mean = sum(v[i, y, x] for y in range(3) for x in range(3)) / 9
        np.testing.assert_allclose(pooled[i], mean / np.sqrt(np.sum(mean ** 2)), rtol=1e-13)
    pooled_max = metrics.pooled_image_embeddings(v, "max")
    np.testing.assert_allclose(pooled_max[0] * np.linalg.norm(v[0].max(axis=(0, 1))),
                               v[0].max(axis=(0, 1)), rtol=1e-13)
    r = metrics.retrieval_recall(pooled, a)
    cos = lambda x, y: float(np.dot(x, y) / np.sqrt(np.dot(x, x) * np.dot(y, y)))
    for name, queries, items in (("audio_to_image", a, pooled), ("image_to_audio", pooled, a)):
        ranks = []
        for i in range(60):
            s = [cos(queries[i], items[j]) for j in range(60)]
            ranks.append(sum(1 for j in range(60) if s[j] >= s[i]))
        for k in (1, 5, 10):
            assert r[name][f"R@{k}"] == pytest.approx(np.mean(np.array(ranks) <= k), abs=1e-15)
        assert r[name]["MedR"] == float(np.median(ranks))
    with pytest.raises(ValueError, match="differ"):
        metrics.retrieval_recall(pooled[:5], a[:4])
    with pytest.raises(ValueError, match="pooling"):
        metrics.pooled_image_embeddings(v, "sum")
