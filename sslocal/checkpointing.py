"""Orbax checkpoints: the only module that imports orbax.

A training workdir holds
    config.json                 the run's config (the model's shape is read back from it)
    checkpoints/<step>/         "latest": train state + the Grain iterator state, so a resumed
                                run continues from the same data position
    best/<step>/                the train state of the evaluation with the best cIoU
A converted or exported model directory holds model.json and one "model" item.

Orbax writes every step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import ctypes
import functools
import json
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
MODEL_JSON = "model.json"
CONFIG_JSON = "config.json"


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


def _stop_tensorstore_json_leak() -> None:
    """Orbax turns TensorStore specs (two per array per save) and byte counters (around every
    array it writes) into Python dicts; each leaked its strings and lists, about 0.1 MiB of
    memory per save of the tiny train state (454 arrays), forever. Wraps the JSON-returning
    calls Orbax makes so that what they return is freed normally; nothing changes where
    TensorStore is fixed.
    """
    if not _tensorstore_json_leaks():
        return

    def repaired(leaky):
        @functools.wraps(leaky)
        def call(*args, **kwargs):
            return _give_back_leaked_references(leaky(*args, **kwargs))
        return call

    ts.Spec.to_json = repaired(ts.Spec.to_json)
    ts.KvStore.Spec.to_json = repaired(ts.KvStore.Spec.to_json)
    ts.experimental_collect_matching_metrics = repaired(ts.experimental_collect_matching_metrics)


_stop_tensorstore_json_leak()


class Checkpointer:
    """The latest (with data-iterator state) and best checkpoints of one training workdir."""

    def __init__(self, workdir: str | Path, *, keep: int = 2, best_metric: str = "cIoU",
                 asynchronous: bool = True):
        workdir = Path(workdir).absolute()
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


def save_model(directory: str | Path, model_config: dict, params: Any, batch_stats: Any) -> Path:
    """Writes a self-describing model directory (used by `sslocal convert` and exports)."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "model", {"params": params, "batch_stats": batch_stats},
                          force=True)
    (directory / MODEL_JSON).write_text(json.dumps(model_config, indent=2))
    return directory


def read_model_config(path: str | Path) -> dict:
    """The model's shape (width, embed_dim, ...) of a workdir or a model directory."""
    path = Path(path)
    if (path / MODEL_JSON).exists():
        return json.loads((path / MODEL_JSON).read_text())
    if (path / CONFIG_JSON).exists():
        return json.loads((path / CONFIG_JSON).read_text())["model"]
    raise FileNotFoundError(
        f"{path} is neither a training workdir (no {CONFIG_JSON}) nor a model directory "
        f"(no {MODEL_JSON}); pass the --workdir of a run or the output of `sslocal convert`")


def load_model_variables(path: str | Path, params_like: Any, batch_stats_like: Any,
                         which: str = "best") -> tuple[Any, Any, str]:
    """Params and batch stats from a model directory or a training workdir.

    In a workdir `which` picks "best" (falling back to the latest when no evaluation ran) or
    "latest". The arrays take the shapes, dtypes and shardings of `params_like` and
    `batch_stats_like`; a checkpoint of another model shape is a ValueError naming the
    difference. Returns (params, batch_stats, a description of what was loaded).
    """
    path = Path(path).absolute()
    if (path / MODEL_JSON).exists():
        with ocp.StandardCheckpointer() as checkpointer:
            raw = checkpointer.restore(path / "model")
        what = str(path)
    else:
        raw, what = _restore_workdir_state(path, which)
    return (_fill(params_like, raw["params"], what, "params"),
            _fill(batch_stats_like, raw["batch_stats"], what, "batch_stats"), what)


def _restore_workdir_state(path: Path, which: str) -> tuple[dict, str]:
    for kind in ([BEST_DIR, LATEST_DIR] if which == "best" else [LATEST_DIR]):
        if not (path / kind).exists():
            continue
        with ocp.CheckpointManager(path / kind, item_handlers={
                "state": ocp.StandardCheckpointHandler()}) as manager:
            step = manager.best_step() if kind == BEST_DIR else manager.latest_step()
            if step is None:
                continue
            # A target laid out on this process's first device: the run may have been saved
            # from another topology (8 GPUs) than the one evaluating it (a laptop).
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m, device=device: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                manager.item_metadata(step)["state"])
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
        return restored.state, f"{path / kind}/{step}"
    raise FileNotFoundError(f"no checkpoint in {path}: expected {BEST_DIR}/ or {LATEST_DIR}/")


def _fill(like: Any, raw: dict, what: str, name: str) -> Any:
    """`like` (an nnx.State) with the arrays of `raw` (the same tree as saved, as dicts)."""
    like_leaves = jax.tree_util.tree_leaves_with_path(like)
    keys = [_dotted(k) for k, _ in like_leaves]
    by_key = {_dotted(k): v for k, v in jax.tree_util.tree_leaves_with_path(raw)}
    missing = sorted(set(keys) - set(by_key))
    unexpected = sorted(set(by_key) - set(keys))
    if missing or unexpected:
        raise ValueError(f"{what} holds another model: {name} missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    leaves = []
    for key, (_, target) in zip(keys, like_leaves, strict=True):
        value = by_key[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{what} holds another model shape: {name}.{key} is "
                             f"{tuple(value.shape)}, the model expects {tuple(target.shape)}")
        sharding = getattr(target, "sharding", None)
        # From host memory: every process holds the same values, so placing them on a global
        # (multi-host) sharding needs no cross-host transfer.
        leaves.append(jax.device_put(np.asarray(value, dtype=target.dtype), sharding))
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _dotted(keypath) -> str:
    """"imgnet.layer1.0.conv1.kernel" for an nnx.State path and for its saved dict alike."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keypath]
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)
