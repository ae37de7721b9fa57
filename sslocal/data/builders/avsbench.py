"""AVSBench-object S4 (single source) and MS3 (multiple sources) test sets, read as zero-shot
localization benchmarks: frames with binary masks instead of boxes (docs/protocol.md
section 9).

The distributed layout (OpenNLPLab/AVSBench: avs_scripts/avs_s4/config.py, dataloader.py and
avs_scripts/avs_ms3/..., preprocess_scripts/preprocess_s4.py / preprocess_ms3.py), under ROOT
= AVSBench's `avsbench_data` folder:

    S4   Single-source/s4_meta_data.csv           a header; name = column 0, category =
                                                  column 2 (or "category"), "split"
         Single-source/s4_data/visual_frames/<split>/<category>/<name>/<name>_<k>.png
         Single-source/s4_data/audio_wav/<split>/<category>/<name>.wav
         Single-source/s4_data/gt_masks/<split>/<category>/<name>/<name>_<k>.png
    MS3  Multi-sources/ms3_meta_data.csv          a header; name = column 0, "split"
         Multi-sources/ms3_data/visual_frames/<name>/<name>.mp4_<k>.png   (no split folder)
         Multi-sources/ms3_data/audio_wav/<split>/<name>.wav
         Multi-sources/ms3_data/gt_masks/<split>/<name>/<name>_<k>.png

k = 1..5: a 5 s video has five frames, frame k taken at the end of second k (AVSBench's
preprocessing keeps the 16th of 16 samples of each second), and, for the test split, a mask
for each of the five. ROOT may also be the Single-source / Multi-sources folder itself.

Every one of the five frames of a test video is one example (740 S4 and 64 MS3 test videos:
3,700 and 320 frames, the frames SSLalignment's s4_seg.json / ms3_seg.json list). AVSBench
pairs frame k with audio second k (its k-th 0.96 s VGGish log-mel example); sslocal's model
takes 3 s, so the configs say which 3 s:

- "s4", "ms3" (AVSBench's pairing): the 3 s window centred on the middle of second k,
  k - 0.5 s, kept inside the file (seconds 1-2 and 4-5 thus share a window: [0, 3] and
  [2, 5] s of a 5 s wav);
- "s4_centre", "ms3_centre" (SSLalignment's zero-shot evaluation, `load_spectrogram(dur=5)`
  then a centre crop of the spectrogram): every frame with the wav's centred 3 s (the
  protocol's clip, docs/protocol.md section 1).

Masks are binarised at grey >= 128 (SSLalignment's `gts[gts >= 128] = 1`) and stored at 224 x
224 (nearest-neighbour when the distributed size differs; AVSBench's are 224 x 224, as its
frames), as a 1-bit PNG in the "mask" feature (`_benchmark.decode_mask`). A mask whose size
differs from its frame's is listed as unreadable, a missing frame, wav or mask as missing:
never replaced. "boxes" holds the mask's tight box (empty for an empty mask), for cIoU in
the box protocol; it is sslocal's derivation from the mask.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from sslocal.data.builders import _benchmark
from sslocal.data.builders.base import AVBuilder, AVConfig

FRAMES_PER_VIDEO = 5
AUDIO_WINDOWS = ("second", "clip_centre")
SUBSETS = {
    "s4": {"folder": "Single-source", "csv": "s4_meta_data.csv", "data": "s4_data"},
    "ms3": {"folder": "Multi-sources", "csv": "ms3_meta_data.csv", "data": "ms3_data"},
}


@dataclasses.dataclass(eq=False)
class AVSBenchConfig(AVConfig):
    """subset: "s4" or "ms3"; split: the csv's split read (the test split has all five masks);
    audio_window: "second" (frame k with the 3 s centred on second k) or "clip_centre" (every
    frame with the wav's centred 3 s)."""

    subset: str = "s4"
    split: str = "test"
    audio_window: str = "second"


def read_metadata(path: str | os.PathLike, subset: str) -> list[dict[str, str]]:
    """The metadata csv -> [{"name", "category", "split"}] in file order. As AVSBench's
    dataloaders: the video name is column 0, the S4 category column 2 ("category" when the
    header names it), the split the column named "split"."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row and any(c.strip() for c in row)]
    if not rows:
        raise ValueError(f"{path}: empty metadata csv")
    header = [c.strip() for c in rows[0]]
    if "split" not in header:
        raise ValueError(f"{path}: the header has no 'split' column: {header}")
    split_col = header.index("split")
    category_col = header.index("category") if "category" in header else 2
    out = []
    for row in rows[1:]:
        row = [c.strip() for c in row]
        if len(row) <= split_col or (subset == "s4" and len(row) <= category_col):
            raise ValueError(f"{path}: short row {row}")
        out.append({"name": row[0], "split": row[split_col],
                    "category": row[category_col] if subset == "s4" else ""})
    return out


def subset_dir(root: str, subset: str) -> str:
    """ROOT/Single-source (S4) or ROOT/Multi-sources (MS3), or ROOT itself when it holds the
    metadata csv."""
    spec = SUBSETS[subset]
    nested = os.path.join(root, spec["folder"])
    if os.path.isfile(os.path.join(nested, spec["csv"])) or not os.path.isfile(
            os.path.join(root, spec["csv"])):
        return nested
    return root


def frame_paths(base: str, subset: str, split: str, video: dict[str, str], k: int
                ) -> dict[str, str]:
    """The frame, wav and mask of frame k of a video, in the distributed layout."""
    data = os.path.join(base, SUBSETS[subset]["data"])
    name = video["name"]
    if subset == "s4":
        cat = video["category"]
        return {"frame": os.path.join(data, "visual_frames", split, cat, name, f"{name}_{k}.png"),
                "audio": os.path.join(data, "audio_wav", split, cat, f"{name}.wav"),
                "mask": os.path.join(data, "gt_masks", split, cat, name, f"{name}_{k}.png")}
    return {"frame": os.path.join(data, "visual_frames", name, f"{name}.mp4_{k}.png"),
            "audio": os.path.join(data, "audio_wav", split, f"{name}.wav"),
            "mask": os.path.join(data, "gt_masks", split, name, f"{name}_{k}.png")}


def audio_centre(k: int, audio_window: str) -> float | None:
    """Seconds from the start of the wav the 3 s window of frame k is centred on: k - 0.5
    (the middle of second k) for "second"; None (the wav's centre) for "clip_centre"."""
    if audio_window not in AUDIO_WINDOWS:
        raise ValueError(f"unknown audio window {audio_window!r}; choose one of {AUDIO_WINDOWS}")
    return k - 0.5 if audio_window == "second" else None


def _config(subset: str, audio_window: str) -> AVSBenchConfig:
    name = subset if audio_window == "second" else f"{subset}_centre"
    frames = {"s4": "3,700 frames of the 740", "ms3": "320 frames of the 64"}[subset]
    audio = ("frame k with the 3 s centred on audio second k" if audio_window == "second"
             else "every frame with the wav's centred 3 s (SSLalignment's zero-shot input)")
    return AVSBenchConfig(name=name, test=True, subset=subset, audio_window=audio_window,
                          description=f"AVSBench {subset.upper()} test: {frames} test videos; "
                                      f"{audio}")


class Avsbench(_benchmark.LayoutInManifest, AVBuilder):
    """AVSBench S4 / MS3 test frames with binary masks (224 x 224) and the mask's box."""

    name = "avsbench"
    GT_FORMAT = "vggss"  # of "boxes" (the mask's box); the masks are the "mask" feature
    BUILDER_CONFIGS = [_config(s, w) for w in AUDIO_WINDOWS for s in SUBSETS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass root=ROOT (`sslocal prepare --dataset avsbench/s4 --root ROOT`): AVSBench's "
        "avsbench_data folder, holding Single-source/s4_meta_data.csv and s4_data/ "
        "(visual_frames, audio_wav, gt_masks), Multi-sources/ms3_meta_data.csv and ms3_data/."
    )
    _process = staticmethod(_benchmark.process_mask_frame)
    builder_config: AVSBenchConfig

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self._dataset_info(
            _benchmark.features_with({
                "mask": tfds.features.Tensor(shape=(), dtype=np.object_),
                "video_id": tfds.features.Text(),
                "frame_index": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            subset=config.subset, split=config.split, audio_window=config.audio_window,
            masks="224 x 224, grey >= 128, nearest resize; 1-bit PNG in 'mask'")

    def _jobs(self, root):
        config = self.builder_config
        spec = SUBSETS[config.subset]
        base = subset_dir(root, config.subset)
        csv_path = os.path.join(base, spec["csv"])
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(
                f"AVSBench {config.subset.upper()} metadata not found: {csv_path} (ROOT is "
                f"AVSBench's avsbench_data folder, holding {spec['folder']}/{spec['csv']})")
        videos = read_metadata(csv_path, config.subset)
        categories = sorted({v["category"] for v in videos if v["category"]})
        label_of = {c: i for i, c in enumerate(categories)}
        chosen = [v for v in videos if v["split"] == config.split]
        if self._ids is not None:  # video names; one not in the split is reported missing
            by_name = {v["name"]: v for v in chosen}
            chosen = [by_name.get(i, {"name": i, "category": "", "split": "", "unknown": True})
                      for i in self._ids]
        self._layout = {"metadata": os.path.relpath(csv_path, root), "videos": len(chosen),
                        "frames_per_video": FRAMES_PER_VIDEO, "audio_window": config.audio_window}
        jobs = []
        for video in chosen:
            for k in range(1, FRAMES_PER_VIDEO + 1):
                job: dict[str, Any] = {
                    "id": f"{video['name']}_{k}", "root": root, "image_size": config.image_size,
                    **frame_paths(base, config.subset, config.split, video, k),
                    "audio_centre": audio_centre(k, config.audio_window),
                    "label": label_of.get(video["category"], -1),
                    "extra": {"video_id": video["name"], "frame_index": k}}
                if video.get("unknown"):  # listed missing, never looked up elsewhere
                    job["missing_annotation"] = (f"{spec['csv']} (no {config.split} video of "
                                                 "this name)")
                jobs.append(job)
        return {"test": jobs}



__all__ = ["AUDIO_WINDOWS", "AVSBenchConfig", "Avsbench", "FRAMES_PER_VIDEO", "SUBSETS",
           "audio_centre", "frame_paths", "read_metadata", "subset_dir"]
