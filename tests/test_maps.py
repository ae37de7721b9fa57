"""The map maths: similarity and diagonal map against numpy, upsampling against
torch.nn.functional.interpolate and float64 numpy references, the precision of every product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslocal import localization, maps
from sslocal.models.av_model import l2_normalize

# ---------------------------------------------------------------- float64 numpy references


def ref_bilinear_align_corners(x, size):
    """Per output pixel: source coordinate i * (n - 1) / (size - 1), four neighbours."""
    B, h, w = x.shape
    sy = np.arange(size) * (h - 1) / (size - 1)
    sx = np.arange(size) * (w - 1) / (size - 1)
    y0 = np.floor(sy).astype(int)
    x0 = np.floor(sx).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    ly, lx = (sy - y0)[:, None], (sx - x0)[None, :]
    Y0, Y1, X0, X1 = y0[:, None], y1[:, None], x0[None, :], x1[None, :]
    out = np.empty((B, size, size))
    for b in range(B):
        m = x[b].astype(np.float64)
        out[b] = (
            (1 - ly) * (1 - lx) * m[Y0, X0]
            + (1 - ly) * lx * m[Y0, X1]
            + ly * (1 - lx) * m[Y1, X0]
            + ly * lx * m[Y1, X1]
        )
    return out


def ref_minmax(x):
    out = np.array(x, dtype=np.float64)
    for b in range(len(out)):
        lo, hi = out[b].min(), out[b].max()
        if hi > lo:
            out[b] = (out[b] - lo) / (hi - lo)
    return out


def torch_resize(x, size, mode, align_corners):
    torch = pytest.importorskip("torch")
    t = torch.tensor(np.asarray(x, np.float32))[:, None]
    out = torch.nn.functional.interpolate(
        t, size=(size, size), mode=mode, align_corners=align_corners
    )
    return out[:, 0].numpy()


TORCH_MODES = {
    "bilinear_align_corners": ("bilinear", True),
    "bilinear": ("bilinear", False),
    "bicubic": ("bicubic", False),
    "bicubic_align_corners": ("bicubic", True),  # SLAVC's evaluation
}

# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("upsample", list(TORCH_MODES))
@pytest.mark.parametrize("shape,size", [((3, 7, 7), 224), ((2, 5, 3), 33), ((1, 2, 2), 9)])
def test_upsample_matches_torch(upsample, shape, size):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    expect = torch_resize(x, size, *TORCH_MODES[upsample])
    got = np.asarray(maps.upsample_maps(x, size, upsample))
    assert got.shape == (shape[0], size, size) and got.dtype == np.float32
    # torch rounds its source coordinates in float32: ~1e-6 differences on values ~1.
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_upsample_matches_float64_bilinear():
    x = np.random.default_rng(1).uniform(-1, 1, size=(4, 7, 7))
    got = np.asarray(maps.upsample_maps(x, 224))
    np.testing.assert_allclose(got, ref_bilinear_align_corners(x, 224), rtol=1e-5, atol=1e-6)
    # align_corners=True keeps the corner values exactly.
    np.testing.assert_array_equal(got[:, ::223, ::223], x[:, ::6, ::6].astype(np.float32))


def test_av_map_matches_torch_then_minmax():
    alpha = np.random.default_rng(2).uniform(-0.5, 0.9, size=(5, 7, 7)).astype(np.float32)
    got = np.asarray(jax.jit(maps.av_map)(alpha))
    expect = ref_minmax(torch_resize(alpha, 224, "bilinear", True))
    np.testing.assert_allclose(got, expect, atol=1e-5)
    assert got.shape == (5, 224, 224)
    np.testing.assert_allclose(got.reshape(5, -1).min(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(got.reshape(5, -1).max(1), 1.0, atol=1e-6)
    expect64 = ref_minmax(ref_bilinear_align_corners(alpha, 224))
    np.testing.assert_allclose(got, expect64, atol=1e-5)


def test_minmax_normalize_per_sample_and_constant_maps():
    x = np.stack(
        [
            np.arange(16, dtype=np.float32).reshape(4, 4),  # 0..15 -> k / 15
            np.full((4, 4), 0.3, np.float32),  # constant: kept as it is
            np.full((4, 4), -2.0, np.float32),
        ]
    )
    got = np.asarray(maps.minmax_normalize(x))
    np.testing.assert_allclose(got[0], np.arange(16).reshape(4, 4) / 15, rtol=1e-6)
    np.testing.assert_array_equal(got[1], x[1])
    np.testing.assert_array_equal(got[2], x[2])
    # No NaN in the gradient either (the unused branch of where divides safely).
    g = jax.grad(lambda m: jnp.sum(maps.minmax_normalize(m) ** 2))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("upsample", list(TORCH_MODES))
def test_constant_map_stays_constant_through_av_map(upsample):
    # Upsampling 0.3 in float32 leaves ulp noise (torch's too); min-max must not stretch it.
    alpha = np.stack(
        [
            np.full((7, 7), 0.3, np.float32),
            np.random.default_rng(3).normal(size=(7, 7)).astype(np.float32),
        ]
    )
    got = np.asarray(maps.av_map(alpha, upsample=upsample))
    np.testing.assert_array_equal(got[0], np.float32(0.3))
    assert got[1].min() == pytest.approx(0.0, abs=1e-6) and got[1].max() == pytest.approx(1.0)


def test_object_map_against_numpy_and_torch():
    feats = np.random.default_rng(4).normal(size=(3, 7, 7, 16)).astype(np.float32)
    reduced = np.abs(feats.astype(np.float64)).mean(axis=-1)
    got = np.asarray(jax.jit(maps.object_map)(feats))
    np.testing.assert_allclose(got, ref_minmax(ref_bilinear_align_corners(reduced, 224)), atol=1e-5)
    np.testing.assert_allclose(
        got, ref_minmax(torch_resize(reduced, 224, "bilinear", True)), atol=1e-5
    )


@pytest.mark.parametrize("alpha", [0.4, 0.0, 1.0, 0.7])
def test_fuse_ogl_against_numpy(alpha):
    rng = np.random.default_rng(5)
    av = rng.uniform(size=(3, 16, 16)).astype(np.float32)
    obj = rng.uniform(size=(3, 16, 16)).astype(np.float32)
    got = np.asarray(maps.fuse_ogl(av, obj, alpha=alpha))
    expect = ref_minmax(alpha * av.astype(np.float64) + (1 - alpha) * obj.astype(np.float64))
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_default_ogl_alpha_is_0_4():
    av = np.array([[[0.0, 1.0], [0.5, 0.5]]], np.float32)
    obj = np.array([[[1.0, 0.0], [0.5, 0.0]]], np.float32)
    # 0.4 av + 0.6 obj = [[0.6, 0.4], [0.5, 0.2]] -> min-max over [0.2, 0.6].
    expect = np.array([[[1.0, 0.5], [0.75, 0.0]]])
    np.testing.assert_allclose(np.asarray(maps.fuse_ogl(av, obj)), expect, atol=1e-6)


def test_bicubic_align_corners_keeps_corners_and_passes_through_the_input_grid():
    x = np.random.default_rng(6).normal(size=(2, 7, 7))
    got = np.asarray(maps.upsample_maps(x, 223, "bicubic_align_corners"))  # 222 / 6 = 37
    # Source coordinate i * 6 / 222: every 37th output pixel sits on an input pixel, where the
    # cubic's weights are (0, 1, 0, 0).
    np.testing.assert_allclose(got[:, ::37, ::37], x, rtol=1e-6, atol=1e-6)
    w = maps.interpolation_matrix(7, 223, "bicubic_align_corners")
    np.testing.assert_array_equal(w[::37], np.eye(7, dtype=np.float32))


def ref_slavc_fusion(V, A, feats, alpha, tau, size):
    """stoneMo/SLAVC test.py in torch float64: Savl = <V, A> / tau and the object map
    (mean |features|), both F.interpolate(bicubic, align_corners=True); scores_av =
    (Savl - (-1 / tau)) / (2 / tau), scores_obj = (obj - 0) / 2.5; alpha * av + (1 - alpha) *
    obj, not normalised."""
    torch = pytest.importorskip("torch")
    v = torch.tensor(np.asarray(V, np.float64)).permute(0, 3, 1, 2)
    a = torch.tensor(np.asarray(A, np.float64))
    heatmap = (torch.einsum("nchw,nc->nhw", v, a) / tau).unsqueeze(1)
    heatmap = torch.nn.functional.interpolate(heatmap, size=(size, size), mode="bicubic",
                                              align_corners=True)[:, 0].numpy()
    obj = torch.tensor(np.asarray(feats, np.float64)).permute(0, 3, 1, 2).abs().mean(1)
    obj = torch.nn.functional.interpolate(obj.unsqueeze(1), size=(size, size), mode="bicubic",
                                          align_corners=True)[:, 0].numpy()

    def min_max_norm(x, xmin, xmax):
        return (x - xmin) / (xmax - xmin)

    scores_av = min_max_norm(heatmap, -1.0 / tau, 1.0 / tau)
    scores_obj = min_max_norm(obj, 0.0, 2.5)
    return scores_av * alpha + scores_obj * (1 - alpha)


@pytest.mark.parametrize("alpha", [0.9, 0.4])
def test_slavc_ogl_fusion_against_slavcs_code(alpha):
    rng = np.random.default_rng(7)
    V = l2_normalize(jnp.asarray(rng.normal(size=(3, 7, 7, 8)), jnp.float32))
    A = l2_normalize(jnp.asarray(rng.normal(size=(3, 8)), jnp.float32))
    feats = jnp.asarray(np.abs(rng.normal(size=(3, 7, 7, 16))) * 2, jnp.float32)
    out = maps.localization_maps(V, A, upsample="bicubic_align_corners",
                                 object_features=feats, ogl_alpha=alpha, ogl_fusion="slavc")
    for tau in (0.03, 0.07):  # SLAVC's ranges scale with tau: the scores do not
        expect = ref_slavc_fusion(V, A, feats, alpha, tau, 224)
        np.testing.assert_allclose(out["ogl"], expect, atol=2e-6)
    # The public pieces composed; the AV map is min-max normalised as always.
    np.testing.assert_allclose(out["ogl"], maps.fuse_ogl_fixed_range(
        out["raw"], maps.object_scores(feats, 224, "bicubic_align_corners"), alpha), atol=1e-7)
    np.testing.assert_allclose(out["av"], maps.av_map(maps.diagonal_map(V, A),
                                                      upsample="bicubic_align_corners"))
    # Not min-max normalised: the fixed ranges are kept (min > 0 here, max < 1).
    assert float(np.min(out["ogl"])) > 0.0 and float(np.max(out["ogl"])) < 1.0
    # The default stays EZ-VSL's min-max fusion.
    default = maps.localization_maps(V, A, upsample="bicubic_align_corners",
                                     object_features=feats, ogl_alpha=alpha)
    np.testing.assert_allclose(default["ogl"], maps.fuse_ogl(
        default["av"], maps.object_map(feats, 224, "bicubic_align_corners"), alpha), atol=1e-6)


def test_fuse_ogl_fixed_range_by_hand():
    raw = np.array([[[-1.0, 1.0], [0.0, 0.5]]], np.float32)  # cosines -> (raw + 1) / 2
    obj = np.array([[[0.0, 2.5], [1.25, 5.0]]], np.float32)  # -> obj / 2.5
    # 0.9 * [[0, 1], [0.5, 0.75]] + 0.1 * [[0, 1], [0.5, 2]]
    expect = np.array([[[0.0, 1.0], [0.5, 0.875]]])
    np.testing.assert_allclose(maps.fuse_ogl_fixed_range(raw, obj, 0.9), expect, atol=1e-7)
    with pytest.raises(ValueError, match="differ in shape"):
        maps.fuse_ogl_fixed_range(raw, obj[..., :1], 0.9)
    with pytest.raises(ValueError, match="unknown OGL fusion 'max'"):
        maps.localization_maps(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 3)), ogl_fusion="max")


def test_interpolation_matrix_rows_sum_to_one():
    for method in maps.UPSAMPLE_METHODS:
        w = maps.interpolation_matrix(7, 224, method)
        assert w.shape == (224, 7)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown upsample method 'nearest'"):
        maps.av_map(np.zeros((1, 7, 7)), upsample="nearest")
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        maps.av_map(np.zeros((7, 7)))
    with pytest.raises(ValueError, match=r"\(B, h, w, C\)"):
        maps.object_map(np.zeros((1, 7, 7)))
    with pytest.raises(ValueError, match="differ in shape"):
        maps.fuse_ogl(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))


# ------------------------------------------------------------- similarity, diagonal map


def test_similarity_against_numpy():
    rng = np.random.default_rng(0)
    V = rng.normal(size=(3, 4, 5, 6))
    A = rng.normal(size=(3, 6))
    expected = np.zeros((3, 3, 4, 5))
    for i in range(3):
        for j in range(3):
            expected[i, j] = (V[i] * A[j]).sum(-1)
    alpha = maps.similarity(jnp.asarray(V, jnp.float32), jnp.asarray(A, jnp.float32))
    assert alpha.shape == (3, 3, 4, 5) and alpha.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(alpha), expected, rtol=1e-5, atol=1e-5)
    diag = maps.diagonal_map(jnp.asarray(V, jnp.float32), jnp.asarray(A, jnp.float32))
    assert diag.shape == (3, 4, 5) and diag.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(diag), np.einsum("ihwd,id->ihw", V, A), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(diag), expected[np.arange(3), np.arange(3)], atol=1e-5)


def test_similarity_hand_made():
    """Cosines of one-hot vectors are exact; bfloat16 inputs still give float32 maps."""
    V = np.zeros((2, 1, 2, 3), np.float32)
    V[0, 0, 0, 0] = V[0, 0, 1, 1] = V[1, 0, 0, 2] = 1.0
    V[1, 0, 1, 0] = -1.0
    A = np.eye(3, dtype=np.float32)[:2]  # A_0 = e0, A_1 = e1
    alpha = maps.similarity(jnp.asarray(V, jnp.bfloat16), jnp.asarray(A, jnp.bfloat16))
    assert alpha.dtype == jnp.float32
    expected = np.array([[[[1, 0]], [[0, 1]]], [[[0, -1]], [[0, 0]]]], np.float32)
    np.testing.assert_array_equal(np.asarray(alpha), expected)
    diag = maps.diagonal_map(jnp.asarray(V), jnp.asarray(A))
    np.testing.assert_array_equal(np.asarray(diag), [[[1, 0]], [[0, 0]]])


def test_similarity_on_explicit_mesh():
    """With batch-sharded V and A on an Explicit mesh the B x B map needs an out_sharding."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("data",))
    rng = np.random.default_rng(1)
    V = l2_normalize(jnp.asarray(rng.normal(size=(2 * n, 2, 3, 5)), jnp.float32))
    A = l2_normalize(jnp.asarray(rng.normal(size=(2 * n, 5)), jnp.float32))
    Vs = jax.device_put(V, NamedSharding(mesh, P("data")))
    As = jax.device_put(A, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        alpha = jax.jit(lambda v, a: maps.similarity(v, a, out_sharding=P("data", None)))(Vs, As)
        diag = jax.jit(maps.diagonal_map)(Vs, As)
    assert alpha.sharding.spec[:2] == ("data", None)
    np.testing.assert_allclose(np.asarray(alpha), np.asarray(maps.similarity(V, A)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(diag), np.asarray(maps.diagonal_map(V, A)), atol=1e-6)


def test_localization_is_the_old_name_of_maps():
    assert localization.av_map is maps.av_map and localization.fuse_ogl is maps.fuse_ogl


def _dot_precisions(fn, *args) -> list[str]:
    """The precision config of every dot / convolution of fn's lowered HLO."""
    hlo = jax.jit(fn).lower(*args).as_text(dialect="hlo")
    lines = [ln for ln in hlo.splitlines() if " dot(" in ln or " convolution(" in ln]
    assert lines, "no matrix product in the program"
    return [ln.split("operand_precision={")[1].split("}")[0] if "operand_precision" in ln
            else "default" for ln in lines]


def test_every_product_of_the_map_maths_runs_at_highest_precision():
    """The lowered programs carry HIGHEST on every product (TF32 would otherwise be allowed on a
    GPU), whatever the global default: the evaluation's maps and the losses' similarity."""
    V = jnp.zeros((2, 7, 7, 16), jnp.bfloat16)
    A = jnp.zeros((2, 16), jnp.bfloat16)
    feats = jnp.zeros((2, 7, 7, 32), jnp.float32)
    with jax.default_matmul_precision("default"):
        for fn in (lambda v, a: maps.localization_maps(v, a, object_features=feats),
                   lambda v, a: maps.localization_maps(
                       v, a, object_features=feats, upsample="bicubic_align_corners",
                       ogl_fusion="slavc"),
                   maps.similarity, maps.diagonal_map):
            assert set(_dot_precisions(fn, V, A)) == {"highest,highest"}
        plain = _dot_precisions(lambda v, a: jnp.einsum("ihwd,id->ihw", v, a), V, A)
        assert set(plain) == {"default"}  # the check above can fail


def test_localization_maps_are_the_public_functions_composed():
    rng = np.random.default_rng(3)
    V = l2_normalize(jnp.asarray(rng.normal(size=(3, 7, 7, 8)), jnp.float32))
    A = l2_normalize(jnp.asarray(rng.normal(size=(3, 8)), jnp.float32))
    feats = jnp.asarray(rng.normal(size=(3, 7, 7, 5)), jnp.float32)
    out = maps.localization_maps(V, A, size=56, object_features=feats, ogl_alpha=0.3)
    alpha = np.einsum("ihwd,id->ihw", np.asarray(V, np.float64), np.asarray(A, np.float64))
    np.testing.assert_allclose(out["raw"], ref_bilinear_align_corners(alpha, 56), atol=1e-5)
    np.testing.assert_allclose(out["av"], maps.av_map(maps.diagonal_map(V, A), 56), atol=1e-6)
    np.testing.assert_allclose(
        out["ogl"], maps.fuse_ogl(out["av"], maps.object_map(feats, 56), 0.3), atol=1e-6)


def test_join_heads_gives_the_mean_of_the_heads_maps():
    """SLAVC's map, (1/K) sum_k <V_ik, A_ik>, in float64 numpy, against alpha_ii of the joined
    unit vectors; the joined vectors are unit vectors."""
    rng = np.random.default_rng(5)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    for K in (2, 3):
        v = [unit(rng.normal(size=(3, 4, 5, 6))) for _ in range(K)]
        a = [unit(rng.normal(size=(3, 6))) for _ in range(K)]
        want = np.mean([np.einsum("ihwd,id->ihw", vk, ak) for vk, ak in zip(v, a, strict=True)],
                       axis=0)
        V, A = maps.join_heads(v), maps.join_heads(a)
        assert V.shape == (3, 4, 5, 6 * K) and A.shape == (3, 6 * K)
        np.testing.assert_allclose(np.asarray(maps.diagonal_map(V, A)), want, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(V, np.float64), axis=-1), 1.0,
                                   atol=1e-6)
    assert (maps.map_rule(1), maps.map_rule(2)) == ("cosine", "mean_of_heads")
    with pytest.raises(ValueError, match="one or more heads of one shape"):
        maps.join_heads([np.ones((2, 3)), np.ones((2, 4))])
