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


# ------------------------------------------- extended evaluation: SLAVC's evaluator, by hand

NAMES = ("AP@50", "AP@75", "maxF1@50", "maxF1@75", "Precision@50", "Precision@75", "AUC")


def check(result, expected):
    """result[subset][name] == expected[subset][name] (to 1e-12), and no other subset."""
    assert set(result) == set(expected)
    for subset, values in expected.items():
        for name, value in values.items():
            got = result[subset][name]
            if value is None:
                assert got is None, (subset, name)
            else:
                assert got == pytest.approx(value, abs=1e-12), (subset, name, got, value)


# Samples 1 and 4 are non-sounding; the sounding ones (0, 2, 3) have cIoU 0.62, 0.32, 0.72.
HAND = dict(cious=[0.62, 0.9, 0.32, 0.72, 0.8], confidences=[0.9, 0.8, 0.7, 0.6, 0.5],
            num_boxes=[1, 0, 2, 1, 0], areas=[500, 0, 5000, 20000, 0])


def test_extended_slavc_hand_case():
    r = metrics.extended_metrics(**HAND)  # variant="slavc" is the default
    # all, u = 0.5 (hits: samples 0, 3). AP thresholds: sorted conf minus the largest, top
    # down: 0.8, 0.7, 0.6, 0.5 (k = 1). TP / FP / FN there: 1/1/2, 1/2/1, 2/2/0, 2/3/0, so
    # P = 1/2, 1/3, 1/2, 2/5 and R = 1/3, 1/2, 1, 1; max from the right 1/2, 1/2, 1/2, 2/5;
    # AP = 1/2 (1/2 - 1/3) + 1/2 (1 - 1/2) + 1/2 * 0 = 1/3.
    # max-F1 over 0.5, 0.6, 0.7, 0.8, 0.9: 4/7, 2/3, 2/5, 2/5, 1/2 (at 0.9: P 1, R 1/3).
    # u = 0.75: no hit; P = 0 wherever something is detected -> AP 0, F1 0.
    # AUC of the cIoU 0.62, 0.32, 0.72: success 1 (7 points), 2/3 (6), 1/3 (2), 0 (6):
    # 0.05 * (7 + 4 + 2/3 - 1/2) = 67/120.
    auc = 67 / 120
    check(r, {
        "all": {"AP@50": 1 / 3, "AP@75": 0.0, "maxF1@50": 2 / 3, "maxF1@75": 0.0,
                "Precision@50": 2 / 5, "Precision@75": 0.0, "AUC": auc, "N": 5,
                "N_sounding": 3},
        # visible (0, 2, 3): thresholds 0.7, 0.6: P 1/2, 2/3, R 1/2, 1 -> AP 2/3 * 1/2.
        # F1 at 0.6, 0.7, 0.9: 4/5, 1/2, 1/2.
        "visible": {"AP@50": 1 / 3, "AP@75": 0.0, "maxF1@50": 4 / 5, "maxF1@75": 0.0,
                    "Precision@50": 2 / 3, "Precision@75": 0.0, "AUC": auc, "N": 3},
        # One sample each: no AP threshold (the only one is dropped) -> AP 0, as SLAVC's
        # code gives; F1 at its own confidence: detected, so P = R = 1 for a hit.
        "small": {"AP@50": 0.0, "maxF1@50": 1.0, "Precision@50": 1.0, "maxF1@75": 0.0,
                  "Precision@75": 0.0, "AUC": 0.05 * (13 - 0.5), "N": 1},  # cIoU 0.62
        "medium": {"AP@50": 0.0, "maxF1@50": 0.0, "Precision@50": 0.0,
                   "AUC": 0.05 * (7 - 0.5)},  # cIoU 0.32
        "large": {"AP@50": 0.0, "maxF1@50": 1.0, "Precision@50": 1.0,
                  "AUC": 0.05 * (15 - 0.5)},  # cIoU 0.72, area 20000 < 144^2
    })  # no huge sample: the subset is absent
    assert list(r["all"])[:7] == list(NAMES)
    assert list(r) == ["all", "visible", "small", "medium", "large"]


