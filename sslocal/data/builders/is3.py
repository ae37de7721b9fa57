"""IS3, the interactive synthetic sound-source set of the cross-modal alignment work
(Senocak et al., ICCV 2023 / TPAMI 2025; kaistmm/SSLalignment): 3,240 images that each show two
sounding objects, with one audio file and one box per object (docs/protocol.md section 9).

The annotation is SSLalignment's `metadata/synthetic3240_bbox.json`: a list of 6,480 entries
{"image": ".../visual_frames/<name>.jpg", "audio": ".../audio_wav/<name>.wav", "gt_box":
[xmin, ymin, xmax, ymax]} in 224-px coordinates, one per (image, source) pair, where <name> is
"<image id>_<source>" (e.g. "accordion_female_10438_accordion" and
"accordion_female_10438_female": the two sources of image "accordion_female_10438"). Each pair
has its own image file (the same picture, saved once per annotation) and its own audio file.
SSLalignment's test.py pairs every entry's image with that entry's audio, and regroups the
entries of one image by the name without its last "_" field (`short_name`) for iIoU / iAUC.

One example per entry: that pair's image, audio and box, with "image_id" (the short name),
"source" (0, 1: the entry's position among its image's entries in the json) and
"source_name" (the last "_" field), so that the pairs of one image can be regrouped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from sslocal.data.builders import _benchmark
from sslocal.data.builders.base import AVBuilder, AVConfig

# Looked for in ROOT, in this order: SSLalignment's metadata file, then the name of the
# annotation in the distributed zip (used when it holds the same "image" / "audio" /
# "gt_box" entries).
ANNOTATION_FILES = ("synthetic3240_bbox.json", "IS3_annotation.json")
# Image and audio folders: the distributed zip's "images" (its README) or SSLalignment's
# "visual_frames" (the paths in its json); "audio_wav" ("audio_waw" is the spelling of
# SSLalignment's README).
IMAGE_DIRS = ("images", "visual_frames")
AUDIO_DIRS = ("audio_wav", "audio_waw")
EXTRA_FEATURES = ("image_id", "source", "source_name")


def split_name(name: str) -> tuple[str, str]:
    """"<image id>_<source>" -> (image id, source name): SSLalignment's
    short_name = '_'.join(name.split('_')[:-1]) and the last field."""
    parts = name.split("_")
    return "_".join(parts[:-1]), parts[-1]


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def load_is3_annotations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The annotation json -> one dict per entry, in file order: "id" (the image file's stem),
    "image" and "audio" (file names), "boxes" ([[xmin, ymin, xmax, ymax]], int() of each
    value as SSLalignment's load_all_bboxes), "image_id", "source", "source_name"."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse IS3 annotations {path}: {e}") from e
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and {"image", "audio", "gt_box"} <= set(e) for e in entries):
        raise ValueError(f"{path}: expected a list of {{'image', 'audio', 'gt_box'}} objects "
                         "(kaistmm/SSLalignment metadata/synthetic3240_bbox.json)")
    out, seen = [], {}
    for e in entries:
        box = e["gt_box"]
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, int | float) and math.isfinite(v) for v in box)):
            raise ValueError(f"{path}: bad gt_box for {e['image']}: {box!r}")
        name = _stem(e["image"])
        image_id, source_name = split_name(name)
        source = seen.get(image_id, 0)
        seen[image_id] = source + 1
        out.append({"id": name, "image": os.path.basename(e["image"]),
                    "audio": os.path.basename(e["audio"]), "boxes": [[int(v) for v in box]],
                    "image_id": image_id, "source": source, "source_name": source_name})
    return out


def _first_dir(root: str, names: tuple[str, ...]) -> str:
    """The first of `names` that is a folder under root (the first name when none is, so that
    every file is then reported missing under the expected name)."""
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return name
    return names[0]


class Is3(_benchmark.LayoutInManifest, AVBuilder):
    """IS3 test pairs: one example per (image, source), boxes in 224 px (fmt "vggss")."""

    name = "is3"
    GT_FORMAT = "vggss"  # SSLalignment's bbox2gtmap: the union of the boxes, binarised
    BUILDER_CONFIGS = [
        AVConfig(name="test", test=True,
                 description="the 6,480 (image, source) pairs of IS3's 3,240 images"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass root=ROOT (`sslocal prepare --dataset is3/test --root ROOT`): "
        "ROOT/synthetic3240_bbox.json (kaistmm/SSLalignment metadata/), ROOT/images/<name>.jpg "
        "(or ROOT/visual_frames/) and ROOT/audio_wav/<name>.wav, as in the IS3 zip."
    )
    _process = staticmethod(_benchmark.process_pair)

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(
            _benchmark.features_with({
                "image_id": tfds.features.Text(),
                "source": tfds.features.Tensor(shape=(), dtype=np.int64),
                "source_name": tfds.features.Text(),
            }),
            pairs="one example per (image, source); image_id regroups an image's pairs")

    def _annotation_path(self, root: str) -> str:
        for name in ANNOTATION_FILES:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"IS3 annotation not found in {root}: expected {' or '.join(ANNOTATION_FILES)} "
            "(kaistmm/SSLalignment metadata/synthetic3240_bbox.json)")

    def _jobs(self, root):
        config = self.builder_config
        annotation = self._annotation_path(root)
        entries = load_is3_annotations(annotation)
        images, audio = _first_dir(root, IMAGE_DIRS), _first_dir(root, AUDIO_DIRS)
        self._layout = {"annotation": os.path.basename(annotation), "images": images,
                        "audio": audio, "entries": len(entries),
                        "images_in_annotation": len({e["image_id"] for e in entries})}
        by_id = {e["id"]: e for e in entries}
        if self._ids is None:
            wanted = entries
        else:  # an id without an entry is reported missing (its annotation), never guessed
            wanted = [by_id.get(i) or {"id": i, "image": f"{i}.jpg", "audio": f"{i}.wav",
                                       "boxes": None, "missing": True,
                                       "image_id": split_name(i)[0], "source": -1,
                                       "source_name": split_name(i)[1]}
                      for i in self._ids]
        jobs = []
        for e in wanted:
            job = {"id": e["id"], "root": root, "image_size": config.image_size, "test": True,
                   "frame": os.path.join(root, images, e["image"]),
                   "audio": os.path.join(root, audio, e["audio"]), "video": None,
                   "boxes": e["boxes"], "label": -1, "sounding": True,
                   "extra": {k: e[k] for k in EXTRA_FEATURES}}
            if e.get("missing"):
                job["missing_annotation"] = (f"{os.path.basename(annotation)} (no entry for "
                                             "this id)")
            jobs.append(job)
        return {"test": jobs}



__all__ = ["ANNOTATION_FILES", "AUDIO_DIRS", "IMAGE_DIRS", "Is3", "load_is3_annotations",
           "split_name"]
