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


# How alpha_ii is made from the model's outputs (sslocal.maps.map_rule; docs/protocol.md
# section 2, "Released models").
_MAP_RULES = {
    "cosine": "alpha_ii[h, w] = <V_i[h, w], A_i>",
    "mean_of_heads": "alpha_ii = mean over the projection heads k of <V_ik[h, w], A_ik> (SLAVC)",
}


def protocol_variant(
    threshold="median_ge", upsample: str = "bilinear_align_corners", ogl_alpha=None,
    extended: str = "slavc", ogl_fusion: str | None = None, map_rule: str = "cosine",
    model_format: str | None = None,
) -> dict:
    """The evaluation conventions in use, for result files. ogl_fusion defaults to "minmax"
    when OGL is on (ogl_alpha given) and is None without OGL. map_rule and model_format name
    the model's map rule and the released format it was converted from (None: sslocal's own)."""
    _check_variant(extended)
    if map_rule not in _MAP_RULES:
        raise ValueError(f"unknown map rule {map_rule!r}; choose one of {tuple(_MAP_RULES)}")
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
        "map_rule": map_rule,
        "map": _MAP_RULES[map_rule],
        "model_format": model_format,
    }


PROTOCOL_VARIANT = protocol_variant()


# -- the benchmarks since 2023 (docs/protocol.md section 9) -------------------------------------

IIOU_THRESHOLD = 0.5
MASK_VARIANTS = ("frames", "sslalignment", "per_batch")
MASK_FSCORE_INPUTS = ("binarised", "map")
FSCORE_BETA2 = 0.3
# torch.linspace(0, 1 - 1e-10, 255) of the F-measure code (AVSBench, SSLalignment), in float64.
FSCORE_THRESHOLDS = np.linspace(0.0, 1.0 - 1e-10, 255)
MASK_IOU_EPS = 1e-7  # inter / (union + 1e-7), as AVSBench's and SSLalignment's mask_iou
_PR_EPS = 1e-20  # tp / (count + 1e-20), as their _eval_pr
SSLALIGNMENT_BATCH = 64  # SSLalignment's test.py --batch_size default
RETRIEVAL_POOLINGS = ("mean", "max")


