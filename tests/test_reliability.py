"""Reliability: preemption and kills, bad input files, NaN batches, config errors, unsafe pickles.

Each test runs the real entry points (the `sslocal` CLI or train_and_evaluate in a subprocess) and
asserts what happened on disk and in the process's output, against expectations computed here.
"""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import scipy.io.wavfile
import scipy.signal
from PIL import Image

from configs import synthetic as synthetic_config
from configs import tiny
from sslocal import checkpointing, sharding, train
from sslocal.data import annotations, builders, pipeline
from sslocal.data import prepare as data_prepare

REPO = Path(__file__).resolve().parents[1]
SR = 16000

# A tiny training run (synthetic_av/tiny: 64 clips, batch 8 -> 8 steps per epoch, 2 epochs,
# checkpoints every 3 steps and at epoch ends) with hooks that stop it at a known point:
# before a given step (it writes --marker and waits for MARKER.go), or inside the Orbax save of a
# given step (after the temporary directory is written, before it is renamed); --nan_index gives
# one training record a NaN spectrogram; --enospc_in_save makes the save of a step fail as a full
# disk does (the data item's write raises ENOSPC). It dumps the final in-memory train state
# (params, batch stats, optimizer state, step) to final.npz. With --cli the same run goes
# through the `sslocal train` command (its one-line errors and exit status), hooks included.
TRAIN_SCRIPT = r'''
import argparse, errno, logging, os, sys, time
from pathlib import Path

import grain
import jax
import numpy as np

from configs import tiny
from sslocal import checkpointing, train
from sslocal.data import prepare


class NanRecord:
    """The training split, with a NaN in the spectrogram of record `index`."""

    def __init__(self, source, index):
        self.source, self.index = source, index

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        record = dict(self.source[i])
        if i == self.index:
            record["spectrogram"] = np.array(record["spectrogram"])
            record["spectrogram"][100, 50] = np.nan
        return record


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("data_dir")
    p.add_argument("--pause_before_step", type=int, default=0)
    p.add_argument("--pause_in_save", type=int, default=0)
    p.add_argument("--marker", default="")
    p.add_argument("--num_epochs", type=int, default=2)
    p.add_argument("--nan_index", type=int, default=-1)
    p.add_argument("--enospc_in_save", type=int, default=0)
    p.add_argument("--cli", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)  # absl put its own handler on the root logger

    def pause():
        Path(args.marker).write_text("paused")
        go = Path(args.marker + ".go")
        for _ in range(12000):  # 10 minutes at most
            if go.exists():
                return
            time.sleep(0.05)

    last = {}
    make_train_step = train.make_train_step

    def make_hooked_step(*a, **k):
        step_fn = make_train_step(*a, **k)

        def hooked(state, batch):
            if args.pause_before_step and int(state.step) + 1 == args.pause_before_step:
                pause()
            last["state"], metrics = step_fn(state, batch)
            return last["state"], metrics
        return hooked

    train.make_train_step = make_hooked_step

    saving = [None]
    checkpointer_save = checkpointing.Checkpointer.save

    def save(self, step, *a, **k):
        saving[0] = step
        return checkpointer_save(self, step, *a, **k)

    grain_save = grain.checkpoint.CheckpointHandler.save

    def grain_handler_save(self, directory, *a, **k):
        if saving[0] == args.enospc_in_save:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        grain_save(self, directory, *a, **k)
        if saving[0] == args.pause_in_save:
            pause()

    checkpointing.Checkpointer.save = save
    grain.checkpoint.CheckpointHandler.save = grain_handler_save

    load_split = prepare.load_split

    def load_nan_split(dataset, split, *a, **k):
        source = load_split(dataset, split, *a, **k)
        return NanRecord(source, args.nan_index) if split == "train" else source

    if args.nan_index >= 0:
        prepare.load_split = load_nan_split

    if args.cli:
        from sslocal import cli

        # ml_collections reads the --config.FIELD overrides from sys.argv itself.
        sys.argv = ["sslocal", "train", "--config=configs/tiny.py", f"--workdir={args.workdir}",
                    "--config.test_datasets=()", f"--config.data_dir={args.data_dir}",
                    f"--config.num_epochs={args.num_epochs}", "--config.log_every_steps=100",
                    "--config.checkpoint_every_steps=3"]
        cli.run()
    c = tiny.get_config()
    c.test_datasets = ()
    c.data_dir = args.data_dir
    c.num_epochs = args.num_epochs
    c.log_every_steps = 100
    c.checkpoint_every_steps = 3
    print("result", train.train_and_evaluate(c, args.workdir), flush=True)
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(last["state"]))
    np.savez(Path(args.workdir) / "final.npz",
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """synthetic_av/tiny, prepared once (in this process: one worker, no spawn)."""
    data_dir = tmp_path_factory.mktemp("reliability_tfds")
    builders.get_builder("synthetic_av/tiny", data_dir=os.fspath(data_dir),
                         num_workers=1).download_and_prepare()
    return data_dir


@pytest.fixture(scope="session")
def train_script(tmp_path_factory):
    """TRAIN_SCRIPT and its environment: one device, fewer optimisations, and a compilation
    cache that every run shares (the same compiled step in every process, compiled once)."""
    folder = tmp_path_factory.mktemp("train_script")
    (folder / "train_run.py").write_text(TRAIN_SCRIPT)
    env = _env(1, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               JAX_COMPILATION_CACHE_DIR=os.fspath(folder / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return folder / "train_run.py", env


def _env(devices: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.pop("SSLOCAL_DEBUG", None)
    env.update(extra)
    return env


# -- 1. kill and resume ---------------------------------------------------------------------------

class TrainRun:
    """One subprocess of TRAIN_SCRIPT, its output in a log file."""

    def __init__(self, script, workdir, data_dir, env, log, *hooks):
        self.marker = Path(f"{log}.marker")
        self.log = Path(log)
        self.workdir = Path(workdir)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(workdir), str(data_dir),
                 "--marker", str(self.marker), *hooks],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, condition, what: str, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"run exited (rc {self.proc.returncode}) before {what}:\n"
                            f"{self.output()[-4000:]}")
            if time.monotonic() > end:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def wait_paused(self) -> None:
        self.wait_until(self.marker.exists, "the pause hook")

    def resume(self) -> None:
        Path(f"{self.marker}.go").write_text("go")

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"run did not finish:\n{self.output()[-4000:]}")

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(60) == -signal.SIGKILL


def _steps(workdir: Path) -> list[int]:
    """The complete checkpoints: Orbax renames a step's temporary directory when it is done."""
    folder = workdir / checkpointing.LATEST_DIR
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _partial(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / checkpointing.LATEST_DIR).iterdir()
                  if not p.name.isdigit())


def _final_state(workdir: Path) -> dict[str, np.ndarray]:
    with np.load(workdir / "final.npz") as f:
        return {k: f[k] for k in f.files}


def _array_file(step_dir: Path) -> Path:
    """The largest file of a step's arrays (OCDBT data): the parameters and Adam moments."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_preemption_kill_and_kill_during_save_resume_bitwise(tiny_data, train_script, tmp_path):
    """One workdir goes through SIGTERM, SIGKILL mid-epoch, SIGKILL mid-save, a second run
    launched on it, a full disk during a save and a truncated checkpoint, and still ends with
    exactly the train state of an uninterrupted run of the same 16 steps."""
    script, env = train_script
    runs = []

    def run(name, *hooks):
        runs.append(name)
        return TrainRun(script, tmp_path / name, tiny_data, env,
                        tmp_path / f"{name}_{len(runs)}.log", *hooks)

    reference = run("reference")  # runs beside the first interrupted run
    work = tmp_path / "interrupted"

    # Preemption: SIGTERM before step 5 (not a checkpoint step) -> step 5 runs, is checkpointed,
    # and the process exits cleanly.
    first = run("interrupted", "--pause_before_step=5")
    first.wait_paused()
    # A second `sslocal train` on the workdir the first one trains in: refused at once, in one
    # line naming the first (the first is checked below: its run ends bitwise as expected).
    lock = work / checkpointing.LOCK_FILE
    assert f"pid {first.proc.pid} " in lock.read_text()
    started = time.monotonic()
    second_run = subprocess.run(
        [sys.executable, "-m", "sslocal", "train", "--config=configs/tiny.py",
         f"--workdir={work}", f"--config.data_dir={tiny_data}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert second_run.returncode == 1, second_run.stderr[-3000:]
    refused = [line for line in second_run.stderr.splitlines() if "error" in line]
    assert len(refused) == 1 and "Traceback" not in second_run.stderr, second_run.stderr[-3000:]
    assert refused[0].startswith(f"sslocal train: error: {work} is in use by another training "
                                 f"run (pid {first.proc.pid} on {socket.gethostname()} since ")
    assert refused[0].endswith(f"; it holds {lock}): wait for it to end, or give another "
                               f"--workdir"), refused[0]
    assert time.monotonic() - started < 60  # before any data, model or compilation
    first.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the handler runs in the main thread, inside the hook's sleep
    first.resume()
    assert first.finish() == 0, first.output()[-4000:]
    assert "SIGTERM: saving a checkpoint at step 5" in first.output()
    assert "preempted_at_step': 5" in first.output()
    assert _steps(work) == [3, 5]
    assert reference.finish() == 0, reference.output()[-4000:]
    expected = _final_state(tmp_path / "reference")
    assert int(expected[".step"]) == 16

    # SIGKILL in the middle of epoch 2 (steps 9..16), before step 11: step 10 is lost, the
    # checkpoint of step 9 (data position included) is the latest.
    second = run("interrupted", "--pause_before_step=11")
    second.wait_paused()
    second.wait_until(lambda: 9 in _steps(work), "the checkpoint of step 9")
    second.sigkill()
    assert f"resumed from {work} at step 5" in second.output()
    assert max(_steps(work)) == 9

    # SIGKILL inside the save of step 12: its temporary directory is there, never completed.
    # The killed run held the lock: the kernel released it, and the next run takes it.
    third = run("interrupted", "--pause_in_save=12")
    third.wait_paused()
    assert f"pid {third.proc.pid} " in lock.read_text()
    third.sigkill()
    assert f"resumed from {work} at step 9" in third.output()
    assert max(_steps(work)) == 9
    assert any(name.startswith("12.") for name in _partial(work)), _partial(work)

    # The disk fills during the save of step 12 (through `sslocal train`): one line naming the
    # folder and the space needed, exit 1; step 9 stays the latest and intact.
    full = run("interrupted", "--enospc_in_save=12", "--cli")
    assert full.finish() == 1, full.output()[-4000:]
    errors = [line for line in full.output().splitlines() if line.startswith("sslocal train:")]
    assert len(errors) == 1 and "Traceback" not in full.output(), full.output()[-4000:]
    assert re.fullmatch(
        rf"sslocal train: error: no space left on the device to save the checkpoint of step 12 "
        rf"in {re.escape(str(work / 'checkpoints'))}: it needs about [0-9.,]+ (KiB|MiB) \(the "
        rf"train state's size\), [0-9.,]+ (KiB|MiB|GiB) free\. Training stopped; the checkpoint "
        rf"of step 9 is intact and the same command resumes from it once there is room",
        errors[0]), errors[0]
    assert max(_steps(work)) == 9  # the half-written 12 is not a checkpoint
    assert checkpointing.latest_saved_step(work) == 9
    assert checkpointing.check_step(work / "checkpoints" / "9") == (True, None)

    # Step 9 is then damaged on disk (its array file cut short). The restart names it, moves it
    # aside, falls back to step 8 and ends bitwise equal to the run that never stopped.
    array_file = _array_file(work / "checkpoints" / "9")
    array_file.write_bytes(array_file.read_bytes()[:array_file.stat().st_size // 2])
    last = run("interrupted")
    assert last.finish() == 0, last.output()[-4000:]
    output = last.output()
    rel = array_file.relative_to(work / "checkpoints" / "9")
    assert re.search(rf"the checkpoint of step 9 in {re.escape(str(work / 'checkpoints'))} is "
                     rf"damaged \({re.escape(str(rel))} is [0-9,]+ bytes, [0-9,]+ when saved\): "
                     rf"not resumed from; moved to {re.escape(str(work / 'damaged_checkpoints'))}"
                     rf"/9", output), output[-4000:]
    assert "resuming from the checkpoint of step 8, the newest that restores" in output
    assert f"resumed from {work} at step 8" in output
    record = json.loads((work / "damaged_checkpoints" / "damaged.jsonl").read_text())
    assert record["step"] == 9 and str(rel) in record["problem"]
    assert _partial(work) == []  # the half-written step 12 was cleaned up
    assert max(_steps(work)) == 16
    final = _final_state(work)
    assert sorted(final) == sorted(expected)
    for key, value in expected.items():
        assert final[key].dtype == value.dtype and final[key].shape == value.shape, key
        assert final[key].tobytes() == value.tobytes(), f"{key} differs after resuming"


# -- 2. bad inputs through `sslocal prepare` ------------------------------------------------------

def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(
        (w, h), Image.BICUBIC)


def _tone(freq: float, seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _flickr_xml(boxes_256) -> str:
    objects = "".join("<object><bbox><name>x</name>" + "".join(f"<v>{v}</v>" for v in box)
                      + "</bbox></object>" for box in boxes_256)
    return f"<annotation>{objects}</annotation>"


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    """ROOT/frames, audio, Annotations: every kind of bad input beside good clips. The ids are
    real SoundNet-Flickr test ids, so that `flickr_soundnet/test` (its 249-id list) and
    `flickr_soundnet/full` (every clip on disk) both read this one tree."""
    root = tmp_path_factory.mktemp("bad_tree")
    for sub in ("frames", "audio", "Annotations"):
        (root / sub).mkdir()
    ids = annotations.read_split("flickr_test")
    names = ["good", "bad_boxes", "png_as_jpg", "six_channels", "silent", "empty_jpg",
             "truncated_jpg", "corrupt_wav", "short_wav", "xml_without_boxes", "no_xml"]
    cid = dict(zip(names, ids, strict=False))
    good_boxes = [(10, 20, 100, 200), (30, 40, 120, 220)]
    bad_boxes = [(-20, 10, 100, 300), (200, 50, 100, 150)]  # negative / past 256, swapped

    def frame(name, image, fmt="JPEG"):
        image.save(root / "frames" / f"{cid[name]}.jpg", format=fmt, quality=95)

    def wav(name, wave, sr=SR):
        scipy.io.wavfile.write(root / "audio" / f"{cid[name]}.wav", sr, wave)

    def xml(name, boxes):
        (root / "Annotations" / f"{cid[name]}.xml").write_text(_flickr_xml(boxes))

    for i, name in enumerate(["good", "bad_boxes", "six_channels", "silent", "empty_jpg",
                              "truncated_jpg", "corrupt_wav", "short_wav", "xml_without_boxes",
                              "no_xml"]):
        if name not in ("empty_jpg", "truncated_jpg"):
            frame(name, _photo(320, 240, i))
        if name not in ("corrupt_wav", "short_wav", "six_channels", "silent"):
            wav(name, _tone(440 * (i + 1), 3.0))
        if name not in ("xml_without_boxes", "no_xml"):
            xml(name, bad_boxes if name == "bad_boxes" else good_boxes)
    frame("png_as_jpg", _photo(200, 150, 99), fmt="PNG")
    wav("png_as_jpg", _tone(700, 3.0))
    xml("png_as_jpg", good_boxes)
    wav("six_channels", np.repeat(_tone(1000, 4.0, 48000)[:, None], 6, axis=1), sr=48000)
    wav("silent", np.zeros(3 * SR, np.int16))
    wav("short_wav", _tone(440, 0.05))
    (root / "audio" / f"{cid['corrupt_wav']}.wav").write_bytes(
        b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00garbage")
    (root / "frames" / f"{cid['empty_jpg']}.jpg").write_bytes(b"")
    buf = io.BytesIO()
    _photo(320, 240, 7).save(buf, format="JPEG", quality=95)
    (root / "frames" / f"{cid['truncated_jpg']}.jpg").write_bytes(buf.getvalue()[:2000])
    (root / "Annotations" / f"{cid['xml_without_boxes']}.xml").write_text(
        "<annotation><object><name>dog</name></object></annotation>")
    bad_name = os.fsdecode(b"bad_name_\xff\xfe")  # not UTF-8: only the "full" config sees it
    _photo(320, 240, 50).save(root / "frames" / f"{bad_name}.jpg", format="JPEG")
    scipy.io.wavfile.write(root / "audio" / f"{bad_name}.wav", SR, _tone(440, 3.0))
    return {"root": root, "ids": ids, "cid": cid, "good_boxes": good_boxes,
            "bad_boxes": bad_boxes}


def _prepare_cli(dataset: str, root: Path, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sslocal", "prepare", f"--dataset={dataset}", f"--root={root}",
         f"--data_dir={data_dir}"], capture_output=True, text=True, env=_env(), cwd=REPO,
        timeout=600)


def _records(dataset: str, split: str, data_dir: Path) -> dict[str, dict]:
    source = data_prepare.load_split(dataset, split, os.fspath(data_dir))
    return {r["id"].decode() if isinstance(r["id"], bytes) else r["id"]: r
            for r in (source[i] for i in range(len(source)))}


def _box_224(box_256) -> list[float]:
    """protocol 6 written out: int(224 * v / 256) per coordinate, then clipped to [0, 224]."""
    return [min(max(int(224 * v / 256), 0), 224) for v in box_256]


def test_prepare_cli_flickr_test_reports_every_bad_input(bad_tree, tmp_path):
    cid, root = bad_tree["cid"], bad_tree["root"]
    done = _prepare_cli("flickr_soundnet/test", root, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr
    manifest = json.loads((tmp_path / "flickr_soundnet/test/1.0.0/manifest.json").read_text())
    entry = manifest["splits"]["test"]
    good = ["good", "bad_boxes", "png_as_jpg", "six_channels", "silent"]
    unreadable = {"empty_jpg": "frames", "truncated_jpg": "frames", "corrupt_wav": "audio",
                  "short_wav": "audio", "xml_without_boxes": "Annotations"}
    # Every listed id without files is missing, and so is the clip without its XML.
    present = set(good) | set(unreadable)
    missing = [i for i in bad_tree["ids"] if i not in {cid[n] for n in present}]
    assert entry["requested"] == 249 and entry["written"] == len(good) == 5
    assert entry["found"] == len(present) == 10
    assert [m["id"] for m in entry["missing"]] == missing and len(missing) == 239
    assert {"id": cid["no_xml"], "files": [f"Annotations/{cid['no_xml']}.xml"]} in entry["missing"]
    by_id = {u["id"]: u for u in entry["unreadable"]}
    assert set(by_id) == {cid[n] for n in unreadable}
    for name, folder in unreadable.items():
        assert by_id[cid[name]]["file"].startswith(f"{folder}/{cid[name]}."), by_id[cid[name]]
    assert "truncated" in by_id[cid["truncated_jpg"]]["error"]
    assert "0.050 s" in by_id[cid["short_wav"]]["error"]
    assert "no bbox" in by_id[cid["xml_without_boxes"]]["error"]
    warnings = [w for w in entry["warnings"] if w["id"] == cid["bad_boxes"]]
    assert len(warnings) == 2 and "clipped" in warnings[0]["warning"] and \
        "swapped" in warnings[1]["warning"]
    assert f"{entry['written']} written of 249 requested" in done.stdout

    records = _records("flickr_soundnet/test", "test", tmp_path)
    assert sorted(records) == sorted(cid[n] for n in good)
    # Boxes: the XML's 256-px coordinates -> 224 px, clipped; a swapped box kept as it is.
    np.testing.assert_array_equal(records[cid["good"]]["boxes"],
                                  [_box_224(b) for b in bad_tree["good_boxes"]])
    np.testing.assert_array_equal(records[cid["bad_boxes"]]["boxes"],
                                  [_box_224(b) for b in bad_tree["bad_boxes"]])
    # Frames: the file decoded by content (a PNG named .jpg too), squashed bicubic to 224, PNG.
    for name in ("good", "png_as_jpg"):
        with Image.open(root / "frames" / f"{cid[name]}.jpg") as im:
            expected = np.asarray(im.convert("RGB").resize((224, 224), Image.BICUBIC))
        np.testing.assert_array_equal(pipeline.decode_image(records[cid[name]]["image"]),
                                      expected)
    # Audio: a silent file gives log(0 + 1e-7) everywhere; 6 channels at 48 kHz give the mono
    # 16 kHz tone, whose spectrogram matches scipy's of the same tone generated at 16 kHz.
    silent = records[cid["silent"]]["spectrogram"]
    np.testing.assert_array_equal(silent, np.full((257, 200), np.log(1e-7), np.float16))
    _, _, power = scipy.signal.spectrogram(_tone(1000, 3.0).astype(np.float64), fs=SR,
                                           nperseg=512, noverlap=274)
    six = records[cid["six_channels"]]["spectrogram"].astype(np.float64)
    assert int(np.argmax(six.mean(axis=1))) == 32  # 1000 Hz / (16000 / 512)
    np.testing.assert_allclose(six[30:35], np.log(power + 1e-7)[30:35], atol=0.05)


def test_prepare_cli_full_config_skips_bad_clips_and_names(bad_tree, tmp_path):
    """`full` = every clip on disk, the non-UTF-8 name included; no XML is read for training."""
    cid = bad_tree["cid"]
    done = _prepare_cli("flickr_soundnet/full", bad_tree["root"], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((tmp_path / "flickr_soundnet/full/1.0.0/manifest.json").read_text())
    entry = manifest["splits"]["train"]
    good = ["good", "bad_boxes", "png_as_jpg", "six_channels", "silent", "xml_without_boxes",
            "no_xml"]
    bad = {cid[n] for n in ("empty_jpg", "truncated_jpg", "corrupt_wav", "short_wav")}
    assert (entry["requested"], entry["found"], entry["written"]) == (12, 12, 7)
    assert entry["missing"] == []
    by_id = {u["id"]: u for u in entry["unreadable"]}
    assert set(by_id) == bad | {"bad_name_\\xff\\xfe"}
    assert "not valid UTF-8" in by_id["bad_name_\\xff\\xfe"]["error"]
    records = _records("flickr_soundnet/full", "train", tmp_path)
    assert sorted(records) == sorted(cid[n] for n in good)
    # Training frames: shorter side int(1.1 * 224) = 246, JPEG.
    image = pipeline.decode_image(records[cid["png_as_jpg"]]["image"])
    assert image.shape == (246, 328, 3)


def test_prepare_api_reports_an_id_of_the_list_without_files(bad_tree, tmp_path):
    cid = bad_tree["cid"]
    manifest = data_prepare.prepare("flickr_soundnet/10k", root=bad_tree["root"],
                                    data_dir=tmp_path, ids=[cid["good"], "no_such_clip"],
                                    num_workers=1)
    entry = manifest["splits"]["train"]
    assert (entry["requested"], entry["found"], entry["written"]) == (2, 1, 1)
    assert entry["missing"] == [{"id": "no_such_clip",
                                 "files": ["frames/no_such_clip.jpg", "audio/no_such_clip.wav"]}]


# -- 3. a NaN in a batch --------------------------------------------------------------------------

class _MarkedRecords:
    """A data source whose spectrograms hold their own index: the loader's order, read back."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return {**self.source[index], "spectrogram": np.full((257, 200), index, np.float16)}


def test_nan_batch_stops_with_its_step_and_keeps_the_last_good_checkpoint(tiny_data, train_script,
                                                                          tmp_path):
    # Which record does step 5 see first? The loader's own order (the run's seed and batch).
    clean = data_prepare.load_split("synthetic_av/tiny", "train", os.fspath(tiny_data))
    seed = synthetic_config.get_config().seed
    order = pipeline.train_loader(_MarkedRecords(clean), global_batch_size=8, image_size=64,
                                  seed=seed, process_index=0, process_count=1)
    batches = [np.rint(next(order)["spec"][:, 0, 0, 0]).astype(int) for _ in range(5)]
    index = int(batches[4][0])
    assert all(index not in b for b in batches[:4])

    script, env = train_script
    run = TrainRun(script, tmp_path / "work", tiny_data, env, tmp_path / "nan.log",
                   "--num_epochs=1", f"--nan_index={index}")
    assert run.finish() != 0
    assert re.search(r"FloatingPointError: non-finite loss or gradient at step 5 \(loss=nan\); "
                     r"the state was left at step 4", run.output()), run.output()[-4000:]
    # Steps 1-4 were fine: the checkpoint of step 3 is the last one; none of step 5 or later.
    assert _steps(tmp_path / "work") == [3]
    config = tiny.get_config()
    tx = train.make_optimizer(config)
    _, like = train.create_train_state(config, sharding.make_mesh(1), tx)
    checkpointer = checkpointing.Checkpointer(tmp_path / "work")
    restored = checkpointer.restore(like)
    checkpointer.close()
    assert int(restored.step) == 3
    assert int(optax.tree_utils.tree_get(restored.opt_state, "count")) == 3
    for leaf in jax.tree.leaves((restored.params, restored.batch_stats, restored.opt_state)):
        assert np.all(np.isfinite(np.asarray(leaf)))


# -- 4. config errors -----------------------------------------------------------------------------

# The CLI, with a listener that records every XLA compilation to $COMPILE_LOG at exit.
CLI_WITH_COMPILE_LOG = r'''
import atexit, os
import jax.monitoring

compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)
atexit.register(lambda: open(os.environ["COMPILE_LOG"], "w").write("\n".join(compiles)))
if os.environ.get("COMPILE_FIRST"):  # the listener's positive control
    import jax.numpy as jnp
    jnp.arange(3).sum().block_until_ready()
from sslocal import cli

cli.run()
'''


def _train_cli(tmp_path, *overrides, devices=8, **env):
    script = tmp_path / "cli.py"
    script.write_text(CLI_WITH_COMPILE_LOG)
    log = tmp_path / "compiles.txt"
    done = subprocess.run(
        [sys.executable, str(script), "train", f"--config={REPO / 'configs/synthetic.py'}",
         f"--workdir={tmp_path / 'work'}", *overrides], capture_output=True, text=True,
        env=_env(devices, COMPILE_LOG=os.fspath(log), **env), cwd=REPO, timeout=300)
    return done, [e for e in log.read_text().splitlines() if e]


@pytest.mark.parametrize("overrides,message", [
    (["--config.bogus=1"], "bogus"),
    (["--config.train_dataset=vggsound/10k", "--config.data_dir={tmp}/no_such_dir"],
     "vggsound/10k is not prepared in {tmp}/no_such_dir"),
    (["--config.batch_size=12"], "batch size 12 is not divisible by the 8 devices"),
    (["--config.model.image_pretrained={tmp}/resnet18-f37072fd.pth"],
     "model.image_pretrained: no file {tmp}/resnet18-f37072fd.pth"),
    (["--config.eval.ogl=True", "--config.eval.ogl_weights={tmp}/resnet18-f37072fd.pth"],
     "eval.ogl_weights: no file {tmp}/resnet18-f37072fd.pth"),
], ids=["unknown_key", "missing_data_dir", "batch_not_divisible", "missing_weights",
        "missing_ogl_weights"])
def test_config_errors_fail_fast_with_one_clear_line(tmp_path, overrides, message):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    done, compiles = _train_cli(tmp_path, *overrides)
    assert done.returncode != 0
    assert message.format(tmp=tmp_path) in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert compiles == []  # nothing was compiled
    assert not (tmp_path / "work").exists()  # nor a workdir created


@pytest.mark.parametrize("field,value", [("checkpoint_every_steps", 0), ("log_every_steps", -5),
                                         ("num_epochs", 0), ("batch_size", 0)])
def test_validate_config_rejects_counts_below_one(field, value):
    config = synthetic_config.get_config()
    mesh = sharding.make_mesh()
    train.validate_config(config, mesh)  # the config as shipped is fine
    config[field] = value
    with pytest.raises(ValueError, match=f"{field} must be a positive integer, not {value}"):
        train.validate_config(config, mesh)


def test_compile_listener_sees_compilations(tmp_path):
    """Positive control of the check above: the same error, after one compilation."""
    done, compiles = _train_cli(tmp_path, "--config.batch_size=12", COMPILE_FIRST="1")
    assert done.returncode != 0 and "not divisible" in done.stderr
    assert len(compiles) >= 1


def test_preempted_train_command_exits_143(tmp_path):
    """`sslocal train` stopped by SIGTERM (after its save, which the test above checks) tells
    the scheduler that the job did not finish; a finished run exits 0."""
    script = tmp_path / "cli.py"
    script.write_text("import json, os\nfrom sslocal import cli, train\n"
                      "train.train_and_evaluate = lambda config, workdir: "
                      "json.loads(os.environ['RESULT'])\ncli.run()\n")
    args = [sys.executable, str(script), "train", f"--config={REPO / 'configs/synthetic.py'}",
            f"--workdir={tmp_path / 'work'}"]
    preempted = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300,
                               env=_env(RESULT='{"preempted_at_step": 7}'))
    assert preempted.returncode == 143, preempted.stderr[-3000:]
    assert "SIGTERM: stopped after step 7 with its checkpoint saved" in preempted.stderr
    finished = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300,
                              env=_env(RESULT='{"synthetic_av/demo": {"cIoU": 0.5}}'))
    assert finished.returncode == 0, finished.stderr[-3000:]


# -- 5. unsafe PyTorch checkpoints ----------------------------------------------------------------

class _Payload:
    """Unpickling this object calls os.mkdir(path): code that a weights file must never run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_convert_cli_refuses_a_pickle_that_runs_code(tmp_path):
    torch = pytest.importorskip("torch")
    evil, ran = tmp_path / "evil.pth", tmp_path / "payload_ran"
    torch.save({"model": {"imgnet.conv1.weight": torch.zeros(1)}, "x": _Payload(str(ran))}, evil)
    # Control: a plain (unsafe) load does run the payload.
    torch.load(evil, weights_only=False)
    assert ran.is_dir()
    ran.rmdir()

    out = tmp_path / "converted"
    done = subprocess.run([sys.executable, "-m", "sslocal", "convert", str(evil), str(out)],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert done.returncode != 0
    assert f"refusing to load {evil} for safety" in done.stderr, done.stderr[-3000:]
    assert "weights_only=True" in done.stderr
    assert "Traceback" not in done.stderr
    assert not ran.exists()  # the payload did not run
    assert not out.exists()


# -- 6. long runs ---------------------------------------------------------------------------------

def _traced_growth(run) -> int:
    """Bytes of Python-allocated memory still held after run() (strings included, which the
    garbage collector's object list does not show)."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("to_json", ["spec", "kvstore_spec", "metrics"])
def test_tensorstore_json_is_freed(to_json):
    """TensorStore's JSON-to-Python conversion leaks one reference to every key and value of
    every dict it returns; Orbax calls these per array per save. After
    checkpointing.repair_tensorstore_json_leak() (twice: it must be idempotent) what they return
    must be freed, and still be right."""
    import tensorstore as ts

    checkpointing.repair_tensorstore_json_leak()
    checkpointing.repair_tensorstore_json_leak()
    expected = {"driver": "zarr", "kvstore": {"driver": "file", "path": "/data/run/7/"}}
    calls = {
        "spec": lambda i: ts.Spec({**expected, "dtype": "float32"}).to_json()["kvstore"],
        "kvstore_spec": lambda i: ts.KvStore.Spec(expected["kvstore"]).to_json(),
        "metrics": lambda i: ts.experimental_collect_matching_metrics("/tensorstore/"),
    }
    call = calls[to_json]
    for i in range(100):  # warm-up: metrics first seen, caches
        call(i)
    result = call(0)
    if to_json == "metrics":
        assert result and all(set(m) >= {"name", "values"} for m in result)
    else:
        assert result == expected["kvstore"]
    growth = _traced_growth(lambda: [call(i) for i in range(2000)])
    assert growth < 100_000, f"{growth} bytes kept by 2,000 calls"  # leaked: 0.5-1.4 MB
    assert not checkpointing._tensorstore_json_leaks()


def test_checkpoint_saves_leave_nothing_behind(tmp_path):
    """Hundreds of saves in a run must not pile up memory: the TensorStore JSON leak above cost
    about 250 bytes per array per save (~900 strings and 24 lists per save of the tiny model). The
    RSS over a 2,000-step run is measured by benchmarks/memory_long_run.py, not here."""
    import gc

    state = {"w": jax.numpy.arange(1000.0), "b": jax.numpy.ones((7, 3))}
    checkpointer = checkpointing.Checkpointer(tmp_path / "work", keep=2, asynchronous=False)
    assert not checkpointing._tensorstore_json_leaks()  # the constructor repaired TensorStore
    try:
        for step in range(1, 41):  # warm-up: handlers, thread pools, caches (~100 objects)
            checkpointer.save(step, state, force=True)
        gc.collect()
        before = len(gc.get_objects())
        traced = _traced_growth(
            lambda: [checkpointer.save(step, state, force=True) for step in range(41, 101)])
        growth = len(gc.get_objects()) - before
    finally:
        checkpointer.close()
    assert growth < 30, f"{growth} more Python objects after 60 saves"  # the leak: 1,440
    assert traced < 400_000, f"{traced} bytes kept by 60 saves"  # the leak: 1.1 MB
    assert checkpointer.latest_step() == 100
