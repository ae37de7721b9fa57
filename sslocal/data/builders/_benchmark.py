"""Turning one item of the post-2023 benchmark sets (IS3, AVSBench) into one example.

Runs in builder worker processes, so it imports no TFDS at module level (as `_clips`). Every
failure is returned, never raised: the builder lists it in the manifest and moves on, and a
missing or bad file is never replaced by another one.

- `process_pair` (IS3): one (image, source) pair, exactly `_clips.process_clip` on that pair's
  own image and audio files, plus the fields that regroup the pairs of one image.
- `process_mask_frame` (AVSBench S4 / MS3): one frame with its binary mask and a 3 s window of
  its video's wav (docs/protocol.md section 9).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image

from sslocal.data import spectrogram
from sslocal.data.builders import _clips
from sslocal.protocol import MAP_SIZE

MASK_THRESHOLD = 128  # a mask pixel is foreground when its grey value is >= 128 (SSLalignment)


def _rel(path: str | os.PathLike | None, root: str | None) -> str:
    if path is None:
        return ""
    path = os.fspath(path)
    return _clips.printable(os.path.relpath(path, root) if root else path)


# -- IS3 ---------------------------------------------------------------------------------------

def process_pair(job: dict[str, Any]) -> dict[str, Any]:
    """One IS3 (image, source) job -> `_clips.process_clip`'s result, with job["extra"]
    (image_id, source, source_name) added to the example.

    The job's "frame" and "audio" are that pair's own files (named in the annotation json);
    "video" is None, so an absent image or audio file is reported "missing", never filled in
    from elsewhere. An id the annotation lacks is reported missing by that reason first."""
    if job.get("missing_annotation"):
        return {"status": "missing", "id": job["id"], "files": [job["missing_annotation"]]}
    result = _clips.process_clip(job)
    if result["status"] == "ok":
        result["example"].update(job["extra"])
    return result


# -- AVSBench ----------------------------------------------------------------------------------

def read_wave(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """An audio file -> (samples (n,) or (channels, n) float, sample rate), read as
    `spectrogram.load_clip_audio` reads it (librosa, then PyAV/FFmpeg when that fails)."""
    import librosa

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return librosa.load(path, sr=None, mono=False)
    except Exception as e:  # soundfile / audioread raise many types for a bad file
        from sslocal.data import video

        try:
            return video.read_audio(path)
        except ValueError as av_error:
            raise ValueError(f"cannot read audio file {path}: {type(e).__name__} {e}; "
                             f"FFmpeg: {av_error}") from e


def read_mask(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int], int]:
    """A mask image -> (binary (h, w) bool, (w, h) as on disk, number of pixels that are neither
    0 nor 255). Any mode is converted to 8-bit grey first ('1', 'L', 'P' with its palette);
    foreground = grey >= 128, SSLalignment's `gts[gts >= 128] = 1`."""
    with Image.open(path) as image:
        image.load()  # a truncated file fails here
        size = image.size
        grey = np.asarray(image.convert("L"))
    partial = int(np.count_nonzero((grey != 0) & (grey != 255)))
    return grey >= MASK_THRESHOLD, size, partial


def resize_mask(mask: np.ndarray, size: int = MAP_SIZE) -> np.ndarray:
    """A binary (h, w) mask -> (size, size) bool, nearest-neighbour (PIL's NEAREST)."""
    if mask.shape == (size, size):
        return mask.astype(bool)
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((size, size), Image.NEAREST)) >= MASK_THRESHOLD


def encode_mask(mask: np.ndarray) -> bytes:
    """A binary mask -> 1-bit PNG bytes (lossless; about 1 KB at 224 x 224)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """The stored "mask" feature -> (224, 224) uint8 of 0 / 1 (the ground truth of
    `metrics.mask_miou_fscore`)."""
    with Image.open(io.BytesIO(data)) as image:
        return (np.asarray(image.convert("L")) >= MASK_THRESHOLD).astype(np.uint8)


def mask_box(mask: np.ndarray) -> list[list[int]]:
    """The tight box of a mask's foreground, [[xmin, ymin, xmax, ymax]] with the ends exclusive
    (the box raster gt[ymin:ymax, xmin:xmax] covers every foreground pixel); [] when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return []
    return [[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]]


