"""Localization maps (PROTOCOL.md section 5): upsample, min-max normalise, OGL fusion.

Upsampling is separable, so a resize is two small matrix products with interpolation matrices
built once per (input, output) size in numpy: exact PyTorch `F.interpolate` conventions, jit-able,
and cheap on device. Methods (`upsample=`):

- "bilinear_align_corners" (the protocol): `F.interpolate(mode="bilinear", align_corners=True)`.
- "bilinear": `F.interpolate(mode="bilinear", align_corners=False)` (half-pixel centres, as
  OpenCV's INTER_LINEAR when upsampling; the LVS code's cv2.resize).
- "bicubic": `F.interpolate(mode="bicubic", align_corners=False)`: PyTorch's convention (Keys
  cubic with a = -0.75, half-pixel centres, border taps clamped), not `jax.image.resize`'s
  (a = -0.5, weights renormalised at the border).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

UPSAMPLE_METHODS = ("bilinear_align_corners", "bilinear", "bicubic")
_HIGHEST = jax.lax.Precision.HIGHEST


def _bilinear_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(i)
    else:
        src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    w = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(w, (rows, i0), 1.0 - frac)
    np.add.at(w, (rows, i1), frac)
    return w


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(src).astype(int)
    t = src - i0

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    taps = [(i0 - 1, far(t + 1)), (i0, near(t)), (i0 + 1, near(1 - t)), (i0 + 2, far(2 - t))]
    w = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for idx, coef in taps:
        np.add.at(w, (rows, np.clip(idx, 0, n_in - 1)), coef)
    return w


@functools.lru_cache(maxsize=32)
def interpolation_matrix(n_in: int, n_out: int, upsample: str) -> np.ndarray:
    """(n_out, n_in) float32 matrix M with resize(x) = M @ x along one axis."""
    if upsample == "bilinear_align_corners":
        w = _bilinear_matrix(n_in, n_out, align_corners=True)
    elif upsample == "bilinear":
        w = _bilinear_matrix(n_in, n_out, align_corners=False)
    elif upsample == "bicubic":
        w = _bicubic_matrix(n_in, n_out)
    else:
        raise ValueError(f"unknown upsample method {upsample!r}; choose one of {UPSAMPLE_METHODS}")
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def upsample_maps(
    maps: jax.Array, size: int = 224, upsample: str = "bilinear_align_corners"
) -> jax.Array:
    """Resize (B, h, w) maps to (B, size, size) float32 with a PyTorch interpolation convention."""
    maps = jnp.asarray(maps).astype(jnp.float32)
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (B, h, w), got {maps.shape}")
    wy = interpolation_matrix(maps.shape[1], size, upsample)
    wx = interpolation_matrix(maps.shape[2], size, upsample)
    return jnp.einsum("yh,bhw,xw->byx", wy, maps, wx, precision=_HIGHEST)


def minmax_normalize(maps: jax.Array) -> jax.Array:
    """Per-sample (x - min) / (max - min) over all but the first axis; a constant map is kept."""
    maps = jnp.asarray(maps).astype(jnp.float32)
    axes = tuple(range(1, maps.ndim))
    lo = jnp.min(maps, axis=axes, keepdims=True)
    hi = jnp.max(maps, axis=axes, keepdims=True)
    spread = hi - lo
    # Safe denominator so that the unused branch of `where` is finite (no NaN in gradients).
    scaled = (maps - lo) / jnp.where(spread > 0, spread, 1.0)
    return jnp.where(spread > 0, scaled, maps)


def _upsample_normalize(maps: jax.Array, size: int, upsample: str) -> jax.Array:
    """minmax(upsample(maps)); a constant input map stays that constant.

    Upsampling a constant map in float32 leaves rounding noise of an ulp or so, which min-max
    would stretch to [0, 1]; the constancy is decided on the input map instead.
    """
    maps = jnp.asarray(maps).astype(jnp.float32)
    out = minmax_normalize(upsample_maps(maps, size, upsample))
    constant = jnp.min(maps, axis=(1, 2)) == jnp.max(maps, axis=(1, 2))
    return jnp.where(constant[:, None, None], maps[:, :1, :1], out)


def av_map(
    alpha_ii: jax.Array, size: int = 224, upsample: str = "bilinear_align_corners"
) -> jax.Array:
    """Audio-visual localization map: alpha_ii (B, h, w) -> upsampled, min-max (B, size, size)."""
    return _upsample_normalize(alpha_ii, size, upsample)


def object_map(
    features: jax.Array, size: int = 224, upsample: str = "bilinear_align_corners"
) -> jax.Array:
    """OGL object map: mean over channels of |features (B, h, w, C)|, upsampled, min-max."""
    features = jnp.asarray(features).astype(jnp.float32)
    if features.ndim != 4:
        raise ValueError(f"expected features of shape (B, h, w, C), got {features.shape}")
    return _upsample_normalize(jnp.mean(jnp.abs(features), axis=-1), size, upsample)


def fuse_ogl(av: jax.Array, obj: jax.Array, alpha: float = 0.4) -> jax.Array:
    """Object-guided localization: minmax(alpha * av + (1 - alpha) * obj), per sample."""
    av = jnp.asarray(av).astype(jnp.float32)
    obj = jnp.asarray(obj).astype(jnp.float32)
    if av.shape != obj.shape:
        raise ValueError(f"av and obj maps differ in shape: {av.shape} vs {obj.shape}")
    return minmax_normalize(alpha * av + (1.0 - alpha) * obj)
