"""A video file -> frames and the 3 s of audio around them (PyAV), for `sslocal localize`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from sslocal.data.spectrogram import clip_from_waveform, to_mono_16k
from sslocal.protocol import SAMPLE_RATE

logger = logging.getLogger(__name__)
_EPS = 1e-6  # seconds: a frame whose start time is within this of t is "at" t


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot open video file {path}: {e}") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: no video stream")
    if not container.streams.audio:
        container.close()
        raise ValueError(f"{path}: no audio stream")
    return container


def _decode_audio(container, path: Path) -> tuple[np.ndarray, int, float]:
    """All audio of the first audio stream -> ((channels, n) float32, rate, start seconds)."""
    stream = container.streams.audio[0]
    # Any sample format -> packed (interleaved) float, one plane: PyAV 18 lists a planar frame
    # of 8 or more channels with planes past its last one, and to_ndarray read them (a
    # segfault the fuzzer found, benchmarks/fuzz_inputs.py).
    resampler = av.AudioResampler(format="flt")
    chunks, start = [], None

    def channels_first(out) -> np.ndarray:
        return out.to_ndarray().reshape(-1, len(out.layout.channels)).T

    try:
        for frame in container.decode(stream):
            if start is None and frame.time is not None:
                start = frame.time
            for out in resampler.resample(frame):
                chunks.append(channels_first(out))
        for out in resampler.resample(None):
            chunks.append(channels_first(out))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode the audio of {path}: {e}") from e
    if not chunks:
        raise ValueError(f"{path}: the audio stream holds no samples")
    wave = np.concatenate(chunks, axis=1)
    if stream.duration is not None and stream.time_base is not None:
        # Codecs such as AAC pad the last frame; the stream's duration says where audio ends.
        wave = wave[:, : max(int(round(stream.duration * stream.time_base * stream.rate)), 1)]
    return wave, stream.rate, start or 0.0


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The first audio stream of any file FFmpeg decodes (m4a, mp3, a video, ...) ->
    ((channels, n) float32, sample rate)."""
    path = Path(path)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot open {path}: {e}") from e
    with container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        wave, sr, _ = _decode_audio(container, path)
    return wave, sr


def _video_duration(container) -> float | None:
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def _frames_at(container, times: list[float], path: Path) -> Iterator[tuple[float, np.ndarray]]:
    """For each t (ascending), the frame shown at t: the last one starting at or before t."""
    k, prev = 0, None
    try:
        for frame in container.decode(container.streams.video[0]):
            t_frame = frame.time if frame.time is not None else 0.0
            while k < len(times) and t_frame > times[k] + _EPS:
                yield times[k], _rgb(prev if prev is not None else frame)
                k += 1
            if k == len(times):
                return
            prev = frame
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode the video of {path}: {e}") from e
    if prev is None:
        raise ValueError(f"{path}: the video stream holds no frames")
    for t in times[k:]:
        yield t, _rgb(prev)


def read_video_clip(
    path: str | os.PathLike, at_seconds: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A video -> (frame uint8 (H, W, 3) RGB, audio (48000,) float32 at 16 kHz).

    Default: the frame at the middle of the video stream and the protocol's audio clip (3 s
    centred on the middle of the audio, protocol 1). With `at_seconds`: the frame shown at that
    time and 3 s of audio centred on it (kept inside the file).
    """
    path = Path(path)
    with _open(path) as container:
        wave, sr, audio_start = _decode_audio(container, path)
        duration = _video_duration(container)
        if at_seconds is not None and (at_seconds < 0 or (duration and at_seconds > duration)):
            raise ValueError(f"{path}: at_seconds={at_seconds} is outside the video "
                             f"(0 to {duration} s)")
        t = at_seconds if at_seconds is not None else (duration or 0.0) / 2
        container.seek(0)
        ((_, frame),) = list(_frames_at(container, [t], path))
    centre = None if at_seconds is None else at_seconds - audio_start
    return frame, clip_from_waveform(wave, sr, centre, name=str(path))


def iter_video_steps(
    path: str | os.PathLike, every: float = 1.0
) -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
    """Yields (t, frame uint8 (H, W, 3), audio (48000,) float32) for t = 0, every, 2 * every, ...

    up to the end of the video: the frame shown at t and 3 s of 16 kHz audio centred on t
    (kept inside the file; audio shorter than 3 s is tiled, as in docs/protocol.md section 1).
    """
    if every <= 0:
        raise ValueError(f"every must be positive, got {every}")
    path = Path(path)
    with _open(path) as container:
        wave, sr, audio_start = _decode_audio(container, path)
        mono = to_mono_16k(wave, sr, name=str(path))  # resampled once for all steps
        duration = _video_duration(container) or 0.0
        times = [k * every for k in range(int(np.floor(duration / every + _EPS)) + 1)]
        times = [t for t in times if t < duration] or [0.0]
        audio_end = audio_start + mono.shape[0] / SAMPLE_RATE
        late = [t for t in times if t > audio_end]
        if late:  # said, not hidden: those steps all hear the same last seconds
            logger.warning("%s: the audio ends at %.2f s, before %d of the %d steps (from "
                           "t = %.2f s); they use the audio's last 3 s", path, audio_end,
                           len(late), len(times), late[0])
        container.seek(0)
        for t, frame in _frames_at(container, times, path):
            yield t, frame, clip_from_waveform(mono, SAMPLE_RATE, t - audio_start, name=str(path))
