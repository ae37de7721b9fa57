"""`sslocal localize`: heatmaps of where a sound comes from, on a user's video or image + audio.

    sslocal localize --checkpoint DIR --video clip.mp4 [--every 1.0] [--ogl] --out OUT
    sslocal localize --checkpoint DIR --image frame.jpg --audio a.wav [--ogl] --out OUT

Every step is one (frame, 3 s of audio centred on it) pair, prepared exactly as `sslocal prepare`
stores a test clip (docs/protocol.md sections 1 and 5): the frame squashed to S x S (bicubic),
the audio's float16 log spectrogram; the evaluator's step normalises both and computes the map,
alpha_ii upsampled to 224 x 224 and min-max normalised. S is the size the model was trained at.
Overlays are drawn at the frame's own resolution, in the report's colours.

OUT gets, per map kind ("" for the AV map, "_ogl" for the object-guided one with --ogl):
  image + audio: overlay{kind}.png, map{kind}.npy (224, 224)
  video:         step_NNNN{kind}.png per step, maps{kind}.npy (T, 224, 224), and
                 overlay{kind}.mp4 (H.264 + AAC, the original audio) when there are 2+ steps
and localize.json: the checkpoint, S, and every step's time and peak (x, y) in frame pixels.
The checkpoint, the inputs and OUT may be local paths or gs:// URLs (writers.as_path): a remote
video or audio file is copied to a temporary local file for FFmpeg, an MP4 is encoded locally
and uploaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path  # only for the package's own files
from typing import Any

import av
import ml_collections
import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from sslocal import report, sharding
from sslocal.data import pipeline, spectrogram
from sslocal.data import video as video_io
from sslocal.evaluator import Evaluator
from sslocal.models import load
from sslocal.writers import as_path, check_paths, local_file, progress, staged_file

logger = logging.getLogger(__name__)

OVERLAY_ALPHA = report.BLEND  # weight of the heatmap colours over the frame
BATCH = 8  # steps per device call; a fixed size compiles once
AUDIO_CHUNK = 1024  # AAC frame size

# --------------------------------------------------------------------------- pure helpers


def model_inputs(frame: np.ndarray, audio: np.ndarray, image_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (H, W, 3) frame, (48000,) audio) -> (uint8 (S, S, 3) frame, float16 (257, 200, 1)
    log spectrogram): a test clip as `sslocal prepare` stores it and the eval loader batches it
    (docs/protocol.md section 1); the evaluator's step normalises both."""
    return (pipeline.eval_frame(frame, image_size),
            pipeline.stored_spectrogram(spectrogram.log_spectrogram(audio)))


def resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h, w) map -> (height, width) float32, bilinear: back to the frame for display."""
    heatmap = np.asarray(heatmap, np.float32)
    if heatmap.shape == (height, width):
        return heatmap
    return np.asarray(Image.fromarray(heatmap).resize((width, height), Image.BILINEAR))


def overlay(frame: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 (H, W, 3) frame blended with the report's heatmap colours of a [0, 1] map of any
    size (resized to the frame)."""
    frame = np.asarray(frame)
    return report.blend(frame, resize_map(heatmap, *frame.shape[:2]), alpha)


def peak(heatmap: np.ndarray, height: int, width: int) -> tuple[float, float]:
    """(x, y) in frame pixels of the maximum of a (h, w) map squashed over a height x width
    frame (the centre of the map pixel; the first one on ties)."""
    heatmap = np.asarray(heatmap)
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return (float((col + 0.5) * width / heatmap.shape[1]),
            float((row + 0.5) * height / heatmap.shape[0]))


