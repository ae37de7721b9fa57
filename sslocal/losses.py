"""Contrastive localization losses (docs/protocol.md section 3): marginnce, lvs, ezvsl.

Every loss is a pure function of V (B, h, w, D) and A (B, D), unit vectors over D, computed in
float32 whatever their dtype, on `maps.similarity` (full float32 products: TF32 / bf16 passes
would perturb alpha by ~1e-3, a visible shift once divided by beta = 0.03 inside the sigmoid).
B is the global batch: under jit on a mesh every row sees every negative. `out_sharding` is
passed on to `maps.similarity` (meshes with Explicit axes need it).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sslocal.maps import diagonal_map, similarity

_F32 = jnp.float32
_TINY = float(jnp.finfo(jnp.float32).tiny)


def _masked_mean(alpha: jax.Array, log_mask: jax.Array) -> jax.Array:
    """sum_hw(m * alpha) / sum_hw(m) for a soft mask given as log m.

    The ratio does not change when m is rescaled, so m is divided by its maximum over hw first
    (a constant for autodiff, which keeps the gradient exact): sum(m) >= 1, where the raw sum
    underflows to 0 (0 / 0) once every sigmoid is below float32's range. The maximum() guard
    only documents that the denominator cannot vanish.
    """
    shift = jax.lax.stop_gradient(jnp.max(log_mask, axis=(-2, -1), keepdims=True))
    m = jnp.exp(log_mask - shift)
    num = jnp.sum(m * alpha, axis=(-2, -1))
    den = jnp.sum(m, axis=(-2, -1))
    return num / jnp.maximum(den, _TINY)


def _log_foreground(alpha: jax.Array, epsilon: float, beta: float) -> jax.Array:
    """log sigmoid((alpha - epsilon) / beta)."""
    return jax.nn.log_sigmoid((alpha - epsilon) / beta)


def _log_background(alpha: jax.Array, epsilon: float, beta: float) -> jax.Array:
    """log(1 - sigmoid((alpha - epsilon) / beta)) = log sigmoid((epsilon - alpha) / beta)."""
    return jax.nn.log_sigmoid((epsilon - alpha) / beta)


def _diag_cross_entropy(logits: jax.Array, axis: int = 1) -> jax.Array:
    """Mean cross-entropy with target i for row i (axis=1) or column i (axis=0).

    The target is picked with an identity mask rather than a gather: elementwise, so it works on
    a batch-sharded (B@data, B) array on an Explicit mesh.
    """
    n_rows, n_cols = logits.shape
    target = jnp.eye(n_rows, n_cols, dtype=_F32)
    logp = jax.nn.log_softmax(logits, axis=axis)
    return -jnp.mean(jnp.sum(target * logp, axis=axis))


def marginnce(
    V: jax.Array,
    A: jax.Array,
    *,
    margin: float = -0.2,
    tau: float = 0.07,
    epsilon: float = 0.65,
    beta: float = 0.03,
    out_sharding=None,
) -> jax.Array:
    """MarginNCE: InfoNCE over soft-masked mean similarities S_ij, diagonal shifted by -margin.

    S_ij = sum(m_ij alpha_ij) / sum(m_ij), m_ij = sigmoid((alpha_ij - epsilon) / beta);
    logits (S_ij - margin [i == j]) / tau; mean over rows of the cross-entropy with target i.
    margin = 0 is plain InfoNCE; a negative margin relaxes the positive.
    """
    alpha = similarity(V, A, out_sharding)
    S = _masked_mean(alpha, _log_foreground(alpha, epsilon, beta))
    eye = jnp.eye(S.shape[0], dtype=_F32)
    return _diag_cross_entropy((S - margin * eye) / tau)


def lvs(
    V: jax.Array,
    A: jax.Array,
    *,
    margin: float = 0.0,
    tau: float = 0.07,
    epsilon: float = 0.65,
    epsilon2: float = 0.4,
    beta: float = 0.03,
    out_sharding=None,
) -> jax.Array:
    """LVS trimap loss: logits [P_i - margin, S_ij (j != i), N_i] / tau, target P_i.

    P_i = S_ii; N_i = mean of alpha_ii over the background mask 1 - sigmoid((alpha_ii - epsilon2)
    / beta). The positive sits on the diagonal of the B x B block (cross-entropy does not depend
    on column order), N_i is appended as column B.
    """
    alpha = similarity(V, A, out_sharding)
    S = _masked_mean(alpha, _log_foreground(alpha, epsilon, beta))
    alpha_ii = diagonal_map(V, A)
    N = _masked_mean(alpha_ii, _log_background(alpha_ii, epsilon2, beta))
    eye = jnp.eye(S.shape[0], dtype=_F32)
    logits = jnp.concatenate([S - margin * eye, N[:, None]], axis=1) / tau
    return _diag_cross_entropy(logits)


def ezvsl(
    V: jax.Array,
    A: jax.Array,
    *,
    margin: float = 0.0,
    tau: float = 0.03,
    out_sharding=None,
) -> jax.Array:
    """EZ-VSL multiple-instance loss: s_ij = max_hw alpha_ij; cross-entropy over rows + columns.

    Logits (s_ij - margin [i == j]) / tau.
    """
    alpha = similarity(V, A, out_sharding)
    s = jnp.max(alpha, axis=(-2, -1))
    eye = jnp.eye(s.shape[0], dtype=_F32)
    logits = (s - margin * eye) / tau
    return _diag_cross_entropy(logits, axis=1) + _diag_cross_entropy(logits, axis=0)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "marginnce": marginnce,
    "lvs": lvs,
    "ezvsl": ezvsl,
}


def get_loss(name: str) -> Callable[..., jax.Array]:
    """The loss function registered under `name`."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
