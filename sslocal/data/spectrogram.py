"""Audio loading and the reference log spectrogram (docs/protocol.md section 1)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import librosa
import numpy as np
import scipy.signal

from sslocal.protocol import (
    CLIP_SAMPLES,
    MIN_AUDIO_SECONDS,
    SAMPLE_RATE,
    SPEC_LOG_EPS,
    SPEC_NOVERLAP,
    SPEC_NPERSEG,
)


def to_mono_16k(wave: np.ndarray, sr: int, *, name: str = "waveform") -> np.ndarray:
    """(n,) or (channels, n) audio at `sr` -> (m,) float32 mono at 16 kHz, checked.

    Resampled with librosa's default resampler (the one `librosa.load` uses), clipped to
    [-1, 1], then averaged over channels (docs/protocol.md section 1).
    """
    wave = np.asarray(wave)
    if wave.ndim not in (1, 2):
        raise ValueError(f"{name}: expected audio of shape (n,) or (channels, n), got {wave.shape}")
    if not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"{name}: expected floating-point samples, got {wave.dtype}")
    if sr <= 0:
        raise ValueError(f"{name}: invalid sample rate {sr}")
    if not np.all(np.isfinite(wave)):
        raise ValueError(f"{name}: audio holds non-finite samples (NaN or inf)")
    seconds = wave.shape[-1] / sr
    if seconds < MIN_AUDIO_SECONDS:
        raise ValueError(f"{name}: audio is {seconds:.3f} s long, shorter than "
                         f"{MIN_AUDIO_SECONDS} s")
    if sr != SAMPLE_RATE:
        wave = librosa.resample(wave.astype(np.float32), orig_sr=sr, target_sr=SAMPLE_RATE)
    wave = np.clip(wave, -1.0, 1.0)
    if wave.ndim == 2:
        wave = wave.mean(axis=0)
    return wave.astype(np.float32)


def clip_from_waveform(
    wave: np.ndarray,
    sr: int,
    centre_seconds: float | None = None,
    *,
    name: str = "waveform",
) -> np.ndarray:
    """In-memory audio -> the (48000,) float32 mono 16 kHz clip of docs/protocol.md section 1.

    `wave` is (n,) or (channels, n) at `sr` Hz (see `to_mono_16k`). 3 s are cut centred on the
    middle of the file (`centre_seconds=None`, the protocol: start = max(duration / 2 - 1.5, 0))
    or on `centre_seconds` (from the first sample), the window then kept inside the file.
    Audio shorter than 3 s is tiled whole, then cut to 48,000 samples.
    """
    wave = to_mono_16k(wave, sr, name=name)
    n = wave.shape[0]
    if n < CLIP_SAMPLES:
        return np.tile(wave, -(-CLIP_SAMPLES // n))[:CLIP_SAMPLES]
    if centre_seconds is None:
        # Integer form of int((n / sr / 2 - 1.5) * sr): no float rounding at the boundary.
        start = n // 2 - CLIP_SAMPLES // 2
    else:
        start = int(round(centre_seconds * SAMPLE_RATE)) - CLIP_SAMPLES // 2
    start = min(max(start, 0), n - CLIP_SAMPLES)
    return wave[start : start + CLIP_SAMPLES]


def load_clip_audio(path: str | os.PathLike) -> np.ndarray:
    """An audio file -> (48000,) float32: 3 s, mono, 16 kHz, centred (docs/protocol.md 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        with warnings.catch_warnings():
            # librosa warns before falling back to audioread; the error below says it all.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            wave, sr = librosa.load(path, sr=None, mono=False)
    except Exception as e:  # soundfile / audioread raise many types for a bad file
        # PyAV (FFmpeg) decodes what soundfile cannot and audioread may lack a backend for
        # (m4a, ...); only when both fail is the file unreadable, with both reasons.
        from sslocal.data import video

        try:
            wave, sr = video.read_audio(path)
        except ValueError as av_error:
            raise ValueError(f"cannot read audio file {path}: {type(e).__name__} {e}; "
                             f"FFmpeg: {av_error}") from e
    return clip_from_waveform(wave, sr, name=str(path))


def log_spectrogram(wave: np.ndarray) -> np.ndarray:
    """(48000,) waveform -> (257, 200) float32 log(S + 1e-7), S = scipy's spectrogram.

    The model input is this divided by protocol.SPEC_SCALE.
    """
    wave = np.asarray(wave)
    if wave.shape != (CLIP_SAMPLES,):
        raise ValueError(f"expected a ({CLIP_SAMPLES},) waveform, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)):
        raise ValueError("waveform holds non-finite samples (NaN or inf)")
    # float64 so that the float32 result is the reference to rounding.
    _, _, spec = scipy.signal.spectrogram(
        wave.astype(np.float64), fs=SAMPLE_RATE, nperseg=SPEC_NPERSEG, noverlap=SPEC_NOVERLAP
    )
    return np.log(spec + SPEC_LOG_EPS).astype(np.float32)
