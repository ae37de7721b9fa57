"""The launch scripts parse (bash -n) and pass shellcheck where it is installed."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "launch").glob("*.s*"))


def test_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {"tpu_vm.sh", "gpu_multihost.sh", "slurm.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (CI installs it with apt-get)")
    subprocess.run(["shellcheck", "--shell=bash", str(script)], check=True)


def test_gpu_multihost_requires_its_variables(tmp_path):
    result = subprocess.run(["bash", str(SCRIPTS[0].parent / "gpu_multihost.sh"), "c.py", "w"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "COORDINATOR" in result.stderr
