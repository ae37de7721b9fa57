"""`sslocal evaluate`: models in; the metric table, metrics.json, per-sample files, report.html.

`evaluate_models` is what training's final pass and the command share: every model on every test
set through one `Evaluator`, the reference baselines and the share of the gap each model
closes, and the result files. `main` adds what only the command does: load the test sets and
the models (`sslocal.models.load`, any workdir, model directory or PyTorch file).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sslocal import sharding
from sslocal.data import prepare as data_prepare
from sslocal.evaluator import EvalResult, Evaluator
from sslocal.models import factory, load
from sslocal.models.load import LoadedModel
from sslocal.writers import as_path, check_paths


def metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of the headline metrics (x 100), one row per (model, test set);
    on sets with non-sounding pairs, a line of the extended evaluation (all samples) naming
    its variant; the protocol variants last."""
    header = f"{'model / test set':<40} {'cIoU':>7} {'AUC':>7} {'meanIoU':>8} {'N':>6}"
    lines = [header, "-" * len(header)]
    for label, s in rows.items():
        lines.append(f"{label:<40} {100 * s['cIoU']:7.2f} {100 * s['AUC']:7.2f} "
                     f"{100 * s['mean_cIoU']:8.2f} {s['N']:6d}")
        if "ogl_cIoU" in s:
            lines.append(f"{label + ' + OGL':<40} {100 * s['ogl_cIoU']:7.2f} "
                         f"{100 * s['ogl_AUC']:7.2f} {100 * s['ogl_mean_cIoU']:8.2f} {s['N']:6d}")
        if "extended" in s:
            ext, n_silent = s["extended"], s.get("N_non_sounding", 0)
            shown = {name: ext["all"][name] for name in ("AP@50", "AP@75", "maxF1@50",
                                                         "Precision@50")}
            values = "  ".join(f"{name} " + ("n/a" if v is None else f"{100 * v:.2f}")
                               for name, v in shown.items())
            lines.append(f"{'':<40} extended ({ext['variant']}, all): {values}  "
                         f"({n_silent} non-sounding)")
        lines += [f"{'':<40} {line}" for line in benchmark_lines(s)]
    variants = {json.dumps(s["protocol_variant"], sort_keys=True): s["protocol_variant"]
                for s in rows.values() if "protocol_variant" in s}
    for v in variants.values():
        ogl = (f", OGL alpha {v['ogl_alpha']} ({v.get('ogl_fusion') or 'minmax'} fusion)"
               if v["ogl_alpha"] is not None else "")
        lines.append(f"protocol: pred = {v['threshold_rule']}, upsample {v['upsample']}{ogl}, "
                     f"extended {v.get('extended_variant', 'slavc')}")
    return "\n".join(lines)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def benchmark_lines(s: dict[str, Any]) -> list[str]:
    """The table's lines of a summary's benchmark numbers (x 100), each naming its variant:
    IS3's iIoU / iAUC and the adaptive threshold, AVSBench's masks, negative audio,
    retrieval (docs/protocol.md section 9)."""
    lines = []
    if "iIoU" in s:
        line = f"IS3 interactive: iIoU {_pct(s['iIoU'])} iAUC {_pct(s['iAUC'])} " \
               f"({s['N_images']} images)"
        if "adaptive" in s:
            a = s["adaptive"]
            line += (f"; adaptive threshold: cIoU {_pct(a['cIoU'])} AUC {_pct(a['AUC'])} "
                     f"iIoU {_pct(a.get('iIoU'))} iAUC {_pct(a.get('iAUC'))}")
        lines.append(line)
    if "mask" in s:
        m = s["mask"]
        others = "; ".join(f"{name} mIoU {_pct(v['mIoU'])} F {_pct(v['F'])}"
                           for name, v in m.get("other_variants", {}).items())
        lines.append(f"masks ({m['variant']}, {m['threshold']}): mIoU {_pct(s['mIoU'])} "
                     f"F {_pct(s['F'])} ({m['N']} frames, {m['N_F']} with a mask); {others}")
    if "negative_audio" in s:
        neg = s["negative_audio"]
        kinds = "; ".join(f"{kind} pIA {_pct(neg[kind]['pIA'])} AOC {_pct(neg[kind]['AOC'])}"
                          for kind in ("silence", "noise", "offscreen") if kind in neg)
        lines.append(f"negative audio (threshold {neg['threshold']}): {kinds}")
    if "retrieval" in s:
        r = s["retrieval"]
        sides = "; ".join(
            f"{side.replace('_to_', '->').replace('audio', 'a').replace('image', 'i')} "
            + " ".join(f"{k} {_pct(v)}" for k, v in r[side].items() if k.startswith("R@"))
            for side in ("audio_to_image", "image_to_audio"))
        lines.append(f"retrieval ({r['pooling']} pooling, N {r['N']}): {sides}")
    return lines


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "result"


