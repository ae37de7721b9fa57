"""Video reading with PyAV on small files written by the test."""

import av
import librosa
import numpy as np
import pytest
import soundfile as sf

from sslocal.data.video import iter_video_steps, read_video_clip

H, W, FPS, N_FRAMES, SR = 48, 64, 4, 20, 44100  # a 5 s video


def _colour(i):
    return np.array([i * 12, 255 - i * 12, 100], np.uint8)


def _write(path, wave=None, acodec="aac"):
    """Frame i is a flat colour; audio (2, n) float at 44.1 kHz, AAC or 16-bit PCM."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt, v.options = W, H, "yuv444p", {"crf": "0"}
        a = None
        if wave is not None:
            a = c.add_stream(acodec, rate=SR)
            a.layout = "stereo"
        for i in range(N_FRAMES):
            img = np.broadcast_to(_colour(i), (H, W, 3)).copy()
            c.mux(v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(v.encode())
        if a is None:
            return path
        for k in range(0, wave.shape[1], 1024):
            chunk = np.ascontiguousarray(wave[:, k : k + 1024], np.float32)
            if acodec == "aac":
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            else:  # packed s16: (1, n * channels), interleaved
                ints = np.round(chunk * 32767).astype(np.int16).T.reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(ints, format="s16", layout="stereo")
            frame.sample_rate, frame.pts = SR, k
            c.mux(a.encode(frame))
        c.mux(a.encode())
    return path


def _reference_mono16k(wave):
    """Independent: resample (librosa.load's resampler), clip, mean over channels."""
    return np.clip(librosa.resample(wave, orig_sr=SR, target_sr=16000), -1, 1).mean(axis=0)


def _window(mono, centre_seconds):
    start = int(round(centre_seconds * 16000)) - 24000
    start = min(max(start, 0), len(mono) - 48000)
    return mono[start : start + 48000]


@pytest.fixture(scope="module")
def tone():
    t = np.arange(5 * SR) / SR
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t) * (0.2 + t / 6),
                     0.3 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)


@pytest.fixture(scope="module")
def noise():
    rng = np.random.default_rng(0)
    return np.clip(0.3 * rng.standard_normal((2, 5 * SR)), -0.9, 0.9).astype(np.float32)


def test_mp4_centre_frame_and_aac_audio(tmp_path, tone):
    frame, audio = read_video_clip(_write(tmp_path / "a.mp4", tone))
    assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
    assert np.abs(frame.astype(int) - _colour(10)).max() <= 3  # t = 2.5 s: frame 10
    mono = _reference_mono16k(tone)
    ref = mono[len(mono) // 2 - 24000 :][:48000]  # protocol 1: start = duration / 2 - 1.5 s
    assert audio.shape == (48000,) and audio.dtype == np.float32
    assert np.sqrt(np.mean((audio - ref) ** 2) / np.mean(ref**2)) < 0.05  # AAC tolerance


def test_lossless_audio_is_exact_and_centred(tmp_path, noise):
    path = _write(tmp_path / "a.mov", noise, acodec="pcm_s16le")
    mono = _reference_mono16k(np.round(noise * 32767) / 32768)
    frame, audio = read_video_clip(path)
    np.testing.assert_allclose(audio, _window(mono, 2.5), atol=1e-5)
    frame, audio = read_video_clip(path, at_seconds=2.0)
    assert np.abs(frame.astype(int) - _colour(8)).max() <= 3
    np.testing.assert_allclose(audio, mono[8000:56000], atol=1e-5)
    frame, audio = read_video_clip(path, at_seconds=0.6)  # window kept inside the file
    assert np.abs(frame.astype(int) - _colour(2)).max() <= 3
    np.testing.assert_allclose(audio, mono[:48000], atol=1e-5)


def test_iter_video_steps(tmp_path, noise):
    path = _write(tmp_path / "a.mov", noise, acodec="pcm_s16le")
    mono = _reference_mono16k(np.round(noise * 32767) / 32768)
    steps = list(iter_video_steps(path, every=1.0))
    assert [t for t, _, _ in steps] == [0.0, 1.0, 2.0, 3.0, 4.0]
    for t, frame, audio in steps:
        assert np.abs(frame.astype(int) - _colour(int(t * FPS))).max() <= 3
        np.testing.assert_allclose(audio, _window(mono, t), atol=1e-5)
    assert len(list(iter_video_steps(path, every=0.75))) == 7  # 0, 0.75, ..., 4.5
    with pytest.raises(ValueError):
        next(iter_video_steps(path, every=0))


def test_errors(tmp_path, tone):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video_clip(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="no audio stream"):
        read_video_clip(_write(tmp_path / "silent.mp4"))
    wav = tmp_path / "sound.wav"
    sf.write(wav, tone.T, SR)
    with pytest.raises(ValueError, match="no video stream"):
        read_video_clip(wav)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video\x00" * 10)
    with pytest.raises(ValueError, match="junk.mp4"):
        read_video_clip(junk)
    with pytest.raises(ValueError, match="outside"):
        read_video_clip(_write(tmp_path / "a.mp4", tone), at_seconds=9.0)


def _write_m4a(path, wave):
    """Audio alone, AAC in an MP4 container (what soundfile cannot read)."""
    with av.open(str(path), "w", format="mp4") as c:
        a = c.add_stream("aac", rate=SR)
        a.layout = "stereo"
        for k in range(0, wave.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(wave[:, k : k + 1024], np.float32), format="fltp",
                layout="stereo")
            frame.sample_rate, frame.pts = SR, k
            c.mux(a.encode(frame))
        c.mux(a.encode())
    return path


def test_m4a_audio_loads_through_ffmpeg(tmp_path, tone):
    """load_clip_audio: soundfile cannot read AAC; PyAV decodes it, so an .m4a is a clip."""
    from sslocal.data import spectrogram

    clip = spectrogram.load_clip_audio(_write_m4a(tmp_path / "tone.m4a", tone))
    want = _window(_reference_mono16k(tone), 2.5)
    assert clip.shape == (48000,)
    assert np.corrcoef(clip, want)[0, 1] > 0.99  # lossy AAC, the same tone
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk-not-audio")
    with pytest.raises(ValueError, match="garbage.wav: .*; FFmpeg: "):  # both reasons said
        spectrogram.load_clip_audio(garbage)


def test_audio_that_ends_early_is_reported(tmp_path, tone, caplog):
    path = _write(tmp_path / "short_audio.mov", tone[:, : SR], acodec="pcm_s16le")  # 1 of 5 s
    with caplog.at_level("WARNING"):
        steps = list(iter_video_steps(path, every=1.0))
    assert len(steps) == 5
    assert "the audio ends at 1.00 s, before 3 of the 5 steps (from t = 2.00 s)" in caplog.text
