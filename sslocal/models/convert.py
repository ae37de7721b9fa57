"""PyTorch checkpoints -> NNX state: torchvision ResNet18 files, the released models of the
field (FORMATS: EZ-VSL, LVS, SLAVC, SSL-TIE layouts), and the one check that arrays fit a model
(`fill_state`, for Orbax checkpoints as well).

Files are read only with torch.load(weights_only=True): a pickle that would run code is refused.
torch is imported lazily, so the rest of sslocal works without it.

Name mapping (the NNX attribute paths mirror the torch module names):
  conv / linear weight -> kernel  (conv OIHW -> HWIO, linear (out, in) -> (in, out))
  bias -> bias;  BatchNorm weight -> scale;  running_mean / running_var -> mean / var (BatchStat)
  num_batches_tracked and the classifier (fc.*) of a torchvision file are ignored.

A released model's format says which keys it holds, how they map onto AudioVisualModel and
which model-config fields its architecture has (docs/protocol.md section 2, "Released models"):
every key of a file is either loaded, or one the format names as present but unused by the
map, or an error; nothing is skipped because it happens not to fit.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Collection, Mapping
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
               rename: Callable[[str], str] = lambda key: key,
               unused: Collection[str] = ()) -> nnx.State:
    """`target` (an nnx.State, abstract or not) with its leaves taken from `arrays`.

    `arrays` maps `rename(dotted key)` of every leaf of `target` to an array of that leaf's
    shape, and holds the `unused` keys too (parts of a layout that no leaf takes); a missing
    key, an unexpected key or a shape mismatch raises one ModelMismatchError
    "{checkpoint} does not fit {model}: ..." naming the first few of each. Each array goes
    from host memory to its target leaf's sharding (the default device when it has none):
    every process holds the same values, so placing them on a global (multi-host) sharding
    needs no cross-host transfer.
    """
    leaves = jax.tree_util.tree_leaves_with_path(target)
    keys = [rename(dotted_key(path)) for path, _ in leaves]
    expected = set(keys) | set(unused)
    missing = sorted(expected - set(arrays))
    unexpected = sorted(set(arrays) - expected)
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
    rename: Callable[[str], str] = lambda key: key,
    unused: Collection[str] = (),
) -> nnx.State:
    """`target` (a model's Param and BatchStat state, abstract or not) filled from a torch
    state dict, by fill_state: keys named `ignore(key)` and `*.num_batches_tracked` are
    skipped, `rename` maps the torch-style name of a leaf ("imgnet.bn1.weight") to the file's
    key, the `unused` keys must be present and are dropped, and the differences are named by
    the file's keys (shapes in the Flax layout)."""
    arrays = {key: _to_flax_layout(_as_numpy(value, key), key)
              for key, value in state_dict.items()
              if not key.endswith("num_batches_tracked") and not ignore(key)}
    return fill_state(target, arrays, checkpoint=checkpoint, model=model,
                      rename=lambda key: rename(_torch_key(key)), unused=unused)


def _require(state_dict: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"{what} checkpoint has no {key!r} (missing keys: {key})")
    return tuple(state_dict[key].shape)


def _resnet_ignored(key: str) -> bool:
    return key.startswith("fc.")


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


# -- the released models' formats --------------------------------------------------------------

# LVS's ResNet (models/base_models.py) builds all three stems in both towers and keeps its
# 1000-way classifier; each tower uses one stem (conv1 for images, conv1_a for audio).
_LVS_UNUSED = ("imgnet.conv1_a.weight", "imgnet.conv1_flow.weight", "imgnet.fc.weight",
               "imgnet.fc.bias", "audnet.conv1.weight", "audnet.conv1_flow.weight",
               "audnet.fc.weight", "audnet.fc.bias")
# SSL-TIE's AVENet (models/model.py) adds vision_fc1 (never called), and conv3 / norm3, whose
# output `out1` its forward computes and discards: none of them reaches the map it returns.
_SSLTIE_UNUSED = ("vision_fc1.weight", "vision_fc1.bias", "conv3.weight", "conv3.bias",
                  "norm3.weight", "norm3.bias", "norm3.running_mean", "norm3.running_var")


@dataclasses.dataclass(frozen=True)
class Format:
    """One released PyTorch layout: its keys, how they map onto AudioVisualModel, and the
    model-config fields of its architecture."""

    name: str  # the --format value
    title: str
    layout: Mapping[str, Any]  # model-config fields beyond width and embed_dim
    embed_key: str | None  # the torch-style key whose rows are embed_dim (None: 8 * width)
    markers: tuple[str, ...]  # keys only this layout has (--format auto)
    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)  # ours -> the file's
    unused: tuple[str, ...] = ()  # keys every file of the layout holds that the map never uses
    optional: tuple[str, ...] = ()  # prefixes a file may hold that the map never uses
    momentum_prefix: str = ""  # a momentum copy of every part under this prefix (SLAVC)

    def file_key(self, key: str, momentum: bool = False) -> str:
        """The file's key of an AudioVisualModel torch-style key ("audnet.conv1.weight")."""
        for ours, theirs in self.renames.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        return self.momentum_prefix + key if momentum else key

    def unused_keys(self, used: list[str], momentum: bool = False) -> list[str]:
        """The keys a file holds besides those of `used` (torch-style keys of the model):
        the layout's unused parts and, with momentum copies, the copies not taken."""
        others = [self.file_key(key, not momentum) for key in used] if self.momentum_prefix \
            else []
        return [*self.unused, *others]

    def is_optional(self, key: str) -> bool:
        return key.startswith(self.optional) if self.optional else False

    def encoders(self, momentum: bool) -> str:
        """", momentum encoders" / ", online encoders" for a layout with momentum copies."""
        if not self.momentum_prefix:
            return ""
        return ", momentum encoders" if momentum else ", online encoders"


