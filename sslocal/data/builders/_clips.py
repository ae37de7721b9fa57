"""Turning one clip on disk into one dataset example (runs in builder worker processes).

Kept free of TFDS so that spawned workers import little. Every failure is returned, never raised,
so that the builder reports it in the manifest and moves on: a bad clip is skipped, never
replaced by another one.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sslocal.data import spectrogram
from sslocal.protocol import MAP_SIZE, TRAIN_SCALE

JPEG_QUALITY = 95
JPEG_SUBSAMPLING = 0  # 4:4:4; 4:2:0 (2) decodes ~0.1 ms faster but smears coloured edges

Example = dict[str, Any]


def train_frame_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to int(1.1 * size), as torchvision's Resize(int).

    The longer side is truncated, like torchvision: int(short_target * long / short).
    """
    short = int(size * TRAIN_SCALE)
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def encode_train_frame(image: Image.Image, size: int) -> bytes:
    """Training frame: shorter side int(1.1 * size) (bicubic), stored as JPEG quality 95, 4:4:4."""
    target = train_frame_size(*image.size, size)
    if image.size != target:
        image = image.resize(target, Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    return buf.getvalue()


def encode_test_frame(image: Image.Image, size: int) -> bytes:
    """Test frame, reference protocol: squashed to size x size (bicubic), lossless PNG."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_center_crop_frame(image: Image.Image, size: int) -> bytes:
    """Test frame, the "center_crop" variant: shorter side to size (bicubic), centre crop, PNG."""
    w, h = image.size
    target = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if image.size != target:
        image = image.resize(target, Image.BICUBIC)
    left, top = (target[0] - size) // 2, (target[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_frame(path: str | os.PathLike) -> Image.Image:
    """An image file -> RGB PIL image. The format is taken from the content, not the name (a PNG
    named .jpg decodes); an empty or truncated file raises."""
    with Image.open(path) as image:
        image.load()  # a truncated file fails here (PIL's LOAD_TRUNCATED_IMAGES stays False)
        return image.convert("RGB")


def check_boxes(boxes: Any, size: int = MAP_SIZE) -> tuple[np.ndarray, list[str]]:
    """Boxes (N, 4) xmin, ymin, xmax, ymax in size-px coordinates -> float32 (N, 4) and warnings.

    Coordinates outside [0, size] are clipped (reported). A box with xmin >= xmax or
    ymin >= ymax is kept as it is (reported): it rasterises to nothing, exactly as in the
    reference, whose slicing gt[ymin:ymax, xmin:xmax] is then empty (VGG-SS's corrupt
    coordinates give such boxes, and the protocol keeps them).
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
    warnings = []
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"non-finite box coordinates: {arr.tolist()}")
    clipped = np.clip(arr, 0, size)
    if np.any(clipped != arr):
        warnings.append(f"box coordinates outside [0, {size}] clipped: {arr.tolist()}")
    empty = (clipped[:, 0] >= clipped[:, 2]) | (clipped[:, 1] >= clipped[:, 3])
    if np.any(empty):
        warnings.append(f"{int(empty.sum())} empty or swapped box(es) kept (they mark no pixel): "
                        f"{clipped[empty].tolist()}")
    return clipped.astype(np.float32), warnings


