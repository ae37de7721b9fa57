"""VGGSound training sets: the 10k / 144k / heard-110 lists, or every clip on disk."""

from __future__ import annotations

from typing import Any

from sslocal.data import annotations
from sslocal.data.builders import _clips
from sslocal.data.builders.base import AVBuilder, AVConfig


def train_jobs(root: str, split_list: str | None, ids: list[str] | None,
               image_size: int) -> list[dict[str, Any]]:
    """Jobs of a training split: `ids`, else the shipped list, else every clip under root."""
    if ids is None:
        ids = annotations.read_split(split_list) if split_list else _clips.ids_on_disk(root)
    return [_clips.make_job(i, root, image_size=image_size, test=False, sounding=True)
            for i in ids]


class Vggsound(AVBuilder):
    """VGGSound training clips (frames + audio), the marginNCE training sets."""

    name = "vggsound"
    BUILDER_CONFIGS = [
        AVConfig(name="10k", split_list="vggss_10k", description="VGGSound 10k subset"),
        AVConfig(name="144k", split_list="vggss_144k", description="VGGSound 144k subset"),
        AVConfig(name="full", split_list=None, description="every VGGSound clip on disk"),
        AVConfig(name="heard110", split_list="vggss_heard",
                 description="clips of the 110 heard classes (open-set experiment)"),
    ]

    def _jobs(self, root):
        config = self.builder_config
        return {"train": train_jobs(root, config.split_list, self._ids, config.image_size)}
