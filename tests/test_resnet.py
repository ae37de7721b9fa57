"""ResNet18 (Flax NNX): shapes, dtypes, parameter counts, initialisation statistics.

Numerical parity with a PyTorch ResNet18 is in test_convert.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sslocal.models.resnet import ResNet18


def count_params(module: nnx.Module) -> int:
    """Trainable scalars (nnx.Param only, BatchNorm statistics excluded); abstract modules too."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """Compile time dominates these tiny models; restore the setting for other test files."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def tiny():
    model = ResNet18(in_channels=3, width=8, rngs=nnx.Rngs(0))
    model.eval()
    return model


@pytest.fixture(scope="module")
def fresh():
    """A freshly initialised model for the initialisation statistics (never run)."""
    return ResNet18(in_channels=3, width=8, rngs=nnx.Rngs(1))


# One compiled forward per input shape is cheaper than op-by-op dispatch.
forward = nnx.jit(lambda model, x: model(x))


def _flat(model, kind=(nnx.Param, nnx.BatchStat)):
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, kind))}


@pytest.mark.parametrize(
    "hw, expected",
    [((224, 224), (7, 7)), ((33, 65), (2, 3)), ((257, 200), (9, 7))],
)
def test_feature_map_shape_tiny(tiny, hw, expected):
    x = jax.random.normal(jax.random.key(0), (2, *hw, 3))
    y = forward(tiny, x)
    assert y.shape == (2, *expected, 64)
    assert y.dtype == jnp.float32
    assert bool(jnp.all(y >= 0))  # final ReLU


def test_paper_shapes_width64():
    for in_ch, hw, out in [(3, (224, 224), (7, 7)), (1, (257, 200), (9, 7))]:
        model = nnx.eval_shape(lambda c=in_ch: ResNet18(in_channels=c, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        y = jax.eval_shape(
            lambda s, x, g=graphdef: nnx.merge(g, s)(x),
            state,
            jax.ShapeDtypeStruct((2, *hw, in_ch), jnp.float32),
        )
        assert y.shape == (2, *out, 512)


def test_bfloat16_compute_float32_params():
    model = ResNet18(in_channels=3, width=8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = forward(model, jnp.ones((2, 65, 40, 3)))
    assert y.dtype == jnp.bfloat16
    assert y.shape == (2, 3, 2, 64)
    dtypes = {v.dtype for v in _flat(model).values()}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_parameter_counts_width64():
    image = nnx.eval_shape(lambda: ResNet18(in_channels=3, width=64, rngs=nnx.Rngs(0)))
    audio = nnx.eval_shape(lambda: ResNet18(in_channels=1, width=64, rngs=nnx.Rngs(0)))
    # torchvision resnet18: 11,689,512 parameters, minus fc (512 * 1000 + 1000).
    assert count_params(image) == 11_689_512 - 513_000 == 11_176_512
    # The 1-channel stem saves 7 * 7 * 2 * 64 = 6,272 weights.
    assert count_params(audio) == 11_176_512 - 6_272 == 11_170_240


def test_only_params_and_batch_stats(tiny):
    """nnx.split(model, nnx.Param, nnx.BatchStat) is complete: no Rngs or other state is kept."""
    everything = nnx.to_flat_state(nnx.state(tiny))
    assert len(everything) == len(_flat(tiny))
    # torchvision layout: 20 convolutions (17 + 3 downsample) and 20 BatchNorms.
    names = _flat(tiny)
    assert sum(k.endswith("kernel") for k in names) == 20
    assert sum(k.endswith("mean") for k in names) == 20
    assert "layer2.0.downsample.0.kernel" in names and "layer2.0.downsample.1.var" in names
    assert not any(k.startswith("layer1.0.downsample") for k in names)


def test_channel_check(tiny):
    with pytest.raises(ValueError, match="NHWC"):
        tiny(jnp.ones((1, 3, 32, 32)))


def test_conv_init_kaiming_fan_out(fresh):
    """Kaiming normal, fan-out, ReLU gain: std = sqrt(2 / (kh * kw * out)), untruncated."""
    pooled = []
    for name, w in _flat(fresh, nnx.Param).items():
        if not name.endswith("kernel"):
            continue
        kh, kw, _, out = w.shape
        std = math.sqrt(2.0 / (kh * kw * out))
        z = np.asarray(w, np.float64).ravel() / std
        tol = 5.0 / math.sqrt(2 * z.size)  # five standard errors of a sample std
        assert abs(z.std() - 1.0) < tol, (name, z.std())
        assert abs(z.mean()) < 5.0 / math.sqrt(z.size), name
        pooled.append(z)
    z = np.concatenate(pooled)
    assert abs(z.std() - 1.0) < 0.005
    # A normal has 4.55% of its mass beyond 2 sigma; a 2-sigma truncated normal has none.
    assert abs(np.mean(np.abs(z) > 2.0) - 0.0455) < 0.002


def test_batchnorm_init(fresh):
    flat = _flat(fresh)
    scales = np.concatenate([np.asarray(v).ravel() for k, v in flat.items() if k.endswith("scale")])
    assert abs(scales.mean() - 1.0) < 5 * 0.02 / math.sqrt(scales.size)
    assert abs(scales.std() - 0.02) < 0.02 * 5 / math.sqrt(2 * scales.size)
    for key, value in flat.items():
        if key.endswith("bias"):
            assert np.all(np.asarray(value) == 0.0), key
        if key.endswith(".mean"):
            assert np.all(np.asarray(value) == 0.0), key
        if key.endswith(".var"):
            assert np.all(np.asarray(value) == 1.0), key
    bn = fresh.bn1
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5


def test_train_eval_modes(tiny):
    """Train mode normalises with batch statistics and updates the running ones; eval does not."""
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    before = _flat(tiny, nnx.BatchStat)
    y_eval = forward(tiny, x)
    assert all(np.array_equal(before[k], v) for k, v in _flat(tiny, nnx.BatchStat).items())
    model = nnx.clone(tiny)
    model.train()
    y_train = forward(model, x)
    after = _flat(model, nnx.BatchStat)
    assert not np.allclose(after["bn1.mean"], before["bn1.mean"])
    assert not np.allclose(np.asarray(y_train), np.asarray(y_eval))


def test_output_stride_16_keeps_the_parameters_and_doubles_the_map():
    coarse = ResNet18(width=8, rngs=nnx.Rngs(0))
    fine = ResNet18(width=8, output_stride=16, rngs=nnx.Rngs(0))
    assert count_params(fine) == count_params(coarse)
    x = jnp.zeros((1, 64, 64, 3))
    assert coarse(x).shape == (1, 2, 2, 64) and fine(x).shape == (1, 4, 4, 64)
    with pytest.raises(ValueError, match="output_stride"):
        ResNet18(width=8, output_stride=8, rngs=nnx.Rngs(0))
