"""Localization maps against torch.nn.functional.interpolate and float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslocal import localization as loc

# ---------------------------------------------------------------- float64 numpy references


def ref_bilinear_align_corners(maps, size):
    """Per output pixel: source coordinate i * (n - 1) / (size - 1), four neighbours."""
    B, h, w = maps.shape
    sy = np.arange(size) * (h - 1) / (size - 1)
    sx = np.arange(size) * (w - 1) / (size - 1)
    y0 = np.floor(sy).astype(int)
    x0 = np.floor(sx).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    ly, lx = (sy - y0)[:, None], (sx - x0)[None, :]
    Y0, Y1, X0, X1 = y0[:, None], y1[:, None], x0[None, :], x1[None, :]
    out = np.empty((B, size, size))
    for b in range(B):
        m = maps[b].astype(np.float64)
        out[b] = (
            (1 - ly) * (1 - lx) * m[Y0, X0]
            + (1 - ly) * lx * m[Y0, X1]
            + ly * (1 - lx) * m[Y1, X0]
            + ly * lx * m[Y1, X1]
        )
    return out


def ref_minmax(maps):
    out = np.array(maps, dtype=np.float64)
    for b in range(len(out)):
        lo, hi = out[b].min(), out[b].max()
        if hi > lo:
            out[b] = (out[b] - lo) / (hi - lo)
    return out


def torch_resize(maps, size, mode, align_corners):
    torch = pytest.importorskip("torch")
    t = torch.tensor(np.asarray(maps, np.float32))[:, None]
    out = torch.nn.functional.interpolate(
        t, size=(size, size), mode=mode, align_corners=align_corners
    )
    return out[:, 0].numpy()


TORCH_MODES = {
    "bilinear_align_corners": ("bilinear", True),
    "bilinear": ("bilinear", False),
    "bicubic": ("bicubic", False),
}

# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("upsample", list(TORCH_MODES))
@pytest.mark.parametrize("shape,size", [((3, 7, 7), 224), ((2, 5, 3), 33), ((1, 2, 2), 9)])
def test_upsample_matches_torch(upsample, shape, size):
    maps = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    expect = torch_resize(maps, size, *TORCH_MODES[upsample])
    got = np.asarray(loc.upsample_maps(maps, size, upsample))
    assert got.shape == (shape[0], size, size) and got.dtype == np.float32
    # torch rounds its source coordinates in float32: ~1e-6 differences on values ~1.
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_upsample_matches_float64_bilinear():
    maps = np.random.default_rng(1).uniform(-1, 1, size=(4, 7, 7))
    got = np.asarray(loc.upsample_maps(maps, 224))
    np.testing.assert_allclose(got, ref_bilinear_align_corners(maps, 224), rtol=1e-5, atol=1e-6)
    # align_corners=True keeps the corner values exactly.
    np.testing.assert_array_equal(got[:, ::223, ::223], maps[:, ::6, ::6].astype(np.float32))


def test_av_map_matches_torch_then_minmax():
    alpha = np.random.default_rng(2).uniform(-0.5, 0.9, size=(5, 7, 7)).astype(np.float32)
    got = np.asarray(jax.jit(loc.av_map)(alpha))
    expect = ref_minmax(torch_resize(alpha, 224, "bilinear", True))
    np.testing.assert_allclose(got, expect, atol=1e-5)
    assert got.shape == (5, 224, 224)
    np.testing.assert_allclose(got.reshape(5, -1).min(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(got.reshape(5, -1).max(1), 1.0, atol=1e-6)
    expect64 = ref_minmax(ref_bilinear_align_corners(alpha, 224))
    np.testing.assert_allclose(got, expect64, atol=1e-5)


def test_minmax_normalize_per_sample_and_constant_maps():
    maps = np.stack(
        [
            np.arange(16, dtype=np.float32).reshape(4, 4),  # 0..15 -> k / 15
            np.full((4, 4), 0.3, np.float32),  # constant: kept as it is
            np.full((4, 4), -2.0, np.float32),
        ]
    )
    got = np.asarray(loc.minmax_normalize(maps))
    np.testing.assert_allclose(got[0], np.arange(16).reshape(4, 4) / 15, rtol=1e-6)
    np.testing.assert_array_equal(got[1], maps[1])
    np.testing.assert_array_equal(got[2], maps[2])
    # No NaN in the gradient either (the unused branch of where divides safely).
    g = jax.grad(lambda m: jnp.sum(loc.minmax_normalize(m) ** 2))(jnp.asarray(maps))
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
    got = np.asarray(loc.av_map(alpha, upsample=upsample))
    np.testing.assert_array_equal(got[0], np.float32(0.3))
    assert got[1].min() == pytest.approx(0.0, abs=1e-6) and got[1].max() == pytest.approx(1.0)


def test_object_map_against_numpy_and_torch():
    feats = np.random.default_rng(4).normal(size=(3, 7, 7, 16)).astype(np.float32)
    reduced = np.abs(feats.astype(np.float64)).mean(axis=-1)
    got = np.asarray(jax.jit(loc.object_map)(feats))
    np.testing.assert_allclose(got, ref_minmax(ref_bilinear_align_corners(reduced, 224)), atol=1e-5)
    np.testing.assert_allclose(
        got, ref_minmax(torch_resize(reduced, 224, "bilinear", True)), atol=1e-5
    )


@pytest.mark.parametrize("alpha", [0.4, 0.0, 1.0, 0.7])
def test_fuse_ogl_against_numpy(alpha):
    rng = np.random.default_rng(5)
    av = rng.uniform(size=(3, 16, 16)).astype(np.float32)
    obj = rng.uniform(size=(3, 16, 16)).astype(np.float32)
    got = np.asarray(loc.fuse_ogl(av, obj, alpha=alpha))
    expect = ref_minmax(alpha * av.astype(np.float64) + (1 - alpha) * obj.astype(np.float64))
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_default_ogl_alpha_is_0_4():
    av = np.array([[[0.0, 1.0], [0.5, 0.5]]], np.float32)
    obj = np.array([[[1.0, 0.0], [0.5, 0.0]]], np.float32)
    # 0.4 av + 0.6 obj = [[0.6, 0.4], [0.5, 0.2]] -> min-max over [0.2, 0.6].
    expect = np.array([[[1.0, 0.5], [0.75, 0.0]]])
    np.testing.assert_allclose(np.asarray(loc.fuse_ogl(av, obj)), expect, atol=1e-6)


def test_interpolation_matrix_rows_sum_to_one():
    for method in loc.UPSAMPLE_METHODS:
        w = loc.interpolation_matrix(7, 224, method)
        assert w.shape == (224, 7)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown upsample method 'nearest'"):
        loc.av_map(np.zeros((1, 7, 7)), upsample="nearest")
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        loc.av_map(np.zeros((7, 7)))
    with pytest.raises(ValueError, match=r"\(B, h, w, C\)"):
        loc.object_map(np.zeros((1, 7, 7)))
    with pytest.raises(ValueError, match="differ in shape"):
        loc.fuse_ogl(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
