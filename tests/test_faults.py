"""Faults beyond a kill (issue 20): damaged checkpoints, a full disk during a save, damaged
prepared datasets and `sslocal prepare --verify`, the workdir lock, and the inputs the fuzzer
(benchmarks/fuzz_inputs.py) found mishandled.

The training-level versions share the runs of tests/test_reliability.py's kill-and-resume test:
a real run falling back past a truncated checkpoint and ending bitwise equal to an uninterrupted
one, a full disk inside `sslocal train`, and a second `sslocal train` on a live workdir.
"""

import base64
import errno
import fractions
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io.wavfile

from configs import tiny
from sslocal import checkpointing, train
from sslocal.data import annotations, builders, pipeline, spectrogram, video
from sslocal.data import prepare as data_prepare

REPO = Path(__file__).resolve().parents[1]
DATASET = "synthetic_av/tiny"


def _state(step: int) -> dict:
    """A small train-state-like tree whose values say which step saved it."""
    rng = np.random.default_rng(step)
    return {"params": {"w": jnp.asarray(rng.standard_normal((64, 256)).astype(np.float32)),
                       "b": jnp.asarray(rng.standard_normal(256).astype(np.float32))},
            "step": jnp.asarray(step)}


def _assert_same(restored, expected) -> None:
    got, want = jax.tree.leaves(restored), jax.tree.leaves(expected)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _array_file(step_dir: Path) -> Path:
    """The step's largest file: the OCDBT data holding the arrays."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path) -> Path:
    """A workdir with the checkpoints of steps 1, 2 and 3, saved as training saves them."""
    work = tmp_path / "work"
    checkpointer = checkpointing.Checkpointer(work, keep=3)
    for step in (1, 2, 3):
        checkpointer.save(step, _state(step), force=True)
    checkpointer.wait()
    checkpointer.close()
    return work


def _restore(work: Path, like=None):
    checkpointer = checkpointing.Checkpointer(work, keep=3)
    try:
        return checkpointer.restore(_state(0) if like is None else like)
    finally:
        checkpointer.close()


# -- 1. damaged checkpoints -----------------------------------------------------------------------

def test_every_step_is_sealed_with_its_files_sizes_and_sha256(saved):
    step = saved / "checkpoints" / "3"
    record = json.loads((step / checkpointing.CHECKSUMS).read_text())["files"]
    on_disk = {p.relative_to(step).as_posix(): p for p in step.rglob("*") if p.is_file()}
    # Everything Orbax wrote before the commit; its commit marker comes after the seal.
    assert set(record) == set(on_disk) - {checkpointing.CHECKSUMS, checkpointing.COMMIT_SUCCESS}
    for rel, want in record.items():
        if rel == checkpointing.STEP_METADATA:  # rewritten by Orbax's commit: by name only
            assert want == {"bytes": None, "sha256": None}
            continue
        data = on_disk[rel].read_bytes()
        assert want == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpointing.check_step(step) == (True, None)


DAMAGE = {
    "truncated_array_file": (lambda step: _truncate(_array_file(step)),
                             r"state/\S+ is [0-9,]+ bytes, [0-9,]+ when saved"),
    "flipped_bytes": (lambda step: _flip(_array_file(step)),
                      r"state/\S+ has other bytes than when saved \(sha256 differs\)"),
    "missing_metadata": (lambda step: (step / "state" / "_METADATA").unlink(),
                         r"state/_METADATA is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_is_named_set_aside_and_the_previous_restores(
        saved, damage, caplog):
    step3 = saved / "checkpoints" / "3"
    damage_fn, reason = DAMAGE[damage]
    damage_fn(step3)
    if damage == "flipped_bytes":  # control: Orbax alone restores the changed bytes as values
        control = checkpointing.Checkpointer(saved, keep=3)
        wrong = control._restore(3, _state(0), None)
        control.close()
        assert not np.array_equal(np.asarray(wrong["params"]["w"]), _state(3)["params"]["w"])

    with caplog.at_level(logging.WARNING, logger="sslocal.checkpointing"):
        restored = _restore(saved)
    _assert_same(restored, _state(2))
    aside = saved / checkpointing.DAMAGED_DIR / "3"
    assert re.fullmatch(
        rf"the checkpoint of step 3 in {re.escape(str(saved / 'checkpoints'))} is damaged "
        rf"\({reason}\): not resumed from; moved to {re.escape(str(aside))}", caplog.messages[0])
    assert caplog.messages[1] == (f"resuming from the checkpoint of step 2, the newest that "
                                  f"restores (damaged, moved to {aside.parent}: step 3)")
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == ["1", "2"]
    assert aside.is_dir()
    (record,) = [json.loads(line) for line in
                 (aside.parent / checkpointing.DAMAGED_RECORD).read_text().splitlines()]
    assert record["step"] == 3 and re.fullmatch(reason, record["problem"])
    assert record["moved_to"] == str(aside)

    # Never taken again: the run saves step 3 anew, and the next restart resumes from it quietly.
    checkpointer = checkpointing.Checkpointer(saved, keep=3)
    checkpointer.save(3, _state(3), force=True)
    checkpointer.wait()
    checkpointer.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sslocal.checkpointing"):
        _assert_same(_restore(saved), _state(3))
    assert caplog.messages == []
    # An explicit step is that step or nothing.
    _flip(_array_file(saved / "checkpoints" / "2"))
    checkpointer = checkpointing.Checkpointer(saved, keep=3)
    with pytest.raises(checkpointing.DamagedCheckpointError, match="checkpoint of step 2 in"):
        checkpointer.restore(_state(0), step=2)
    checkpointer.close()


def test_an_unsealed_step_counts_as_damaged_only_on_a_data_error(saved, caplog):
    """Steps saved before sealing (no CHECKSUMS): a restore error that says data is missing is
    damage; any other error (here, a state of another shape) is raised, and nothing is moved."""
    for step in (1, 2, 3):
        (saved / "checkpoints" / str(step) / checkpointing.CHECKSUMS).unlink()
    other_shape = {**_state(0), "params": {"w": jnp.zeros((8, 8)), "b": jnp.zeros(256)}}
    with pytest.raises(ValueError, match="not compatible with the stored shape"):
        _restore(saved, other_shape)
    assert not (saved / checkpointing.DAMAGED_DIR).exists()

    _truncate(_array_file(saved / "checkpoints" / "3"))
    with caplog.at_level(logging.WARNING, logger="sslocal.checkpointing"):
        _assert_same(_restore(saved), _state(2))
    assert re.search(r"step 3 .* is damaged \(it does not restore: OUT_OF_RANGE: Error reading",
                     caplog.messages[0]), caplog.messages
    assert "tensorstore_spec" not in caplog.messages[0]


def test_no_checkpoint_that_restores_refuses_a_fresh_start(saved):
    for step in (1, 2, 3):
        _truncate(_array_file(saved / "checkpoints" / str(step)))
    with pytest.raises(checkpointing.DamagedCheckpointError) as refused:
        _restore(saved)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{saved} holds a run, but none of its checkpoints restores (step "
                              f"3: state/")
    assert "; step 2: state/" in message and "; step 1: state/" in message
    assert message.endswith(f"the damaged ones are in {saved / 'damaged_checkpoints'} (1, 2, 3). "
                            f"Not starting from scratch over the run: give a new --workdir, or "
                            f"delete {saved} to train again from step 0")
    # A later restart finds checkpoints/ empty: still refused, here and in train's resume check.
    with pytest.raises(checkpointing.DamagedCheckpointError, match="none left in checkpoints/"):
        _restore(saved)
    config = tiny.get_config()
    (saved / checkpointing.CONFIG_JSON).write_text(config.to_json_best_effort())
    with pytest.raises(checkpointing.DamagedCheckpointError, match="Not starting from scratch"):
        train.resume_changes(saved, config)
    assert train.resume_changes(saved.parent / "fresh", config) is None  # a new workdir starts


def test_a_damaged_best_checkpoint_or_model_is_named_not_replaced(tmp_path):
    work = tmp_path / "work"
    checkpointer = checkpointing.Checkpointer(work)
    checkpointer.save(4, _state(4), force=True)
    checkpointer.save_best(4, {"params": _state(4)["params"], "batch_stats": {}}, {"cIoU": 0.5})
    checkpointer.wait()
    checkpointer.close()
    _flip(_array_file(work / "best" / "4"))
    with pytest.raises(checkpointing.DamagedCheckpointError,
                       match=r"the best checkpoint of step 4 in .*/best/4 is damaged: state/"):
        checkpointing.restore_model_arrays(work)

    model = tmp_path / "model"
    checkpointing.save_model(model, {"width": 8}, _state(5)["params"], {})
    arrays, _ = checkpointing.restore_model_arrays(model)
    _assert_same(arrays["params"], _state(5)["params"])
    (model / "model" / "_METADATA").unlink()
    with pytest.raises(checkpointing.DamagedCheckpointError,
                       match=r"the model in .*/model is damaged: _METADATA is missing"):
        checkpointing.restore_model_arrays(model)


# -- 2. a full disk during a save -----------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs: room for one checkpoint of a 117 KiB state, not two (needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the simulated full "
                    "disk of test_reliability's kill-and-resume test still runs")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_during_a_save_names_the_folder_and_space_and_keeps_the_previous(small_disk):
    work = small_disk / "work"
    state = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(30000).astype(np.float32))}
    checkpointer = checkpointing.Checkpointer(work, keep=3)
    checkpointer.save(1, state, force=True)
    checkpointer.wait()
    checkpointer.save(2, {"w": state["w"] + 1}, force=True)  # fails in Orbax's save thread
    with pytest.raises(checkpointing.CheckpointSpaceError) as full:
        checkpointer.wait()
    checkpointer.wait()  # reported once
    checkpointer.close()
    assert full.value.errno == errno.ENOSPC
    assert re.search(r"No space left on device|os_error_code='28'",
                     str(full.value.__cause__))  # TensorStore's own words, as the cause
    need = f"{30000 * 4 / 1024:,.0f} KiB"  # the state's bytes
    assert re.fullmatch(
        rf"no space left on the device to save the checkpoint of step 2 in "
        rf"{re.escape(str(work / 'checkpoints'))}: it needs about {need} \(the train state's "
        rf"size\), [0-9,]+ KiB free. Training stopped; the checkpoint of step 1 is intact and "
        rf"the same command resumes from it once there is room", str(full.value)), full.value
    assert checkpointing.latest_saved_step(work) == 1
    assert (work / "checkpoints" / "2.orbax-checkpoint-tmp").is_dir()  # half-written, not a step
    restarted = checkpointing.Checkpointer(work, keep=3)
    _assert_same(restarted.restore(state), state)
    restarted.close()
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["1"]  # cleaned up


# -- 3. damaged prepared datasets -----------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("faults_tfds")
    data_prepare.prepare(DATASET, data_dir=data_dir, num_workers=1)
    return data_dir


@pytest.fixture
def data_copy(prepared, tmp_path) -> Path:
    shutil.copytree(prepared, tmp_path / "tfds")
    return tmp_path / "tfds"


def _shard(data_dir: Path, split: str) -> Path:
    (path,) = (data_dir / DATASET / "1.0.0").glob(f"synthetic_av-{split}.array_record-*")
    return path


def _records(data_dir: Path, split: str) -> list:
    source = data_prepare.load_split(DATASET, split, data_dir)
    return [source[i] for i in range(len(source))]


def _recorded_bytes(data_dir: Path, split: str) -> int:
    manifest = json.loads((data_dir / DATASET / "1.0.0" / "manifest.json").read_text())
    return manifest["splits"][split]["shards"][0]["bytes"]


def _again(data_dir: Path) -> str:
    return f"sslocal prepare --dataset {DATASET} --data_dir {data_dir} --overwrite"


def test_prepare_records_every_shards_count_size_and_sha256(prepared):
    manifest = json.loads((prepared / DATASET / "1.0.0" / "manifest.json").read_text())
    for split, n in (("train", 64), ("test", 16)):
        data = _shard(prepared, split).read_bytes()
        assert manifest["splits"][split]["shards"] == [{
            "file": _shard(prepared, split).name, "records": n, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}]
    assert data_prepare.verify(DATASET, prepared) == {
        "train": {"records": 64, "shards": 1, "sha256_checked": True},
        "test": {"records": 16, "shards": 1, "sha256_checked": True}}


@pytest.mark.parametrize("damage", ["flipped_bytes", "truncated_shard"])
def test_a_damaged_shard_fails_reading_in_one_line_never_with_garbage(prepared, data_copy,
                                                                      damage):
    clean = _records(prepared, "train")
    shard = _shard(data_copy, "train")
    _flip(shard, at=3_000_000) if damage == "flipped_bytes" else _truncate(shard)
    source = data_prepare.load_split(DATASET, "train", data_copy)
    failed = []
    for i in range(len(source)):  # every record reads as written, or fails: never garbage
        try:
            record = source[i]
        except data_prepare.DamagedDatasetError as error:
            failed.append((i, str(error)))
            continue
        for key, value in clean[i].items():
            assert np.asarray(record[key]).tobytes() == np.asarray(value).tobytes(), (i, key)
    assert failed and (damage == "flipped_bytes") == (len(failed) < len(source))
    index, message = failed[0]
    assert "\n" not in message
    assert message.startswith(f"{shard}: record {index} of {DATASET} train does not read "
                              f"(Corrupted Riegeli/records file" if damage == "flipped_bytes"
                              else f"{shard}: record 0 of {DATASET} train does not read (")
    assert message.endswith(f"): the prepared dataset is damaged, prepare it again: "
                            f"{_again(data_copy)} (or list every damaged file: sslocal prepare "
                            f"--dataset {DATASET} --data_dir {data_copy} --verify)")
    # Through the training loader (Grain's threads) the same error reaches the caller.
    loader = pipeline.train_loader(source, global_batch_size=8, image_size=64, seed=0,
                                   process_index=0, process_count=1)
    with pytest.raises(data_prepare.DamagedDatasetError, match=re.escape(str(shard))):
        for _ in range(8):
            next(loader)


def test_a_damaged_test_shard_fails_evaluation_in_one_line(data_copy):
    _flip(_shard(data_copy, "test"), at=1_000_000)
    source = data_prepare.load_split(DATASET, "test", data_copy)
    loader = pipeline.eval_loader(source, global_batch_size=8, image_size=64, process_index=0,
                                  process_count=1)
    with pytest.raises(data_prepare.DamagedDatasetError,
                       match=re.escape(f"{_shard(data_copy, 'test')}: record ")):
        list(loader)


def test_prepare_verify_names_every_damaged_shard(data_copy, tmp_path):
    train_shard, test_shard = _shard(data_copy, "train"), _shard(data_copy, "test")
    size = train_shard.stat().st_size
    _flip(train_shard, at=size - 100)  # the file's padding: no record reads differently
    assert len(_records(data_copy, "train")) == 64
    _truncate(test_shard)
    done = subprocess.run(
        [sys.executable, "-m", "sslocal", "prepare", f"--dataset={DATASET}",
         f"--data_dir={data_copy}", "--verify"], capture_output=True, text=True, cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "SSLOCAL_DEBUG"}, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("sslocal prepare")]
    assert errors == [
        f"sslocal prepare: error: {DATASET} in {data_copy / DATASET / '1.0.0'} is damaged: "
        f"{train_shard.name} has other bytes than when written (sha256 differs); "
        f"{test_shard.name} is {test_shard.stat().st_size:,} bytes, "
        f"{_recorded_bytes(data_copy, 'test'):,} when written. Prepare it again: "
        f"{_again(data_copy)}"]

    test_shard.unlink()
    with pytest.raises(data_prepare.DamagedDatasetError, match=f"{test_shard.name} is missing"):
        data_prepare.verify(DATASET, data_copy)


def test_verify_without_recorded_sha256s_reads_every_record(tmp_path, capsys):
    """A dataset prepared before shard sha256s were recorded: verify reads every record, which
    ArrayRecord's chunk hashes check."""
    data_dir = tmp_path / "tfds"
    builders.get_builder(DATASET, data_dir=os.fspath(data_dir), num_workers=1,
                         num_train=16, num_test=8).download_and_prepare()
    assert data_prepare.verify(DATASET, data_dir)["train"] == {
        "records": 16, "shards": 1, "sha256_checked": False}
    assert "no sha256s recorded (prepared before they were): every record read" in \
        capsys.readouterr().out
    _flip(_shard(data_dir, "train"), at=200_000)
    with pytest.raises(data_prepare.DamagedDatasetError,
                       match=r"synthetic_av-train\S+ does not read \(Corrupted Riegeli"):
        data_prepare.verify(DATASET, data_dir)


