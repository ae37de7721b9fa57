"""`sslocal prepare`: build a dataset's ArrayRecord files once; open prepared splits.

    sslocal prepare --dataset vggsound/144k --root ROOT [--data_dir DIR]

writes DIR/vggsound/144k/1.0.0/ (TFDS layout) and manifest.json beside it: clips requested,
found, missing (which file), unreadable (the error) and written, per split.

DIR may be a gs:// bucket (with the `gcs` extra): TFDS writes its metadata through epath, the
ArrayRecord files are written locally and uploaded (ArrayRecord's writer opens local files
only), and the Grain loader reads them in place through ArrayRecord's own GCS reader.

The manifest also records each shard's file, record count, size and sha256 (read back once
written), which `sslocal prepare --verify` checks. A split opened here (load_split) turns a
read of a damaged or missing shard into one DamagedDatasetError naming the file and how to
prepare the dataset again, never a record of garbage (ArrayRecord checks each chunk's hash).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from sslocal.data import annotations, builders
from sslocal.writers import absolute, as_path


class DamagedDatasetError(ValueError):
    """A prepared dataset's file is missing or does not read back as it was written."""


def prepare(dataset: str = "vggsound/144k", root: str | os.PathLike | None = None,
            data_dir: str | os.PathLike | None = None, *, ids: Iterable[str] | None = None,
            num_workers: int | None = None, overwrite: bool = False,
            **builder_kwargs: Any) -> dict[str, Any]:
    """Builds `dataset` ("name/config", see builders.DATASETS) from the files under `root`
    into `data_dir` (a folder or a gs:// URL; TFDS's default when None) and returns the
    manifest. `builder_kwargs` go to the builder (synthetic_av: seed, num_train, num_test).

    What can be checked comes first, before TFDS starts: the dataset name, that `root` exists.
    A dataset already prepared there is reused, and says so (with the root and the date it was
    built from), unless `overwrite`; reusing it for another `root` than it was built from is
    refused (pass `overwrite` to rebuild)."""
    builders.parse_dataset(dataset)  # an unknown name fails before anything else
    data_dir = _data_dir(data_dir)  # a gs:// one without the `gcs` extra fails here
    if root is not None and not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset}: data root not found: {root}")
    builder = builders.get_builder(dataset, data_dir=data_dir, root=root, ids=ids,
                                   num_workers=num_workers, **builder_kwargs)
    prepared = builder.is_prepared()
    if root is None and builder.NEEDS_ROOT and (overwrite or not prepared):
        raise ValueError(f"{dataset}: pass --root ROOT, the folder holding frames/ and audio/ "
                         "(or video/)")
    if prepared and not overwrite:
        manifest = builder.manifest()
        built_from = manifest.get("root")
        if (root is not None and built_from is not None
                and os.path.realpath(root) != os.path.realpath(built_from)):
            raise ValueError(f"{dataset} is already prepared in {builder.data_path} from "
                             f"{built_from}, not {root}: pass --overwrite to rebuild it from "
                             f"{root}, or another --data_dir")
        print(f"{dataset}: reusing the dataset prepared {manifest.get('created', '')} from "
              f"{built_from or 'its generator'} in {builder.data_path} (--overwrite rebuilds it)")
        _print_summary(dataset, builder, manifest)
        return manifest
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    with _sigterm_stops_the_build():
        manifest = builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(download_mode=mode))
        manifest = _record_shards(builder, manifest)
    _print_summary(dataset, builder, manifest)
    return manifest


def _sha256(path: epath.Path) -> tuple[int, str]:
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        return f.tell(), digest.hexdigest()


