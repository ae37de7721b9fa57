"""The launch scripts: they parse (bash -n) and pass shellcheck; tpu_vm.sh runs end to end
against a fake `gcloud` on PATH.

The fake (written into tmp_path) records every call's argv, keeps a bucket in a local folder
(gs://b/x -> tmp/gcs/b/x; `gcloud storage` cp / rm / ls / cat answer as the real one does,
"matched no objects" included), walks a queued resource through the states a test gives, and
runs `tpu-vm ssh --worker=all --command=...` on two fake workers: the real worker script
(launch/tpu_worker.sh) runs there in a home folder of its own, with fakes for sudo, apt-get,
add-apt-repository, git, the runtime's python3 (3.10), the python3.11 that apt installs and
the venv's pip and `sslocal` (which "trains" for a moment, then worker 0 writes checkpoints
and final_metrics.json into the bucket). No network and no real gcloud are involved.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).parent.parent / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.s*"))
TPU_VM = LAUNCH / "tpu_vm.sh"


def test_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {"tpu_vm.sh", "tpu_worker.sh", "gpu_multihost.sh",
                                         "slurm.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (CI installs it with apt-get)")
    subprocess.run(["shellcheck", "--shell=bash", str(script)], check=True)


def test_gpu_multihost_requires_its_variables(tmp_path):
    result = subprocess.run(["bash", str(LAUNCH / "gpu_multihost.sh"), "c.py", "w"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "COORDINATOR" in result.stderr


def test_slurm_sbatch_requeues_with_a_sigterm_lead_time_and_appends():
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = [line.split(None, 1)[1] for line in text.splitlines()
                  if line.startswith("#SBATCH")]
    assert "--requeue" in directives
    assert "--open-mode=append" in directives
    (signal_,) = [d for d in directives if d.startswith("--signal=")]
    assert signal_.startswith("--signal=TERM@")  # to the tasks, not "B:" the batch shell
    assert int(signal_.split("@")[1]) >= 120
    assert "scontrol requeue" in text and "143" in text
    assert "resumes" in text


@pytest.mark.parametrize("status, requeued", [(0, False), (143, True), (1, False)])
def test_slurm_sbatch_requeues_itself_after_a_sigterm_save(tmp_path, status, requeued):
    """The batch script under fake srun / scontrol: only a 143 (SIGTERM, saved) requeues."""
    calls = tmp_path / "calls"
    for name, body in {"srun": f'echo "srun $*" >>{calls}; exit {status}',
                       "scontrol": f'echo "scontrol $*" >>{calls}'}.items():
        (tmp_path / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "--config.max_steps=10"], capture_output=True,
        text=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_ID": "77",
                        "CONFIG": "configs/tiny.py", "WORKDIR": "/shared/runs/x"})
    assert result.returncode == status
    lines = calls.read_text().splitlines()
    assert lines[0] == ("srun --kill-on-bad-exit=1 sslocal train --config configs/tiny.py "
                        "--workdir /shared/runs/x --config.max_steps=10")
    assert (lines[1:] == ["scontrol requeue 77"]) == requeued


# --- tpu_vm.sh against a fake gcloud ------------------------------------------------------

FAKE_GCLOUD = '''\
#!{python}
"""A fake gcloud: records argv, a bucket in a folder, a queued resource, ssh to workers."""
import json, os, shutil, subprocess, sys, time
from pathlib import Path

args = sys.argv[1:]
who = "worker-" + os.environ["TPU_WORKER_ID"] if "TPU_WORKER_ID" in os.environ else "launcher"
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"who": who, "time": time.time(), "argv": args}}) + "\\n")
gcs, state_file = Path(os.environ["FAKE_GCS"]), Path(os.environ["FAKE_STATE"])
pos = [a for a in args if not a.startswith("-")]
opt = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def local(url):
    assert url.startswith("gs://"), url
    return gcs / url[len("gs://"):]


def no_match(url):
    sys.exit(f"ERROR: (gcloud.storage.{{pos[1]}}) One or more URLs matched no objects: {{url}}")


def listing(url, path):
    return [url.rstrip("/") + "/" + p.name + ("/" if p.is_dir() else "")
            for p in sorted(path.iterdir())]


if pos[0] == "storage":
    if pos[1] == "cp":
        src, dst = pos[2], pos[3]
        if dst.startswith("gs://"):
            if os.environ.get("FAKE_BUCKET_READONLY"):
                sys.exit(f"ERROR: (gcloud.storage.cp) HTTPError 403: no storage.objects.create "
                         f"access to {{dst}}")
            local(dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, local(dst))
        else:
            if not local(src).is_file():
                no_match(src)
            shutil.copyfile(local(src), dst)
    elif pos[1] == "rm":
        if not local(pos[2]).is_file():
            no_match(pos[2])
        local(pos[2]).unlink()
    elif pos[1] == "cat":
        if not local(pos[2]).is_file():
            no_match(pos[2])
        sys.stdout.write(local(pos[2]).read_text())
    elif pos[1] == "ls":
        url, path = pos[2], local(pos[2])
        if path.is_file() and not url.endswith("/"):
            print(url)
        elif path.is_dir() and any(path.iterdir()):
            print("\\n".join(listing(url, path)))
        else:
            no_match(url)
    else:
        sys.exit(f"fake gcloud: storage {{pos[1]}} is not faked")
elif pos[:3] == ["compute", "tpus", "queued-resources"]:
    verb, name = pos[3], pos[4]
    state = json.loads(state_file.read_text()) if state_file.exists() else {{}}
    if verb == "create":
        if os.environ.get("FAKE_CREATE_FAILS"):
            sys.exit(f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: "
                     f"{{name}}")
        state = {{"name": name, "describes": 0}}
        print(f"Create request issued for: [{{name}}]", file=sys.stderr)
    elif verb == "describe":
        assert state.get("name") == name, "describe before create"
        states = os.environ["FAKE_STATES"].split(",")
        current = states[min(state["describes"], len(states) - 1)]
        if "state.state" in opt.get("format", ""):
            state["describes"] += 1
            print(current)
        else:
            print(f"name: {{name}}\\nstate:\\n  state: {{current}}\\n"
                  f"  failedData:\\n    error:\\n      message: fake failure")
    elif verb == "delete":
        assert state.get("name") == name, "delete of a resource never created"
        state["deleted"] = True
        print(f"Deleted [{{name}}].", file=sys.stderr)
    state_file.write_text(json.dumps(state))
elif pos[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    assert opt["worker"] == "all"
    for i in range(int(os.environ["FAKE_WORKERS"])):
        home = Path(os.environ["FAKE_HOMES"]) / str(i)
        (home / "usr-bin").mkdir(parents=True, exist_ok=True)
        env = {{**os.environ, "HOME": str(home), "TPU_WORKER_ID": str(i),
               "PATH": os.environ["FAKE_WORKER_BIN"] + ":" + str(home / "usr-bin") + ":"
                       + os.environ["PATH"]}}
        # Like ssh: returns once the command and every descriptor it left open are done.
        result = subprocess.run(["bash", "-c", opt["command"]], env=env, cwd=home,
                                capture_output=True, text=True, timeout=60)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.returncode:
            sys.exit(result.returncode)
else:
    sys.exit(f"fake gcloud: {{args}} is not faked")
'''

# The fakes on a worker's PATH. Each records its call in $HOME/calls.
WORKER_FAKES = {
    "sudo": 'echo "sudo $*" >>"$HOME/calls"; exec env "$@"',
    "add-apt-repository": 'echo "add-apt-repository $*" >>"$HOME/calls"',
    "apt-get": textwrap.dedent('''\
        echo "apt-get $*" >>"$HOME/calls"
        if [[ " $* " == *" install "*"python3.11 "* ]]; then
          cp "$FAKE_WORKER_BIN/../python3.11" "$HOME/usr-bin/python3.11"
        fi'''),
    "git": textwrap.dedent('''\
        echo "git $*" >>"$HOME/calls"
        if [[ $1 == clone ]]; then mkdir -p "${@: -1}"; fi'''),
    "curl": 'echo "curl $*" >>"$HOME/calls"; exit 7',  # no metadata server, no network
    # Not on the runtime until apt-get installs it (this machine's own python3.11 is hidden).
    "python3.11": textwrap.dedent('''\
        if [[ -x $HOME/usr-bin/python3.11 ]]; then exec "$HOME/usr-bin/python3.11" "$@"; fi
        echo "python3.11: command not found" >&2; exit 127'''),
    # The runtime's Python: 3.10, older than sslocal supports.
    "python3": textwrap.dedent('''\
        if [[ $1 == -V ]]; then echo "Python 3.10.12"; exit 0; fi
        if [[ $1 == -c ]]; then exit 1; fi  # sys.version_info < (3, 11)
        exit 2'''),
}

# What apt-get installs from deadsnakes; its `-m venv` makes a venv with fake pip / sslocal.
FAKE_PYTHON311 = textwrap.dedent('''\
    #!/usr/bin/env bash
    echo "python3.11 $*" >>"$HOME/calls"
    if [[ $1 == -c ]]; then exit 0; fi
    if [[ $1 == -m && $2 == venv ]]; then
      mkdir -p "$3/bin"
      printf 'export PATH=%q:"$PATH"\\n' "$3/bin" >"$3/bin/activate"
      printf '#!/usr/bin/env bash\\necho "pip $*" >>"$HOME/calls"\\n' >"$3/bin/pip"
      printf '#!/usr/bin/env bash\\necho "Python 3.11.13"\\n' >"$3/bin/python"
      cp "$FAKE_WORKER_BIN/../sslocal" "$3/bin/sslocal"
      chmod +x "$3/bin/"*
      exit 0
    fi
    exit 2
    ''')

# `sslocal train` on a worker: a moment of "training", then worker 0 leaves a finished run.
FAKE_SSLOCAL = textwrap.dedent('''\
    #!/usr/bin/env bash
    echo "sslocal $*" >>"$HOME/calls"
    workdir=
    while (($#)); do
      if [[ $1 == --workdir ]]; then workdir=$2; fi
      shift
    done
    echo "training in $workdir"
    sleep "$FAKE_TRAIN_SECONDS"
    echo "step 10: loss 1.0"
    if [[ $TPU_WORKER_ID == 0 && $FAKE_TRAIN_STATUS == 0 ]]; then
      run=$FAKE_GCS/${workdir#gs://}
      mkdir -p "$run/checkpoints/10"
      echo '{"vggss/test": {"cIoU": 0.3}}' >"$run/final_metrics.json"
    fi
    exit "$FAKE_TRAIN_STATUS"
    ''')


class FakeCloud:
    def __init__(self, tmp_path: Path):
        self.root = tmp_path
        self.bin, self.worker_bin = tmp_path / "bin", tmp_path / "fakes" / "bin"
        self.gcs, self.log = tmp_path / "gcs", tmp_path / "gcloud.log"
        self.homes = tmp_path / "workers"
        for folder in (self.bin, self.worker_bin, self.gcs / "bkt" / "tfds" / "synthetic_av"):
            folder.mkdir(parents=True)
        self._write(self.bin / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
        for name, body in WORKER_FAKES.items():
            self._write(self.worker_bin / name, "#!/usr/bin/env bash\n" + body + "\n")
        self._write(tmp_path / "fakes" / "python3.11", FAKE_PYTHON311)
        self._write(tmp_path / "fakes" / "sslocal", FAKE_SSLOCAL)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o755)

    def env(self, **overrides) -> dict[str, str]:
        env = {
            "PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.root), "LC_ALL": "C.UTF-8",
            "FAKE_LOG": str(self.log), "FAKE_GCS": str(self.gcs),
            "FAKE_STATE": str(self.root / "queued-resource.json"), "FAKE_WORKERS": "2",
            "FAKE_HOMES": str(self.homes), "FAKE_WORKER_BIN": str(self.worker_bin),
            "FAKE_STATES": "ACCEPTED,PROVISIONING,ACTIVE", "FAKE_TRAIN_SECONDS": "1.5",
            "FAKE_TRAIN_STATUS": "0",
            "PROJECT": "proj", "ZONE": "us-central2-b", "TPU_TYPE": "v4-16", "NAME": "qr-test",
            "BUCKET": "gs://bkt", "REPO_URL": "https://git.example/sslocal.git",
            "DATA_DIR": "gs://bkt/tfds",
            "POLL_SECONDS": "0.1", "QUEUE_TIMEOUT": "30", "RUN_POLL_SECONDS": "0.2",
            "RUN_TIMEOUT": "60", "LOG_SYNC_SECONDS": "0.3",
        }
        env.update(overrides)
        return {k: v for k, v in env.items() if v is not None}

    def launch(self, timeout=60, **overrides) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(TPU_VM), "configs/synthetic.py", "runs/demo", "--config.max_steps=10"],
            env=self.env(**overrides), capture_output=True, text=True, timeout=timeout)

    def calls(self, who="launcher") -> list[list[str]]:
        if not self.log.exists():
            return []
        records = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [r["argv"] for r in records if r["who"] == who]

    def steps(self) -> list[str]:
        """The launcher's calls, named, consecutive repeats folded (once training has started,
        the slice's state is part of the wait: "wait")."""
        named: list[str] = []
        for argv in self.calls():
            text = " ".join(argv)
            if argv[:2] == ["storage", "cp"] and argv[-1].endswith("/write-check"):
                step = "bucket check"
            elif argv[:2] == ["storage", "rm"] and argv[-1].endswith("/write-check"):
                step = "bucket check"
            elif argv[:2] == ["storage", "ls"] and argv[2] == "gs://bkt/tfds":
                step = "data check"
            elif "queued-resources create" in text:
                step = "create"
            elif "queued-resources describe" in text:
                step = "wait" if "train" in named else "describe"
            elif "tpu-vm ssh" in text and "sslocal_worker.sh install" in text:
                step = "install"
            elif "tpu-vm ssh" in text and "sslocal_worker.sh start" in text:
                step = "train"
            elif argv[:2] == ["storage", "ls"] and argv[2] == "gs://bkt/runs/demo/launch/qr-test/":
                step = "wait"
            elif argv[:2] == ["storage", "ls"] and argv[2].startswith("gs://bkt/runs/demo/"):
                step = "confirm"
            elif "queued-resources delete" in text:
                step = "delete"
            else:
                step = text
            if not named or named[-1] != step:
                named.append(step)
        return named

    def count(self, fragment: str) -> int:
        return sum(fragment in " ".join(argv) for argv in self.calls())

    def worker_calls(self, i: int) -> str:
        return (self.homes / str(i) / "calls").read_text()


