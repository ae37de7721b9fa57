"""load.load_model: model directories, training workdirs (best / latest, saved from 8 devices
and loaded on one), EZ-VSL PyTorch files converted in memory, and its errors."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from sslocal import checkpointing, sharding
from sslocal.models import factory, load

REPO = Path(__file__).resolve().parents[1]
MODEL = {"width": 8, "embed_dim": 16, "dtype": "float32", "audio_pool": 1, "image_stride": 32,
         "audio_stride": 32, "projection": True, "heads": 1}
IMAGE = 64


@flax.struct.dataclass
class TrainState:  # the layout of sslocal.train.TrainState
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState


def variables(seed: int, width: int = 8):
    """(params, batch_stats) of a width-`width` model, batch stats random too."""
    model = factory.build_model(ml_collections.ConfigDict(
        {**MODEL, "width": width, "image_pretrained": ""}), seed=seed)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(seed)
    batch_stats = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype),
                               batch_stats)
    return params, batch_stats


def assert_same(state, expected):
    assert jax.tree.structure(state) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def state_at(step: int, mesh) -> TrainState:
    params, batch_stats = variables(seed=step)
    tx = optax.adam(1e-3)
    return jax.device_put(TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                                     batch_stats=batch_stats, opt_state=tx.init(params)),
                          sharding.replicated(mesh))


def write_workdir(workdir: Path, model: dict, *, latest: int | None, best: int | None) -> dict:
    """A workdir as sslocal.train writes it, saved from all 8 devices: {step: TrainState}."""
    workdir.mkdir(parents=True)
    (workdir / checkpointing.CONFIG_JSON).write_text(json.dumps(
        {"image_size": IMAGE, "model": model}))
    mesh = sharding.make_mesh()
    states = {step: state_at(step, mesh) for step in {latest, best} - {None}}
    checkpointer = checkpointing.Checkpointer(workdir, asynchronous=False)
    try:
        if best is not None:
            checkpointer.save_best(best, states[best], {"cIoU": 0.5})
        if latest is not None:
            checkpointer.save(latest, states[latest], force=True)
    finally:
        checkpointer.wait()
        checkpointer.close()
    return states


# ---------------------------------------------------------------- model directories


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    params, batch_stats = variables(seed=3)
    path = checkpointing.save_model(tmp_path_factory.mktemp("m") / "model",
                                    {**MODEL, "image_size": IMAGE}, params, batch_stats)
    return path, params, batch_stats


def test_model_dir_round_trip(model_dir):
    path, params, batch_stats = model_dir
    loaded = load.load_model(path)
    assert_same(loaded.params, params)
    assert_same(loaded.batch_stats, batch_stats)
    assert loaded.image_size == IMAGE
    assert loaded.model_config == MODEL
    assert loaded.description == str(path)
    assert loaded.variables().keys() == {"params", "batch_stats"}
    assert loaded.variables()["params"] is loaded.params
    first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    assert {leaf.sharding for leaf in jax.tree.leaves(loaded.variables())} == {first}
    model = nnx.merge(loaded.graphdef, loaded.params, loaded.batch_stats)
    assert model.imgnet.width == 8 and model.embed_dim == 16


def test_model_dir_on_a_mesh_and_without_image_size(model_dir, tmp_path):
    _, params, batch_stats = model_dir
    # What `sslocal convert` wrote before image_size was recorded: width and embed_dim only.
    path = checkpointing.save_model(tmp_path / "old", {"width": 8, "embed_dim": 16}, params,
                                    batch_stats)
    mesh = sharding.make_mesh()
    loaded = load.load_model(path, mesh=mesh)
    assert loaded.image_size == 224
    # The paper's dtype, audio_pool, strides, one projection head per tower.
    assert loaded.model_config == MODEL == {"width": 8, "embed_dim": 16, **factory.MODEL_DEFAULTS}
    assert_same(loaded.params, params)
    assert {leaf.sharding for leaf in jax.tree.leaves(loaded.variables())} == {
        sharding.replicated(mesh)}


# ---------------------------------------------------------------- training workdirs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Best at step 1, latest at step 2; image_pretrained names a file that is not there (a
    loaded checkpoint must never read ImageNet weights); no audio_pool / image_stride (a
    config written before they existed)."""
    path = tmp_path_factory.mktemp("run") / "work"
    model = {"width": 8, "embed_dim": 16, "dtype": "float32",
             "image_pretrained": "/nowhere/resnet18.pth"}
    return path, write_workdir(path, model, latest=2, best=1)


def test_workdir_loads_best(workdir):
    path, states = workdir
    loaded = load.load_model(path)
    assert loaded.description == f"{path.absolute()}/{checkpointing.BEST_DIR}/1"
    assert_same(loaded.params, states[1].params)
    assert_same(loaded.batch_stats, states[1].batch_stats)
    assert loaded.image_size == IMAGE
    assert loaded.model_config == MODEL


def test_workdir_latest(workdir):
    path, states = workdir
    loaded = load.load_model(path, which="latest")
    assert loaded.description == f"{path.absolute()}/{checkpointing.LATEST_DIR}/2"
    assert_same(loaded.params, states[2].params)
    assert_same(loaded.batch_stats, states[2].batch_stats)


