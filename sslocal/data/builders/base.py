"""The shared TFDS builder: features, parallel generation over clips, and the manifest.

A subclass says which clips a split holds (`_jobs`); this class turns them into examples with
`_clips.process_clip` on every core, skips and reports what is missing or unreadable, and
writes `manifest.json` beside the ArrayRecord files. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import inspect
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import utils as tfds_utils
from tqdm.auto import tqdm

from sslocal.data import annotations
from sslocal.data.builders import _clips
from sslocal.protocol import SPEC_SHAPE, TRAIN_SCALE
from sslocal.writers import staged_file

MANIFEST = "manifest.json"
MIN_CLIPS_PER_WORKER = 64  # a spawned worker takes seconds to start (imports)


@dataclasses.dataclass(eq=False)
class AVConfig(tfds.core.BuilderConfig):
    """One dataset variant.

    split_list: the shipped list (annotations.read_split) the split is drawn from; None: every
      clip on disk. test: the config holds a test split, whose frames are stored for
      evaluation (S x S PNG, and the center-crop variant).
    image_size: S. plus_silent: a `*_plus_silent` list whose non-sounding pairs are added.
    exclude_test_clips: the training split leaves out every clip of a shipped test list
      (TEST_LISTS). The published training lists hold test clips (vggss_144k: 3,709 VGG-SS
      test clips); the papers train on them as they are, so the plain configs keep them.
    """

    split_list: str | None = None
    test: bool = False
    image_size: int = 224
    plus_silent: str | None = None
    exclude_test_clips: bool = False


# The shipped test lists a training split is checked against (`sslocal prepare` reports the
# overlap; configs with exclude_test_clips leave it out).
TEST_LISTS = ("vggss_test", "vggss_heard_test", "vggss_unheard_test", "flickr_test")


def test_list_ids() -> dict[str, set[str]]:
    return {name: set(annotations.read_split(name)) for name in TEST_LISTS}


def features(test: bool) -> tfds.features.FeaturesDict:
    """The example features (docs/design.md). Test sets also hold the center-crop frame variant."""
    spec = {
        "id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        # Raw float16 bytes: TFDS would otherwise store a float32 list (twice the size, and
        # a slow list -> array conversion on every read).
        "spectrogram": tfds.features.Tensor(shape=SPEC_SHAPE, dtype=np.float16,
                                            encoding=tfds.features.Encoding.BYTES),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        "sounding": tfds.features.Tensor(shape=(), dtype=np.bool_),
    }
    if test:
        spec["image_center_crop"] = tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.features.FeaturesDict(spec)


class _UncompressedArrayRecord(file_adapters.ArrayRecordFileAdapter):
    """TFDS's ArrayRecord adapter, writing records uncompressed.

    TFDS writes zstd: on these records (JPEG bytes and float16 noise) it saves ~30% of the disk
    but costs 0.2 ms per read, the training loader's largest cost after the JPEG decode.
    Readers detect the options from the file, so nothing else changes. ArrayRecord's writer
    opens local files only: a file for a gs:// data_dir is written locally and uploaded (its
    reader does read gs:// in place).
    """

    @classmethod
    def write_examples(cls, path, iterator):
        with staged_file(path, suffix=".array_record") as local:
            writer = array_record_module.ArrayRecordWriter(local, "group_size:1,uncompressed")
            try:
                for _, serialized_example in iterator:
                    writer.write(serialized_example)
            finally:
                writer.close()


@contextlib.contextmanager
def _uncompressed_array_record() -> Iterator[None]:
    """TFDS picks its writer from a module-level table when a split is written: swap in the
    uncompressed adapter for the duration of one build."""
    formats = file_adapters.ADAPTER_FOR_FORMAT
    fmt = file_adapters.FileFormat.ARRAY_RECORD
    original = formats[fmt]
    formats[fmt] = _UncompressedArrayRecord
    try:
        yield
    finally:
        formats[fmt] = original


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], num_workers: int) -> Iterator:
    """fn over items in order, on num_workers processes (in-process when <= 1).

    At most a few jobs per worker are in flight, so results never pile up in memory while
    the TFDS writer is slower than the workers.
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold JAX or grain threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        try:
            items = iter(items)
            first = itertools.islice(items, 4 * num_workers)
            pending = collections.deque(pool.submit(fn, x) for x in first)
            while pending:
                result = pending.popleft().result()
                for x in itertools.islice(items, 1):
                    pending.append(pool.submit(fn, x))
                yield result
        except BaseException:  # stopped (SIGTERM, Ctrl-C, an error): no queued clip starts
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# -- job lists shared by the builders ----------------------------------------------------

