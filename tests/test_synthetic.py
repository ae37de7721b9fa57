"""Procedural audio-visual scenes: determinism, layout statistics, looks and sounds, files."""

import dataclasses
import json

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
from PIL import Image

from sslocal.data import annotations, spectrogram
from sslocal.data import synthetic as syn

TINY, SMALL = syn.PRESETS["tiny"], syn.PRESETS["small"]


@pytest.fixture(scope="module")
def small_scenes():
    return [syn.make_scene(SMALL, i) for i in range(200)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_presets():
    assert TINY.image_size == 64 and TINY.num_categories <= 6
    assert 96 <= SMALL.image_size <= 128 and 16 <= SMALL.num_categories <= 24
    assert syn.PRESETS["full"].image_size == 224


def test_the_demo_preset_extends_small():
    """The Quick start's scenes are "small"'s (the margin study's clean comparison): the same
    test split, so the same baselines, and a training split twice as long whose first half is
    small's."""
    from sslocal.data.builders import synthetic_av

    for split in ("train", "test"):
        assert (synthetic_av.scene_config("demo", split)
                == synthetic_av.scene_config("small", split))
    (demo_train, demo_test), (small_train, small_test) = (
        synthetic_av.SPLIT_SIZES["demo"], synthetic_av.SPLIT_SIZES["small"])
    assert demo_test == small_test and demo_train == 2 * small_train


def test_deterministic_and_indices_differ():
    a = syn.make_scene(TINY, 3)
    _assert_same(a, syn.make_scene(TINY, 3))
    b = syn.make_scene(TINY, 4)
    assert not np.array_equal(a["frame"], b["frame"])
    assert not np.array_equal(a["audio"], b["audio"])
    c = syn.make_scene(dataclasses.replace(TINY, seed=1), 3)
    assert not np.array_equal(a["frame"], c["frame"])
    # The categories are those of (num_categories, category_seed), whatever the scene seed.
    assert syn.categories(4, 0) == syn.categories(4, 0)
    assert syn.categories(4, 0) != syn.categories(4, 1)


def test_scene_contents(small_scenes):
    s = SMALL.image_size
    for scene in small_scenes:
        assert scene["frame"].shape == (s, s, 3) and scene["frame"].dtype == np.uint8
        audio = scene["audio"]
        assert audio.shape == (48000,) and audio.dtype == np.float32
        assert np.all(np.isfinite(audio)) and np.abs(audio).max() <= 1
        assert np.abs(audio).max() > 0.1
        n = len(scene["object_boxes"])
        assert SMALL.min_objects <= n <= SMALL.max_objects
        cats = scene["object_categories"]
        assert len(set(cats.tolist())) == n  # distinct categories in view
        assert scene["sounding"] is True
        assert scene["boxes"].shape == (1, 4) and scene["boxes"].dtype == np.float32
        assert np.sum(cats == scene["category"]) == 1  # exactly one sounding object
        np.testing.assert_array_equal(
            scene["boxes"][0], scene["object_boxes"][cats == scene["category"]][0])
    counts = np.bincount([len(sc["object_boxes"]) for sc in small_scenes], minlength=4)
    assert np.all(counts[1:] >= 40)  # 1, 2 and 3 objects all common


def _area_fraction(box, size):
    x0, y0, x1, y1 = box
    return (x1 - x0) * (y1 - y0) / size**2


def _covered_fraction(boxes, i, size):
    """Independent raster: share of box i under boxes drawn after it."""
    mask = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in boxes[i + 1 :].astype(int):
        mask[y0:y1, x0:x1] = True
    x0, y0, x1, y1 = boxes[i].astype(int)
    return mask[y0:y1, x0:x1].mean()


def test_box_sizes_and_occlusion(small_scenes):
    s = SMALL.image_size
    sounding_areas, distractor_areas, on_top, expected_on_top = [], [], [], []
    for scene in small_scenes:
        boxes, cats = scene["object_boxes"], scene["object_categories"]
        assert np.all(boxes == np.round(boxes)) and boxes.min() >= 0 and boxes.max() <= s
        for i, box in enumerate(boxes):
            frac = _area_fraction(box, s)
            assert 0.25 <= frac <= 0.45
            assert _covered_fraction(boxes, i, s) <= SMALL.max_occlusion + 1e-9
            (sounding_areas if cats[i] == scene["category"] else distractor_areas).append(frac)
        if len(boxes) > 1:
            on_top.append(cats[-1] == scene["category"])
            expected_on_top.append(1 / len(boxes))
    # Same size distribution for the sounding object and the distractors.
    assert abs(np.mean(sounding_areas) - np.mean(distractor_areas)) < 0.02
    assert abs(np.std(sounding_areas) - np.std(distractor_areas)) < 0.02
    # The sounding object is not singled out by being drawn on top.
    assert abs(np.mean(on_top) - np.mean(expected_on_top)) < 0.12


def _hue_sat(rgb):
    rgb = rgb.astype(np.float64) / 255
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = np.where(mx > mn, mx - mn, 1)
    r, g, b = np.moveaxis(rgb, -1, 0)
    hue = np.select([mx == r, mx == g], [(g - b) / delta % 6, (b - r) / delta + 2],
                    (r - g) / delta + 4) * 60
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0)
    return hue, sat