def image_min_ciou(cious, image_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct image ids sorted, each image's minimum cIoU over its samples, each image's
    number of samples). One sample per (image, source) pair, each scored with its own audio."""
    c = np.asarray(cious, dtype=np.float64).reshape(-1)
    ids = np.asarray(image_ids).reshape(-1)
    if c.size != ids.size:
        raise ValueError(f"lengths differ: cious {c.size}, image_ids {ids.size}")
    if c.size == 0:
        raise ValueError("no cIoU values")
    if not np.all(np.isfinite(c)):
        raise ValueError("cious hold non-finite values")
    names, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    mins = np.full(names.size, np.inf)
    np.minimum.at(mins, inverse.reshape(-1), c)
    return names, mins, counts


def iiou_iauc(cious, image_ids, thresholds=AUC_THRESHOLDS) -> dict:
    """IS3's interactive metrics (docs/protocol.md section 9), as kaistmm/SSLalignment's
    utils.py `Evaluator_iiou` computes them (finalize_cIoU, finalize_IAUC):

    - an image succeeds at t when every one of its sources, each queried with its own audio,
      has cIoU >= t: its minimum cIoU over its sources is >= t (SSLalignment binarises each
      source's cIoU at t and takes the minimum; the same thing);
    - "iIoU" = the fraction of images whose minimum cIoU >= 0.5;
    - "iAUC" = the trapezoidal area (sklearn.metrics.auc) under the fraction of images
      succeeding at t, t = 0.05 * i for i = 0..20 (AUC_THRESHOLDS, equal to SSLalignment's
      [0.05 * i for i in range(21)] value for value).

    cious: one per sample, computed with any threshold rule (`ciou`; SSLalignment's are
    "median_gt" and "adaptive"); image_ids: each sample's image (the IS3 builder's
    "image_id", SSLalignment's short_name). Every sample present counts, as in SSLalignment:
    an image with one of its pairs missing is scored on the other ("sources" reports how many
    images have how many samples). Returns {"iIoU", "iAUC", "N_images", "N", "sources"}.
    """
    _, mins, counts = image_min_ciou(cious, image_ids)
    t = np.asarray(thresholds, dtype=np.float64)
    success = np.mean(mins[None, :] >= t[:, None], axis=1)
    sizes, how_many = np.unique(counts, return_counts=True)
    return {"iIoU": float(np.mean(mins >= IIOU_THRESHOLD)), "iAUC": _trapezoid(t, success),
            "N_images": int(mins.size), "N": int(np.sum(counts)),
            "sources": {int(s): int(n) for s, n in zip(sizes, how_many, strict=True)}}


def _binary_masks(masks, shape) -> np.ndarray:
    m = np.asarray(masks)
    if m.shape != shape:
        raise ValueError(f"expected masks of shape {shape} (as the maps), got {m.shape}")
    if m.dtype != bool:
        if not np.all((m == 0) | (m == 1)):
            raise ValueError("masks must be binary (0 / 1 or bool)")
        m = m != 0
    return m


def _counts_at_thresholds(values: np.ndarray, gt: np.ndarray, thresholds: np.ndarray):
    """For each row and threshold th_j: #(values >= th_j) and #(values >= th_j and gt),
    (B, T) int64. Each value's bin = the number of thresholds <= it; a value counts at th_j
    exactly when j < its bin, so the counts are reversed cumulative histograms."""
    n_t = thresholds.size
    bins = np.searchsorted(thresholds, values, side="right")  # (B, P) in [0, T]
    rows = np.arange(values.shape[0])[:, None] * (n_t + 1)
    flat = (bins + rows).reshape(-1)
    size = values.shape[0] * (n_t + 1)
    hist = np.bincount(flat, minlength=size).reshape(-1, n_t + 1)
    hist_tp = np.bincount(flat, weights=gt.reshape(-1).astype(np.float64),
                          minlength=size).reshape(-1, n_t + 1)
    # count(bin > j) for j = 0..T-1: the sum of hist[:, j + 1:].
    above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    above_tp = np.cumsum(hist_tp[:, ::-1], axis=1)[:, ::-1][:, 1:]
    return above.astype(np.int64), np.rint(above_tp).astype(np.int64)


def _batch_means(values: np.ndarray, batch_size: int) -> np.ndarray:
    return np.array([values[i : i + batch_size].mean()
                     for i in range(0, values.size, batch_size)], dtype=np.float64)


def mask_miou_fscore(pred_maps, masks, *, threshold="median_gt", variant: str = "frames",
                     batch_size: int = SSLALIGNMENT_BATCH, fscore_input: str = "binarised",
                     eps: float = MASK_IOU_EPS) -> dict:
    """AVSBench S4 / MS3 as zero-shot localization (docs/protocol.md section 9): mIoU and the
    F-score (beta^2 = 0.3) of localization maps against binary masks, as the alignment
    work's evaluator computes them (kaistmm/SSLalignment utils.py `Evaluator_miou`, commit
    59e9efd; the F-measure and mask IoU are AVSBench's utils/utility.py `Eval_Fmeasure`,
    `mask_iou`, applied to the binarised map instead of sigmoid(logits)).

    pred_maps: (B, H, W) maps of any scale; masks: (B, H, W) binary. Per frame:

    - prediction b = map > thr (threshold "median_gt", the default and SSLalignment's:
      thr = sorted(map)[H*W // 2], strict; "median_ge", "adaptive" (`ciou`'s rules: for an
      empty mask |G| = H*W // 2, where SSLalignment's adaptive code takes (batch size) / 2, a
      bug sslocal does not copy) or a number (map >= number) are the named alternatives);
    - IoU = sum(b & m) / (sum(b | m) + eps), eps = 1e-7; a frame with an empty mask scores the
      IoU of the background: sum(~b) / (H*W + eps);
    - F-curve, frames with a non-empty mask only: at each of the 255 thresholds th_j =
      linspace(0, 1 - 1e-10, 255), y = v >= th_j with v = b ("binarised", SSLalignment's: the
      prediction binarised first, so every th_j > 0 gives b and th_0 = 0 the whole frame) or
      v = the map itself ("map": AVSBench's thresholds of a [0, 1] prediction; pass maps in
      [0, 1]); P = tp / (sum(y) + 1e-20), R = tp / (sum(m) + 1e-20), F = 1.3 P R / (0.3 P + R),
      0 where that is 0 / 0.

    variant (how frames are averaged; frames in the order given):

    - "frames" (the default): mIoU = the mean IoU over frames; F = the maximum over the 255
      thresholds of the F-curve averaged over frames (averaged first, maximised after);
    - "sslalignment": SSLalignment's exact aggregation: mIoU = the mean over consecutive
      batches of `batch_size` frames (test.py's 64) of each batch's mean IoU (finalize_mIoU:
      sum of batch means / number of batches; differs from "frames" when the last batch is
      short); F as "frames" (finalize_Fmeasure: max of the mean of per-frame curves);
    - "per_batch": the older public computation (AVSBench's test.py with Eval_Fmeasure, and
      SSLalignment's commented-out Eval_Fmeasure): per batch, F_batch = max over thresholds of
      the batch's frame-averaged curve (0 for a batch without a non-empty mask), and the
      reported F = the mean of F_batch over batches (a maximum per batch, then an average: the
      known bug); mIoU as "sslalignment".

    Returns {"mIoU", "F" (None without a non-empty mask), "N", "N_F" (frames with a non-empty
    mask), "variant", "iou" (B,) per frame, "f_curve" (255,) the frames-averaged curve}.
    """
    if variant not in MASK_VARIANTS:
        raise ValueError(f"unknown mask variant {variant!r}; choose one of {MASK_VARIANTS}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    frames = mask_frame_scores(pred_maps, masks, threshold=threshold, fscore_input=fscore_input,
                               eps=eps)
    return mask_aggregate(frames["iou"], frames["f"], frames["nonempty"], variant=variant,
                          batch_size=batch_size)


def mask_frame_scores(pred_maps, masks, *, threshold="median_gt", fscore_input: str = "binarised",
                      eps: float = MASK_IOU_EPS) -> dict:
    """The per-frame part of `mask_miou_fscore` (the prediction, the IoU and the F-curve of
    each frame, defined there): {"iou" (B,), "f" (B, 255) each frame's F at the 255
    thresholds, "nonempty" (B,) whether its mask has a foreground pixel}. The evaluator scores
    batch by batch with it and aggregates once (`mask_aggregate`), so the maps of a whole test
    set never sit in memory together."""
    if fscore_input not in MASK_FSCORE_INPUTS:
        raise ValueError(f"unknown fscore_input {fscore_input!r}; choose one of "
                         f"{MASK_FSCORE_INPUTS}")
    pred = _checked_maps(pred_maps)
    m_all = _binary_masks(masks, pred.shape)
    n, n_pixels = pred.shape[0], pred.shape[1] * pred.shape[2]
    strict = isinstance(threshold, str) and threshold in ("median_gt", "adaptive")
    iou = np.empty(n, dtype=np.float64)
    f = np.zeros((n, FSCORE_THRESHOLDS.size), dtype=np.float64)
    nonempty = m_all.reshape(n, -1).any(axis=1)
    for start in range(0, n, 64):  # 64 frames: about 30 MB of temporaries at 224 x 224
        flat = pred[start : start + 64].reshape(-1, n_pixels)
        m = m_all[start : start + 64].reshape(flat.shape)
        thr = _prediction_thresholds(flat, threshold, m)[:, None]
        b = flat > thr if strict else flat >= thr
        inter = np.count_nonzero(b & m, axis=1).astype(np.float64)
        union = np.count_nonzero(b | m, axis=1).astype(np.float64)
        empty = ~nonempty[start : start + 64]
        inter = np.where(empty, np.count_nonzero(~b, axis=1), inter)
        union = np.where(empty, n_pixels, union)
        iou[start : start + len(flat)] = inter / (union + eps)
        values = b.astype(np.float64) if fscore_input == "binarised" else flat.astype(np.float64)
        n_pred, tp = _counts_at_thresholds(values, m, FSCORE_THRESHOLDS)
        n_gt = np.count_nonzero(m, axis=1)[:, None].astype(np.float64)
        precision = tp / (n_pred + _PR_EPS)
        recall = tp / (n_gt + _PR_EPS)
        num = (1.0 + FSCORE_BETA2) * precision * recall
        den = FSCORE_BETA2 * precision + recall
        f[start : start + len(flat)] = np.divide(num, den, out=np.zeros_like(num),
                                                 where=den > 0)
    return {"iou": iou, "f": f, "nonempty": nonempty}


def mask_aggregate(iou, f, nonempty, *, variant: str = "frames",
                   batch_size: int = SSLALIGNMENT_BATCH) -> dict:
    """The aggregation part of `mask_miou_fscore` (its variants, defined there) over the
    per-frame scores of `mask_frame_scores`, frames in test-set order."""
    if variant not in MASK_VARIANTS:
        raise ValueError(f"unknown mask variant {variant!r}; choose one of {MASK_VARIANTS}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    iou = np.asarray(iou, dtype=np.float64).reshape(-1)
    f = np.asarray(f, dtype=np.float64).reshape(iou.size, FSCORE_THRESHOLDS.size)
    nonempty = np.asarray(nonempty, bool).reshape(-1)
    if iou.size == 0 or nonempty.size != iou.size:
        raise ValueError(f"expected per-frame scores of one length > 0, got {iou.size} IoUs "
                         f"and {nonempty.size} mask flags")
    n = iou.size
    counted = np.flatnonzero(nonempty)
    curve = f[counted].mean(axis=0) if counted.size else np.zeros(FSCORE_THRESHOLDS.size)
    f_score = float(curve.max()) if counted.size else None
    if variant == "frames":
        miou = float(iou.mean())
    else:
        miou = float(_batch_means(iou, batch_size).mean())
    if variant == "per_batch":
        per_batch = []
        for i in range(0, n, batch_size):
            rows = nonempty[i : i + batch_size]
            per_batch.append(f[i : i + batch_size][rows].mean(axis=0).max() if rows.any()
                             else 0.0)
        f_score = float(np.mean(per_batch))
    return {"mIoU": miou, "F": f_score, "N": int(n), "N_F": int(counted.size),
            "variant": variant, "iou": iou, "f_curve": curve}


def negative_audio_pia(pred_maps, threshold, *, positive_maps=None, gt_maps=None,
                       thresholds=AUC_THRESHOLDS) -> dict:
    """Negative audio (docs/protocol.md section 9): how much of the image a model predicts as
    sounding when the audio is silence, noise or an off-screen sound, as Juanola, Haro and
    Fuentes, "A Critical Assessment of Visual Sound Source Localization Models Including
    Negative Audio" (ICASSP 2025, arXiv:2410.01020; xavijuanola/vssl_eval, built on
    SSLalignment's code) define it (utils_dir/eval_utils.py `compute_pIA`,
    `compute_AUC_pIA`):

    - pIA of a sample = sum(map > thr) / (H * W), the fraction of the image predicted as
      sounding (their `(pred > threshold)`, strict);
    - "pIA" = the mean pIA over samples (x 100 in their tables);
    - the curve: C(t) = the fraction of samples with pIA <= t, at t = 0.05 * i, i = 0..20;
    - "AOC" = the trapezoidal area (sklearn.metrics.auc) under C(t) over [0, 1]. Since C is
      the cumulative distribution of pIA, this is the area over the curve of the fraction of
      samples with pIA > t (hence the name): 1 when no pixel is ever predicted, near 0 for a
      model that lights up the whole frame whatever it hears. Higher is better.

    pred_maps: (B, H, W) maps of the negative pairs, NOT min-max normalised (vssl_eval
    thresholds the raw upsampled similarity: normalising would stretch any negative map to
    [0, 1]). threshold: a number (one for every sample: their --threshold 0.5, or a model's
    calibrated value), an array (B,) (each sample's own), or a rule of `ciou` ("median_gt",
    "median_ge", "adaptive") computed on `positive_maps` (B, H, W), the same images with
    their own audio, at the same scale (with `gt_maps` for "adaptive"): "the threshold the
    positive set uses", their thrciou / thrciouadap. The negative map is always compared
    with `>`, as vssl_eval does.

    Returns {"pIA", "AOC", "N", "pia" (B,), "threshold" (B,), "curve": (t, C(t)),
    "quantiles": {"min", "q25", "median", "q75", "max"}, "histogram": counts of pIA in the
    20 bins [0, 0.05), ..., [0.95, 1.0]}.
    """
    maps = _checked_maps(pred_maps)
    n, n_pixels = maps.shape[0], maps.shape[1] * maps.shape[2]
    if isinstance(threshold, str):
        if positive_maps is None:
            raise ValueError(f"threshold {threshold!r} is a rule of the positive maps: pass "
                             "positive_maps")
        pos = np.asarray(positive_maps)
        if pos.shape != maps.shape:
            raise ValueError(f"positive_maps {pos.shape} differ from pred_maps {maps.shape}")
        if threshold == "adaptive" and gt_maps is None:
            raise ValueError("the adaptive threshold needs gt_maps")
        gt = (np.zeros(maps.shape, np.float32) if gt_maps is None else np.asarray(gt_maps))
        if gt.shape != maps.shape:
            raise ValueError(f"gt_maps {gt.shape} differ from pred_maps {maps.shape}")
        thr = np.concatenate([
            _prediction_thresholds(pos[i : i + _CHUNK].reshape(-1, n_pixels), threshold,
                                   gt[i : i + _CHUNK].reshape(-1, n_pixels))
            for i in range(0, n, _CHUNK)]).astype(np.float64)
    else:
        thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n,)).copy()
        if not np.all(np.isfinite(thr)):
            raise ValueError("threshold holds non-finite values")
    pia = np.empty(n, dtype=np.float64)
    for start in range(0, n, _CHUNK):
        flat = maps[start : start + _CHUNK].reshape(-1, n_pixels)
        t_chunk = thr[start : start + _CHUNK, None].astype(flat.dtype)
        pia[start : start + len(flat)] = np.count_nonzero(flat > t_chunk, axis=1) / n_pixels
    return {**pia_summary(pia, thresholds), "threshold": thr}


def pia_summary(pia, thresholds=AUC_THRESHOLDS) -> dict:
    """The set-level part of `negative_audio_pia` from per-sample pIA values (B,) in [0, 1]:
    {"pIA", "AOC", "N", "pia", "curve", "quantiles", "histogram"}, defined there. The
    evaluator computes pIA batch by batch and summarises once."""
    pia = np.asarray(pia, dtype=np.float64).reshape(-1)
    if pia.size == 0:
        raise ValueError("no pIA values")
    if not np.all((pia >= 0) & (pia <= 1)):
        raise ValueError("pIA values must lie in [0, 1]")
    t = np.asarray(thresholds, dtype=np.float64)
    curve = np.mean(pia[None, :] <= t[:, None], axis=1)
    q = np.quantile(pia, [0.0, 0.25, 0.5, 0.75, 1.0])
    hist, _ = np.histogram(pia, bins=np.linspace(0.0, 1.0, 21))
    return {"pIA": float(pia.mean()), "AOC": _trapezoid(t, curve), "N": int(pia.size),
            "pia": pia, "curve": (t, curve),
            "quantiles": dict(zip(("min", "q25", "median", "q75", "max"),
                                  (float(v) for v in q), strict=True)),
            "histogram": hist.astype(np.int64)}


def pooled_image_embeddings(image_maps, pooling: str = "mean") -> np.ndarray:
    """The image embedding of cross-modal retrieval (docs/protocol.md section 9): V_i (B, h,
    w, D), the per-position L2-normalised projected map of section 2, pooled over h, w and
    L2-normalised again, float64 (B, D). pooling "mean" (the default: the spatial mean of
    V_i) or "max" (the channel-wise maximum over positions). No public evaluator of these
    models states a pooling; this one is sslocal's, named in the results."""
    if pooling not in RETRIEVAL_POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {RETRIEVAL_POOLINGS}")
    v = np.asarray(image_maps, dtype=np.float64)
    if v.ndim != 4:
        raise ValueError(f"expected image maps (B, h, w, D), got shape {v.shape}")
    pooled = v.mean(axis=(1, 2)) if pooling == "mean" else v.max(axis=(1, 2))
    return _unit_rows(pooled, "pooled image maps")


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected {name} (N, D) with N > 0, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} hold non-finite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{name} hold a zero vector (no cosine similarity)")
    return x / norms


