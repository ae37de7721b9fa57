"""Every config loads, is locked against typos, and differs from default.py only where its
docstring says ("Differs from default.py in: a, b.c, ...")."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from configs import default

CONFIG_DIR = Path(__file__).parent.parent / "configs"
EXPERIMENTS = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                     if p.stem not in ("__init__", "default"))


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def documented_differences(module) -> set[str]:
    doc = " ".join(module.__doc__.split())
    match = re.search(r"Differs from default\.py in: ([^.]*(?:\.[a-z_]+[^.]*)*)\.", doc)
    assert match, f"{module.__name__}: no 'Differs from default.py in:' line"
    text = match.group(1).strip()
    if text.startswith("nothing"):
        return set()
    return {name.strip() for name in text.split(",")}


def test_experiments_exist():
    assert set(EXPERIMENTS) >= {"vggsound144k", "flickr144k", "flickr10k", "vggsound10k",
                                "heard110", "lvs", "ezvsl", "margin_sweep", "synthetic"}


def test_default_is_the_paper():
    c = default.get_config()
    assert (c.model.width, c.model.embed_dim, c.loss) == (64, 512, "marginnce")
    assert (c.epsilon, c.beta, c.tau, c.margin) == (0.65, 0.03, 0.07, -0.2)
    assert (c.learning_rate, c.weight_decay, c.batch_size, c.num_epochs) == (1e-4, 1e-4, 128, 20)
    assert (c.image_size, c.eval_every_epochs) == (224, 1)
    assert c.model.image_pretrained.endswith(".pth")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_differs_only_where_documented(name):
    module = importlib.import_module(f"configs.{name}")
    base, config = flatten(default.get_config()), flatten(module.get_config())
    assert base.keys() == config.keys(), "an experiment must not add fields"
    changed = {k for k in base if base[k] != config[k]}
    assert changed == documented_differences(module)


def test_unknown_override_fails_before_anything_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sslocal", "train", "--config", str(CONFIG_DIR / "synthetic.py"),
         "--config.learnig_rate=0.1", "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "learnig_rate" in result.stderr
    assert not (tmp_path / "w").exists()

