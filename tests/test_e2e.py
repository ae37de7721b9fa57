"""train_and_evaluate end to end on synthetic_av/tiny through TFDS, Grain and Orbax; resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from sslocal import evaluate, train
from sslocal.models import load


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def config_for(data_dir, max_steps):
    config = tiny.get_config()
    config.data_dir = data_dir
    config.batch_size = 16  # 64 training scenes: 4 steps an epoch
    config.eval_batch_size = 16
    config.max_steps = max_steps
    config.checkpoint_every_steps = 3
    config.log_every_steps = 2
    return config


def latest_params(workdir):
    model = load.load_model(workdir, which="latest")
    return jax.device_get(model.params), model.description


@pytest.mark.slow
def test_train_evaluate_write_and_resume(data_dir, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    evaluators = []

    class CountedEvaluator(train.Evaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            evaluators.append(self)

    monkeypatch.setattr(train, "Evaluator", CountedEvaluator)
    config = config_for(data_dir, 6)
    config.eval.report = config.eval.baselines = True
    results = train.train_and_evaluate(config, straight)
    # Two epoch evaluations, then the best checkpoint with the report and the untrained
    # baseline: one evaluator, one compilation of its step.
    (evaluator,) = evaluators
    assert evaluator.num_traces == 1
    final = json.loads((straight / "eval" / "metrics.json").read_text())
    assert {"untrained / synthetic_av/tiny", "oracle / synthetic_av/tiny"} <= set(final)
    assert (straight / "eval" / "report.html").is_file()

    # Checkpoints, best by cIoU, metrics as JSON lines and TensorBoard events, final metrics.
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["4", "6"]
    assert len(list((straight / "best").iterdir())) == 1
    assert list((straight / "tb").glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [2, 3, 4, 6]
    evals = [x for x in lines if "eval/synthetic_av/tiny/cIoU" in x]
    assert [x["step"] for x in evals] == [4, 6]  # each epoch end, and the last step
    summary = results["synthetic_av/tiny"]
    assert summary["N"] == 16 and 0 <= summary["cIoU"] <= 1 and 0 <= summary["AUC"] <= 1
    assert json.loads((straight / "final_metrics.json").read_text()) == json.loads(
        json.dumps(results))

    # `sslocal evaluate --which latest` scores the last step, and gives what training's own
    # evaluation of that step gave; the default is the best checkpoint, named as such.
    for which, folder in (("latest", "checkpoints/6"), ("best", "best/")):
        scored = evaluate.main(config, [str(straight)], which=which,
                               out=str(tmp_path / which))["straight / synthetic_av/tiny"]
        assert folder in scored["checkpoint"], (which, scored["checkpoint"])
        if which == "latest":
            assert scored["cIoU"] == evals[-1]["eval/synthetic_av/tiny/cIoU"]
            assert scored["AUC"] == pytest.approx(evals[-1]["eval/synthetic_av/tiny/AUC"])

    # 3 steps, then a second run in the same workdir continues from step 3 to step 6: the same
    # parameters bit for bit as the uninterrupted run (same data position, optimizer, BN stats).
    train.train_and_evaluate(config_for(data_dir, 3), resumed)
    assert (resumed / "checkpoints" / "3").is_dir()
    train.train_and_evaluate(config_for(data_dir, 6), resumed)
    expected, _ = latest_params(straight)
    got, what = latest_params(resumed)
    assert what.endswith("checkpoints/6")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [2, 3, 4, 6]

    # Saved from 8 devices, loaded on a machine with one (evaluating a GPU run on a laptop).
    worker = os.path.join(os.path.dirname(__file__), "workers", "restore_one_device.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, worker, str(straight)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED" in out.stdout and out.stdout.strip().endswith("DEVICES 1")
