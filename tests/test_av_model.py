"""AudioVisualModel: shapes, dtypes, normalisation, initialisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sslocal.models.av_model import AudioVisualModel, l2_normalize
from tests.test_resnet import count_params

WIDTH, DIM = 8, 32


# Compile time dominates these tiny models (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def model():
    m = AudioVisualModel(width=WIDTH, embed_dim=DIM, rngs=nnx.Rngs(0))
    m.eval()
    return m


forward = nnx.jit(lambda m, images, spec: m(images, spec))
# Outputs and the two trunks' feature maps, compiled once per shape.
towers = nnx.jit(lambda m, images, spec: (*m(images, spec), m.imgnet(images), m.audnet(spec)))


def _inputs(batch, hw, ft, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (
        jax.random.normal(k1, (batch, *hw, 3)),
        jax.random.normal(k2, (batch, *ft, 1)),
    )


@pytest.mark.parametrize(
    "hw, ft, vmap",
    [((224, 224), (257, 200), (7, 7)), ((64, 64), (65, 40), (2, 2))],
)
def test_shapes_dtypes_unit_norm(model, hw, ft, vmap):
    V, A = forward(model, *_inputs(3, hw, ft))
    assert V.shape == (3, *vmap, DIM) and V.dtype == jnp.float32
    assert A.shape == (3, DIM) and A.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(V, np.float64), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(A, np.float64), axis=-1), 1.0, atol=1e-5)


def test_paper_shapes_and_counts_width64():
    abstract = nnx.eval_shape(lambda: AudioVisualModel(rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    V, A = jax.eval_shape(
        lambda s, x, y: nnx.merge(graphdef, s)(x, y),
        state,
        jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32),
        jax.ShapeDtypeStruct((2, 257, 200, 1), jnp.float32),
    )
    assert V.shape == (2, 7, 7, 512) and A.shape == (2, 512)
    assert V.dtype == A.dtype == jnp.float32
    assert count_params(abstract.imgnet) == 11_176_512
    assert count_params(abstract.audnet) == 11_170_240
    assert count_params(abstract.img_proj) == count_params(abstract.aud_proj) == 512 * 512 + 512
    assert count_params(abstract) == 11_176_512 + 11_170_240 + 2 * (512 * 512 + 512)


def test_bfloat16_gives_float32_outputs_and_params():
    m = AudioVisualModel(width=WIDTH, embed_dim=DIM, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    m.eval()
    images, spec = _inputs(2, (64, 64), (65, 40))
    V, A, fmap, amap = towers(m, images, spec)
    assert V.dtype == A.dtype == jnp.float32
    assert fmap.dtype == amap.dtype == jnp.bfloat16
    leaves = jax.tree.leaves(nnx.state(m, (nnx.Param, nnx.BatchStat)))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(np.linalg.norm(np.asarray(A), axis=-1), 1.0, atol=1e-5)


def test_towers_against_numpy(model):
    """1x1 projection + L2 norm and global max pool + dense + L2 norm, recomputed in float64."""
    images, spec = _inputs(2, (64, 64), (65, 40), seed=1)
    V, A, fmap, amap = towers(model, images, spec)
    fmap, amap = np.asarray(fmap, np.float64), np.asarray(amap, np.float64)
    wv = np.asarray(model.img_proj.kernel[...], np.float64)[0, 0]
    bv = np.asarray(model.img_proj.bias[...], np.float64)
    wa = np.asarray(model.aud_proj.kernel[...], np.float64)
    ba = np.asarray(model.aud_proj.bias[...], np.float64)
    v = fmap @ wv + bv
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    a = amap.max(axis=(1, 2)) @ wa + ba
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(V), v, atol=1e-5)
    np.testing.assert_allclose(np.asarray(A), a, atol=1e-5)


def test_l2_normalize_like_torch():
    x = jnp.array([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0]])
    y = l2_normalize(x)
    # torch.nn.functional.normalize: x / max(||x||, 1e-12)
    np.testing.assert_allclose(np.asarray(y), [[0.6, 0.8], [0.0, 0.0], [0.1, 0.0]], rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(l2_normalize(x) * jnp.array([1.0, 2.0])))(x)
    assert bool(jnp.all(jnp.isfinite(g)))
    # d/dx of x/||x|| . c at (3, 4): (c - (u.c) u) / ||x||
    u, c = np.array([0.6, 0.8]), np.array([1.0, 2.0])
    np.testing.assert_allclose(np.asarray(g[0]), (c - u.dot(c) * u) / 5.0, rtol=1e-5)


def test_initialisation(model):
    fresh = AudioVisualModel(width=16, embed_dim=512, rngs=nnx.Rngs(3))
    w = np.asarray(fresh.aud_proj.kernel[...], np.float64).ravel()
    assert abs(w.std() - 0.01) < 0.01 * 5 / math.sqrt(2 * w.size)
    assert abs(w.mean()) < 5 * 0.01 / math.sqrt(w.size)
    # Truncated at 2 sigma of the underlying normal (0.01 / 0.8796 = 0.01137).
    assert np.abs(w).max() <= 2 * 0.01 / 0.8796 + 1e-7
    assert np.abs(w).max() > 0.02
    assert np.all(np.asarray(fresh.aud_proj.bias[...]) == 0.0)
    k = np.asarray(fresh.img_proj.kernel[...], np.float64).ravel()
    std = math.sqrt(2.0 / 512)  # fan-out of a 1x1 conv with 512 outputs
    assert abs(k.std() / std - 1.0) < 5 / math.sqrt(2 * k.size)
    assert np.all(np.asarray(fresh.img_proj.bias[...]) == 0.0)


def test_audio_pool_averages_the_spectrogram_first():
    pooled = AudioVisualModel(width=8, embed_dim=16, audio_pool=2, rngs=nnx.Rngs(0))
    plain = AudioVisualModel(width=8, embed_dim=16, rngs=nnx.Rngs(0))
    pooled.eval()
    plain.eval()
    spec = np.random.default_rng(0).normal(size=(2, 64, 48, 1)).astype(np.float32)
    by_hand = spec.reshape(2, 32, 2, 24, 2, 1).mean(axis=(2, 4))  # 2 x 2 means, in numpy
    np.testing.assert_allclose(pooled.encode_audio(jnp.asarray(spec)),
                               plain.encode_audio(jnp.asarray(by_hand)), rtol=1e-5, atol=1e-6)


def test_released_layouts_shapes_and_parameters():
    """LVS / SSL-TIE (no projections, both towers at stride 16: 14 x 14 at 224 px, D = 8 *
    width) and SLAVC (two projections per tower, V and A of 2 D joined), from their shapes."""
    def outputs(**layout):
        abstract = nnx.eval_shape(lambda: AudioVisualModel(width=WIDTH, **layout,
                                                           rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        V, A = jax.eval_shape(lambda s, x, y: nnx.merge(graphdef, s)(x, y), state,
                              jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32),
                              jax.ShapeDtypeStruct((2, 257, 200, 1), jnp.float32))
        return abstract, V.shape, A.shape

    lvs, V, A = outputs(embed_dim=8 * WIDTH, image_stride=16, audio_stride=16, projection=False)
    assert V == (2, 14, 14, 8 * WIDTH) and A == (2, 8 * WIDTH)
    assert count_params(lvs) == count_params(lvs.imgnet) + count_params(lvs.audnet)
    assert not any(hasattr(lvs, n) for n in ("img_proj", "aud_proj", "img_proj1"))
    slavc, V, A = outputs(embed_dim=DIM, heads=2)
    assert V == (2, 7, 7, 2 * DIM) and A == (2, 2 * DIM)
    assert not hasattr(slavc, "img_proj")
    assert count_params(slavc.img_proj2) == count_params(slavc.aud_proj1) == 8 * WIDTH * DIM + DIM
    with pytest.raises(ValueError, match="without projections the embedding is the towers' 64 "
                                         "features"):
        AudioVisualModel(width=WIDTH, embed_dim=DIM, projection=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="heads must be at least 1"):
        AudioVisualModel(width=WIDTH, embed_dim=DIM, heads=0, rngs=nnx.Rngs(0))


def test_the_towers_numerics_are_stated_in_the_program(model):
    """Lowered under the suite's global "highest": the convolutions still carry the default
    precision (TF32 allowed on a GPU, as PyTorch allows for cuDNN) and the dense projection
    HIGHEST (PyTorch's matmuls are full float32): both are passed explicitly, not inherited."""
    assert jax.config.values["jax_default_matmul_precision"] == "highest"
    images = jnp.zeros((2, 64, 64, 3), jnp.float32)
    specs = jnp.zeros((2, 257, 200, 1), jnp.float32)
    graphdef, state = nnx.split(model)
    hlo = jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y)).lower(
        state, images, specs).as_text(dialect="hlo")
    convs = [ln for ln in hlo.splitlines() if " convolution(" in ln]
    dots = [ln for ln in hlo.splitlines() if " dot(" in ln]
    assert len(convs) == 2 * 20 + 1  # both ResNet18 trunks and img_proj
    assert not any("operand_precision" in ln for ln in convs)
    assert len(dots) == 1 and "operand_precision={highest,highest}" in dots[0]
