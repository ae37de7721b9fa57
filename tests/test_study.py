"""`sslocal study seeds`: the statistics over seeds, on runs whose results are known exactly
(training replaced by a fake that writes what train_and_evaluate writes)."""

import json

import jax
import numpy as np
import pytest

from configs import tiny
from sslocal import metrics, study

NAME = "synthetic_av/tiny"
LAST = {0: (0.80, 0.58), 1: (0.70, 0.55), 2: (0.90, 0.60)}  # seed -> last epoch cIoU, AUC
BEST = {0: (0.82, 0.59), 1: (0.75, 0.56), 2: (0.90, 0.60)}
BASE = {"center": (0.30, 0.45), "random": (0.0, 0.25), "untrained": (0.10, 0.27),
        "oracle": (1.00, 0.67)}


def fake_train(config, workdir):
    """What train_and_evaluate leaves in a workdir: final_metrics.json and eval/metrics.json."""
    seed = config.seed
    row = lambda c, a: {"cIoU": c, "AUC": a, "mean_cIoU": a, "N": 8}  # noqa: E731
    (workdir / "eval").mkdir(parents=True)
    (workdir / "final_metrics.json").write_text(json.dumps({NAME: row(*LAST[seed])}))
    summaries = {f"{workdir.name} / {NAME}": row(*BEST[seed])}
    summaries.update({f"{k} / {NAME}": row(*v) for k, v in BASE.items()})
    (workdir / "eval" / "metrics.json").write_text(json.dumps(summaries))
    fake_train.calls.append(seed)


def test_seed_study_statistics(tmp_path, monkeypatch):
    fake_train.calls = []
    monkeypatch.setattr(study.train, "train_and_evaluate", fake_train)
    config = tiny.get_config()
    config.eval.baselines = True
    table = study.seed_study(config, 3, tmp_path)
    assert fake_train.calls == [0, 1, 2]
    cious = np.array([LAST[s][0] for s in range(3)])
    assert table["last"]["cIoU"]["mean"] == pytest.approx(cious.mean())
    assert table["last"]["cIoU"]["std"] == pytest.approx(cious.std())
    assert table["last"]["cIoU"]["min"] == pytest.approx(0.70)
    # gap: (model - best non-oracle baseline) / (oracle - it); centre is the best baseline.
    gaps = (cious - 0.30) / (1.00 - 0.30)
    np.testing.assert_allclose(table["last"]["gap_cIoU"]["values"], gaps)
    auc_gaps = (np.array([BEST[s][1] for s in range(3)]) - 0.45) / (0.67 - 0.45)
    np.testing.assert_allclose(table["best"]["gap_AUC"]["values"], auc_gaps)
    assert json.loads((tmp_path / "seed_study.json").read_text()) == table

    # A finished study is read back, not trained again.
    fake_train.calls = []
    assert study.seed_study(config, 3, tmp_path) == table and fake_train.calls == []


def test_seed_study_needs_the_baselines(tmp_path):
    with pytest.raises(ValueError, match="eval.baselines"):
        study.seed_study(tiny.get_config(), 2, tmp_path)


# ------------------------------------------------------------------------------ margin study

def _loop_difference(cious, margin, reference, seed_draw, sample_draw):
    """One bootstrap replicate, written out: the drawn seeds' mean of the metric differences on
    the drawn samples (metrics.summarize on each resampled vector)."""
    out = {"cIoU": [], "AUC": []}
    for s in seed_draw:
        a = metrics.summarize(np.asarray(cious[margin][s], np.float64)[sample_draw])
        b = metrics.summarize(np.asarray(cious[reference][s], np.float64)[sample_draw])
        for key in out:
            out[key].append(a[key] - b[key])
    return {key: float(np.mean(v)) for key, v in out.items()}


