"""The jitted train step: global-batch negatives on 8 devices, one compile, coupled-L2 Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from sslocal import losses, sharding, train


def tiny_config():
    """The tiny model with the paper's architecture (stride-32 map, unpooled spectrograms)."""
    config = tiny.get_config()
    config.model.image_stride, config.model.audio_pool = 32, 1
    config.batch_size = config.eval_batch_size = 16
    return config


def random_batch(seed: int, batch: int = 16, image: int = 64, spec=(65, 48)):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch, image, image, 3), np.uint8),
            "spec": rng.normal(-8, 3, size=(batch, *spec, 1)).astype(np.float16)}


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    tx = train.make_optimizer(config)
    return config, tx


def _grads(config, tx, mesh, batch):
    graphdef, state = train.create_train_state(config, mesh, tx)
    grad_fn = jax.jit(train.make_grad_fn(graphdef, train.loss_from_config(config)))
    loss, grads, stats = grad_fn(state.params, state.batch_stats, sharding.to_global(batch, mesh))
    return float(loss), jax.device_get(stats), jax.device_get(grads)


def test_loss_and_gradients_on_8_devices_equal_one_device(setup):
    config, tx = setup
    assert jax.device_count() >= 8
    batch = random_batch(0)
    loss1, stats1, grads1 = _grads(config, tx, sharding.make_mesh(1), batch)
    loss8, stats8, grads8 = _grads(config, tx, sharding.make_mesh(8), batch)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    # Equal up to float32 reduction order (sums over 8 shards vs one): 1e-4 of each tensor's scale.
    for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)) + 1e-7
    for a, b in zip(jax.tree.leaves(stats8), jax.tree.leaves(stats1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # global BatchNorm statistics

    # Negative control: the per-device loss (each shard's own 2 x 2 negatives) is different,
    # so the equality above really shows that the negatives are global.
    graphdef, state = train.create_train_state(config, sharding.make_mesh(1), tx)
    model = nnx.merge(graphdef, *jax.tree.map(jnp.array, (state.params, state.batch_stats)))
    V, A = model(jnp.asarray(batch["image"]), jnp.asarray(batch["spec"]))
    per_device = np.mean([float(losses.marginnce(V[i:i + 2], A[i:i + 2])) for i in range(0, 16, 2)])
    assert abs(per_device - loss1) > 1e-2


def test_step_compiles_once_keeps_params_replicated_and_loss_decreases(setup):
    config, tx = setup
    mesh = sharding.make_mesh(8)
    graphdef, state = train.create_train_state(config, mesh, tx)
    traces = []

    def counted_loss(V, A):
        traces.append(1)  # runs at trace time only
        return train.loss_from_config(config)(V, A)

    step = train.make_train_step(graphdef, tx, counted_loss, mesh)
    batch = sharding.to_global(random_batch(1), mesh)
    first = None
    for _ in range(4):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert len(traces) == 1
    assert int(state.step) == 4
    for leaf in jax.tree.leaves(state.params):
        assert leaf.sharding.is_fully_replicated
    assert float(metrics["loss"]) < first  # the same batch four times: it must fit it


def test_non_finite_batch_leaves_state_unchanged(setup):
    config, tx = setup
    mesh = sharding.make_mesh(8)
    graphdef, state = train.create_train_state(config, mesh, tx)
    step = train.make_train_step(graphdef, tx, train.loss_from_config(config), mesh)
    before = jax.device_get(state.params)
    bad = random_batch(2)
    bad["spec"][3, 5, 5, 0] = np.nan
    state, metrics = step(state, sharding.to_global(bad, mesh))
    assert not bool(metrics["finite"])
    assert int(state.step) == 0  # the whole state, step included, is the one before
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_optimizer_is_coupled_l2_adam():
    """One update by hand: g' = g + wd * p; Adam's first step with bias correction."""
    lr, wd, b1, b2, eps = 1e-4, 1e-4, 0.9, 0.999, 1e-8
    config = tiny_config()
    config.learning_rate, config.weight_decay = lr, wd
    tx = train.make_optimizer(config)
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5,)).astype(np.float64)
    g = rng.normal(size=(5,)).astype(np.float64)
    params, grads = {"w": jnp.asarray(p, jnp.float32)}, {"w": jnp.asarray(g, jnp.float32)}
    state = tx.init(params)
    expected = p.copy()
    m = v = np.zeros_like(p)
    for t in (1, 2):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        g_l2 = g + wd * expected
        m = b1 * m + (1 - b1) * g_l2
        v = b2 * v + (1 - b2) * g_l2**2
        expected = expected - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-6, atol=1e-9)
    # AdamW (decoupled) would differ: the decay is not scaled by Adam's normaliser.
    adamw = optax.adamw(lr, weight_decay=wd)
    w_state = adamw.init({"w": jnp.asarray(p)})
    w_updates, _ = adamw.update({"w": jnp.asarray(g)}, w_state, {"w": jnp.asarray(p)})
    coupled, _ = tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.asarray(p)}),
                           {"w": jnp.asarray(p)})
    assert not np.allclose(w_updates["w"], coupled["w"], rtol=1e-9, atol=0)


def test_constant_schedule_is_the_papers_optimizer():
    """lr_schedule "constant" (default.py) builds exactly the paper's Adam(weight_decay)."""
    from configs import default

    config = default.get_config()
    assert config.lr_schedule == "constant" and train.learning_rate(config) == 1e-4
    params = {"w": jnp.linspace(-1.0, 1.0, 7)}
    paper = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-4))
    ours = train.make_optimizer(config)
    a, b = paper.init(params), ours.init(params)
    for k in range(5):
        grads = {"w": jnp.sin(params["w"] * (k + 1))}
        ua, a = paper.update(grads, a, params)
        ub, b = ours.update(grads, b, params)
        np.testing.assert_array_equal(ua["w"], ub["w"])


def test_demo_schedule_decays_to_zero():
    from configs import synthetic
    from sslocal.data.builders import synthetic_av

    config = synthetic.get_config()
    num_train = synthetic_av.SPLIT_SIZES[config.train_dataset.split("/")[1]][0]
    total = config.num_epochs * (num_train // config.batch_size)
    warm = config.warmup_steps
    assert 0 < warm < total // 2
    schedule = train.learning_rate(config, total)
    rates = np.array([float(schedule(s)) for s in range(total + 1)])
    # float64 reference: linear warm-up from 0, then half a cosine down to 0 at the last step
    steps = np.arange(total + 1, dtype=np.float64)
    expected = np.where(steps < warm, config.learning_rate * steps / warm,
                        config.learning_rate * 0.5 * (1 + np.cos(
                            np.pi * np.clip(steps - warm, 0, None) / (total - warm))))
    np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-6 * config.learning_rate)
    assert rates[0] == 0.0 and rates[warm] == pytest.approx(config.learning_rate)
    assert np.all(np.diff(rates[warm:]) <= 0) and rates[-1] == pytest.approx(0.0, abs=1e-12)
    config.warmup_steps = 10
    warm = train.learning_rate(config, total)
    assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(config.learning_rate / 2)
    with pytest.raises(ValueError, match="more steps"):
        train.learning_rate(config, 10)
    config.lr_schedule = "step"
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        train.validate_config(config, sharding.make_mesh(1))
