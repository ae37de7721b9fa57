"""`sslocal benchmark step|input|e2e`: throughput of the train step, the input pipeline, both.

step   the jitted train step (train.make_train_step) on device-resident synthetic batches:
       compile time, steady-state median step time over >= 20 synchronised steps, samples/s,
       model FLOPs, achieved TFLOP/s and the share of the device's peak, the collectives and
       convolution dtypes of the compiled program.
input  the Grain training loader alone on a prepared dataset (pipeline.loader_throughput).
e2e    loader + step as training runs them: the next batch is loaded and sent to the device
       while the step runs; metrics are fetched once, at the end.

FLOP convention: one multiply-add = 2 FLOPs; "model FLOPs" are those of every
conv_general_dilated and dot_general in the jaxpr of the configured model's forward pass and
loss, traced (not run) at the config's shapes: 2 * output elements * kernel taps * Cin /
feature_group_count per convolution, padded taps included (the usual 2 * k * k * Cin * Cout *
Hout * Wout; XLA's cost analysis counts only the taps that hit the image, `count_padding=False`),
2 * output elements * contracted size per dot (the projections, the loss's B x B similarity).
BatchNorm, ReLU, pooling, the loss's elementwise work and Adam are memory-bound and left out
(< 1% of the FLOPs at the paper's sizes). A train step is the forward pass, the weight
gradients (= forward) and the input gradients (= forward, except the first convolution of each
tower, whose input is the data and needs none): about 3 x forward.

The number of devices is every device, or $SSLOCAL_BENCH_DEVICES, or `num_devices=`;
$SSLOCAL_BENCH_HLO_DIR makes the step benchmark write its optimised HLO there.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.extend
import ml_collections
import numpy as np
from flax import nnx

from sslocal import sharding, train
from sslocal.models import factory
from sslocal.protocol import SPEC_SHAPE

KINDS = ("step", "input", "e2e")
DEVICES_ENV = "SSLOCAL_BENCH_DEVICES"
HLO_ENV = "SSLOCAL_BENCH_HLO_DIR"  # step: also write the optimised HLO there
MIN_STEPS = 20

# Dense peak TFLOP/s by jax device_kind (first matching substring wins, so specific names
# first). "float32" is what jax's default matmul precision runs float32 convolutions at:
# TF32 tensor cores on NVIDIA, one bfloat16 pass on TPU. The H200 entry is the figure this
# project's issue gives (~790, what a bf16 matmul reaches there); NVIDIA's sheet says 989.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.0}),
    ("H200", {"bfloat16": 790.0, "float32": 395.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),
)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


# -- FLOPs, counted from the traced model -----------------------------------------------------

_MATMULS = ("conv_general_dilated", "dot_general")
# Primitives whose sub-jaxprs run other than exactly once: the count would be wrong.
_CONTROL_FLOW = ("cond", "while", "scan")


def matmul_equations(jaxpr: jax.extend.core.Jaxpr) -> Iterator[jax.extend.core.JaxprEqn]:
    """Every convolution and dot_general of a jaxpr, its sub-jaxprs' (jit, custom_jvp...)
    included, in program order."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _CONTROL_FLOW:
            raise NotImplementedError(f"cannot count FLOPs through {eqn.primitive.name}")
        if eqn.primitive.name in _MATMULS:
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from matmul_equations(sub)


def _valid_taps(size: int, out: int, k: int, stride: int, padding: tuple[int, int],
                lhs_dilation: int, rhs_dilation: int) -> int:
    """Kernel taps, summed over one axis's output positions, that read an input element
    rather than padding (or a zero of the dilated input): what XLA's cost analysis counts."""
    extent = (size - 1) * lhs_dilation + 1
    positions = (i * stride - padding[0] + t * rhs_dilation for i in range(out) for t in range(k))
    return sum(0 <= p < extent and p % lhs_dilation == 0 for p in positions)


