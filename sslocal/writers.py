"""Metrics to TensorBoard (tensorboardX: clu's writers import TensorFlow) and JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm


class MetricWriter:
    """Scalars to `workdir/tb` and `workdir/metrics.jsonl`; silent on processes other than 0."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        workdir = Path(workdir)
        self._tb = SummaryWriter(str(workdir / "tb"))
        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        tag = f"{prefix}/" if prefix else ""
        for name, value in scalars.items():
            self._tb.add_scalar(tag + name, value, step)
        self._jsonl.write(json.dumps({"step": step, **{tag + k: v for k, v in scalars.items()}})
                          + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def progress(**kwargs) -> tqdm:
    """A progress bar on stderr that stays quiet when stderr is not a terminal."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0 if sys.stderr.isatty() else 30.0)
    return tqdm(**kwargs)
