"""Grain loaders on small in-memory sources shaped like the TFDS records, and on a built
synthetic dataset. Expected values are computed here independently (float64 normalisation,
crops searched by brute force, box rasters written out)."""

import io
import json
import os
import types

import grain
import numpy as np
import pytest
from etils import epath
from PIL import Image

from sslocal.data import pipeline

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
S = 32  # crop size; training frames are stored with shorter side int(1.1 * 32) = 35


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _code(i):
    """A float16-exact spectrogram value identifying record i."""
    return np.float16(i / 8 - 4)


class FakeSource:
    """Random access like tfds' ArrayRecordDataSource: len() and [i] -> a fresh dict."""

    def __init__(self, records, gt_format="vggss"):
        self.records = records
        self.dataset_info = types.SimpleNamespace(metadata={"gt_format": gt_format})

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return dict(self.records[i])


def _train_source(n, seed=0):
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (35, 46, 3), dtype=np.uint8) for _ in range(n)]
    records = [{"id": f"c{i}".encode(), "image": _png(f),
                "spectrogram": np.full((257, 200), _code(i), np.float16),
                "boxes": np.zeros((0, 4), np.float32), "label": -1, "sounding": True}
               for i, f in enumerate(frames)]
    return FakeSource(records), frames


def _record_index(spec):
    values = np.unique(np.asarray(spec, np.float64))
    assert len(values) == 1  # the stored spectrogram, one constant per record
    return int(round((values[0] + 4) * 8))


def _find_crop(frame, pixels):
    """(top, left, flipped) such that pixels is that crop of frame, or None."""
    h, w = frame.shape[:2]
    for top in range(h - S + 1):
        for left in range(w - S + 1):
            crop = frame[top:top + S, left:left + S].astype(np.float64)
            for flipped, candidate in ((False, crop), (True, crop[:, ::-1])):
                if np.abs(candidate - pixels).max() < 1e-3:
                    return top, left, flipped
    return None


def _indices(batch):
    return [_record_index(s) for s in batch["spec"]]


def _loader(source, **kwargs):
    defaults = {"global_batch_size": 4, "image_size": S, "seed": 0, "process_index": 0,
                "process_count": 1, "num_threads": 2}
    return pipeline.train_loader(source, **{**defaults, **kwargs})


# -- shared transforms -------------------------------------------------------------------------

def test_stored_spectrogram():
    spec = np.random.default_rng(0).normal(-5, 3, (257, 200))
    out = pipeline.stored_spectrogram(spec)
    assert out.dtype == np.float16 and out.shape == (257, 200, 1)
    np.testing.assert_array_equal(out[..., 0], spec.astype(np.float16))
    with pytest.raises(ValueError, match="257, 200"):
        pipeline.stored_spectrogram(np.zeros((200, 257)))


def test_eval_frame():
    rng = np.random.default_rng(1)
    square = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    out = pipeline.eval_frame(square, S)
    assert out.dtype == np.uint8 and out.shape == (S, S, 3)
    np.testing.assert_array_equal(out, square)  # no resampling at the size already
    wide = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    squashed = np.asarray(Image.fromarray(wide).resize((S, S), Image.BICUBIC))
    np.testing.assert_array_equal(pipeline.eval_frame(wide, S), squashed)
    with pytest.raises(ValueError, match="uint8"):
        pipeline.eval_frame(square.astype(np.float32), S)


def test_decode_image_converts_to_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = pipeline.decode_image(_png(grey))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    np.testing.assert_array_equal(pipeline.decode_image(_png(rgba))[..., 0], 200)


# -- training ----------------------------------------------------------------------------------

def test_train_batches_are_random_crops_and_flips():
    source, frames = _train_source(12)
    it = _loader(source)
    flips = []
    for _ in range(6):  # two epochs
        batch = next(it)
        assert set(batch) == {"image", "spec"}
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, S, S, 3)
        assert batch["spec"].dtype == np.float16 and batch["spec"].shape == (4, 257, 200, 1)
        for image, index in zip(batch["image"], _indices(batch), strict=True):
            found = _find_crop(frames[index], image)
            assert found is not None, "not a crop of its record's frame"
            flips.append(found[2])
    assert 0 < sum(flips) < len(flips)  # both flipped and unflipped crops occur


def test_train_seed_determinism_and_reshuffle_per_epoch():
    source, _ = _train_source(13)  # 13 // 4 = 3 batches per epoch, one record left out
    first = [next(it) for it in [_loader(source)] for _ in range(6)]
    again = [next(it) for it in [_loader(source)] for _ in range(6)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["spec"], b["spec"])
    epoch1 = sum((_indices(b) for b in first[:3]), [])
    epoch2 = sum((_indices(b) for b in first[3:]), [])
    assert len(set(epoch1)) == 12 and len(set(epoch2)) == 12  # no repeats inside an epoch
    assert set(epoch1) <= set(range(13)) and epoch1 != epoch2
    other = [next(it) for it in [_loader(source, seed=1)] for _ in range(3)]
    assert sum((_indices(b) for b in other), []) != epoch1
    # The same record gets a new crop / flip in another epoch (all 12 equal would be a bug).
    where1 = {i: k for k, i in enumerate(epoch1)}
    where2 = {i: k for k, i in enumerate(epoch2)}
    images1 = np.concatenate([b["image"] for b in first[:3]])
    images2 = np.concatenate([b["image"] for b in first[3:]])
    common = set(where1) & set(where2)
    assert any(not np.array_equal(images1[where1[i]], images2[where2[i]]) for i in common)


