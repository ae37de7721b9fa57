"""Benchmarks: the FLOP counter against independent counts (XLA's cost analysis, the traced
program's own convolutions, torchvision's published ResNet18 figure), the HLO readers on
hand-written HLO, and the step / input / e2e benchmarks and the CLI on tiny sizes (no timing
assertions: timings belong to benchmarks/, not to tests)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import synthetic
from sslocal import benchmark, losses, train
from sslocal.models.av_model import AudioVisualModel

REPO = Path(__file__).resolve().parents[1]
TINY_SPEC = (65, 48)
STEP_KEYS = {"samples_per_second", "step_time_median_s", "step_time_pipelined_s",
             "compile_seconds", "flops_per_sample", "achieved_tflops", "traces", "collectives",
             "convolution_dtypes", "convolution_dtypes_lowered", "num_devices", "device_kind",
             "batch_size", "dtype", "finite"}


@pytest.fixture
def fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def tiny_config(**model):
    config = synthetic.get_config()
    config.model.width = 8
    config.model.embed_dim = 16
    config.image_size = 64
    config.batch_size = 16
    config.model.update(model)
    return config


def _flops(cost):
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


# -- the FLOP counter -------------------------------------------------------------------------

def _taps_brute_force(size, k, stride, pad):
    """Kernel taps of every output position that read a real (not padding) input pixel."""
    out = (size + 2 * pad - k) // stride + 1
    return sum(0 <= i * stride - pad + t < size for i in range(out) for t in range(k))


@pytest.mark.parametrize("size,k,stride,pad", [(9, 7, 2, 3), (8, 3, 1, 1), (7, 3, 2, 1),
                                               (5, 1, 2, 0), (2, 3, 1, 1), (257, 7, 2, 3)])
def test_one_convolution_matches_xla_and_a_brute_force_count(size, k, stride, pad):
    conv = benchmark.Conv("c", (size, size + 3), 3, 5, k, stride, pad)
    x = jnp.ones((1, size, size + 3, 3))
    w = jnp.ones((k, k, 3, 5))
    f = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert jax.eval_shape(f, x, w).shape[1:3] == conv.out_hw
    valid = 2 * 3 * 5 * _taps_brute_force(size, k, stride, pad) * _taps_brute_force(
        size + 3, k, stride, pad)
    assert conv.flops(count_padding=False) == valid
    assert _flops(jax.jit(f).lower(x, w).cost_analysis()) == valid
    oh, ow = conv.out_hw
    assert conv.flops() == 2 * k * k * 3 * 5 * oh * ow


def _matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every convolution and dot in a jaxpr (dense: padding counted)."""
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval.shape
        if eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) positions
            total += 2 * math.prod(out) * rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                total += _matmul_flops(inner)
    return total


