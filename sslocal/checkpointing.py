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
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from sslocal.writers import absolute, as_path, is_url

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
MODEL_JSON = "model.json"
CONFIG_JSON = "config.json"
# Orbax's mark of a finished step where it cannot rename (gs://): its CommitFileTemporaryPath.
COMMIT_SUCCESS = "commit_success.txt"


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


class Checkpointer:
    """The latest (with data-iterator state) and best checkpoints of one training workdir."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, best_metric: str = "cIoU",
                 asynchronous: bool = True):
        repair_tensorstore_json_leak()
        workdir = absolute(workdir)
        self._latest = ocp.CheckpointManager(
            workdir / LATEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
        )
        self._best = ocp.CheckpointManager(
            workdir / BEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, enable_async_checkpointing=asynchronous,
                best_fn=lambda metrics: metrics[best_metric], best_mode="max"),
            item_handlers={"state": ocp.StandardCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False):
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._latest.save(step, args=ocp.args.Composite(**items), force=force)

    def save_best(self, step: int, state: Any, metrics: dict[str, float]) -> None:
        """Keeps `state` if `metrics` beat the best so far (the manager compares and prunes)."""
        self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                        metrics={k: float(v) for k, v in metrics.items()}, force=True)

    def restore(self, state_like: Any, data_iterator: Any = None, step: int | None = None):
        """The latest (or `step`'s) train state, shaped and sharded like `state_like`; the data
        iterator, if given, is restored in place. None when there is nothing to resume."""
        step = self._latest.latest_step() if step is None else step
        if step is None:
            return None
        items = {"state": ocp.args.StandardRestore(_abstract(state_like))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._latest.restore(step, args=ocp.args.Composite(**items)).state

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def _abstract(tree: Any) -> Any:
    """Shape, dtype and sharding of every leaf: what Orbax restores into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_model(directory: str | os.PathLike, model_config: dict, params: Any, batch_stats: Any
               ) -> epath.Path:
    """Writes a self-describing model directory (used by `sslocal convert` and exports):
    `model_config` (with image_size, when the caller includes it) goes to model.json."""
    repair_tensorstore_json_leak()
    directory = absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "model", {"params": params, "batch_stats": batch_stats},
                          force=True)
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
    "latest"; the optimizer state is not read.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', not {which!r}")
    repair_tensorstore_json_leak()
    path = absolute(path)
    if (path / MODEL_JSON).exists():
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
            restored = manager.restore(step, args=ocp.args.Composite(
                state=_model_arrays_restore(manager.item_metadata(step)["state"])))
        return _to_numpy(restored.state), f"{path / kind}/{step}"
    raise FileNotFoundError(f"no checkpoint in {path}: expected {BEST_DIR}/ or {LATEST_DIR}/")


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