def equation_flops(eqn: jax.extend.core.JaxprEqn, count_padding: bool = True) -> int:
    """2 x the multiply-adds of one convolution or dot_general (module docstring)."""
    out = eqn.outvars[0].aval.shape
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    if eqn.primitive.name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        return 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)
    p = eqn.params
    dims = p["dimension_numbers"]  # (batch, feature, *spatial) positions of each operand
    # The kernel's input-feature dimension is already Cin / feature_group_count.
    flops = 2 * out[dims.out_spec[0]] * out[dims.out_spec[1]] * rhs[dims.rhs_spec[1]]
    spatial = zip(dims.lhs_spec[2:], dims.rhs_spec[2:], dims.out_spec[2:], strict=True)
    for axis, (lhs_dim, rhs_dim, out_dim) in enumerate(spatial):
        size, k, n = lhs[lhs_dim], rhs[rhs_dim], out[out_dim]
        if count_padding:
            flops *= n * k
        else:
            flops *= _valid_taps(size, n, k, p["window_strides"][axis], p["padding"][axis],
                                 p["lhs_dilation"][axis], p["rhs_dilation"][axis])
    return flops


def jaxpr_flops(closed_jaxpr: jax.extend.core.ClosedJaxpr, count_padding: bool = True) -> int:
    """The convolutions' and dots' FLOPs of a traced function."""
    return sum(equation_flops(e, count_padding) for e in matmul_equations(closed_jaxpr.jaxpr))


def count_flops(config: ml_collections.ConfigDict, spec_shape: tuple[int, int] = SPEC_SHAPE,
                *, count_padding: bool = True) -> dict[str, int]:
    """Model FLOPs per sample of the configured model and loss at config.batch_size
    (module docstring): the towers' parts, the similarity, forward, backward, train step.

    Each part is the model's own method traced (never run, no weights made) on inputs of the
    config's shapes; a tower is its encoder minus its projection.
    """
    batch = config.batch_size
    model = nnx.eval_shape(lambda: factory.build_model(_bench_config(config).model))
    model.eval()  # the same convolutions, and no BatchNorm statistics updates to trace
    graphdef, state = nnx.split(model)

    def trace(method: str, *shape: int) -> jax.extend.core.ClosedJaxpr:
        def run(state, x):
            return getattr(nnx.merge(graphdef, state), method)(x)

        return jax.make_jaxpr(run)(state, jax.ShapeDtypeStruct(shape, np.float32))

    image = trace("encode_image", batch, config.image_size, config.image_size, 3)
    audio = trace("encode_audio", batch, *spec_shape, 1)
    V, A = (jax.ShapeDtypeStruct(j.out_avals[0].shape, j.out_avals[0].dtype)
            for j in (image, audio))
    # A 1 x 1 convolution on the image tower's map; a dense layer on the audio tower's pool.
    img_proj = trace("img_proj", *V.shape[:3], model.imgnet.out_features)
    aud_proj = trace("aud_proj", batch, model.audnet.out_features)
    loss = jax.make_jaxpr(train.loss_from_config(config))(V, A)

    def count(closed_jaxpr) -> int:
        return jaxpr_flops(closed_jaxpr, count_padding) // batch

    parts = {"image_tower": count(image) - count(img_proj), "img_proj": count(img_proj),
             "audio_tower": count(audio) - count(aud_proj), "aud_proj": count(aud_proj),
             "similarity": count(loss)}
    forward = sum(parts.values())
    # Each encoder's first convolution reads the data: its input gradient is never computed.
    no_input_grad = sum(equation_flops(next(matmul_equations(j.jaxpr)), count_padding)
                        for j in (image, audio)) // batch
    backward = 2 * forward - no_input_grad
    return {**parts, "forward": forward, "backward": backward, "train_step": forward + backward}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The table's dense peak for this device and compute dtype; None when unknown (CPU)."""
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


# -- what the compiled program does -----------------------------------------------------------