_FORMAT_LIST = (
    # stoneMo/EZ-VSL model.py (EZVSL); OpenNLPLab/FNAC_AVL model.py (FNAC) and marginNCE use
    # the same modules. The towers' classifiers are nn.Identity there (no keys); a file that
    # keeps them (a torchvision resnet18 with its fc) may hold imgnet.fc / audnet.fc.
    Format("ezvsl", "EZ-VSL", {}, "img_proj.weight", ("img_proj.weight", "aud_proj.weight"),
           optional=("imgnet.fc.", "audnet.fc.")),
    # hche11/Localizing-Visual-Sounds-the-Hard-Way model.py (AVENet): layer4 at stride 1 in
    # both towers (14 x 14 image map at 224 px), no projections, audio max-pooled.
    Format("lvs", "LVS", {"image_stride": 16, "audio_stride": 16, "projection": False}, None,
           ("imgnet.conv1_a.weight", "audnet.conv1_a.weight"),
           renames={"audnet.conv1.": "audnet.conv1_a."}, unused=_LVS_UNUSED),
    # stoneMo/SLAVC model.py (SLAVC): two projection heads per tower and a momentum copy of
    # every part; test.py's map is the mean of the two heads' maps of the online encoders
    # (the momentum ones with --use_mom_eval).
    Format("slavc", "SLAVC", {"heads": 2}, "img_proj1.weight",
           ("img_proj1.weight", "momentum_imgnet.conv1.weight"), momentum_prefix="momentum_"),
    # jinxiang-liu/SSL-TIE models/model.py (AVENet): LVS's towers and map, plus modules
    # that never reach the map.
    Format("ssltie", "SSL-TIE", {"image_stride": 16, "audio_stride": 16, "projection": False},
           None, ("vision_fc1.weight", "conv3.weight", "norm3.running_mean"),
           renames={"audnet.conv1.": "audnet.conv1_a."}, unused=_LVS_UNUSED + _SSLTIE_UNUSED),
)
FORMATS: dict[str, Format] = {f.name: f for f in _FORMAT_LIST}
FORMAT_CHOICES = ("auto", *FORMATS)
# Recognition order: SSL-TIE files hold LVS's markers too.
_RECOGNITION_ORDER = ("ssltie", "lvs", "slavc", "ezvsl")
_TORCHVISION_MODULES = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
_KNOWN_MODULES = {"imgnet", "audnet", "img_proj", "aud_proj", "img_proj1", "img_proj2",
                  "aud_proj1", "aud_proj2", "vision_fc1", "conv3", "norm3"}
_WRAPPERS = ("model", "model_state_dict", "state_dict")  # EZ-VSL/SLAVC/FNAC, LVS, SSL-TIE


def describe_layout(model_config: Mapping[str, Any]) -> str:
    """"width 64, embed_dim 512, image stride 16, audio stride 16, no projections": the fields
    that decide a model's arrays and maps, the defaults left out."""
    parts = [f"width {model_config['width']}", f"embed_dim {model_config['embed_dim']}"]
    for key, default in (("image_stride", 32), ("audio_stride", 32)):
        if model_config.get(key, default) != default:
            parts.append(f"{key.replace('_', ' ')} {model_config[key]}")
    if not model_config.get("projection", True):
        parts.append("no projections")
    if model_config.get("heads", 1) != 1:
        parts.append(f"{model_config['heads']} heads")
    return ", ".join(parts)


def _rows(state_dict: Mapping[str, Any], key: str, default: int) -> int:
    # Missing keys are named by the one check (fill_state); a default keeps the model buildable.
    value = state_dict.get(key)
    return int(value.shape[0]) if value is not None and len(value.shape) else default


