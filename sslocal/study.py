"""`sslocal study margin|seeds`: what a number is worth across seeds.

seeds: one config trained with seeds 0 .. n-1 (the demo: how far its numbers move from one seed,
or one processor, to another): per metric the mean, standard deviation and minimum, at the last
epoch and at the best one, and the share of the centre-to-oracle gap closed.

margin: the paper's Table 6 on synthetic data whose noise is known. Each margin is trained with
the same seeds on one dataset ("synthetic_av/noisy" by default: off-screen sounds and frequent
categories, data/synthetic.py; "synthetic_av/small" for the clean comparison) and scored on its
clean test split at the last epoch (no selection of the best epoch on the test set). Seeds are
paired: under one seed every margin starts from the same initial weights and sees the same
batches in the same order (both come from `config.seed` alone), so a difference between two
margins under one seed is the margin's. Reported per margin: the mean and standard deviation
over seeds, and the paired difference from the reference margin (0) with a 95% bootstrap
interval over seeds and test samples (`paired_differences`). Once a workdir holds both the
noisy and the clean study, noise_effect.json says whether a margin helps more under noise: its
difference from margin 0 on the noisy scenes minus that on the clean ones, with an interval
(`noise_effect`). A finished run is not trained again, so an interrupted study continues where
it stopped (and a rerun recomputes the tables from the finished runs).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from sslocal import metrics, train
from sslocal.writers import as_path

STUDY_DATASET = "synthetic_av/noisy"
CLEAN_DATASET = "synthetic_av/small"  # the same scenes without the noise: the comparison
REFERENCE_MARGIN = 0.0  # the paired differences are taken from InfoNCE's margin
STUDY_METRICS = ("cIoU", "AUC")  # cIoU@0.5 and the area under the success curve
LAST_EPOCH = "last_epoch_cious.json"  # a run's per-sample cIoU at its last step
NOISE_EFFECT = "noise_effect.json"  # the noisy study's differences minus the clean one's


def _run_config(config: ml_collections.ConfigDict, margin: float, seed: int,
                dataset: str = STUDY_DATASET) -> ml_collections.ConfigDict:
    """The config of one run: only the margin differs between the runs of one seed."""
    run = copy.deepcopy(config)
    run.unlock()
    run.margin = margin
    run.seed = seed
    run.train_dataset = dataset
    run.test_datasets = (dataset,)
    run.eval.report = False
    run.eval.baselines = False
    run.lock()
    return run


def paired_differences(cious: dict[str, list[np.ndarray]], reference: str, *,
                       num_resamples: int = 2000, level: float = 0.95, seed: int = 0,
                       draws: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, dict]:
    """Each margin's difference from `reference` in cIoU@0.5 and AUC, paired by seed and by
    test sample, with a percentile bootstrap interval.

    cious[margin][s]: the (N,) per-sample cIoU of seed s (the same N test samples, in the same
    order, for every margin and seed). The estimate is the mean over seeds of
    metric(margin, s) - metric(reference, s). Each bootstrap replicate draws S seeds and N test
    samples with replacement, the same draw for both margins (paired) and for every seed
    (crossed: every seed is scored on the same samples), and recomputes that mean; the interval
    is the replicates' (1 - level) / 2 and (1 + level) / 2 quantiles. It counts both the seed
    spread and the finite test set; with few seeds it is wide, as it should be. `draws` =
    (seed indices (R, S), sample indices (R, N)) replaces the random draws (for tests).
    """
    num_seeds, n = np.stack(cious[reference]).shape
    if draws is None:
        rng = np.random.default_rng(seed)
        draws = (rng.integers(0, num_seeds, (num_resamples, num_seeds)),
                 rng.integers(0, n, (num_resamples, n)))
    seed_draws, sample_draws = draws
    table = {}
    for margin, per_key in _replicated_differences(cious, reference, sample_draws).items():
        table[margin] = {key: _estimate(per_seed, replicates, seed_draws, level)
                         for key, (per_seed, replicates) in per_key.items()}
    return table


def noise_effect(noisy: dict[str, list[np.ndarray]], clean: dict[str, list[np.ndarray]],
                 reference: str, *, num_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0, draws: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                 ) -> dict[str, dict]:
    """Does a margin help more under noise? Per margin studied on both datasets: its paired
    difference from `reference` on the noisy study minus the same on the clean one (a
    difference of differences, > 0: the margin gains more, or loses less, under noise), with a
    percentile bootstrap interval.

    The two studies are scored on different test sets (the noisy one keeps its frequent
    categories), so each is resampled by its own draw of test samples; the seeds, paired across
    the studies (seed s starts from the same weights in both), share one draw. `draws` = (seed
    indices (R, S), noisy sample indices (R, N1), clean sample indices (R, N2)) replaces the
    random draws (for tests)."""
    num_seeds = len(noisy[reference])
    if len(clean[reference]) != num_seeds:
        raise ValueError(f"the noisy study has {num_seeds} seeds, the clean one "
                         f"{len(clean[reference])}: the seeds are paired across them")
    if draws is None:
        rng = np.random.default_rng(seed)
        draws = (rng.integers(0, num_seeds, (num_resamples, num_seeds)),
                 *(rng.integers(0, len(c[reference][0]), (num_resamples, len(c[reference][0])))
                   for c in (noisy, clean)))
    seed_draws, noisy_draws, clean_draws = draws
    common = [m for m in noisy if m in clean and m != reference]
    under_noise = _replicated_differences({m: noisy[m] for m in [reference, *common]},
                                          reference, noisy_draws)
    on_clean = _replicated_differences({m: clean[m] for m in [reference, *common]}, reference,
                                       clean_draws)
    return {margin: {key: _estimate(under_noise[margin][key][0] - on_clean[margin][key][0],
                                    under_noise[margin][key][1] - on_clean[margin][key][1],
                                    seed_draws, level)
                     for key in STUDY_METRICS} for margin in common}


def _replicated_differences(cious: dict[str, list[np.ndarray]], reference: str,
                            sample_draws: np.ndarray) -> dict[str, dict[str, tuple]]:
    """{margin: {metric: (per seed (S,), per replicate and seed (R, S))}}: metric(margin) -
    metric(reference) on the test set, and on each replicate's draw of test samples (the same
    draw for both margins and every seed)."""
    ref = np.stack(cious[reference]).astype(np.float64)
    num_seeds, n = ref.shape
    rows = np.repeat(np.arange(len(sample_draws)), sample_draws.shape[1])
    weights = np.zeros((len(sample_draws), n))
    np.add.at(weights, (rows, sample_draws.reshape(-1)), 1.0 / sample_draws.shape[1])
    t = metrics.AUC_THRESHOLDS
    at_half = int(np.flatnonzero(np.isclose(t, 0.5))[0])

    def scores(c: np.ndarray) -> tuple[dict, dict]:
        """{metric: (S,) per seed} on the test set and {metric: (R, S)} per replicate."""
        hits = (c[:, :, None] >= t).astype(np.float64)  # (S, N, T)
        curves = {"point": hits.mean(axis=1), "replicates": np.einsum("rn,snt->rst", weights,
                                                                      hits)}
        out = [{"cIoU": curve[..., at_half],
                "AUC": np.sum(np.diff(t) * (curve[..., 1:] + curve[..., :-1]) / 2, axis=-1)}
               for curve in curves.values()]
        return out[0], out[1]

    ref_point, ref_reps = scores(ref)
    out = {}
    for margin, runs in cious.items():
        c = np.stack(runs).astype(np.float64)
        if c.shape != ref.shape:
            raise ValueError(f"margin {margin}: {c.shape[0]} seeds x {c.shape[1]} samples, "
                             f"the reference {reference} has {num_seeds} x {n}")
        point, reps = scores(c)
        out[margin] = {key: (point[key] - ref_point[key], reps[key] - ref_reps[key])
                       for key in STUDY_METRICS}
    return out


def _estimate(per_seed: np.ndarray, replicates: np.ndarray, seed_draws: np.ndarray,
              level: float) -> dict[str, Any]:
    """The mean over seeds with two intervals. "interval": percentile bootstrap, each
    replicate averaging its (R, S) differences over its draw of seeds. "t_interval": the paired
    t-test's over the S per-seed differences, mean +- t(S - 1) * sd / sqrt(S). With 3 seeds the
    bootstrap has only 10 distinct seed draws and is too narrow in the seed direction, while
    the t-interval is wide (t(2) = 4.30 at 95%); a conclusion should hold under both."""
    from scipy import stats

    boot = np.take_along_axis(replicates, seed_draws, axis=1).mean(axis=1)
    low, high = np.quantile(boot, ((1 - level) / 2, (1 + level) / 2))
    mean, num_seeds = float(per_seed.mean()), len(per_seed)
    if num_seeds > 1:
        half = (stats.t.ppf((1 + level) / 2, num_seeds - 1) * per_seed.std(ddof=1)
                / np.sqrt(num_seeds))
        t_interval = [mean - float(half), mean + float(half)]
    else:
        t_interval = None  # one seed says nothing about the spread
    return {"difference": mean, "per_seed": per_seed.tolist(),
            "interval": [float(low), float(high)], "t_interval": t_interval}


def _last_epoch_cious(run_dir: epath.Path, dataset: str, evaluator: Any, source: Any,
                      mesh: Any) -> np.ndarray:
    """The per-sample cIoU of a run's last checkpoint (its last step), through the one
    evaluator; written to run_dir/last_epoch_cious.json and read back on a rerun."""
    from sslocal.models import load

    path = run_dir / LAST_EPOCH
    if not path.exists():
        model = load.load_model(run_dir, mesh=mesh, which="latest")
        result = evaluator.run(model, source, dataset)
        path.write_text(json.dumps({"checkpoint": model.description, "ids": result.ids,
                                    "cious": result.cious["av"].tolist()}))
    return np.asarray(json.loads(path.read_text())["cious"])


def margin_study(config: ml_collections.ConfigDict, margins: list[float], seeds: int,
                 workdir: str | os.PathLike, *, dataset: str = STUDY_DATASET,
                 num_resamples: int = 2000) -> dict[str, dict]:
    """Trains every margin with seeds 0 .. seeds-1 on `dataset` in workdir/<dataset>/ and
    returns its table: per margin the last epoch's cIoU@0.5, AUC and mean cIoU ({"mean",
    "std", "values"} over seeds) and the paired difference from margin 0
    (`paired_differences`). workdir/margin_study.json holds one table per dataset studied
    there (a second dataset adds its own); margin_study.png plots them all."""
    from sslocal import sharding
    from sslocal.data import prepare as data_prepare
    from sslocal.evaluator import Evaluator

    if REFERENCE_MARGIN not in margins:
        raise ValueError(f"the paired differences are taken from margin {REFERENCE_MARGIN}: "
                         f"add it to the margins ({margins})")
    workdir = as_path(workdir)  # a folder or a gs:// URL
    runs_dir = workdir / dataset.replace("/", "_")
    runs_dir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh()
    evaluator, source = None, None
    summaries: dict[str, list[dict]] = {}
    cious: dict[str, list[np.ndarray]] = {}
    for margin in margins:
        for seed in range(seeds):
            run_dir = runs_dir / f"margin{margin:+.2f}_seed{seed}"
            run = _run_config(config, margin, seed, dataset)
            final = run_dir / "final_metrics.json"
            results = json.loads(final.read_text()) if final.exists() else {}
            if dataset not in results:  # not run yet, or interrupted: (re)start
                results = train.train_and_evaluate(run, run_dir)
            if evaluator is None:  # one evaluator, one compilation, for every run
                evaluator = Evaluator(run, mesh)
                source = data_prepare.load_split(
                    dataset, "test", os.fspath(as_path(run.data_dir)) if run.data_dir else None)
            key = f"{margin:+.2f}"
            summaries.setdefault(key, []).append(results[dataset])
            cious.setdefault(key, []).append(
                _last_epoch_cious(run_dir, dataset, evaluator, source, mesh))
    paired = paired_differences(cious, f"{REFERENCE_MARGIN:+.2f}", num_resamples=num_resamples)
    table = {"seeds": seeds, "num_epochs": int(config.num_epochs),
             "test_samples": int(len(next(iter(cious.values()))[0])),
             "interval": f"95% percentile bootstrap over seeds and test samples, paired, "
                         f"{num_resamples} resamples; t_interval: 95% paired t over seeds",
             "margins": {margin: {key: {"mean": float(np.mean([r[key] for r in rows])),
                                        "std": float(np.std([r[key] for r in rows])),
                                        "values": [r[key] for r in rows]}
                                  for key in ("cIoU", "AUC", "mean_cIoU")}
                         | {"paired": paired[margin]}
                         for margin, rows in summaries.items()}}
    path = workdir / "margin_study.json"
    studies = json.loads(path.read_text()) if path.exists() else {}
    studies[dataset] = table
    path.write_text(json.dumps(studies, indent=2))
    print(margin_table(table, dataset))
    plot(studies, workdir / "margin_study.png")
    if {STUDY_DATASET, CLEAN_DATASET} <= set(studies):
        print(noise_effect_table(write_noise_effect(workdir, num_resamples=num_resamples)))
    return table


def _study_cious(workdir: epath.Path, dataset: str, table: dict) -> dict[str, list[np.ndarray]]:
    """The per-sample last-epoch cIoU of every run of a study table, read from its run dirs."""
    runs = workdir / dataset.replace("/", "_")
    return {margin: [np.asarray(json.loads((runs / f"margin{margin}_seed{seed}" / LAST_EPOCH)
                                           .read_text())["cious"])
                     for seed in range(table["seeds"])]
            for margin in table["margins"]}


def write_noise_effect(workdir: str | os.PathLike, *, noisy: str = STUDY_DATASET,
                       clean: str = CLEAN_DATASET, num_resamples: int = 2000) -> dict[str, Any]:
    """`noise_effect` of the two studies in workdir (margin_study.json and their runs'
    per-sample files), written to workdir/noise_effect.json and returned."""
    workdir = as_path(workdir)
    studies = json.loads((workdir / "margin_study.json").read_text())
    for name in (noisy, clean):
        if name not in studies:
            raise ValueError(f"no {name} study in {workdir}: run sslocal study margin "
                             f"--dataset {name} there first")
    if studies[noisy]["num_epochs"] != studies[clean]["num_epochs"]:
        raise ValueError(f"the {noisy} study trained {studies[noisy]['num_epochs']} epochs, "
                         f"the {clean} one {studies[clean]['num_epochs']}: not comparable")
    # Every other training field must agree too (a clean study run at another learning rate
    # would otherwise be compared silently): the margin-0 seed-0 runs' config.json, which
    # differ only in their datasets.
    configs = [json.loads((workdir / name.replace("/", "_")
                           / f"margin{REFERENCE_MARGIN:+.2f}_seed0" / "config.json").read_text())
               for name in (noisy, clean)]
    differing = sorted(key for key in set(configs[0]) | set(configs[1])
                       if key not in ("train_dataset", "test_datasets")
                       and configs[0].get(key) != configs[1].get(key))
    if differing:
        raise ValueError(f"the {noisy} and {clean} studies were trained with different "
                         f"{', '.join(differing)}: not comparable")
    effect = noise_effect(_study_cious(workdir, noisy, studies[noisy]),
                          _study_cious(workdir, clean, studies[clean]),
                          f"{REFERENCE_MARGIN:+.2f}", num_resamples=num_resamples)
    result = {"noisy": noisy, "clean": clean, "seeds": studies[noisy]["seeds"],
              "num_epochs": studies[noisy]["num_epochs"],
              "difference": "(noisy: margin - margin 0) - (clean: margin - margin 0), mean "
                            "over seeds",
              "interval": f"95% percentile bootstrap, {num_resamples} resamples: one draw of "
                          "seeds (paired across the studies), each study's test samples drawn "
                          "on their own; t_interval: 95% paired t over seeds",
              "margins": effect}
    (workdir / NOISE_EFFECT).write_text(json.dumps(result, indent=2))
    return result


def noise_effect_table(result: dict[str, Any]) -> str:
    """Markdown: per margin its difference from margin 0 under noise minus on clean data."""
    lines = [f"{result['noisy']} minus {result['clean']}: {result['difference']} (x 100; "
             f"{result['interval']})",
             "| margin | cIoU@0.5 [bootstrap] t [t-test] | AUC [bootstrap] t [t-test] |",
             "| ---: | ---: | ---: |"]
    for margin, row in result["margins"].items():
        cells = [_difference_cell(row[k]) for k in STUDY_METRICS]
        lines.append(f"| {margin} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _difference_cell(d: dict[str, Any]) -> str:
    """"+1.23 [bootstrap low, high] t [low, high]" (x 100)."""
    low, high = d["interval"]
    t = d.get("t_interval")
    t_cell = "t n/a (1 seed)" if t is None else f"t [{100 * t[0]:+.2f}, {100 * t[1]:+.2f}]"
    return f"{100 * d['difference']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] {t_cell}"


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


def margin_table(table: dict[str, Any], dataset: str) -> str:
    """Markdown: per margin the mean +- std over seeds and the paired difference from margin 0
    with its interval (x 100)."""
    lines = [f"{dataset}, {table['seeds']} seeds, {table['num_epochs']} epochs, last epoch "
             f"(x 100; difference from margin 0 with a {table['interval']})",
             "| margin | cIoU@0.5 | AUC | mean cIoU | cIoU@0.5 - margin 0 | AUC - margin 0 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for margin, row in table["margins"].items():
        cells = [f"{100 * row[k]['mean']:.2f} +- {100 * row[k]['std']:.2f}"
                 for k in ("cIoU", "AUC", "mean_cIoU")]
        cells += [_difference_cell(row["paired"][key]) for key in STUDY_METRICS]
        lines.append(f"| {margin} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(studies: dict[str, dict], path: epath.Path) -> None:
    """cIoU@0.5 and AUC against the margin, one line per dataset, error bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120)
    for ax, (key, label) in zip(axes, (("cIoU", "cIoU@0.5"), ("AUC", "AUC")), strict=True):
        for dataset, table in studies.items():
            rows = table["margins"]
            margins = [float(m) for m in rows]
            ax.errorbar(margins, [100 * r[key]["mean"] for r in rows.values()],
                        yerr=[100 * r[key]["std"] for r in rows.values()], marker="o",
                        capsize=3, label=f"{dataset} ({table['seeds']} seeds)")
        ax.set_xlabel("margin")
        ax.set_ylabel(f"{label} (x 100)")
        ax.legend(fontsize=7)
    fig.suptitle("marginNCE: last epoch, mean +- std over seeds")
    fig.tight_layout()
    with as_path(path).open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