def test_objects_are_drawn_in_their_boxes(small_scenes):
    s = SMALL.image_size
    cats = syn.categories(SMALL.num_categories, SMALL.category_seed)
    for scene in small_scenes[:60]:
        hue, sat = _hue_sat(scene["frame"])
        target, _ = _hue_sat(np.array(cats[scene["category"]].colour) * 255)
        match = (np.abs((hue - target + 180) % 360 - 180) < 20) & (sat > 0.6)
        x0, y0, x1, y1 = scene["boxes"][0].astype(int)
        assert match[y0:y1, x0:x1].mean() > 0.2
        outside = np.ones((s, s), bool)
        for bx0, by0, bx1, by1 in scene["object_boxes"].astype(int):
            outside[by0:by1, bx0:bx1] = False
        if outside.any():
            assert match[outside].mean() < 0.05  # the background is muted


def test_offscreen_sounds():
    cfg = dataclasses.replace(TINY, offscreen_prob=0.5)
    scenes = [syn.make_scene(cfg, i) for i in range(120)]
    off = [sc for sc in scenes if not sc["sounding"]]
    assert 0.3 < len(off) / len(scenes) < 0.7
    for scene in off:
        assert scene["boxes"].shape == (0, 4)
        assert scene["category"] not in scene["object_categories"]
        assert len(scene["object_boxes"]) >= 1


def test_repeat_prob_makes_categories_repeat():
    k = 16
    uniform = syn.SceneConfig(num_categories=k, image_size=32)
    skewed = dataclasses.replace(uniform, repeat_prob=0.8)
    np.testing.assert_allclose(syn.category_probs(uniform), np.full(k, 1 / k))
    probs = syn.category_probs(skewed)
    np.testing.assert_allclose(probs.sum(), 1.0)
    np.testing.assert_allclose(probs[:4], 0.2 / k + 0.8 / 4)
    # Collision probability of two clips (a same-category pair in a batch): sum p^2.
    assert np.sum(probs**2) > 2.5 * np.sum(syn.category_probs(uniform) ** 2)
    drawn = [syn.make_scene(skewed, i)["category"] for i in range(150)]
    assert abs(np.mean(np.array(drawn) < 4) - probs[:4].sum()) < 0.12


def _mean_log_spectrum(audio):
    _, _, s = scipy.signal.spectrogram(audio.astype(np.float64), fs=16000, nperseg=512,
                                       noverlap=274)
    profile = np.log(s + 1e-7).mean(axis=1)
    return profile - profile.mean()  # gain-invariant


def test_category_sounds_are_distinguishable():
    cats = syn.categories(SMALL.num_categories, SMALL.category_seed)
    clips = {c: [_mean_log_spectrum(syn.render_audio(cat, np.random.default_rng([c, i])))
                 for i in range(4)] for c, cat in enumerate(cats)}
    centroids = {c: np.mean(v[:2], axis=0) for c, v in clips.items()}
    within = [np.linalg.norm(v[0] - v[1]) for v in clips.values()]
    between = [np.linalg.norm(centroids[a] - centroids[b])
               for a in centroids for b in centroids if a < b]
    assert np.mean(between) > 2 * np.mean(within)
    # Nearest centroid on held-out clips (fresh pitch, phase, loudness, noise).
    hits = [min(centroids, key=lambda k: np.linalg.norm(centroids[k] - x)) == c
            for c, v in clips.items() for x in v[2:]]
    assert np.mean(hits) >= 0.9


def test_write_scene_round_trip(tmp_path):
    scene = syn.make_scene(TINY, 0)
    frame_path, wav_path = syn.write_scene(tmp_path, "syn_000000", scene)
    assert frame_path == tmp_path / "frames" / "syn_000000.jpg"
    assert wav_path == tmp_path / "audio" / "syn_000000.wav"
    jpeg = np.asarray(Image.open(frame_path).convert("RGB")).astype(int)
    assert np.abs(jpeg - scene["frame"]).mean() < 4
    wav, sr = sf.read(wav_path)
    assert sr == 16000 and wav.shape == (48000,)
    np.testing.assert_allclose(wav, scene["audio"], atol=1 / 32767)
    np.testing.assert_allclose(spectrogram.load_clip_audio(wav_path), scene["audio"],
                               atol=1 / 32767)


def test_write_scenes_annotations_load_as_vggss(tmp_path):
    cfg = dataclasses.replace(TINY, offscreen_prob=0.5)
    ids = syn.write_scenes(tmp_path, cfg, range(6))
    assert ids == [f"syn_{i:06d}" for i in range(6)]
    boxes = annotations.load_vggss(tmp_path / "annotations.json")
    entries = json.loads((tmp_path / "annotations.json").read_text())
    for i, clip_id in enumerate(ids):
        scene = syn.make_scene(cfg, i)
        assert (tmp_path / "frames" / f"{clip_id}.jpg").is_file()
        expected = [tuple(int(v) for v in (b / cfg.image_size * 224).astype(int))
                    for b in scene["boxes"].astype(np.float64)]
        assert boxes[clip_id] == expected
        assert entries[i]["sounding"] == scene["sounding"]


def test_bad_configs():
    with pytest.raises(ValueError, match="num_categories"):
        syn.SceneConfig(num_categories=1)
    with pytest.raises(ValueError, match="max_objects"):
        syn.SceneConfig(num_categories=3, max_objects=3)
    with pytest.raises(ValueError, match="offscreen_prob"):
        syn.SceneConfig(offscreen_prob=1.5)
    with pytest.raises(ValueError, match="image_size"):
        syn.SceneConfig(image_size=16)
    with pytest.raises(ValueError):
        syn.make_scene(TINY, -1)
    with pytest.raises(ValueError):
        syn.write_wav("/tmp/never.wav", np.full(10, np.nan))