def write_results(out: Path, label: str, result: EvalResult) -> Path:
    """per_sample/<label>.json: every sample's cIoU (test-set order), with the protocol
    variant; for the benchmark sets also (test-set order) "cIoU_<rule>_<kind>" (IS3's
    adaptive threshold), "image_id" (IS3's pairs), "mask_iou_<kind>", "mask_nonempty",
    "mask_F0_<kind>" and "mask_F_<kind>" (AVSBench: a frame's F-curve of the binarised map is
    F0 at threshold 0, where the whole frame is predicted, and F at every threshold above),
    "pIA_<kind>" and "pIA_threshold_<kind>" (negative audio) with "offscreen_id"; the
    retrieval embeddings go to per_sample/<label>.embeddings.npz ("image": V pooled, "audio":
    A, unnormalised float32)."""
    (out / "per_sample").mkdir(parents=True, exist_ok=True)
    per_sample = {"label": label, "test_set": result.name,
                  "protocol_variant": result.summary.get("protocol_variant"),
                  "checkpoint": result.summary.get("checkpoint"),
                  "test_subset": result.summary.get("test_subset"), "ids": result.ids,
                  "sounding": result.sounding.tolist(),
                  "confidence": result.confidence.tolist(),
                  "num_boxes": result.num_boxes.tolist(),
                  "area": None if result.areas is None else result.areas.tolist(),
                  **{f"cIoU_{k}": v.tolist() for k, v in result.cious.items()},
                  "benchmark": result.benchmark}
    for rule, per_kind in result.threshold_cious.items():
        per_sample.update({f"cIoU_{rule}_{k}": v.tolist() for k, v in per_kind.items()})
    if result.groups is not None:
        per_sample["image_id"] = list(result.groups)
    for kind, frames in result.mask_frames.items():
        f = np.asarray(frames["f"])
        if not np.all(f[:, 1:] == f[:, 1:2]):  # the binarised map: one value above 0
            raise RuntimeError("a binarised F-curve varies above threshold 0")
        per_sample[f"mask_iou_{kind}"] = frames["iou"].tolist()
        per_sample["mask_nonempty"] = frames["nonempty"].tolist()
        per_sample[f"mask_F0_{kind}"], per_sample[f"mask_F_{kind}"] = (f[:, 0].tolist(),
                                                                       f[:, 1].tolist())
    for kind, parts in result.negative.items():
        per_sample[f"pIA_{kind}"] = parts["pia"].tolist()
        per_sample[f"pIA_threshold_{kind}"] = parts["threshold"].tolist()
        if "partner" in parts:
            per_sample["offscreen_id"] = [result.ids[j] for j in parts["partner"].tolist()]
    if result.embeddings is not None:
        with (out / "per_sample" / f"{_file_name(label)}.embeddings.npz").open("wb") as f:
            np.savez(f, **{side: np.asarray(v, np.float32)
                           for side, v in result.embeddings.items()})
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


def untrained_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> LoadedModel:
    """The baseline "untrained" model: config.model as training initialises it (config.seed),
    whatever checkpoints are evaluated beside it."""
    net = factory.build_model(config.model, seed=config.seed)
    graphdef, params, batch_stats = nnx.split(net, nnx.Param, nnx.BatchStat)
    params, batch_stats = jax.device_put((params, batch_stats), sharding.replicated(mesh))
    return LoadedModel(graphdef=graphdef, params=params, batch_stats=batch_stats,
                       model_config=config.model.to_dict(), image_size=config.image_size,
                       description=f"config.model initialised with seed {config.seed}")


def evaluate_models(evaluator: Evaluator, models: Iterable[tuple[str, LoadedModel]],
                    sources: dict[str, Any], out_dir: str | Path, *, report: bool = False,
                    baselines: bool = False, subsets: dict[str, dict] | None = None
                    ) -> dict[str, dict]:
    """Every model on every test set: the table (printed), metrics.json and per_sample/ in
    out_dir and, with `report`, report.html (the models side by side). With `baselines`, also
    the centre prior, a random map, the oracle and the untrained model (sslocal.baselines), and
    the share of the gap from the best non-oracle baseline to the oracle each model closes.
    `models` may be a generator: each model is loaded only while it is evaluated.
    Collective: every process calls it; process 0 writes."""
    out_dir = as_path(out_dir)  # a folder or a gs:// URL, never folded into a local gs:/
    is_main = jax.process_index() == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    collector = None
    if report:
        from sslocal import report as report_lib

        collector = report_lib.Report(evaluator.config, sources)
    summaries, labels = {}, []
    for label, model in models:
        labels.append(label)
        results = {}
        for name, source in sources.items():
            result = evaluator.run(model, source, name)
            result.summary["checkpoint"] = model.description
            if subsets and name in subsets:
                result.summary["test_subset"] = subsets[name]
            results[name], summaries[f"{label} / {name}"] = result, result.summary
            if is_main:
                write_results(out_dir, f"{label} / {name}", result)
        if collector is not None:
            collector.add_model(label, results, functools.partial(evaluator.maps, model))
    if baselines:
        rows = _baseline_rows(evaluator, sources, collector)
        for label, row in rows.items():
            name = label.split(" / ", 1)[1]
            if subsets and name in subsets:
                row["test_subset"] = subsets[name]
        summaries.update(rows)
        summaries["gap_closed"] = _gap_closed(summaries, labels, sources)
        if collector is not None:  # report.html's table holds every row printed below
            from sslocal import baselines as baselines_lib

            collector.add_rows(rows, baselines_lib.DESCRIPTIONS)
    if is_main:
        print(metrics_table({k: v for k, v in summaries.items() if k != "gap_closed"}))
        for label, gap in summaries.get("gap_closed", {}).items():
            print(f"{label}: closes {100 * gap['cIoU']:.1f}% of the cIoU@0.5 gap and "
                  f"{100 * gap['AUC']:.1f}% of the AUC gap from {gap['best_baseline']} to the "
                  "oracle")
        (out_dir / "metrics.json").write_text(json.dumps(summaries, indent=2))
        print(f"wrote {out_dir / 'metrics.json'} and per_sample/")
        if collector is not None:
            print(f"wrote {collector.write(out_dir)}")
    return summaries