# -- 4. two runs on one workdir -------------------------------------------------------------------

def test_a_second_holder_of_a_workdir_is_refused_at_once(tmp_path):
    work = tmp_path / "work"
    with checkpointing.hold_workdir(work):
        holder = (work / checkpointing.LOCK_FILE).read_text()
        assert re.fullmatch(rf"pid {os.getpid()} on \S+ since \S+\n", holder)
        with pytest.raises(checkpointing.WorkdirBusyError) as busy:
            with checkpointing.hold_workdir(work):
                pass
        assert str(busy.value) == (
            f"{work} is in use by another training run ({holder.strip()}; it holds "
            f"{work / checkpointing.LOCK_FILE}): wait for it to end, or give another --workdir")
        # The training entry point takes it before anything else (no data, no model).
        config = tiny.get_config()
        config.train_dataset = "vggsound/10k"  # not prepared: would fail later, if reached
        with pytest.raises(checkpointing.WorkdirBusyError):
            train.train_and_evaluate(config, work)
        assert sorted(p.name for p in work.iterdir()) == [checkpointing.LOCK_FILE]
    with checkpointing.hold_workdir(work):  # released with its holder
        pass
    # A workdir the lock created is removed when the run fails before writing anything there.
    new = tmp_path / "new"
    with pytest.raises(RuntimeError), checkpointing.hold_workdir(new):
        raise RuntimeError("bad config")
    assert not new.exists()
    # gs:// has no flock: nothing is held, nothing is created (nor gcsfs imported: test_gcs's
    # emulator must be set up before that happens in a process).
    if importlib.util.find_spec("gcsfs") is not None:
        with checkpointing.hold_workdir("gs://no-such-bucket/run"):
            pass
        assert "gcsfs" not in sys.modules


