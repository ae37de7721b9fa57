"""Evaluation: the jitted eval step, exact scoring of every sample once, result files.

Maps are computed on the device; cIoU is scored on the host in float64 numpy exactly as the
reference protocol does (PROTOCOL.md sections 5-6). Evaluation batches are padded and masked,
so every sample of a test set counts exactly once on any number of devices and hosts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sslocal import checkpointing, localization, metrics, sharding
from sslocal.data import pipeline
from sslocal.data import prepare as data_prepare
from sslocal.models import factory
from sslocal.models.av_model import diagonal_map
from sslocal.writers import progress

ID_BYTES = 64  # clip ids travel between hosts as fixed-width bytes


def parse_threshold(value: str | float) -> str | float:
    """"median_ge" / "median_gt" stay rules; anything else is a fixed threshold."""
    if isinstance(value, str) and value in metrics.THRESHOLDS:
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"eval.threshold must be one of {metrics.THRESHOLDS} or a number, "
                         f"not {value!r}") from None


def make_eval_step(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, *, upsample: str,
                   ogl_graphdef: nnx.GraphDef | None = None, ogl_alpha: float = 0.4):
    """jit(variables, image, spec) -> {"raw": upsampled alpha_ii, "av": its min-max map[, "ogl"]}.

    `raw` (un-normalised) gives the detection confidence of the extended evaluation.
    """

    def step(variables, image, spec):
        model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
        model.eval()
        V, A = model(image, spec)
        raw = localization.upsample_maps(diagonal_map(V, A), 224, upsample)
        out = {"raw": raw, "av": localization.minmax_normalize(raw)}
        if ogl_graphdef is not None:
            ogl_net = nnx.merge(ogl_graphdef, variables["ogl"])
            obj = localization.object_map(ogl_net(image), 224, upsample)
            out["ogl"] = localization.fuse_ogl(out["av"], obj, ogl_alpha)
        return out

    return jax.jit(step, out_shardings=sharding.batch_sharded(mesh))


@dataclass
class EvalResult:
    """Every sample of one test set, in loader order, and the summary of each map kind."""

    name: str
    ids: list[str]
    cious: dict[str, np.ndarray]  # "av" (and "ogl") -> (N,)
    confidence: np.ndarray
    sounding: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


class Evaluator:
    """Scores a model's maps on test sets; used by training and by `sslocal evaluate`."""

    def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 mesh: jax.sharding.Mesh, *, ogl: bool | None = None):
        self.config = config
        self.mesh = mesh
        self.threshold = parse_threshold(config.eval.threshold)
        use_ogl = config.eval.ogl if ogl is None else ogl
        self.ogl_graphdef, self.ogl_state = (None, None)
        if use_ogl:
            self.ogl_graphdef, self.ogl_state = factory.build_ogl(config.eval.ogl_weights)
            self.ogl_state = jax.device_put(self.ogl_state, sharding.replicated(mesh))
        self.step = make_eval_step(graphdef, mesh, upsample=config.eval.upsample,
                                   ogl_graphdef=self.ogl_graphdef, ogl_alpha=config.eval.ogl_alpha)

    def variant(self) -> dict:
        return metrics.protocol_variant(self.threshold, self.config.eval.upsample,
                                        self.config.eval.ogl_alpha if self.ogl_graphdef else None)

    def run(self, params, batch_stats, source, name: str) -> EvalResult:
        variables = {"params": params, "batch_stats": batch_stats}
        if self.ogl_state is not None:
            variables["ogl"] = self.ogl_state
        kinds = ["av", "ogl"] if self.ogl_state is not None else ["av"]
        loader = pipeline.eval_loader(
            source, global_batch_size=self.config.eval_batch_size,
            image_size=self.config.image_size, gt_format=data_prepare.gt_format(name),
            process_index=jax.process_index(), process_count=jax.process_count())
        ids, cious, conf, sounding = [], {k: [] for k in kinds}, [], []
        for batch in progress(iterable=loader, desc=f"eval {name}",
                              disable=jax.process_index() != 0):
            global_batch = sharding.to_global(
                {"image": batch["image"], "spec": batch["spec"]}, self.mesh)
            out = self.step(variables, global_batch["image"], global_batch["spec"])
            keep = np.asarray(batch["mask"], bool)
            gt = np.asarray(batch["gt_map"])[keep]
            for kind in kinds:
                maps = sharding.to_host_local(out[kind], self.mesh)[keep]
                cious[kind].append(metrics.ciou(maps, gt, self.threshold))
            conf.append(metrics.confidence(sharding.to_host_local(out["raw"], self.mesh)[keep]))
            ids.extend(str(i) for i in np.asarray(batch["id"])[keep])
            sounding.append(np.asarray(batch["sounding"], bool)[keep])
        result = EvalResult(
            name=name,
            ids=_gather_ids(ids),
            cious={k: sharding.gather_to_all(np.concatenate(v)) for k, v in cious.items()},
            confidence=sharding.gather_to_all(np.concatenate(conf)),
            sounding=sharding.gather_to_all(np.concatenate(sounding)),
        )
        result.summary = summarize(result, self.variant())
        return result

    def run_all(self, params, batch_stats, sources: dict[str, Any]) -> dict[str, dict]:
        return {name: self.run(params, batch_stats, source, name).summary
                for name, source in sources.items()}


