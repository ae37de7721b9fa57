"""Annotations, split lists and metadata checksums (protocol 6, data/metadata/README.md)."""

import json
import re
import shutil

import numpy as np
import pytest

from sslocal.data import annotations as an


def _readme_counts():
    """{file name: rows} parsed from the table of metadata/README.md."""
    counts = {}
    for line in (an.metadata_dir() / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.match(r"^[\d,]+", cells[1]):
            continue
        files = [f.strip() for f in cells[0].split(",")]
        rows = [int(re.match(r"[\d,]+", r.strip()).group().replace(",", ""))
                for r in cells[1].split("/")]
        if len(rows) == 1:
            rows = rows * len(files)
        counts.update(zip(files, rows, strict=True))
    return counts


def test_checksums_verify_and_a_modified_copy_fails(tmp_path):
    names = an.verify_metadata()
    assert len(names) == 12 and "vggss.json" in names
    copy = tmp_path / "metadata"
    shutil.copytree(an.metadata_dir(), copy)
    assert an.verify_metadata(copy) == names
    (copy / "flickr_test.csv").chmod(0o644)
    with open(copy / "flickr_test.csv", "a") as f:
        f.write("123,0\n")
    with pytest.raises(ValueError, match="flickr_test.csv"):
        an.verify_metadata(copy)
    (copy / "flickr_test.csv").unlink()
    with pytest.raises(ValueError, match="missing"):
        an.verify_metadata(copy)


def test_split_row_counts_match_the_readme():
    counts = _readme_counts()
    assert len(counts) == 12
    for name, file in an.SPLIT_FILES.items():
        ids = an.read_split(name)
        assert len(ids) == counts[file], name
        assert all(i and i == i.strip() and "," not in i for i in ids), name
    assert an.read_split("flickr_test")[:2] == ["10000130166", "10007936344"]
    assert an.read_split("vggss_test")[0] == "zpWuikVorYg_000032"
    assert an.read_split("vggss_heard_test")[-1] == "0bobzCB2ObQ_000076"
    assert len(set(an.read_split("vggss_144k"))) == 144000
    with pytest.raises(ValueError, match="unknown split"):
        an.read_split("vggss_typo")


def test_plus_silent_rows():
    rows = an.read_plus_silent("flickr_test_plus_silent")
    assert len(rows) == 250
    assert rows[0] == ("10000130166", "10437048305", "non-sounding")
    assert all(len(r) == 3 for r in rows)
    assert len(an.read_plus_silent("vggss_test_plus_silent")) == 5158
    with pytest.raises(ValueError):
        an.read_plus_silent("flickr_test")


def test_vggss_boxes_and_corrupt_entries():
    boxes = an.load_vggss()
    assert len(boxes) == _readme_counts()["vggss.json"] == 5158
    raw = json.loads((an.metadata_dir() / "vggss.json").read_text())
    corrupt = 0
    for entry in raw:
        expected = [tuple(int(v) for v in (np.clip(b, 0, 1) * 224).astype(int))
                    for b in np.asarray(entry["bbox"], np.float64)]
        assert boxes[entry["file"]] == expected
        for b, box in zip(entry["bbox"], boxes[entry["file"]], strict=True):
            if min(b) < -1e6:
                corrupt += 1
                assert box[2] <= box[0] or box[3] <= box[1]  # empty after clipping
            assert all(isinstance(v, int) and 0 <= v <= 224 for v in box)
    assert corrupt == 12
    first = boxes["zpWuikVorYg_000032"]  # [0.403125, 0.253125, 0.6, 0.75] by hand
    assert first == [(90, 56, 134, 168)]
    assert set(boxes) == set(an.read_split("vggss_test"))


def test_vggss_classes():
    classes = an.vggss_classes()
    assert classes["zpWuikVorYg_000032"] == "elk bugling"
    names = an.vggss_class_names()
    assert names == sorted(set(classes.values())) and len(names) == 221


def test_vggss_custom_json_and_errors(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"file": "x", "class": "c", "bbox": [[0.5, -0.1, 1.2, 0.25]]},
                                {"file": "y", "class": "c", "bbox": []}]))
    assert an.load_vggss(path) == {"x": [(112, 0, 224, 56)], "y": []}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="a.json"):
        an.load_vggss(path)
    path.write_text(json.dumps([{"file": "x", "bbox": [[0.1, 0.2, 0.3]]}]))
    with pytest.raises(ValueError, match="bad boxes"):
        an.load_vggss(path)
    with pytest.raises(FileNotFoundError):
        an.load_vggss(tmp_path / "none.json")


FLICKR_XML = """<annotation>
  <filename>123.jpg</filename>
  <object>
    <bbox><name>ann1</name><x0>10</x0><y0>20</y0><x1>128</x1><y1>255</y1></bbox>
    <bbox><name>ann2</name><a> 0 </a><b>1</b><c>256</c><d>100</d></bbox>
    <other>9</other>
  </object>
  <object>
    <bbox><id>3</id><xmin>37</xmin><ymin>73</ymin><xmax>199</xmax><ymax>200</ymax></bbox>
  </object>
</annotation>"""


def test_flickr_xml(tmp_path):
    path = tmp_path / "123.xml"
    path.write_text(FLICKR_XML)
    # int(224 * v / 256) by hand: 10 -> 8, 20 -> 17, 128 -> 112, 255 -> 223, 1 -> 0, 256 -> 224,
    # 100 -> 87, 37 -> 32, 73 -> 63, 199 -> 174, 200 -> 175.
    assert an.load_flickr_xml(path) == [(8, 17, 112, 223), (0, 0, 224, 87), (32, 63, 174, 175)]


def test_flickr_xml_errors(tmp_path):
    empty = tmp_path / "empty.xml"
    empty.write_text("<annotation><object><name>x</name></object></annotation>")
    with pytest.raises(ValueError, match="no bbox"):
        an.load_flickr_xml(empty)
    broken = tmp_path / "broken.xml"
    broken.write_text("<annotation><object><bbox>")
    with pytest.raises(ValueError, match="broken.xml"):
        an.load_flickr_xml(broken)
    short = tmp_path / "short.xml"
    short.write_text("<a><o><bbox><n/><x>1</x><y>2</y><z>3</z></bbox></o></a>")
    with pytest.raises(ValueError, match="expected 4"):
        an.load_flickr_xml(short)
    with pytest.raises(FileNotFoundError):
        an.load_flickr_xml(tmp_path / "none.xml")