# -- 5. inputs the fuzzer found mishandled ---------------------------------------------------------

# benchmarks/fuzz_inputs.py's audio crash: a 127-byte WAV header claiming 8 channels of float
# samples that libsndfile refuses; FFmpeg decodes it, and PyAV 18's planar frames of 8 or more
# channels listed planes past the last one, which to_ndarray read: a segfault.
FUZZ_AUDIO_CRASH = base64.b64decode(
    "UklGRjL6AABXQVZFZm10IBIAAAADAAgAgEQAAADcBQAIACAAAABmYWOvBAAAAEAfAABkYXRhAPoAAAAAPlJJRkYy+"
    "gAAV0FWRWZtdCASAAAAAwAIAIBEAAAA3AUACAAgAAAAZmFjrwQAAABAHwAAZGF0YQD4PnSM//8AAAAAAA==")


def test_audio_of_eight_or_more_channels_decodes_through_ffmpeg(tmp_path):
    crash = tmp_path / "crash.wav"
    crash.write_bytes(FUZZ_AUDIO_CRASH)
    with pytest.raises(ValueError, match="non-finite samples"):  # its samples are NaN: refused
        spectrogram.load_clip_audio(crash)
    for channels in (1, 2, 8, 12):  # valid files: every sample, in its channel
        wave = np.random.default_rng(channels).uniform(-1, 1, (3000, channels)).astype(np.float32)
        path = tmp_path / f"{channels}.wav"
        scipy.io.wavfile.write(path, 16000, wave)
        decoded, rate = video.read_audio(path)
        assert rate == 16000
        np.testing.assert_array_equal(decoded, wave.T)