def printable(name: str) -> str:
    """A file name or id as valid UTF-8 (undecodable bytes shown as \\xNN)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _rel(path: str | os.PathLike | None, root: str | None) -> str:
    if path is None:
        return ""
    path = os.fspath(path)
    return printable(os.path.relpath(path, root) if root else path)


def process_clip(job: dict[str, Any]) -> dict[str, Any]:
    """One job (see `make_job`) -> {"status": "ok" | "missing" | "unreadable", ...}.

    "ok" carries "example" (the dataset features) and maybe "warnings"; "missing" names the
    absent files; "unreadable" the file and the error.
    """
    root = job.get("root")
    clip_id = job["id"]
    try:
        clip_id.encode("utf-8")
    except UnicodeEncodeError:
        return {"status": "unreadable", "id": printable(clip_id), "file": _rel(job["frame"], root),
                "error": f"file name is not valid UTF-8: {os.fsencode(clip_id)!r}"}
    frame_path, audio_path, video_path = job["frame"], job["audio"], job.get("video")
    need_video = not os.path.isfile(frame_path) or not os.path.isfile(audio_path)
    if need_video and not (video_path and os.path.isfile(video_path)):
        # Name the files of the layout the root has (frames/ + audio/, or video/).
        layout = [p for p in (frame_path, audio_path, video_path)
                  if p and os.path.isdir(os.path.dirname(p))] or [frame_path, audio_path]
        absent = [_rel(p, root) for p in layout if not os.path.isfile(p)]
        return {"status": "missing", "id": clip_id, "files": absent}
    xml_path = job.get("xml")
    if xml_path and not os.path.isfile(xml_path):
        return {"status": "missing", "id": clip_id, "files": [_rel(xml_path, root)]}
    if job.get("missing_annotation"):
        return {"status": "missing", "id": clip_id, "files": [job["missing_annotation"]]}

    warnings: list[str] = []
    current = frame_path
    try:
        video_frame = video_audio = None
        if need_video:
            from sslocal.data import video  # PyAV only when a clip needs it

            current = video_path
            video_frame, video_audio = video.read_video_clip(video_path)
        if os.path.isfile(frame_path):
            current = frame_path
            image = read_frame(frame_path)
        else:
            image = Image.fromarray(np.asarray(video_frame, np.uint8)).convert("RGB")
        if os.path.isfile(audio_path):
            current = audio_path
            wave = spectrogram.load_clip_audio(audio_path)
        else:
            wave = np.asarray(video_audio, np.float32)  # already the protocol's 3 s clip
        log_spec = spectrogram.log_spectrogram(wave).astype(np.float16)
        if not np.all(np.isfinite(log_spec)):
            raise ValueError("log spectrogram is not finite in float16")
        if xml_path:  # an XML without boxes raises: reported as unreadable
            from sslocal.data import annotations

            current = xml_path
            boxes = annotations.load_flickr_xml(xml_path)
        else:
            boxes = job.get("boxes")
            boxes = [] if boxes is None else boxes
        current = frame_path
        boxes, box_warnings = check_boxes(boxes)
        warnings += box_warnings
        size = job["image_size"]
        example = {"id": clip_id, "boxes": boxes, "spectrogram": log_spec,
                   "label": int(job.get("label", -1)), "sounding": bool(job.get("sounding", True))}
        if job["test"]:
            example["image"] = encode_test_frame(image, size)
            example["image_center_crop"] = encode_center_crop_frame(image, size)
        else:
            example["image"] = encode_train_frame(image, size)
    except Exception as e:  # any decoder's error is reported, never raised
        return {"status": "unreadable", "id": clip_id, "file": _rel(current, root),
                "error": f"{type(e).__name__}: {e}"}
    return {"status": "ok", "id": clip_id, "example": example, "warnings": warnings}


def make_job(clip_id: str, root: str | Path, *, image_size: int, test: bool,
             frame_id: str | None = None, audio_id: str | None = None, **extra: Any) -> dict:
    """The work item of one clip: ROOT/frames/<frame_id>.jpg, ROOT/audio/<audio_id>.wav, and
    ROOT/video/<frame_id>.mp4 as the fallback (frame and audio ids default to clip_id)."""
    root = os.fspath(root)
    frame_id = frame_id or clip_id
    audio_id = audio_id or clip_id
    video = os.path.join(root, "video", f"{frame_id}.mp4") if frame_id == audio_id else None
    return {"id": clip_id, "root": root, "image_size": image_size, "test": test,
            "frame": os.path.join(root, "frames", f"{frame_id}.jpg"),
            "audio": os.path.join(root, "audio", f"{audio_id}.wav"), "video": video, **extra}


def ids_on_disk(root: str | Path) -> list[str]:
    """Every clip id with a frame, an audio file or a video under root (sorted). Names that are
    not valid UTF-8 come back surrogate-escaped; `process_clip` reports them."""
    root = Path(root)
    found = set()
    for sub, ext in (("frames", ".jpg"), ("audio", ".wav"), ("video", ".mp4")):
        folder = root / sub
        if folder.is_dir():
            found.update(name[: -len(ext)] for name in os.listdir(folder) if name.endswith(ext))
    return sorted(found)
