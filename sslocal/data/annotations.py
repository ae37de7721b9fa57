"""Benchmark annotations and split lists: vggss.json, SoundNet-Flickr XML, the shipped lists."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from sslocal.metrics import normalized_to_pixels
from sslocal.writers import as_path

Box = tuple[int, int, int, int]

# Split name -> file in data/metadata/ (README.md there documents the row counts).
SPLIT_FILES = {
    "vggss_10k": "vggss_10k.txt",
    "vggss_144k": "vggss_144k.txt",
    "vggss_heard": "vggss_heard.txt",
    "flickr_10k": "flickr_10k.txt",
    "flickr_144k": "flickr_144k.txt",
    "vggss_test": "vggss_test.csv",
    "vggss_heard_test": "vggss_heard_test.csv",
    "vggss_unheard_test": "vggss_unheard_test.csv",
    "flickr_test": "flickr_test.csv",
    "vggss_test_plus_silent": "vggss_test_plus_silent.csv",
    "flickr_test_plus_silent": "flickr_test_plus_silent.csv",
}
_PLUS_SILENT_HEADER = ["video", "audio", "label"]


def metadata_dir() -> Path:
    """The folder of the shipped split lists and vggss.json."""
    return Path(__file__).resolve().parent / "metadata"


def verify_metadata(directory: str | os.PathLike | None = None) -> list[str]:
    """Checks the files listed in SHA256SUMS; returns their names, ValueError on a mismatch."""
    directory = Path(directory) if directory is not None else metadata_dir()
    sums = directory / "SHA256SUMS"
    if not sums.is_file():
        raise FileNotFoundError(f"checksum file not found: {sums}")
    checked, bad = [], []
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        name = name.lstrip("*")
        path = directory / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest.lower():
            bad.append(f"{name} (checksum mismatch)")
        checked.append(name)
    if bad:
        raise ValueError(f"metadata in {directory} failed verification: {', '.join(bad)}")
    return checked


def _read_vggss_entries(json_path: str | os.PathLike | None) -> tuple[Path, list[dict]]:
    path = Path(json_path) if json_path is not None else metadata_dir() / "vggss.json"
    if not path.is_file():
        raise FileNotFoundError(f"VGG-SS annotation file not found: {path}")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse VGG-SS annotations {path}: {e}") from e
    except RecursionError as e:  # nested deeper than the parser's stack
        raise ValueError(f"cannot parse VGG-SS annotations {path}: nested too deeply") from e
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("file"), str) and "bbox" in e
        and isinstance(e.get("class", ""), str) for e in entries
    ):
        raise ValueError(f"{path}: expected a list of {{'file': clip id, 'bbox', 'class': name, "
                         "...}} objects")
    return path, entries


def load_vggss(json_path: str | os.PathLike | None = None) -> dict[str, list[Box]]:
    """vggss.json (default: the shipped one) -> {clip id: [(xmin, ymin, xmax, ymax)] in 224 px}.

    Coordinates go through `(clip(v, 0, 1) * 224).astype(int)` (protocol 6), so the 12 corrupt
    coordinates (about -2.9e16) become 0 and their boxes empty (xmax <= xmin or ymax <= ymin),
    which the box raster `gt[ymin:ymax, xmin:xmax]` leaves out. Boxes are kept as they come.
    """
    path, entries = _read_vggss_entries(json_path)
    out = {}
    for entry in entries:
        try:
            raw = np.asarray(entry["bbox"], dtype=np.float64)
        except (TypeError, ValueError) as e:  # not numbers, or ragged
            raise ValueError(f"{path}: bad boxes for {entry['file']}: {entry['bbox']}") from e
        if raw.size == 0:
            out[entry["file"]] = []
            continue
        if raw.ndim != 2 or raw.shape[1] != 4 or not np.all(np.isfinite(raw)):
            raise ValueError(f"{path}: bad boxes for {entry['file']}: {entry['bbox']}")
        pixels = np.asarray(normalized_to_pixels(raw, size=224))
        out[entry["file"]] = [tuple(int(v) for v in box) for box in pixels]
    return out


def vggss_classes(json_path: str | os.PathLike | None = None) -> dict[str, str]:
    """{clip id: class name} from vggss.json ("class")."""
    _, entries = _read_vggss_entries(json_path)
    return {e["file"]: e.get("class", "") for e in entries}


def vggss_class_names(json_path: str | os.PathLike | None = None) -> list[str]:
    """The distinct VGG-SS class names, sorted: a label is an index into this list."""
    return sorted(set(vggss_classes(json_path).values()))


def load_flickr_xml(path: str | os.PathLike) -> list[Box]:
    """A SoundNet-Flickr annotation XML -> every annotator's box in 224 px (protocol 6).

    For every element of the root, each child tagged `bbox` holds, after its first child, the
    four integers xmin, ymin, xmax, ymax (taken by position); each becomes int(224 * v / 256).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Flickr annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"cannot parse Flickr annotation XML {path}: {e}") from e
    boxes = []
    for element in root:
        for child in element:
            if child.tag != "bbox":
                continue
            values = [c.text for c in list(child)[1:]]
            if len(values) != 4:
                raise ValueError(f"{path}: a bbox holds {len(values)} values after its first "
                                 "child, expected 4 (xmin, ymin, xmax, ymax)")
            try:
                ints = [int((v or "").strip()) for v in values]
            except ValueError as e:
                raise ValueError(f"{path}: non-integer bbox coordinate in {values}") from e
            boxes.append(tuple(_flickr_to_224(v) for v in ints))
    if not boxes:
        raise ValueError(f"{path}: no bbox elements found")
    return boxes