def test_train_num_epochs_and_multi_host_shards():
    source, _ = _train_source(13)
    per_host = []
    for p in range(2):  # 2 hosts, global batch 4: 2 per host, shards of 13 // 2 = 6
        it = _loader(source, process_index=p, process_count=2, num_epochs=2)
        batches = list(it)
        assert len(batches) == 2 * 3 and all(b["image"].shape[0] == 2 for b in batches)
        epoch = sum((_indices(b) for b in batches[:3]), [])
        assert sorted(epoch) == list(range(6 * p, 6 * p + 6))
        next_epoch = sum((_indices(b) for b in batches[3:]), [])
        assert sorted(next_epoch) == sorted(epoch) and next_epoch != epoch
        per_host.append(set(epoch))
    assert not per_host[0] & per_host[1]
    with pytest.raises(ValueError, match="multiple"):
        _loader(source, global_batch_size=5, process_count=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        _loader(source, global_batch_size=16)


def test_train_iterator_state_restores_mid_epoch(tmp_path):
    source, _ = _train_source(12)
    it = _loader(source)
    for _ in range(4):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(3)]
    resumed = _loader(source)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["spec"], want["spec"])
    # Through grain's Orbax handler, as the checkpointing module uses it.
    it = _loader(source)
    next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
    want = next(it)
    restored = handler.restore(epath.Path(tmp_path),
                               args=grain.checkpoint.CheckpointRestore(_loader(source)))
    np.testing.assert_array_equal(next(restored)["image"], want["image"])


def test_loader_throughput_runs():
    source, _ = _train_source(8)
    result = pipeline.loader_throughput(source, global_batch_size=4, image_size=S,
                                      num_batches=2, warmup_batches=1)
    assert result["samples"] == 8 and result["samples_per_second"] > 0


# -- evaluation --------------------------------------------------------------------------------

def _eval_source(n, gt_format="vggss", seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        boxes = np.array([[i, 2 * i, i + 50, 2 * i + 60], [100, 100, 180, 200]][: 1 + i % 2],
                         np.float32)
        records.append({
            "id": f"clip{i:02d}".encode(),
            "image": _png(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)),
            "image_center_crop": _png(np.full((S, S, 3), i, np.uint8)),
            "spectrogram": np.full((257, 200), _code(i), np.float16),
            "boxes": boxes if i % 3 else np.zeros((0, 4), np.float32),
            "label": -1, "sounding": bool(i % 3)})
    return FakeSource(records, gt_format)


def _raster(boxes, fmt):
    gt = np.zeros((224, 224))
    for x0, y0, x1, y1 in np.asarray(boxes, int):
        gt[y0:y1, x0:x1] += 1
    return np.minimum(gt / 2, 1) if fmt == "flickr" else (gt > 0).astype(float)


def _eval(source, **kwargs):
    defaults = {"global_batch_size": 8, "image_size": S, "process_index": 0,
                "process_count": 1, "num_threads": 2}
    return list(pipeline.eval_loader(source, **{**defaults, **kwargs}))


def test_eval_every_sample_exactly_once_on_8_hosts():
    source = _eval_source(13)
    seen, indices, slots = [], [], 0
    for p in range(8):
        batches = _eval(source, process_index=p, process_count=8)
        assert len(batches) == 2  # ceil(13 / 8) on every host
        for b in batches:
            assert b["image"].shape == (1, S, S, 3) and b["gt_map"].shape == (1, 224, 224)
            slots += len(b["mask"])
            seen += list(b["id"][b["mask"]])
            # Each slot carries its test-set index: the sample's own, or >= N for padding.
            for index, clip_id in zip(b["index"][b["mask"]], b["id"][b["mask"]], strict=True):
                assert clip_id == f"clip{index:02d}"
            indices += list(b["index"][b["mask"]])
            assert (b["index"][~b["mask"]] >= 13).all()
            assert all(i == "" for i in b["id"][~b["mask"]])
            assert not b["sounding"][~b["mask"]].any()
    assert slots == 16 and len(seen) == 13
    assert sorted(seen) == [f"clip{i:02d}" for i in range(13)]
    assert sorted(indices) == list(range(13))
    # One host: the same samples in the same order, padding at the end.
    single = _eval(source)
    assert [len(b["mask"]) for b in single] == [8, 8]
    assert sum(int(b["mask"].sum()) for b in single) == 13
    ids = [i for b in single for i in b["id"][b["mask"]]]
    assert ids == [f"clip{i:02d}" for i in range(13)]
    assert ids == [i for b in _eval(source) for i in b["id"][b["mask"]]]  # deterministic


