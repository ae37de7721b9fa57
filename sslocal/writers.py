"""Where sslocal writes: URL-aware paths (a local folder or a gs:// bucket), metrics to
TensorBoard (tensorboardX: clu's writers import TensorFlow) and JSON lines, progress bars.

Every path a user gives goes through `as_path`: an `etils.epath.Path`, the path type Orbax and
TFDS use, so a `gs://bucket/dir` stays a URL (pathlib.Path would fold it into a local `gs:/bucket`
folder) and local paths work as before (with `~` expanded). gs:// goes through gcsfs (epath's
fsspec backend), TensorStore's GCS driver (Orbax arrays) and ArrayRecord's own GCS reader (the
prepared datasets), and needs the `gcs` extra: `pip install sslocal[gcs]`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from etils import epath
from tqdm import tqdm

GCS_EXTRA = "pip install sslocal[gcs]"
# What the extra brings that a gs:// path needs: gcsfs (epath's fsspec backend, used by TFDS,
# Orbax's metadata, sslocal's own files). TensorStore and ArrayRecord reach GCS on their own.
GCS_MODULES = ("gcsfs",)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# pathlib.Path("gs://b/x") is PosixPath("gs:/b/x"): such a string is a folded URL, not a folder.
_FOLDED_GS = re.compile(r"^gs:/(?!/)")

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for "scheme://..." paths (gs://bucket/dir), False for local ones."""
    return _URL.match(os.fspath(path)) is not None


def check_gcs_extra(path: PathLike) -> None:
    """Raises ImportError, naming the extra, when `path` is a gs:// URL and the `gcs` extra is
    not installed; ValueError for URL schemes other than gs://."""
    text = os.fspath(path)
    match = _URL.match(text)
    if match is None:
        return
    if match.group(1) != "gs":
        raise ValueError(f"{text}: sslocal reads and writes local paths and gs:// URLs only")
    missing = [m for m in GCS_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{text} is a gs:// path, which needs `{GCS_EXTRA}` "
                          f"({', '.join(missing)} is not installed)")


def as_path(path: PathLike) -> epath.Path:
    """The URL-aware path of anything a user gives: gs://... stays a URL (checked for the
    `gcs` extra), a `gs:/...` string (a URL that went through pathlib.Path) is turned back into
    one instead of becoming a local `gs:` folder, and a local path has `~` expanded."""
    text = os.fspath(path)
    if _FOLDED_GS.match(text):
        text = "gs://" + text[len("gs:/"):]
    if is_url(text):
        check_gcs_extra(text)
        return epath.Path(text)
    return epath.Path(os.path.expanduser(text))


def absolute(path: PathLike) -> epath.Path:
    """`as_path(path)`, made absolute when local (epath's absolute() would turn a URL into a
    local path under the working directory)."""
    path = as_path(path)
    return path if is_url(path) else path.absolute()


def check_paths(*paths: PathLike | None) -> None:
    """`as_path` on every given path: a gs:// path without the extra fails here, in one line,
    before anything runs."""
    for path in paths:
        if path:
            as_path(path)


def append_text(path: PathLike, text: str) -> None:
    """Appends to a text file. Cloud objects cannot be appended to: a bucket's file is read
    and written back whole (these are small record files)."""
    path = as_path(path)
    if not is_url(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    old = path.read_text() if path.exists() else ""
    path.write_text(old + text)


def upload(local: PathLike, target: PathLike) -> None:
    """Copies the local file `local` to `target` (a local path or a URL)."""
    with open(local, "rb") as src, as_path(target).open("wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)


@contextlib.contextmanager
def local_file(path: PathLike, suffix: str = "") -> Iterator[str]:
    """A local file name holding the file at `path`: the path itself when local, else a
    temporary copy (for readers that only open local files: FFmpeg, soundfile). Removed after."""
    path = as_path(path)
    if not is_url(path):
        yield os.fspath(path)
        return
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with tempfile.TemporaryDirectory(prefix="sslocal_in_") as folder:
        local = os.path.join(folder, "input" + (suffix or "".join(path.suffixes)))
        with path.open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        yield local


@contextlib.contextmanager
def staged_file(path: PathLike, suffix: str = "") -> Iterator[str]:
    """A local file name to write what belongs at `path`: the path itself when local, else a
    temporary file uploaded to `path` when the block ends without an error (for writers that
    only write local files: ArrayRecord, FFmpeg)."""
    path = as_path(path)
    if not is_url(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="sslocal_out_") as folder:
        local = os.path.join(folder, "output" + (suffix or "".join(path.suffixes)))
        yield local
        upload(local, path)


class MetricWriter:
    """Scalars to `workdir/tb` and `workdir/metrics.jsonl`; silent on processes other than 0.

    In a bucket, both are written in a local staging folder (the existing metrics.jsonl read
    into it first, so that a resumed run appends) and uploaded whole, at most every
    `sync_seconds` and on close: a cloud object cannot be appended to, and tensorboardX's own
    gs:// writer needs google-cloud-storage, a GCP project in the environment, and retries an
    upload from its finaliser for two minutes once the network is gone.
    """

    def __init__(self, workdir: PathLike, enabled: bool = True, sync_seconds: float = 30.0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._workdir = as_path(workdir)
        self._remote = is_url(self._workdir)
        self._sync_seconds = sync_seconds
        self._last_sync = time.monotonic()
        local = self._workdir
        self._staging = None
        if self._remote:
            self._staging = tempfile.mkdtemp(prefix="sslocal_metrics_")
            local = epath.Path(self._staging)
            remote_jsonl = self._workdir / "metrics.jsonl"
            if remote_jsonl.exists():
                (local / "metrics.jsonl").write_bytes(remote_jsonl.read_bytes())
        self._local = local
        self._tb = SummaryWriter(os.fspath(local / "tb"))
        self._jsonl = open(local / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        tag = f"{prefix}/" if prefix else ""
        for name, value in scalars.items():
            self._tb.add_scalar(tag + name, value, step)
        self._jsonl.write(json.dumps({"step": step, **{tag + k: v for k, v in scalars.items()}})
                          + "\n")
        self._jsonl.flush()
        if self._remote and time.monotonic() - self._last_sync >= self._sync_seconds:
            self._sync()

    def _sync(self, flush: bool = True) -> None:
        """Uploads metrics.jsonl and the event files (whole: objects are immutable)."""
        if flush:
            self._tb.flush()
        upload(self._local / "metrics.jsonl", self._workdir / "metrics.jsonl")
        for event_file in (self._local / "tb").iterdir():
            upload(event_file, self._workdir / "tb" / event_file.name)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self._tb.close()
        self._jsonl.close()
        if self._remote:
            try:
                self._sync(flush=False)  # closing flushed the events
            finally:
                shutil.rmtree(self._staging, ignore_errors=True)


def progress(**kwargs: Any) -> tqdm:
    """A progress bar on stderr that stays quiet when stderr is not a terminal."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0 if sys.stderr.isatty() else 30.0)
    return tqdm(**kwargs)
