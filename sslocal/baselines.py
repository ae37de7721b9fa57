"""Reference maps scored by the same protocol as a model: what the numbers mean.

- "center": a centred isotropic Gaussian. Only the ranking of pixels matters to the protocol
  (the top half of the map is the prediction), so this is "predict the central disk".
- "random": i.i.d. uniform noise, seeded: a random half of the pixels.
- "oracle": the ground-truth box itself, ranked by distance outside it so that the protocol's
  median threshold (the top half of the pixels) takes the box and the ring nearest to it. A
  plain 0/1 box map would tie at 0 on more than half of the pixels and `>=` would predict the
  whole frame. Boxes of 25-45% of the frame then score cIoU = box / half = 0.5-0.9: the
  protocol's ceiling.
The untrained model, the fourth baseline, is an Evaluator run on freshly initialised weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from sslocal import metrics
from sslocal.data import pipeline

KINDS = ("center", "random", "oracle")
# One line per baseline row of the tables (report.html, metrics.json's row names).
DESCRIPTIONS = {
    "center": "centre prior: a centred Gaussian, i.e. predict the central disk",
    "random": "random map: i.i.d. uniform noise (seeded), i.e. a random half of the pixels",
    "oracle": "oracle: the ground-truth box ranked by distance outside it (the ceiling)",
    "untrained": "untrained model: config.model as training initialises it (config.seed)",
}


def center_map(size: int = 224) -> np.ndarray:
    grid = np.arange(size) - (size - 1) / 2
    sigma = size / 4
    return np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * sigma**2))


def oracle_maps(gt_maps: np.ndarray) -> np.ndarray:
    """1 inside the box, decreasing with the distance to it outside (in (0, 0.5])."""
    out = np.empty(gt_maps.shape, np.float64)
    for i, gt in enumerate(gt_maps):  # one C-level distance transform per sample
        inside = gt > 0
        if not inside.any():
            out[i] = 0.0
            continue
        distance = ndimage.distance_transform_edt(~inside)
        out[i] = np.where(inside, 1.0, 0.5 / (1.0 + distance))
    return out


def baseline_maps(kind: str, gt_maps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "center":
        return np.broadcast_to(center_map(gt_maps.shape[-1]), gt_maps.shape)
    if kind == "random":
        return rng.uniform(size=gt_maps.shape)
    if kind == "oracle":
        return oracle_maps(gt_maps)
    raise ValueError(f"unknown baseline {kind!r}; choose one of {KINDS}")


def evaluate_baselines(source: Any, *, gt_format: str, image_size: int, batch_size: int = 64,
                       seed: int = 0, threshold: str | float = "median_ge") -> dict[str, dict]:
    """{kind: metrics.summarize(...)} over the sounding samples of a test set, each once."""
    rng = np.random.default_rng(seed)
    cious: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}
    loader = pipeline.eval_loader(source, global_batch_size=batch_size, image_size=image_size,
                                  gt_format=gt_format, process_index=0, process_count=1)
    for batch in loader:
        keep = np.asarray(batch["mask"], bool) & np.asarray(batch["sounding"], bool)
        gt = np.asarray(batch["gt_map"])[keep]
        for kind in KINDS:
            cious[kind].append(metrics.ciou(baseline_maps(kind, gt, rng), gt, threshold))
    return {kind: metrics.summarize(np.concatenate(c)) for kind, c in cious.items()}


def gap_closed(model: float, best_baseline: float, oracle: float) -> float:
    """Share of the distance from the best non-oracle baseline to the oracle that a model
    covers (1 = as good as the oracle, 0 = no better than the baseline)."""
    return (model - best_baseline) / max(oracle - best_baseline, 1e-12)