@pytest.fixture
def cloud(tmp_path):
    return FakeCloud(tmp_path)


def test_tpu_vm_runs_a_queued_slice_to_a_finished_run_in_the_bucket(cloud):
    started = time.monotonic()
    result = cloud.launch()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    # Bucket check, create, polls until ACTIVE, install, detached training, polls of the
    # run's markers in the bucket, the checkpoints confirmed there, delete: in that order.
    assert cloud.steps() == ["bucket check", "data check", "create", "describe", "install",
                             "train", "wait", "confirm", "delete"]
    calls = cloud.calls()
    describes_before_install = [i for i, a in enumerate(calls) if "describe" in a]
    install_at = next(i for i, a in enumerate(calls) if "ssh" in a)
    assert len([i for i in describes_before_install if i < install_at]) == 3  # ACCEPTED,
    # PROVISIONING, ACTIVE
    create = next(a for a in calls if "create" in a)
    assert {"--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base",
            "--node-id=qr-test", "--project=proj", "--zone=us-central2-b"} <= set(create)
    delete = next(a for a in calls if "delete" in a)
    assert {"qr-test", "--force", "--quiet"} <= set(delete)
    # Detached: the launcher polled the bucket several times while the workers "trained".
    assert cloud.count("storage ls gs://bkt/runs/demo/launch/qr-test/") >= 3

    run = cloud.gcs / "bkt" / "runs" / "demo"
    for i in (0, 1):
        calls_i = cloud.worker_calls(i)
        # The runtime's python3 is 3.10: python3.11 from deadsnakes, then the venv.
        assert "add-apt-repository -y -n ppa:deadsnakes/ppa" in calls_i
        assert "install python3.11 python3.11-venv python3.11-dev" in calls_i
        assert "git clone --quiet https://git.example/sslocal.git" in calls_i
        assert f"python3.11 -m venv {cloud.homes / str(i)}/sslocal/.venv" in calls_i
        assert "jax[tpu]" in calls_i and "sslocal[gcs]" in calls_i
        assert not (run / "launch" / "qr-test" / f"worker-{i}.write-check").exists()
        assert ("sslocal train --config configs/synthetic.py --workdir gs://bkt/runs/demo "
                "--config.data_dir=gs://bkt/tfds --config.max_steps=10") in calls_i
        assert (run / "launch" / "qr-test" / f"worker-{i}.exit-0").is_file()
        log = (run / "launch" / "qr-test" / f"worker-{i}.log").read_text()
        assert "training in gs://bkt/runs/demo" in log and "step 10" in log
        assert "exited with status 0" in log
    assert not (run / "launch" / "qr-test" / "write-check").exists()
    assert json.loads((cloud.root / "queued-resource.json").read_text())["deleted"]