def format_model_config(state_dict: Mapping[str, Any], fmt: str | Format,
                        momentum: bool = False) -> dict[str, Any]:
    """{"width", "embed_dim", and the format's layout fields} of a state dict (no 'module.'):
    width from the image tower's first convolution, embed_dim from the format's first image
    projection (8 * width without projections)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    width = _rows(state_dict, fmt.file_key("imgnet.conv1.weight", momentum), 64)
    embed_dim = 8 * width if fmt.embed_key is None else _rows(
        state_dict, fmt.file_key(fmt.embed_key, momentum), 8 * width)
    return {"width": width, "embed_dim": embed_dim, **fmt.layout}


def format_state(target: nnx.State, state_dict: Mapping[str, Any], fmt: str | Format, *,
                 momentum: bool = False, checkpoint: str, model: str) -> nnx.State:
    """`target` (an AudioVisualModel's Param and BatchStat state, built from
    format_model_config) filled from a state dict of format `fmt`: every key either loaded,
    or one of the format's unused keys (which must be there), or a ModelMismatchError."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    if momentum and not fmt.momentum_prefix:
        raise ValueError(f"{checkpoint}: the {fmt.name} format has no momentum encoders "
                         "(only slavc has)")
    used = [_torch_key(dotted_key(path)) for path, _ in jax.tree_util.tree_leaves_with_path(target)]
    return state_from_torch(target, state_dict, fmt.is_optional, checkpoint=checkpoint,
                            model=model, rename=lambda key: fmt.file_key(key, momentum),
                            unused=fmt.unused_keys(used, momentum))


def av_model_state(state_dict: Mapping[str, Any], checkpoint: str = "checkpoint",
                   fmt: str = "ezvsl", momentum: bool = False) -> tuple[nnx.State, dict]:
    """A released model's state dict (no 'module.') -> (AudioVisualModel state, constructor
    kwargs)."""
    kwargs = format_model_config(state_dict, fmt, momentum)
    abstract = nnx.eval_shape(lambda: AudioVisualModel(**kwargs, rngs=nnx.Rngs(0)))
    state = format_state(nnx.state(abstract, (nnx.Param, nnx.BatchStat)), state_dict, fmt,
                         momentum=momentum, checkpoint=checkpoint,
                         model=f"AudioVisualModel ({describe_layout(kwargs)})")
    return state, kwargs


def _strip_module(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    # DataParallel / DistributedDataParallel save every key as 'module.<name>'.
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def read_state_dict(path: str | PathLike) -> dict[str, Any]:
    """The state dict of a file: the top-level dict, or the one its training script wrapped
    under 'model' (EZ-VSL, SLAVC, FNAC), 'model_state_dict' (LVS, SSLalignment) or
    'state_dict' (SSL-TIE), with DataParallel's 'module.' prefixes removed."""
    obj = read_torch_file(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    for key in _WRAPPERS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    others = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not _is_tensor(v)]
    if others:
        raise ValueError(f"{path}: a checkpoint wrapper sslocal does not know: entries "
                         f"{_first_few(others, ', ')} are not tensors (a state dict is read "
                         f"from the file itself or from its {', '.join(map(repr, _WRAPPERS))})")
    return _strip_module(obj)


def detect_format(state_dict: Mapping[str, Any]) -> str | None:
    """'ssltie' | 'lvs' | 'slavc' | 'ezvsl' | 'torchvision' from the keys (no 'module.'),
    or None for a layout sslocal does not know."""
    for name in _RECOGNITION_ORDER:
        if any(marker in state_dict for marker in FORMATS[name].markers):
            return name
    if "conv1.weight" in state_dict:
        return "torchvision"
    return None


def unknown_layout_error(path: str | PathLike, state_dict: Mapping[str, Any]) -> ValueError:
    """The error for a state dict of no known layout, naming the keys that fit none."""
    known = _KNOWN_MODULES | _TORCHVISION_MODULES
    stray = [k for k in state_dict if k.split(".")[0] not in known
             and not k.startswith("momentum_")]
    if stray:
        detail = f"keys that fit none of them: {_first_few(stray, ', ')}"
    else:
        markers = sorted({m for f in FORMATS.values() for m in f.markers})
        detail = (f"none of their keys {', '.join(markers)} or conv1.weight is present (keys: "
                  f"{_first_few(list(state_dict), ', ') or 'none'})")
    return ValueError(f"{path}: not a layout sslocal knows (formats {', '.join(FORMATS)}, or a "
                      f"torchvision ResNet18): {detail}")


def read_checkpoint(path: str | PathLike) -> tuple[str, dict[str, Any]]:
    """Read a file and tell its format from its keys: ('torchvision' | 'ezvsl' | 'lvs' |
    'slavc' | 'ssltie', state dict without 'module.'); an unknown layout raises, naming the
    keys that fit no format."""
    state_dict = read_state_dict(path)
    kind = detect_format(state_dict)
    if kind is None:
        raise unknown_layout_error(path, state_dict)
    return kind, state_dict


def load_torch_checkpoint_with_config(path: str | PathLike) -> tuple[nnx.State, str, dict]:
    """(state, the file's format (read_checkpoint), constructor kwargs of ResNet18 /
    AudioVisualModel)."""
    kind, state_dict = read_checkpoint(path)
    if kind == "torchvision":
        state, kwargs = resnet18_state(state_dict, str(path))
    else:
        state, kwargs = av_model_state(state_dict, str(path), kind)
    return state, kind, kwargs


def load_torch_checkpoint(path: str | PathLike) -> nnx.State:
    """torchvision ResNet18 file -> ResNet18 state; a released model -> AudioVisualModel state.

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
