"""Models from configs: the trained AudioVisualModel, the frozen OGL network, conversion."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from sslocal import checkpointing, sharding
from sslocal.models import convert
from sslocal.models.av_model import AudioVisualModel
from sslocal.models.resnet import ResNet18
from sslocal.writers import absolute, as_path

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The model config fields a config may lack: those written before audio_pool, image_stride and
# the released models' layout fields (audio_stride, projection, heads) existed, and model.json
# files that record only the shape, describe the paper's model.
MODEL_DEFAULTS = {"dtype": "float32", "audio_pool": 1, "image_stride": 32, "audio_stride": 32,
                  "projection": True, "heads": 1}
TORCHVISION_HINT = ("download torchvision's ImageNet ResNet18 weights (resnet18-f37072fd.pth, "
                    "e.g. torchvision.models.ResNet18_Weights.IMAGENET1K_V1) and point the config "
                    "at it, or set it to '' to start from scratch")


def _weights_path(path: str) -> epath.Path | None:
    """A configured weights file: a local path (`~` expanded) or a gs:// URL."""
    return as_path(path) if path else None


def check_weights_files(model_config: ml_collections.ConfigDict) -> None:
    """A configured weights file that does not exist fails before any compilation."""
    path = _weights_path(model_config.image_pretrained)
    if path is not None and not path.is_file():
        raise FileNotFoundError(
            f"model.image_pretrained: no file {path}; {TORCHVISION_HINT}")


def build_model(model_config: ml_collections.ConfigDict, seed: int = 0) -> AudioVisualModel:
    """PROTOCOL section 2: the image tower from torchvision's ImageNet weights when configured,
    everything else initialised per the protocol."""
    fields = {**MODEL_DEFAULTS, **model_config}
    model = AudioVisualModel(width=fields["width"], embed_dim=fields["embed_dim"],
                             dtype=DTYPES[fields["dtype"]], audio_pool=fields["audio_pool"],
                             image_stride=fields["image_stride"],
                             audio_stride=fields["audio_stride"],
                             projection=bool(fields["projection"]), heads=int(fields["heads"]),
                             rngs=nnx.Rngs(seed))
    path = _weights_path(model_config.image_pretrained)
    if path is not None:
        check_weights_files(model_config)
        convert.load_into(model.imgnet, convert.torchvision_resnet18_state(path))
    return model


def build_ogl(weights: str, mesh: jax.sharding.Mesh | None = None
              ) -> tuple[nnx.GraphDef, nnx.State]:
    """The frozen ImageNet ResNet18 of object-guided localization, in eval mode; its state
    replicated over `mesh` when given."""
    path = _weights_path(weights)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"eval.ogl_weights: no file {path}; {TORCHVISION_HINT}")
    network = convert.load_torch_model(path)
    if not isinstance(network, ResNet18) or network.in_channels != 3:
        raise ValueError(f"{path}: OGL needs a 3-channel torchvision ResNet18")
    graphdef, state = nnx.split(network)
    if mesh is not None:
        state = jax.device_put(state, sharding.replicated(mesh))
    return graphdef, state


def convert_checkpoint(torch_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                       format: str = "auto", momentum: bool = False) -> epath.Path:
    """`sslocal convert`: a released PyTorch checkpoint (convert.FORMATS; `format` "auto"
    recognises it from its keys) -> a model directory, converted as load.load_model converts
    it in memory. model.json records the layout fields, the format and, for SLAVC, which
    encoders were taken (`momentum`)."""
    from sslocal.models import load  # imported here: load builds its models with this module

    loaded = load.load_model(torch_path, format=format, momentum=momentum)
    fmt = convert.FORMATS[loaded.source_format]
    model_config = {**loaded.model_config, "image_size": loaded.image_size,
                    "converted_from": os.fspath(absolute(torch_path)), "format": fmt.name}
    if fmt.momentum_prefix:
        model_config["momentum"] = momentum
    out = checkpointing.save_model(out_dir, model_config, loaded.params, loaded.batch_stats)
    print(f"wrote {out} ({fmt.title} format{fmt.encoders(momentum)}: "
          f"{convert.describe_layout(loaded.model_config)})")
    return out