def test_workdir_without_evaluation_falls_back_to_latest(tmp_path):
    path = tmp_path / "work"
    states = write_workdir(path, MODEL, latest=4, best=None)
    loaded = load.load_model(path)
    assert loaded.description.endswith(f"{checkpointing.LATEST_DIR}/4")
    assert_same(loaded.params, states[4].params)


def test_workdir_saved_on_8_devices_loads_on_one(workdir):
    path, states = workdir
    script = ("import sys, jax, numpy as np\n"
              "from sslocal.models import load\n"
              "m = load.load_model(sys.argv[1])\n"
              "first = jax.tree.leaves(m.params)[0]\n"
              "print(jax.device_count(), m.description, float(np.sum(first)))")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script, str(path)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    devices, description, total = out.stdout.split()
    assert devices == "1" and description.endswith(f"{checkpointing.BEST_DIR}/1")
    assert float(total) == pytest.approx(float(np.sum(jax.tree.leaves(states[1].params)[0])))


# ---------------------------------------------------------------- PyTorch files


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="PyTorch files need torch")
    from tests.torch_reference import TorchEZVSL, randomize

    model = randomize(TorchEZVSL(width=8, dim=16), seed=4)
    path = tmp_path_factory.mktemp("ref") / "ezvsl.pth"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 9},
               path)
    return path, model.state_dict()


def test_pytorch_file_loads_as_sslocal_convert_does(reference_file, tmp_path, caplog):
    path, torch_state = reference_file
    with caplog.at_level(logging.INFO, logger=load.__name__):
        direct = load.load_model(path)
    description = f"{path} (EZ-VSL format, converted in memory)"
    assert direct.description == description
    assert [r.getMessage() for r in caplog.records if r.name == load.__name__] == [
        f"loaded {description}"]
    assert direct.image_size == 224 and direct.model_config == MODEL
    kernel = np.asarray(direct.params["aud_proj"]["kernel"][...])
    np.testing.assert_array_equal(kernel, torch_state["aud_proj.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(direct.batch_stats["audnet"]["bn1"]["var"][...]),
                                  torch_state["audnet.bn1.running_var"].numpy())

    out = factory.convert_checkpoint(str(path), str(tmp_path / "converted"))
    assert json.loads((out / checkpointing.MODEL_JSON).read_text()) == {
        **MODEL, "image_size": 224, "converted_from": str(path), "format": "ezvsl"}
    converted = load.load_model(out)
    assert_same(converted.params, direct.params)
    assert_same(converted.batch_stats, direct.batch_stats)
    assert converted.image_size == 224 and converted.model_config == MODEL
    assert converted.source_format == direct.source_format == "ezvsl"
    assert converted.description == f"{out} (EZ-VSL format, converted from {path})"


def test_torchvision_file_is_not_a_model(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch files need torch")
    from tests.torch_reference import TorchResNet18

    path = tmp_path / "resnet18.pth"
    torch.save(TorchResNet18(3, 8).state_dict(), path)
    with pytest.raises(ValueError, match="a torchvision ResNet18 is not a full model"):
        load.load_model(path)


def test_pytorch_file_missing_a_layer(reference_file, tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch files need torch")
    _, torch_state = reference_file
    path = tmp_path / "partial.pt"
    torch.save({k: v for k, v in torch_state.items() if not k.startswith("aud_proj.")}, path)
    with pytest.raises(load.ModelMismatchError) as info:
        load.load_model(path)
    assert str(info.value) == (
        f"{path} (EZ-VSL format, converted in memory) does not fit the EZ-VSL layout (width 8, "
        "embed_dim 16): missing keys: aud_proj.bias, aud_proj.weight")


# ---------------------------------------------------------------- errors


def test_width_mismatch_is_one_error_naming_both_shapes(model_dir, tmp_path):
    _, params, batch_stats = model_dir  # width 8, described as width 16
    path = checkpointing.save_model(tmp_path / "liar", {"width": 16, "embed_dim": 16}, params,
                                    batch_stats)
    with pytest.raises(load.ModelMismatchError) as info:
        load.load_model(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} does not fit the model "
                              f"{path / checkpointing.MODEL_JSON} describes (width 16, "
                              "embed_dim 16): shape mismatches: aud_proj.kernel: checkpoint "
                              "(64, 16), model (128, 16); ")
    assert "strict" not in message and "missing" not in message


def test_workdir_of_another_width(tmp_path):
    path = tmp_path / "work"
    write_workdir(path, MODEL, latest=None, best=1)
    config = json.loads((path / checkpointing.CONFIG_JSON).read_text())
    config["model"]["embed_dim"] = 32
    (path / checkpointing.CONFIG_JSON).write_text(json.dumps(config))
    with pytest.raises(load.ModelMismatchError,
                       match=r"\(width 8, embed_dim 32\): shape mismatches: aud_proj\.bias: "
                             r"checkpoint \(16,\), model \(32,\); "):
        load.load_model(path)


def test_paths_that_hold_no_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {tmp_path / 'absent'}$"):
        load.load_model(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="neither a training workdir .* nor a model "
                                                "directory .*; pass the --workdir of a run"):
        load.load_model(tmp_path)
    (tmp_path / checkpointing.CONFIG_JSON).write_text(json.dumps({"model": MODEL}))
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*: expected best/ or "):
        load.load_model(tmp_path)
    with pytest.raises(ValueError, match="which must be 'best' or 'latest', not 'newest'"):
        load.load_model(tmp_path, which="newest")