def test_dense_count_equals_the_traced_model_at_the_papers_size():
    """Width 64, 224 x 224 frames, 257 x 200 spectrograms: the convolutions and dots of the
    real model's forward pass + marginNCE, read off its jaxpr (traced, not run)."""
    batch = 4
    model = nnx.eval_shape(lambda: AudioVisualModel(width=64, embed_dim=512, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def forward(state, images, spec):
        V, A = nnx.merge(graphdef, state)(images, spec)
        return losses.marginnce(V, A)

    jaxpr = jax.make_jaxpr(forward)(state, jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32),
                                    jax.ShapeDtypeStruct((batch, 257, 200, 1), jnp.float32))
    counted = benchmark.count_flops(batch_size=batch)
    assert _matmul_flops(jaxpr.jaxpr) == batch * counted["forward"]

    # torchvision lists ResNet18 at 1.814 G multiply-adds (fvcore), its 512 x 1000 classifier
    # included; the trunk here has none.
    assert counted["image_tower"] / 2 + 512 * 1000 == pytest.approx(1.814e9, rel=1e-3)
    paper = benchmark.count_flops(batch_size=128)
    assert 21e9 < paper["train_step"] < 23e9  # "about 22 GFLOP per sample"
    assert paper["audio_tower"] > paper["image_tower"]  # 257 x 200 > 224 x 224 positions
    first = 2 * 49 * 64 * (3 * 112 * 112 + 1 * 129 * 100)  # the two conv1, no input grad
    assert paper["train_step"] == 3 * paper["forward"] - first


def test_counter_agrees_with_xla_cost_analysis_forward_and_train():
    """XLA also counts BatchNorm, ReLU, pooling and the loss's elementwise work: it may exceed
    the model FLOPs by a few percent, never fall short."""
    width, dim, size, batch = 16, 32, 64, 8
    model = AudioVisualModel(width=width, embed_dim=dim, rngs=nnx.Rngs(0))
    images = jnp.ones((batch, size, size, 3))
    spec = jnp.ones((batch, *TINY_SPEC, 1))
    counted = benchmark.count_flops(width=width, embed_dim=dim, image_size=size,
                                    spec_shape=TINY_SPEC, batch_size=batch, count_padding=False)

    model.eval()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def forward(params, stats, images, spec):
        return losses.marginnce(*nnx.merge(graphdef, params, stats)(images, spec))

    xla_forward = _flops(jax.jit(forward).lower(params, stats, images, spec).cost_analysis())
    assert 1.0 <= xla_forward / (batch * counted["forward"]) < 1.03

    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    config = tiny_config()
    grad_fn = train.make_grad_fn(graphdef, train.loss_from_config(config))
    loader_batch = {"image": images.astype(jnp.uint8), "spec": spec.astype(jnp.float16)}
    lowered = jax.jit(grad_fn).lower(params, stats, loader_batch)
    ratio = _flops(lowered.cost_analysis()) / (batch * counted["train_step"])
    assert 1.0 <= ratio < 1.04


def test_spectrogram_shape_is_the_protocols():
    from sslocal.data.spectrogram import SPEC_SHAPE

    assert benchmark.SPEC_SHAPE == SPEC_SHAPE


def test_peak_table():
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert benchmark.peak_tflops("NVIDIA H200", "bfloat16") == 790.0
    assert benchmark.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 156.0
    assert benchmark.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert benchmark.peak_tflops("TPU v5p", "bfloat16") == 459.0
    assert benchmark.peak_tflops("TPU v4", "bfloat16") == 275.0
    assert benchmark.peak_tflops("cpu", "float32") is None


# -- reading HLO ------------------------------------------------------------------------------

HLO = """\
ENTRY %main {
  %p = f32[8,16]{1,0} parameter(0)
  %all-reduce.1 = (f32[8]{0}, f32[8]{0}, /*index=2*/f32[3,3,8,8]{3,2,1,0}) all-reduce(%a, %b, %c),
    channel_id=1, to_apply=%add
  %ag = f32[16,16]{1,0} all-gather(%p), channel_id=2, dimensions={0}
  %ars = f32[4]{0} all-reduce-start(%d), channel_id=3, to_apply=%add
  %ard = f32[4]{0} all-reduce-done(%ars)
  %conv.1 = bf16[8,4,4,16]{3,2,1,0} convolution(%x, %w), window={size=3x3}
  %conv.2 = f32[8,4,4,16]{3,2,1,0} convolution(%x, %w), window={size=3x3}
  ROOT %conv.3 = bf16[8,2,2,16]{3,2,1,0} convolution(%y, %v), window={size=1x1}
  %cp = u32[] collective-permute(%q), source_target_pairs={{0,1}}
}
"""


def test_hlo_readers_on_hand_written_hlo():
    assert benchmark.count_collectives(HLO) == {
        "all-reduce": 2, "all-gather": 1, "reduce-scatter": 0, "all-to-all": 0,
        "collective-permute": 1}
    assert benchmark.collective_shapes(HLO, "all-gather") == ["f32[16,16]{1,0}"]
    assert benchmark.convolution_dtypes(HLO) == {"bf16": 2, "f32": 1}
    # Lowered (unoptimised) HLO names instructions without '%'.
    assert benchmark.convolution_dtypes(HLO.replace("%", "")) == {"bf16": 2, "f32": 1}


# -- running the benchmarks -------------------------------------------------------------------

def test_num_devices_from_argument_or_environment(monkeypatch):
    monkeypatch.setenv(benchmark.DEVICES_ENV, "2")
    assert benchmark.resolve_num_devices() == 2
    assert benchmark.resolve_num_devices(1) == 1
    monkeypatch.delenv(benchmark.DEVICES_ENV)
    assert benchmark.resolve_num_devices() == jax.device_count()
    with pytest.raises(ValueError, match="devices requested"):
        benchmark.resolve_num_devices(jax.device_count() + 1)


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown benchmark"):
        benchmark.main("train", tiny_config())
    with pytest.raises(ValueError, match=">= 20"):
        benchmark.benchmark_step(tiny_config(), num_steps=5)
    with pytest.raises(ValueError, match="not divisible"):
        benchmark.benchmark_step(tiny_config(), num_devices=3)


def test_step_benchmark_on_8_devices(fast_compile, tmp_path):
    assert jax.device_count() >= 8
    config = tiny_config()
    config.batch_size = 8
    result = benchmark.main("step", config, out=str(tmp_path), num_devices=8,
                            spec_shape=TINY_SPEC)
    assert STEP_KEYS <= set(result)
    saved = json.loads((tmp_path / "benchmark_step.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("samples_per_second", "step_time_median_s", "step_time_pipelined_s",
                "compile_seconds", "flops_per_sample", "achieved_tflops"):
        assert result[key] > 0, key
    assert result["traces"] == 1  # compiled once for all warm-up and timed steps
    assert result["finite"] and result["num_devices"] == 8 and result["batch_size"] == 8
    assert result["donated_bytes"] == result["state_bytes"] > 0  # updated in place
    assert "peak_fraction" not in result  # CPU: no known peak
    expected = benchmark.count_flops(width=8, embed_dim=16, image_size=64,
                                     spec_shape=TINY_SPEC, batch_size=8)["train_step"]
    assert result["flops_per_sample"] == expected
    # 41 convolutions forward, 41 weight and 39 input gradients (none for the data).
    assert result["convolution_dtypes_lowered"] == {"f32": 121}
    # Batch-sharded step: the only gather is the audio embeddings A (B x D, for the global
    # B x B similarity); gradients and BatchNorm statistics are all-reduced.
    assert result["all_gather_shapes"] == ["f32[8,16]{1,0}"]
    assert result["collectives"]["all-reduce"] > 0


def test_bf16_step_asks_for_bf16_convolutions_and_keeps_f32_parameters():
    """Lowered only: XLA:CPU would rewrite bf16 convolutions to f32, GPUs and TPUs keep them."""
    config = tiny_config(dtype="bfloat16")
    mesh, state, step = benchmark._setup_step(config, 1)
    batch = sharding_batch(config, mesh)
    text = step.lower(state, batch).as_text(dialect="hlo")
    assert benchmark.convolution_dtypes(text) == {"bf16": 121}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.opt_state)
            if leaf.ndim} == {jnp.dtype(jnp.float32)}


