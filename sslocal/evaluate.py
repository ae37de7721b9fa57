"""Evaluation: the jitted eval step, exact scoring of every sample once, result files.

Maps are computed on the device; cIoU is scored on the host in float64 numpy exactly as the
reference protocol does (PROTOCOL.md sections 5-6). Evaluation batches are padded and masked,
so every sample of a test set counts exactly once on any number of devices and hosts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
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


def make_map_fn(graphdef: nnx.GraphDef, *, upsample: str, ogl_graphdef: nnx.GraphDef | None = None,
           ogl_alpha: float = 0.4):
    """The pure eval computation (variables, image, spec) -> {"raw": upsampled alpha_ii,
    "av": its min-max map[, "ogl": the fused map]}.

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

    return step


def make_eval_step(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, *, upsample: str,
                   ogl_graphdef: nnx.GraphDef | None = None, ogl_alpha: float = 0.4):
    """jit(variables, image, spec) -> the maps of `make_map_fn`, sharded over the batch."""
    step = make_map_fn(graphdef, upsample=upsample, ogl_graphdef=ogl_graphdef, ogl_alpha=ogl_alpha)
    return jax.jit(step, out_shardings=sharding.batch_sharded(mesh))


def eval_indices(batch_number: int, global_batch_size: int, process_index: int,
                 process_count: int) -> np.ndarray:
    """Test-set indices of the slots of this host's `batch_number`-th evaluation batch (values
    >= N are padding): the layout of pipeline.eval_loader, global batch k holding samples
    [k * G, (k + 1) * G) split contiguously over the hosts."""
    per_host = global_batch_size // process_count
    start = batch_number * global_batch_size + process_index * per_host
    return np.arange(start, start + per_host)


@dataclass
class EvalResult:
    """Every sample of one test set in the test set's order (ids[i] is source[i]'s clip), and
    the summary of each map kind."""

    name: str
    ids: list[str]
    cious: dict[str, np.ndarray]  # "av" (and "ogl") -> (N,)
    confidence: np.ndarray
    sounding: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


MapFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


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
        maps = dict(upsample=config.eval.upsample, ogl_graphdef=self.ogl_graphdef,
                    ogl_alpha=config.eval.ogl_alpha)
        self.step = make_eval_step(graphdef, mesh, **maps)
        self._local_step = jax.jit(make_map_fn(graphdef, **maps))

    def variant(self) -> dict:
        return metrics.protocol_variant(self.threshold, self.config.eval.upsample,
                                        self.config.eval.ogl_alpha if self.ogl_graphdef else None)

    def _variables(self, params, batch_stats) -> dict[str, Any]:
        variables = {"params": params, "batch_stats": batch_stats}
        if self.ogl_state is not None:
            variables["ogl"] = self.ogl_state
        return variables

    def run(self, params, batch_stats, source, name: str) -> EvalResult:
        """Scores every sample of `source` exactly once (collective: every process calls it)."""
        if len(source) == 0:
            raise ValueError(f"test set {name} is empty")
        variables = self._variables(params, batch_stats)
        kinds = ["av", "ogl"] if self.ogl_state is not None else ["av"]
        global_batch_size = self.config.eval_batch_size
        loader = pipeline.eval_loader(
            source, global_batch_size=global_batch_size,
            image_size=self.config.image_size, gt_format=data_prepare.gt_format(name),
            process_index=jax.process_index(), process_count=jax.process_count())
        ids, indices, cious, conf, sounding = [], [], {k: [] for k in kinds}, [], []
        batches = progress(iterable=loader, desc=f"eval {name}",
                           disable=jax.process_index() != 0)
        for k, batch in enumerate(batches):
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
            indices.append(eval_indices(k, global_batch_size, jax.process_index(),
                                        jax.process_count())[keep])
        # Hosts hold interleaved slices of the test set: gather, then back to its order.
        index = sharding.gather_to_all(np.concatenate(indices))
        order = np.argsort(index, kind="stable")
        if not np.array_equal(index[order], np.arange(len(source))):
            raise RuntimeError(f"evaluation of {name} scored {len(index)} samples for a test set "
                               f"of {len(source)}: a sample was dropped or repeated")
        all_ids = _gather_ids(ids)
        result = EvalResult(
            name=name,
            ids=[all_ids[i] for i in order],
            cious={k: sharding.gather_to_all(np.concatenate(v))[order] for k, v in cious.items()},
            confidence=sharding.gather_to_all(np.concatenate(conf))[order],
            sounding=sharding.gather_to_all(np.concatenate(sounding))[order],
        )
        result.summary = summarize(result, self.variant())
        return result

    def local_maps(self, params, batch_stats) -> MapFn:
        """(image (n, S, S, 3), spec (n, 257, 200, 1)) -> numpy maps ("raw", "av"[, "ogl"]) of
        a few host-local samples (report overlays), on this process's first device: no
        collectives, so process 0 may call it alone."""
        device = jax.local_devices()[0]
        variables = jax.device_put(jax.device_get(self._variables(params, batch_stats)), device)

        def maps(image: np.ndarray, spec: np.ndarray) -> dict[str, np.ndarray]:
            out = self._local_step(variables, jax.device_put(np.asarray(image), device),
                                   jax.device_put(np.asarray(spec), device))
            return {k: np.asarray(v) for k, v in out.items()}

        return maps

    def run_all(self, params, batch_stats, sources: dict[str, Any], *,
                report_dir: str | Path | None = None, label: str = "model") -> dict[str, dict]:
        """The summary of every test set; with `report_dir`, also report.html there."""
        results = {name: self.run(params, batch_stats, source, name)
                   for name, source in sources.items()}
        if report_dir is not None and jax.process_index() == 0:
            from sslocal import report

            collector = report.Report(self.config, sources)
            collector.add_model(label, results, self.local_maps(params, batch_stats))
            collector.write(report_dir)
        return {name: result.summary for name, result in results.items()}