def main(config: ml_collections.ConfigDict, checkpoints: list[str], *, ogl: bool = False,
         report: bool = False, out: str | None = None, dataset: str | None = None,
         baselines: bool = False, ids: str | None = None, which: str = "best") -> dict:
    """`sslocal evaluate`: every checkpoint (workdir, model directory or PyTorch file) on every
    test set of the config (or of `dataset`: one name or several, comma-separated: "is3/test,
    avsbench/s4"), at the frame size each model was trained at. `ids`
    (or config.eval.ids_file): a list file restricting the test sets to its clips (a named
    test subset, recorded in every result; the ids a set lacks are printed and recorded).
    `which`: in a training workdir, its best checkpoint (by the first test set's cIoU, as the
    peers select it) or its "latest" (the last epoch); each result names the one it scored."""
    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    check_paths(*checkpoints, out, ids, config.data_dir)  # a missing `gcs` extra: one line, first
    mesh = sharding.make_mesh()
    evaluator = Evaluator(config, mesh, ogl=ogl)
    names = dataset_names(dataset) if dataset else list(config.test_datasets)
    data_dir = os.fspath(as_path(config.data_dir)) if config.data_dir else None
    sources = {name: data_prepare.load_split(name, "test", data_dir) for name in names}
    subsets = {}
    if ids or config.eval.ids_file:
        for name in names:
            sources[name], subsets[name] = data_prepare.restrict_to_ids(
                sources[name], ids or config.eval.ids_file, name)
            info = subsets[name]
            if info["N_missing"] and jax.process_index() == 0:
                print(f"{name}: {info['N_missing']} of the {info['size']} ids of {info['name']} "
                      f"are not in the prepared set (listed in metrics.json): "
                      f"{', '.join(info['missing'][:5])}{' ...' if info['N_missing'] > 5 else ''}")
    for checkpoint in checkpoints:  # a missing path fails before any model loads
        if not as_path(checkpoint).exists():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    models = ((label, load.load_model(checkpoint, mesh=mesh, which=which))
              for checkpoint, label in zip(checkpoints, model_labels(checkpoints), strict=True))
    return evaluate_models(evaluator, models, sources, out or default_out(checkpoints[0]),
                           report=report, baselines=baselines, subsets=subsets)


def dataset_names(dataset: str) -> list[str]:
    """`--dataset A,B,...`: the test sets, in order (a name given twice is an error)."""
    names = [name.strip() for name in dataset.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--dataset names no test set: {dataset!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--dataset names {', '.join(repeated)} more than once")
    return names


def default_out(checkpoint: str | Path) -> Path:
    """Where `sslocal evaluate` writes without --out: a new folder beside the (first) model,
    CHECKPOINT/evaluations/<time>/, so that no earlier result (a training run's eval/, an
    earlier evaluation) is overwritten or mixed with new files."""
    checkpoint = as_path(checkpoint)
    base = checkpoint if checkpoint.is_dir() else checkpoint.parent
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = base / "evaluations" / stamp, 1
    while out.exists():
        n += 1
        out = base / "evaluations" / f"{stamp}-{n}"
    return out


def _baseline_rows(evaluator: Evaluator, sources: dict[str, Any], collector) -> dict[str, dict]:
    """Summaries of the reference maps and of the untrained model on every test set."""
    from sslocal import baselines as baselines_lib

    config = evaluator.config
    model = untrained_model(config, evaluator.mesh)
    rows, untrained = {}, {}
    for name, source in sources.items():
        untrained[name] = evaluator.run(model, source, name)
        untrained[name].summary["checkpoint"] = model.description
        rows[f"untrained / {name}"] = untrained[name].summary
        for kind, summary in baselines_lib.evaluate_baselines(
                source, gt_format=data_prepare.gt_format(name), image_size=config.image_size,
                batch_size=config.eval_batch_size, seed=config.seed,
                threshold=evaluator.threshold).items():
            rows[f"{kind} / {name}"] = summary
    if collector is not None:
        collector.add_model("untrained", untrained, functools.partial(evaluator.maps, model))
    return rows


def _gap_closed(summaries, labels, sources) -> dict[str, dict]:
    from sslocal import baselines as baselines_lib

    gaps = {}
    for model in labels:
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
