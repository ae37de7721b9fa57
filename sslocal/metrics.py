"""Evaluation metrics (docs/protocol.md section 6): ground-truth maps, cIoU, AUC, and the extended
evaluation of sets with non-sounding pairs (SLAVC's AP / max-F1 / precision by subset).

Host-side numpy, vectorised over the batch (5,000 VGG-SS samples score in seconds). Maps are
(B, S, S); boxes are (xmin, ymin, xmax, ymax) integer pixel coordinates, end exclusive.
"""

import math
from collections.abc import Sequence

import numpy as np

GT_FORMATS = ("flickr", "vggss")
THRESHOLDS = ("median_ge", "median_gt", "adaptive")
AUC_THRESHOLDS = np.linspace(0.0, 1.0, 21)
_CHUNK = 256  # samples per vectorised block: bounds the temporaries to ~100 MB at 224 x 224


def normalized_to_pixels(boxes, size: int = 224) -> np.ndarray:
    """VGG-SS boxes in [0, 1] (N, 4) -> int pixels: (clip(v, 0, 1) * size).astype(int).

    The clip turns the corrupt coordinates of vggss.json (about -2.9e16) into 0, which can
    leave an empty box, as in the reference code.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (np.clip(b, 0.0, 1.0) * size).astype(int)


def _as_pixel_boxes(boxes) -> np.ndarray:
    b = np.asarray(boxes)
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) (xmin, ymin, xmax, ymax), got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("boxes hold non-finite coordinates")
    b = b.astype(np.int64)  # floats are truncated, as int() does
    if np.any(b < 0):
        # Negative slice bounds would wrap around in the reference's gt[ymin:ymax] raster.
        raise ValueError(f"negative box coordinates (convert/clip first): {b[np.any(b < 0, 1)]}")
    return b


def gt_maps(boxes_list: Sequence, fmt: str, size: int = 224) -> np.ndarray:
    """Ground-truth maps (B, size, size) float32 for a list of per-sample box arrays (N_b, 4).

    fmt "flickr": sum of the annotators' box indicators / 2, capped at 1 (consensus 0.5 / 1);
    fmt "vggss": union of the boxes, binarised. A sample without boxes gets an all-zero map.
    """
    if fmt not in GT_FORMATS:
        raise ValueError(f"unknown gt format {fmt!r}; choose one of {GT_FORMATS}")
    boxes = [_as_pixel_boxes(b) for b in boxes_list]
    n_max = max((len(b) for b in boxes), default=0)
    # Pad with empty boxes (0, 0, 0, 0): they rasterise to nothing.
    padded = np.zeros((len(boxes), max(n_max, 1), 4), dtype=np.int64)
    for i, b in enumerate(boxes):
        padded[i, : len(b)] = b
    grid = np.arange(size)
    xmin, ymin, xmax, ymax = (padded[..., k, None] for k in range(4))
    rows = ((grid >= ymin) & (grid < ymax)).astype(np.float32)  # (B, N, size)
    cols = ((grid >= xmin) & (grid < xmax)).astype(np.float32)
    out = np.empty((len(boxes), size, size), dtype=np.float32)
    for start in range(0, len(boxes), _CHUNK):
        part = out[start : start + _CHUNK]
        # Number of boxes covering each pixel, written in place (no batch-sized temporaries).
        sl = slice(start, start + _CHUNK)
        np.einsum("bny,bnx->byx", rows[sl], cols[sl], out=part)
        if fmt == "flickr":
            part *= 0.5
        np.minimum(part, 1.0, out=part)  # flickr: cap at 1; vggss: integer counts -> 0 / 1
    return out


def gt_map(boxes, fmt: str, size: int = 224) -> np.ndarray:
    """Ground-truth map (size, size) float32 of one sample's boxes (N, 4); see `gt_maps`."""
    return gt_maps([boxes], fmt, size)[0]