def test_extended_slavc_ties_in_confidence():
    # Two pairs tie at 0.9, two at 0.5; sample 3 is non-sounding.
    r = metrics.extended_metrics([0.6, 0.2, 0.8, 0.1], [0.9, 0.9, 0.5, 0.5], [1, 1, 1, 0])
    # AP thresholds 0.9, 0.5, 0.5 (a tie is used twice, adding zero width): P 1/2, 1/2, 1/2,
    # R 1/2, 1, 1 -> AP 1/4. F1 over 0.5, 0.5, 0.9, 0.9: 2/3, 2/3, 1/2, 1/2.
    # u = 0.75 (hit: sample 2 only): at 0.9 TP 0, FP 2, FN 1 -> P 0, R 0; at 0.5 TP 1, FP 3
    # -> P 1/4, R 1; AP = max(0, 1/4, 1/4) (1 - 0) = 1/4; F1 at 0.5: 2/5.
    check(r, {"all": {"AP@50": 1 / 4, "maxF1@50": 2 / 3, "Precision@50": 1 / 2,
                      "AP@75": 1 / 4, "maxF1@75": 2 / 5, "Precision@75": 1 / 4},
              "visible": {"N": 3}})  # areas not given: no size subsets
    curve = metrics.precision_recall_curve([0.6, 0.2, 0.8, 0.1], [0.9, 0.9, 0.5, 0.5],
                                           [1, 1, 1, 0])
    np.testing.assert_array_equal(curve["threshold"], [0.9, 0.5, 0.5])
    np.testing.assert_allclose(curve["precision"], [1 / 2, 1 / 2, 1 / 2], rtol=1e-15)
    np.testing.assert_allclose(curve["recall"], [1 / 2, 1, 1], rtol=1e-15)


def test_extended_all_non_sounding_and_all_sounding():
    silent = metrics.extended_metrics([0.0, 0.0, 0.0], [0.3, 0.1, 0.2], [0, 0, 0],
                                      [0.0, 0.0, 0.0])
    # Only "all": every detection a false positive, P = 0, R = 1 (no TP + FN); no AUC.
    check(silent, {"all": {"AP@50": 0.0, "AP@75": 0.0, "maxF1@50": 0.0, "maxF1@75": 0.0,
                           "Precision@50": 0.0, "Precision@75": 0.0, "AUC": None,
                           "N_sounding": 0}})
    check(metrics.extended_metrics([0.0] * 3, [0.3, 0.1, 0.2], [0] * 3, variant="exact"),
          {"all": {"AP@50": None, "maxF1@50": None, "Precision@50": 0.0, "AUC": None}})
    # All sounding (hits 0, 2, 3 at u = 0.5): thresholds 0.3, 0.2, 0.1: P 1/2, 2/3, 3/4,
    # R 1/3, 2/3, 1 -> AP 3/4 * 2/3 = 1/2; F1 at 0.1, ..., 0.4: 6/7, 2/3, 2/5, 2/5 (at 0.4:
    # P 1, R 1/4: the low-cIoU sample 1 below t is a false negative too).
    loud = metrics.extended_metrics([0.9, 0.1, 0.8, 0.6], [0.4, 0.3, 0.2, 0.1], [1, 1, 1, 1])
    expected = {"AP@50": 1 / 2, "maxF1@50": 6 / 7, "Precision@50": 3 / 4}
    check(loud, {"all": expected, "visible": expected})
    # exact: P 1, 1/2, 2/3, 3/4 and R 1/4, 1/4, 1/2, 3/4 at 0.4 ... 0.1:
    # AP = 1/4 + 0 + 1/4 * 2/3 + 1/4 * 3/4 = 29/48; max-F1 3/4.
    exact = metrics.extended_metrics([0.9, 0.1, 0.8, 0.6], [0.4, 0.3, 0.2, 0.1], [1] * 4,
                                     variant="exact")
    check(exact, {"all": {"AP@50": 29 / 48, "maxF1@50": 3 / 4, "Precision@50": 3 / 4},
                  "visible": {"AP@50": 29 / 48}})


