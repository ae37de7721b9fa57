"""Procedural audio-visual scenes with known boxes (numpy only), for the CPU demo and tests.

Each category has a look (colour, shape, texture) and a sound (pitch, timbre, modulation).
A scene shows 1-3 objects of distinct categories on a cluttered, textured background; exactly
one of them sounds and its box is the ground truth. Every box covers 25-45% of the frame
(distractors too, so size is no shortcut: the protocol predicts the top half of the map's
pixels, and a box under 25% caps cIoU below 0.5 even for a perfect map).

`make_scene(config, index)` is a pure function of (config, index). Categories depend only on
`num_categories` and `category_seed`, so train and test splits built with different `seed`s
share them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np

from sslocal.protocol import CLIP_SAMPLES, SAMPLE_RATE

MAX_CATEGORIES = 32

# Saturated hues, ordered so that the first few are far apart.
_HUES = np.array([0, 180, 90, 270, 45, 225, 135, 315]) / 360.0
_SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "cross", "hexagon")
_TEXTURES = ("solid", "stripes", "checker", "dots")
_TIMBRES = ("tonal", "pulsed", "noise_band", "sweep")


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """What a synthetic dataset looks like; `seed` picks the scenes, `category_seed` the classes.

    offscreen_prob: share of clips whose sound comes from a category not in view (sounding=False,
      no box; noisy correspondence for training).
    repeat_prob: share of clips whose sounding category is drawn from a small frequent subset
      (the first max(1, num_categories // 4)), which makes same-category pairs, i.e. false
      negatives, more common in a batch; `category_probs` gives the resulting distribution.
    """

    num_categories: int = 16
    image_size: int = 112
    min_objects: int = 1
    max_objects: int = 3
    min_area: float = 0.25
    max_area: float = 0.45
    offscreen_prob: float = 0.0
    repeat_prob: float = 0.0
    snr_db: tuple[float, float] = (10.0, 25.0)  # sound vs. background noise
    # Share of any object's box that objects drawn above it may cover. The same for every
    # object, and the sounding one is picked after the layout: depth and visibility say nothing
    # about which object sounds.
    max_occlusion: float = 0.4
    category_seed: int = 0
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.num_categories <= MAX_CATEGORIES:
            raise ValueError(f"num_categories must be in [2, {MAX_CATEGORIES}], "
                             f"got {self.num_categories}")
        if not 1 <= self.min_objects <= self.max_objects <= min(3, self.num_categories - 1):
            raise ValueError("need 1 <= min_objects <= max_objects <= min(3, num_categories - 1)"
                             f", got {self.min_objects}, {self.max_objects}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 0 < self.min_area < self.max_area <= 0.6:
            raise ValueError(f"need 0 < min_area < max_area <= 0.6, got "
                             f"{self.min_area}, {self.max_area}")
        for name in ("offscreen_prob", "repeat_prob", "max_occlusion"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


PRESETS = {
    # Unit tests: a handful of categories, 64 px.
    "tiny": SceneConfig(num_categories=4, image_size=64, max_objects=2),
    # The margin study's clean scenes (and the demo's before it took "demo"): 112 px frames
    # (a 7 x 7 map from the demo config's stride-16 image tower).
    "small": SceneConfig(num_categories=16, image_size=112),
    # The Quick start (configs/synthetic.py): "small"'s scenes, twice as many for training
    # (builders/synthetic_av.SPLIT_SIZES); its first 4,096 training scenes and its test split
    # are "small"'s own.
    "demo": SceneConfig(num_categories=16, image_size=112),
    # The margin study (sslocal study margin): "small" with noisy correspondence in training.
    # offscreen_prob 0.2: a fifth of the training clips sound from a category not in view (faulty
    # positives). repeat_prob 0.5: half of the clips take their sound from the 4 frequent
    # categories, so a batch of 64 holds about 10 clips of each of them (faulty negatives: the
    # pairs the negative margin is meant to forgive). The test split is clean (every test scene
    # shows its sounding object; builders/synthetic_av.scene_config). Its boxes are those of
    # "small"'s test split (the layout does not depend on the categories), so the references
    # score the same: centre prior 31.25 cIoU@0.5 / 45.15 AUC, oracle 99.80 / 67.15 (x 100,
    # baselines.evaluate_baselines, median_ge).
    "noisy": SceneConfig(num_categories=16, image_size=112, offscreen_prob=0.2, repeat_prob=0.5),
    # The paper's frame size, for the input-pipeline benchmark.
    "full": SceneConfig(num_categories=24, image_size=224),
}


# ----------------------------------------------------------------------------- categories


@dataclasses.dataclass(frozen=True)
class Category:
    colour: tuple[float, float, float]  # RGB in [0, 1]
    shape: str
    texture: str
    timbre: str
    f0: float  # Hz


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    rgb = v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    return tuple(float(c) for c in rgb)


@functools.lru_cache(maxsize=64)
def categories(num_categories: int, category_seed: int = 0) -> tuple[Category, ...]:
    """The look and sound of every category; the pairing of looks and sounds is shuffled by
    `category_seed`. Looks differ in colour first; sounds in timbre and pitch (4 timbres x
    ceil(K / 4) pitches spread over 150-2400 Hz, >= 0.8 octave apart)."""
    k = num_categories
    n_pitch = -(-k // len(_TIMBRES))
    pitches = 150.0 * 16.0 ** (np.arange(n_pitch) / max(n_pitch - 1, 1))
    sounds = [(_TIMBRES[j % 4], float(pitches[j // 4])) for j in range(k)]
    order = np.random.default_rng([category_seed, k]).permutation(k)
    out = []
    for c in range(k):
        hue = _HUES[c % 8]
        value = 1.0 if (c // 8) % 2 == 0 else 0.7  # a second, darker round of hues
        timbre, f0 = sounds[order[c]]
        out.append(Category(
            colour=_hsv_to_rgb(hue, 0.85, value),
            shape=_SHAPES[(c + c // 8) % len(_SHAPES)],
            texture=_TEXTURES[(c // 8 + c // 2) % len(_TEXTURES)],
            timbre=timbre,
            f0=f0,
        ))
    return tuple(out)


def category_probs(config: SceneConfig) -> np.ndarray:
    """(K,) probability of each sounding category (uniform, plus the `repeat_prob` subset)."""
    k = config.num_categories
    frequent = max(1, k // 4)
    probs = np.full(k, (1 - config.repeat_prob) / k)
    probs[:frequent] += config.repeat_prob / frequent
    return probs


# ----------------------------------------------------------------------------- sound


def _t() -> np.ndarray:
    return np.arange(CLIP_SAMPLES) / SAMPLE_RATE


_T = _t()


def _harmonics(theta: np.ndarray, amps: list[float]) -> np.ndarray:
    """sum_k amps[k-1] * sin(k * theta) by the Chebyshev recurrence (one sin, one cos)."""
    two_cos = 2 * np.cos(theta)
    prev, cur = np.zeros_like(theta), np.sin(theta)
    out = amps[0] * cur
    for a in amps[1:]:
        prev, cur = cur, two_cos * cur - prev
        if a:
            out += a * cur
    return out


def _band_noise(rng: np.random.Generator, centre: float, octaves: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(CLIP_SAMPLES))
    freqs = np.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE)
    dist = np.log2(np.maximum(freqs, 1.0) / centre) / (octaves / 2)
    return np.fft.irfft(spec * np.exp(-0.5 * dist**2), CLIP_SAMPLES)


def _n_harmonics(f0: float, limit: float = 7000.0) -> int:
    return max(1, int(limit // f0))


def category_sound(category: Category, rng: np.random.Generator) -> np.ndarray:
    """One clip of a category's sound, unit peak, with per-clip pitch, rate and phase jitter."""
    t = _T
    f0 = category.f0 * np.exp(rng.uniform(-0.03, 0.03))
    rate = rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2 * np.pi)
    if category.timbre == "tonal":  # steady harmonic stack 1/k, slight vibrato
        theta = 2 * np.pi * f0 * t + 0.01 * f0 / (5 * rate) * np.sin(2 * np.pi * 5 * rate * t)
        n = min(8, _n_harmonics(f0))
        wave = _harmonics(theta + phase, [1.0 / k for k in range(1, n + 1)])
    elif category.timbre == "pulsed":  # odd harmonics, gated 4 times a second
        n = min(7, _n_harmonics(f0))
        amps = [1.0 / k if k % 2 else 0.0 for k in range(1, n + 1)]
        wave = _harmonics(2 * np.pi * f0 * t + phase, amps)
        gate = np.sin(2 * np.pi * 4 * rate * t + rng.uniform(0, 2 * np.pi))
        wave *= 0.5 * (1 + np.tanh(6 * gate))
    elif category.timbre == "noise_band":  # half-octave noise band, slow tremolo
        wave = _band_noise(rng, 1.5 * f0, 0.5)
        wave *= 1 + 0.6 * np.sin(2 * np.pi * 1.5 * rate * t + phase)
    else:  # "sweep": rising half-octave glides, twice a second, plus the octave
        saw = (2 * rate * t + rng.uniform()) % 1.0
        freq = f0 * 2.0 ** (0.6 * saw)
        theta = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
        wave = _harmonics(theta + phase, [1.0, 0.4 if 2 * f0 * 1.6 < 7800 else 0.0])
    return wave / (np.max(np.abs(wave)) + 1e-9)


def _background_noise(rng: np.random.Generator) -> np.ndarray:
    """Pink-ish noise (power ~ 1 / f), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(CLIP_SAMPLES))
    freqs = np.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE)
    noise = np.fft.irfft(spec / np.sqrt(np.maximum(freqs, 20.0)), CLIP_SAMPLES)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def render_audio(category: Category, rng: np.random.Generator,
                 snr_db: tuple[float, float] = (10.0, 25.0)) -> np.ndarray:
    """(48000,) float32 in [-1, 1]: the category's sound plus background noise, random level."""
    sound = category_sound(category, rng)
    rms = np.sqrt(np.mean(sound**2))
    noise = _background_noise(rng) * rms * 10 ** (-rng.uniform(*snr_db) / 20)
    wave = sound + noise
    wave *= rng.uniform(0.3, 0.9) / (np.max(np.abs(wave)) + 1e-9)
    return np.clip(wave, -1, 1).astype(np.float32)


# ----------------------------------------------------------------------------- image


@functools.lru_cache(maxsize=16)
def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) linear interpolation weights from a coarse grid to `size` pixels."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.minimum(pos.astype(int), grid - 2)
    frac = pos - lo
    m = np.zeros((size, grid))
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted smooth colour field + a faint grating + pixel noise + small clutter; (S, S, 3)."""
    grid = 5
    base = rng.uniform(0.3, 0.65)
    cells = base + rng.normal(0, 0.1, (grid, grid, 1)) + rng.normal(0, 0.05, (grid, grid, 3))
    up = _upsample_matrix(size, grid)
    img = np.matmul(up, np.matmul(up, cells).transpose(1, 0, 2)).transpose(1, 0, 2)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, np.pi)
    grating = np.sin(2 * np.pi * rng.uniform(6, 14) * (xx * np.cos(angle) + yy * np.sin(angle)))
    img += 0.04 * grating[..., None]
    for _ in range(rng.integers(4, 11)):  # clutter: small, greyish blobs and bars
        w, h = (rng.uniform(0.05, 0.14, 2) * size).astype(int) + 2
        x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
        grey = rng.uniform(0.15, 0.85)
        colour = grey + rng.normal(0, 0.06, 3)
        patch = img[y0 : y0 + h, x0 : x0 + w]
        if rng.uniform() < 0.5:
            patch[...] = colour
        else:
            v, u = np.ogrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
            patch[u**2 + v**2 <= 1] = colour
    img += rng.normal(0, 0.025, img.shape)
    return img


def _shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    v = ((np.arange(h) + 0.5) / h * 2 - 1)[:, None]
    u = ((np.arange(w) + 0.5) / w * 2 - 1)[None, :]
    if shape == "ellipse":
        return u**2 + v**2 <= 1
    if shape == "rectangle":
        return np.ones((h, w), bool)
    if shape == "triangle":  # apex up
        return np.abs(u) <= (v + 1) / 2 + 1.0 / w
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "cross":
        return (np.abs(u) <= 0.4) | (np.abs(v) <= 0.4)
    return np.abs(u) + 0.5 * np.abs(v) <= 1  # hexagon


def _texture(texture: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) brightness pattern in [0, 1], scaled to the object so it survives small frames."""
    v = np.linspace(0, 1, h)[:, None]
    u = np.linspace(0, 1, w)[None, :]
    periods = rng.uniform(3, 4)
    if texture == "solid":
        return np.ones((h, w))
    if texture == "stripes":
        return (np.sin(2 * np.pi * periods * (u + v) / 1.4) > 0).astype(float)
    if texture == "checker":
        return ((np.floor(periods * u) + np.floor(periods * v)) % 2).astype(float)
    # dots
    du, dv = (periods * u) % 1 - 0.5, (periods * v) % 1 - 0.5
    return (du**2 + dv**2 > 0.09).astype(float)


