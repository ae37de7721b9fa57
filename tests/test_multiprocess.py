"""Two processes on localhost joined by jax.distributed.initialize (CPU collectives) train."""

import os
import re
import subprocess
import sys
from pathlib import Path

import portpicker
import pytest

WORKER = Path(__file__).parent / "workers" / "multiprocess_train.py"


@pytest.mark.slow
def test_two_processes_train_to_identical_parameters(tmp_path):
    data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
    # Build the dataset once up front, so the two processes only read it.
    subprocess.run([sys.executable, "-m", "sslocal", "prepare", "--dataset", "synthetic_av/tiny",
                    "--data_dir", str(data_dir)], check=True, capture_output=True, timeout=300)
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), address, "2", str(i), str(data_dir),
                               str(workdir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    digests = [re.search(r"PARAMS (\w+)", out).group(1) for out in outputs]
    assert digests[0] == digests[1]
    assert all("TRAINED" in out for out in outputs)
    assert (workdir / "checkpoints" / "2").is_dir()
    assert (workdir / "metrics.jsonl").exists()  # written by process 0 only
    # SIGTERM on process 1 only: both stopped after the same step, whose checkpoint is there.
    stopped = {re.search(r"PREEMPTED (\S+)", out).group(1) for out in outputs}
    assert len(stopped) == 1, outputs
    (step,) = stopped
    assert step != "None" and 3 <= int(step) < 8, outputs
    assert (tmp_path / "run_preempted" / "checkpoints" / step).is_dir()