@pytest.mark.parametrize("fmt", ["vggss", "flickr"])
def test_eval_batch_values(fmt):
    source = _eval_source(5, gt_format=fmt)
    (batch,) = _eval(source)  # gt_format from the dataset's metadata
    assert batch["image"].dtype == np.uint8 and batch["spec"].dtype == np.float16
    assert batch["spec"].shape == (8, 257, 200, 1) and batch["index"].tolist() == list(range(8))
    assert batch["gt_map"].dtype == np.float32 and batch["mask"].dtype == bool
    for k in range(5):
        record = source[k]
        pixels = np.asarray(Image.open(io.BytesIO(record["image"])))
        np.testing.assert_array_equal(batch["image"][k], pixels)
        np.testing.assert_array_equal(batch["spec"][k, ..., 0], record["spectrogram"])
        np.testing.assert_array_equal(batch["gt_map"][k], _raster(record["boxes"], fmt))
        assert batch["sounding"][k] == record["sounding"] and batch["id"][k] == f"clip{k:02d}"
    assert batch["mask"].tolist() == [True] * 5 + [False] * 3
    np.testing.assert_array_equal(batch["gt_map"][5:], 0)
    assert batch["gt_map"][2].max() == (0.5 if fmt == "flickr" else 1.0)  # 1 box: consensus


def test_eval_center_crop_variant_and_errors():
    source = _eval_source(3)
    (batch,) = _eval(source, test_resize="center_crop")
    for k in range(3):
        np.testing.assert_array_equal(batch["image"][k], k)
    with pytest.raises(ValueError, match="test_resize"):
        _eval(source, test_resize="crop")
    with pytest.raises(ValueError, match="gt format"):
        _eval(source, gt_format="coco")
    with pytest.raises(ValueError, match="multiple"):
        _eval(source, global_batch_size=6, process_count=4)


# -- on a prepared dataset ---------------------------------------------------------------------

def test_loaders_on_a_prepared_synthetic_dataset(tmp_path):
    from sslocal.data import prepare

    manifest = prepare.prepare("synthetic_av/tiny", data_dir=os.fspath(tmp_path),
                               num_workers=1)
    del manifest
    size = prepare.image_size("synthetic_av/tiny")
    train = prepare.load_split("synthetic_av/tiny", "train", os.fspath(tmp_path))
    test = prepare.load_split("synthetic_av/tiny", "test", os.fspath(tmp_path))
    batch = next(pipeline.train_loader(train, global_batch_size=8, image_size=size, seed=0,
                                       process_index=0, process_count=1))
    assert batch["image"].shape == (8, size, size, 3) and batch["spec"].shape == (8, 257, 200, 1)
    assert np.isfinite(batch["spec"]).all() and -24 < batch["spec"].mean() < 12
    seen = []
    for p in range(2):
        for b in pipeline.eval_loader(test, global_batch_size=6, image_size=size,
                                      process_index=p, process_count=2):
            assert b["gt_map"].shape == (3, 224, 224)
            assert (b["gt_map"][b["mask"]].reshape(int(b["mask"].sum()), -1).max(1) == 1).all()
            seen += list(b["id"][b["mask"]])
    assert sorted(seen) == sorted(f"test_{i:06d}" for i in range(len(test)))


def test_model_inputs_on_device_against_float64():
    """The jitted steps normalise the loaders' uint8 frames and float16 spectrograms."""
    import jax

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, S, S, 3), np.uint8)
    images[0, 0, :3] = [[0, 0, 0], [255, 255, 255], [128, 64, 3]]  # the extremes too
    specs = rng.normal(-8, 4, (4, 257, 200, 1)).astype(np.float16)
    image, spec = jax.jit(pipeline.model_inputs)(images, specs)
    assert image.dtype == spec.dtype == np.float32
    np.testing.assert_allclose(image, (images / 255.0 - MEAN) / STD, rtol=0, atol=1e-5)
    np.testing.assert_allclose(spec, specs.astype(np.float64) / 12.0, rtol=3e-7)
    with pytest.raises(TypeError, match="uint8 frames and float16"):
        pipeline.model_inputs(images.astype(np.float32), specs)


def test_jpeg_decode_is_pillows():
    """simplejpeg (the fast path) gives Pillow's pixels on the builders' JPEGs; broken ones
    still fail with Pillow's error."""
    rng = np.random.default_rng(4)
    smooth = np.linspace(0, 255, 41 * 57 * 3).reshape(41, 57, 3)
    frame = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    for subsampling in (0, 2):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=95, subsampling=subsampling)
        data = buf.getvalue()
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(pipeline.decode_image(data), want)
    grey = io.BytesIO()
    Image.fromarray(frame[..., 0]).save(grey, format="JPEG", quality=95)
    np.testing.assert_array_equal(pipeline.decode_image(grey.getvalue()),
                                  np.asarray(Image.open(grey).convert("RGB")))
    with pytest.raises(OSError):
        pipeline.decode_image(data[: len(data) // 2])  # truncated
