"""`sslocal localize`: heatmaps of where a sound comes from, on a user's video or image + audio.

    sslocal localize --checkpoint DIR --video clip.mp4 [--every 1.0] [--ogl] --out OUT
    sslocal localize --checkpoint DIR --image frame.jpg --audio a.wav [--ogl] --out OUT

Every step is one (frame, 3 s of audio centred on it) pair, prepared exactly as evaluation
prepares a test clip (PROTOCOL 1 and 5): the frame squashed to S x S (bicubic) and normalised,
the audio's log spectrogram / 12; the map is alpha_ii upsampled to 224 x 224 and min-max
normalised. Overlays are drawn at the frame's own resolution.

OUT gets, per map kind ("" for the AV map, "_ogl" for the object-guided one with --ogl):
  image + audio: overlay{kind}.png, map{kind}.npy (224, 224)
  video:         step_NNNN{kind}.png per step, maps{kind}.npy (T, 224, 224), and
                 overlay{kind}.mp4 (H.264 + AAC, the original audio) when there are 2+ steps
and localize.json: the checkpoint, S, and every step's time and peak (x, y) in frame pixels.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from sslocal import checkpointing, evaluate, sharding
from sslocal.data import pipeline, spectrogram
from sslocal.data import video as video_io
from sslocal.models import factory

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224
OVERLAY_ALPHA = 0.5  # weight of the heatmap colours over the frame
BATCH = 8  # steps per device call; a fixed size compiles once
AUDIO_CHUNK = 1024  # AAC frame size

# --------------------------------------------------------------------------- pure helpers


def model_inputs(frame: np.ndarray, audio: np.ndarray, image_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (H, W, 3) frame, (48000,) audio) -> (image (S, S, 3), spec (257, 200, 1)) float32,
    the transforms of a test clip (PROTOCOL 1)."""
    image = pipeline.preprocess_eval_image(frame, image_size)
    spec = pipeline.preprocess_spectrogram(spectrogram.log_spectrogram(audio))
    return image, spec


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (..., ) -> uint8 (..., 3) "jet" colours: blue (0), green, red (1)."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], np.float32)  # where red, green, blue ramps peak (x 4)
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h, w) map -> (height, width) float32, bilinear: back to the frame for display."""
    heatmap = np.asarray(heatmap, np.float32)
    if heatmap.shape == (height, width):
        return heatmap
    return np.asarray(Image.fromarray(heatmap).resize((width, height), Image.BILINEAR))


def overlay(frame: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 (H, W, 3) frame blended with the colours of a [0, 1] map of any size."""
    frame = np.asarray(frame)
    heat = heat_colors(resize_map(heatmap, *frame.shape[:2])).astype(np.float32)
    blended = (1 - alpha) * frame.astype(np.float32) + alpha * heat
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


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


def _workdir_config(checkpoint: Path) -> dict:
    path = checkpoint / checkpointing.CONFIG_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def image_size_of(checkpoint: str | Path, config: ml_collections.ConfigDict | None) -> int:
    """S the model was trained with: the workdir's config.json, else `config`, else 224."""
    checkpoint = Path(checkpoint)
    for source in (_workdir_config(checkpoint), checkpointing.read_model_config(checkpoint)):
        if "image_size" in source:
            return int(source["image_size"])
    return int(config.image_size) if config is not None else DEFAULT_IMAGE_SIZE


def _check_config_model(checkpoint: Path, config: ml_collections.ConfigDict) -> None:
    """The checkpoint describes its own shape and wins; a --config that differs is named."""
    described = checkpointing.read_model_config(checkpoint)
    for key in ("width", "embed_dim"):
        if key in described and described[key] != config.model[key]:
            logger.warning("%s: model.%s is %s in the checkpoint, %s in --config; using the "
                           "checkpoint's", checkpoint, key, described[key], config.model[key])