def summarize(result: EvalResult, variant: dict) -> dict[str, Any]:
    """cIoU@0.5, AUC, mean cIoU and N of each map kind on the sounding samples; AP and max-F1
    when the set holds non-sounding pairs (extended evaluation)."""
    summary: dict[str, Any] = {"N": len(result.ids), "protocol": variant}
    sounding = result.sounding
    for kind, cious in result.cious.items():
        prefix = "" if kind == "av" else "ogl_"
        for key, value in metrics.summarize(cious[sounding]).items():
            summary[prefix + key] = value
    if not sounding.all():
        extended = metrics.extended_metrics(result.cious["av"], result.confidence, sounding)
        summary.update(AP=extended["AP"], max_F1=extended["max_F1"],
                       N_non_sounding=int((~sounding).sum()))
    return summary


def _gather_ids(ids: list[str]) -> list[str]:
    if jax.process_count() == 1:
        return ids
    encoded = np.zeros((len(ids), ID_BYTES), np.uint8)
    for row, clip_id in enumerate(ids):
        raw = clip_id.encode("utf-8")[:ID_BYTES]
        encoded[row, :len(raw)] = np.frombuffer(raw, np.uint8)
    gathered = sharding.gather_to_all(encoded)
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in gathered]


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of the headline metrics (x 100), one row per (model, test set)."""
    header = f"{'model / test set':<40} {'cIoU':>7} {'AUC':>7} {'meanIoU':>8} {'N':>6}"
    lines = [header, "-" * len(header)]
    for label, s in rows.items():
        lines.append(f"{label:<40} {100 * s['cIoU']:7.2f} {100 * s['AUC']:7.2f} "
                     f"{100 * s['mean_cIoU']:8.2f} {s['N']:6d}")
        if "ogl_cIoU" in s:
            lines.append(f"{label + ' + OGL':<40} {100 * s['ogl_cIoU']:7.2f} "
                         f"{100 * s['ogl_AUC']:7.2f} {100 * s['ogl_mean_cIoU']:8.2f} {s['N']:6d}")
        if "AP" in s:
            lines.append(f"{'':<40} AP {100 * s['AP']:.2f}  max-F1 {100 * s['max_F1']:.2f}")
    return "\n".join(lines)


def write_results(out: Path, label: str, result: EvalResult) -> None:
    """metrics.json gets the summary; per_sample/<label>.json every sample's cIoU."""
    (out / "per_sample").mkdir(parents=True, exist_ok=True)
    per_sample = {"ids": result.ids, "sounding": result.sounding.tolist(),
                  "confidence": result.confidence.tolist(),
                  **{f"cIoU_{k}": v.tolist() for k, v in result.cious.items()}}
    safe = label.replace("/", "_").replace(" ", "_")
    (out / "per_sample" / f"{safe}.json").write_text(json.dumps(per_sample))


def load_for_eval(checkpoint: str | Path, config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh):
    """(graphdef, params, batch_stats, description) of a workdir or a model directory."""
    model_config = checkpointing.read_model_config(checkpoint)
    model = factory.build_model(ml_collections.ConfigDict(
        {**config.model.to_dict(), **model_config, "image_pretrained": ""}), seed=0)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    replicated = sharding.replicated(mesh)
    params, batch_stats = jax.device_put((params, batch_stats), replicated)
    params, batch_stats, what = checkpointing.load_model_variables(checkpoint, params, batch_stats)
    return graphdef, params, batch_stats, what


def main(config: ml_collections.ConfigDict, checkpoints: list[str], *, ogl: bool = False,
         report: bool = False, out: str | None = None, dataset: str | None = None) -> dict:
    """`sslocal evaluate`: every checkpoint on every test set; table, metrics.json, report."""
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval_batch_size, mesh)
    names = [dataset] if dataset else list(config.test_datasets)
    sources = {name: data_prepare.load_split(name, "test", config.data_dir) for name in names}
    out_dir = Path(out or Path(checkpoints[0]) / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries, results = {}, {}
    for checkpoint in checkpoints:
        graphdef, params, batch_stats, what = load_for_eval(checkpoint, config, mesh)
        evaluator = Evaluator(config, graphdef, mesh, ogl=ogl)
        for name, source in sources.items():
            label = f"{Path(checkpoint).name} / {name}"
            result = evaluator.run(params, batch_stats, source, name)
            result.summary["checkpoint"] = what
            summaries[label], results[label] = result.summary, result
            if jax.process_index() == 0:
                write_results(out_dir, label, result)
    if jax.process_index() == 0:
        print(format_table(summaries))
        (out_dir / "metrics.json").write_text(json.dumps(summaries, indent=2))
        if report:
            from sslocal import report as report_lib

            report_lib.write_report(out_dir, config, checkpoints, sources, results)
    return summaries
