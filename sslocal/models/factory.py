"""Models from configs: the trained AudioVisualModel, the frozen OGL network, conversion."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import ml_collections
from flax import nnx

from sslocal import checkpointing
from sslocal.models import convert
from sslocal.models.av_model import AudioVisualModel
from sslocal.models.resnet import ResNet18

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TORCHVISION_HINT = ("download torchvision's ImageNet ResNet18 weights (resnet18-f37072fd.pth, "
                    "e.g. torchvision.models.ResNet18_Weights.IMAGENET1K_V1) and point the config "
                    "at it, or set it to '' to start from scratch")


def _weights_path(path: str) -> Path | None:
    return Path(path).expanduser() if path else None


def check_weights_files(model_config: ml_collections.ConfigDict) -> None:
    """A configured weights file that does not exist fails before any compilation."""
    path = _weights_path(model_config.image_pretrained)
    if path is not None and not path.is_file():
        raise FileNotFoundError(
            f"model.image_pretrained: no file {path}; {TORCHVISION_HINT}")


def build_model(model_config: ml_collections.ConfigDict, seed: int = 0) -> AudioVisualModel:
    """PROTOCOL section 2: the image tower from torchvision's ImageNet weights when configured,
    everything else initialised per the protocol."""
    model = AudioVisualModel(width=model_config.width, embed_dim=model_config.embed_dim,
                             dtype=DTYPES[model_config.dtype],
                             # Absent in configs written before these knobs: the paper's values.
                             audio_pool=model_config.get("audio_pool", 1),
                             image_stride=model_config.get("image_stride", 32),
                             rngs=nnx.Rngs(seed))
    path = _weights_path(model_config.image_pretrained)
    if path is not None:
        check_weights_files(model_config)
        convert.load_into(model.imgnet, convert.torchvision_resnet18_state(path))
    return model


def build_ogl(weights: str) -> tuple[nnx.GraphDef, nnx.State]:
    """The frozen ImageNet ResNet18 of object-guided localization, in eval mode."""
    path = _weights_path(weights)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"eval.ogl_weights: no file {path}; {TORCHVISION_HINT}")
    network = convert.load_torch_model(path)
    if not isinstance(network, ResNet18) or network.in_channels != 3:
        raise ValueError(f"{path}: OGL needs a 3-channel torchvision ResNet18")
    return nnx.split(network)


def convert_checkpoint(torch_path: str, out_dir: str) -> Path:
    """`sslocal convert`: a reference-format (EZ-VSL) PyTorch checkpoint -> a model directory."""
    state, kind, kwargs = convert.load_torch_checkpoint_with_config(torch_path)
    if kind != "reference":
        raise ValueError(f"{torch_path}: a torchvision ResNet18 is not a full model; give it to "
                         "the config as model.image_pretrained or eval.ogl_weights instead")
    model = nnx.eval_shape(lambda: AudioVisualModel(**kwargs, rngs=nnx.Rngs(0)))
    convert.load_into(model, state)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    model_config = {"width": kwargs["width"], "embed_dim": kwargs["embed_dim"],
                    "converted_from": str(Path(torch_path).absolute())}
    out = checkpointing.save_model(out_dir, model_config, params, batch_stats)
    print(f"wrote {out} (width {kwargs['width']}, embed_dim {kwargs['embed_dim']})")
    return out
