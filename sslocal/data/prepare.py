"""`sslocal prepare`: build a dataset's ArrayRecord files once; open prepared splits.

    sslocal prepare --dataset vggsound/144k --root ROOT [--data_dir DIR]

writes DIR/vggsound/144k/1.0.0/ (TFDS layout) and manifest.json beside it: clips requested,
found, missing (which file), unreadable (the error) and written, per split.

DIR may be a gs:// bucket (with the `gcs` extra): TFDS writes its metadata through epath, the
ArrayRecord files are written locally and uploaded (ArrayRecord's writer opens local files
only), and the Grain loader reads them in place through ArrayRecord's own GCS reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import tensorflow_datasets as tfds

from sslocal.data import builders
from sslocal.writers import absolute, as_path


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
    _print_summary(dataset, builder, manifest)
    return manifest


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
    return sources[split]


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
    listed = [line.split(",")[0].strip() for line in raw.decode("utf-8").splitlines()]
    listed = list(dict.fromkeys(i for i in listed if i))  # order kept, duplicates once
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
