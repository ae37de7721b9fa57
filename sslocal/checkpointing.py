"""Orbax checkpoints: the only module that imports orbax.

A training workdir holds
    config.json                 the run's config (the model's shape is read back from it)
    checkpoints/<step>/         "latest": train state + the Grain iterator state, so a resumed
                                run continues from the same data position
    best/<step>/                the train state of the evaluation with the best cIoU
A converted or exported model directory holds model.json (the model config, and image_size
when known) and one "model" item: {"params": ..., "batch_stats": ...}.

Orbax writes every step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest. In a gs:// bucket (where renaming
a folder is a copy) it writes the step's folder in place and marks it complete with
commit_success.txt last; only such steps count. Paths are epath (writers.as_path): a workdir or
model directory may be a local folder or a gs:// URL, and the arrays go through TensorStore's
GCS driver.

Faults (docs/faults.md): every step is sealed with the size and sha256 of each of its files
(CHECKSUMS, written inside the step's folder before Orbax renames or commits it, so a step is
never complete without it). A restart checks the newest step against it and falls back to the
newest step that passes and restores, moving each damaged one aside to damaged_checkpoints/ and
saying which and why. A save that runs out of disk space stops training with one line naming
the folder and the space needed. A training run holds workdir/train.lock (fcntl.flock) for its
whole life, so a second run on the same workdir is refused at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from sslocal.writers import absolute, append_text, as_path, is_url

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
MODEL_JSON = "model.json"
CONFIG_JSON = "config.json"
# Orbax's mark of a finished step where it cannot rename (gs://): its CommitFileTemporaryPath.
COMMIT_SUCCESS = "commit_success.txt"
# Where Orbax writes a step on a disk before renaming it to its number (its TMP_DIR_SUFFIX).
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# In every step folder: {"files": {relative path: {"bytes": n, "sha256": hex}}}.
CHECKSUMS = "sslocal_checksums.json"
# In the workdir: the steps a restart found damaged, moved out of checkpoints/, and a record.
DAMAGED_DIR = "damaged_checkpoints"
DAMAGED_RECORD = "damaged.jsonl"
LOCK_FILE = "train.lock"
# Orbax's step metadata, rewritten when the step is committed (after the seal): checked for being
# there and parsing, not for its bytes.
STEP_METADATA = "_CHECKPOINT_METADATA"

logger = logging.getLogger(__name__)


class DamagedCheckpointError(ValueError):
    """A checkpoint that fails its checks where no other may stand in (an explicit step, the
    best one, a model directory), or a workdir holding a run none of whose checkpoints
    restores."""


class CheckpointSpaceError(OSError):
    """A checkpoint could not be written: no space left on the device."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


class WorkdirBusyError(OSError):
    """Another live process trains in this workdir."""

    def __init__(self, message: str):
        super().__init__(errno.EWOULDBLOCK, message)

    def __str__(self) -> str:
        return self.strerror