def summarize(result: EvalResult, variant: dict) -> dict[str, Any]:
    """cIoU@0.5, AUC, mean cIoU and N of each map kind on the sounding samples; AP and max-F1
    when the set holds non-sounding pairs (extended evaluation); the protocol variant."""
    summary: dict[str, Any] = {}
    sounding = result.sounding
    for kind, cious in result.cious.items():
        prefix = "" if kind == "av" else "ogl_"
        for key, value in metrics.summarize(cious[sounding]).items():
            summary[prefix + key] = value
    if not sounding.all():
        extended = metrics.extended_metrics(result.cious["av"], result.confidence, sounding)
        summary.update(AP=extended["AP"], max_F1=extended["max_F1"],
                       N_non_sounding=int((~sounding).sum()))
    summary["protocol_variant"] = variant
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
            lines.append(f"{'':<40} AP {100 * s['AP']:.2f}  max-F1 {100 * s['max_F1']:.2f}  "
                         f"({s['N_non_sounding']} non-sounding)")
    variants = {json.dumps(s["protocol_variant"], sort_keys=True): s["protocol_variant"]
                for s in rows.values() if "protocol_variant" in s}
    for v in variants.values():
        lines.append(f"protocol: pred = {v['threshold_rule']}, upsample {v['upsample']}"
                     + (f", OGL alpha {v['ogl_alpha']}" if v["ogl_alpha"] is not None else ""))
    return "\n".join(lines)


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "result"


def write_results(out: Path, label: str, result: EvalResult) -> Path:
    """per_sample/<label>.json: every sample's cIoU (test-set order), with the protocol variant."""
    (out / "per_sample").mkdir(parents=True, exist_ok=True)
    per_sample = {"label": label, "test_set": result.name,
                  "protocol_variant": result.summary.get("protocol_variant"),
                  "checkpoint": result.summary.get("checkpoint"),
                  "ids": result.ids, "sounding": result.sounding.tolist(),
                  "confidence": result.confidence.tolist(),
                  **{f"cIoU_{k}": v.tolist() for k, v in result.cious.items()}}
    path = out / "per_sample" / f"{_file_name(label)}.json"
    path.write_text(json.dumps(per_sample))
    return path