def test_extended_slavc_thins_the_thresholds_from_200_samples():
    # N = 400: k = 400 // 200 = 2, thresholds at ascending ranks 398, 396, ..., 0. Every
    # sample sounding, conf = rank, a hit at odd ranks. At rank j (even): TP = FP =
    # (400 - j) / 2, FN = j -> P = 1/2, R = (400 - j) / (400 + j): AP = 1/2 (1 - 2/798) =
    # 199/399. (With k = 1 the odd ranks, P > 1/2, would raise the running maximum.)
    rank = np.arange(400)
    cious, conf, boxes = (rank % 2 == 1).astype(float), rank.astype(float), np.ones(400, int)
    assert metrics.extended_metrics(cious, conf, boxes)["all"]["AP@50"] == pytest.approx(
        199 / 399, abs=1e-12)
    curve = metrics.precision_recall_curve(cious, conf, boxes)
    np.testing.assert_array_equal(curve["threshold"], np.arange(398, -1, -2))
    # N = 399: k = 1, every rank from 397 down is a threshold.
    assert len(metrics.precision_recall_curve(cious[:399], conf[:399], boxes[:399])[
        "threshold"]) == 398


def test_extended_slavc_max_f1_stride():
    # N = 20: max-F1 over every 20 // 10 = 2nd ascending confidence (ranks 0, 2, ..., 18).
    # Rank 0 non-sounding, every other sample a hit. At rank 1 (skipped) F1 would be 1;
    # at rank 0: P 19/20, R 1 -> 38/39; at rank 2: P 1, R 18/19 -> 36/37.
    rank = np.arange(20)
    r = metrics.extended_metrics(np.ones(20), rank.astype(float), (rank > 0).astype(int))
    assert r["all"]["maxF1@50"] == pytest.approx(38 / 39, abs=1e-12)
    # 9 samples: stride 1, so rank 1 counts.
    r = metrics.extended_metrics(np.ones(9), rank[:9].astype(float), (rank[:9] > 0).astype(int))
    assert r["all"]["maxF1@50"] == 1.0


def test_extended_exact_is_the_earlier_computation():
    # The earlier function's hand case: TP, FP (non-sounding), FP (cIoU 0.3), TP.
    r = metrics.extended_metrics([0.6, 0.9, 0.3, 0.7], [0.9, 0.8, 0.7, 0.6], [1, 0, 1, 1],
                                 variant="exact")
    # P = 1, 1/2, 1/3, 1/2; R = 1/3, 1/3, 1/3, 2/3 -> AP 1/2; F1 = 1/2, 2/5, 1/3, 4/7.
    check(r, {"all": {"AP@50": 1 / 2, "maxF1@50": 4 / 7, "Precision@50": 1 / 2},
              # visible (0, 2, 3): P 1, 1/2, 2/3, R 1/3, 1/3, 2/3 -> 1/3 + 2/9.
              "visible": {"AP@50": 5 / 9, "N": 3}})
    curve = metrics.precision_recall_curve([0.6, 0.9, 0.3, 0.7], [0.9, 0.8, 0.7, 0.6],
                                           [1, 0, 1, 1], variant="exact")
    np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(curve["recall"], [1 / 3, 1 / 3, 1 / 3, 2 / 3])
    # Ties enter together: operating points {0, 1} (P 1/2, R 1/3) and all (P 2/3, R 2/3).
    ties = metrics.extended_metrics([0.6, 0.2, 0.8], [0.9, 0.9, 0.5], [1, 1, 1], variant="exact")
    assert ties["all"]["AP@50"] == pytest.approx(7 / 18, abs=1e-15)
    np.testing.assert_allclose(metrics.precision_recall_curve(
        [0.6, 0.2, 0.8], [0.9, 0.9, 0.5], [1, 1, 1], variant="exact")["threshold"], [0.9, 0.5])
    perfect = metrics.extended_metrics([0.9, 0.9, 0.0], [3.0, 2.0, 1.0], [1, 1, 0],
                                       variant="exact")
    assert perfect["all"]["AP@50"] == 1.0 and perfect["all"]["maxF1@50"] == 1.0