def _give_back_leaked_references(value: Any) -> Any:
    """Drops the one extra reference TensorStore's JSON-to-Python conversion leaves on every key
    and every value of every dict it builds (it hands PyDict_SetItem, which does not steal,
    references it has released), recursing into nested dicts and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            _give_back_leaked_references(item)
            ctypes.pythonapi.Py_DecRef(ctypes.py_object(key))
            ctypes.pythonapi.Py_DecRef(ctypes.py_object(item))
    elif isinstance(value, list):
        for item in value:
            _give_back_leaked_references(item)
    return value


def _tensorstore_json_leaks() -> bool:
    """True where TensorStore's dicts hold one reference too many: the installed version has
    the bug (0.1.69 to 0.1.86 checked) and the repair above is needed and exact."""
    leaked = ts.KvStore.Spec({"driver": "file", "path": "/probe/"}).to_json()
    control = json.loads('{"driver": "file", "path": "/probe/"}')
    return sys.getrefcount(leaked["path"]) == sys.getrefcount(control["path"]) + 1


_repair_lock = threading.Lock()
_array_handler_set = False


def use_whole_array_saves_on_cpu() -> None:
    """On CPU, one process writes each replicated array whole, as Orbax already does on GPUs.

    Orbax's default "replica-parallel" save splits every replicated array into one slice per
    device, with an eager slice per (shape, device): on a CPU those are compiled one by one
    (about 180 compilations for the demo's model on 8 host devices, most of a short run's save
    time) and gain nothing, since every "device" shares the host's memory and disk. The files
    are the same either way. Called once the backend is up (not at import, which would start
    it before jax.distributed.initialize)."""
    global _array_handler_set
    if _array_handler_set:
        return
    _array_handler_set = True
    if jax.default_backend() == "cpu":
        # The same handler as Orbax's default but for that switch (its array metadata store
        # included: without it the per-array metadata files are not written).
        default = ocp.type_handlers.get_type_handler(jax.Array)
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(
                use_replica_parallel=False,
                array_metadata_store=getattr(default, "_array_metadata_store", None)),
            override=True)


_repaired = False


def repair_tensorstore_json_leak() -> None:
    """Orbax turns TensorStore specs (two per array per save) and byte counters (around every
    array it writes) into Python dicts; each leaked its strings and lists, about 0.1 MiB of
    memory per save of the tiny train state (454 arrays), forever. Wraps the JSON-returning
    calls Orbax makes so that what they return is freed normally; nothing changes where
    TensorStore is fixed. Called before each use of Orbax here; only the first call does
    anything (a second wrap would free everything twice).
    """
    global _repaired
    with _repair_lock:
        if _repaired:
            return
        _repaired = True
        if not _tensorstore_json_leaks():
            return

        def repaired(leaky):
            @functools.wraps(leaky)
            def call(*args, **kwargs):
                return _give_back_leaked_references(leaky(*args, **kwargs))
            return call

        ts.Spec.to_json = repaired(ts.Spec.to_json)
        ts.KvStore.Spec.to_json = repaired(ts.KvStore.Spec.to_json)
        ts.experimental_collect_matching_metrics = repaired(
            ts.experimental_collect_matching_metrics)


def latest_saved_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete step under workdir/checkpoints/ (None when there is none), read
    from the folder names without opening anything: on a disk Orbax renames a step's folder to
    its number only once the step is complete; in a bucket the folder has its name from the
    start and the step is complete once it holds commit_success.txt."""
    folder = as_path(workdir) / LATEST_DIR
    if not folder.is_dir():
        return None
    steps = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()),
                   reverse=True)
    if not is_url(folder):
        return steps[0] if steps else None
    return next((s for s in steps if (folder / str(s) / COMMIT_SUCCESS).exists()), None)


# -- checksums of a step's files --------------------------------------------------------------

def _files(folder: epath.Path, prefix: str = "") -> Iterator[tuple[str, epath.Path]]:
    """(path relative to folder, path) of every file under folder, in name order."""
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
        if child.is_dir():
            yield from _files(child, f"{prefix}{child.name}/")
        else:
            yield prefix + child.name, child


def _size_and_sha256(path: epath.Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def seal_step(folder: str | os.PathLike) -> None:
    """Writes CHECKSUMS into a step folder: the size and sha256 of every file now in it (Orbax's
    commit_success.txt, which may come later, aside; STEP_METADATA by name only)."""
    folder = as_path(folder)
    files = {}
    for rel, path in _files(folder):
        if rel == STEP_METADATA:
            files[rel] = {"bytes": None, "sha256": None}
        elif rel not in (CHECKSUMS, COMMIT_SUCCESS):
            size, digest = _size_and_sha256(path)
            files[rel] = {"bytes": size, "sha256": digest}
    (folder / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1) + "\n")


