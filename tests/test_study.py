"""`sslocal study seeds`: the statistics over seeds, on runs whose results are known exactly
(training replaced by a fake that writes what train_and_evaluate writes)."""

import json

import numpy as np
import pytest

from configs import tiny
from sslocal import study

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
