"""PyTorch checkpoints -> NNX state: torchvision ResNet18 and EZ-VSL reference-format files,
and the one check that arrays fit a model (`fill_state`, for Orbax checkpoints as well).

Files are read only with torch.load(weights_only=True): a pickle that would run code is refused.
torch is imported lazily, so the rest of sslocal works without it.

Name mapping (the NNX attribute paths mirror the torch module names):
  conv / linear weight -> kernel  (conv OIHW -> HWIO, linear (out, in) -> (in, out))
  bias -> bias;  BatchNorm weight -> scale;  running_mean / running_var -> mean / var (BatchStat)
  num_batches_tracked and the classifier (fc.*) are ignored.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from os import PathLike
from typing import Any

import jax
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
_SHOWN = 3  # differences named per kind in a ModelMismatchError


class ModelMismatchError(ValueError):
    """A checkpoint whose arrays do not fit the model its config (or the caller) describes."""


def dotted_key(keypath: tuple) -> str:
    """"imgnet.layer1.0.conv1.kernel" for an nnx.State path and for its saved dict alike."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keypath]
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def flat_arrays(tree: Any) -> dict[str, Any]:
    """{dotted key: leaf} of an nnx.State or of the nested dicts Orbax restores it as."""
    return {dotted_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _first_few(items: list[str], separator: str) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return separator.join(items[:_SHOWN]) + more


def fill_state(target: nnx.State, arrays: Mapping[str, Any], *, checkpoint: str, model: str,
               rename: Callable[[str], str] = lambda key: key) -> nnx.State:
    """`target` (an nnx.State, abstract or not) with its leaves taken from `arrays`.

    `arrays` maps `rename(dotted key)` of every leaf of `target` to an array of that leaf's
    shape; a missing key, an unexpected key or a shape mismatch raises one ModelMismatchError
    "{checkpoint} does not fit {model}: ..." naming the first few of each. Each array goes
    from host memory to its target leaf's sharding (the default device when it has none):
    every process holds the same values, so placing them on a global (multi-host) sharding
    needs no cross-host transfer.
    """
    leaves = jax.tree_util.tree_leaves_with_path(target)
    keys = [rename(dotted_key(path)) for path, _ in leaves]
    missing = sorted(set(keys) - set(arrays))
    unexpected = sorted(set(arrays) - set(keys))
    mismatched = [f"{key}: checkpoint {tuple(np.shape(arrays[key]))}, model {tuple(leaf.shape)}"
                  for key, (_, leaf) in zip(keys, leaves, strict=True)
                  if key in arrays and tuple(np.shape(arrays[key])) != tuple(leaf.shape)]
    problems = [f"{kind}: {_first_few(items, separator)}"
                for kind, items, separator in (("missing keys", missing, ", "),
                                               ("unexpected keys", unexpected, ", "),
                                               ("shape mismatches", mismatched, "; "))
                if items]
    if problems:
        raise ModelMismatchError(f"{checkpoint} does not fit {model}: " + " | ".join(problems))
    placed = [jax.device_put(np.asarray(arrays[key], leaf.dtype), getattr(leaf, "sharding", None))
              for key, (_, leaf) in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(target), placed)


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("converting PyTorch checkpoints needs torch: pip install torch") from e
    return torch


def read_torch_file(path: str | PathLike) -> Any:
    """torch.load(path, map_location='cpu', weights_only=True) with clear errors; `path` may
    be a gs:// URL (read into memory first)."""
    from sslocal.writers import as_path, is_url

    torch = _import_torch()
    path = as_path(path)
    try:
        if is_url(path):
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            data = io.BytesIO(path.read_bytes())
            return torch.load(data, map_location="cpu", weights_only=True)
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
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


def _torch_key(nnx_key: str) -> str:
    """NNX key -> torch key: 'layer1.0.bn1.scale' -> 'layer1.0.bn1.weight'."""
    module, _, leaf = nnx_key.rpartition(".")
    return f"{module}.{_NNX_TO_TORCH_NAME[leaf]}"


def _to_flax_layout(arr: np.ndarray, torch_key: str) -> np.ndarray:
    # Only conv and linear weights have 4 or 2 dimensions (BatchNorm weights have 1).
    if torch_key.endswith(".weight") and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if torch_key.endswith(".weight") and arr.ndim == 2:
        return arr.T  # (out, in) -> (in, out)
    return arr


def _as_numpy(value: Any, key: str) -> np.ndarray:
    torch = _import_torch()
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32)
    raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")