def check_step(folder: str | os.PathLike) -> tuple[bool, str | None]:
    """(sealed, problem) of a step folder: sealed when it holds CHECKSUMS; problem None when
    every file listed there is present with its recorded size and sha256, else what differs
    (a missing file, a truncated one, changed bytes). An unsealed step (saved before sslocal
    sealed steps) has no problem that can be seen without restoring it."""
    folder = as_path(folder)
    record = folder / CHECKSUMS
    if not record.is_file():
        return False, None
    try:
        files = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return True, f"its {CHECKSUMS} does not parse"
    problems = []
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        if want["sha256"] is None:  # STEP_METADATA
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                problems.append(f"{rel} does not parse")
            continue
        size, digest = _size_and_sha256(path)
        if size != want["bytes"]:
            problems.append(f"{rel} is {size:,} bytes, {want['bytes']:,} when saved")
        elif digest != want["sha256"]:
            problems.append(f"{rel} has other bytes than when saved (sha256 differs)")
    if not problems:
        return True, None
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return True, "; ".join(problems[:3]) + more


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and its causes and contexts, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


# TensorStore's status codes (and messages) for data that is missing or not what was written;
# a step that was never sealed is taken as damaged only when its restore fails with one of these
# (not on UNAVAILABLE, PERMISSION_DENIED, a shape mismatch, ...).
_DATA_ERRORS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "does not exist")


def _data_error(error: BaseException) -> BaseException | None:
    """The error in the chain that says data is missing or damaged, if one does."""
    return next((e for e in _chain(error) if isinstance(e, FileNotFoundError | json.JSONDecodeError)
                 or any(code in str(e) for code in _DATA_ERRORS)), None)


def _is_no_space(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, as Python raises it or as TensorStore words it."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if ("No space left on device" in text or "Disk quota exceeded" in text
                or "os_error_code='28'" in text):
            return True
    return False


class _NoSpaceRecords(logging.Filter):
    """Orbax logs every failed background write with its traceback before the error reaches
    the caller; for a full disk the caller reports it in one line (CheckpointSpaceError, with
    Orbax's error as its cause), so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ((error is not None and _is_no_space(error))
                    or "No space left on device" in record.getMessage())


_NO_SPACE_RECORDS = _NoSpaceRecords()


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The error's message on one line, without TensorStore's spec dump, at most `limit`."""
    text = " ".join(str(error).split(" [tensorstore_spec=")[0].split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.0f} KiB"


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape"))


def _move_folder(source: epath.Path, target: epath.Path) -> None:
    """A rename on a disk; in a bucket (no folder renames) a copy of every file, then removal."""
    if not is_url(source):
        os.rename(source, target)
        return
    for rel, path in _files(source):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        path.copy(target / rel)
    source.rmtree()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def refuse_fresh_start(workdir: str | os.PathLike,
                       skipped: list[tuple[int, str]] | tuple = ()) -> None:
    """Raises DamagedCheckpointError when `workdir` holds a run whose checkpoints were all found
    damaged (now, `skipped`: [(step, why)], or by an earlier restart, in DAMAGED_DIR): starting
    from scratch there would silently replace the run."""
    workdir = as_path(workdir)
    aside = workdir / DAMAGED_DIR
    held = sorted((p.name for p in aside.iterdir() if p.is_dir()), key=_step_order
                  ) if aside.is_dir() else []
    if not held and not skipped:
        return
    detail = "; ".join(f"step {s}: {why}" for s, why in skipped) or "none left in checkpoints/"
    raise DamagedCheckpointError(
        f"{workdir} holds a run, but none of its checkpoints restores ({detail}); the damaged "
        f"ones are in {aside} ({', '.join(held)}). Not starting from scratch over the run: give "
        f"a new --workdir, or delete {workdir} to train again from step 0")


def _step_order(name: str) -> tuple[int, str]:
    head = name.split("-")[0]
    return (int(head) if head.isdigit() else -1, name)