# --------------------------------------------------------------------------- the model


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py: importable as `configs.default`, or beside the package in a checkout."""
    try:
        from configs import default
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "configs" / "default.py"
        if not path.is_file():
            raise FileNotFoundError("configs/default.py not found: pass --config") from None
        spec = importlib.util.spec_from_file_location("sslocal_default_config", path)
        default = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(default)
    return default.get_config()


class Localizer:
    """A trained model (workdir, model directory or PyTorch file) that maps (frame, audio)
    pairs to maps, at the frame size it was trained at, through the evaluator's step."""

    def __init__(self, checkpoint: str | os.PathLike,
                 config: ml_collections.ConfigDict | None = None, *, ogl: bool = False):
        config = config if config is not None else default_config()
        mesh = sharding.make_mesh(1)  # a handful of samples per call: one device is enough
        self.model = load.load_model(checkpoint, mesh=mesh)
        described = self.model.model_config
        for key in ("width", "embed_dim"):  # the checkpoint describes its own shape and wins
            if key in described and described[key] != config.model[key]:
                logger.warning("%s: model.%s is %s in the checkpoint, %s in --config; using the "
                               "checkpoint's", checkpoint, key, described[key], config.model[key])
        self.image_size = self.model.image_size
        self.description = self.model.description
        self.evaluator = Evaluator(config, mesh, ogl=ogl, batch_size=BATCH)
        self.kinds = self.evaluator.kinds

    def maps(self, frames: list[np.ndarray], audios: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Frames uint8 (H, W, 3) and (48000,) audio clips -> {kind: (N, 224, 224) float32}."""
        pairs = [model_inputs(f, a, self.image_size) for f, a in zip(frames, audios, strict=True)]
        out = self.evaluator.maps(self.model, np.stack([p[0] for p in pairs]),
                                  np.stack([p[1] for p in pairs]))
        return {kind: out[kind] for kind in self.kinds}


# --------------------------------------------------------------------------- inputs


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file (local or gs://) -> uint8 (H, W, 3) RGB, with clear errors."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return pipeline.decode_image(path.read_bytes())
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e


# --------------------------------------------------------------------------- outputs


def _even(frame: np.ndarray) -> np.ndarray:
    """H.264 in 4:2:0 needs even sizes: drop a last odd row / column."""
    h, w = frame.shape[:2]
    return frame[: h - h % 2, : w - w % 2]


class OverlayVideoWriter:
    """An MP4 of overlays, each shown for `every` seconds (H.264), plus the audio of a media
    file re-encoded as AAC (added on close, streamed: long clips do not fill the memory)."""

    def __init__(self, path: str | os.PathLike, every: float,
                 audio_source: str | os.PathLike | None = None):
        self.path = as_path(path)
        self._audio_source = audio_source
        self._staged = contextlib.ExitStack()  # encoded locally, uploaded on close if remote
        local = self._staged.enter_context(staged_file(self.path, suffix=".mp4"))
        self._container = av.open(local, "w")
        self._video = self._container.add_stream(
            "libx264", rate=Fraction(1 / every).limit_denominator(1000))
        self._video.pix_fmt = "yuv420p"
        self._audio = None
        if audio_source is not None:
            with av.open(str(audio_source)) as source:
                channels = source.streams.audio[0].channels
                rate = source.streams.audio[0].rate
            self._audio = self._container.add_stream("aac", rate=rate)
            self._audio.layout = "mono" if channels == 1 else "stereo"
        self._size: tuple[int, int] | None = None

    def add(self, frame: np.ndarray) -> None:
        frame = _even(frame)
        if self._size is None:
            self._size = frame.shape[:2]
            self._video.height, self._video.width = self._size
        frame = np.ascontiguousarray(frame[: self._size[0], : self._size[1]])
        self._container.mux(self._video.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))

    def close(self) -> None:
        try:
            self._container.mux(self._video.encode())
            if self._audio is not None:
                self._mux_audio()
        finally:
            self._container.close()
            self._staged.close()

    def _mux_audio(self) -> None:
        stream = self._audio
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=stream.rate,
                                      frame_size=AUDIO_CHUNK)
        samples = 0
        with av.open(str(self._audio_source)) as source:
            decoded = source.decode(source.streams.audio[0])
            for frame in itertools.chain(decoded, [None]):
                for chunk in resampler.resample(frame):
                    chunk.pts, samples = samples, samples + chunk.samples
                    self._container.mux(stream.encode(chunk))
        self._container.mux(stream.encode())


def _suffix(kind: str) -> str:
    return "" if kind == "av" else f"_{kind}"


def _save_png(path: epath.Path, image: np.ndarray) -> str:
    with path.open("wb") as f:
        Image.fromarray(image).save(f, format="PNG")
    return path.name


def _save_npy(path: epath.Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, array)


# --------------------------------------------------------------------------- the command


def localize_image(localizer: Localizer, frame: np.ndarray, clip: np.ndarray,
                   out: epath.Path) -> list[dict[str, Any]]:
    """One frame and its (48000,) audio clip -> overlay PNG and map .npy; the step's record."""
    maps = localizer.maps([frame], [clip])
    step: dict[str, Any] = {"t": None}
    for kind, m in maps.items():
        s = _suffix(kind)
        _save_npy(out / f"map{s}.npy", m[0])
        step[f"png{s}"] = _save_png(out / f"overlay{s}.png", overlay(frame, m[0]))
        step[f"peak_xy{s}"] = peak(m[0], *frame.shape[:2])
    return [step]


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def localize_video(localizer: Localizer, steps: Iterator[tuple[float, np.ndarray, np.ndarray]],
                   out: epath.Path, *, every: float,
                   audio_source: str | os.PathLike | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(t, frame, clip) steps -> step_NNNN PNGs and maps .npy; with 2+ steps an overlay MP4
    per map kind (with the audio of `audio_source`). Returns the step records and videos."""
    records: list[dict[str, Any]] = []
    maps: dict[str, list[np.ndarray]] = {kind: [] for kind in localizer.kinds}
    first: dict[str, np.ndarray] = {}
    writers: dict[str, OverlayVideoWriter] = {}
    try:
        for batch in _batches(progress(iterable=steps, desc="localize", unit="step"), BATCH):
            times, frames, clips = zip(*batch, strict=True)
            result = localizer.maps(list(frames), list(clips))
            for i, (t, frame) in enumerate(zip(times, frames, strict=True)):
                step: dict[str, Any] = {"t": float(t)}
                for kind in localizer.kinds:
                    s, m = _suffix(kind), result[kind][i]
                    picture = overlay(frame, m)
                    step[f"png{s}"] = _save_png(out / f"step_{len(records):04d}{s}.png", picture)
                    step[f"peak_xy{s}"] = peak(m, *frame.shape[:2])
                    maps[kind].append(m)
                    if not records:  # a video only once a second step comes
                        first[kind] = picture
                        continue
                    if kind not in writers:
                        writers[kind] = OverlayVideoWriter(out / f"overlay{s}.mp4", every,
                                                           audio_source)
                        writers[kind].add(first.pop(kind))
                    writers[kind].add(picture)
                records.append(step)
    finally:
        for writer in writers.values():
            writer.close()
    for kind in localizer.kinds:
        _save_npy(out / f"maps{_suffix(kind)}.npy", np.stack(maps[kind]))
    return records, {kind: w.path.name for kind, w in writers.items()}


def main(*, checkpoint: str, video: str | None = None, image: str | None = None,
         audio: str | None = None, every: float = 1.0, ogl: bool = False, out: str,
         config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """`sslocal localize`: a video, or an image with an audio file -> heatmap overlays in OUT.

    Returns (and writes to OUT/localize.json) the inputs, the checkpoint, S and every step's
    time and peak. Bad inputs raise FileNotFoundError / ValueError before the model loads.
    Every path may be local or a gs:// URL.
    """
    if video is not None and (image is not None or audio is not None):
        raise ValueError("give either --video or --image with --audio, not both")
    if video is None and (image is None or audio is None):
        raise ValueError("give --video, or --image together with --audio")
    if not (math.isfinite(every) and every > 0):
        raise ValueError(f"--every must be a positive number of seconds, got {every}")
    check_paths(checkpoint, video, image, audio, out)  # a missing `gcs` extra: first
    with contextlib.ExitStack() as stack:  # local copies of remote media, for FFmpeg
        if video is not None:
            local_video = stack.enter_context(local_file(video))
            steps = video_io.iter_video_steps(local_video, every)
            # The first step is decoded now: a bad file fails before the model loads.
            steps = itertools.chain([next(steps)], steps)
            inputs: dict[str, Any] = {"video": str(video), "every": every}
        else:
            frame = read_image(image)
            with local_file(audio) as local_audio:
                clip = spectrogram.load_clip_audio(local_audio)
            inputs = {"image": str(image), "audio": str(audio)}
        localizer = Localizer(checkpoint, config, ogl=ogl)
        out_dir = as_path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        if video is not None:
            records, videos = localize_video(localizer, steps, out_dir, every=every,
                                             audio_source=local_video)
        else:
            records, videos = localize_image(localizer, frame, clip, out_dir), {}
    summary = {**inputs, "checkpoint": localizer.description, "image_size": localizer.image_size,
               "maps": list(localizer.kinds), "steps": records, "videos": videos}
    (out_dir / "localize.json").write_text(json.dumps(summary, indent=2))
    print(f"sslocal localize: {len(records)} step(s) -> {out_dir}"
          + (f" ({', '.join(videos.values())})" if videos else ""))
    return summary
