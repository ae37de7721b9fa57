"""ResNet18 (Flax NNX): shapes, dtypes, parameter counts, initialisation statistics.

Numerical parity with a PyTorch ResNet18 is in test_convert.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sslocal.models.resnet import BatchNorm, ResNet18


def count_params(module: nnx.Module) -> int:
    """Trainable scalars (nnx.Param only, BatchNorm statistics excluded); abstract modules too."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# Compile time dominates these tiny models (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


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
    assert isinstance(bn, BatchNorm) and isinstance(bn, nnx.BatchNorm)
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


# ---------------------------------------------------------------- BatchNorm as PyTorch keeps it


def _bn_input(shape, seed=0):
    """Channels with their own offset and spread (an offset makes E[x^2] - E[x]^2 cancel)."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return (rng.normal(size=shape) * rng.uniform(0.5, 2.0, c) + rng.normal(0, 2.0, c)
            ).astype(np.float32)


def _random_bn(c, seed=0, **kwargs):
    rng = np.random.default_rng(seed + 100)
    bn = BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0), **kwargs)
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
    bn.mean[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
    bn.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    return bn


def _reference(bn, x, weights=None):
    """torch.nn.BatchNorm2d(momentum=0.1) in float64: (output, running_mean, running_var);
    `weights` (0 / 1 per value) selects the values the statistics are taken over."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if weights is None else np.broadcast_to(weights, x.shape).astype(float)
    n = w.sum(axis=(0, 1, 2))
    mean = (w * x).sum(axis=(0, 1, 2)) / n
    var = (w * (x - mean) ** 2).sum(axis=(0, 1, 2)) / n  # biased: what train mode divides by
    scale, bias = (np.asarray(v[...], np.float64) for v in (bn.scale, bn.bias))
    y = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
    old_mean, old_var = (np.asarray(v[...], np.float64) for v in (bn.mean, bn.var))
    return y, 0.9 * old_mean + 0.1 * mean, 0.9 * old_var + 0.1 * var * n / (n - 1)


def test_batchnorm_train_step_updates_running_stats_as_torch():
    """One train-mode call: output with the biased batch variance, running_var with the
    unbiased one (n = 2 * 3 * 4 = 24 values per channel: a 1/23 difference), momentum 0.1."""
    x = _bn_input((2, 3, 4, 5))
    bn = _random_bn(5)
    y_ref, mean_ref, var_ref = _reference(bn, x)
    y = bn(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), var_ref, rtol=2e-6)
    biased = 0.9 * np.asarray(bn.var[...]) + 0.1 * np.var(x.astype(np.float64), axis=(0, 1, 2))
    assert np.min(np.abs(biased - var_ref) / var_ref) > 1e-3  # the test can tell them apart


@pytest.mark.parametrize("fast", [True, False])
def test_batchnorm_under_jit_and_both_variance_formulas(fast):
    x = _bn_input((4, 2, 2, 6), seed=1)  # layer4's shape at batch 4: n = 16
    bn = _random_bn(6, seed=1, use_fast_variance=fast)
    y_ref, mean_ref, var_ref = _reference(bn, x)
    y = nnx.jit(lambda m, v: m(v))(bn, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), var_ref, rtol=1e-5)


def test_batchnorm_mask_counts_only_the_selected_values():
    x = _bn_input((4, 3, 2, 3), seed=2)
    keep = np.array([True, False, True, True])[:, None, None, None]
    bn = _random_bn(3, seed=2)
    y_ref, mean_ref, var_ref = _reference(bn, x, keep)
    y = bn(jnp.asarray(x), mask=jnp.asarray(np.broadcast_to(keep, x.shape)))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), var_ref, rtol=2e-6)


def test_batchnorm_eval_mode_uses_and_keeps_the_running_stats():
    x = _bn_input((2, 3, 3, 4), seed=3)
    bn = _random_bn(4, seed=3)
    bn.eval()
    before = [np.asarray(v[...]) for v in (bn.mean, bn.var)]
    y = bn(jnp.asarray(x))
    mean, var = (np.asarray(v, np.float64) for v in before)
    expected = ((x - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...])
                + np.asarray(bn.bias[...]))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    for v, b in zip((bn.mean, bn.var), before, strict=True):
        np.testing.assert_array_equal(np.asarray(v[...]), b)


def test_batchnorm_bfloat16_compute_keeps_float32_statistics():
    x = _bn_input((2, 4, 4, 3), seed=4)
    bn = BatchNorm(3, momentum=0.9, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    _, mean_ref, var_ref = _reference(bn, np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32))
    y = bn(jnp.asarray(x))
    assert y.dtype == jnp.bfloat16 and bn.var[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bn.var[...]), var_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), mean_ref, rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_by_axis_name_count_every_device():
    """Statistics all-reduced over a named axis (shard_map, one sample per device): n is the
    global count, so the running variance equals the one of the whole batch in one place."""
    assert jax.device_count() >= 8
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.asarray(_bn_input((8, 3, 2, 4), seed=5))
    whole = _random_bn(4, seed=5)
    named = _random_bn(4, seed=5, axis_name="batch")
    _, mean_ref, var_ref = _reference(whole, x)
    y_whole = whole(x)
    graphdef, state = nnx.split(named)
    spec = jax.sharding.PartitionSpec("batch")

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), spec),
                   out_specs=(spec, jax.sharding.PartitionSpec()))
    def per_device(state, x):
        model = nnx.merge(graphdef, state)
        y = model(x)  # each device holds n = 1 * 3 * 2 = 6 of the 48 values per channel
        return y, nnx.state(model)

    y, state = per_device(state, x)
    nnx.update(named, state)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_whole), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(named.var[...]), var_ref, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(named.var[...]), np.asarray(whole.var[...]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(named.mean[...]), mean_ref, rtol=1e-6, atol=1e-6)


def test_resnet_train_step_updates_every_batchnorm_with_the_unbiased_variance():
    """The model's BatchNorms are this class: layer4's (n = 2 * 1 * 1 at 32 px) variance gets
    the factor 2 / (2 - 1) = 2, where Flax's own BatchNorm would take 1."""
    model = ResNet18(width=8, rngs=nnx.Rngs(0))
    model.train()
    bns = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    assert len(bns) == 20 and all(type(m) is BatchNorm for m in bns)
    captured = {}
    block = model.layer4[1]
    original = type(block.bn2).__call__

    def capture(bn, x, *args, **kwargs):
        if bn is block.bn2:
            captured["x"] = np.asarray(x, np.float64)
        return original(bn, x, *args, **kwargs)

    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    BatchNorm.__call__ = capture
    try:
        model(x)
    finally:
        BatchNorm.__call__ = original
    inputs = captured["x"]
    assert inputs.shape == (2, 1, 1, 64)
    expected = 0.9 * 1.0 + 0.1 * np.var(inputs, axis=(0, 1, 2)) * 2
    np.testing.assert_allclose(np.asarray(block.bn2.var[...]), expected, rtol=1e-5)
