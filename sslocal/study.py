"""`sslocal study margin`: the paper's Table 6 on synthetic data with noisy correspondence.

Each margin is trained with several seeds on "synthetic_av/noisy" (a fifth of the training
sounds off-screen, frequent categories that put false negatives in a batch) and scored on its
clean test split. Reported: the last epoch's cIoU@0.5 and AUC, mean +- std over seeds (no
selection of the best epoch on the test set). A finished run is not trained again, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import ml_collections
import numpy as np

from sslocal import train

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
                 workdir: str | Path) -> dict[str, dict]:
    workdir = Path(workdir)
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


def margin_table(table: dict[str, dict]) -> str:
    lines = ["| margin | cIoU@0.5 (x100) | AUC (x100) | mean cIoU (x100) | seeds |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for margin, row in table.items():
        cells = [f"{100 * row[k][0]:.2f} +- {100 * row[k][1]:.2f}"
                 for k in ("cIoU", "AUC", "mean_cIoU")]
        lines.append(f"| {margin} | {' | '.join(cells)} | {row['seeds']} |")
    return "\n".join(lines)


def plot(table: dict[str, dict], path: Path) -> None:
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
    fig.savefig(path)
    plt.close(fig)
