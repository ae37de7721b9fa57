"""Grain input pipelines over the prepared ArrayRecord data (tfds data sources).

Both loaders batch uint8 frames with the stored float16 spectrograms; `model_inputs` finishes
them (ImageNet normalisation, / 12) inside the jitted train and eval steps, where it is nearly
free, instead of on the host, where it was a third of the work per sample.
Training: each host reads its own contiguous, equally long shard of the split, shuffles it
(a new order every epoch), decodes the JPEG, takes a random S x S crop of the int(1.1 * S)
frame and flips it with probability 1/2 (seeded per record). Evaluation: every host runs the
same number of batches; each slot carries its test-set index, and padding carries mask=False,
so each sample is scored once.
"""

from __future__ import annotations

import io
import math
import resource
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import simplejpeg
from absl import flags
from PIL import Image

from sslocal import metrics
from sslocal.protocol import IMAGENET_MEAN, IMAGENET_STD, MAP_SIZE, SPEC_SCALE, SPEC_SHAPE

TEST_RESIZE = {"squash": "image", "center_crop": "image_center_crop"}  # record key per variant


# -- transforms shared with `sslocal localize` ------------------------------------------------

_JPEG_MAGIC = b"\xff\xd8\xff"


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 (H, W, 3) RGB.

    JPEG through simplejpeg: the same libjpeg-turbo decode as Pillow's (bit-identical pixels,
    tested) without Pillow's extra copy, 30% less time; anything else through Pillow.
    """
    if data[:3] == _JPEG_MAGIC:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:  # CMYK, 12-bit, ... or broken: Pillow decodes or names the problem
            pass
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)


def eval_frame(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): the test frame, squashed bicubically (aspect
    not kept; no resampling when already that size), as prepare stores test frames."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image


def stored_spectrogram(log_spec: np.ndarray) -> np.ndarray:
    """Log spectrogram (257, 200) -> float16 (257, 200, 1), as prepare stores it and the
    loaders batch it."""
    log_spec = np.asarray(log_spec)
    if log_spec.shape[-2:] != SPEC_SHAPE:
        raise ValueError(f"expected a {SPEC_SHAPE} log spectrogram, got shape {log_spec.shape}")
    return log_spec.astype(np.float16)[..., None]


def model_inputs(image: jax.Array, spec: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Frames and spectrograms as the loaders batch them (uint8, float16) -> the model's float32
    inputs, inside the jitted step: (x / 255 - mean) / std and log S / 12 (docs/protocol.md
    section 1)."""
    if image.dtype != jnp.uint8 or spec.dtype != jnp.float16:
        raise TypeError(f"the model takes uint8 frames and float16 spectrograms (as the loaders "
                        f"batch them), got {image.dtype} and {spec.dtype}")
    mean, std = jnp.asarray(IMAGENET_MEAN, jnp.float32), jnp.asarray(IMAGENET_STD, jnp.float32)
    image = (image.astype(jnp.float32) / jnp.float32(255) - mean) / std
    return image, spec.astype(jnp.float32) / jnp.float32(SPEC_SCALE)


# -- training ---------------------------------------------------------------------------------

class RandomCropFlip(grain.transforms.RandomMap):
    """Record -> {"image": uint8 (S, S, 3) random crop, maybe flipped, "spec": float16}.

    Like torchvision's RandomCrop(S) + RandomHorizontalFlip() on the stored frame, whose
    shorter side is int(1.1 * S).
    """

    def __init__(self, image_size: int):
        self.image_size = image_size

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        size = self.image_size
        image = decode_image(record["image"])
        h, w = image.shape[:2]
        if h < size or w < size:
            raise ValueError(f"stored frame {h}x{w} of {record.get('id')!r} is smaller than the "
                             f"crop {size}x{size}: was the dataset prepared for this image size?")
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        crop = image[top:top + size, left:left + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        # A view: the batch function copies it once, straight into the float32 batch.
        return {"image": crop, "spec": record["spectrogram"]}


class TrainBatch:
    """Stacks a batch: uint8 frames and the stored float16 spectrograms, one copy each."""

    def __call__(self, records: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        size = records[0]["image"].shape[0]
        images = np.empty((len(records), size, size, 3), np.uint8)
        specs = np.empty((len(records), *SPEC_SHAPE, 1), np.float16)
        for i, r in enumerate(records):
            for c in range(3):  # numpy copies a flipped (H, W, 3) view ~5x slower whole
                np.copyto(images[i, ..., c], r["image"][..., c])
            np.copyto(specs[i, ..., 0], r["spec"], casting="same_kind")
        return {"image": images, "spec": specs}


def _seeds(seed: int, process_index: int) -> tuple[int, int]:
    """Independent 32-bit seeds for the shuffle and the augmentation of one host."""
    state = np.random.SeedSequence([seed, process_index]).generate_state(2)
    return int(state[0]), int(state[1])


def _per_host_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} must be a positive multiple of the "
                         f"{process_count} processes")
    return global_batch_size // process_count


