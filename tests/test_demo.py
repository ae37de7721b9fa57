"""The embedded default, shrunk to a minute, end to end through the CLI (README's first command)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_demo_config_through_the_cli(tmp_path):
    workdir = tmp_path / "demo"
    command = [
        sys.executable, "-m", "sslocal", "train", "--config", str(ROOT / "configs/synthetic.py"),
        "--workdir", str(workdir), f"--config.data_dir={tmp_path / 'tfds'}",
        "--config.train_dataset=synthetic_av/tiny", "--config.test_datasets=('synthetic_av/tiny',)",
        "--config.image_size=64", "--config.model.width=8", "--config.model.embed_dim=16",
        "--config.batch_size=16", "--config.eval_batch_size=16", "--config.max_steps=5",
        "--config.warmup_steps=2",  # the demo's 128 need a longer run
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    summaries = json.loads((workdir / "eval" / "metrics.json").read_text())
    rows = {label.split(" / ")[0] for label in summaries if label != "gap_closed"}
    assert {"untrained", "center", "random", "oracle"} <= rows and len(rows) == 5
    for label, summary in summaries.items():
        if label == "gap_closed":
            continue
        assert summary["N"] == 16
        assert 0 <= summary["cIoU"] <= 1 and 0 <= summary["AUC"] <= 1
    assert summaries["oracle / synthetic_av/tiny"]["cIoU"] > 0.9  # the protocol's ceiling
    assert summaries["random / synthetic_av/tiny"]["cIoU"] < 0.2
    (gap,) = summaries["gap_closed"].values()
    assert set(gap) == {"cIoU", "AUC", "best_baseline"}

    html = (workdir / "eval" / "report.html").read_text()
    assert "untrained" in html and "<img" in html
    assert "closes" in result.stdout  # the gap line printed beside the table
    assert (workdir / "final_metrics.json").exists()
