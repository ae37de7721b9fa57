"""The audio-visual model (docs/protocol.md section 2): image map V (B,h,w,D), audio
embedding A (B,D), unit vectors whose inner product is the localization map. Their response
maps are in sslocal.maps.

The paper's model is EZ-VSL's; the layouts of the other released models are options
(docs/protocol.md section 2, "Released models"): the towers' output strides, no projections
(LVS, SSL-TIE: V and A are the towers' own features), or several projection heads (SLAVC: the
map is the mean of the heads' maps). Attribute names match the PyTorch state dicts (imgnet,
img_proj, audnet, aud_proj; img_proj1, img_proj2, ... with several heads).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sslocal import maps
from sslocal.models.resnet import CONV_PRECISION, ResNet18, conv_init, jit_init

_TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
# The dense projection is a matmul, which PyTorch runs in full float32 by default
# (torch.backends.cuda.matmul.allow_tf32 = False): HIGHEST, so no TF32 pass on a GPU.
DENSE_PRECISION = jax.lax.Precision.HIGHEST


@jit_init
def dense_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Truncated normal (at +-2 sigma), rescaled so the values have std 0.01 (protocol 2)."""
    z = jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), dtype)
    return (0.01 / _TRUNC_STD) * z.reshape(shape)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize; finite gradient at x = 0."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def global_max_pool(x: jax.Array) -> jax.Array:
    """(B, h, w, C) -> (B, C), the gradient routed to one argmax position (as PyTorch's
    adaptive_max_pool2d). jnp.max's gradient instead re-finds the maximum by equality with a
    recomputed forward value, which XLA may fuse differently (seen: wrong audio-tower gradients
    with train-mode BatchNorm on a batch-sharded mesh)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    index = jnp.argmax(flat, axis=1)
    return jnp.take_along_axis(flat, index[:, None, :], axis=1)[:, 0]


class AudioVisualModel(nnx.Module):
    """Image tower (ResNet18 + 1x1 conv) and audio tower (1-channel ResNet18 + max pool + dense)."""

    def __init__(
        self,
        *,
        width: int = 64,
        embed_dim: int = 512,
        dtype=jnp.float32,
        audio_pool: int = 1,
        image_stride: int = 32,
        audio_stride: int = 32,
        projection: bool = True,
        heads: int = 1,
        rngs: nnx.Rngs,
    ):
        """audio_pool > 1 average-pools the spectrogram by that factor before the audio tower:
        not in the paper (1), a cheaper audio tower for CPU demos. image_stride / audio_stride
        16 keep layer4 of that tower at stride 1 (ResNet18.output_stride; the paper: 32; LVS and
        SSL-TIE: 16 for both). projection False: no img_proj / aud_proj, V and A are the towers'
        normalised features and embed_dim must be 8 * width (LVS, SSL-TIE). heads K > 1: K
        projections per tower (img_proj1..K, aud_proj1..K), joined by maps.join_heads so that
        <V, A> is the mean of the K heads' cosines (SLAVC: K = 2)."""
        feat = 8 * width
        if heads < 1:
            raise ValueError(f"heads must be at least 1, got {heads}")
        if not projection and (heads != 1 or embed_dim != feat):
            raise ValueError(f"without projections the embedding is the towers' {feat} features "
                             f"(8 * width) in one head, not embed_dim {embed_dim} in {heads}")
        self.width = width
        self.embed_dim = embed_dim
        self.audio_pool = audio_pool
        self.projection = projection
        self.heads = heads
        # Created in this order (imgnet, img_proj, audnet, aud_proj): it fixes how a seed
        # initialises the model.
        self.imgnet = ResNet18(in_channels=3, width=width, dtype=dtype,
                               output_stride=image_stride, rngs=rngs)
        for name in self._projection_names():
            setattr(self, f"img_proj{name}", nnx.Conv(  # 1 x 1, as in PyTorch: CONV_PRECISION
                feat,
                embed_dim,
                (1, 1),
                use_bias=True,
                precision=CONV_PRECISION,
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=conv_init,
                rngs=rngs,
            ))
        self.audnet = ResNet18(in_channels=1, width=width, dtype=dtype,
                               output_stride=audio_stride, rngs=rngs)
        for name in self._projection_names():
            setattr(self, f"aud_proj{name}", nnx.Linear(
                feat,
                embed_dim,
                precision=DENSE_PRECISION,
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=dense_init,
                rngs=rngs,
            ))

    def _projection_names(self) -> list[str]:
        """Suffixes of the projections: "" for one head (img_proj), "1".."K" for K heads."""
        if not self.projection:
            return []
        return [""] if self.heads == 1 else [str(k + 1) for k in range(self.heads)]

    def _embed(self, features: jax.Array, tower: str) -> jax.Array:
        """The towers' features -> unit vectors: normalised, through each head's projection
        when there are projections, the heads joined."""
        if not self.projection:
            return l2_normalize(features.astype(jnp.float32))
        per_head = [l2_normalize(getattr(self, f"{tower}_proj{name}")(features)
                                 .astype(jnp.float32)) for name in self._projection_names()]
        return per_head[0] if self.heads == 1 else maps.join_heads(per_head)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> V (B, ceil(H/s), ceil(W/s), D) float32, unit norm over D."""
        return self._embed(self.imgnet(images), "img")

    def encode_audio(self, spec: jax.Array) -> jax.Array:
        """(B, F, T, 1) log spectrogram -> A (B, D) float32, unit norm."""
        if self.audio_pool > 1:
            window = (self.audio_pool, self.audio_pool)
            spec = nnx.avg_pool(spec, window, strides=window, padding="SAME")
        return self._embed(global_max_pool(self.audnet(spec)), "aud")

    def __call__(self, images: jax.Array, spec: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_image(images), self.encode_audio(spec)