class Checkpointer:
    """The latest (with data-iterator state) and best checkpoints of one training workdir.

    Saves are asynchronous (unless `asynchronous=False`, which waits for each); each step is
    sealed with CHECKSUMS in Orbax's save thread before it is renamed into place. A save that
    finds the disk full raises CheckpointSpaceError (at the next save or `wait`, when the write
    failed in the background); the half-written step is never taken as a checkpoint, and the
    next Checkpointer on the workdir removes it.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, best_metric: str = "cIoU",
                 asynchronous: bool = True):
        repair_tensorstore_json_leak()
        use_whole_array_saves_on_cpu()
        logging.getLogger("absl").addFilter(_NO_SPACE_RECORDS)  # once: filters are a set
        self.workdir = workdir = absolute(workdir)
        self._asynchronous = asynchronous
        self._saving: dict[str, tuple[int, int] | None] = {LATEST_DIR: None, BEST_DIR: None}

        def options(kind: str, **more: Any) -> ocp.CheckpointManagerOptions:
            # Always Orbax's async checkpointer: its post-finalization callback seals the step.
            return ocp.CheckpointManagerOptions(
                create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True,
                async_options=ocp.AsyncOptions(
                    post_finalization_callback=functools.partial(self._seal, kind)), **more)

        self._latest = ocp.CheckpointManager(
            workdir / LATEST_DIR, options=options(LATEST_DIR, max_to_keep=keep),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
        )
        self._best = ocp.CheckpointManager(
            workdir / BEST_DIR,
            options=options(BEST_DIR, max_to_keep=1,
                            best_fn=lambda metrics: metrics[best_metric], best_mode="max"),
            item_handlers={"state": ocp.StandardCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False):
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._save(LATEST_DIR, step, state, args=ocp.args.Composite(**items),
                          force=force)

    def save_best(self, step: int, state: Any, metrics: dict[str, float]) -> None:
        """Keeps `state` if `metrics` beat the best so far (the manager compares and prunes)."""
        self._save(BEST_DIR, step, state,
                   args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                   metrics={k: float(v) for k, v in metrics.items()}, force=True)

    def _manager(self, kind: str) -> ocp.CheckpointManager:
        return self._latest if kind == LATEST_DIR else self._best

    def _save(self, kind: str, step: int, state: Any, **kwargs: Any):
        manager = self._manager(kind)
        self._finish(kind)  # the previous save's failure is reported as its own
        self._saving[kind] = (step, _nbytes(state))
        with self._space_errors(kind):
            saved = manager.save(step, **kwargs)
            if not self._asynchronous:
                manager.wait_until_finished()
        return saved

    def _finish(self, kind: str) -> None:
        with self._space_errors(kind):
            self._manager(kind).wait_until_finished()

    def _seal(self, kind: str) -> None:
        """Orbax's post-finalization callback (its save thread, primary host): the step is
        complete in its temporary folder (on a disk) or in place (in a bucket), not yet
        renamed or committed."""
        step = self._saving[kind][0]
        folder = self.workdir / kind
        temporary = folder / f"{step}{ORBAX_TMP_SUFFIX}"
        seal_step(temporary if temporary.is_dir() else folder / str(step))

    @contextlib.contextmanager
    def _space_errors(self, kind: str) -> Iterator[None]:
        """A full disk during a save -> CheckpointSpaceError: the folder, the step, the space
        needed and free, and which checkpoint is intact."""
        try:
            yield
        except Exception as error:
            if self._saving[kind] is None or not _is_no_space(error):
                raise
            step, needed = self._saving[kind]
            self._saving[kind] = None  # reported once
            folder = self.workdir / kind
            free = "" if is_url(folder) else f", {_size(shutil.disk_usage(folder).free)} free"
            manager = self._manager(kind)
            manager.reload()
            intact = [s for s in manager.all_steps() if s != step]
            kept = (f"the checkpoint of step {max(intact)} is intact and the same command "
                    f"resumes from it" if intact else "no earlier checkpoint was saved")
            raise CheckpointSpaceError(
                f"no space left on the device to save the checkpoint of step {step} in {folder}: "
                f"it needs about {_size(needed)} (the train state's size){free}. Training "
                f"stopped; {kept} once there is room") from error

    def restore(self, state_like: Any, data_iterator: Any = None, step: int | None = None):
        """The train state of `step` (DamagedCheckpointError when it fails its checks), or of
        the newest checkpoint that passes its checks and restores, shaped and sharded like
        `state_like`; the data iterator, if given, is restored in place. None when there is
        nothing to resume.

        Each newer step found damaged (check_step; for an unsealed step, a restore that fails
        with a data error) is logged with the reason, moved to workdir/DAMAGED_DIR and recorded
        in DAMAGED_RECORD there, so it is never taken again. When none restores (now or by an
        earlier restart), DamagedCheckpointError, instead of a fresh start over the run.
        """
        if step is not None:  # this step or none
            _refuse_damaged(self.workdir / LATEST_DIR / str(step), f"the checkpoint of step {step}")
            return self._restore(step, state_like, data_iterator)
        skipped: list[tuple[int, str]] = []
        for candidate in sorted(self._latest.all_steps(), reverse=True):
            problem, restored = self._try_restore(candidate, state_like, data_iterator)
            if problem is None:
                if skipped:
                    logger.warning(
                        "resuming from the checkpoint of step %d, the newest that restores "
                        "(damaged, moved to %s: %s)", candidate, self.workdir / DAMAGED_DIR,
                        ", ".join(f"step {s}" for s, _ in skipped))
                return restored
            self._set_aside(candidate, problem)
            skipped.append((candidate, problem))
        refuse_fresh_start(self.workdir, skipped)
        return None

    def _restore(self, step: int, state_like: Any, data_iterator: Any):
        items = {"state": ocp.args.StandardRestore(_abstract(state_like))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._latest.restore(step, args=ocp.args.Composite(**items)).state

    def _try_restore(self, step: int, state_like: Any, data_iterator: Any
                     ) -> tuple[str | None, Any]:
        """(None, the state) or (why the step is damaged, None). Other restore errors (a
        sealed step whose files are intact, a network error) are raised."""
        sealed, problem = check_step(self.workdir / LATEST_DIR / str(step))
        if problem is not None:
            return problem, None
        try:
            return None, self._restore(step, state_like, data_iterator)
        except Exception as error:
            cause = None if sealed else _data_error(error)
            if cause is None:
                raise
            return f"it does not restore: {_first_line(cause)}", None

    def _set_aside(self, step: int, problem: str) -> None:
        source = self.workdir / LATEST_DIR / str(step)
        aside = self.workdir / DAMAGED_DIR
        name = str(step)
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            taken = {p.name for p in aside.iterdir()} if aside.is_dir() else set()  # gs://
            name = next(n for n in (str(step), *(f"{step}-{k}" for k in range(2, 10**6)))
                        if n not in taken)
            _move_folder(source, aside / name)
            record = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                      "step": step, "problem": problem, "moved_to": os.fspath(aside / name)}
            append_text(aside / DAMAGED_RECORD, json.dumps(record) + "\n")
        _sync(f"sslocal_set_aside_{step}")
        self._latest.reload()
        logger.warning("the checkpoint of step %d in %s is damaged (%s): not resumed from; "
                       "moved to %s", step, self.workdir / LATEST_DIR, problem, aside / name)

    def wait(self) -> None:
        self._finish(LATEST_DIR)
        self._finish(BEST_DIR)

    def close(self) -> None:
        self._latest.close()
        self._best.close()


@contextlib.contextmanager
def hold_workdir(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds workdir/LOCK_FILE (an exclusive fcntl.flock) while the block runs: a second
    holder fails at once with WorkdirBusyError naming the first (its pid, host and start). The
    kernel releases the lock when its process ends, killed or not, so it never sticks.

    Only process 0 of a run locks (the other hosts are part of its run). A gs:// workdir cannot
    be locked (no flock on GCS): nothing is held there (docs/faults.md). A local filesystem
    without flock support is warned about and not locked. A workdir this call created is
    removed again when the block fails before writing anything else into it.
    """
    path = absolute(workdir)
    if is_url(path) or jax.process_index() != 0:
        yield
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "unknown"
            raise WorkdirBusyError(
                f"{path} is in use by another training run ({holder}; it holds {lock}): "
                f"wait for it to end, or give another --workdir") from None
        except OSError as error:  # e.g. ENOLCK: a network filesystem without locks
            logger.warning("cannot lock %s (%s): a second run on this workdir is not "
                           "prevented", lock, error)
            locked = False
        if locked:
            since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n"
                      .encode(), 0)
        try:
            yield
        except BaseException:
            if created and {p.name for p in path.iterdir()} <= {LOCK_FILE}:
                lock.unlink()
                path.rmdir()
            raise
    finally:
        os.close(fd)  # releases the lock; the file stays (another process may be opening it)


