"""Losses against independent float64 numpy implementations, hand-made values, finite
differences, bfloat16 inputs and a batch-sharded mesh."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sslocal import losses

# ---------------------------------------------------------------- float64 numpy references


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logsumexp(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def _soft_mean(al, eps, beta, background=False):
    m = _sigmoid((al - eps) / beta)
    if background:
        m = 1.0 - m
    return (m * al).sum((-2, -1)) / m.sum((-2, -1))


def ref_marginnce(V, A, margin=-0.2, tau=0.07, epsilon=0.65, beta=0.03):
    al = np.einsum("ihwd,jd->ijhw", V, A)
    S = _soft_mean(al, epsilon, beta)
    B = len(S)
    total = 0.0
    for i in range(B):
        row = np.array([(S[i, j] - (margin if i == j else 0.0)) / tau for j in range(B)])
        total += _logsumexp(row) - row[i]
    return total / B


def ref_lvs(V, A, margin=0.0, tau=0.07, epsilon=0.65, epsilon2=0.4, beta=0.03):
    al = np.einsum("ihwd,jd->ijhw", V, A)
    S = _soft_mean(al, epsilon, beta)
    B = len(S)
    total = 0.0
    for i in range(B):
        neg = _soft_mean(al[i, i], epsilon2, beta, background=True)
        row = [S[i, i] - margin] + [S[i, j] for j in range(B) if j != i] + [neg]
        row = np.array(row) / tau
        total += _logsumexp(row) - row[0]
    return total / B


def ref_ezvsl(V, A, margin=0.0, tau=0.03):
    s = np.einsum("ihwd,jd->ijhw", V, A).max(axis=(2, 3))
    logits = (s - margin * np.eye(len(s))) / tau
    rows = np.mean([_logsumexp(logits[i]) - logits[i, i] for i in range(len(s))])
    cols = np.mean([_logsumexp(logits[:, i]) - logits[i, i] for i in range(len(s))])
    return rows + cols


REFS = {"marginnce": ref_marginnce, "lvs": ref_lvs, "ezvsl": ref_ezvsl}


def _unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def random_va(seed=0, B=6, h=3, w=3, D=8, coupling=1.5):
    """Unit V, A with A_i correlated to image i, so alpha spans the sigmoid's transition."""
    rng = np.random.default_rng(seed)
    V = _unit(rng.normal(size=(B, h, w, D)))
    A = _unit(coupling * V.mean(axis=(1, 2)) + rng.normal(size=(B, D)) / math.sqrt(D))
    return V, A


@functools.cache
def _jitted(name, grad, kw):
    fn = functools.partial(losses.get_loss(name), **dict(kw))
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)) if grad else fn)


def loss(name, V, A, **kw):
    """The loss, jitted once per (name, hyper-parameters): faster than eager on a busy CPU."""
    return _jitted(name, False, tuple(sorted(kw.items())))(V, A)


def value_and_grad(name, V, A, **kw):
    return _jitted(name, True, tuple(sorted(kw.items())))(V, A)


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["marginnce", "lvs", "ezvsl"])
@pytest.mark.parametrize("margin", [-0.2, 0.0, 0.3])
def test_against_float64_reference(name, margin):
    V, A = random_va(seed=1)
    al = np.einsum("ihwd,jd->ijhw", V, A)
    assert al.max() > 0.65 and al.min() < 0.4  # both sigmoid regimes are exercised
    got = loss(name, jnp.asarray(V, jnp.float32), jnp.asarray(A, jnp.float32), margin=margin)
    np.testing.assert_allclose(float(got), REFS[name](V, A, margin=margin), rtol=1e-5)


def test_non_default_hyper_parameters():
    V, A = random_va(seed=2, h=2, w=4)
    Vj, Aj = jnp.asarray(V, jnp.float32), jnp.asarray(A, jnp.float32)
    kw = dict(margin=0.1, tau=0.2, epsilon=0.5, beta=0.1)
    np.testing.assert_allclose(
        float(loss("marginnce", Vj, Aj, **kw)), ref_marginnce(V, A, **kw), rtol=1e-5
    )
    kw = dict(kw, epsilon2=0.3)
    np.testing.assert_allclose(float(loss("lvs", Vj, Aj, **kw)), ref_lvs(V, A, **kw), rtol=1e-5)
    np.testing.assert_allclose(
        float(loss("ezvsl", Vj, Aj, margin=-0.1, tau=0.1)),
        ref_ezvsl(V, A, margin=-0.1, tau=0.1),
        rtol=1e-5,
    )