def retrieval_recall(image_embeddings, audio_embeddings, ks=(1, 5, 10)) -> dict:
    """Cross-modal retrieval on paired embeddings (docs/protocol.md section 9): image i and
    audio i are a pair. Similarities are cosine: both sides L2-normalised in float64, s_ij =
    <audio_i, image_j>.

    - audio -> image: for audio query i, the images ranked by s_i.; R@k = the fraction of
      queries whose own image is among the first k;
    - image -> audio: for image query j, the audios ranked by s_.j.
    The rank of the true item is 1 + the number of other items at least as similar (ties
    count against the query, the pessimistic convention). Also the median rank "MedR".
    image_embeddings: pooled image maps (`pooled_image_embeddings`), audio_embeddings: the
    audio vectors A_i. Returns {"audio_to_image": {"R@k", ..., "MedR"}, "image_to_audio":
    {...}, "N"}.
    """
    img = _unit_rows(image_embeddings, "image_embeddings")
    aud = _unit_rows(audio_embeddings, "audio_embeddings")
    if img.shape != aud.shape:
        raise ValueError(f"image {img.shape} and audio {aud.shape} embeddings differ")
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError("every k must be >= 1")
    n = img.shape[0]
    ranks = {"audio_to_image": np.empty(n, np.int64), "image_to_audio": np.empty(n, np.int64)}
    for start in range(0, n, 1024):  # 1024 query rows at a time: 40 MB at N = 5,000
        rows = slice(start, start + 1024)
        a2i = aud[rows] @ img.T  # (q, N)
        i2a = img[rows] @ aud.T
        idx = np.arange(start, start + a2i.shape[0])
        for name, sim in (("audio_to_image", a2i), ("image_to_audio", i2a)):
            true = sim[np.arange(sim.shape[0]), idx][:, None]
            ranks[name][rows] = np.sum(sim >= true, axis=1)
    out: dict = {"N": int(n)}
    for name, r in ranks.items():
        out[name] = {f"R@{k}": float(np.mean(r <= k)) for k in ks}
        out[name]["MedR"] = float(np.median(r))
    return out


def _checked_maps(pred_maps) -> np.ndarray:
    """(B, H, W) maps with B > 0, finite, as a float array."""
    maps = np.asarray(pred_maps)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"expected maps (B, H, W) with B > 0, got shape {maps.shape}")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    if not np.all(np.isfinite(maps)):
        raise ValueError("pred_maps hold non-finite values")
    return maps
