"""Training: the train state, one jitted step on the global batch, and the training loop."""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from sslocal import checkpointing, evaluate, host_memory, losses, sharding
from sslocal.data import pipeline
from sslocal.data import prepare as data_prepare
from sslocal.evaluator import Evaluator
from sslocal.models import factory, load
from sslocal.protocol import TRAIN_SCALE
from sslocal.writers import MetricWriter, append_text, as_path, check_paths, progress

logger = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. The data position lives in the Grain iterator, and there is no
    device-side randomness (augmentation is seeded per record in the loader)."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(config: ml_collections.ConfigDict, total_steps: int | None = None
                  ) -> float | optax.Schedule:
    """config.learning_rate under config.lr_schedule: "constant" (the paper: the number itself,
    so the optimizer is exactly the paper's), or "cosine": a linear warm-up from 0 over
    config.warmup_steps, then a cosine decay to 0 at total_steps (the run's last step)."""
    schedule = config.lr_schedule
    if schedule == "constant":
        return config.learning_rate
    if schedule != "cosine":
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, not {schedule!r}")
    if total_steps is None or total_steps <= config.warmup_steps:
        raise ValueError(f"a cosine schedule needs more steps ({total_steps}) than its "
                         f"warm-up (warmup_steps={config.warmup_steps}): for a run this short "
                         "lower --config.warmup_steps (0: none)")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=total_steps, end_value=0.0)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int | None = None
                   ) -> optax.GradientTransformation:
    """PyTorch's Adam(weight_decay=wd): L2 added to the gradient before Adam (not AdamW), at
    the configured learning-rate schedule (`learning_rate`)."""
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.adam(learning_rate(config, total_steps)))


def loss_from_config(config: ml_collections.ConfigDict) -> Callable[..., jax.Array]:
    """The configured loss with those of the config's hyper-parameters that it takes."""
    fn = losses.get_loss(config.loss)
    accepted = inspect.signature(fn).parameters
    kwargs = {name: config[name] for name in ("margin", "tau", "epsilon", "epsilon2", "beta")
              if name in accepted}
    return lambda V, A: fn(V, A, **kwargs)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """A fresh model (image tower from torchvision weights when configured), replicated."""
    model = factory.build_model(config.model, seed=config.seed)
    model.train()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params))
    return graphdef, jax.device_put(state, sharding.replicated(mesh))


def make_grad_fn(graphdef: nnx.GraphDef, loss_fn: Callable):
    """(params, batch_stats, batch) -> (loss, grads, updated batch_stats): the towers in train
    mode on the whole (global) batch of the loader's uint8 frames and float16 spectrograms
    (finished by pipeline.model_inputs), so BatchNorm statistics and the B x B negatives are
    global.
    The NNX graph is rebuilt only while tracing; compiled steps see plain arrays."""

    def loss_grads_stats(params, batch_stats, batch):
        def loss_of(model):
            V, A = model(*pipeline.model_inputs(batch["image"], batch["spec"]))
            return loss_fn(V, A)

        model = nnx.merge(graphdef, params, batch_stats)
        loss, grads = nnx.value_and_grad(loss_of)(model)
        return loss, grads, nnx.state(model, nnx.BatchStat)

    return loss_grads_stats


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable, mesh: jax.sharding.Mesh):
    """One jitted step: towers on the global batch -> loss -> coupled-L2 Adam update.

    The state is donated and comes back replicated. A step whose loss or gradient is not finite
    leaves the state as it was and reports `finite=False`, so no NaN ever reaches a parameter
    or a checkpoint; the host loop raises on it.
    """

    grad_fn = make_grad_fn(graphdef, loss_fn)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        loss, grads, batch_stats = grad_fn(state.params, state.batch_stats, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    replicated = sharding.replicated(mesh)
    return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))


