"""Audio loading and log spectrogram against an independent scipy/numpy pipeline (protocol 1)."""

import librosa
import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal
import soundfile as sf

from sslocal.data import spectrogram as sp


def _reference_clip(path):
    """protocol 1 written out independently: read, resample, clip, mean, centre or tile."""
    sr, data = scipy.io.wavfile.read(path)
    x = data.astype(np.float64) / 32768.0 if data.dtype == np.int16 else data.astype(np.float64)
    x = x.reshape(len(x), -1).T  # (channels, n)
    if sr != 16000:  # the reference loads with librosa.load(sr=16000): soxr_hq resampling
        x = librosa.resample(x.astype(np.float32), orig_sr=sr, target_sr=16000).astype(np.float64)
    x = np.clip(x, -1, 1).mean(axis=0)
    duration = len(x) / 16000
    if duration < 3.0:
        reps = int(np.ceil(3.0 / duration))
        return np.concatenate([x] * reps)[:48000]
    start = int(max(duration / 2 - 1.5, 0) * 16000)
    return x[start : start + 48000]


def _reference_log_spec(x):
    _, _, s = scipy.signal.spectrogram(np.asarray(x, np.float64), fs=16000, nperseg=512,
                                       noverlap=274)
    return np.log(s + 1e-7)


def _write(path, wave, sr, subtype="PCM_16"):
    sf.write(path, np.asarray(wave).T, sr, subtype=subtype)
    return path


def _noise_tone(n, sr, rng, channels=1):
    t = np.arange(n) / sr
    x = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * rng.standard_normal((channels, n))
    return np.clip(x, -0.99, 0.99).squeeze()


@pytest.mark.parametrize(
    "sr,seconds,channels",
    [(16000, 10.0, 1), (44100, 4.0, 1), (8000, 5.0, 1), (16000, 6.0, 2), (16000, 1.2, 1),
     (22050, 1.7, 2)],
)
def test_log_spectrogram_matches_scipy_reference(tmp_path, sr, seconds, channels):
    rng = np.random.default_rng(sr + channels)
    path = _write(tmp_path / "a.wav", _noise_tone(int(sr * seconds), sr, rng, channels), sr)
    wave = sp.load_clip_audio(path)
    assert wave.shape == (48000,) and wave.dtype == np.float32
    ref = _reference_clip(path)
    np.testing.assert_allclose(wave, ref, atol=1e-6)
    spec = sp.log_spectrogram(wave)
    assert spec.shape == (257, 200) and spec.dtype == np.float32
    assert np.max(np.abs(spec - _reference_log_spec(ref))) <= 1e-3


def test_resampled_tone_lands_in_its_bin(tmp_path):
    t = np.arange(44100 * 4) / 44100
    path = _write(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 1000 * t), 44100)
    spec = sp.log_spectrogram(sp.load_clip_audio(path))
    assert np.all(spec.argmax(axis=0) == 32)  # 1000 Hz / (16000 / 512) Hz per bin


def test_silent_clip_is_valid(tmp_path):
    path = _write(tmp_path / "silent.wav", np.zeros(16000 * 4), 16000)
    spec = sp.log_spectrogram(sp.load_clip_audio(path))
    np.testing.assert_array_equal(spec, np.full((257, 200), np.log(1e-7), np.float32))


def test_centring_takes_the_samples_from_one_second_on(tmp_path):
    ramp = (np.arange(5 * 16000) / 80000.0).astype(np.float32)  # exact in a float WAV
    path = _write(tmp_path / "ramp.wav", ramp, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(sp.load_clip_audio(path), ramp[16000:64000])
    # Odd length: start = int((n / 2 / 16000 - 1.5) * 16000) = (n - 1) / 2 - 24000.
    odd = (np.arange(60001) / 60001.0).astype(np.float32)
    np.testing.assert_array_equal(sp.clip_from_waveform(odd, 16000), odd[6000:54000])


def test_short_clip_is_tiled_whole(tmp_path):
    ramp = (np.arange(19200) / 19200.0).astype(np.float32)  # 1.2 s
    path = _write(tmp_path / "short.wav", ramp, 16000, subtype="FLOAT")
    expected = np.concatenate([ramp, ramp, ramp[:9600]])
    np.testing.assert_array_equal(sp.load_clip_audio(path), expected)


def test_clip_then_mean_over_channels(tmp_path):
    stereo = np.stack([np.full(48000, 1.5), np.full(48000, -0.5)]).astype(np.float32)
    path = _write(tmp_path / "loud.wav", stereo, 16000, subtype="FLOAT")
    np.testing.assert_allclose(sp.load_clip_audio(path), 0.25)  # (1 - 0.5) / 2, not 0.5


def test_centre_seconds_and_clamping():
    ramp = (np.arange(5 * 16000) / 80000.0).astype(np.float32)
    np.testing.assert_array_equal(sp.clip_from_waveform(ramp, 16000, 2.0), ramp[8000:56000])
    np.testing.assert_array_equal(sp.clip_from_waveform(ramp, 16000, 4.9), ramp[-48000:])
    np.testing.assert_array_equal(sp.clip_from_waveform(ramp, 16000, 0.2), ramp[:48000])
    # (channels, n) input at another rate: resampled, then channels averaged.
    t = np.arange(8 * 32000) / 32000
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 300 * t), 0.3 * np.sin(2 * np.pi * 700 * t)])
    out = sp.clip_from_waveform(stereo.astype(np.float32), 32000)
    ref = librosa.resample(stereo.astype(np.float32), orig_sr=32000, target_sr=16000).mean(0)
    assert len(ref) == 128000
    np.testing.assert_allclose(out, ref[40000:88000], atol=1e-6)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        sp.load_clip_audio(tmp_path / "missing.wav")
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk-not-audio")
    with pytest.raises(ValueError, match="corrupt.wav"):
        sp.load_clip_audio(bad)
    tiny = _write(tmp_path / "tiny.wav", np.full(800, 0.1), 16000)  # 0.05 s: bad, not tiled
    with pytest.raises(ValueError, match="shorter than 0.1"):
        sp.load_clip_audio(tiny)
    nan = np.full(16000, 0.1, np.float32)
    nan[100] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        sp.load_clip_audio(_write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT"))
    with pytest.raises(ValueError, match="non-finite"):
        sp.clip_from_waveform(np.array([np.inf] * 16000), 16000)
    with pytest.raises(ValueError, match="shape"):
        sp.log_spectrogram(np.zeros(47999, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        sp.log_spectrogram(np.full(48000, np.nan, np.float32))
