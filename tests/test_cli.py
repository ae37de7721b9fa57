"""What a researcher meets in the first week, through the commands: resumes that do not fit the
run, frame sizes that do not fit the data, prepare's reuse and roots, help, outputs that never
overwrite, a preempted epoch end, convert without torch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
from PIL import Image

from configs import tiny
from sslocal import evaluate, train
from sslocal.data import builders, prepare

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def sslocal(*args, env=None, cwd=REPO, timeout=300):
    env = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SSLOCAL_DEBUG")},
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "sslocal", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, text):
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and text in errors[0], proc.stderr[-3000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    builders.get_builder("synthetic_av/tiny", data_dir=os.fspath(path), num_train=16,
                         num_test=8, num_workers=1).download_and_prepare()
    return path


def tiny_run_config(data_dir, **fields):
    config = tiny.get_config()
    config.data_dir = str(data_dir)
    config.test_datasets = ()
    config.log_every_steps = config.checkpoint_every_steps = 1
    config.update(fields)
    return config


# -- 1. a resume that does not fit the run ----------------------------------------------------

@pytest.mark.slow
def test_resume_with_another_model_is_refused_and_changes_are_recorded(data_dir, tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_run_config(data_dir, max_steps=1), workdir)
    record = (workdir / "config.json").read_bytes()
    files = sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*"))

    proc = sslocal("train", "--config", TINY, "--workdir", workdir, "--config.model.width=16",
                   f"--config.data_dir={data_dir}", "--config.test_datasets=()")
    one_line_error(proc, "model.width is 8 there, 16 here")
    assert (workdir / "config.json").read_bytes() == record  # nothing written
    assert sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*")) == files

    # A change that fits the checkpoints resumes, and is recorded from the step it began at.
    train.train_and_evaluate(tiny_run_config(data_dir, max_steps=2, learning_rate=0.5), workdir)
    assert (workdir / "config.json").read_bytes() == record  # still the run's own record
    (change,) = [json.loads(line) for line in
                 (workdir / train.CONFIG_CHANGES).read_text().splitlines()]
    assert change == {"step": 1, "changed": {"learning_rate": [1e-3, 0.5], "max_steps": [1, 2]}}


# -- 2. a frame size the data was not prepared for ---------------------------------------------

def test_train_at_another_frame_size_than_prepared_fails_first(data_dir, tmp_path):
    proc = sslocal("train", "--config", TINY, "--workdir", tmp_path / "w",
                   f"--config.data_dir={data_dir}", "--config.image_size=32")
    one_line_error(proc, "synthetic_av/tiny is prepared for 64 px frames")
    assert not (tmp_path / "w").exists()


# -- 5 and 14. prepare: reuse said, roots checked, --overwrite, the missing files named --------

def _clip_tree(root, ids, freq=440.0):
    (root / "frames").mkdir(parents=True)
    (root / "audio").mkdir()
    wave = (0.3 * np.sin(2 * np.pi * freq * np.arange(48000) / 16000)).astype(np.float32)
    for i, clip_id in enumerate(ids):
        Image.fromarray(np.full((40, 60, 3), (40 * i) % 256, np.uint8)).save(
            root / "frames" / f"{clip_id}.jpg")
        scipy.io.wavfile.write(root / "audio" / f"{clip_id}.wav", 16000, wave)
    return root


def test_prepare_reuse_roots_and_overwrite(tmp_path):
    first = _clip_tree(tmp_path / "a", ["c1", "c2"])
    second = _clip_tree(tmp_path / "b", ["c1", "c2", "c3"])
    data = tmp_path / "tfds"
    built = sslocal("prepare", "--dataset", "vggsound/full", "--root", first, "--data_dir", data)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "2 written of 2 requested" in built.stdout

    again = sslocal("prepare", "--dataset", "vggsound/full", "--root", first, "--data_dir", data)
    assert again.returncode == 0 and "reusing the dataset prepared" in again.stdout
    assert str(first) in again.stdout and "--overwrite" in again.stdout

    other = sslocal("prepare", "--dataset", "vggsound/full", "--root", second, "--data_dir", data)
    one_line_error(other, f"already prepared in {data}")
    rebuilt = sslocal("prepare", "--dataset", "vggsound/full", "--root", second, "--data_dir",
                      data, "--overwrite")
    assert rebuilt.returncode == 0 and "3 written of 3 requested" in rebuilt.stdout

    missing = sslocal("prepare", "--dataset", "vggss/test", "--root", tmp_path / "nope",
                      "--data_dir", data)
    one_line_error(missing, "data root not found")
    assert "Downloading and preparing" not in missing.stdout + missing.stderr  # checked first
    no_root = sslocal("prepare", "--dataset", "vggss/test", "--data_dir", data)
    one_line_error(no_root, "pass --root ROOT")
    assert "dataset_info.json" not in no_root.stderr


def test_missing_clips_of_a_video_root_name_the_video(tmp_path):
    (tmp_path / "videos" / "video").mkdir(parents=True)
    with pytest.raises(ValueError, match="no usable clip"):
        prepare.prepare("vggsound/full", root=tmp_path / "videos", data_dir=tmp_path / "tfds",
                        ids=["gone"], num_workers=1)
    (failed,) = (tmp_path / "tfds").rglob("manifest.failed.json")
    (missing,) = json.loads(failed.read_text())["splits"]["train"]["missing"]
    assert missing == {"id": "gone", "files": ["video/gone.mp4"]}


# -- 6. help -----------------------------------------------------------------------------------

def test_every_command_has_its_own_help():
    from sslocal import cli

    for command, (usage, _, names) in cli.COMMANDS.items():
        text = cli.command_help(command)
        assert text.startswith(f"usage: {usage}")
        for name in names:
            assert f"--{name} " in text, (command, name)
    assert "--video" not in cli.command_help("train")  # only the command's own flags
    proc = sslocal("prepare", "--help")  # what the user runs: exit 0, the datasets listed
    assert proc.returncode == 0 and proc.stdout == cli.command_help("prepare") + "\n"
    assert "vggss/test" in proc.stdout and "synthetic_av/small" in proc.stdout


# -- 7. evaluate never writes over earlier results ---------------------------------------------

def test_evaluate_writes_a_new_folder_by_default(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    first = evaluate.default_out(run)
    assert first.parent == run / "evaluations" and not first.exists()
    first.mkdir(parents=True)
    second = evaluate.default_out(run)
    assert second != first and second.parent == first.parent
    weights = tmp_path / "ezvsl.pth"
    weights.write_bytes(b"")
    assert evaluate.default_out(weights).parent == tmp_path / "evaluations"


# -- 8. a preemption at an epoch's last step ---------------------------------------------------

@pytest.mark.slow
def test_preemption_at_an_epoch_end_still_evaluates_that_epoch(data_dir, tmp_path,
                                                               monkeypatch):
    config = tiny_run_config(data_dir, test_datasets=("synthetic_av/tiny",), num_epochs=3)
    steps_per_epoch = 16 // config.batch_size
    make_train_step = train.make_train_step

    def preempted_at_the_first_epoch_end(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def step(state, batch):
            if int(state.step) + 1 == steps_per_epoch:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch)

        return step

    monkeypatch.setattr(train, "make_train_step", preempted_at_the_first_epoch_end)
    workdir = tmp_path / "run"
    results = train.train_and_evaluate(config, workdir)
    assert results == {"preempted_at_step": steps_per_epoch}
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval/synthetic_av/tiny/cIoU" in x] == [steps_per_epoch]
    assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()] == [
        str(steps_per_epoch)]


# -- 10. convert without torch -----------------------------------------------------------------

def test_convert_without_torch_is_one_line(tmp_path):
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    absent = sslocal("convert", tmp_path / "nope.pth", tmp_path / "out", env=env)
    one_line_error(absent, "checkpoint not found")
    (tmp_path / "model.pth").write_bytes(b"\x80\x02}q\x00.")
    present = sslocal("convert", tmp_path / "model.pth", tmp_path / "out", env=env)
    one_line_error(present, "needs torch: pip install torch")


# -- 13. training lists that hold test clips ---------------------------------------------------

def test_prepare_reports_test_clips_in_a_training_list(tmp_path, capsys):
    from sslocal.data import annotations

    test_clip = annotations.read_split("vggss_test")[0]
    root = _clip_tree(tmp_path / "root", [test_clip, "not_a_test_clip"])
    manifest = prepare.prepare("vggsound/full", root=root, data_dir=tmp_path / "tfds",
                               num_workers=1)
    assert manifest["train_clips_in_test_lists"]["vggss_test"] == 1
    assert manifest["splits"]["train"]["written"] == 2  # the list as published
    assert "1 of vggss_test" in capsys.readouterr().out
    minus = prepare.prepare("vggsound/10k_minus_test", root=root, data_dir=tmp_path / "tfds",
                            ids=[test_clip, "not_a_test_clip"], num_workers=1)
    assert minus["exclude_test_clips"] and minus["splits"]["train"]["requested"] == 1
    assert minus["train_clips_in_test_lists"]["vggss_test"] == 0


# -- 9. SIGTERM to prepare ---------------------------------------------------------------------

def _session_processes(sid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # the session id (fields after the command name)
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_sigterm_to_prepare_leaves_no_worker_and_no_incomplete_folder(tmp_path):
    import time

    root = _clip_tree(tmp_path / "root", [f"c{i:03d}" for i in range(200)])  # 2 workers
    data = tmp_path / "tfds"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SSLOCAL_DEBUG")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sslocal", "prepare", "--dataset", "vggsound/full", "--root",
         str(root), "--data_dir", str(data)], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while len(_session_processes(proc.pid)) < 3 and time.time() < deadline:  # + 2 workers
        time.sleep(0.2)
    assert len(_session_processes(proc.pid)) >= 3, "the decode workers never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    deadline = time.time() + 20
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert _session_processes(proc.pid) == []  # no orphaned worker or resource tracker
    assert not [p for p in data.rglob("*") if "incomplete" in p.name]


def test_evaluate_on_an_unprepared_set_says_so_first(tmp_path):
    """The first line is sslocal's, not TFDS's warning about a folder a failed build left."""
    (tmp_path / "tfds" / "vggss" / "test" / "1.0.0").mkdir(parents=True)
    proc = sslocal("evaluate", "--config", TINY, f"--config.data_dir={tmp_path / 'tfds'}",
                   "--dataset", "vggss/test", "--checkpoint", tmp_path)
    one_line_error(proc, "vggss/test is not prepared")
    assert "dataset_info.json" not in proc.stderr
    assert proc.stderr.strip().splitlines()[0].startswith("sslocal evaluate: error:")