def test_tpu_vm_failed_queued_resource_is_deleted_without_spinning(cloud):
    started = time.monotonic()
    result = cloud.launch(FAKE_STATES="ACCEPTED,PROVISIONING,FAILED")
    assert result.returncode != 0
    assert time.monotonic() - started < 15
    assert "FAILED" in result.stderr and "fake failure" in result.stdout + result.stderr
    assert cloud.steps() == ["bucket check", "data check", "create", "describe", "delete"]
    assert cloud.count("--format=value(state.state)") == 3  # it stopped at FAILED
    assert not cloud.homes.exists()  # no worker was touched


@pytest.mark.parametrize("state", ["SUSPENDED", "DELETING"])
def test_tpu_vm_other_dead_states_end_the_wait(cloud, state):
    result = cloud.launch(FAKE_STATES=f"ACCEPTED,{state}")
    assert result.returncode != 0
    assert cloud.steps()[-1] == "delete"


def test_tpu_vm_queue_timeout_deletes_the_queued_resource(cloud):
    started = time.monotonic()
    # 3 s at 0.1 s per poll: several polls even when a loaded machine starts each fake gcloud
    # slowly (at 1 s, one slow first poll already reached the deadline)
    result = cloud.launch(FAKE_STATES="WAITING_FOR_RESOURCES", QUEUE_TIMEOUT="3")
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "QUEUE_TIMEOUT" in result.stderr
    assert elapsed < 20
    assert cloud.count("--format=value(state.state)") >= 2  # it polled, then gave up
    assert cloud.steps() == ["bucket check", "data check", "create", "describe", "delete"]


