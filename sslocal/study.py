"""`sslocal study margin|seeds`: what a number is worth across seeds.

seeds: one config trained with seeds 0 .. n-1 (the demo: how far its numbers move from one seed,
or one processor, to another): per metric the mean, standard deviation and minimum, at the last
epoch and at the best one, and the share of the centre-to-oracle gap closed.

margin: the paper's Table 6 on synthetic data with noisy correspondence. Each margin is trained
with several seeds on "synthetic_av/noisy" (a fifth of the training sounds off-screen, frequent
categories that put false negatives in a batch) and scored on its clean test split. Reported:
the last epoch's cIoU@0.5 and AUC, mean +- std over seeds (no selection of the best epoch on
the test set). A finished run is not trained again, so an interrupted study continues where it
stopped.
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections
import numpy as np
from etils import epath

from sslocal import train
from sslocal.writers import as_path

STUDY_DATASET = "synthetic_av/noisy"


def _run_config(config: ml_collections.ConfigDict, margin: float, seed: int):
    run = copy.deepcopy(config)
    run.unlock()
    run.margin = margin
    run.seed = seed
    run.train_dataset = STUDY_DATASET
    run.test_datasets = (STUDY_DATASET,)
    run.eval.report = False
    run.eval.baselines = False
    run.lock()
    return run


def margin_study(config: ml_collections.ConfigDict, margins: list[float], seeds: int,
                 workdir: str | os.PathLike) -> dict[str, dict]:
    workdir = as_path(workdir)  # a folder or a gs:// URL
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for margin in margins:
        for seed in range(seeds):
            run_dir = workdir / f"margin{margin:+.2f}_seed{seed}"
            final = run_dir / "final_metrics.json"
            results = json.loads(final.read_text()) if final.exists() else {}
            if STUDY_DATASET not in results:  # not run yet, or interrupted: (re)start
                results = train.train_and_evaluate(_run_config(config, margin, seed), run_dir)
            runs.setdefault(f"{margin:+.2f}", []).append(results[STUDY_DATASET])
    table = {margin: {key: (float(np.mean([r[key] for r in rs])),
                            float(np.std([r[key] for r in rs])))
                      for key in ("cIoU", "AUC", "mean_cIoU")} | {"seeds": len(rs)}
             for margin, rs in runs.items()}
    (workdir / "margin_study.json").write_text(json.dumps(table, indent=2))
    print(margin_table(table))
    plot(table, workdir / "margin_study.png")
    return table


SEED_METRICS = ("cIoU", "AUC", "mean_cIoU", "gap_cIoU", "gap_AUC")


def seed_study(config: ml_collections.ConfigDict, seeds: int, workdir: str | os.PathLike
               ) -> dict[str, dict]:
    """Trains `config` with seeds 0 .. seeds-1 in workdir/seed<k> (a finished run is read, not
    trained again) and returns {"last" | "best": {metric: {"mean", "std", "min", "values"}}}
    on the config's first test set; also written to workdir/seed_study.json and printed.

    "last" is the last epoch (train's final_metrics.json), "best" the checkpoint with the best
    test cIoU (eval/metrics.json, as the peers select it). gap_cIoU / gap_AUC: the share of
    the gap from the best non-oracle baseline to the oracle closed (baselines.gap_closed),
    which needs eval.baselines."""
    from sslocal import baselines

    if not config.eval.baselines:
        raise ValueError("the seed study reports the gap closed: set eval.baselines=True")
    workdir = as_path(workdir)  # a folder or a gs:// URL
    workdir.mkdir(parents=True, exist_ok=True)
    name = config.test_datasets[0]
    rows: dict[str, list[dict]] = {"last": [], "best": []}
    for seed in range(seeds):
        run_dir = workdir / f"seed{seed}"
        final, evaluated = run_dir / "final_metrics.json", run_dir / "eval" / "metrics.json"
        if not (final.exists() and evaluated.exists()):
            run = copy.deepcopy(config)
            run.unlock()
            run.seed = seed
            run.lock()
            train.train_and_evaluate(run, run_dir)
        last = json.loads(final.read_text())[name]
        summaries = json.loads(evaluated.read_text())
        trained = next(v for k, v in summaries.items()
                       if k.endswith(f" / {name}") and k.split(" / ")[0] not in (
                           "untrained", *baselines.KINDS))
        oracle = summaries[f"oracle / {name}"]
        for kind, summary in (("last", last), ("best", trained)):
            row = {key: summary[key] for key in ("cIoU", "AUC", "mean_cIoU")}
            for key in ("cIoU", "AUC"):
                best_baseline = max(summaries[f"{b} / {name}"][key]
                                    for b in ("center", "random", "untrained"))
                row[f"gap_{key}"] = baselines.gap_closed(summary[key], best_baseline,
                                                         oracle[key])
            rows[kind].append(row)
    table = {kind: {key: {"mean": float(np.mean([r[key] for r in rs])),
                          "std": float(np.std([r[key] for r in rs])),
                          "min": float(np.min([r[key] for r in rs])),
                          "values": [r[key] for r in rs]} for key in SEED_METRICS}
             for kind, rs in rows.items()}
    (workdir / "seed_study.json").write_text(json.dumps(table, indent=2))
    print(seed_table(table, seeds))
    return table


def seed_table(table: dict[str, dict], seeds: int) -> str:
    lines = [f"| x 100, {seeds} seeds | " + " | ".join(SEED_METRICS) + " |",
             "| --- |" + " ---: |" * len(SEED_METRICS)]
    for kind, row in table.items():
        cells = [f"{100 * row[k]['mean']:.2f} +- {100 * row[k]['std']:.2f} "
                 f"(min {100 * row[k]['min']:.2f})" for k in SEED_METRICS]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def margin_table(table: dict[str, dict]) -> str:
    lines = ["| margin | cIoU@0.5 (x100) | AUC (x100) | mean cIoU (x100) | seeds |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for margin, row in table.items():
        cells = [f"{100 * row[k][0]:.2f} +- {100 * row[k][1]:.2f}"
                 for k in ("cIoU", "AUC", "mean_cIoU")]
        lines.append(f"| {margin} | {' | '.join(cells)} | {row['seeds']} |")
    return "\n".join(lines)


def plot(table: dict[str, dict], path: epath.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    margins = [float(m) for m in table]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for key, label in (("cIoU", "cIoU@0.5"), ("AUC", "AUC")):
        mean = [100 * row[key][0] for row in table.values()]
        std = [100 * row[key][1] for row in table.values()]
        ax.errorbar(margins, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xlabel("margin")
    ax.set_ylabel("x 100")
    ax.set_title("marginNCE on noisy synthetic data")
    ax.legend()
    fig.tight_layout()
    with as_path(path).open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
