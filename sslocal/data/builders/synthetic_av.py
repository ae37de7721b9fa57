"""Synthetic audio-visual scenes (data/synthetic.py), prepared through the real-data path.

Each scene is rendered to a JPEG frame and a 16-bit WAV in a temporary ROOT/frames, ROOT/audio
tree, then goes through exactly the code that prepares users' clips (`_clips.process_clip`:
audio loading, log spectrogram, frame resize and encoding). Boxes are converted from frame
pixels to the 224-px ground-truth grid by the VGG-SS rule, so fmt "vggss" scores them.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

import numpy as np

from sslocal import metrics
from sslocal.data import synthetic
from sslocal.data.builders import _clips
from sslocal.data.builders.base import AVBuilder, AVConfig

# Scenes per split of each preset: (train, test).
SPLIT_SIZES = {"tiny": (64, 16), "small": (4096, 512), "demo": (8192, 512), "noisy": (4096, 512),
               "full": (10000, 1000)}
TEST_SEED_OFFSET = 1  # the test split draws its scenes with seed + 1, the same categories


def scene_config(preset: str, split: str, seed: int = 0) -> synthetic.SceneConfig:
    """The SceneConfig of a preset's split: train uses `seed`, test `seed + 1`. Noisy
    correspondence is a training condition: test scenes always show their sounding object."""
    if split == "test":
        return dataclasses.replace(synthetic.PRESETS[preset], seed=seed + TEST_SEED_OFFSET,
                                   offscreen_prob=0.0)
    return dataclasses.replace(synthetic.PRESETS[preset], seed=seed)


def process_scene(job: dict[str, Any]) -> dict[str, Any]:
    """Renders scene `index` to files under job["root"], prepares it like a real clip, and
    deletes the files."""
    config = scene_config(job["preset"], job["split"], job["seed"])
    scene = synthetic.make_scene(config, job["index"])
    frame_path, audio_path = synthetic.write_scene(job["root"], job["id"], scene)
    try:
        size = config.image_size
        boxes = metrics.normalized_to_pixels(np.asarray(scene["boxes"]) / size, size=224)
        clip = _clips.make_job(job["id"], job["root"], image_size=size, test=job["test"],
                               boxes=boxes.tolist(), label=int(scene["category"]),
                               sounding=bool(scene["sounding"]))
        return _clips.process_clip(clip)
    finally:
        frame_path.unlink(missing_ok=True)
        audio_path.unlink(missing_ok=True)


class SyntheticAv(AVBuilder):
    """Synthetic scenes with known boxes: train and test splits (data/synthetic.py)."""

    name = "synthetic_av"
    NEEDS_ROOT = False
    BUILDER_CONFIGS = [
        AVConfig(name=name, test=True, image_size=synthetic.PRESETS[name].image_size,
                 description=f"synthetic.PRESETS[{name!r}]: {train} train / {test} test scenes")
        for name, (train, test) in SPLIT_SIZES.items()
    ]
    _process = staticmethod(process_scene)

    def __init__(self, *, seed: int = 0, num_train: int | None = None,
                 num_test: int | None = None, **kwargs: Any):
        """seed: the scenes' seed; num_train / num_test: override the preset's split sizes."""
        self._seed = seed
        self._sizes = (num_train, num_test)
        super().__init__(**kwargs)

    def _jobs(self, root):
        if self._ids is not None:
            raise ValueError("synthetic_av draws its scenes by index: pass num_train / "
                             "num_test, not ids")
        preset = self.builder_config.name
        sizes = [n if n is not None else default
                 for n, default in zip(self._sizes, SPLIT_SIZES[preset], strict=True)]
        return {split: [{"id": f"{split}_{i:06d}", "preset": preset, "split": split,
                         "seed": self._seed, "index": i, "test": split == "test"}
                        for i in range(n)]
                for split, n in zip(("train", "test"), sizes, strict=True)}

    def _generate_examples(self, split, jobs):
        with tempfile.TemporaryDirectory(prefix="sslocal_synthetic_") as root:
            for job in jobs:
                job["root"] = root
            yield from super()._generate_examples(split, jobs)


__all__ = ["SPLIT_SIZES", "SyntheticAv", "process_scene", "scene_config"]