def _hand_case():
    # B = 2, h = w = 1: every mask cancels, S_ij = N_i-style averages = alpha_ij.
    # alpha = [[1, 0.6], [0, 0.8]].
    V = jnp.array([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)
    A = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    return V, A


def test_hand_made_values():
    V, A = _hand_case()
    # marginnce, tau = 1, margin = 0: row 0 logits [1, 0.6], row 1 [0, 0.8].
    expect = 0.5 * (math.log1p(math.exp(-0.4)) + math.log1p(math.exp(-0.8)))
    assert float(loss("marginnce", V, A, margin=0.0, tau=1.0)) == pytest.approx(expect, rel=1e-6)
    # margin -0.2, tau 0.5: diagonals become 1.2 and 1.0.
    expect = 0.5 * (math.log1p(math.exp((0.6 - 1.2) / 0.5)) + math.log1p(math.exp(-1.0 / 0.5)))
    assert float(loss("marginnce", V, A, margin=-0.2, tau=0.5)) == pytest.approx(expect, rel=1e-6)
    # lvs, tau 1: rows [P - m, S_ij, N_i] = [1, 0.6, 1] and [0.8, 0, 0.8].
    expect = 0.5 * (math.log(2 + math.exp(-0.4)) + math.log(2 + math.exp(-0.8)))
    assert float(loss("lvs", V, A, tau=1.0)) == pytest.approx(expect, rel=1e-6)
    # ezvsl, tau 1: rows as marginnce, columns [1, 0] -> 0 and [0.6, 0.8] -> 1.
    rows = 0.5 * (math.log1p(math.exp(-0.4)) + math.log1p(math.exp(-0.8)))
    cols = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.2)))
    assert float(loss("ezvsl", V, A, tau=1.0)) == pytest.approx(rows + cols, rel=1e-6)


def test_zero_margin_is_plain_infonce():
    torch = pytest.importorskip("torch")
    V, A = random_va(seed=3)
    S = _soft_mean(np.einsum("ihwd,jd->ijhw", V, A), 0.65, 0.03)
    infonce = torch.nn.functional.cross_entropy(torch.tensor(S / 0.07), torch.arange(len(S)))
    got = loss("marginnce", jnp.asarray(V, jnp.float32), jnp.asarray(A, jnp.float32), margin=0.0)
    np.testing.assert_allclose(float(got), infonce.item(), rtol=1e-5)


@pytest.mark.parametrize("name", ["marginnce", "lvs", "ezvsl"])
def test_more_negative_margin_lowers_loss(name):
    V, A = random_va(seed=4)
    values = [float(loss(name, V, A, margin=m)) for m in (0.4, 0.2, 0.0, -0.2, -0.4)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values


@pytest.mark.parametrize("name", ["marginnce", "lvs", "ezvsl"])
def test_gradients_match_finite_differences(name):
    # jax's float32 gradient against central differences of the float64 numpy reference.
    V, A = random_va(seed=5, B=4, h=2, w=2, D=4)
    # ezvsl's max is not differentiable at ties; random data has none, and the step is small.
    kw = {"tau": 0.2} if name == "ezvsl" else {"tau": 0.2, "beta": 0.1}
    _, (gV, gA) = value_and_grad(
        name, jnp.asarray(V, jnp.float32), jnp.asarray(A, jnp.float32), **kw
    )
    ref = REFS[name]
    step = 1e-6
    for x, g, which in ((V, gV, 0), (A, gA, 1)):
        fd = np.zeros(x.size)
        for k in range(x.size):
            d = np.zeros(x.size)
            d[k] = step
            d = d.reshape(x.shape)
            args_p = (V + d, A) if which == 0 else (V, A + d)
            args_m = (V - d, A) if which == 0 else (V, A - d)
            fd[k] = (ref(*args_p, **kw) - ref(*args_m, **kw)) / (2 * step)
        np.testing.assert_allclose(np.asarray(g).reshape(-1), fd, rtol=1e-3, atol=1e-4)
        assert np.abs(fd).max() > 1e-2  # a non-trivial gradient was compared


@pytest.mark.parametrize("name", ["marginnce", "lvs", "ezvsl"])
def test_bfloat16_inputs_are_computed_in_float32(name):
    V, A = random_va(seed=6)
    Vb, Ab = jnp.asarray(V, jnp.bfloat16), jnp.asarray(A, jnp.bfloat16)
    value, (gV, gA) = value_and_grad(name, Vb, Ab)
    assert value.dtype == jnp.float32
    # The float64 loss of the bfloat16-rounded inputs to float32 accuracy: the cast comes
    # first (a bfloat16 computation would be off by ~1e-2).
    Vr, Ar = np.asarray(Vb, np.float64), np.asarray(Ab, np.float64)
    np.testing.assert_allclose(float(value), REFS[name](Vr, Ar), rtol=1e-5)
    assert gV.dtype == jnp.bfloat16 and gA.dtype == jnp.bfloat16
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(gV, np.float32)))
    assert np.all(np.isfinite(np.asarray(gA, np.float32)))