def process_mask_frame(job: dict[str, Any]) -> dict[str, Any]:
    """One AVSBench job -> {"status": "ok" | "missing" | "unreadable", ...} as
    `_clips.process_clip` returns it.

    job: "id", "root", "image_size", "frame", "audio", "mask" (paths), "audio_centre" (seconds
    from the start of the wav, or None: the protocol's centred 3 s), "label", "extra" (fields
    added to the example as they are). A mask whose size differs from its frame's is
    "unreadable" (the error says both sizes); nothing is resized to make it fit.
    """
    root = job.get("root")
    clip_id = job["id"]
    if job.get("missing_annotation"):
        return {"status": "missing", "id": clip_id, "files": [job["missing_annotation"]]}
    paths = [job["frame"], job["audio"], job["mask"]]
    absent = [_rel(p, root) for p in paths if not os.path.isfile(p)]
    if absent:
        return {"status": "missing", "id": clip_id, "files": absent}
    warnings_: list[str] = []
    current = job["frame"]
    try:
        image = _clips.read_frame(job["frame"])
        current = job["mask"]
        mask, mask_size, partial = read_mask(job["mask"])
        if mask_size != image.size:
            raise ValueError(f"mask is {mask_size[0]} x {mask_size[1]}, its frame "
                             f"{image.size[0]} x {image.size[1]}")
        if partial:
            warnings_.append(f"mask holds {partial} pixel(s) neither 0 nor 255: binarised at "
                             f">= {MASK_THRESHOLD}")
        mask = resize_mask(mask, MAP_SIZE)
        current = job["audio"]
        wave, sr = read_wave(job["audio"])
        centre = job.get("audio_centre")
        seconds = np.asarray(wave).shape[-1] / sr
        if centre is not None and centre - 0.5 >= seconds:
            warnings_.append(f"audio second [{centre - 0.5:g}, {centre + 0.5:g}) s is past the "
                             f"end of the {seconds:.2f} s file: the window is its last 3 s")
        wave = spectrogram.clip_from_waveform(wave, sr, centre, name=str(job["audio"]))
        log_spec = spectrogram.log_spectrogram(wave).astype(np.float16)
        if not np.all(np.isfinite(log_spec)):
            raise ValueError("log spectrogram is not finite in float16")
        current = job["frame"]
        size = job["image_size"]
        boxes, _ = _clips.check_boxes(mask_box(mask))
        example = {"id": clip_id, "boxes": boxes, "spectrogram": log_spec,
                   "label": int(job.get("label", -1)), "sounding": True,
                   "image": _clips.encode_test_frame(image, size),
                   "image_center_crop": _clips.encode_center_crop_frame(image, size),
                   "mask": encode_mask(mask), **job["extra"]}
    except Exception as e:  # any decoder's error is reported, never raised
        return {"status": "unreadable", "id": clip_id, "file": _rel(current, root),
                "error": f"{type(e).__name__}: {e}"}
    return {"status": "ok", "id": clip_id, "example": example, "warnings": warnings_}


# -- features ----------------------------------------------------------------------------------

def features_with(extra: dict[str, Any]):
    """The test-set features of base.features(True) plus `extra` (name -> TFDS feature), for
    these builders only (imports TFDS: call it in the main process)."""
    import tensorflow_datasets as tfds

    from sslocal.data.builders import base

    spec = base.features(True)
    return tfds.features.FeaturesDict({**{k: spec[k] for k in spec.keys()}, **extra})


__all__ = ["MASK_THRESHOLD", "decode_mask", "encode_mask", "features_with",
           "mask_box", "process_mask_frame", "process_pair", "read_mask", "read_wave",
           "resize_mask"]


class LayoutInManifest:
    """Mixed into a builder whose `_jobs` finds which of the authors' layouts a root has (sets
    self._layout): the manifest records it."""

    def _split_generators(self, dl_manager):
        generators = super()._split_generators(dl_manager)
        self._manifest["layout"] = self._layout
        return generators