def test_paired_differences_on_hand_made_numbers():
    ref = [np.array([0.4, 0.6, 0.2, 0.9]), np.array([0.5, 0.1, 0.7, 0.3])]
    # seed 0: one more sample over 0.5 (2 -> 3 of 4); seed 1: the same as the reference
    better = [np.array([0.55, 0.6, 0.2, 0.9]), ref[1].copy()]
    table = study.paired_differences({"+0.00": ref, "-0.20": better}, "+0.00",
                                     num_resamples=500)
    assert table["+0.00"]["cIoU"] == {"difference": 0.0, "per_seed": [0.0, 0.0],
                                      "interval": [0.0, 0.0], "t_interval": [0.0, 0.0]}
    d = table["-0.20"]["cIoU"]
    assert d["per_seed"] == pytest.approx([0.25, 0.0]) and d["difference"] == pytest.approx(0.125)
    # AUC: 0.4 -> 0.55 moves that sample past the thresholds 0.45, 0.5 and 0.55 (3 of the 21
    # points, 0.05 apart): the trapezoid gains 3 * 0.05 / 4 samples
    assert table["-0.20"]["AUC"]["per_seed"] == pytest.approx([3 * 0.05 / 4, 0.0])
    low, high = d["interval"]
    # Half the resamples show no difference (seed 1 twice, or seed 0 without that sample):
    # the interval starts at 0, and one seed's gain cannot exclude it
    assert low == 0.0 and 0.125 < high <= 1.0
    # paired t over the 2 seeds: 0.125 +- t(1, 0.975) * sd / sqrt(2), t(1, 0.975) = 12.7062
    half = 12.7062 * np.std([0.25, 0.0], ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(d["t_interval"], [0.125 - half, 0.125 + half], rtol=1e-5)


def test_paired_differences_equal_a_loop_over_the_same_draws():
    rng = np.random.default_rng(3)
    seeds, n, reps = 3, 40, 30
    cious = {m: [rng.uniform(0, 1, n) ** p for _ in range(seeds)]
             for m, p in (("+0.00", 1.0), ("-0.20", 0.7), ("+0.20", 1.4))}
    draws = (rng.integers(0, seeds, (reps, seeds)), rng.integers(0, n, (reps, n)))
    table = study.paired_differences(cious, "+0.00", draws=draws, level=0.8)
    for margin in ("-0.20", "+0.20"):
        loop = [_loop_difference(cious, margin, "+0.00", draws[0][r], draws[1][r])
                for r in range(reps)]
        for key in ("cIoU", "AUC"):
            boot = np.array([x[key] for x in loop])
            np.testing.assert_allclose(table[margin][key]["interval"],
                                       np.quantile(boot, (0.1, 0.9)), atol=1e-12)
            point = [metrics.summarize(cious[margin][s])[key]
                     - metrics.summarize(cious["+0.00"][s])[key] for s in range(seeds)]
            np.testing.assert_allclose(table[margin][key]["per_seed"], point, atol=1e-12)


def test_paired_differences_refuse_unpaired_runs():
    with pytest.raises(ValueError, match="2 seeds x 3 samples"):
        study.paired_differences({"+0.00": [np.zeros(4)] * 2, "-0.20": [np.zeros(3)] * 2},
                                 "+0.00")


def test_noise_effect_on_hand_made_numbers():
    ref = [np.array([0.4, 0.6, 0.2, 0.9]), np.array([0.5, 0.1, 0.7, 0.3])]
    # under noise margin -0.2 lifts one sample of seed 0 over 0.5; on clean data it changes
    # nothing; margin +0.2 changes nothing anywhere
    noisy = {"+0.00": ref, "-0.20": [np.array([0.55, 0.6, 0.2, 0.9]), ref[1]], "+0.20": ref}
    clean = {"+0.00": ref, "-0.20": ref, "+0.20": ref}
    effect = study.noise_effect(noisy, clean, "+0.00", num_resamples=300)
    assert set(effect) == {"-0.20", "+0.20"}
    assert effect["+0.20"]["cIoU"] == {"difference": 0.0, "per_seed": [0.0, 0.0],
                                       "interval": [0.0, 0.0], "t_interval": [0.0, 0.0]}
    d = effect["-0.20"]["cIoU"]
    assert d["per_seed"] == pytest.approx([0.25, 0.0]) and d["difference"] == pytest.approx(0.125)
    assert d["interval"][0] == 0.0 and 0.125 < d["interval"][1] <= 1.0
    # the same gain on clean data cancels it
    assert study.noise_effect(noisy, noisy, "+0.00")["-0.20"]["AUC"]["difference"] == 0.0
    with pytest.raises(ValueError, match="paired across them"):
        study.noise_effect(noisy, {m: v[:1] for m, v in clean.items()}, "+0.00")


def test_noise_effect_equals_a_loop_over_the_same_draws():
    rng = np.random.default_rng(5)
    seeds, n_noisy, n_clean, reps = 3, 30, 20, 25
    noisy = {m: [rng.uniform(0, 1, n_noisy) ** p for _ in range(seeds)]
             for m, p in (("+0.00", 1.0), ("-0.20", 0.6))}
    clean = {m: [rng.uniform(0, 1, n_clean) ** p for _ in range(seeds)]
             for m, p in (("+0.00", 1.0), ("-0.20", 0.9))}
    draws = (rng.integers(0, seeds, (reps, seeds)), rng.integers(0, n_noisy, (reps, n_noisy)),
             rng.integers(0, n_clean, (reps, n_clean)))
    effect = study.noise_effect(noisy, clean, "+0.00", draws=draws, level=0.8)["-0.20"]
    loop = []
    for r in range(reps):
        a = _loop_difference(noisy, "-0.20", "+0.00", draws[0][r], draws[1][r])
        b = _loop_difference(clean, "-0.20", "+0.00", draws[0][r], draws[2][r])
        loop.append({key: a[key] - b[key] for key in a})
    for key in ("cIoU", "AUC"):
        np.testing.assert_allclose(effect[key]["interval"],
                                   np.quantile([x[key] for x in loop], (0.1, 0.9)), atol=1e-12)
        point = [metrics.summarize(noisy["-0.20"][s])[key]
                 - metrics.summarize(noisy["+0.00"][s])[key]
                 - metrics.summarize(clean["-0.20"][s])[key]
                 + metrics.summarize(clean["+0.00"][s])[key] for s in range(seeds)]
        np.testing.assert_allclose(effect[key]["per_seed"], point, atol=1e-12)
        # 80% paired t over 3 seeds: t(2, 0.9) = 1.8856
        half = 1.8856 * np.std(point, ddof=1) / np.sqrt(seeds)
        np.testing.assert_allclose(effect[key]["t_interval"],
                                   [np.mean(point) - half, np.mean(point) + half], rtol=1e-4)


def test_write_noise_effect_reads_both_studies(tmp_path):
    rng = np.random.default_rng(0)
    studies, cious = {}, {}
    for dataset, n in ((study.STUDY_DATASET, 12), (study.CLEAN_DATASET, 10)):
        cious[dataset] = {m: [rng.uniform(0, 1, n) for _ in range(2)] for m in ("+0.00", "-0.20")}
        studies[dataset] = {"seeds": 2, "num_epochs": 4, "margins": {"+0.00": {}, "-0.20": {}}}
        for margin, runs in cious[dataset].items():
            for seed, c in enumerate(runs):
                run = tmp_path / dataset.replace("/", "_") / f"margin{margin}_seed{seed}"
                run.mkdir(parents=True)
                (run / study.LAST_EPOCH).write_text(json.dumps({"cious": c.tolist()}))
                (run / "config.json").write_text(json.dumps(
                    {"train_dataset": dataset, "learning_rate": 1e-3, "margin": float(margin)}))
    (tmp_path / "margin_study.json").write_text(json.dumps(studies))
    result = study.write_noise_effect(tmp_path, num_resamples=40)
    assert json.loads((tmp_path / study.NOISE_EFFECT).read_text()) == result
    assert result["margins"] == study.noise_effect(
        cious[study.STUDY_DATASET], cious[study.CLEAN_DATASET], "+0.00", num_resamples=40)
    assert "-0.20" in study.noise_effect_table(result)
    clean_run = tmp_path / "synthetic_av_small" / "margin+0.00_seed0" / "config.json"
    clean_run.write_text(json.dumps({"train_dataset": study.CLEAN_DATASET,
                                     "learning_rate": 3e-3, "margin": 0.0}))
    with pytest.raises(ValueError, match="different learning_rate: not comparable"):
        study.write_noise_effect(tmp_path)
    studies[study.CLEAN_DATASET]["num_epochs"] = 10
    (tmp_path / "margin_study.json").write_text(json.dumps(studies))
    with pytest.raises(ValueError, match="not comparable"):
        study.write_noise_effect(tmp_path)
    del studies[study.CLEAN_DATASET]
    (tmp_path / "margin_study.json").write_text(json.dumps(studies))
    with pytest.raises(ValueError, match="run sslocal study margin --dataset synthetic_av/small"):
        study.write_noise_effect(tmp_path)


def test_margin_study_pairs_seeds_and_reports_each_margin(tmp_path, monkeypatch):
    """The real study on synthetic_av/tiny (2 steps a run): both margins of a seed start from
    the same weights and see the same batches; the table is the runs' own numbers; the study
    needs margin 0."""
    import hashlib
    import os

    from sslocal import train
    from sslocal.data import builders

    data_dir = tmp_path / "tfds"
    builders.get_builder("synthetic_av/tiny", data_dir=os.fspath(data_dir)).download_and_prepare()
    seen: dict[int, list[str]] = {}
    make_step = train.make_train_step

    def recording_step(graphdef, tx, loss_fn, mesh):
        step = make_step(graphdef, tx, loss_fn, mesh)
        log = seen.setdefault(len(seen), [])  # one log per run, in run order

        def run(state, batch):
            if not log:  # the initial weights
                log.append(_digest(jax.device_get(state.params)))
            log.append(hashlib.sha1(np.asarray(batch["image"]).tobytes()).hexdigest())
            return step(state, batch)
        return run

    monkeypatch.setattr(train, "make_train_step", recording_step)
    config = tiny.get_config()
    config.data_dir = os.fspath(data_dir)
    config.max_steps = 2
    with pytest.raises(ValueError, match="margin 0.0"):
        study.margin_study(config, [0.2, -0.2], 1, tmp_path / "study", dataset=NAME)
    table = study.margin_study(config, [0.0, -0.2], 1, tmp_path / "study", dataset=NAME,
                               num_resamples=50)
    assert len(seen) == 2 and len(seen[0]) == 3
    assert seen[0] == seen[1]  # paired: the same initial weights, the same two batches
    assert seen[0][1] != seen[0][2]  # (and the digests do see a batch's content)
    runs = tmp_path / "study" / "synthetic_av_tiny"
    for margin in ("+0.00", "-0.20"):
        final = json.loads((runs / f"margin{margin}_seed0" / "final_metrics.json").read_text())
        row = table["margins"][margin]
        assert row["cIoU"]["values"] == [final[NAME]["cIoU"]]
        # the per-sample cIoU of the last checkpoint gives the run's own last-epoch numbers
        last = json.loads((runs / f"margin{margin}_seed0" / study.LAST_EPOCH).read_text())
        assert metrics.summarize(last["cious"])["AUC"] == pytest.approx(final[NAME]["AUC"],
                                                                        abs=1e-12)
    assert table["margins"]["+0.00"]["paired"]["AUC"]["difference"] == 0.0
    saved = json.loads((tmp_path / "study" / "margin_study.json").read_text())
    assert saved[NAME] == table and (tmp_path / "study" / "margin_study.png").stat().st_size > 0


def _digest(tree) -> str:
    import hashlib

    h = hashlib.sha1()
    for leaf in jax.tree.leaves(tree):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()