def _flickr_to_224(v: int) -> int:
    """int(224 * v / 256) (protocol 6) in integer arithmetic: the same number wherever that
    float is exact (|v| < 2**50, far past any box), and no OverflowError for a coordinate of
    hundreds of digits (a damaged file), which the 224-px clip of the box then bounds."""
    eighths = abs(7 * v) // 8
    return eighths if v >= 0 else -eighths


def _split_path(name: str) -> Path:
    if name not in SPLIT_FILES:
        raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLIT_FILES)}")
    return metadata_dir() / SPLIT_FILES[name]


def _rows(path: str | os.PathLike) -> list[list[str]]:
    """The CSV rows of a list file whose first field is not blank (a txt is a one-column CSV).
    FileNotFoundError, or ValueError for a file that is not UTF-8 text or not CSV."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
        return [row for row in csv.reader(text.splitlines()) if row and row[0].strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    except csv.Error as e:
        raise ValueError(f"{path}: not a list of ids, one a line ({e})") from e


def read_list(path: str | os.PathLike) -> list[str]:
    """Clip ids of a list file (a local path or a gs:// URL), in file order: one a line, or a
    CSV's first column; lines whose first field is blank are skipped. FileNotFoundError, or
    ValueError for a file that is not UTF-8 text or not CSV."""
    return [row[0].strip() for row in _rows(path)]


def read_split(name: str) -> list[str]:
    """Clip ids of a shipped list (txt: one a line; csv: first column; plus_silent: "video")."""
    path = _split_path(name)
    if name.endswith("_plus_silent"):
        return [video for video, _, _ in read_plus_silent(name)]
    return read_list(path)


def read_plus_silent(name: str) -> list[tuple[str, str, str]]:
    """Rows (video id, audio id, label) of a `*_plus_silent` list (header video,audio,label)."""
    if not name.endswith("_plus_silent"):
        raise ValueError(f"{name!r} is not a plus_silent list")
    path = _split_path(name)
    rows = _rows(path)
    if not rows or [c.strip() for c in rows[0]] != _PLUS_SILENT_HEADER:
        raise ValueError(f"{path}: expected the header {','.join(_PLUS_SILENT_HEADER)}")
    out = []
    for row in rows[1:]:
        if len(row) != 3:
            raise ValueError(f"{path}: expected 3 columns, got {row}")
        out.append(tuple(c.strip() for c in row))
    return out