def train_jobs(root: str, split_list: str | None, ids: list[str] | None, image_size: int,
               exclude_test_clips: bool = False) -> list[dict[str, Any]]:
    """Jobs of a training split: `ids`, else the shipped list, else every clip under root;
    without the clips of every shipped test list when `exclude_test_clips`."""
    if ids is None:
        ids = annotations.read_split(split_list) if split_list else _clips.ids_on_disk(root)
    if exclude_test_clips:
        test_ids = set().union(*test_list_ids().values())
        ids = [i for i in ids if i not in test_ids]
    return [_clips.make_job(i, root, image_size=image_size, test=False, sounding=True)
            for i in ids]


def silent_jobs(root: str, pairs: list[tuple[str, str, str]], image_size: int) -> list[dict]:
    """Jobs of the non-sounding pairs of a plus_silent list: the frame of `video` with the audio
    of `audio`, no box. Rows labelled otherwise are left to the sounding test list."""
    return [_clips.make_job(f"{video}+{audio}", root, image_size=image_size, test=True,
                            frame_id=video, audio_id=audio, sounding=False, boxes=[])
            for video, audio, label in pairs if label.strip() == "non-sounding"]


class AVBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the sslocal builders. Constructor arguments beyond TFDS's:

    root: the folder holding frames/, audio/ (or video/) and Annotations/ (default: TFDS's
      manual_dir). ids: replaces the config's split list (tests, subsets). silent_pairs:
      replaces the rows of the plus_silent list, [(video id, audio id, label)].
      num_workers: processes for decoding (default: every core, at most one per 64 clips).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    GT_FORMAT = "vggss"
    NEEDS_ROOT = True  # False for builders that make their own clips
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass root=ROOT (`sslocal prepare --root ROOT`): ROOT/frames/<id>.jpg and "
        "ROOT/audio/<id>.wav (or ROOT/video/<id>.mp4), and ROOT/Annotations/<id>.xml for "
        "SoundNet-Flickr test."
    )
    builder_config: AVConfig

    def __init__(self, *, root: str | os.PathLike | None = None, ids: Iterable[str] | None = None,
                 silent_pairs: Iterable[tuple[str, str, str]] | None = None,
                 num_workers: int | None = None, **kwargs: Any):
        self._root = os.fspath(root) if root is not None else None
        self._ids = list(ids) if ids is not None else None
        self._silent_pairs = list(silent_pairs) if silent_pairs is not None else None
        self._num_workers = num_workers
        self._manifest: dict[str, Any] | None = None
        super().__init__(**kwargs)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup needs the importlib_resources backport for classes inside a
        # package; the source file is all it wants.
        return epath.Path(inspect.getfile(cls))

    # -- what a subclass provides ---------------------------------------------------------

    def _jobs(self, root: str | None) -> dict[str, list[dict[str, Any]]]:
        """Split name -> the work items (`_clips.make_job`) of its clips, in list order."""
        raise NotImplementedError

    _process = staticmethod(_clips.process_clip)

    def _plus_silent_jobs(self, root: str | None) -> list[dict[str, Any]]:
        """The non-sounding pairs of the config's plus_silent list (none without one)."""
        config = self.builder_config
        if not config.plus_silent:
            return []
        pairs = (self._silent_pairs if self._silent_pairs is not None
                 else annotations.read_plus_silent(config.plus_silent))
        return silent_jobs(root, pairs, config.image_size)

    # -- TFDS hooks -------------------------------------------------------------------------

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(features(self.builder_config.test))

    def _dataset_info(self, feature_dict: tfds.features.FeaturesDict,
                      **metadata: Any) -> tfds.core.DatasetInfo:
        """The DatasetInfo of these features, with the frame-storage metadata every sslocal
        dataset records, plus `metadata` (what a builder adds)."""
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip().splitlines()[0],
            features=feature_dict,
            metadata=tfds.core.MetadataDict(
                image_size=config.image_size, gt_format=self.GT_FORMAT, test=config.test,
                train_frames=f"shorter side int({TRAIN_SCALE} * S), JPEG q"
                             f"{_clips.JPEG_QUALITY}",
                test_frames="S x S bicubic squash, PNG; image_center_crop: shorter side S, "
                            "centre crop, PNG", **metadata),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = self._root
        if root is None and self.NEEDS_ROOT:
            root = os.fspath(dl_manager.manual_dir)
        if root is not None and not os.path.isdir(root):
            raise FileNotFoundError(f"data root not found: {root}")
        jobs = self._jobs(root)
        self._manifest = {
            "dataset": f"{self.name}/{self.builder_config.name}", "version": str(self.version),
            "root": root, "data_dir": os.fspath(self.data_path),
            "image_size": self.builder_config.image_size,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "splits": {},
        }
        if "train" in jobs and not self.builder_config.test:
            requested = {job["id"] for job in jobs["train"]}
            self._manifest["train_clips_in_test_lists"] = {
                name: len(requested & ids) for name, ids in test_list_ids().items()}
            self._manifest["exclude_test_clips"] = self.builder_config.exclude_test_clips
        return {split: self._generate_examples(split, split_jobs)
                for split, split_jobs in jobs.items()}

    def _generate_examples(self, split: str, jobs: list[dict[str, Any]]):
        entry = {"requested": len(jobs), "found": 0, "written": 0, "missing": [],
                 "unreadable": [], "warnings": [], "duplicates": []}
        self._manifest["splits"][split] = entry
        seen, unique = set(), []
        for job in jobs:
            if job["id"] in seen:
                entry["duplicates"].append(_clips.printable(job["id"]))
            else:
                seen.add(job["id"])
                unique.append(job)
        entry["requested"] = len(unique)
        bar = tqdm(total=len(unique), desc=f"{self.name}/{self.builder_config.name} {split}",
                   unit="clip")
        workers = self._num_workers
        if workers is None:  # every core, unless too few clips repay starting the processes
            workers = min(os.cpu_count() or 1, max(1, len(unique) // MIN_CLIPS_PER_WORKER))
        written = 0
        for result in parallel_map(self._process, unique, workers):
            bar.update(1)
            status = result["status"]
            if status == "missing":
                entry["missing"].append({"id": _clips.printable(result["id"]),
                                         "files": result["files"]})
                continue
            entry["found"] += 1
            if status == "unreadable":
                entry["unreadable"].append({k: result[k] for k in ("id", "file", "error")})
                continue
            entry["warnings"] += [{"id": result["id"], "warning": w} for w in result["warnings"]]
            example = result["example"]
            if self.builder_config.test:  # a train split beside a test split (synthetic)
                example.setdefault("image_center_crop", b"")
            written += 1
            yield result["id"], example
        bar.close()
        entry["written"] = written
        if written == 0:
            path = self._write_manifest(failed=True)
            raise ValueError(
                f"{self.name}/{self.builder_config.name}: no usable clip for split {split!r} "
                f"({entry['requested']} requested, {len(entry['missing'])} missing, "
                f"{len(entry['unreadable'])} unreadable; root={self._manifest['root']}). "
                f"Details: {path}")

    def _write_manifest(self, failed: bool = False) -> epath.Path:
        folder = epath.Path(self.data_path)
        if failed:  # the version folder does not exist when generation fails
            folder = folder.parent
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ("manifest.failed.json" if failed else MANIFEST)
        path.write_text(json.dumps(self._manifest, indent=2) + "\n", encoding="utf-8")
        return path

    def is_prepared(self) -> bool:
        """TFDS's check, without its warning for a version folder that holds no
        dataset_info.json (a build that failed or was interrupted): that is "not prepared"."""
        info = epath.Path(self.data_path) / "dataset_info.json"
        return info.is_file() and super().is_prepared()

    def download_and_prepare(self, **kwargs: Any) -> dict[str, Any]:
        """TFDS's download_and_prepare, then the manifest: written when this call generated
        the data, read back when the data was already there."""
        self._manifest = None
        with _uncompressed_array_record():
            super().download_and_prepare(**kwargs)
        if self._manifest is not None:
            self._manifest["data_dir"] = os.fspath(self.data_path)
            for split, entry in self._manifest["splits"].items():
                entry["written"] = self.info.splits[split].num_examples
            self._write_manifest()
        return self.manifest()

    def manifest(self) -> dict[str, Any]:
        """The manifest of the prepared data ({} when it has none)."""
        path = epath.Path(self.data_path) / MANIFEST
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