# `[ROOT] [%]name = <type or (tuple of types)> opcode(`, in optimised and lowered HLO text.
_HLO_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\([^()]*\)|[^\s(]+)\s+([a-z][a-z0-9-]*)\(", re.MULTILINE)


def hlo_ops(hlo_text: str) -> list[tuple[str, str]]:
    """(result type, opcode) of every instruction of an HLO module's text."""
    return [(m.group(1), m.group(2)) for m in _HLO_OP.finditer(hlo_text)]


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Instructions per collective opcode (async -start/-done pairs count once)."""
    counts = Counter()
    for _, op in hlo_ops(hlo_text):
        base = op.removesuffix("-start")
        if base in COLLECTIVES and not op.endswith("-done"):
            counts[base] += 1
    return {name: counts[name] for name in COLLECTIVES}


def collective_shapes(hlo_text: str, op: str = "all-gather") -> list[str]:
    """The result types of every `op` (e.g. which arrays get gathered)."""
    return [ty for ty, name in hlo_ops(hlo_text) if name in (op, op + "-start")]


def convolution_dtypes(hlo_text: str) -> dict[str, int]:
    """Convolutions by result element type ("bf16": 40, ...)."""
    return dict(Counter(ty.split("[")[0].strip("(") for ty, op in hlo_ops(hlo_text)
                        if op == "convolution"))


# -- helpers ----------------------------------------------------------------------------------

def resolve_num_devices(num_devices: int | None = None) -> int:
    """The argument, else $SSLOCAL_BENCH_DEVICES, else every device."""
    if num_devices is None:
        env = os.environ.get(DEVICES_ENV, "").strip()
        num_devices = int(env) if env else jax.device_count()
    if not 1 <= num_devices <= jax.device_count():
        raise ValueError(f"{num_devices} devices requested, {jax.device_count()} available "
                         f"(set {DEVICES_ENV} or num_devices between 1 and that)")
    return num_devices


def _bench_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy without pretrained weights (the weights' values do not change the speed)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.image_pretrained = ""
    return config


def synthetic_batch(batch_size: int, image_size: int, spec_shape=SPEC_SHAPE,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch as the loader makes it (uint8 frames, float16 log spectrograms), with
    random (not zero) values."""
    rng = np.random.default_rng(seed)
    spec = rng.normal(-8.0, 3.0, (batch_size, *spec_shape, 1))
    return {"image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8),
            "spec": spec.astype(np.float16)}


def _device_info(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    device = mesh.devices.flat[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "num_devices": int(mesh.size), "jax_version": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _peak_memory(mesh: jax.sharding.Mesh) -> int | None:
    stats = mesh.devices.flat[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _add_rates(result: dict[str, Any], samples_per_second: float, config) -> None:
    flops = count_flops(config, tuple(result["spec_shape"]))
    achieved = flops["train_step"] * samples_per_second / 1e12
    result.update(flops_per_sample=flops["train_step"], flops_breakdown=flops,
                  achieved_tflops=achieved)
    peak = peak_tflops(result["device_kind"], config.model.dtype)
    if peak is not None:
        result.update(peak_tflops=peak, peak_fraction=achieved / peak)


def _setup_step(config, num_devices, count: Callable[[], None] | None = None):
    mesh = sharding.make_mesh(resolve_num_devices(num_devices))
    train.validate_config(config, mesh)
    # A schedule's value does not change the step's cost: any run length will do.
    tx = train.make_optimizer(config, total_steps=1_000_000)
    graphdef, state = train.create_train_state(config, mesh, tx)
    loss_fn = train.loss_from_config(config)

    def counted_loss(V, A):
        if count is not None:
            count()  # runs only while tracing
        return loss_fn(V, A)

    return mesh, state, train.make_train_step(graphdef, tx, counted_loss, mesh)


def _check_finite(metrics: list[dict[str, jax.Array]]) -> bool:
    return bool(all(np.all(m["finite"]) for m in jax.device_get(metrics)))


# -- the benchmarks ---------------------------------------------------------------------------

def benchmark_step(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                   num_steps: int = MIN_STEPS, warmup_steps: int = 3,
                   spec_shape: tuple[int, int] = SPEC_SHAPE, hlo_dir: str | None = None,
                   ) -> dict[str, Any]:
    """The train step on a fixed device-resident batch of config.batch_size (global).

    The step is lowered and compiled once, ahead of time (the executable jit would run);
    `warmup_steps` runs are excluded; then `num_steps` steps each synchronised with
    block_until_ready (the median is the step time) and the same number dispatched back to
    back with one synchronisation at the end (what a training loop that fetches metrics every
    N steps sees). hlo_dir: also write the optimised HLO there.
    """
    if num_steps < MIN_STEPS:
        raise ValueError(f"num_steps must be >= {MIN_STEPS} for a steady-state median")
    config = _bench_config(config)
    traces = []
    mesh, state, step = _setup_step(config, num_devices, lambda: traces.append(1))
    batch = sharding.to_global(
        synthetic_batch(config.batch_size, config.image_size, spec_shape), mesh)

    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    # The convolutions' dtypes as the program asks for them (XLA:CPU runs bf16 ones in f32).
    requested_dtypes = convolution_dtypes(lowered.as_text(dialect="hlo"))
    if hlo_dir:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / f"step_{mesh.size}dev.hlo.txt").write_text(hlo)

    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    metrics = []
    for _ in range(warmup_steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(num_steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
        metrics.append(m)
    t = time.perf_counter()
    for _ in range(num_steps):
        state, m = compiled(state, batch)
        metrics.append(m)
    jax.block_until_ready((state, m))
    pipelined = (time.perf_counter() - t) / num_steps

    median = statistics.median(times)
    q = np.percentile(times, [10, 90])
    memory = compiled.memory_analysis()
    result = {
        "kind": "step", **_device_info(mesh), "dtype": config.model.dtype,
        "batch_size": config.batch_size, "image_size": config.image_size,
        "spec_shape": list(spec_shape), "width": config.model.width,
        "embed_dim": config.model.embed_dim, "loss": config.loss,
        "num_steps": num_steps, "warmup_steps": warmup_steps, "traces": len(traces),
        "compile_seconds": compile_seconds, "step_time_median_s": median,
        "step_time_p10_s": float(q[0]), "step_time_p90_s": float(q[1]),
        "step_time_pipelined_s": pipelined,
        "samples_per_second": config.batch_size / median,
        "samples_per_second_pipelined": config.batch_size / pipelined,
        "finite": _check_finite(metrics),
        "collectives": count_collectives(hlo),
        "all_gather_shapes": collective_shapes(hlo, "all-gather"),
        "convolution_dtypes": convolution_dtypes(hlo),
        "convolution_dtypes_lowered": requested_dtypes,
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        # Equal when the whole state is donated (updated in place, no second copy).
        "state_bytes": state_bytes,
        "donated_bytes": getattr(memory, "alias_size_in_bytes", None),
        "peak_bytes_in_use": _peak_memory(mesh),
    }
    _add_rates(result, result["samples_per_second"], config)
    return result


def _dataset_and_source(config, dataset: str | None):
    from sslocal.data import prepare

    dataset = dataset or config.train_dataset
    source = prepare.load_split(dataset, "train", os.path.expanduser(config.data_dir),
                                root=config.data_root or None)
    train.check_frame_size(source, dataset, config.image_size)  # what `train` would run
    return dataset, source, config.image_size


def benchmark_input(config: ml_collections.ConfigDict, dataset: str | None = None, *,
                    num_batches: int = MIN_STEPS, num_threads: int | None = None
                    ) -> dict[str, Any]:
    """The Grain training loader alone (pipeline.loader_throughput) on `dataset` (default
    config.train_dataset), at config.image_size (the size the dataset is prepared for) and
    config.batch_size."""
    from sslocal.data import pipeline

    dataset, source, image_size = _dataset_and_source(config, dataset)
    threads = num_threads if num_threads is not None else max(1, min(4, os.cpu_count() or 1))
    result = pipeline.loader_throughput(
        source, global_batch_size=config.batch_size, image_size=image_size,
        num_batches=num_batches, worker_count=config.worker_count, num_threads=threads,
        seed=config.seed)
    return {"kind": "input", "dataset": dataset, "num_examples": len(source),
            "batch_size": config.batch_size, "image_size": image_size,
            "host_cpu_count": os.cpu_count(), **result}


def benchmark_e2e(config: ml_collections.ConfigDict, dataset: str | None = None, *,
                  num_devices: int | None = None, num_steps: int = MIN_STEPS,
                  warmup_steps: int = 3, num_threads: int | None = None) -> dict[str, Any]:
    """train_loader -> sharding.to_global -> train_step as train.py's loop runs them: the next
    batch is loaded and transferred while the step runs; metrics are fetched at the end."""
    from sslocal.data import pipeline

    config = _bench_config(config)
    dataset, source, image_size = _dataset_and_source(config, dataset)
    traces = []
    mesh, state, step = _setup_step(config, num_devices, lambda: traces.append(1))
    threads = num_threads if num_threads is not None else max(1, min(4, os.cpu_count() or 1))
    it = pipeline.train_loader(source, global_batch_size=config.batch_size,
                               image_size=image_size, seed=config.seed,
                               worker_count=config.worker_count, num_threads=threads)

    def next_batch():
        return sharding.to_global(next(it), mesh)

    batch = next_batch()
    for _ in range(warmup_steps):
        state, m = step(state, batch)
        batch = next_batch()
    jax.block_until_ready(state)
    metrics, input_seconds = [], 0.0
    t0 = time.perf_counter()
    for _ in range(num_steps):
        state, m = step(state, batch)  # dispatched: runs while the host loads the next batch
        metrics.append(m)
        t = time.perf_counter()
        batch = next_batch()
        input_seconds += time.perf_counter() - t
    jax.block_until_ready((state, m))
    wall = time.perf_counter() - t0
    result = {
        "kind": "e2e", **_device_info(mesh), "dataset": dataset, "dtype": config.model.dtype,
        "batch_size": config.batch_size, "image_size": image_size,
        "spec_shape": list(SPEC_SHAPE), "width": config.model.width,
        "embed_dim": config.model.embed_dim, "num_steps": num_steps,
        "warmup_steps": warmup_steps, "traces": len(traces), "num_threads": threads,
        "worker_count": config.worker_count, "wall_seconds": wall,
        "step_time_mean_s": wall / num_steps,
        "samples_per_second": num_steps * config.batch_size / wall,
        # Host time spent getting batches: close to the step time means input-bound.
        "input_seconds_per_step": input_seconds / num_steps,
        "finite": _check_finite(metrics),
    }
    _add_rates(result, result["samples_per_second"], config)
    return result


# -- CLI --------------------------------------------------------------------------------------

def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_result(result: dict[str, Any]) -> str:
    """Scalar results as aligned `name  value` lines (the breakdowns stay in the JSON)."""
    rows = [(k, _format(v)) for k, v in result.items() if not isinstance(v, dict | list)]
    for name in ("collectives", "convolution_dtypes"):
        if name in result:
            rows.append((name, ", ".join(f"{k} {v}" for k, v in result[name].items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def output_path(out: str, kind: str) -> Path:
    """--out X.json is the file; any other --out is a directory holding benchmark_<kind>.json."""
    path = Path(out)
    return path if path.suffix == ".json" else path / f"benchmark_{kind}.json"


def main(kind: str, config: ml_collections.ConfigDict, out: str | None = None,
         dataset: str | None = None, **options: Any) -> dict[str, Any]:
    """Runs one benchmark, prints its table and writes its JSON to `out` (when given).

    options go to benchmark_step / benchmark_input / benchmark_e2e (num_devices, num_steps...).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark {kind!r}; choose one of {KINDS}")
    if kind == "step":
        if dataset:
            raise ValueError("the step benchmark runs on synthetic batches: no --dataset")
        options.setdefault("hlo_dir", os.environ.get(HLO_ENV) or None)
        result = benchmark_step(config, **options)
    elif kind == "input":
        result = benchmark_input(config, dataset, **options)
    else:
        result = benchmark_e2e(config, dataset, **options)
    print(format_result(result))
    if out:
        path = output_path(out, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result
