"""Baseline maps: exact protocol scores on hand-made boxes."""

import numpy as np
import pytest

from sslocal import baselines, metrics


def box_gt(x0, y0, x1, y1, size=224):
    return metrics.gt_map(np.array([[x0, y0, x1, y1]]), "vggss", size)


def test_oracle_scores_box_over_half_the_frame():
    gt = box_gt(20, 30, 132, 142)  # 112 x 112: exactly 25% of the frame
    oracle = baselines.oracle_maps(gt[None])[0]
    pred = oracle >= np.sort(oracle.ravel())[224 * 224 // 2]
    assert pred[gt > 0].all()  # the whole box is predicted first
    expected = gt.sum() / (gt.sum() + np.sum(pred & (gt == 0)))
    got = metrics.ciou(oracle[None], gt[None])[0]
    assert got == pytest.approx(expected)
    assert 0.5 - 0.01 <= got <= 0.5 + 1e-9  # box / (half the frame, plus distance ties)


def test_plain_box_map_would_predict_everything():
    """Why the oracle ranks the outside by distance: a 0/1 map ties below the median."""
    gt = box_gt(20, 30, 132, 142)
    assert metrics.ciou(gt[None], gt[None])[0] == pytest.approx(0.25)


def test_center_prior_predicts_the_central_disk():
    center = baselines.center_map()
    pred = center >= np.sort(center.ravel())[224 * 224 // 2]
    yy, xx = np.mgrid[:224, :224] - 111.5
    radius = np.sqrt(yy**2 + xx**2)
    assert radius[pred].max() < radius[~pred].min() + 1e-9
    assert abs(pred.mean() - 0.5) < 0.01
    centred = box_gt(56, 56, 168, 168)  # a centred 25% box lies inside the disk
    assert metrics.ciou(center[None], centred[None])[0] == pytest.approx(
        centred.sum() / pred.sum())


def test_random_map_is_seeded_and_uniform():
    gt = np.zeros((2, 224, 224))
    a = baselines.baseline_maps("random", gt, np.random.default_rng(0))
    b = baselines.baseline_maps("random", gt, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert 0.49 < a.mean() < 0.51
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.baseline_maps("median", gt, np.random.default_rng(0))


def test_gap_closed():
    assert baselines.gap_closed(0.8, 0.3, 1.0) == pytest.approx(5 / 7)
    assert baselines.gap_closed(0.3, 0.3, 1.0) == 0.0