def train_loader(source: Any, *, global_batch_size: int, image_size: int, seed: int,
                 num_epochs: int | None = None, worker_count: int = 0, num_threads: int = 4,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> grain.DatasetIterator:
    """Host-local training batches {"image": uint8 (b, S, S, 3), "spec": float16 (b, 257, 200,
    1), the log spectrogram before / 12}, b = global_batch_size / process_count; num_epochs
    None = forever. `model_inputs` turns a batch into the model's inputs.

    Each host takes the contiguous shard [p * n, (p + 1) * n) of the split, n = N // P (every
    host then runs N // global_batch_size steps per epoch); the shard is reshuffled every epoch
    and the last partial batch of an epoch is dropped. The returned iterator has
    get_state/set_state (grain.checkpoint.CheckpointSave/Restore work on it).
    worker_count > 0 decodes in that many processes; num_threads threads per process.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch = _per_host_batch(global_batch_size, process_count)
    per_host = len(source) // process_count
    if per_host < batch:
        raise ValueError(f"{len(source)} examples over {process_count} processes leave "
                         f"{per_host} per process, fewer than one batch of {batch}")
    shuffle_seed, augment_seed = _seeds(seed, process_index)
    ds = grain.MapDataset.source(source)[process_index * per_host:(process_index + 1) * per_host]
    ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.random_map(RandomCropFlip(image_size), seed=augment_seed)
    # Batching before repeat keeps batches inside an epoch; indices past the first epoch reach
    # the shuffle and the crop as epoch * n + i, which reseeds both.
    ds = ds.batch(batch, drop_remainder=True, batch_fn=TrainBatch())
    ds = ds.repeat(num_epochs)
    # A batch is the unit of work of a thread: keep a few, not grain's default 500.
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1) + 1)
    it_ds = ds.to_iter_dataset(read)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (outside the CLI)
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


# -- evaluation -------------------------------------------------------------------------------

class _EvalSlots:
    """Random-access source of one host's evaluation slots: global batch k holds samples
    [k * G, (k + 1) * G), host p its part [p * b, (p + 1) * b); slots past N are padding.
    Each slot yields its test-set index with the record, so the index travels with the sample
    (the evaluator gathers it) and is computed nowhere else."""

    def __init__(self, source: Any, batch: int, process_index: int, process_count: int):
        self.source = source
        self.n = len(source)
        self.batch = batch
        self.process_index = process_index
        self.global_batch = batch * process_count
        self.num_batches = math.ceil(self.n / self.global_batch)

    def __len__(self) -> int:
        return self.num_batches * self.batch

    def __getitem__(self, slot: int) -> tuple[int, Any]:
        k, i = divmod(int(slot), self.batch)
        index = k * self.global_batch + self.process_index * self.batch + i
        return (index, self.source[index]) if index < self.n else (index, None)


def record_id(record: dict[str, Any]) -> str:
    """A record's clip id as str (TFDS returns bytes)."""
    clip_id = record["id"]
    return clip_id.decode("utf-8") if isinstance(clip_id, bytes) else str(clip_id)


class _EvalRecord(grain.transforms.Map):
    def __init__(self, image_size: int, image_key: str, masks: bool = False):
        self.image_size = image_size
        self.image_key = image_key
        self.masks = masks

    def map(self, item: tuple[int, Any]) -> dict[str, Any]:
        index, record = item
        size = self.image_size
        if record is None:  # padding: scored by nobody
            out = {"image": np.zeros((size, size, 3), np.uint8),
                   "spec": np.zeros((*SPEC_SHAPE, 1), np.float16),
                   "boxes": np.zeros((0, 4), np.float32), "mask": False, "sounding": False,
                   "index": index, "id": ""}
            if self.masks:
                out["gt_mask"] = np.zeros((MAP_SIZE, MAP_SIZE), np.uint8)
            return out
        if self.image_key not in record:
            raise KeyError(f"the dataset has no {self.image_key!r} frames (test sets only)")
        out = {"image": eval_frame(decode_image(record[self.image_key]), size),
               "spec": np.asarray(record["spectrogram"], np.float16)[..., None],
               "boxes": np.asarray(record["boxes"], np.float32), "mask": True,
               "sounding": bool(record["sounding"]), "index": index, "id": record_id(record)}
        if self.masks:  # AVSBench's ground truth: the stored 224 x 224 mask (0 / 1)
            if "mask" not in record:
                raise KeyError("the dataset has no 'mask' feature (AVSBench sets only)")
            from sslocal.data.builders._benchmark import decode_mask

            out["gt_mask"] = decode_mask(record["mask"])
        return out


class _EvalBatch:
    def __init__(self, gt_format: str):
        self.gt_format = gt_format

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        batch = {
            "image": np.stack([r["image"] for r in records]),
            "spec": np.stack([r["spec"] for r in records]),
            "gt_map": metrics.gt_maps([r["boxes"] for r in records], self.gt_format,
                                      size=MAP_SIZE),
            "mask": np.array([r["mask"] for r in records], bool),
            "sounding": np.array([r["sounding"] for r in records], bool),
            "num_boxes": np.array([len(r["boxes"]) for r in records], np.int64),
            "index": np.array([r["index"] for r in records], np.int64),
            "id": np.array([r["id"] for r in records], dtype=str),
        }
        if "gt_mask" in records[0]:
            batch["gt_mask"] = np.stack([r["gt_mask"] for r in records])
        return batch


def eval_loader(source: Any, *, global_batch_size: int, image_size: int,
                gt_format: str | None = None, process_index: int | None = None,
                process_count: int | None = None, test_resize: str = "squash",
                num_threads: int = 4, masks: bool = False) -> grain.DatasetIterator:
    """Host-local evaluation batches {"image" uint8 (b, S, S, 3), "spec" float16 (b, 257, 200,
    1), "gt_map" f32 (b, 224, 224), "mask" bool, "sounding" bool, "num_boxes" int, "index"
    int64, "id" str},
    b = global_batch_size / process_count; `model_inputs` turns image and spec into the
    model's inputs.

    Every host yields ceil(N / global_batch_size) batches; global batch k holds samples
    [k * G, (k + 1) * G) split contiguously over the hosts; "index" is each slot's position in
    the test set, and slots past N (index >= N) are padding with mask False (zeros, id "").
    So each sample is scored exactly once.
    gt_format: "flickr" or "vggss" (default: the dataset's, from its metadata).
    test_resize: "squash" (the reference, docs/protocol.md section 1) or "center_crop".
    masks: also "gt_mask" uint8 (b, 224, 224), the record's stored binary mask (AVSBench;
    zeros for padding).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch = _per_host_batch(global_batch_size, process_count)
    if test_resize not in TEST_RESIZE:
        raise ValueError(f"unknown test_resize {test_resize!r}; choose one of "
                         f"{sorted(TEST_RESIZE)}")
    if gt_format is None:
        gt_format = source.dataset_info.metadata["gt_format"]
    if gt_format not in metrics.GT_FORMATS:
        raise ValueError(f"unknown gt format {gt_format!r}; choose one of {metrics.GT_FORMATS}")
    slots = _EvalSlots(source, batch, process_index, process_count)
    ds = grain.MapDataset.source(slots).map(_EvalRecord(image_size, TEST_RESIZE[test_resize],
                                                        masks))
    ds = ds.batch(batch, batch_fn=_EvalBatch(gt_format))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1) + 1)
    return iter(ds.to_iter_dataset(read))


# -- throughput -------------------------------------------------------------------------------

def loader_throughput(source: Any, *, global_batch_size: int = 128, image_size: int = 224,
                    num_batches: int = 20, warmup_batches: int = 2, worker_count: int = 0,
                    num_threads: int = 1, seed: int = 0) -> dict[str, float]:
    """Training-loader throughput on this host: samples/s of wall time and per CPU-second of
    this process (the per-core figure; with worker_count > 0 the workers' CPU time is not
    counted, so only the wall-clock figure is meaningful there)."""
    it = train_loader(source, global_batch_size=global_batch_size, image_size=image_size,
                      seed=seed, worker_count=worker_count, num_threads=num_threads,
                      process_index=0, process_count=1)
    for _ in range(warmup_batches):
        next(it)

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    wall0, cpu0 = time.perf_counter(), cpu()
    for _ in range(num_batches):
        next(it)
    wall, cpu_s = time.perf_counter() - wall0, cpu() - cpu0
    samples = num_batches * global_batch_size
    return {"samples": samples, "wall_seconds": wall, "cpu_seconds": cpu_s,
            "samples_per_second": samples / wall,
            "samples_per_cpu_second": samples / max(cpu_s, 1e-9),
            "num_threads": num_threads, "worker_count": worker_count}
