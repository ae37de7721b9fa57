"""EZ-VSL audio-visual model (docs/protocol.md section 2): image map V (B,h,w,D), audio
embedding A (B,D). Their response maps are in sslocal.maps.

Attribute names match the PyTorch reference state dict (imgnet, img_proj, audnet, aud_proj).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

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
        rngs: nnx.Rngs,
    ):
        """audio_pool > 1 average-pools the spectrogram by that factor before the audio tower:
        not in the paper (1), a cheaper audio tower for CPU demos. image_stride 16 gives the
        image tower a 2x finer map (ResNet18.output_stride; the paper: 32)."""
        self.width = width
        self.embed_dim = embed_dim
        self.audio_pool = audio_pool
        feat = 8 * width
        self.imgnet = ResNet18(in_channels=3, width=width, dtype=dtype,
                               output_stride=image_stride, rngs=rngs)
        self.img_proj = nnx.Conv(  # a 1 x 1 convolution, as in PyTorch: CONV_PRECISION
            feat,
            embed_dim,
            (1, 1),
            use_bias=True,
            precision=CONV_PRECISION,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=conv_init,
            rngs=rngs,
        )
        self.audnet = ResNet18(in_channels=1, width=width, dtype=dtype, rngs=rngs)
        self.aud_proj = nnx.Linear(
            feat,
            embed_dim,
            precision=DENSE_PRECISION,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=dense_init,
            rngs=rngs,
        )

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> V (B, ceil(H/32), ceil(W/32), D) float32, unit norm over D."""
        v = self.img_proj(self.imgnet(images))
        return l2_normalize(v.astype(jnp.float32))

    def encode_audio(self, spec: jax.Array) -> jax.Array:
        """(B, F, T, 1) log spectrogram -> A (B, D) float32, unit norm."""
        if self.audio_pool > 1:
            window = (self.audio_pool, self.audio_pool)
            spec = nnx.avg_pool(spec, window, strides=window, padding="SAME")
        f = global_max_pool(self.audnet(spec))
        a = self.aud_proj(f)
        return l2_normalize(a.astype(jnp.float32))

    def __call__(self, images: jax.Array, spec: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_image(images), self.encode_audio(spec)