def test_extended_exact_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    n = 500
    c = rng.uniform(size=n)
    conf = np.round(rng.normal(size=n) + 2 * (c > 0.5), 1)  # informative, with ties
    snd = rng.uniform(size=n) < 0.8
    out = metrics.extended_metrics(c, conf, snd.astype(int), variant="exact")["all"]
    tp = snd & (c >= 0.5)
    # sklearn's recall is over all positives (= TPs here); ours over the sounding samples.
    scale = tp.sum() / snd.sum()
    assert out["AP@50"] == pytest.approx(sk.average_precision_score(tp, conf) * scale,
                                         rel=1e-12)
    p, r, _ = sk.precision_recall_curve(tp, conf)
    r = r * scale
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    assert out["maxF1@50"] == pytest.approx(f1.max(), rel=1e-12)


# ---------------------------- extended evaluation: an independent float64 transcription


def ref_precision_recall(bb, ciou, conf, thr, u):
    tp = fp = fn = 0
    for b, c, s in zip(bb, ciou, conf, strict=True):
        if b == 0:
            if s >= thr:
                fp += 1
        elif s >= thr:
            if c >= u:
                tp += 1
            else:
                fp += 1
        else:
            fn += 1
    p = 1.0 if tp + fp == 0 else tp / (tp + fp)
    r = 1.0 if tp + fn == 0 else tp / (tp + fn)
    return p, r