def _abstract(tree: Any) -> Any:
    """Shape, dtype and sharding of every leaf: what Orbax restores into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_model(directory: str | os.PathLike, model_config: dict, params: Any, batch_stats: Any
               ) -> epath.Path:
    """Writes a self-describing model directory (used by `sslocal convert` and exports):
    `model_config` (with image_size, when the caller includes it) goes to model.json."""
    repair_tensorstore_json_leak()
    use_whole_array_saves_on_cpu()
    directory = absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "model", {"params": params, "batch_stats": batch_stats},
                          force=True)
    seal_step(directory / "model")
    (directory / MODEL_JSON).write_text(json.dumps(model_config, indent=2))
    return directory


def read_model_description(path: str | os.PathLike) -> dict:
    """The model config (width, embed_dim, ...) and, when recorded, image_size of a model
    directory (its model.json) or a training workdir (config.json's model and image_size)."""
    path = as_path(path)
    if (path / MODEL_JSON).exists():
        return json.loads((path / MODEL_JSON).read_text())
    if (path / CONFIG_JSON).exists():
        config = json.loads((path / CONFIG_JSON).read_text())
        description = dict(config["model"])
        if "image_size" in config:
            description["image_size"] = config["image_size"]
        return description
    raise FileNotFoundError(
        f"{path} is neither a training workdir (no {CONFIG_JSON}) nor a model directory "
        f"(no {MODEL_JSON}); pass the --workdir of a run or the output of `sslocal convert`")


def restore_model_arrays(path: str | os.PathLike, which: str = "best") -> tuple[dict, str]:
    """{"params": ..., "batch_stats": ...} (nested dicts of numpy arrays, as saved) of a model
    directory or a training workdir, and a description of what was restored.

    In a workdir `which` picks "best" (falling back to the latest when no evaluation ran) or
    "latest"; the optimizer state is not read. What is restored is checked against its
    CHECKSUMS first: a damaged one is DamagedCheckpointError, naming it (no other is taken in
    its place).
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', not {which!r}")
    repair_tensorstore_json_leak()
    path = absolute(path)
    if (path / MODEL_JSON).exists():
        _refuse_damaged(path / "model", "the model")
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                path / "model",
                args=_model_arrays_restore(checkpointer.metadata(path / "model").item_metadata))
        return _to_numpy(restored), str(path)
    for kind in ([BEST_DIR, LATEST_DIR] if which == "best" else [LATEST_DIR]):
        if not (path / kind).exists():
            continue
        with ocp.CheckpointManager(path / kind, item_handlers={
                "state": ocp.PyTreeCheckpointHandler()}) as manager:
            step = manager.best_step() if kind == BEST_DIR else manager.latest_step()
            if step is None:
                continue
            _refuse_damaged(path / kind / str(step), f"the {kind} checkpoint of step {step}")
            restored = manager.restore(step, args=ocp.args.Composite(
                state=_model_arrays_restore(manager.item_metadata(step)["state"])))
        return _to_numpy(restored.state), f"{path / kind}/{step}"
    raise FileNotFoundError(f"no checkpoint in {path}: expected {BEST_DIR}/ or {LATEST_DIR}/")


def _refuse_damaged(folder: epath.Path, what: str) -> None:
    _, problem = check_step(folder)
    if problem is not None:
        raise DamagedCheckpointError(f"{what} in {folder} is damaged: {problem}")


def _model_arrays_restore(metadata: Any) -> ocp.args.PyTreeRestore:
    """Restores params and batch_stats only, laid out on this process's first device: the run
    may have been saved from another topology (8 GPUs) than the one loading it (a laptop)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {name: jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata[name])
        for name in ("params", "batch_stats")}
    return ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def _to_numpy(tree: Any) -> Any:
    # To host memory: load_model places the arrays from there (convert.fill_state).
    return jax.tree.map(np.asarray, tree)
