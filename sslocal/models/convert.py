"""PyTorch checkpoints -> NNX state: torchvision ResNet18 and EZ-VSL reference-format files.

Files are read only with torch.load(weights_only=True): a pickle that would run code is refused.
torch is imported lazily, so the rest of sslocal works without it.

Name mapping (the NNX attribute paths mirror the torch module names):
  conv / linear weight -> kernel  (conv OIHW -> HWIO, linear (out, in) -> (in, out))
  bias -> bias;  BatchNorm weight -> scale;  running_mean / running_var -> mean / var (BatchStat)
  num_batches_tracked and the classifier (fc.*) are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from os import PathLike
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sslocal.models.av_model import AudioVisualModel
from sslocal.models.resnet import ResNet18

_NNX_TO_TORCH_NAME = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_REFERENCE_PREFIXES = ("imgnet.", "img_proj.", "audnet.", "aud_proj.")


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("converting PyTorch checkpoints needs torch: pip install torch") from e
    return torch


def read_torch_file(path: str | PathLike) -> Any:
    """torch.load(path, map_location='cpu', weights_only=True) with clear errors."""
    torch = _import_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except torch.serialization.pickle.UnpicklingError as e:  # weights_only refused the file
        raise ValueError(
            f"refusing to load {path} for safety: torch.load(weights_only=True) accepts only "
            f"tensors and plain containers, and this file is not one (it would need arbitrary "
            f"Python objects or code to be run, or it is not a PyTorch checkpoint). "
            f"torch said: {_torch_reason(e)}"
        ) from e
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:
        raise ValueError(f"could not read {path} as a PyTorch checkpoint: {e!r}") from e


def _torch_reason(error: Exception) -> str:
    # torch wraps the useful line ("unsupported GLOBAL posix.system ...") in generic advice.
    lines = [ln.strip() for ln in str(error).splitlines()[1:] if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Check the documentation", "Please file"))]
    return " ".join(lines) or str(error).splitlines()[0]


def _torch_key(path: tuple) -> str:
    """NNX path -> torch key: ('layer1', 0, 'bn1', 'scale') -> 'layer1.0.bn1.weight'."""
    *module, leaf = path
    return ".".join([str(p) for p in module] + [_NNX_TO_TORCH_NAME[leaf]])


def _to_flax_layout(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T  # (out, in) -> (in, out)
    return arr


def _as_numpy(value: Any, key: str) -> np.ndarray:
    torch = _import_torch()
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32)
    raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")


def state_from_torch(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    ignore: Callable[[str], bool] = lambda key: False,
) -> nnx.State:
    """Fill the Param/BatchStat state of `model` (may be abstract, from nnx.eval_shape).

    Keys named `ignore(key)` and `*.num_batches_tracked` are skipped; any missing key,
    unexpected key or shape mismatch raises one ValueError naming all of them.
    """
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    expected = {_torch_key(path): (path, var) for path, var in flat}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(
        k
        for k in state_dict
        if k not in expected and not k.endswith("num_batches_tracked") and not ignore(k)
    )
    bad_shapes, converted = [], []
    for key, (path, var) in expected.items():
        if key not in state_dict:
            continue
        src = _as_numpy(state_dict[key], key)
        arr = _to_flax_layout(src, path[-1])
        if arr.shape != tuple(var.shape):
            bad_shapes.append(
                f"{key}: checkpoint {tuple(src.shape)} (-> {arr.shape}), model {tuple(var.shape)}"
            )
            continue
        converted.append((path, var.replace(jnp.asarray(arr, jnp.float32))))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if bad_shapes:
        problems.append(f"shape mismatches: {'; '.join(bad_shapes)}")
    if problems:
        raise ValueError(
            f"checkpoint does not match {type(model).__name__}: " + " | ".join(problems)
        )
    return nnx.from_flat_state(converted)


def _require(state_dict: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"{what} checkpoint has no {key!r} (missing keys: {key})")
    return tuple(state_dict[key].shape)


def _resnet_ignored(key: str) -> bool:
    return key.startswith("fc.")


def _reference_ignored(key: str) -> bool:
    return key.startswith(("imgnet.fc.", "audnet.fc."))


def resnet18_state(state_dict: Mapping[str, Any]) -> tuple[nnx.State, dict]:
    """torchvision ResNet18 state dict -> (ResNet18 state, constructor kwargs)."""
    out_ch, in_ch = _require(state_dict, "conv1.weight", "torchvision ResNet18")[:2]
    kwargs = {"in_channels": in_ch, "width": out_ch}
    abstract = nnx.eval_shape(lambda: ResNet18(**kwargs, rngs=nnx.Rngs(0)))
    return state_from_torch(abstract, state_dict, _resnet_ignored), kwargs


def av_model_state(state_dict: Mapping[str, Any]) -> tuple[nnx.State, dict]:
    """EZ-VSL state dict (no 'module.') -> (AudioVisualModel state, constructor kwargs)."""
    width = _require(state_dict, "imgnet.conv1.weight", "reference-format")[0]
    embed_dim = _require(state_dict, "img_proj.weight", "reference-format")[0]
    kwargs = {"width": width, "embed_dim": embed_dim}
    abstract = nnx.eval_shape(lambda: AudioVisualModel(**kwargs, rngs=nnx.Rngs(0)))
    return state_from_torch(abstract, state_dict, _reference_ignored), kwargs


def _strip_module(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    # DataParallel / DistributedDataParallel save every key as 'module.<name>'.
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def read_checkpoint(path: str | PathLike) -> tuple[str, dict[str, Any]]:
    """Read a file and tell its format: ('torchvision' | 'reference', state dict)."""
    obj = read_torch_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state_dict = _strip_module(obj)
    if any(k.startswith(_REFERENCE_PREFIXES) for k in state_dict):
        return "reference", state_dict
    if "conv1.weight" in state_dict:
        return "torchvision", state_dict
    sample = ", ".join(list(state_dict)[:5])
    raise ValueError(
        f"{path}: neither a torchvision ResNet18 nor an EZ-VSL reference checkpoint "
        f"(first keys: {sample or 'none'})"
    )


def load_torch_checkpoint_with_config(path: str | PathLike) -> tuple[nnx.State, str, dict]:
    """(state, 'torchvision' | 'reference', constructor kwargs of ResNet18 / AudioVisualModel)."""
    kind, state_dict = read_checkpoint(path)
    make = resnet18_state if kind == "torchvision" else av_model_state
    state, kwargs = make(state_dict)
    return state, kind, kwargs


def load_torch_checkpoint(path: str | PathLike) -> nnx.State:
    """torchvision ResNet18 file -> ResNet18 state; reference file -> AudioVisualModel state.

    The state holds nnx.Param and nnx.BatchStat variables (float32); apply it with load_into.
    """
    return load_torch_checkpoint_with_config(path)[0]


def torchvision_resnet18_state(path: str | PathLike) -> nnx.State:
    """ResNet18 state from a torchvision file (e.g. ImageNet weights for model.imgnet)."""
    kind, state_dict = read_checkpoint(path)
    if kind != "torchvision":
        raise ValueError(f"{path}: expected a torchvision ResNet18 state dict, found a {kind} file")
    return resnet18_state(state_dict)[0]


def load_torch_model(path: str | PathLike, *, dtype=jnp.float32) -> ResNet18 | AudioVisualModel:
    """Build the model a file describes (sizes inferred), with its weights, in eval mode."""
    state, kind, kwargs = load_torch_checkpoint_with_config(path)
    cls = ResNet18 if kind == "torchvision" else AudioVisualModel
    model = nnx.eval_shape(lambda: cls(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))
    load_into(model, state)
    model.eval()
    return model


def load_into(model: nnx.Module, state: nnx.State) -> None:
    """nnx.update(model, state) after checking that paths and shapes match exactly."""
    current = dict(nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))))
    new = dict(nnx.to_flat_state(state))
    missing = sorted(".".join(map(str, p)) for p in current.keys() - new.keys())
    unexpected = sorted(".".join(map(str, p)) for p in new.keys() - current.keys())
    bad = [
        f"{'.'.join(map(str, p))}: state {tuple(new[p].shape)}, model {tuple(current[p].shape)}"
        for p in current.keys() & new.keys()
        if tuple(new[p].shape) != tuple(current[p].shape)
    ]
    if missing or unexpected or bad:
        raise ValueError(
            f"state does not fit {type(model).__name__}: missing {missing}, unexpected "
            f"{unexpected}, shape mismatches {bad}"
        )
    nnx.update(model, state)
