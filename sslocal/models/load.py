"""One loader for trained models: a training workdir, a model directory or a released PyTorch
file (convert.FORMATS) -> the model, its weights in place, the config it was built from and its
frame size.

Every path checks the arrays against the model they are described to be (convert.fill_state)
and raises one ModelMismatchError naming the differences.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import ml_collections
from flax import nnx

from sslocal import checkpointing, protocol, sharding
from sslocal.models import convert, factory
from sslocal.models.convert import ModelMismatchError
from sslocal.writers import absolute

__all__ = ["LoadedModel", "ModelMismatchError", "load_model"]

logger = logging.getLogger(__name__)

# Fields of a described model that say how it was made or used, not what it is.
_NOT_MODEL_FIELDS = ("image_pretrained", "image_size", "converted_from", "format", "momentum")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: nnx.merge(graphdef, params, batch_stats)."""

    graphdef: nnx.GraphDef
    params: nnx.State
    batch_stats: nnx.State
    model_config: dict  # the fields it was built from: width, embed_dim, dtype, audio_pool, ...
    image_size: int  # the frame size S it was trained at
    description: str  # what was loaded: "/runs/a/best/384", "/m/a.pth (EZ-VSL format, ...)"
    # The released format it was converted from (convert.FORMATS), None for sslocal's own.
    source_format: str | None = None

    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def load_model(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
               which: str = "best", format: str = "auto", momentum: bool = False
               ) -> LoadedModel:
    """The model at `path`: a training workdir (config.json; its best checkpoint, or its latest
    when no evaluation ran or `which="latest"`), a model directory (model.json, as written by
    checkpointing.save_model and `sslocal convert`), or any regular file, read as a released
    PyTorch checkpoint (.pth, .pt, .pth.tar, .bin) of `format` (convert.FORMAT_CHOICES; "auto":
    recognised from its keys) and converted in memory; `momentum` takes SLAVC's momentum
    encoders instead of the online ones its test.py evaluates by default.

    The model is built from the config the checkpoint describes, never with ImageNet weights;
    image_size is config.json's, or model.json's when recorded, else the paper's 224. The
    weights are replicated over `mesh`, or put on this process's first device. `path` may be
    local or a gs:// URL.
    """
    path = absolute(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    placement = (sharding.replicated(mesh) if mesh is not None
                 else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    source_format = None
    if path.is_file():
        source_format, model_config, graphdef, state, description = _convert_file(
            path, format, momentum, placement)
        image_size = protocol.IMAGE_SIZE
        logger.info("loaded %s", description)
    else:
        if format != "auto" or momentum:
            raise ValueError(f"{path} is a directory: format and momentum apply to PyTorch "
                             "files (a converted model directory records its own)")
        described = checkpointing.read_model_description(path)
        model_config = {**factory.MODEL_DEFAULTS, **{
            key: value for key, value in described.items() if key not in _NOT_MODEL_FIELDS}}
        graphdef, target = _abstract_model(model_config, placement)
        arrays, description = checkpointing.restore_model_arrays(path, which)
        source = path / (checkpointing.MODEL_JSON if (path / checkpointing.MODEL_JSON).exists()
                         else checkpointing.CONFIG_JSON)
        state = convert.fill_state(
            target, {**convert.flat_arrays(arrays["params"]),
                     **convert.flat_arrays(arrays["batch_stats"])},
            checkpoint=f"checkpoint {description}",
            model=f"the model {source} describes ({convert.describe_layout(model_config)})")
        image_size = int(described.get("image_size", protocol.IMAGE_SIZE))
        source_format = described.get("format")
        if source_format in convert.FORMATS:
            fmt = convert.FORMATS[source_format]
            description = (f"{description} ({fmt.title} format"
                           f"{fmt.encoders(bool(described.get('momentum')))}, converted from "
                           f"{described.get('converted_from', 'a PyTorch file')})")
    params, batch_stats = nnx.split_state(state, nnx.Param, nnx.BatchStat)
    return LoadedModel(graphdef=graphdef, params=params, batch_stats=batch_stats,
                       model_config=model_config, image_size=image_size,
                       description=description, source_format=source_format)


def _convert_file(path, format: str, momentum: bool, placement: jax.sharding.Sharding):
    """A released PyTorch file -> (format name, model config, graphdef, state, description)."""
    if format not in convert.FORMAT_CHOICES:
        raise ValueError(f"unknown format {format!r}; choose one of "
                         f"{', '.join(convert.FORMAT_CHOICES)}")
    state_dict = convert.read_state_dict(path)
    detected = convert.detect_format(state_dict)
    name = detected if format == "auto" else format
    if name is None:
        raise convert.unknown_layout_error(path, state_dict)
    if name == "torchvision":
        raise ValueError(f"{path}: a torchvision ResNet18 is not a full model; give it to the "
                         "config as model.image_pretrained or eval.ogl_weights instead")
    fmt = convert.FORMATS[name]
    model_config = {**factory.MODEL_DEFAULTS, **convert.format_model_config(state_dict, fmt,
                                                                            momentum)}
    graphdef, target = _abstract_model(model_config, placement)
    description = f"{path} ({fmt.title} format{fmt.encoders(momentum)}, converted in memory)"
    try:
        state = convert.format_state(
            target, state_dict, fmt, momentum=momentum, checkpoint=description,
            model=f"the {fmt.title} layout ({convert.describe_layout(model_config)})")
    except ModelMismatchError as error:
        if detected is None or detected == name:
            raise
        those = ("a torchvision ResNet18" if detected == "torchvision"
                 else f"the {detected} format (--format auto)")
        raise ModelMismatchError(f"{error}; its keys are those of {those}") from None
    return name, model_config, graphdef, state, description


def _abstract_model(model_config: dict, placement: jax.sharding.Sharding
                    ) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph of the model `model_config` describes, and its Param and BatchStat state as
    shapes placed by `placement` (what fill_state fills): nothing is initialised."""
    config = ml_collections.ConfigDict({**model_config, "image_pretrained": ""})
    graphdef, params, batch_stats = nnx.split(
        nnx.eval_shape(lambda: factory.build_model(config)), nnx.Param, nnx.BatchStat)
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=placement),
                          nnx.merge_state(params, batch_stats))
    return graphdef, target
