"""Metrics: hand-made cases with known answers, and an independent per-sample float64 numpy
implementation of the reference protocol (EZ-VSL's evaluator) on random maps and the real
VGG-SS boxes."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from sslocal import metrics

S = 224
HALF = S * S // 2  # 25,088

# ------------------------------------------------ the reference protocol, one sample at a time


def ref_gt(boxes, fmt, size=S):
    gt = np.zeros((size, size))
    for xmin, ymin, xmax, ymax in boxes:
        temp = np.zeros((size, size))
        temp[ymin:ymax, xmin:xmax] = 1
        gt += temp
    if fmt == "flickr":
        gt /= 2
        gt[gt > 1] = 1
    else:
        gt[gt > 0] = 1
    return gt


def ref_vggss_pixels(box):
    return [int(224 * max(v, 0)) for v in box]  # the reference's conversion (no value > 1)


def ref_ciou(pred, gt, threshold="median_ge"):
    pred = np.asarray(pred)
    if isinstance(threshold, str):
        thr = np.sort(pred.flatten())[int(pred.shape[0] * pred.shape[1] / 2)]
    else:
        thr = threshold
    infer = np.zeros(pred.shape)
    infer[(pred > thr) if threshold == "median_gt" else (pred >= thr)] = 1
    return np.sum(infer * gt) / (np.sum(gt) + np.sum(infer * (gt == 0)))


def ref_auc(cious):
    sk = pytest.importorskip("sklearn.metrics")
    cious = np.asarray(cious)
    success = [np.sum(cious >= 0.05 * i) / len(cious) for i in range(21)]
    return sk.auc([0.05 * i for i in range(21)], success)


def vggss_json():
    here = Path(metrics.__file__).parent / "data" / "metadata" / "vggss.json"
    for p in (here, Path("/work/shared/metadata/vggss.json")):
        if p.exists():
            return json.loads(p.read_text())
    pytest.skip("vggss.json not found")


# ---------------------------------------------------------------------- ground-truth maps


def test_flickr_consensus_weights():
    boxes = [(0, 0, 4, 4), (2, 2, 6, 6)]  # two annotators overlapping on [2:4, 2:4]
    expect = np.zeros((8, 8))
    expect[0:4, 0:4] = 0.5
    expect[2:6, 2:6] = 0.5
    expect[2:4, 2:4] = 1.0
    np.testing.assert_array_equal(metrics.gt_map(boxes, "flickr", size=8), expect)
    # Three annotators agreeing: 3 / 2 is capped at 1.
    np.testing.assert_array_equal(
        metrics.gt_map([(1, 1, 3, 3)] * 3, "flickr", size=4), np.pad(np.ones((2, 2)), 1)
    )


def test_vggss_union_is_binary():
    got = metrics.gt_map(np.array([[0, 0, 4, 4], [2, 2, 6, 6]], np.float32), "vggss", size=8)
    expect = np.zeros((8, 8))
    expect[0:4, 0:4] = 1
    expect[2:6, 2:6] = 1
    np.testing.assert_array_equal(got, expect)
    assert got.dtype == np.float32


def test_box_end_is_exclusive_and_floats_truncate():
    got = metrics.gt_map([(1.9, 2.7, 3.2, 4.99)], "vggss", size=6)  # -> (1, 2, 3, 4)
    assert np.argwhere(got).tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]


def test_normalized_to_pixels_clips_the_corrupt_coordinate():
    # vggss.json entry MKC9LvRivTM_000030: its only box has xmax = -2.88e16.
    box = [[0.396875, 0.6625, -2.8823037615171176e16, 0.984375]]
    px = metrics.normalized_to_pixels(box)
    # 0.396875 * 224 = 88.9, 0.6625 * 224 = 148.4, 0.984375 * 224 = 220.5
    np.testing.assert_array_equal(px, [[88, 148, 0, 220]])
    gt = metrics.gt_map(px, "vggss")
    assert gt.sum() == 0  # xmax 0 < xmin: empty box
    # cIoU of any prediction against an empty gt is 0.
    pred = np.random.default_rng(0).uniform(size=(1, S, S))
    assert metrics.ciou(pred, gt[None])[0] == 0.0
    np.testing.assert_array_equal(
        metrics.normalized_to_pixels([[1.2, -0.1, 0.5, 1.0]]), [[224, 0, 112, 224]]
    )


def test_gt_maps_batches_ragged_box_lists():
    lists = [[(0, 0, 3, 3)], [], [(1, 1, 2, 2), (0, 0, 1, 4), (3, 0, 4, 1)]]
    for fmt in metrics.GT_FORMATS:
        got = metrics.gt_maps(lists, fmt, size=4)
        assert got.shape == (3, 4, 4)
        for g, b in zip(got, lists, strict=True):
            np.testing.assert_array_equal(g, ref_gt(b, fmt, size=4))


# -------------------------------------------------------------------------- cIoU: by hand


def test_perfect_map():
    box = [(0, 0, 112, 224)]  # left half: exactly the S*S/2 pixels above the median
    gt = metrics.gt_map(box, "vggss")
    assert metrics.ciou(gt[None], gt[None])[0] == 1.0
    # Any box with a fixed threshold below the box value.
    gt = metrics.gt_map([(30, 40, 90, 200)], "vggss")
    assert metrics.ciou(gt[None], gt[None], threshold=0.5)[0] == 1.0


def test_box_covering_the_image():
    gt = metrics.gt_map([(0, 0, 224, 224)], "vggss")
    ramp = np.arange(S * S, dtype=np.float64).reshape(1, S, S) / (S * S - 1)  # distinct values
    # Median threshold keeps exactly half the pixels: 25,088 / 50,176.
    assert metrics.ciou(ramp, gt[None])[0] == 0.5
    assert metrics.ciou(np.ones((1, S, S)), gt[None])[0] == 1.0  # constant map: all predicted


def test_median_index_and_ge_versus_gt():
    ramp = np.arange(S * S, dtype=np.float64).reshape(1, S, S)
    gt = np.zeros((1, S, S))
    gt[0].flat[HALF] = 1.0  # only the pixel holding the threshold value
    # >= includes the threshold pixel: 1 / (1 + 25,087 other predicted pixels).
    assert metrics.ciou(ramp, gt)[0] == 1.0 / HALF
    # > excludes it: no overlap.
    assert metrics.ciou(ramp, gt, threshold="median_gt")[0] == 0.0


def test_empty_prediction():
    gt = metrics.gt_map([(10, 10, 50, 50)], "vggss")[None]
    maps = np.random.default_rng(1).uniform(size=(1, S, S))
    assert metrics.ciou(maps, gt, threshold=2.0)[0] == 0.0  # nothing reaches 2
    binary = np.ones((1, S, S))
    binary[0, :10] = 0  # median value 1: nothing is > 1
    assert metrics.ciou(binary, gt, threshold="median_gt")[0] == 0.0
    # Empty gt and empty prediction: 0 / 0 is defined as 0.
    assert metrics.ciou(maps, np.zeros((1, S, S)), threshold=2.0)[0] == 0.0


def test_flickr_half_weighted_pixels_count_half():
    # Annotators: A = left half, B = top-left quarter. gt = 1 on the quarter, 0.5 elsewhere in
    # the left half. Prediction = left half (perfect map of A).
    gt = metrics.gt_map([(0, 0, 112, 224), (0, 0, 112, 112)], "flickr")
    assert set(np.unique(gt)) == {0.0, 0.5, 1.0}
    pred = (np.arange(S)[None, :] < 112).astype(np.float32) * np.ones((S, 1))
    # inter = 112*112*1 + 112*112*0.5, sum(gt) the same, no false positive pixel -> 1.
    assert metrics.ciou(pred[None], gt[None])[0] == 1.0
    # Prediction = right half: inter 0.
    assert metrics.ciou(1 - pred[None], gt[None])[0] == 0.0
    # Prediction = top half: inter 112*112 (1.0) + 0, sum(gt) = 1.5 * 112 * 112,
    # false positives = the top-right quarter, 112 * 112 -> 1 / 2.5.
    top = (np.arange(S)[:, None] < 112) * np.ones((1, S))
    assert metrics.ciou(top[None], gt[None])[0] == pytest.approx(1 / 2.5, rel=1e-15)


# ------------------------------------------------------------------------ summary and AUC


def test_summary_all_ones_and_all_zeros():
    s = metrics.summarize(np.ones(7))
    assert s == {"cIoU": 1.0, "AUC": 1.0, "mean_cIoU": 1.0, "N": 7}
    s = metrics.summarize(np.zeros(4))
    # success(0) = 1 (cIoU >= 0 always), 0 beyond: one triangle, 0.05 * 1 / 2.
    assert s["cIoU"] == 0.0 and s["mean_cIoU"] == 0.0 and s["N"] == 4
    assert s["AUC"] == pytest.approx(0.025, abs=1e-15)
    t, frac = metrics.success_curve([0.0, 1.0])
    np.testing.assert_array_equal(t, np.linspace(0, 1, 21))
    np.testing.assert_array_equal(frac, [1.0] + [0.5] * 20)
    # First trapezoid 0.05 * (1 + 0.5) / 2, then 19 of 0.05 * 0.5.
    assert metrics.summarize([0.0, 1.0])["AUC"] == pytest.approx(0.0375 + 0.475, abs=1e-15)


def test_summary_hand_case():
    c = [0.5, 0.49, 0.1, 0.8]
    s = metrics.summarize(c)
    assert s["cIoU"] == 0.5 and s["mean_cIoU"] == pytest.approx(1.89 / 4) and s["N"] == 4
    assert s["AUC"] == pytest.approx(ref_auc(c), abs=1e-15)


def test_auc_agrees_with_sklearn_on_random_cious():
    c = np.random.default_rng(2).beta(2, 3, size=1000)
    assert metrics.summarize(c)["AUC"] == pytest.approx(ref_auc(c), abs=1e-14)


# ------------------------------------------- against the per-sample reference, random + real


def _random_maps(rng, n, size=S):
    """Continuous maps and quantised ones (many ties at the median) in equal parts."""
    maps = rng.uniform(size=(n, size, size)).astype(np.float32)
    maps[::2] = np.round(maps[::2] * 8) / 8
    return maps


@pytest.mark.parametrize("threshold", ["median_ge", "median_gt", 0.4])
def test_against_reference_on_real_vggss_boxes(threshold):
    entries = vggss_json()
    rng = np.random.default_rng(3)
    corrupt = [e for e in entries if any(v < 0 for b in e["bbox"] for v in b)]
    assert len(corrupt) == 12
    pick = corrupt + [entries[i] for i in rng.choice(len(entries), 88, replace=False)]
    boxes = [metrics.normalized_to_pixels(e["bbox"]) for e in pick]
    for e, b in zip(pick, boxes, strict=True):
        assert b.tolist() == [ref_vggss_pixels(x) for x in e["bbox"]]
    gts = metrics.gt_maps(boxes, "vggss")
    maps = _random_maps(rng, len(pick))
    # Boost each map inside one box so that cIoU values spread over [0, 1].
    for m, b in zip(maps, boxes, strict=True):
        xmin, ymin, xmax, ymax = b[-1]
        m[ymin:ymax, xmin:xmax] += 1.0
    got = metrics.ciou(maps, gts, threshold=threshold)
    expect = [ref_ciou(m, ref_gt(b, "vggss"), threshold) for m, b in zip(maps, boxes, strict=True)]
    np.testing.assert_array_equal(got, expect)  # integer sums in float64: bit-identical
    s = metrics.summarize(got)
    assert s["cIoU"] == np.mean(np.asarray(expect) >= 0.5)
    assert s["AUC"] == pytest.approx(ref_auc(expect), abs=1e-14)
    assert 0.0 < s["cIoU"] < 1.0  # a distribution, not a corner case


def test_against_reference_on_random_flickr_annotations():
    rng = np.random.default_rng(4)
    boxes = []
    for _ in range(40):
        n = rng.integers(1, 6)
        lo = rng.integers(0, 150, size=(n, 2))
        hi = lo + rng.integers(1, 120, size=(n, 2))
        boxes.append(np.concatenate([lo, np.minimum(hi, 224)], axis=1))
    gts = metrics.gt_maps(boxes, "flickr")
    for g, b in zip(gts, boxes, strict=True):
        np.testing.assert_array_equal(g, ref_gt(b, "flickr"))
    maps = _random_maps(rng, 40)
    maps += gts  # correlated with the gt
    got = metrics.ciou(maps, gts)
    expect = [ref_ciou(m, ref_gt(b, "flickr")) for m, b in zip(maps, boxes, strict=True)]
    np.testing.assert_allclose(got, expect, rtol=1e-15)


def test_five_thousand_samples():
    entries = vggss_json()[:5000]
    t0 = time.perf_counter()
    gts = metrics.gt_maps([metrics.normalized_to_pixels(e["bbox"]) for e in entries], "vggss")
    t1 = time.perf_counter()
    maps = np.random.default_rng(5).random((5000, S, S), dtype=np.float32)
    t2 = time.perf_counter()
    c = metrics.ciou(maps, gts)
    s = metrics.summarize(c)
    t3 = time.perf_counter()
    print(f"5,000 samples: gt maps {t1 - t0:.2f} s, cIoU + summary {t3 - t2:.2f} s")
    assert c.shape == (5000,) and np.all((c >= 0) & (c <= 1)) and s["N"] == 5000


# ----------------------------------------------------------------------- extended (SLAVC)


def test_confidence_is_the_mean_of_the_top_quarter():
    raw = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    assert metrics.confidence(raw)[0] == 13.5  # mean of 12, 13, 14, 15
    maps = np.random.default_rng(6).normal(size=(5, 7, 9))
    expect = [np.sort(m.ravel())[::-1][: 63 // 4].mean() for m in maps]
    np.testing.assert_allclose(metrics.confidence(maps), expect, rtol=1e-12)


def test_extended_hand_case():
    # Ranked by confidence: TP (sounding, 0.6), FP (non-sounding), FP (sounding, 0.3), TP.
    out = metrics.extended_metrics(
        cious=[0.6, 0.9, 0.3, 0.7],
        confidences=[0.9, 0.8, 0.7, 0.6],
        sounding=[True, False, True, True],
    )
    # P = 1, 1/2, 1/3, 1/2; R = 1/3, 1/3, 1/3, 2/3 -> AP = 1/3 * 1 + 1/3 * 1/2 = 1/2.
    assert out["AP"] == pytest.approx(0.5, abs=1e-15)
    # F1 = 1/2, 2/5, 1/3, 4/7.
    assert out["max_F1"] == pytest.approx(4 / 7, abs=1e-15)
    np.testing.assert_allclose(out["precision"], [1, 1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(out["recall"], [1 / 3, 1 / 3, 1 / 3, 2 / 3])


def test_extended_ties_enter_together():
    out = metrics.extended_metrics([0.6, 0.2, 0.8], [0.9, 0.9, 0.5], [True, True, True])
    # Operating points: {0, 1}: P 1/2, R 1/3; all: P 2/3, R 2/3 -> AP 1/6 + 2/9.
    assert out["AP"] == pytest.approx(7 / 18, abs=1e-15)
    np.testing.assert_allclose(out["thresholds"], [0.9, 0.5])
    perfect = metrics.extended_metrics([0.9, 0.9, 0.0], [3.0, 2.0, 1.0], [True, True, False])
    assert perfect["AP"] == 1.0 and perfect["max_F1"] == 1.0


def test_extended_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    n = 500
    c = rng.uniform(size=n)
    conf = np.round(rng.normal(size=n) + 2 * (c > 0.5), 1)  # informative, with ties
    snd = rng.uniform(size=n) < 0.8
    out = metrics.extended_metrics(c, conf, snd)
    tp = snd & (c >= 0.5)
    # sklearn's recall is over all positives (= TPs here); ours over the sounding samples.
    scale = tp.sum() / snd.sum()
    assert out["AP"] == pytest.approx(sk.average_precision_score(tp, conf) * scale, rel=1e-12)
    p, r, _ = sk.precision_recall_curve(tp, conf)
    r = r * scale
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    assert out["max_F1"] == pytest.approx(f1.max(), rel=1e-12)


# ---------------------------------------------------------------------- variants and errors


def test_protocol_variant_is_json():
    d = json.loads(json.dumps(metrics.PROTOCOL_VARIANT))
    assert d["prediction_threshold"] == "median_ge" and d["upsample"] == "bilinear_align_corners"
    assert metrics.protocol_variant(threshold=0.3)["threshold_rule"] == "map >= 0.3"


def test_bad_input():
    with pytest.raises(ValueError, match="unknown gt format 'coco'"):
        metrics.gt_map([(0, 0, 1, 1)], "coco")
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        metrics.gt_map([(0, 0, 1)], "vggss")
    with pytest.raises(ValueError, match="negative"):
        metrics.gt_map([(-3, 0, 1, 1)], "vggss")
    with pytest.raises(ValueError, match="non-finite"):
        metrics.gt_map([(0, np.nan, 1, 1)], "vggss")
    with pytest.raises(ValueError, match="unknown threshold 'mean'"):
        metrics.ciou(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), threshold="mean")
    with pytest.raises(ValueError, match="same shape"):
        metrics.ciou(np.zeros((1, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.ciou(np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="no cIoU"):
        metrics.summarize([])
    with pytest.raises(ValueError, match="lengths differ"):
        metrics.extended_metrics([0.5], [0.1, 0.2], [True])
    with pytest.raises(ValueError, match="no sounding"):
        metrics.extended_metrics([0.5], [0.1], [False])