_POSITIVE = ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps",
             "checkpoint_every_steps", "eval_every_epochs", "keep_checkpoints")


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Every mistake that can be seen before compiling: one clear message each."""
    for name in _POSITIVE:
        if not isinstance(config[name], int) or config[name] < 1:
            raise ValueError(f"{name} must be a positive integer, not {config[name]!r}")
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh)
    losses.get_loss(config.loss)
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, not "
                         f"{config.lr_schedule!r}")
    if not isinstance(config.warmup_steps, int) or config.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, not "
                         f"{config.warmup_steps!r}")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be float32 or bfloat16, not {config.model.dtype!r}")
    factory.check_weights_files(config.model)
    ogl_weights = as_path(config.eval.ogl_weights) if config.eval.ogl_weights else None
    if config.eval.ogl and (ogl_weights is None or not ogl_weights.is_file()):
        raise FileNotFoundError(f"eval.ogl_weights: no file {ogl_weights}; "
                                f"{factory.TORCHVISION_HINT}")


def check_frame_size(source: Any, dataset: str, image_size: int) -> None:
    """Training crops image_size px squares of the stored frames: they must be stored for that
    size (a smaller size would silently train on small crops of the frame)."""
    info = getattr(source, "dataset_info", None)  # a prepared split; other sources say nothing
    stored = info.metadata.get("image_size") if info is not None else None
    if stored is not None and int(stored) != image_size:
        raise ValueError(
            f"{dataset} is prepared for {stored} px frames (stored with the shorter side "
            f"int({TRAIN_SCALE} x {stored})), but image_size is {image_size}: training would "
            f"take {image_size} px crops of them while evaluation squashes whole frames. Set "
            f"image_size={stored}, or prepare the dataset for {image_size} px")


# What a checkpoint of a run is: its arrays' shapes and meaning, its data and their order. A
# resume whose config changes one of these is refused; other changes are recorded.
RUN_IDENTITY = ("model.width", "model.embed_dim", "model.audio_pool", "model.image_stride",
                "image_size", "train_dataset", "batch_size", "seed", "loss")
CONFIG_CHANGES = "config_changes.jsonl"


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_changes(workdir: str | os.PathLike, config: ml_collections.ConfigDict
                   ) -> dict | None:
    """None when `workdir` holds no run yet; otherwise {"step": the checkpoint to resume,
    "changed": {field: [the run's value, this config's]}}. Raises ValueError, before anything
    is written, when a changed field is one of RUN_IDENTITY (the checkpoints would not fit, or
    would mean another run)."""
    workdir = as_path(workdir)
    step = checkpointing.latest_saved_step(workdir)
    record = workdir / checkpointing.CONFIG_JSON
    if step is None:  # a run whose checkpoints were all found damaged is not started again
        checkpointing.refuse_fresh_start(workdir)
    if step is None or not record.is_file():
        return None
    run = _flat(json.loads(record.read_text()))
    new = _flat(json.loads(config.to_json_best_effort()))
    changed = {k: [run.get(k), new.get(k)] for k in sorted(run.keys() | new.keys())
               if run.get(k) != new.get(k)}
    refused = [k for k in changed if k in RUN_IDENTITY]
    if refused:
        detail = ", ".join(f"{k} is {changed[k][0]!r} there, {changed[k][1]!r} here"
                           for k in refused)
        raise ValueError(f"{workdir} holds a run (checkpoint at step {step}) that this config "
                         f"does not fit: {detail}. Resume with the run's values (its "
                         f"{checkpointing.CONFIG_JSON}), or give a new --workdir")
    return {"step": step, "changed": changed}


class _Preempted(Exception):
    pass


class PreemptionWatch:
    """Has SIGTERM (what preemption sends) arrived, so that this step should be the last?

    One process: a Python SIGTERM handler sets a flag. Several: JAX's preemption service
    (started by jax.distributed.initialize) catches SIGTERM on whichever hosts get it and picks
    one step at which every host answers True, so that all of them save the same step together;
    hosts that decided on their own would wait forever in each other's collectives. A Python
    handler there would replace the service's, so none is installed.
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self._flag: list[bool] = []
        self._previous = None
        if not self.multi_process:
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.append(True))

    def __call__(self, step: int) -> bool:
        """Called once after every step (on every host, from the first step on)."""
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(self._flag)

    def close(self) -> None:
        if not self.multi_process:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, Any]:
    """Trains per `config`, evaluating each epoch; resumes from `workdir` when it holds a run.

    `workdir` and config.data_dir may be local folders or gs:// URLs (a missing `gcs` extra
    fails first, in one line). Returns the last evaluation's metrics (and the best's, if
    evaluation ran). Caps glibc's malloc arenas for this process first (see host_memory), so
    that a long run's host memory stays flat.

    The run holds the workdir's lock throughout (checkpointing.hold_workdir): a second run on
    a workdir that a live process trains in fails at once (WorkdirBusyError). A resume falls
    back past damaged checkpoints, saying which (checkpointing.Checkpointer.restore).
    """
    check_paths(workdir, config.data_dir, config.model.image_pretrained,
                config.eval.ogl_weights)
    with checkpointing.hold_workdir(workdir):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                        ) -> dict[str, Any]:
    host_memory.limit_malloc_arenas()  # before the threads (XLA, Grain, Orbax) that use them
    workdir = as_path(workdir)
    mesh = sharding.make_mesh()
    validate_config(config, mesh)
    is_main = jax.process_index() == 0

    data_dir = os.fspath(as_path(config.data_dir)) if config.data_dir else None
    train_source = data_prepare.load_split(config.train_dataset, "train", data_dir,
                                           root=config.data_root or None)
    steps_per_epoch = len(train_source) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{config.train_dataset} has {len(train_source)} training clips, "
                         f"fewer than one batch of {config.batch_size}")
    total_steps = config.num_epochs * steps_per_epoch
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    train_iter = pipeline.train_loader(
        train_source, global_batch_size=config.batch_size, image_size=config.image_size,
        seed=config.seed, worker_count=config.worker_count)
    test_sets = {name: data_prepare.load_split(name, "test", data_dir)
                 for name in config.test_datasets}
    check_frame_size(train_source, config.train_dataset, config.image_size)
    changes = resume_changes(workdir, config)  # refuses a resume that does not fit the run
    if is_main:  # only once the data is there: a bad config leaves no workdir behind
        workdir.mkdir(parents=True, exist_ok=True)
        if changes is None:  # a new run: its record
            (workdir / checkpointing.CONFIG_JSON).write_text(
                config.to_json_best_effort(indent=2))
        elif changes["changed"]:  # config.json stays the run's; what changed, from when
            logger.warning("resuming %s at step %d with changed settings: %s", workdir,
                           changes["step"], ", ".join(
                               f"{k} {old!r} -> {new!r}"
                               for k, (old, new) in changes["changed"].items()))
            append_text(workdir / CONFIG_CHANGES, json.dumps(changes) + "\n")

    tx = make_optimizer(config, total_steps)
    graphdef, state = create_train_state(config, mesh, tx)
    checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    restored = checkpointer.restore(state, train_iter)
    if restored is not None:
        state = restored
        logger.info("resumed from %s at step %d", workdir, int(state.step))
    train_step = make_train_step(graphdef, tx, loss_from_config(config), mesh)
    evaluator = Evaluator(config, mesh)

    writer = MetricWriter(workdir, enabled=is_main)
    preemption = PreemptionWatch()
    start_step = int(state.step)
    results: dict[str, Any] = {}
    pending: list[tuple[int, dict]] = []
    bar = progress(total=total_steps, initial=start_step, desc="train", disable=not is_main)
    last_time, last_step = time.perf_counter(), start_step

    def flush_metrics(step: int) -> None:
        """Fetches the queued step metrics (the only host sync in the loop) and checks them."""
        nonlocal last_time, last_step
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched, strict=True):
            if not m["finite"]:
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {s} (loss={float(m['loss'])}); the "
                    f"state was left at step {s - 1} and the last checkpoint is intact")
        if fetched:
            now = time.perf_counter()
            rate = (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            mean = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm")}
            writer.write(step, {**mean, "samples_per_second": rate}, prefix="train")
            bar.set_postfix(loss=f"{mean['loss']:.4f}", samples_s=f"{rate:,.0f}")
        pending.clear()

    try:
        for step in range(start_step + 1, total_steps + 1):
            # Fetched here, not after the step: a checkpoint of step s must hold the iterator
            # after exactly s batches. The device still runs ahead (dispatch is asynchronous),
            # and Grain prefetches in its threads.
            batch = sharding.to_global(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            pending.append((step, metrics))
            bar.update(1)
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            save = step % config.checkpoint_every_steps == 0 or end_of_epoch
            preempted = preemption(step)
            if step % config.log_every_steps == 0 or save or preempted:
                flush_metrics(step)  # never checkpoint a step whose loss was not checked
            if save or preempted:
                if preempted:
                    logger.warning("SIGTERM: saving a checkpoint at step %d before exiting",
                                   step)
                checkpointer.save(step, state, train_iter, force=True)
            # A preempted epoch end is still evaluated (after its checkpoint is safe), so
            # that the epoch competes for the best checkpoint.
            epoch = -(-step // steps_per_epoch)
            if test_sets and end_of_epoch and (epoch % config.eval_every_epochs == 0
                                               or step == total_steps):
                results = evaluate_state(evaluator, graphdef, state, config, test_sets)
                for name, metrics_ in results.items():
                    writer.write(step, {k: v for k, v in metrics_.items()
                                        if isinstance(v, int | float)}, prefix=f"eval/{name}")
                primary = results[config.test_datasets[0]]
                checkpointer.save_best(step, state, {"cIoU": primary["cIoU"]})
                host_memory.release_free_memory()
            if preempted:
                raise _Preempted
        if test_sets and not results:  # resumed after its last step: evaluate it once
            results = evaluate_state(evaluator, graphdef, state, config, test_sets)
    except _Preempted:
        results = {"preempted_at_step": int(state.step)}
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        preemption.close()
    if is_main and results and "preempted_at_step" not in results:
        (workdir / "final_metrics.json").write_text(json.dumps(results, indent=2))
    if test_sets and "preempted_at_step" not in results and (config.eval.report
                                                              or config.eval.baselines):
        # The best checkpoint (by the first test set's cIoU) once more, with the report and
        # the baselines, through the same evaluator (no new compilation); the per-epoch
        # numbers above are the last epoch's.
        best = load.load_model(workdir, mesh=mesh)
        evaluate.evaluate_models(evaluator, [(evaluate.model_labels([workdir])[0], best)],
                                 test_sets, workdir / "eval", report=config.eval.report,
                                 baselines=config.eval.baselines)
    return results


def evaluate_state(evaluator: Evaluator, graphdef: nnx.GraphDef, state: TrainState,
                   config: ml_collections.ConfigDict, test_sets: dict[str, Any]
                   ) -> dict[str, dict]:
    """The summary of every test set for the weights of `state`."""
    model = load.LoadedModel(graphdef=graphdef, params=state.params,
                             batch_stats=state.batch_stats, model_config=config.model.to_dict(),
                             image_size=config.image_size, description=f"step {int(state.step)}")
    return {name: evaluator.run(model, source, name).summary
            for name, source in test_sets.items()}