def sharding_batch(config, mesh):
    from sslocal import sharding

    host = benchmark.synthetic_batch(config.batch_size, config.image_size, TINY_SPEC)
    return sharding.to_global(host, mesh)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """synthetic_av/tiny with 32 training scenes, built once into a private data_dir."""
    from sslocal.data import builders

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builders.get_builder("synthetic_av/tiny", data_dir=data_dir, num_train=32,
                         num_test=4).download_and_prepare()
    return data_dir


def test_input_benchmark(tiny_dataset, tmp_path):
    config = tiny_config()
    config.data_dir = tiny_dataset
    config.batch_size = 8
    result = benchmark.main("input", config, out=str(tmp_path / "input.json"),
                            dataset="synthetic_av/tiny", num_threads=1)
    assert json.loads((tmp_path / "input.json").read_text())["samples"] == 20 * 8
    assert result["image_size"] == 64 and result["num_examples"] == 32
    assert result["samples_per_second"] > 0 and result["samples_per_cpu_second"] > 0


@pytest.mark.slow
def test_e2e_benchmark(tiny_dataset, fast_compile):
    config = tiny_config()
    config.data_dir = tiny_dataset
    config.batch_size = 8
    result = benchmark.main("e2e", config, dataset="synthetic_av/tiny", num_devices=2,
                            num_threads=1)
    assert result["traces"] == 1 and result["finite"] and result["num_devices"] == 2
    assert result["samples_per_second"] > 0 and result["input_seconds_per_step"] > 0
    assert result["spec_shape"] == [257, 200]


@pytest.mark.slow
def test_cli_step_writes_json(tmp_path):
    env = {**os.environ, benchmark.DEVICES_ENV: "2", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "sslocal", "benchmark", "step",
         "--config", str(REPO / "configs" / "synthetic.py"), "--config.model.width=8",
         "--config.model.embed_dim=16", "--config.image_size=32", "--config.batch_size=4",
         f"--out={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "benchmark_step.json").read_text())
    assert STEP_KEYS <= set(result)
    assert result["num_devices"] == 2 and result["traces"] == 1
    assert result["spec_shape"] == [257, 200] and result["image_size"] == 32
    assert "samples_per_second" in proc.stdout  # the printed table
