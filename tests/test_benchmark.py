"""Benchmarks: the FLOP counter against independent counts (XLA's lowering and cost analysis
of the configured programs, brute force, torchvision's published ResNet18 figure), the HLO
readers on hand-written HLO, and the step / input / e2e benchmarks and the CLI on tiny sizes
(no timing assertions: timings belong to benchmarks/, not to tests)."""

import functools
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

from configs import default, synthetic, tiny
from sslocal import benchmark, train
from sslocal.models import factory
from sslocal.protocol import SPEC_SHAPE

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
    config = tiny.get_config()
    config.batch_size = 16
    config.model.update(model)
    return config


def _flops(cost):
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


# -- the FLOP counter -------------------------------------------------------------------------

def _taps_brute_force(size, out, k, stride, padding, lhs_dilation, rhs_dilation):
    """Kernel taps of every output position that read a real input element (not padding, not a
    hole of the dilated input)."""
    real = {i * lhs_dilation for i in range(size)}
    return sum(i * stride - padding[0] + t * rhs_dilation in real
               for i in range(out) for t in range(k))


@pytest.mark.parametrize("size,k,stride,padding,lhs_dilation,rhs_dilation", [
    (9, 7, 2, (3, 3), 1, 1), (8, 3, 1, (1, 1), 1, 1), (7, 3, 2, (1, 1), 1, 1),
    (5, 1, 2, (0, 0), 1, 1), (2, 3, 1, (1, 1), 1, 1), (257, 7, 2, (3, 3), 1, 1),
    (9, 3, 1, (1, 1), 2, 1), (9, 3, 2, (2, 2), 1, 2), (8, 3, 1, (2, 1), 2, 2)])
def test_one_convolution_matches_xla_and_a_brute_force_count(size, k, stride, padding,
                                                            lhs_dilation, rhs_dilation):
    x = jnp.ones((1, size, size + 3, 3))
    w = jnp.ones((k, k, 3, 5))
    f = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), (padding, padding), (lhs_dilation,) * 2, (rhs_dilation,) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    jaxpr = jax.make_jaxpr(f)(x, w)
    _, oh, ow, _ = jax.eval_shape(f, x, w).shape
    valid = 2 * 3 * 5 * math.prod(
        _taps_brute_force(n, out, k, stride, padding, lhs_dilation, rhs_dilation)
        for n, out in ((size, oh), (size + 3, ow)))
    assert benchmark.jaxpr_flops(jaxpr, count_padding=False) == valid
    assert _flops(jax.jit(f).lower(x, w).cost_analysis()) == valid
    assert benchmark.jaxpr_flops(jaxpr) == 2 * k * k * 3 * 5 * oh * ow


CONFIGS = {"default": default.get_config, "synthetic": synthetic.get_config}


@functools.cache
def counted(name, count_padding=True, **model):
    config = CONFIGS[name]()
    config.model.update(model)
    return benchmark.count_flops(config, count_padding=count_padding)


def abstract_model(config):
    """The configured model as training builds it (train mode), shapes only."""
    config.model.image_pretrained = ""
    return nnx.eval_shape(lambda: factory.build_model(config.model))


@pytest.mark.parametrize("name", CONFIGS)
def test_counter_equals_xla_on_the_configured_forward(name):
    """The counter against the forward pass + loss as training traces them, at the config's
    shapes (lowered, never run): the same convolutions and dots as XLA's lowered program, the
    same FLOPs as XLA's cost analysis of them, and XLA's count of the whole program
    (elementwise work included) a little above."""
    config = CONFIGS[name]()
    batch, size = config.batch_size, config.image_size
    graphdef, state = nnx.split(abstract_model(config))
    loss_fn = train.loss_from_config(config)

    def forward(state, images, spec):
        return loss_fn(*nnx.merge(graphdef, state)(images, spec))

    traced = jax.jit(forward).trace(
        state, jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((batch, *SPEC_SHAPE, 1), jnp.float32))
    eqns = list(benchmark.matmul_equations(traced.jaxpr.jaxpr))
    lowered = traced.lower()
    ops = [op for _, op in benchmark.hlo_ops(lowered.as_text(dialect="hlo"))]
    assert len(eqns) == ops.count("convolution") + ops.count("dot") == 43

    def matmuls_only(*operands):
        return [e.primitive.bind(*operands[2 * i:2 * i + 2], **e.params)
                for i, e in enumerate(eqns)]

    operands = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for e in eqns for v in e.invars]
    xla_matmuls = _flops(jax.jit(matmuls_only).lower(*operands).cost_analysis())
    counted_valid = counted(name, count_padding=False)
    # XLA sums in float32: equal up to its rounding (a tap more or less would be > 1e-5).
    assert xla_matmuls == pytest.approx(batch * counted_valid["forward"], rel=1e-6)
    parts = ("image_tower", "img_proj", "audio_tower", "aud_proj", "similarity")
    assert sum(counted_valid[p] for p in parts) == counted_valid["forward"]
    assert 1.0 <= _flops(lowered.cost_analysis()) / xla_matmuls < 1.03