def _fields(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in kwargs.items())


def state_from_torch(
    target: nnx.State,
    state_dict: Mapping[str, Any],
    ignore: Callable[[str], bool] = lambda key: False,
    *,
    checkpoint: str,
    model: str,
) -> nnx.State:
    """`target` (a model's Param and BatchStat state, abstract or not) filled from a torch
    state dict, by fill_state: keys named `ignore(key)` and `*.num_batches_tracked` are
    skipped, and the differences are named by their torch keys (shapes in the Flax layout)."""
    arrays = {key: _to_flax_layout(_as_numpy(value, key), key)
              for key, value in state_dict.items()
              if not key.endswith("num_batches_tracked") and not ignore(key)}
    return fill_state(target, arrays, checkpoint=checkpoint, model=model, rename=_torch_key)


def _require(state_dict: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"{what} checkpoint has no {key!r} (missing keys: {key})")
    return tuple(state_dict[key].shape)


def _resnet_ignored(key: str) -> bool:
    return key.startswith("fc.")


def reference_ignored(key: str) -> bool:
    """The classifiers of the EZ-VSL reference towers, which AudioVisualModel does not have."""
    return key.startswith(("imgnet.fc.", "audnet.fc."))


def resnet18_state(state_dict: Mapping[str, Any], checkpoint: str = "checkpoint"
                   ) -> tuple[nnx.State, dict]:
    """torchvision ResNet18 state dict -> (ResNet18 state, constructor kwargs)."""
    out_ch, in_ch = _require(state_dict, "conv1.weight", "torchvision ResNet18")[:2]
    kwargs = {"in_channels": in_ch, "width": out_ch}
    abstract = nnx.eval_shape(lambda: ResNet18(**kwargs, rngs=nnx.Rngs(0)))
    state = state_from_torch(nnx.state(abstract, (nnx.Param, nnx.BatchStat)), state_dict,
                             _resnet_ignored, checkpoint=checkpoint,
                             model=f"ResNet18 ({_fields(kwargs)})")
    return state, kwargs


def reference_model_config(state_dict: Mapping[str, Any]) -> dict[str, int]:
    """{"width", "embed_dim"} of an EZ-VSL state dict (no 'module.'), from the widths of its
    first image convolution and of its image projection."""
    return {"width": _require(state_dict, "imgnet.conv1.weight", "reference-format")[0],
            "embed_dim": _require(state_dict, "img_proj.weight", "reference-format")[0]}


def av_model_state(state_dict: Mapping[str, Any], checkpoint: str = "checkpoint"
                   ) -> tuple[nnx.State, dict]:
    """EZ-VSL state dict (no 'module.') -> (AudioVisualModel state, constructor kwargs)."""
    kwargs = reference_model_config(state_dict)
    abstract = nnx.eval_shape(lambda: AudioVisualModel(**kwargs, rngs=nnx.Rngs(0)))
    state = state_from_torch(nnx.state(abstract, (nnx.Param, nnx.BatchStat)), state_dict,
                             reference_ignored, checkpoint=checkpoint,
                             model=f"AudioVisualModel ({_fields(kwargs)})")
    return state, kwargs


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
    state, kwargs = make(state_dict, str(path))
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
    return resnet18_state(state_dict, str(path))[0]


def load_torch_model(path: str | PathLike, *, dtype=jnp.float32) -> ResNet18 | AudioVisualModel:
    """Build the model a file describes (sizes inferred), with its weights, in eval mode."""
    state, kind, kwargs = load_torch_checkpoint_with_config(path)
    cls = ResNet18 if kind == "torchvision" else AudioVisualModel
    model = nnx.eval_shape(lambda: cls(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))
    load_into(model, state)
    model.eval()
    return model


def load_into(model: nnx.Module, state: nnx.State) -> None:
    """nnx.update(model, state) after fill_state has checked that keys and shapes match."""
    target = nnx.state(model, (nnx.Param, nnx.BatchStat))
    nnx.update(model, fill_state(target, flat_arrays(state), checkpoint="state",
                                 model=type(model).__name__))
