"""ResNet18 (torchvision layout) in Flax NNX, NHWC, returning the final stride-32 feature map.

Attribute names follow torchvision (conv1, bn1, layer1..layer4, downsample.0 / downsample.1) so a
PyTorch state dict maps onto the NNX state path by path (see convert.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def jit_init(init):
    """One compiled program per shape: eager model construction on CPU is dominated by
    compiling every primitive of every initializer separately."""
    return jax.jit(init, static_argnums=(1, 2))


def _normal(key: jax.Array, shape, dtype) -> jax.Array:
    # Drawn flat, then reshaped: 1-D random programs compile several times faster on CPU.
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


@jit_init
def conv_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Kaiming normal, fan-out, ReLU gain (protocol 2): std = sqrt(2 / (kh * kw * out)).

    Untruncated, like torch.nn.init.kaiming_normal_. Kernel layout HWIO.
    """
    fan_out = math.prod(shape[:-2]) * shape[-1]
    return math.sqrt(2.0 / fan_out) * _normal(key, shape, dtype)


@jit_init
def bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """BatchNorm scale ~ N(1, 0.02) (docs/protocol.md section 2)."""
    return 1.0 + 0.02 * _normal(key, shape, dtype)


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm with PyTorch's running statistics (torch.nn.BatchNorm2d, protocol 2).

    Train mode normalises with the batch mean and the biased batch variance (as both libraries
    do) and updates running = momentum * running + (1 - momentum) * batch statistic, where the
    running variance takes the unbiased batch variance n / (n - 1) * var, n the number of
    values reduced per channel (Flax would take the biased one). n counts the whole array the
    statistics are computed on: the global batch under jit on a sharded mesh, and every device
    of `axis_name` when the statistics are all-reduced by name (shard_map / pmap, with
    `axis_index_groups` when given); with a `mask`, the unmasked values. For n = 1, where
    PyTorch raises, the (zero) variance is taken as it is.

    Eval mode is nnx.BatchNorm's. The variables (scale, bias, mean, var) and every option are
    nnx.BatchNorm's, so checkpoints and the PyTorch converter are unchanged.
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("BatchNorm needs use_running_average: call model.train() or "
                             "model.eval() first")
        if use_running_average:
            return super().__call__(x, use_running_average=True, mask=mask)

        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        feature_axes = {a % x.ndim for a in axes}
        reduce = tuple(i for i in range(x.ndim) if i not in feature_axes)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
        # Statistics in at least float32, as nnx.BatchNorm computes them.
        stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        xs = x.astype(stats_dtype)

        def all_mean(*values):
            means = [v.mean(reduce, where=mask) for v in values]
            if self.axis_name is not None:
                means = [jax.lax.pmean(m, self.axis_name, axis_index_groups=self.axis_index_groups)
                         for m in means]
            return means

        if self.use_fast_variance:
            mean, mean_sq = all_mean(xs, xs * xs)
            var = jnp.maximum(0.0, mean_sq - mean * mean)
        else:
            (mean,) = all_mean(xs)
            (var,) = all_mean(jnp.square(xs - jnp.expand_dims(mean, reduce)))

        if mask is None:
            n = jnp.asarray(math.prod(x.shape[i] for i in reduce), stats_dtype)
        else:
            n = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=reduce, dtype=stats_dtype)
        if self.axis_name is not None:
            n = jax.lax.psum(n, self.axis_name, axis_index_groups=self.axis_index_groups)
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        momentum = self.momentum
        self.mean[...] = jax.lax.stop_gradient(momentum * self.mean[...] + (1 - momentum) * mean)
        self.var[...] = jax.lax.stop_gradient(momentum * self.var[...] + (1 - momentum) * unbiased)

        shape = [1] * x.ndim
        for i in feature_axes:
            shape[i] = x.shape[i]
        mul = jax.lax.rsqrt(var + self.epsilon)
        if scale is not None:
            mul = mul * scale.reshape(mul.shape)
        y = (x - mean.reshape(shape)) * mul.reshape(shape)
        if bias is not None:
            y = y + bias.reshape(shape)
        out_dtype = self.dtype or jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
        return y.astype(out_dtype)


def batch_norm(features: int, dtype, rngs: nnx.Rngs) -> BatchNorm:
    # Flax momentum 0.9 == PyTorch momentum 0.1.
    return BatchNorm(
        features,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=bn_scale_init,
        rngs=rngs,
    )


# Stated numerics (docs/protocol.md section 8): the towers' convolutions run at the default
# precision, which lets a GPU use TF32 tensor cores for float32 models, as PyTorch allows for
# cuDNN convolutions by default (torch.backends.cudnn.allow_tf32). Passed explicitly, so a
# global jax_default_matmul_precision does not change the towers.
CONV_PRECISION = jax.lax.Precision.DEFAULT


def conv(in_ch: int, out_ch: int, k: int, stride: int, pad: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    # Explicit symmetric padding as in torch; 'SAME' would pad asymmetrically at stride 2.
    return nnx.Conv(
        in_ch,
        out_ch,
        (k, k),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        precision=CONV_PRECISION,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        rngs=rngs,
    )


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with a residual connection (torchvision BasicBlock)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = conv(in_ch, out_ch, 3, stride, 1, dtype, rngs)
        self.bn1 = batch_norm(out_ch, dtype, rngs)
        self.conv2 = conv(out_ch, out_ch, 3, 1, 1, dtype, rngs)
        self.bn2 = batch_norm(out_ch, dtype, rngs)
        if stride != 1 or in_ch != out_ch:
            # Indexed like torchvision's nn.Sequential: downsample.0 (conv), downsample.1 (bn).
            self.downsample = nnx.List(
                [conv(in_ch, out_ch, 1, stride, 0, dtype, rngs), batch_norm(out_ch, dtype, rngs)]
            )
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.downsample is not None:
            ds_conv, ds_bn = self.downsample
            x = ds_bn(ds_conv(x))
        return nnx.relu(y + x)


class ResNet18(nnx.Module):
    """ResNet18 trunk without average pool and classifier.

    Input (B, H, W, in_channels); output (B, ceil(H/s), ceil(W/s), 8 * width) in `dtype`,
    s = output_stride.
    Parameters are always float32; `dtype` is the compute dtype.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        width: int = 64,
        dtype=jnp.float32,
        output_stride: int = 32,
        rngs: nnx.Rngs,
    ):
        """output_stride 16 keeps layer4 at stride 1 (same parameters, a 2x finer map): not the
        paper (32), a finer response map for small frames."""
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        self.in_channels = in_channels
        self.width = width
        self.dtype = dtype
        self.conv1 = conv(in_channels, width, 7, 2, 3, dtype, rngs)
        self.bn1 = batch_norm(width, dtype, rngs)
        in_ch = width
        for i, mult in enumerate((1, 2, 4, 8)):
            out_ch = width * mult
            stride = 1 if i == 0 or (i == 3 and output_stride == 16) else 2
            blocks = [
                BasicBlock(in_ch, out_ch, stride, dtype=dtype, rngs=rngs),
                BasicBlock(out_ch, out_ch, 1, dtype=dtype, rngs=rngs),
            ]
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
            in_ch = out_ch

    @property
    def out_features(self) -> int:
        return 8 * self.width

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNet18 expects (B, H, W, {self.in_channels}) NHWC input, got {x.shape}"
            )
        x = nnx.relu(self.bn1(self.conv1(x)))
        # torch MaxPool2d(3, 2, padding=1) pads with -inf, as max_pool does.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
        return x

