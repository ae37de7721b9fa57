"""Evaluation metrics (docs/protocol.md section 6): ground-truth maps, cIoU, AUC, SLAVC AP / max-F1.

Host-side numpy, vectorised over the batch (5,000 VGG-SS samples score in seconds). Maps are
(B, S, S); boxes are (xmin, ymin, xmax, ymax) integer pixel coordinates, end exclusive.
"""

from collections.abc import Sequence

import numpy as np

GT_FORMATS = ("flickr", "vggss")
THRESHOLDS = ("median_ge", "median_gt")
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


def _prediction_thresholds(flat: np.ndarray, threshold) -> np.ndarray:
    if isinstance(threshold, str):
        if threshold not in THRESHOLDS:
            raise ValueError(f"unknown threshold {threshold!r}; use {THRESHOLDS} or a float")
        k = flat.shape[1] // 2  # index S*S/2 of the ascending sort (25,088 for 224 x 224)
        return np.partition(flat, k, axis=1)[:, k]
    return np.full(flat.shape[0], float(threshold), dtype=flat.dtype)


def ciou(pred_maps, gt_maps, threshold="median_ge") -> np.ndarray:
    """Per-sample consensus IoU (B,) float64.

    pred = map >= thr ("median_ge", the protocol: thr = the value at index S*S // 2 of the
    ascending sort of the map), map > thr ("median_gt"), or map >= threshold (a float).
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
    out = np.empty(pred_maps.shape[0], dtype=np.float64)
    for start in range(0, pred_maps.shape[0], _CHUNK):
        flat = pred_maps[start : start + _CHUNK].reshape(-1, n_pixels)
        gt = gt_maps[start : start + _CHUNK].reshape(flat.shape)
        thr = _prediction_thresholds(flat, threshold)[:, None]
        strict = isinstance(threshold, str) and threshold == "median_gt"
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


def extended_metrics(cious, confidences, sounding, ciou_threshold: float = 0.5) -> dict:
    """SLAVC extended evaluation: {"AP", "max_F1", "precision", "recall", "thresholds"}.

    Every sample is a detection ranked by confidence (descending). A sounding sample with
    cIoU >= ciou_threshold is a true positive, every other detection (a non-sounding pair, or a
    miss) a false positive; recall = TP / number of sounding samples. One operating point per
    distinct confidence (ties enter together, as in sklearn's precision_recall_curve).
    AP = sum_k (R_k - R_{k-1}) P_k, the step sum of sklearn's average_precision_score (no
    interpolation); max_F1 = max over operating points of 2PR / (P + R) (0 where P + R = 0).
    """
    c = np.asarray(cious, dtype=np.float64).reshape(-1)
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    snd = np.asarray(sounding, dtype=bool).reshape(-1)
    if not (c.size == conf.size == snd.size):
        raise ValueError(
            f"lengths differ: cious {c.size}, confidences {conf.size}, sounding {snd.size}"
        )
    if not snd.any():
        raise ValueError("no sounding samples: recall is undefined")
    order = np.argsort(-conf, kind="stable")
    tp = (snd & (c >= ciou_threshold))[order]
    # Last index of each run of equal confidences: the operating points.
    last = np.flatnonzero(np.append(np.diff(conf[order]) != 0, True))
    ctp = np.cumsum(tp)[last]
    n_det = last + 1
    precision = ctp / n_det
    recall = ctp / snd.sum()
    ap = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    pr = precision + recall
    f1 = np.divide(2 * precision * recall, pr, out=np.zeros_like(pr), where=pr > 0)
    return {
        "AP": ap,
        "max_F1": float(f1.max()),
        "precision": precision,
        "recall": recall,
        "thresholds": conf[order][last],
    }


_THRESHOLD_RULES = {
    "median_ge": "map >= sorted(map)[S*S//2]",
    "median_gt": "map > sorted(map)[S*S//2]",
}


def protocol_variant(
    threshold="median_ge", upsample: str = "bilinear_align_corners", ogl_alpha=None
) -> dict:
    """The evaluation conventions in use, for result files."""
    return {
        "prediction_threshold": threshold,
        "threshold_rule": _THRESHOLD_RULES.get(threshold, f"map >= {threshold}"),
        "upsample": upsample,
        "normalisation": "per-sample min-max, constant map kept",
        "ogl_alpha": ogl_alpha,
        "ciou": "sum(pred*gt) / (sum(gt) + sum(pred*[gt==0])), gt values not binarised",
        "gt": {"flickr": "sum of boxes / 2, capped at 1", "vggss": "union of boxes, binarised"},
        "cIoU_reported": "fraction of samples with cIoU >= 0.5",
        "auc": "trapezoid of success(t) = fraction cIoU >= t, t = linspace(0, 1, 21)",
        "extended": "AP step sum, recall over sounding samples; max-F1 over distinct confidences",
    }


PROTOCOL_VARIANT = protocol_variant()