def model_labels(checkpoints: list[str | Path]) -> list[str]:
    """Short unique names: the shortest path suffix that tells the checkpoints apart
    ("a/best", "b/best"); the same path given twice gets " (2)"."""
    parts = [Path(os.path.abspath(c)).parts for c in checkpoints]
    for depth in range(1, max(map(len, parts), default=0) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    labels = [str(Path(*p)) for p in parts]
    return [label if labels[:i].count(label) == 0 else f"{label} ({labels[:i].count(label) + 1})"
            for i, label in enumerate(labels)]


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
         report: bool = False, out: str | None = None, dataset: str | None = None,
         baselines: bool = False) -> dict:
    """`sslocal evaluate`: every checkpoint on every test set; table, metrics.json, per-sample
    cIoU and, with `report`, report.html (the models side by side). With `baselines`, also
    the centre prior, a random map, the oracle and the untrained model (sslocal.baselines), and
    the share of the gap from the best non-oracle baseline to the oracle each model closes."""
    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval_batch_size, mesh)
    names = [dataset] if dataset else list(config.test_datasets)
    data_dir = os.path.expanduser(config.data_dir)
    sources = {name: data_prepare.load_split(name, "test", data_dir) for name in names}
    out_dir = Path(out or Path(checkpoints[0]) / "eval")
    is_main = jax.process_index() == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    collector = None
    if report and is_main:
        from sslocal import report as report_lib

        collector = report_lib.Report(config, sources)
    summaries = {}
    for checkpoint, model in zip(checkpoints, model_labels(checkpoints), strict=True):
        graphdef, params, batch_stats, what = load_for_eval(checkpoint, config, mesh)
        evaluator = Evaluator(config, graphdef, mesh, ogl=ogl)
        results = {}
        for name, source in sources.items():
            result = evaluator.run(params, batch_stats, source, name)
            result.summary["checkpoint"] = what
            label = f"{model} / {name}"
            results[name], summaries[label] = result, result.summary
            if is_main:
                write_results(out_dir, label, result)
        if collector is not None:
            collector.add_model(model, results, evaluator.local_maps(params, batch_stats))
    if baselines:
        summaries.update(_baseline_rows(config, sources, mesh, graphdef, collector))
        if is_main:
            summaries["gap_closed"] = _gap_closed(summaries, checkpoints, sources)
    if is_main:
        print(format_table({k: v for k, v in summaries.items() if k != "gap_closed"}))
        for label, gap in summaries.get("gap_closed", {}).items():
            print(f"{label}: closes {100 * gap['cIoU']:.1f}% of the cIoU@0.5 gap and "
                  f"{100 * gap['AUC']:.1f}% of the AUC gap from {gap['best_baseline']} to the "
                  "oracle")
        (out_dir / "metrics.json").write_text(json.dumps(summaries, indent=2))
        print(f"wrote {out_dir / 'metrics.json'} and per_sample/")
        if collector is not None:
            print(f"wrote {collector.write(out_dir)}")
    return summaries


def _baseline_rows(config, sources, mesh, graphdef, collector) -> dict[str, dict]:
    """Summaries of the reference maps and of the untrained model on every test set."""
    from sslocal import baselines as baselines_lib

    model = factory.build_model(config.model, seed=config.seed)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = jax.device_put((params, batch_stats), sharding.replicated(mesh))
    evaluator = Evaluator(config, graphdef, mesh, ogl=False)
    rows, untrained = {}, {}
    for name, source in sources.items():
        untrained[name] = evaluator.run(params, batch_stats, source, name)
        rows[f"untrained / {name}"] = untrained[name].summary
        for kind, summary in baselines_lib.evaluate_baselines(
                source, gt_format=data_prepare.gt_format(name), image_size=config.image_size,
                batch_size=config.eval_batch_size, seed=config.seed,
                threshold=parse_threshold(config.eval.threshold)).items():
            rows[f"{kind} / {name}"] = summary
    if collector is not None:
        collector.add_model("untrained", untrained, evaluator.local_maps(params, batch_stats))
    return rows


def _gap_closed(summaries, checkpoints, sources) -> dict[str, dict]:
    from sslocal import baselines as baselines_lib

    gaps = {}
    for model in model_labels(checkpoints):
        for name in sources:
            candidates = [f"{kind} / {name}" for kind in ("center", "random", "untrained")]
            best = {key: max(candidates, key=lambda c, key=key: summaries[c][key])
                    for key in ("cIoU", "AUC")}
            oracle, trained = summaries[f"oracle / {name}"], summaries[f"{model} / {name}"]
            gaps[f"{model} / {name}"] = {
                key: baselines_lib.gap_closed(trained[key], summaries[best[key]][key],
                                              oracle[key]) for key in ("cIoU", "AUC")}
            gaps[f"{model} / {name}"]["best_baseline"] = best["cIoU"].split(" / ")[0]
    return gaps