def test_vggss_json_of_the_wrong_shape_is_one_value_error(tmp_path):
    path = tmp_path / "vggss.json"
    for text, message in [('[{"file": ["a"], "bbox": []}]', "expected a list of"),
                          ('[{"file": "a", "bbox": [], "class": [1]}]', "expected a list of"),
                          ('[{"file": "a", "bbox": [[1, 2], [3]]}]', "bad boxes for a"),
                          ('[{"file": "a", "bbox": {"x": 1}}]', "bad boxes for a"),
                          ("[" * 100000 + "]" * 100000, "nested too deeply")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            annotations.load_vggss(path)


def test_flickr_coordinates_of_any_size_follow_protocol_6(tmp_path):
    """int(224 * v / 256), written here with exact fractions: for every coordinate that fits a
    float, and for one of 400 digits, which overflowed the float division before."""
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(-10**6, 10**6, 398)] + [-1, 0, 1, 255, 256, 10**400]
    path = tmp_path / "a.xml"
    for box in zip(*[iter(values)] * 4, strict=True):
        path.write_text("<annotation><object><bbox><name>x</name>" + "".join(
            f"<v>{v}</v>" for v in box) + "</bbox></object></annotation>")
        expected = tuple(math.trunc(fractions.Fraction(224 * v, 256)) for v in box)
        assert annotations.load_flickr_xml(path) == [expected]
        if max(map(abs, box)) < 2**50:
            assert expected == tuple(int(224 * v / 256) for v in box)


def test_list_reader_errors_are_one_value_error(tmp_path):
    lists = tmp_path / "lists.txt"
    lists.write_text("a\n b ,x\n\n,c\n\"d\"\n")
    assert annotations.read_list(lists) == ["a", "b", "d"]
    lists.write_bytes(b"a\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        annotations.read_list(lists)
    with pytest.raises(FileNotFoundError):
        annotations.read_list(tmp_path / "none.txt")