def _draw(img: np.ndarray, box: np.ndarray, category: Category, rng: np.random.Generator):
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = y1 - y0, x1 - x0
    mask = _shape_mask(category.shape, h, w)
    pattern = _texture(category.texture, h, w, rng)
    colour = np.array(category.colour) * rng.uniform(0.85, 1.1)
    pixels = colour * (0.5 + 0.5 * pattern)[..., None]
    region = img[y0:y1, x0:x1]
    region[mask] = pixels[mask]


# ----------------------------------------------------------------------------- layout


def _box_size(rng: np.random.Generator, config: SceneConfig) -> tuple[int, int]:
    """Integer (w, h) whose area fraction lies in [min_area, max_area], aspect 3:4 to 4:3."""
    s = config.image_size
    for _ in range(1000):
        area = rng.uniform(config.min_area, config.max_area)
        aspect = np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))
        w = min(s, round(np.sqrt(area * aspect) * s))
        h = min(s, round(np.sqrt(area / aspect) * s))
        if config.min_area <= w * h / s**2 <= config.max_area:
            return w, h
    raise ValueError(f"no integer box size of {s} px fits areas [{config.min_area}, "
                     f"{config.max_area}]")


def _occlusion(boxes: np.ndarray) -> np.ndarray:
    """boxes (T, K, 4) in drawing order -> (T, K) share of each box covered by later boxes."""
    _, k, _ = boxes.shape
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])

    def inter(idx):
        sel = boxes[:, idx]
        w = sel[..., 2].min(1) - sel[..., 0].max(1)
        h = sel[..., 3].min(1) - sel[..., 1].max(1)
        return np.maximum(w, 0) * np.maximum(h, 0)

    covered = np.zeros(area.shape)
    for i in range(k):
        above = list(range(i + 1, k))
        for j in above:
            covered[:, i] += inter([i, j])
        for a in range(len(above)):  # inclusion-exclusion, at most 3 boxes in all
            for b in range(a + 1, len(above)):
                covered[:, i] -= inter([i, above[a], above[b]])
    return covered / area