class Localizer:
    """A trained model (workdir or model directory) that maps (frame, audio) pairs to maps."""

    def __init__(self, checkpoint: str | Path, config: ml_collections.ConfigDict | None = None,
                 *, ogl: bool = False):
        checkpoint = Path(checkpoint)
        if not checkpoint.exists():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        if config is not None:
            _check_config_model(checkpoint, config)
        self.image_size = image_size_of(checkpoint, config)
        config = config if config is not None else default_config()
        mesh = sharding.make_mesh(1)  # a handful of samples per call: one device is enough
        graphdef, params, batch_stats, self.description = _load(checkpoint, config, mesh)
        self.variables = {"params": params, "batch_stats": batch_stats}
        ogl_graphdef = None
        if ogl:
            ogl_graphdef, self.variables["ogl"] = factory.build_ogl(config.eval.ogl_weights)
        self.kinds = ("av", "ogl") if ogl else ("av",)
        self._step = evaluate.make_eval_step(graphdef, mesh, upsample=config.eval.upsample,
                                             ogl_graphdef=ogl_graphdef,
                                             ogl_alpha=config.eval.ogl_alpha)

    def maps(self, frames: list[np.ndarray], audios: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Frames uint8 (H, W, 3) and (48000,) audio clips -> {kind: (N, 224, 224) float32}."""
        out: dict[str, list[np.ndarray]] = {kind: [] for kind in self.kinds}
        for start in range(0, len(frames), BATCH):
            pairs = [model_inputs(f, a, self.image_size)
                     for f, a in zip(frames[start:start + BATCH], audios[start:start + BATCH],
                                     strict=True)]
            n = len(pairs)
            images = np.zeros((BATCH, self.image_size, self.image_size, 3), np.float32)
            specs = np.zeros((BATCH, *spectrogram.SPEC_SHAPE, 1), np.float32)
            images[:n] = [p[0] for p in pairs]
            specs[:n] = [p[1] for p in pairs]
            result = self._step(self.variables, images, specs)
            for kind in self.kinds:
                out[kind].append(np.asarray(result[kind])[:n])
        return {kind: np.concatenate(v) for kind, v in out.items()}


def _load(checkpoint: Path, config: ml_collections.ConfigDict, mesh):
    try:
        return evaluate.load_for_eval(checkpoint, config, mesh)
    except ValueError as e:  # Orbax / checkpointing: arrays that do not fit the built model
        if "shape" not in str(e) and "another model" not in str(e):
            raise
        described = checkpointing.read_model_config(checkpoint)
        shape = ", ".join(f"{k} {described[k]}" for k in ("width", "embed_dim") if k in described)
        source = (checkpointing.MODEL_JSON if (checkpoint / checkpointing.MODEL_JSON).exists()
                  else checkpointing.CONFIG_JSON)
        detail = str(e).split(". ")[0]  # Orbax goes on with advice that does not apply here
        raise ValueError(f"checkpoint {checkpoint} is of another model shape than its {source} "
                         f"describes ({shape}): {detail}") from e


# --------------------------------------------------------------------------- inputs


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB, with clear errors."""
    path = Path(path)
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

    def __init__(self, path: str | Path, every: float, audio_source: str | Path | None = None):
        self.path = Path(path)
        self._audio_source = audio_source
        self._container = av.open(str(self.path), "w")
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


def _save_png(path: Path, image: np.ndarray) -> str:
    Image.fromarray(image).save(path)
    return path.name


# --------------------------------------------------------------------------- the command


def localize_image(localizer: Localizer, frame: np.ndarray, clip: np.ndarray,
                   out: Path) -> list[dict[str, Any]]:
    """One frame and its (48000,) audio clip -> overlay PNG and map .npy; the step's record."""
    maps = localizer.maps([frame], [clip])
    step: dict[str, Any] = {"t": None}
    for kind, m in maps.items():
        s = _suffix(kind)
        np.save(out / f"map{s}.npy", m[0])
        step[f"png{s}"] = _save_png(out / f"overlay{s}.png", overlay(frame, m[0]))
        step[f"peak_xy{s}"] = peak(m[0], *frame.shape[:2])
    return [step]


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def localize_video(localizer: Localizer, steps: Iterator[tuple[float, np.ndarray, np.ndarray]],
                   out: Path, *, every: float, audio_source: str | Path | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(t, frame, clip) steps -> step_NNNN PNGs and maps .npy; with 2+ steps an overlay MP4
    per map kind (with the audio of `audio_source`). Returns the step records and videos."""
    records: list[dict[str, Any]] = []
    maps: dict[str, list[np.ndarray]] = {kind: [] for kind in localizer.kinds}
    first: dict[str, np.ndarray] = {}
    writers: dict[str, OverlayVideoWriter] = {}
    try:
        for batch in _batches(steps, BATCH):
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
        np.save(out / f"maps{_suffix(kind)}.npy", np.stack(maps[kind]))
    return records, {kind: w.path.name for kind, w in writers.items()}


def main(*, checkpoint: str, video: str | None = None, image: str | None = None,
         audio: str | None = None, every: float = 1.0, ogl: bool = False, out: str,
         config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """`sslocal localize`: a video, or an image with an audio file -> heatmap overlays in OUT.

    Returns (and writes to OUT/localize.json) the inputs, the checkpoint, S and every step's
    time and peak. Bad inputs raise FileNotFoundError / ValueError before the model loads.
    """
    if video is not None and (image is not None or audio is not None):
        raise ValueError("give either --video or --image with --audio, not both")
    if video is None and (image is None or audio is None):
        raise ValueError("give --video, or --image together with --audio")
    if not (math.isfinite(every) and every > 0):
        raise ValueError(f"--every must be a positive number of seconds, got {every}")
    if video is not None:
        steps = video_io.iter_video_steps(video, every)
        # The first step is decoded now: a bad file fails before the model loads.
        steps = itertools.chain([next(steps)], steps)
        inputs: dict[str, Any] = {"video": str(video), "every": every}
    else:
        frame, clip = read_image(image), spectrogram.load_clip_audio(audio)
        inputs = {"image": str(image), "audio": str(audio)}
    localizer = Localizer(checkpoint, config, ogl=ogl)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if video is not None:
        records, videos = localize_video(localizer, steps, out_dir, every=every,
                                         audio_source=video)
    else:
        records, videos = localize_image(localizer, frame, clip, out_dir), {}
    summary = {**inputs, "checkpoint": localizer.description, "image_size": localizer.image_size,
               "maps": list(localizer.kinds), "steps": records, "videos": videos}
    (out_dir / "localize.json").write_text(json.dumps(summary, indent=2))
    print(f"sslocal localize: {len(records)} step(s) -> {out_dir}"
          + (f" ({', '.join(videos.values())})" if videos else ""))
    return summary
