"""One loader for trained models: a training workdir, a model directory or an EZ-VSL PyTorch
file -> the model, its weights in place, the config it was built from and its frame size.

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
_NOT_MODEL_FIELDS = ("image_pretrained", "image_size", "converted_from")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: nnx.merge(graphdef, params, batch_stats)."""

    graphdef: nnx.GraphDef
    params: nnx.State
    batch_stats: nnx.State
    model_config: dict  # the fields it was built from: width, embed_dim, dtype, audio_pool, ...
    image_size: int  # the frame size S it was trained at
    description: str  # what was loaded: "/runs/a/best/384", "/m/a.pth (EZ-VSL format, ...)"

    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def load_model(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
               which: str = "best") -> LoadedModel:
    """The model at `path`: a training workdir (config.json; its best checkpoint, or its latest
    when no evaluation ran or `which="latest"`), a model directory (model.json, as written by
    checkpointing.save_model and `sslocal convert`), or any regular file, read as an EZ-VSL
    reference-format PyTorch checkpoint (.pth, .pt, .pth.tar, .bin) and converted in memory.

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
    if path.is_file():
        kind, state_dict = convert.read_checkpoint(path)
        if kind != "reference":
            raise ValueError(f"{path}: a torchvision ResNet18 is not a full model; give it to the "
                             "config as model.image_pretrained or eval.ogl_weights instead")
        model_config = {**convert.reference_model_config(state_dict), **factory.MODEL_DEFAULTS}
        graphdef, target = _abstract_model(model_config, placement)
        description = f"{path} (EZ-VSL format, converted in memory)"
        state = convert.state_from_torch(
            target, state_dict, convert.reference_ignored, checkpoint=description,
            model=f"the model its imgnet.conv1 and img_proj describe ({_shape(model_config)})")
        image_size = protocol.IMAGE_SIZE
        logger.info("loaded %s", description)
    else:
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
            model=f"the model {source} describes ({_shape(model_config)})")
        image_size = int(described.get("image_size", protocol.IMAGE_SIZE))
    params, batch_stats = nnx.split_state(state, nnx.Param, nnx.BatchStat)
    return LoadedModel(graphdef=graphdef, params=params, batch_stats=batch_stats,
                       model_config=model_config, image_size=image_size,
                       description=description)


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


def _shape(model_config: dict) -> str:
    """"width 16, embed_dim 128": the fields that decide the arrays' shapes."""
    return f"width {model_config['width']}, embed_dim {model_config['embed_dim']}"