def _prediction_thresholds(flat: np.ndarray, threshold, gt: np.ndarray) -> np.ndarray:
    if isinstance(threshold, str):
        if threshold not in THRESHOLDS:
            raise ValueError(f"unknown threshold {threshold!r}; use {THRESHOLDS} or a float")
        n_pixels = flat.shape[1]
        if threshold == "adaptive":
            # |G| = pixels with gt != 0 (the alignment code's (gt_map != 0).sum()); S*S // 2
            # when G is empty. thr = sorted(map)[S*S - |G|], one index per sample.
            n_gt = np.count_nonzero(gt, axis=1)
            n_gt = np.where(n_gt == 0, n_pixels // 2, n_gt)
            index = n_pixels - n_gt
            return np.array([np.partition(row, k)[k] for row, k in zip(flat, index, strict=True)],
                            dtype=flat.dtype)
        k = n_pixels // 2  # index S*S/2 of the ascending sort (25,088 for 224 x 224)
        return np.partition(flat, k, axis=1)[:, k]
    return np.full(flat.shape[0], float(threshold), dtype=flat.dtype)


def ciou(pred_maps, gt_maps, threshold="median_ge") -> np.ndarray:
    """Per-sample consensus IoU (B,) float64.

    The prediction (docs/protocol.md section 6):

    - "median_ge" (the protocol): pred = map >= thr, thr = the value at index S*S // 2 of the
      ascending sort of the map;
    - "median_gt": pred = map > thr, the same thr;
    - "adaptive" (the alignment papers, kaistmm/SSLalignment's test.py): pred = map >
      sorted(map)[S*S - |G|], |G| = the number of pixels with gt != 0, S*S // 2 when G is
      empty. As in that code the comparison is strict, so with distinct values |G| - 1 pixels
      are predicted (all but the minimum when G is the whole frame), and ties at the threshold
      value are left out;
    - a float: pred = map >= threshold.

    cIoU = sum(pred * gt) / (sum(gt) + sum(pred * [gt == 0])), with the gt values themselves
    (0.5-weighted Flickr pixels count 0.5). An empty gt with an empty prediction (0 / 0) gives 0.
    """
    pred_maps = np.asarray(pred_maps)
    gt_maps = np.asarray(gt_maps)
    if not np.issubdtype(pred_maps.dtype, np.floating):
        pred_maps = pred_maps.astype(np.float64)
    if not np.issubdtype(gt_maps.dtype, np.floating):
        gt_maps = gt_maps.astype(np.float32)
    if pred_maps.ndim != 3 or pred_maps.shape != gt_maps.shape:
        raise ValueError(
            f"expected pred and gt maps of the same shape (B, H, W), got {pred_maps.shape} "
            f"and {gt_maps.shape}"
        )
    if not np.all(np.isfinite(pred_maps)):
        raise ValueError("pred_maps hold non-finite values")
    n_pixels = pred_maps.shape[1] * pred_maps.shape[2]
    strict = isinstance(threshold, str) and threshold in ("median_gt", "adaptive")
    out = np.empty(pred_maps.shape[0], dtype=np.float64)
    for start in range(0, pred_maps.shape[0], _CHUNK):
        flat = pred_maps[start : start + _CHUNK].reshape(-1, n_pixels)
        gt = gt_maps[start : start + _CHUNK].reshape(flat.shape)
        thr = _prediction_thresholds(flat, threshold, gt)[:, None]
        pred = flat > thr if strict else flat >= thr
        # Sums of the 0 / 0.5 / 1 gt values are exact even in float32 (all partial sums are
        # multiples of 0.5 below 2**23), so the ratio equals the float64 reference's.
        inter = np.einsum("bi,bi->b", gt, pred.astype(gt.dtype)).astype(np.float64)
        den = np.sum(gt, axis=1).astype(np.float64) + np.count_nonzero(pred & (gt == 0), axis=1)
        out[start : start + len(flat)] = np.divide(
            inter, den, out=np.zeros_like(inter), where=den > 0
        )
    return out


def success_curve(cious, thresholds=AUC_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, fraction of samples with cIoU >= t) for t = 0, 0.05, ..., 1."""
    c = np.asarray(cious, dtype=np.float64).reshape(-1)
    if c.size == 0:
        raise ValueError("no cIoU values")
    t = np.asarray(thresholds, dtype=np.float64)
    return t, np.mean(c[None, :] >= t[:, None], axis=1)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def summarize(cious) -> dict:
    """{"cIoU": fraction with cIoU >= 0.5, "AUC": trapezoidal area of the success curve,
    "mean_cIoU": mean cIoU, "N": number of samples}."""
    c = np.asarray(cious, dtype=np.float64).reshape(-1)
    t, success = success_curve(c)
    return {
        "cIoU": float(np.mean(c >= 0.5)),
        "AUC": _trapezoid(t, success),
        "mean_cIoU": float(np.mean(c)),
        "N": int(c.size),
    }


def confidence(raw_maps) -> np.ndarray:
    """Detection confidence (B,) float64: mean of the top 25% values of each un-normalised map."""
    flat = np.asarray(raw_maps, dtype=np.float64)
    flat = flat.reshape(flat.shape[0], -1)
    k = max(flat.shape[1] // 4, 1)
    top = np.partition(flat, flat.shape[1] - k, axis=1)[:, flat.shape[1] - k :]
    return top.mean(axis=1)


# -- extended evaluation (sets with non-sounding pairs) -----------------------------------------

EXTENDED_VARIANTS = ("slavc", "exact")
EXTENDED_SUBSETS = ("all", "visible", "small", "medium", "large", "huge")
EXTENDED_IOU_THRESHOLDS = (0.5, 0.75)
EXTENDED_NAMES = ("AP@50", "AP@75", "maxF1@50", "maxF1@75", "Precision@50", "Precision@75",
                  "AUC")
# Ground-truth area ranges [lo, hi) of the size subsets (SLAVC's min_sizes / max_sizes).
AREA_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2),
               "large": (96.0**2, 144.0**2), "huge": (144.0**2, math.inf)}
SLAVC_AP_POINTS = 200  # AP: every max(1, N // 200)-th sorted confidence
SLAVC_F1_POINTS = 10  # max-F1: every max(1, N // 10)-th sorted confidence


def _check_variant(variant: str) -> None:
    if variant not in EXTENDED_VARIANTS:
        raise ValueError(f"unknown extended variant {variant!r}; choose one of "
                         f"{EXTENDED_VARIANTS}")


def gt_areas(gt_maps, variant: str = "slavc") -> np.ndarray:
    """Ground-truth area (B,) float64 of each map, the size subsets' key.

    "slavc": the sum of the map's values, as SLAVC's evaluator computes it (`area =
    gt.sum()`): a 0.5-weighted Flickr consensus pixel counts 0.5; "exact": the number of
    pixels with gt > 0. The two agree on binary (VGG-SS) maps.
    """
    _check_variant(variant)
    gt = np.asarray(gt_maps)
    flat = gt.reshape(gt.shape[0], -1)
    if variant == "slavc":
        return flat.sum(axis=1, dtype=np.float64)
    return np.count_nonzero(flat > 0, axis=1).astype(np.float64)


def _extended_inputs(cious, confidences, num_boxes, areas):
    c = np.asarray(cious, dtype=np.float64).reshape(-1)
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    nb = np.asarray(num_boxes).reshape(-1)
    a = None if areas is None else np.asarray(areas, dtype=np.float64).reshape(-1)
    sizes = [c.size, conf.size, nb.size] + ([] if a is None else [a.size])
    if len(set(sizes)) != 1:
        raise ValueError(f"lengths differ: cious {c.size}, confidences {conf.size}, num_boxes "
                         f"{nb.size}" + ("" if a is None else f", areas {a.size}"))
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(conf))):
        raise ValueError("cious or confidences hold non-finite values")
    if np.any(nb < 0):
        raise ValueError("num_boxes must be >= 0")
    return c, conf, nb.astype(np.int64), a


def extended_subsets(num_boxes, areas=None) -> dict[str, np.ndarray]:
    """Indices of every non-empty subset: "all"; "visible" (num_boxes > 0, the sounding
    samples); "small", "medium", "large", "huge" (sounding samples with area in AREA_RANGES,
    only when areas are given)."""
    nb = np.asarray(num_boxes).reshape(-1)
    masks = {"all": np.ones(nb.size, bool), "visible": nb > 0}
    if areas is not None:
        a = np.asarray(areas, dtype=np.float64).reshape(-1)
        for name, (lo, hi) in AREA_RANGES.items():
            masks[name] = (nb > 0) & (a >= lo) & (a < hi)
    return {name: np.flatnonzero(m) for name, m in masks.items() if m.any()}


def _slavc_counts(c, conf, nb, thresholds, iou_threshold):
    """SLAVC's calc_precision_recall at every threshold t, vectorised: a non-sounding pair
    with conf >= t is a false positive; a sounding one with conf >= t a true positive if
    cIoU >= u, else a false positive; a sounding one with conf < t a false negative.
    P = TP / (TP + FP), R = TP / (TP + FN), each 1 when its denominator is 0."""
    t = np.asarray(thresholds, dtype=np.float64)
    sounding = nb > 0
    hit = sounding & (c >= iou_threshold)

    def at_least(values):  # number of values >= t, for every t
        return values.size - np.searchsorted(np.sort(values), t, side="left")

    detected, tp, sounding_detected = at_least(conf), at_least(conf[hit]), at_least(
        conf[sounding])
    fp = detected - tp
    fn = int(sounding.sum()) - sounding_detected
    precision = np.where(tp + fp == 0, 1.0, tp / np.maximum(tp + fp, 1))
    recall = np.where(tp + fn == 0, 1.0, tp / np.maximum(tp + fn, 1))
    return precision, recall


def _exact_points(c, conf, nb, iou_threshold):
    """Every sample a detection ranked by descending confidence, one operating point per
    distinct confidence (ties enter together); TP: sounding with cIoU >= u; recall over the
    sounding samples (None when there are none)."""
    order = np.argsort(-conf, kind="stable")
    hit = ((nb > 0) & (c >= iou_threshold))[order]
    last = np.flatnonzero(np.append(np.diff(conf[order]) != 0, True))
    ctp = np.cumsum(hit)[last]
    precision = ctp / (last + 1)
    n_sounding = int((nb > 0).sum())
    recall = ctp / n_sounding if n_sounding else None
    return conf[order][last], precision, recall


def precision_recall_curve(cious, confidences, num_boxes, iou_threshold: float = 0.5,
                           variant: str = "slavc") -> dict[str, np.ndarray]:
    """The precision-recall points behind AP: {"threshold", "precision", "recall"} (arrays,
    thresholds descending, recall non-decreasing).

    "slavc": SLAVC's AP thresholds (every k-th ascending sorted confidence with the largest
    dropped, from the top down, k = max(1, N // 200)) and the raw precision there (AP uses its
    running maximum from the right). "exact": one point per distinct confidence; recall is
    empty when no sample is sounding.
    """
    _check_variant(variant)
    c, conf, nb, _ = _extended_inputs(cious, confidences, num_boxes, None)
    if variant == "slavc":
        k = max(1, c.size // SLAVC_AP_POINTS)
        thresholds = np.sort(conf)[:-1][::-k]
        precision, recall = _slavc_counts(c, conf, nb, thresholds, iou_threshold)
        return {"threshold": thresholds, "precision": precision, "recall": recall}
    thresholds, precision, recall = _exact_points(c, conf, nb, iou_threshold)
    if recall is None:
        thresholds, precision, recall = thresholds[:0], precision[:0], precision[:0]
    return {"threshold": thresholds, "precision": precision, "recall": recall}


def _f1(precision, recall):
    pr = precision + recall
    return np.divide(2 * precision * recall, pr, out=np.zeros_like(pr), where=pr > 0)


def _subset_metrics(c, conf, nb, variant: str) -> dict:
    sounding = nb > 0
    out: dict = {}
    for u in EXTENDED_IOU_THRESHOLDS:
        tag = f"@{round(100 * u)}"
        hits = int(np.sum(sounding & (c >= u)))
        if variant == "slavc":
            curve = precision_recall_curve(c, conf, nb, u, "slavc")
            envelope = np.maximum.accumulate(curve["precision"][::-1])[::-1]
            ap = float(np.sum(envelope[:-1] * np.diff(curve["recall"])))
            f1_thresholds = np.sort(conf)[::max(1, c.size // SLAVC_F1_POINTS)]
            max_f1 = float(_f1(*_slavc_counts(c, conf, nb, f1_thresholds, u)).max())
        else:
            _, precision, recall = _exact_points(c, conf, nb, u)
            if recall is None:
                ap = max_f1 = None
            else:
                ap = float(np.sum(np.diff(recall, prepend=0.0) * precision))
                max_f1 = float(_f1(precision, recall).max())
        out["AP" + tag], out["maxF1" + tag] = ap, max_f1
        # t = -inf: every sample is detected (SLAVC passes -1000, below any confidence).
        out["Precision" + tag] = hits / c.size
    out["AUC"] = summarize(c[sounding])["AUC"] if sounding.any() else None
    out["N"] = int(c.size)
    out["N_sounding"] = int(sounding.sum())
    return {name: out[name] for name in (*EXTENDED_NAMES, "N", "N_sounding")}


def extended_metrics(cious, confidences, num_boxes, areas=None, variant: str = "slavc"
                     ) -> dict[str, dict]:
    """The extended evaluation (docs/protocol.md section 6): result[subset][name].

    cious, confidences (`confidence`), num_boxes (ground-truth boxes per sample; 0: a
    non-sounding pair) and areas (`gt_areas`; None: no size subsets), one per sample.
    Subsets: EXTENDED_SUBSETS, each present only when it holds a sample (`extended_subsets`);
    names: EXTENDED_NAMES, plus "N" and "N_sounding" (the subset's sizes). A value that is
    undefined on its subset is None: AUC without a sounding sample; with "exact", AP and
    maxF1 too.

    variant "slavc" (stoneMo/SLAVC, utils.py `EvaluatorFull`): at a confidence threshold t and
    an IoU threshold u (0.5 and 0.75), SLAVC's precision and recall (`precision_recall_curve`);
    AP = sum_i Pmax_i (R_{i+1} - R_i) over the thresholds np.sort(conf)[:-1][::-k] (k =
    max(1, N // 200)), Pmax_i = max(P_i, P_{i+1}, ...), 0 with fewer than two thresholds;
    maxF1 = the largest 2PR / (P + R) (0 where P + R = 0) over np.sort(conf)[::max(1, N // 10)];
    Precision@u = P at t = -inf (SLAVC: -1000); AUC = the protocol's AUC (`summarize`) of the
    subset's sounding samples.

    variant "exact" (sslocal's earlier computation): every sample a detection ranked by
    descending confidence with one operating point per distinct confidence, recall = TP / the
    subset's sounding samples, AP = sum_k (R_k - R_{k-1}) P_k (sklearn's step sum), maxF1
    over all operating points; Precision@u and AUC as above.
    """
    _check_variant(variant)
    c, conf, nb, a = _extended_inputs(cious, confidences, num_boxes, areas)
    if c.size == 0:
        raise ValueError("no samples")
    return {name: _subset_metrics(c[idx], conf[idx], nb[idx], variant)
            for name, idx in extended_subsets(nb, a).items()}


_THRESHOLD_RULES = {
    "median_ge": "map >= sorted(map)[S*S//2]",
    "median_gt": "map > sorted(map)[S*S//2]",
    "adaptive": "map > sorted(map)[S*S - |G|], |G| = count(gt != 0) (S*S//2 when 0)",
}
_EXTENDED_RULES = {
    "slavc": "SLAVC's evaluator: AP over every max(1, N//200)-th sorted confidence (largest "
             "dropped), precision max from the right; max-F1 over every max(1, N//10)-th; "
             "precision at t = -inf; recall = TP / (TP + FN); subsets by area = sum(gt); "
             "u = 0.5, 0.75",
    "exact": "AP step sum over distinct confidences, recall over sounding samples; max-F1 "
             "over distinct confidences; precision at t = -inf; subsets by area = "
             "count(gt > 0); u = 0.5, 0.75",
}
_OGL_FUSION_RULES = {
    "minmax": "minmax(alpha * minmax(av) + (1 - alpha) * minmax(obj)) (EZ-VSL)",
    "slavc": "alpha * (alpha_ii + 1) / 2 + (1 - alpha) * obj / 2.5, fixed ranges, no min-max "
             "(SLAVC)",
}


def protocol_variant(
    threshold="median_ge", upsample: str = "bilinear_align_corners", ogl_alpha=None,
    extended: str = "slavc", ogl_fusion: str | None = None,
) -> dict:
    """The evaluation conventions in use, for result files. ogl_fusion defaults to "minmax"
    when OGL is on (ogl_alpha given) and is None without OGL."""
    _check_variant(extended)
    if ogl_alpha is not None and ogl_fusion is None:
        ogl_fusion = "minmax"
    if ogl_fusion is not None and ogl_fusion not in _OGL_FUSION_RULES:
        raise ValueError(f"unknown OGL fusion {ogl_fusion!r}; choose one of "
                         f"{tuple(_OGL_FUSION_RULES)}")
    return {
        "prediction_threshold": threshold,
        "threshold_rule": _THRESHOLD_RULES.get(threshold, f"map >= {threshold}"),
        "upsample": upsample,
        "normalisation": "per-sample min-max, constant map kept",
        "ogl_alpha": ogl_alpha,
        "ogl_fusion": ogl_fusion,
        "ogl_fusion_rule": _OGL_FUSION_RULES.get(ogl_fusion),
        "ciou": "sum(pred*gt) / (sum(gt) + sum(pred*[gt==0])), gt values not binarised",
        "gt": {"flickr": "sum of boxes / 2, capped at 1", "vggss": "union of boxes, binarised"},
        "cIoU_reported": "fraction of samples with cIoU >= 0.5",
        "auc": "trapezoid of success(t) = fraction cIoU >= t, t = linspace(0, 1, 21)",
        "extended_variant": extended,
        "extended": _EXTENDED_RULES[extended],
        "confidence": "mean of the top quarter of the un-normalised upsampled alpha_ii",
    }


PROTOCOL_VARIANT = protocol_variant()