def ref_slavc_subset(bb, ciou, conf):
    out = {}
    n = len(ciou)
    for u in (0.5, 0.75):
        tag = f"@{int(u * 100)}"
        precision, recall = [], []
        for thr in list(np.sort(np.array(conf))[:-1])[::-max(1, n // 200)]:
            p, r = ref_precision_recall(bb, ciou, conf, thr, u)
            precision.append(p)
            recall.append(r)
        pmax = [max(precision[i:]) for i in range(len(precision))]
        out["AP" + tag] = sum(pmax[i] * (recall[i + 1] - recall[i])
                              for i in range(len(pmax) - 1))
        f1 = []
        for thr in sorted(conf)[::max(1, n // 10)]:
            p, r = ref_precision_recall(bb, ciou, conf, thr, u)
            f1.append(2 * r * p / (r + p) if r + p > 0 else 0.0)
        out["maxF1" + tag] = max(f1)
        out["Precision" + tag] = ref_precision_recall(bb, ciou, conf, -np.inf, u)[0]
    visible = [c for b, c in zip(bb, ciou, strict=True) if b > 0]
    out["AUC"] = ref_auc(visible) if visible else None
    return out


def ref_exact_subset(bb, ciou, conf):
    out = {}
    n_sounding = sum(1 for b in bb if b > 0)
    for u in (0.5, 0.75):
        tag = f"@{int(u * 100)}"
        points = []
        for thr in sorted(set(conf), reverse=True):
            detected = [i for i in range(len(conf)) if conf[i] >= thr]
            tp = sum(1 for i in detected if bb[i] > 0 and ciou[i] >= u)
            points.append((tp / len(detected), tp / n_sounding if n_sounding else None))
        if n_sounding:
            ap, previous = 0.0, 0.0
            for p, r in points:
                ap += (r - previous) * p
                previous = r
            out["AP" + tag] = ap
            out["maxF1" + tag] = max(2 * p * r / (p + r) if p + r > 0 else 0.0
                                     for p, r in points)
        else:
            out["AP" + tag] = out["maxF1" + tag] = None
        out["Precision" + tag] = sum(1 for b, c in zip(bb, ciou, strict=True)
                                     if b > 0 and c >= u) / len(ciou)
    visible = [c for b, c in zip(bb, ciou, strict=True) if b > 0]
    out["AUC"] = ref_auc(visible) if visible else None
    return out


def ref_extended(cious, confidences, num_boxes, areas, variant):
    ranges = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 144**2),
              "huge": (144**2, 10000**2)}
    subsets = {"all": list(range(len(cious))),
               "visible": [i for i, b in enumerate(num_boxes) if b > 0]}
    for name, (lo, hi) in ranges.items():
        subsets[name] = [i for i, b in enumerate(num_boxes) if b > 0 and lo <= areas[i] < hi]
    score = ref_slavc_subset if variant == "slavc" else ref_exact_subset
    return {name: score([num_boxes[i] for i in idx], [cious[i] for i in idx],
                        [confidences[i] for i in idx])
            for name, idx in subsets.items() if idx}


@pytest.mark.parametrize("variant", ["slavc", "exact"])
@pytest.mark.parametrize("n", [37, 450, 1203])
def test_extended_against_a_float64_transcription(variant, n):
    rng = np.random.default_rng(n)
    cious = rng.beta(2, 2, size=n)
    num_boxes = rng.integers(0, 4, size=n) * (rng.uniform(size=n) < 0.7)
    # Informative confidences with ties (1 decimal), a few equal to a threshold's value.
    conf = np.round(rng.normal(size=n) + 1.5 * (num_boxes > 0) * (cious > 0.5), 1)
    areas = np.where(num_boxes > 0, rng.choice([100.0, 1024.0, 5000.5, 9216.0, 20736.0,
                                                30000.0], size=n), 0.0)
    got = metrics.extended_metrics(cious, conf, num_boxes, areas, variant=variant)
    expected = ref_extended(list(cious), list(conf), list(num_boxes), list(areas), variant)
    check(got, expected)
    assert {"small", "medium", "large", "huge"} <= set(got)  # areas on every boundary
    if variant == "slavc":  # the curve is AP's: its recall ends at 1 - (no sample left out)
        curve = metrics.precision_recall_curve(cious, conf, num_boxes, 0.5)
        assert len(curve["threshold"]) == len(np.sort(conf)[:-1][::-max(1, n // 200)])
        assert np.all(np.diff(curve["recall"]) >= 0)


def test_gt_areas():
    gt = metrics.gt_maps([[(0, 0, 4, 4), (2, 2, 6, 6)], []], "flickr", size=8)
    # Flickr consensus: 16 + 16 - 4 = 28 pixels, 24 of them 0.5 and 4 of them 1.
    np.testing.assert_array_equal(metrics.gt_areas(gt, "slavc"), [16.0, 0.0])  # SLAVC: sum
    np.testing.assert_array_equal(metrics.gt_areas(gt, "exact"), [28.0, 0.0])  # pixels
    binary = metrics.gt_maps([[(0, 0, 4, 4), (2, 2, 6, 6)]], "vggss", size=8)
    assert metrics.gt_areas(binary, "slavc")[0] == metrics.gt_areas(binary, "exact")[0] == 28


# ------------------------------------------------------------------------ adaptive cIoU


def ref_adaptive_ciou(pred, gt):
    """kaistmm/SSLalignment test.py: gt_nums = (gt_map != 0).sum(), S*S // 2 when 0;
    threshold = np.sort(pred.flatten())[S*S - gt_nums]; cal_CIOU_adap: infer > threshold."""
    pred = np.asarray(pred, np.float64)
    gt_nums = int((gt != 0).sum())
    if gt_nums == 0:
        gt_nums = int(pred.shape[0] * pred.shape[1]) // 2
    threshold = np.sort(pred.flatten())[int(pred.shape[0] * pred.shape[1]) - gt_nums]
    infer = np.zeros(pred.shape)
    infer[pred > threshold] = 1
    return np.sum(infer * gt) / (np.sum(gt) + np.sum(infer * (gt == 0)))


def test_adaptive_ciou_by_hand():
    ramp = np.arange(S * S, dtype=np.float64).reshape(1, S, S)
    gt = np.zeros((1, S, S))
    gt[0].flat[-100:] = 1.0  # the 100 highest pixels
    # |G| = 100: thr = sorted(map)[S*S - 100], map > thr keeps the top 99: 99 / 100.
    assert metrics.ciou(ramp, gt, threshold="adaptive")[0] == 0.99
    # Empty gt: |G| = S*S // 2, 25,087 pixels predicted, all false positives: 0.
    assert metrics.ciou(ramp, np.zeros((1, S, S)), threshold="adaptive")[0] == 0.0
    # G the whole frame: index 0, every pixel but the minimum: (S*S - 1) / (S*S).
    full = np.ones((1, S, S))
    assert metrics.ciou(ramp, full, threshold="adaptive")[0] == (S * S - 1) / (S * S)
    # Ties: a constant map predicts nothing (> its only value).
    assert metrics.ciou(np.ones((1, S, S)), gt, threshold="adaptive")[0] == 0.0
    # A Flickr consensus map: |G| counts the pixels (0.5 ones too), cIoU weighs them.
    flickr = metrics.gt_map([(0, 0, 112, 224), (0, 0, 112, 112)], "flickr")[None]
    left = (np.arange(S)[None, :] < 112) * (1.0 + np.arange(S)[:, None])  # row r: r + 1
    # |G| = 112 * 224 = 25,088 pixels (1.5 * 112^2 in weight): thr = sorted(map)[25,088] = 1
    # (after 25,088 zeros), and map > 1 drops row 0 of the left half (112 pixels of weight
    # 1): cIoU = (18,816 - 112) / 18,816.
    assert metrics.ciou(left[None], flickr, threshold="adaptive")[0] == 18704 / 18816
    # The protocol's >= keeps the whole left half: 1.
    assert metrics.ciou(left[None], flickr, threshold="median_ge")[0] == 1.0


def test_adaptive_ciou_against_the_reference():
    rng = np.random.default_rng(8)
    entries = vggss_json()
    pick = [entries[i] for i in rng.choice(len(entries), 40, replace=False)]
    boxes = [metrics.normalized_to_pixels(e["bbox"]) for e in pick]
    boxes[0] = np.zeros((0, 4), int)  # an empty gt
    gts = metrics.gt_maps(boxes, "vggss")
    maps = _random_maps(rng, len(pick))  # half quantised: ties at the threshold value
    for m, g in zip(maps, gts, strict=True):
        m += 0.7 * g * rng.uniform()
    got = metrics.ciou(maps, gts, threshold="adaptive")
    expect = [ref_adaptive_ciou(m, g) for m, g in zip(maps, gts, strict=True)]
    np.testing.assert_array_equal(got, expect)
    assert len(np.unique(got)) > 10
    flickr = metrics.gt_maps([[(10, 20, 150, 200), (40, 10, 120, 180)]] * 3, "flickr")
    maps = _random_maps(rng, 3) + flickr
    np.testing.assert_allclose(metrics.ciou(maps, flickr, threshold="adaptive"),
                               [ref_adaptive_ciou(m, g) for m, g in zip(maps, flickr,
                                                                         strict=True)],
                               rtol=1e-15)


# ---------------------------------------------------------------------- variants and errors


def test_protocol_variant_is_json():
    d = json.loads(json.dumps(metrics.PROTOCOL_VARIANT))
    assert d["prediction_threshold"] == "median_ge" and d["upsample"] == "bilinear_align_corners"
    assert metrics.protocol_variant(threshold=0.3)["threshold_rule"] == "map >= 0.3"
    assert metrics.protocol_variant("adaptive")["threshold_rule"].startswith(
        "map > sorted(map)[S*S - |G|]")
    # The extended variant and the OGL fusion are named in every result file.
    assert d["extended_variant"] == "slavc" and "N//200" in d["extended"]
    assert d["ogl_alpha"] is None and d["ogl_fusion"] is None  # no OGL
    assert metrics.protocol_variant(ogl_alpha=0.4)["ogl_fusion"] == "minmax"
    v = metrics.protocol_variant(ogl_alpha=0.9, ogl_fusion="slavc", extended="exact")
    assert v["ogl_fusion"] == "slavc" and "/ 2.5" in v["ogl_fusion_rule"]
    assert v["extended_variant"] == "exact"
    with pytest.raises(ValueError, match="unknown OGL fusion"):
        metrics.protocol_variant(ogl_alpha=0.4, ogl_fusion="mean")
    assert "adaptive" in metrics.THRESHOLDS


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
        metrics.extended_metrics([0.5], [0.1, 0.2], [1])
    with pytest.raises(ValueError, match="lengths differ"):
        metrics.extended_metrics([0.5], [0.1], [1], [3.0, 4.0])
    with pytest.raises(ValueError, match="no samples"):
        metrics.extended_metrics([], [], [])
    with pytest.raises(ValueError, match="unknown extended variant 'sklearn'"):
        metrics.extended_metrics([0.5], [0.1], [1], variant="sklearn")
    with pytest.raises(ValueError, match="num_boxes"):
        metrics.extended_metrics([0.5], [0.1], [-1])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.extended_metrics([np.nan], [0.1], [1])