def _interruptible() -> None:
    """SIGINT as a terminal's foreground job has it: neither ignored nor blocked. Both are
    inherited across exec, and a bash that starts with SIGINT ignored cannot trap it: a suite
    started in the background of a shell without job control inherits it ignored, and a
    library thread of an earlier test in the same worker may leave it blocked (seen: both
    Ctrl-C tests failed only inside the full suite, never alone)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_tpu_vm_ctrl_c_while_queued_deletes_the_queued_resource(cloud):
    proc = subprocess.Popen(
        ["bash", str(TPU_VM), "configs/synthetic.py", "runs/demo"],
        env=cloud.env(FAKE_STATES="ACCEPTED", QUEUE_TIMEOUT="600"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_interruptible)
    deadline = time.monotonic() + 30
    while cloud.count("describe") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground group
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert cloud.steps()[-1] == "delete", (cloud.steps(), err)
    assert "ssh" not in " ".join(" ".join(a) for a in cloud.calls())


def test_tpu_vm_ctrl_c_while_training_keeps_the_slice_and_training_goes_on(cloud):
    proc = subprocess.Popen(
        ["bash", str(TPU_VM), "configs/synthetic.py", "runs/demo"],
        env=cloud.env(FAKE_TRAIN_SECONDS="3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, preexec_fn=_interruptible)
    deadline = time.monotonic() + 30
    while "wait" not in cloud.steps() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert cloud.count("delete") == 0
    assert "the slice qr-test is kept" in err and "queued-resources delete qr-test" in err
    # The workers' training was not the launcher's child: it finishes and reports.
    marker = cloud.gcs / "bkt" / "runs" / "demo" / "launch" / "qr-test" / "worker-0.exit-0"
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists()


def test_tpu_vm_checks_the_bucket_before_creating_anything(cloud):
    result = cloud.launch(FAKE_BUCKET_READONLY="1")
    assert result.returncode != 0
    assert "cannot write to gs://bkt/runs/demo/launch/qr-test" in result.stderr
    assert cloud.steps() == ["bucket check"]


def test_tpu_vm_refused_create_deletes_nothing(cloud):
    result = cloud.launch(FAKE_CREATE_FAILS="1")
    assert result.returncode != 0
    assert "ALREADY_EXISTS" in result.stderr
    assert cloud.steps() == ["bucket check", "data check", "create"]  # not someone else's


def test_tpu_vm_checks_the_data_dir_before_creating_anything(cloud):
    result = cloud.launch(DATA_DIR="gs://bkt/missing")
    assert result.returncode != 0
    assert "DATA_DIR" in result.stderr
    assert cloud.count("create") == 0


@pytest.mark.parametrize("missing", ["REPO_URL", "PROJECT", "ZONE"])
def test_tpu_vm_requires_its_variables(cloud, missing):
    result = cloud.launch(**{missing: None})
    assert result.returncode != 0
    assert missing in result.stderr
    assert cloud.calls() == []


def test_tpu_vm_needs_a_bucket_workdir(cloud):
    result = cloud.launch(BUCKET=None)
    assert result.returncode != 0 and "BUCKET" in result.stderr
    assert cloud.calls() == []


def test_tpu_vm_workers_that_cannot_write_to_the_bucket_end_it_before_training(cloud):
    # The launcher's own check passes; the workers' write check (their service account) fails.
    cloud._write(cloud.worker_bin / "gcloud", (cloud.bin / "gcloud").read_text().replace(
        'os.environ.get("FAKE_BUCKET_READONLY")', '"TPU_WORKER_ID" in os.environ'))
    result = cloud.launch()
    assert result.returncode != 0
    assert "give the slice's service account write access" in result.stderr
    assert cloud.steps() == ["bucket check", "data check", "create", "describe", "install",
                             "delete"]


def test_tpu_vm_failed_run_keeps_the_slice_and_says_how_to_delete_it(cloud):
    result = cloud.launch(FAKE_TRAIN_STATUS="1")
    assert result.returncode != 0
    assert "training failed" in result.stderr
    assert cloud.count("delete") == 0
    assert "is kept" in result.stderr
    assert "gcloud compute tpus queued-resources delete qr-test" in result.stderr
    assert "install" in cloud.steps() and "train" in cloud.steps()


def test_tpu_vm_failed_run_with_delete_always_deletes(cloud):
    result = cloud.launch(FAKE_TRAIN_STATUS="1", DELETE_SLICE="always")
    assert result.returncode != 0
    assert cloud.steps()[-1] == "delete"


def test_tpu_vm_preempted_run_says_how_to_resume(cloud):
    result = cloud.launch(FAKE_TRAIN_STATUS="143")
    assert result.returncode == 143
    assert "the same command resumes" in result.stderr
    assert cloud.count("delete") == 0


def test_tpu_vm_slice_lost_while_training_ends_the_wait(cloud):
    # ACTIVE for the queue wait, then (while the workers "train") the slice is preempted.
    result = cloud.launch(FAKE_STATES="ACTIVE,SUSPENDED", FAKE_TRAIN_SECONDS="2")
    assert result.returncode != 0
    assert "SUSPENDED while training" in result.stderr
