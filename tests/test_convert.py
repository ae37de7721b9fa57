"""PyTorch -> NNX conversion: numerical parity with torch models, clear errors, safe loading.

The torch models are written here with torchvision's module names (torchvision is not needed).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="conversion tests need torch (pip install torch)")

from sslocal.maps import diagonal_map  # noqa: E402
from sslocal.models.av_model import AudioVisualModel  # noqa: E402
from sslocal.models.convert import (  # noqa: E402
    ModelMismatchError,
    load_into,
    load_torch_checkpoint,
    load_torch_checkpoint_with_config,
    load_torch_model,
    resnet18_state,
    torchvision_resnet18_state,
)
from sslocal.models.resnet import ResNet18  # noqa: E402
from tests.torch_reference import TorchEZVSL, TorchResNet18, randomize  # noqa: E402

RTOL = 1e-4


# ---------------------------------------------------------------- torch reference models


def nhwc(t):
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def rel_err(jax_out, torch_out):
    ref = np.asarray(torch_out, np.float64)
    return float(np.abs(np.asarray(jax_out, np.float64) - ref).max() / np.abs(ref).max())


forward = nnx.jit(lambda m, x: m(x))
av_forward = nnx.jit(lambda m, x, y: diagonal_map(*m(x, y)))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize(TorchResNet18(3, 64), seed=0)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    model = randomize(TorchEZVSL(width=16, dim=24), seed=1)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ref") / "ezvsl.pth"
    torch.save({"model": state, "epoch": 3, "best_cIoU": 0.5}, path)
    return model, path


@pytest.fixture(scope="module")
def small_resnet_state():
    return randomize(TorchResNet18(3, 8), seed=2).state_dict()


def save(obj, tmp_path, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------- parity


def test_torchvision_resnet18_parity_width64(torchvision_file):
    torch_model, path = torchvision_file
    model = load_torch_model(path)
    assert isinstance(model, ResNet18) and model.width == 64 and model.in_channels == 3
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = torch_model.features(x).permute(0, 2, 3, 1).numpy()
    out = forward(model, nhwc(x))
    assert out.shape == ref.shape == (2, 7, 7, 512)
    err = rel_err(out, ref)
    print(f"torchvision ResNet18 width 64 parity: max rel err {err:.2e}")
    assert err < RTOL


def test_reference_model_parity(reference_file):
    torch_model, path = reference_file
    state, kind, kwargs = load_torch_checkpoint_with_config(path)
    assert kind == "ezvsl" and kwargs == {"width": 16, "embed_dim": 24}
    model = nnx.eval_shape(lambda: AudioVisualModel(width=16, embed_dim=24, rngs=nnx.Rngs(0)))
    load_into(model, state)  # fills every variable: no random initialisation needed
    model.eval()
    g = torch.Generator().manual_seed(6)
    image, spec = torch.randn(2, 3, 224, 224, generator=g), torch.randn(2, 1, 257, 200, generator=g)
    with torch.no_grad():
        v, a = torch_model(image, spec)
        ref = torch.einsum("bchw,bc->bhw", v, a).numpy()
    out = av_forward(model, nhwc(image), nhwc(spec))
    assert out.shape == ref.shape == (2, 7, 7)
    err = float(np.abs(np.asarray(out) - ref).max())
    print(f"reference model alpha_ii parity: max abs err {err:.2e}")
    np.testing.assert_allclose(np.asarray(out), ref, atol=RTOL, rtol=RTOL)


def test_train_mode_batchnorm_matches_torch(small_resnet_state):
    """Train-mode outputs agree, and after three train-mode steps every running mean and
    running variance (PyTorch momentum 0.1, the unbiased batch variance) equals torch's; the
    eval-mode outputs on those statistics agree too."""
    torch_model = TorchResNet18(3, 8)
    torch_model.load_state_dict(small_resnet_state)
    torch_model.train()
    model = nnx.eval_shape(lambda: ResNet18(width=8, rngs=nnx.Rngs(0)))
    load_into(model, resnet18_state(small_resnet_state)[0])
    model.train()
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        # Batch 4 at 64 px: layer4 reduces n = 4 * 2 * 2 = 16 values per channel, where the
        # unbiased variance is 16 / 15 of the biased one.
        x = 1.5 * torch.randn(4, 3, 64, 64, generator=g) + 0.3
        with torch.no_grad():
            ref = torch_model.features(x).permute(0, 2, 3, 1).numpy()
        out = forward(model, nhwc(x))
        assert rel_err(out, ref) < RTOL, step
    ours = {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
    theirs = torch_model.state_dict()
    assert len(ours) == 40
    for name, value in ours.items():
        torch_name = name.replace(".mean", ".running_mean").replace(".var", ".running_var")
        expected = theirs[torch_name].numpy()
        # Flax's biased update would be off by 0.3 * 0.1 / 15 = 0.2% of layer4's variances.
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        assert not np.allclose(expected, small_resnet_state[torch_name].numpy()), name
    torch_model.eval()
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        ref = torch_model.features(x).permute(0, 2, 3, 1).numpy()
    assert rel_err(forward(model, nhwc(x)), ref) < RTOL


# ---------------------------------------------------------------- formats and layout


def test_state_is_complete_and_float32(reference_file):
    _, path = reference_file
    state = load_torch_checkpoint(path)
    model = nnx.eval_shape(lambda: AudioVisualModel(width=16, embed_dim=24, rngs=nnx.Rngs(0)))
    expected = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    flat = dict(nnx.to_flat_state(state))
    assert set(flat) == {p for p, _ in expected}
    assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
    assert isinstance(flat[("imgnet", "bn1", "mean")], nnx.BatchStat)
    assert isinstance(flat[("imgnet", "bn1", "scale")], nnx.Param)


def test_layout_conversion(small_resnet_state, tmp_path):
    """OIHW -> HWIO, BN names, exact values; fc and num_batches_tracked ignored."""
    sd = small_resnet_state
    state = torchvision_resnet18_state(save(sd, tmp_path))
    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}
    w = sd["layer2.0.downsample.0.weight"].numpy()  # (out, in, 1, 1)
    np.testing.assert_array_equal(flat["layer2.0.downsample.0.kernel"], w.transpose(2, 3, 1, 0))
    w = sd["conv1.weight"].numpy()
    assert flat["conv1.kernel"][1, 4, 2, 5] == w[5, 2, 1, 4]
    np.testing.assert_array_equal(flat["layer3.1.bn2.scale"], sd["layer3.1.bn2.weight"].numpy())
    np.testing.assert_array_equal(flat["layer3.1.bn2.var"], sd["layer3.1.bn2.running_var"].numpy())
    np.testing.assert_array_equal(flat["bn1.mean"], sd["bn1.running_mean"].numpy())
    assert not any(k.startswith("fc") for k in flat)


def test_linear_transposed_and_bare_reference_dict(reference_file, tmp_path):
    torch_model, _ = reference_file
    sd = torch_model.state_dict()  # no 'model' wrapper, no 'module.' prefix
    state = load_torch_checkpoint(save(sd, tmp_path))
    kernel = np.asarray(state["aud_proj"]["kernel"][...])
    np.testing.assert_array_equal(kernel, sd["aud_proj.weight"].numpy().T)
    conv = np.asarray(state["img_proj"]["kernel"][...])
    np.testing.assert_array_equal(conv[0, 0], sd["img_proj.weight"].numpy()[:, :, 0, 0].T)


def test_torchvision_state_into_image_tower(small_resnet_state, tmp_path):
    """ImageNet-style initialisation of AudioVisualModel.imgnet from a torchvision file."""
    model = AudioVisualModel(width=8, embed_dim=16, rngs=nnx.Rngs(0))
    load_into(model.imgnet, torchvision_resnet18_state(save(small_resnet_state, tmp_path)))
    np.testing.assert_array_equal(
        np.asarray(model.imgnet.layer4[1].bn1.bias[...]),
        small_resnet_state["layer4.1.bn1.bias"].numpy(),
    )


def test_bfloat16_model_from_file(small_resnet_state, tmp_path):
    model = load_torch_model(save(small_resnet_state, tmp_path), dtype=jnp.bfloat16)
    y = forward(model, jnp.ones((1, 32, 32, 3)))
    assert y.dtype == jnp.bfloat16
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------- errors


def test_missing_and_unexpected_keys_are_named(small_resnet_state, tmp_path):
    sd = dict(small_resnet_state)
    del sd["layer1.0.bn1.running_var"]
    del sd["layer3.0.downsample.0.weight"]
    sd["layer5.0.conv1.weight"] = torch.zeros(3)
    path = save(sd, tmp_path)
    with pytest.raises(ModelMismatchError) as info:
        load_torch_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path} does not fit ResNet18 (in_channels 3, width 8): ")
    assert "missing keys: layer1.0.bn1.running_var, layer3.0.downsample.0.weight |" in msg
    assert "unexpected keys: layer5.0.conv1.weight" in msg


def test_many_differences_name_the_first_few(small_resnet_state, tmp_path):
    sd = {k: v for k, v in small_resnet_state.items() if not k.startswith("layer4.")}
    with pytest.raises(ModelMismatchError) as info:
        load_torch_checkpoint(save(sd, tmp_path))
    missing = sorted(k for k in small_resnet_state
                     if k.startswith("layer4.") and not k.endswith("num_batches_tracked"))
    assert f"missing keys: {', '.join(missing[:3])} and {len(missing) - 3} more" in str(info.value)


def test_shape_mismatch_is_named(small_resnet_state, tmp_path):
    sd = dict(small_resnet_state)
    sd["layer2.1.conv2.weight"] = torch.zeros(16, 16, 5, 5)
    with pytest.raises(ModelMismatchError, match=r"shape mismatches: layer2\.1\.conv2\.weight: "
                       r"checkpoint \(5, 5, 16, 16\), model \(3, 3, 16, 16\)$"):
        load_torch_checkpoint(save(sd, tmp_path))


def test_reference_missing_projection(reference_file, tmp_path):
    sd = {k: v for k, v in reference_file[0].state_dict().items() if not k.startswith("aud_proj")}
    with pytest.raises(ModelMismatchError, match="missing keys: aud_proj.bias, aud_proj.weight$"):
        load_torch_checkpoint(save({"model": sd}, tmp_path))


def test_unknown_format_and_wrong_kind(reference_file, tmp_path):
    path = save({"encoder.weight": torch.zeros(2), "imgnet.bn1.weight": torch.zeros(2)}, tmp_path)
    with pytest.raises(ValueError, match=r"not a layout sslocal knows \(formats ezvsl, lvs, "
                       r"slavc, ssltie, or a torchvision ResNet18\): keys that fit none of "
                       r"them: encoder\.weight$"):
        load_torch_checkpoint(path)
    path = save({"imgnet.bn1.weight": torch.zeros(2)}, tmp_path, "towers_only.pth")
    with pytest.raises(ValueError, match=r"none of their keys .*img_proj\.weight.* is present "
                       r"\(keys: imgnet\.bn1\.weight\)$"):
        load_torch_checkpoint(path)
    with pytest.raises(ValueError, match="expected a torchvision ResNet18"):
        torchvision_resnet18_state(reference_file[1])


def test_load_into_rejects_other_sizes(small_resnet_state, tmp_path):
    state = load_torch_checkpoint(save(small_resnet_state, tmp_path))
    wrong = nnx.eval_shape(lambda: ResNet18(width=16, rngs=nnx.Rngs(0)))
    with pytest.raises(ModelMismatchError, match=r"^state does not fit ResNet18: shape mismatches: "
                       r"bn1\.bias: checkpoint \(8,\), model \(16,\)"):
        load_into(wrong, state)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = save({"model": {"conv1.weight": Evil(marker)}}, tmp_path, "evil.pth")
    with pytest.raises(ValueError, match="refusing to load .* for safety") as info:
        load_torch_checkpoint(path)
    print(f"malicious pickle refused: {info.value}")
    assert not marker.exists()


def test_hand_written_malicious_pickle_is_refused(tmp_path):
    """A protocol-0 pickle calling os.system, written byte by byte (no pickle module needed)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(f"cos\nsystem\n(S'echo pwned > {marker}'\ntR.".encode())
    with pytest.raises(ValueError, match="for safety"):
        load_torch_checkpoint(path)
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint|could not read"):
        load_torch_checkpoint(garbage)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint|could not read"):
        load_torch_checkpoint(empty)
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "absent.pth")