def _record_shards(builder: builders.AVBuilder, manifest: dict[str, Any]) -> dict[str, Any]:
    """Adds "shards" to each split of the manifest just written: [{"file", "records", "bytes",
    "sha256"}] of its ArrayRecord files, read back from where they now are; rewrites it."""
    for split, info in builder.info.splits.items():
        entry = manifest.setdefault("splits", {}).setdefault(split, {})
        entry["shards"] = []
        for path, records in zip(info.filepaths, info.shard_lengths, strict=True):
            size, digest = _sha256(epath.Path(path))
            entry["shards"].append({"file": epath.Path(path).name, "records": int(records),
                                    "bytes": size, "sha256": digest})
    (epath.Path(builder.data_path) / builders.base.MANIFEST).write_text(
        json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _again(dataset: str, builder: builders.AVBuilder, manifest: dict[str, Any]) -> str:
    """The command that prepares the dataset again where it is."""
    root = manifest.get("root")
    root = f" --root {root}" if root and builder.NEEDS_ROOT else " --root ROOT" * builder.NEEDS_ROOT
    return (f"sslocal prepare --dataset {dataset}{root} --data_dir {_root_data_dir(builder)} "
            "--overwrite")


def _root_data_dir(builder: builders.AVBuilder) -> epath.Path:
    """The --data_dir a builder was made for: data_path is DATA_DIR/name/config/version."""
    return epath.Path(builder.data_path).parents[2]


def verify(dataset: str, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """`sslocal prepare --verify`: checks a prepared dataset against what was recorded when it
    was written. Per split: the record count of dataset_info.json against the manifest's, and
    per shard that the file is there, holds its recorded number of records, and has the
    recorded size and sha256 (a dataset prepared before sha256s were recorded: every record is
    read instead, which ArrayRecord's chunk hashes check). Prints a line per split; returns
    {split: {"records", "shards", "sha256_checked"}}; DamagedDatasetError, naming every bad file
    and the command that prepares the dataset again, when anything differs.
    """
    builders.parse_dataset(dataset)
    data_dir = _data_dir(data_dir)
    builder = builders.get_builder(dataset, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(f"{dataset} is not prepared in {builder.data_dir}: nothing to "
                                "verify")
    path = epath.Path(builder.data_path) / builders.base.MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # missing, or not JSON (damaged)
        raise DamagedDatasetError(f"{dataset}: its manifest {path} does not read ({error}); "
                                  f"prepare it again: {_again(dataset, builder, {})}") from error
    problems, report = [], {}
    for split, info in builder.info.splits.items():
        entry = manifest.get("splits", {}).get(split, {})
        if entry.get("written") not in (None, info.num_examples):
            problems.append(f"{split}: dataset_info.json has {info.num_examples} records, the "
                            f"manifest {entry['written']}")
        recorded = {s["file"]: s for s in entry.get("shards", [])}
        for file, records in zip(info.filepaths, info.shard_lengths, strict=True):
            file = epath.Path(file)
            problems += _shard_problems(file, int(records), recorded.get(file.name))
        report[split] = {"records": info.num_examples, "shards": len(info.filepaths),
                         "sha256_checked": bool(recorded)}
        how = ("sizes and sha256s as recorded" if recorded
               else "no sha256s recorded (prepared before they were): every record read")
        print(f"{dataset} {split}: {info.num_examples} records in {len(info.filepaths)} "
              f"shard(s); {how}")
    if problems:
        raise DamagedDatasetError(
            f"{dataset} in {builder.data_path} is damaged: {'; '.join(problems)}. Prepare it "
            f"again: {_again(dataset, builder, manifest)}")
    print(f"{dataset}: verified, {builder.data_path} is as it was written")
    return report


def _shard_problems(file: epath.Path, records: int, recorded: dict | None) -> list[str]:
    """What is wrong with one shard (nothing: [])."""
    from array_record.python import array_record_module

    if not file.exists():
        return [f"{file.name} is missing"]
    if recorded is not None:
        size, digest = _sha256(file)
        if size != recorded["bytes"]:
            return [f"{file.name} is {size:,} bytes, {recorded['bytes']:,} when written"]
        if digest != recorded["sha256"]:
            return [f"{file.name} has other bytes than when written (sha256 differs)"]
    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(file))
        try:
            found = reader.num_records()
            if recorded is None:  # no sha256 to compare: read every record
                for start in range(0, found, 256):
                    reader.read(list(range(start, min(start + 256, found))))
        finally:
            reader.close()
    except RuntimeError as error:
        return [f"{file.name} does not read ({_one_line(error)})"]
    if found != records:
        return [f"{file.name} holds {found} records, {records} when written"]
    return []


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _data_dir(data_dir: str | os.PathLike | None) -> str | None:
    """The data_dir as TFDS takes it: a string, `~` expanded, a gs:// URL kept as one."""
    return os.fspath(as_path(data_dir)) if data_dir else None


@contextlib.contextmanager
def _sigterm_stops_the_build() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`) ends a build as an exception would: the decode workers are
    shut down and TFDS removes its incomplete folder, instead of the process dying at once and
    leaving both behind."""
    if threading.current_thread() is not threading.main_thread():  # handlers need the main one
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_summary(dataset: str, builder: builders.AVBuilder, manifest: dict) -> None:
    for split, entry in manifest.get("splits", {}).items():
        print(f"{dataset} {split}: {entry['written']} written of {entry['requested']} requested "
              f"({len(entry['missing'])} missing, {len(entry['unreadable'])} unreadable, "
              f"{len(entry['warnings'])} warnings) -> {builder.data_path}")
    overlap = {k: v for k, v in manifest.get("train_clips_in_test_lists", {}).items() if v}
    if overlap:
        print(f"{dataset} train: the list holds clips of shipped test lists ("
              + ", ".join(f"{n} of {k}" for k, n in overlap.items())
              + "), as published; the *_minus_test configs leave them out")


def load_split(dataset: str, split: str, data_dir: str | os.PathLike | None = None, *,
               root: str | os.PathLike | None = None) -> Any:
    """The random-access data source of a prepared split (tfds ArrayRecordDataSource: len(),
    [i] -> dict of numpy values). Prepares it first when it is not there and can be built
    (a root is given, or the dataset is synthetic). A split in a gs:// data_dir is read in
    place (ArrayRecord's GCS reader)."""
    data_dir = _data_dir(data_dir)
    builder = builders.get_builder(dataset, data_dir=data_dir, root=root)
    if not builder.is_prepared():
        if root is None and builder.NEEDS_ROOT:
            raise FileNotFoundError(
                f"{dataset} is not prepared in {builder.data_dir}; run `sslocal prepare "
                f"--dataset {dataset} --root ROOT --data_dir DIR` first")
        prepare(dataset, root=root, data_dir=data_dir)
        builder = builders.get_builder(dataset, data_dir=data_dir)
    sources = builder.as_data_source()
    if split not in sources:
        raise ValueError(f"{dataset} has no split {split!r}; it has {sorted(sources)}")
    try:
        manifest = builder.manifest()
    except ValueError:  # damaged: the records may still be fine (--verify says)
        manifest = {}
    return PreparedSplit(sources[split], dataset, split, _again(dataset, builder, manifest),
                         f"sslocal prepare --dataset {dataset} --data_dir "
                         f"{_root_data_dir(builder)} --verify")


# ArrayRecord's (Riegeli's) words for a shard that is missing, cut short or changed; a read that
# fails otherwise (a network error reading a bucket) is raised as it is.
_DAMAGE = ("Riegeli", "ArrayRecord file", "No such file or directory")


class PreparedSplit:
    """A prepared split as load_split returns it: the tfds ArrayRecordDataSource (len(), [i],
    dataset_info), whose reads of a damaged or missing shard raise DamagedDatasetError naming
    the file, the dataset and the command that prepares it again, in one line."""

    def __init__(self, source: Any, dataset: str, split: str, prepare_command: str,
                 verify_command: str):
        from tensorflow_datasets.core.data_sources import base as sources_base

        self.source, self.dataset, self.split = source, dataset, split
        self.prepare_command, self.verify_command = prepare_command, verify_command
        self.dataset_info = source.dataset_info
        files = sources_base.file_instructions(source.dataset_info, split)
        self._files = [f.filename for f in files]
        self._ends = list(itertools.accumulate(f.take for f in files))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.source[index]
        except RuntimeError as error:
            if not any(word in str(error) for word in _DAMAGE):
                raise
            shard = self._files[min(bisect.bisect_right(self._ends, int(index)),
                                    len(self._files) - 1)]
            raise DamagedDatasetError(
                f"{shard}: record {index} of {self.dataset} {self.split} does not read "
                f"({_one_line(error)}): the prepared dataset is damaged, prepare it again: "
                f"{self.prepare_command} (or list every damaged file: {self.verify_command})"
            ) from error


def gt_format(dataset: str) -> str:
    """The ground-truth map format ("flickr" or "vggss") of a dataset's boxes."""
    cls, _ = builders.parse_dataset(dataset)
    return cls.GT_FORMAT


def image_size(dataset: str) -> int:
    """S, the frame size the dataset's frames are stored for."""
    cls, config = builders.parse_dataset(dataset)
    return next(c.image_size for c in cls.BUILDER_CONFIGS if c.name == config)


class SubsetSource:
    """A prepared split restricted to some of its records, in the given order (random access
    like the tfds source it wraps)."""

    def __init__(self, source: Any, indices: list[int]):
        self.source, self.indices = source, list(indices)
        self.dataset_info = source.dataset_info

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[self.indices[i]]


def restrict_to_ids(source: Any, ids_file: str | os.PathLike, dataset: str
                    ) -> tuple[SubsetSource, dict[str, Any]]:
    """A test set restricted to the clip ids of a list file (one id a line; a csv's first
    column), e.g. the 4,911- or 4,654-clip VGG-SS subsets of later papers. Returns the subset
    and what every result file records: the list's name, path, size and sha256, how many of
    its ids the prepared set holds, and every id it lacks (never dropped silently)."""
    path = as_path(ids_file)
    if not path.is_file():
        raise FileNotFoundError(f"test id list not found: {path}")
    raw = path.read_bytes()
    listed = list(dict.fromkeys(annotations.read_list(path)))  # order kept, duplicates once
    from sslocal.data.pipeline import record_id

    position = {record_id(source[i]): i for i in range(len(source))}
    missing = [i for i in listed if i not in position]
    indices = [position[i] for i in listed if i in position]
    if not indices:
        raise ValueError(f"none of the {len(listed)} ids of {path} is in the prepared {dataset}")
    info = {"name": path.name, "path": os.fspath(absolute(path)), "size": len(listed),
            "sha256": hashlib.sha256(raw).hexdigest(), "N_found": len(indices),
            "N_missing": len(missing), "missing": missing}
    return SubsetSource(source, indices), info