@pytest.mark.parametrize("name", ["marginnce", "lvs"])
def test_underflowing_mask_stays_exact(name):
    # epsilon = 8: every sigmoid((alpha - 8) / 0.03) <= exp(-233) underflows to 0 in float32, so
    # a plain sum(m_ij) is 0 (0 / 0). float64 still holds these values: compare with it.
    V, A = random_va(seed=7)
    value, grads = value_and_grad(
        name, jnp.asarray(V, jnp.float32), jnp.asarray(A, jnp.float32), epsilon=8.0
    )
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    np.testing.assert_allclose(float(value), REFS[name](V, A, epsilon=8.0), rtol=1e-5)


def test_lvs_background_mask_of_a_saturated_map():
    # alpha = 1 everywhere: 1 - sigmoid(60) is exactly 0 in float32; N_i must still be 1.
    V = jnp.ones((2, 2, 2, 1))
    A = jnp.ones((2, 1))
    value, grads = value_and_grad("lvs", V, A, beta=0.01)
    # Rows: [P - 0, S_ij, N_i] = [1, 1, 1] / tau -> log 3.
    assert float(value) == pytest.approx(math.log(3.0), rel=1e-6)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def _mesh8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake CPU) devices")
    return jax.make_mesh((8,), ("data",))


@pytest.mark.parametrize("name", ["marginnce", "lvs", "ezvsl"])
def test_batch_sharded_explicit_mesh_equals_unsharded(name):
    mesh = _mesh8()
    V, A = random_va(seed=8, B=16, h=2, w=2, D=8)
    fn = losses.get_loss(name)
    grad_fn = _jitted(name, True, ())
    value, grads = grad_fn(jnp.asarray(V, jnp.float32), jnp.asarray(A, jnp.float32))
    with jax.set_mesh(mesh):
        Vs = jax.device_put(jnp.asarray(V, jnp.float32), P("data"))
        As = jax.device_put(jnp.asarray(A, jnp.float32), P("data"))
        assert jax.typeof(Vs).sharding.spec[0] == "data"
        # Default: the B x B map takes V's batch sharding.
        v_auto, g_auto = grad_fn(Vs, As)
        # Explicit out_sharding, as a caller may pass it.
        v_expl = jax.jit(lambda v, a: fn(v, a, out_sharding=P("data", None)))(Vs, As)
    np.testing.assert_allclose(float(v_auto), float(value), rtol=1e-6)
    np.testing.assert_allclose(float(v_expl), float(value), rtol=1e-6)
    for g_s, g in zip(g_auto, grads, strict=True):
        # Float32 sums in another order: agreement to a small fraction of the gradient's scale.
        np.testing.assert_allclose(
            np.asarray(g_s), np.asarray(g), rtol=1e-4, atol=1e-5 * np.abs(np.asarray(g)).max()
        )


def test_auto_axes_mesh():
    _mesh8()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    V, A = random_va(seed=9, B=16, h=2, w=2, D=8)
    expect = float(loss("marginnce", jnp.asarray(V, jnp.float32), jnp.asarray(A, jnp.float32)))
    Vs = jax.device_put(jnp.asarray(V, jnp.float32), jax.NamedSharding(mesh, P("data")))
    As = jax.device_put(jnp.asarray(A, jnp.float32), jax.NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(float(jax.jit(losses.marginnce)(Vs, As)), expect, rtol=1e-6)


def test_similarity_layout():
    V, A = random_va(seed=10, B=3, h=2, w=3, D=4)
    al = losses.similarity(V, A)
    assert al.shape == (3, 3, 2, 3) and al.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(al)[2, 1, 1, 2], V[2, 1, 2] @ A[1], rtol=1e-6)


def test_registry_and_errors():
    assert set(losses.LOSSES) == {"marginnce", "lvs", "ezvsl"}
    assert losses.get_loss("lvs") is losses.lvs
    with pytest.raises(ValueError, match="unknown loss 'infonce'.*ezvsl"):
        losses.get_loss("infonce")
    with pytest.raises(ValueError, match="expected V"):
        losses.marginnce(jnp.ones((2, 4)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="expected V"):
        losses.marginnce(jnp.ones((2, 1, 1, 4)), jnp.ones((3, 4)))
    with pytest.raises(TypeError):
        losses.marginnce(jnp.ones((2, 1, 1, 4)), jnp.ones((2, 4)), -0.2)  # keyword-only