def _layout(rng: np.random.Generator, config: SceneConfig, n: int) -> np.ndarray | None:
    """(n, 4) int boxes in drawing order, none covered beyond `max_occlusion`; None if the
    search fails (crowded frames of large boxes)."""
    s, tries = config.image_size, 128
    for _ in range(20):
        sizes = np.array([_box_size(rng, config) for _ in range(n)])  # (n, 2) = (w, h)
        slack = s - sizes  # (n, 2)
        # Half the proposals uniform, half near distinct corners (crowded frames need those).
        pos = (rng.uniform(size=(tries, n, 2)) * (slack + 1)).astype(int)
        corners = np.argsort(rng.uniform(size=(tries, 4)), axis=1)[:, :n]
        far = np.stack([corners % 2, corners // 2], axis=-1).astype(bool)  # right, bottom
        jitter = (rng.uniform(size=(tries, n, 2)) * np.minimum(0.15 * s, slack)).astype(int)
        pos[tries // 2 :] = np.where(far, slack - jitter, jitter)[tries // 2 :]
        boxes = np.concatenate([pos, pos + sizes], axis=-1)  # (tries, n, 4)
        order = np.argsort(rng.uniform(size=(tries, n)), axis=1)  # random depth
        boxes = np.take_along_axis(boxes, order[..., None], axis=1)
        ok = np.all(_occlusion(boxes) <= config.max_occlusion, axis=1)
        if ok.any():
            return boxes[np.argmax(ok)]
    return None


# ----------------------------------------------------------------------------- scenes


def make_scene(config: SceneConfig, index: int) -> dict:
    """Scene `index` of the dataset `config`: a pure function of (config, index).

    Returns frame uint8 (S, S, 3); audio float32 (48000,) at 16 kHz in [-1, 1]; boxes float32
    (N, 4) [xmin, ymin, xmax, ymax] in frame pixels, end exclusive (N = 1 when sounding, 0 for an
    off-screen sound); category int (the sound's category); sounding bool; object_boxes
    float32 (K, 4) and object_categories int64 (K,) for every object in view, in drawing order.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, index])
    cats = categories(config.num_categories, config.category_seed)
    k = config.num_categories
    sound_cat = int(rng.choice(k, p=category_probs(config)))
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    sounding = bool(rng.uniform() >= config.offscreen_prob)
    boxes = None
    while boxes is None:  # n = 1 always fits; a crowded frame loses a distractor
        boxes = _layout(rng, config, n)
        n -= boxes is None
    n = len(boxes)
    in_view = rng.permutation(np.delete(np.arange(k), sound_cat))[:n]
    sounding_idx = int(rng.integers(n)) if sounding else None
    if sounding:
        in_view[sounding_idx] = sound_cat
    img = _background(rng, config.image_size)
    for box, c in zip(boxes, in_view, strict=True):
        _draw(img, box, cats[c], rng)
    frame = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    audio = render_audio(cats[sound_cat], rng, config.snr_db)
    gt = boxes[[sounding_idx]] if sounding else np.zeros((0, 4))
    return {
        "frame": frame,
        "audio": audio,
        "boxes": gt.astype(np.float32),
        "category": sound_cat,
        "sounding": sounding,
        "object_boxes": boxes.astype(np.float32),
        "object_categories": np.asarray(in_view, np.int64),
    }


# ----------------------------------------------------------------------------- files


def write_wav(path: str | os.PathLike, audio: np.ndarray, sr: int = SAMPLE_RATE) -> Path:
    """Mono float audio in [-1, 1] -> 16-bit PCM WAV."""
    import soundfile as sf  # a librosa dependency; imported here to keep this module light

    audio = np.asarray(audio)
    if audio.ndim != 1 or not np.all(np.isfinite(audio)):
        raise ValueError(f"expected finite mono audio (n,), got shape {audio.shape}")
    path = Path(path)
    sf.write(path, np.clip(audio, -1, 1), sr, subtype="PCM_16")
    return path


def write_scene(root: str | os.PathLike, clip_id: str, scene: dict) -> tuple[Path, Path]:
    """Writes ROOT/frames/<id>.jpg and ROOT/audio/<id>.wav, the layout users' data has."""
    from PIL import Image

    root = Path(root)
    (root / "frames").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    frame_path = root / "frames" / f"{clip_id}.jpg"
    Image.fromarray(scene["frame"]).save(frame_path, quality=95, subsampling=0)
    return frame_path, write_wav(root / "audio" / f"{clip_id}.wav", scene["audio"])


def write_scenes(root: str | os.PathLike, config: SceneConfig, indices, prefix: str = "syn"
                 ) -> list[str]:
    """Writes scenes `indices` under ROOT (frames, audio) plus ROOT/annotations.json in the
    vggss.json format (boxes normalised to [0, 1], so `annotations.load_vggss` reads them).
    Returns the clip ids, `<prefix>_<index, 6 digits>`."""
    root = Path(root)
    ids, entries = [], []
    s = config.image_size
    for i in indices:
        scene = make_scene(config, int(i))
        clip_id = f"{prefix}_{int(i):06d}"
        write_scene(root, clip_id, scene)
        ids.append(clip_id)
        entries.append({
            "file": clip_id,
            "class": f"category_{scene['category']:02d}",
            "bbox": (scene["boxes"] / s).tolist(),
            "sounding": scene["sounding"],
        })
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotations.json").write_text(json.dumps(entries))
    return ids
