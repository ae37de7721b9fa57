"""TFDS builders of sslocal's datasets, and the registry of "name/config" strings.

The registry is built from the builder classes themselves: adding a class to `_CLASSES` is all
a new dataset needs.
"""

from __future__ import annotations

from typing import Any

from sslocal.data.builders.avsbench import Avsbench
from sslocal.data.builders.base import MANIFEST, AVBuilder, AVConfig
from sslocal.data.builders.flickr_soundnet import FlickrSoundnet
from sslocal.data.builders.is3 import Is3
from sslocal.data.builders.synthetic_av import SyntheticAv
from sslocal.data.builders.vggsound import Vggsound
from sslocal.data.builders.vggss import Vggss

_CLASSES: tuple[type[AVBuilder], ...] = (Vggsound, FlickrSoundnet, Vggss, SyntheticAv, Is3,
                                         Avsbench)
BUILDERS: dict[str, type[AVBuilder]] = {cls.name: cls for cls in _CLASSES}
DATASETS: dict[str, type[AVBuilder]] = {
    f"{cls.name}/{config.name}": cls for cls in _CLASSES for config in cls.BUILDER_CONFIGS}


def parse_dataset(dataset: str) -> tuple[type[AVBuilder], str]:
    """"vggsound/144k" -> (the builder class, "144k"); a clear error for unknown names."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}")
    name, config = dataset.split("/", 1)
    return BUILDERS[name], config


def get_builder(dataset: str, **kwargs: Any) -> AVBuilder:
    """The builder of a "name/config" string; kwargs go to its constructor (data_dir, root,
    ids, num_workers, ...). ArrayRecord is the file format."""
    cls, config = parse_dataset(dataset)
    kwargs.setdefault("file_format", "array_record")
    return cls(config=config, **kwargs)


__all__ = ["AVBuilder", "AVConfig", "Avsbench", "BUILDERS", "DATASETS", "MANIFEST",
           "FlickrSoundnet", "Is3", "SyntheticAv", "Vggsound", "Vggss", "get_builder",
           "parse_dataset"]
