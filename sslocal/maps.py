"""The map maths in one place (docs/protocol.md sections 3 and 5), with one precision policy.

The response map alpha (similarity of every image position with every audio), its diagonal
alpha_ii (each clip's localization map), upsampling, min-max normalisation and OGL fusion are
used by the losses, the evaluator and `sslocal localize` from here only. A model with several
projection heads (SLAVC) joins them with `join_heads`, so that its alpha_ii is the mean of the
heads' maps (`map_rule`, recorded in result files).

Precision (docs/protocol.md section 8): every matrix product here runs in float32 with
`Precision.HIGHEST`. On GPUs XLA would otherwise use TF32 (and TPUs one bf16 pass), which moves
alpha by ~1e-3: visible once the losses divide by beta = 0.03, and enough to move a pixel
across the evaluation's median threshold. The towers themselves run at the model's dtype.

Upsampling is separable, so a resize is two small matrix products with interpolation matrices
built once per (input, output) size in numpy: exact PyTorch `F.interpolate` conventions, jit-able,
and cheap on device. Methods (`upsample=`):

- "bilinear_align_corners" (the protocol): `F.interpolate(mode="bilinear", align_corners=True)`.
- "bilinear": `F.interpolate(mode="bilinear", align_corners=False)` (half-pixel centres, as
  OpenCV's INTER_LINEAR when upsampling; the LVS code's cv2.resize).
- "bicubic": `F.interpolate(mode="bicubic", align_corners=False)`: PyTorch's convention (Keys
  cubic with a = -0.75, half-pixel centres, border taps clamped), not `jax.image.resize`'s
  (a = -0.5, weights renormalised at the border).
- "bicubic_align_corners": `F.interpolate(mode="bicubic", align_corners=True)` (SLAVC's
  evaluation): the same cubic, source coordinate i * (n_in - 1) / (n_out - 1).

OGL fusion (`ogl_fusion=`): "minmax" (EZ-VSL, the protocol) fuses the min-max normalised AV and
object maps and min-max normalises the sum; "slavc" (stoneMo/SLAVC test.py) fuses fixed-range
scores, alpha * (alpha_ii + 1) / 2 + (1 - alpha) * obj / 2.5, and leaves the sum as it is.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sslocal.protocol import MAP_SIZE

UPSAMPLE_METHODS = ("bilinear_align_corners", "bilinear", "bicubic", "bicubic_align_corners")
OGL_FUSIONS = ("minmax", "slavc")
# SLAVC's fixed score ranges: the AV map (cosine) in [-1, 1], the object map in [0, 2.5].
SLAVC_AV_RANGE = (-1.0, 1.0)
SLAVC_OBJ_RANGE = (0.0, 2.5)
PRECISION = jax.lax.Precision.HIGHEST  # of every product below (module docstring)
_F32 = jnp.float32


def _batch_out_sharding(V: jax.Array):
    """P(<V's batch axis>) when V's batch axis is explicitly sharded, else None (let jax decide)."""
    spec = jax.typeof(V).sharding.spec
    if len(spec) and spec[0] is not None:
        return P(spec[0])
    return None


def similarity(V: jax.Array, A: jax.Array, out_sharding=None) -> jax.Array:
    """Response map alpha[i, j, h, w] = <V_i[h, w], A_j>: (B, h, w, D), (B, D) -> (B, B, h, w)
    float32.

    On a mesh with Explicit axes (the default of `jax.make_mesh` on JAX 0.10+) the B x B map of
    two batch-sharded operands needs an output sharding: `out_sharding`, or by default V's batch
    sharding (rows stay on the device holding V_i; A is gathered).
    """
    V = jnp.asarray(V).astype(_F32)
    A = jnp.asarray(A).astype(_F32)
    if V.ndim != 4 or A.ndim != 2 or V.shape[0] != A.shape[0] or V.shape[-1] != A.shape[-1]:
        raise ValueError(f"expected V (B, h, w, D) and A (B, D), got {V.shape} and {A.shape}")
    if out_sharding is None:
        out_sharding = _batch_out_sharding(V)
    return jnp.einsum("ihwd,jd->ijhw", V, A, precision=PRECISION, out_sharding=out_sharding)


def diagonal_map(V: jax.Array, A: jax.Array) -> jax.Array:
    """alpha_ii[h, w] = <V_i[h, w], A_i>: (B, h, w, D), (B, D) -> (B, h, w) float32, without
    forming (or gathering the diagonal of) the B x B map."""
    return jnp.einsum("ihwd,id->ihw", jnp.asarray(V).astype(_F32), jnp.asarray(A).astype(_F32),
                      precision=PRECISION)


def join_heads(heads) -> jax.Array:
    """K heads' unit vectors [(..., D)] * K -> (..., K * D) unit vectors whose inner products
    are the mean of the heads' inner products: concat(x_1..x_K) / sqrt(K), since
    <concat(v_k), concat(a_k)> / K = (1/K) sum_k <v_k, a_k>.

    SLAVC's map (stoneMo/SLAVC model.py: Savl = (Savl1 + Savl2) / 2) is therefore alpha_ii of
    the joined V and A, and every consumer of (V, A) (the maps, the losses, pooled embeddings)
    sees unit vectors as with one head."""
    heads = [jnp.asarray(h).astype(_F32) for h in heads]
    if not heads or len({h.shape for h in heads}) != 1:
        raise ValueError(f"expected one or more heads of one shape, got "
                         f"{[h.shape for h in heads]}")
    return jnp.concatenate(heads, axis=-1) * jnp.float32(1.0 / np.sqrt(len(heads)))


MAP_RULES = ("cosine", "mean_of_heads")


def map_rule(heads: int) -> str:
    """The name of the rule that makes alpha_ii of a model with `heads` projection heads
    (result files record it, metrics.protocol_variant): "cosine" (<V_i, A_i>; EZ-VSL, FNAC,
    marginNCE, LVS, SSL-TIE) or "mean_of_heads" (the mean of the heads' cosines; SLAVC). Both
    are diagonal_map of the model's joined unit vectors (join_heads)."""
    return MAP_RULES[0] if heads == 1 else MAP_RULES[1]


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


def _bicubic_matrix(n_in: int, n_out: int, align_corners: bool = False,
                    a: float = -0.75) -> np.ndarray:
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:  # PyTorch: scale (n_in - 1) / (n_out - 1), 0 for one output pixel
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(i)
    else:  # half-pixel centres, not clamped at 0 for cubic (PyTorch's cubic=True)
        src = (i + 0.5) * (n_in / n_out) - 0.5
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
        w = _bicubic_matrix(n_in, n_out, align_corners=False)
    elif upsample == "bicubic_align_corners":
        w = _bicubic_matrix(n_in, n_out, align_corners=True)
    else:
        raise ValueError(f"unknown upsample method {upsample!r}; choose one of {UPSAMPLE_METHODS}")
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def upsample_maps(
    maps: jax.Array, size: int = MAP_SIZE, upsample: str = "bilinear_align_corners"
) -> jax.Array:
    """Resize (B, h, w) maps to (B, size, size) float32 with a PyTorch interpolation convention."""
    maps = jnp.asarray(maps).astype(_F32)
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape (B, h, w), got {maps.shape}")
    wy = interpolation_matrix(maps.shape[1], size, upsample)
    wx = interpolation_matrix(maps.shape[2], size, upsample)
    return jnp.einsum("yh,bhw,xw->byx", wy, maps, wx, precision=PRECISION)


def minmax_normalize(maps: jax.Array) -> jax.Array:
    """Per-sample (x - min) / (max - min) over all but the first axis; a constant map is kept."""
    maps = jnp.asarray(maps).astype(_F32)
    axes = tuple(range(1, maps.ndim))
    lo = jnp.min(maps, axis=axes, keepdims=True)
    hi = jnp.max(maps, axis=axes, keepdims=True)
    spread = hi - lo
    # Safe denominator so that the unused branch of `where` is finite (no NaN in gradients).
    scaled = (maps - lo) / jnp.where(spread > 0, spread, 1.0)
    return jnp.where(spread > 0, scaled, maps)


def _normalize_upsampled(maps: jax.Array, upsampled: jax.Array) -> jax.Array:
    """minmax(upsampled); where the input map is constant, that constant.

    Upsampling a constant map in float32 leaves rounding noise of an ulp or so, which min-max
    would stretch to [0, 1]; the constancy is decided on the input map instead.
    """
    maps = jnp.asarray(maps).astype(_F32)
    constant = jnp.min(maps, axis=(1, 2)) == jnp.max(maps, axis=(1, 2))
    return jnp.where(constant[:, None, None], maps[:, :1, :1], minmax_normalize(upsampled))


def _upsample_normalize(maps: jax.Array, size: int, upsample: str) -> jax.Array:
    return _normalize_upsampled(maps, upsample_maps(maps, size, upsample))


def av_map(
    alpha_ii: jax.Array, size: int = MAP_SIZE, upsample: str = "bilinear_align_corners"
) -> jax.Array:
    """Audio-visual localization map: alpha_ii (B, h, w) -> upsampled, min-max (B, size, size)."""
    return _upsample_normalize(alpha_ii, size, upsample)


def _object_reduce(features: jax.Array) -> jax.Array:
    features = jnp.asarray(features).astype(jnp.float32)
    if features.ndim != 4:
        raise ValueError(f"expected features of shape (B, h, w, C), got {features.shape}")
    return jnp.mean(jnp.abs(features), axis=-1)


def object_scores(
    features: jax.Array, size: int = MAP_SIZE, upsample: str = "bilinear_align_corners"
) -> jax.Array:
    """OGL object scores before normalisation: mean over channels of |features (B, h, w, C)|,
    upsampled to (B, size, size)."""
    return upsample_maps(_object_reduce(features), size, upsample)


def object_map(
    features: jax.Array, size: int = MAP_SIZE, upsample: str = "bilinear_align_corners"
) -> jax.Array:
    """OGL object map: mean over channels of |features (B, h, w, C)|, upsampled, min-max."""
    reduced = _object_reduce(features)
    return _normalize_upsampled(reduced, upsample_maps(reduced, size, upsample))


def fuse_ogl(av: jax.Array, obj: jax.Array, alpha: float = 0.4) -> jax.Array:
    """Object-guided localization: minmax(alpha * av + (1 - alpha) * obj), per sample."""
    av = jnp.asarray(av).astype(jnp.float32)
    obj = jnp.asarray(obj).astype(jnp.float32)
    if av.shape != obj.shape:
        raise ValueError(f"av and obj maps differ in shape: {av.shape} vs {obj.shape}")
    return minmax_normalize(alpha * av + (1.0 - alpha) * obj)


def fuse_ogl_fixed_range(raw: jax.Array, obj_scores: jax.Array, alpha: float = 0.4
                         ) -> jax.Array:
    """SLAVC's fusion (stoneMo/SLAVC test.py): alpha * scores_av + (1 - alpha) * scores_obj
    with fixed-range scores instead of per-sample min-max, and no normalisation of the sum.

    raw: the upsampled alpha_ii (cosines); SLAVC's map is Savl = cosine / tau scaled from
    [-1 / tau, 1 / tau] to [0, 1], i.e. (raw + 1) / 2 whatever tau. obj_scores: the upsampled
    mean |features| (`object_scores`), scaled from [0, 2.5] to [0, 1].
    """
    raw = jnp.asarray(raw).astype(jnp.float32)
    obj_scores = jnp.asarray(obj_scores).astype(jnp.float32)
    if raw.shape != obj_scores.shape:
        raise ValueError(f"av and obj maps differ in shape: {raw.shape} vs {obj_scores.shape}")
    (av_lo, av_hi), (obj_lo, obj_hi) = SLAVC_AV_RANGE, SLAVC_OBJ_RANGE
    av = (raw - av_lo) / (av_hi - av_lo)
    obj = (obj_scores - obj_lo) / (obj_hi - obj_lo)
    return alpha * av + (1.0 - alpha) * obj


def localization_maps(V: jax.Array, A: jax.Array, *, size: int = MAP_SIZE,
                      upsample: str = "bilinear_align_corners",
                      object_features: jax.Array | None = None,
                      ogl_alpha: float = 0.4, ogl_fusion: str = "minmax"
                      ) -> dict[str, jax.Array]:
    """What evaluation scores, from the towers' outputs: {"raw": alpha_ii upsampled (the
    extended evaluation's confidence reads it), "av": av_map(alpha_ii)[, "ogl"]}, each
    (B, size, size) float32. "ogl": fuse_ogl(av, object_map(object_features)) with
    ogl_fusion "minmax", fuse_ogl_fixed_range(raw, object_scores(object_features)) with
    "slavc"."""
    if ogl_fusion not in OGL_FUSIONS:
        raise ValueError(f"unknown OGL fusion {ogl_fusion!r}; choose one of {OGL_FUSIONS}")
    alpha = diagonal_map(V, A)
    raw = upsample_maps(alpha, size, upsample)
    out = {"raw": raw, "av": _normalize_upsampled(alpha, raw)}
    if object_features is not None:
        if ogl_fusion == "slavc":
            out["ogl"] = fuse_ogl_fixed_range(
                raw, object_scores(object_features, size, upsample), ogl_alpha)
        else:
            out["ogl"] = fuse_ogl(out["av"], object_map(object_features, size, upsample),
                                  ogl_alpha)
    return out