def test_train_step_count_agrees_with_xla_on_the_gradient():
    """Weight gradients (= forward) and input gradients (all but the data's): XLA's count of
    the gradient program, elementwise work included, a little above."""
    config = synthetic.get_config()
    batch, size = config.batch_size, config.image_size
    graphdef, params, stats = nnx.split(abstract_model(config), nnx.Param, nnx.BatchStat)
    grad_fn = train.make_grad_fn(graphdef, train.loss_from_config(config))
    loader_batch = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
                    "spec": jax.ShapeDtypeStruct((batch, *SPEC_SHAPE, 1), jnp.float16)}
    xla_train = _flops(jax.jit(grad_fn).lower(params, stats, loader_batch).cost_analysis())
    ratio = xla_train / (batch * counted("synthetic", count_padding=False)["train_step"])
    assert 1.0 <= ratio < 1.03


def test_paper_model_flops():
    paper = counted("default")
    # torchvision lists ResNet18 at 1.814 G multiply-adds (fvcore), its 512 x 1000 classifier
    # included; the trunk here has none.
    assert paper["image_tower"] / 2 + 512 * 1000 == pytest.approx(1.814e9, rel=1e-3)
    assert 21e9 < paper["train_step"] < 23e9  # "about 22 GFLOP per sample"
    assert paper["audio_tower"] > paper["image_tower"]  # 257 x 200 > 224 x 224 positions
    first = 2 * 49 * 64 * (3 * 112 * 112 + 1 * 129 * 100)  # the two conv1, no input grad
    assert paper["train_step"] == 3 * paper["forward"] - first
    # alpha = einsum("ihwd,jd->ijhw"): 2 * B * B * h * w * D per step, / B per sample.
    assert paper["similarity"] == 2 * 128 * 7 * 7 * 512


def test_synthetic_counts_its_stride_16_and_pooled_spectrogram():
    """image_stride 16 keeps layer4 at 7 x 7 (stride 32: 4 x 4) on 112 px frames; audio_pool 2
    halves the spectrogram's sides before the audio tower."""
    demo = counted("synthetic")
    plain = counted("synthetic", image_stride=32, audio_pool=1)
    w = 16  # layer4: 4w -> 8w, three more 8w -> 8w 3 x 3 convolutions, the 1 x 1 downsample
    layer4_per_position = 2 * (9 * 4 * w * 8 * w + 3 * 9 * 8 * w * 8 * w + 4 * w * 8 * w)
    assert demo["image_tower"] - plain["image_tower"] == layer4_per_position * (7 * 7 - 4 * 4)
    assert demo["img_proj"] == plain["img_proj"] * 49 // 16
    assert demo["similarity"] == plain["similarity"] * 49 // 16
    # ~4x: 129 x 100 instead of 257 x 200, less in the deeper layers (sizes round up).
    assert 3.5 < plain["audio_tower"] / demo["audio_tower"] < 4.0
    assert demo["aud_proj"] == plain["aud_proj"]
    assert demo["train_step"] < plain["train_step"]


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


def test_result_table_lists_scalars_and_the_collectives():
    text = benchmark.format_result({
        "kind": "step", "samples_per_second": 1234.5678, "flops_breakdown": {"forward": 1},
        "all_gather_shapes": ["f32[8]"], "collectives": {"all-reduce": 3, "all-gather": 1}})
    assert text.splitlines() == ["kind                step", "samples_per_second  1235",
                                 "collectives         all-reduce 3, all-gather 1"]


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
    expected = benchmark.count_flops(config, TINY_SPEC)
    assert result["flops_per_sample"] == expected["train_step"]
    assert result["flops_breakdown"] == expected
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
    config.image_size = 32  # what `train` would refuse: 32 px crops of 64 px frames
    with pytest.raises(ValueError, match="prepared for 64 px frames"):
        benchmark.main("input", config, dataset="synthetic_av/tiny", num_threads=1)


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
