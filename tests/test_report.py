"""report.html: sample selection, overlays pixel by pixel, links that resolve, real PNG plots,
models side by side (hand-made records with an oracle map, and two real checkpoints)."""

import functools
import io
import os
import re
from pathlib import Path

import matplotlib
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import tiny
from sslocal import baselines, checkpointing, evaluate, evaluator, metrics, report, sharding
from sslocal.data import builders, prepare
from sslocal.models import factory, load

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_PIXELS = (500, 360)  # report.PLOT_SIZE (5 x 3.6 in) at report.PLOT_DPI (100)
FAKE_SET = "fake/set"


def jet(value):
    return np.asarray(matplotlib.colormaps["jet"](value)[:3]) * 255.0


def png_bytes(frame):
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def linked_files(html):
    return re.findall(r'(?:src|href)="([^"#][^"]*)"', html)


def check_links(out, html):
    links = linked_files(html)
    assert links
    for link in links:
        assert "://" not in link and not link.startswith("/"), link  # relative: no server
        assert (out / link).is_file(), link


def check_png(path, size):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size == size


def frame_ids(html):
    return re.findall(r'<img src="overlays/[^"]*-frame\.png" alt="([^"]+)"', html)


def rows(html):
    return re.findall(r'<div class="row">(.*?)</div>', html)


# ------------------------------------------------------------------------ sample selection

# Hand-made cIoU of 12 sounding samples; sorted descending: 1, 8, 3, 11, 6, 10, 0, 7, 4, 9, 2, 5.
CIOUS = np.array([0.50, 0.91, 0.12, 0.77, 0.33, 0.05, 0.64, 0.40, 0.88, 0.21, 0.55, 0.70])
SILENT_CONF = np.array([0.3, 0.9, 0.6])  # samples 12, 13, 14: non-sounding


def test_select_samples_exact():
    cious = np.concatenate([CIOUS, np.zeros(3)])
    sounding = np.arange(15) < 12
    confidence = np.concatenate([np.linspace(0, 1, 12), SILENT_CONF])
    groups = report.select_samples(cious, sounding, confidence, per_group=3)
    assert groups == {"best": [1, 8, 3], "median": [6, 10, 0], "worst": [5, 2, 9],
                      report.SILENT_GROUP: [13, 14, 12]}
    # per_group 1: the median is the sample at position (12 - 1) // 2 = 5 of the order.
    assert report.select_samples(CIOUS, np.ones(12, bool), np.zeros(12), 1) == {
        "best": [1], "median": [10], "worst": [5]}


def test_select_samples_ties_and_small_sets():
    # Ties are broken by index; 4 samples allow one per group.
    assert report.select_samples([0.5, 0.5, 0.5, 0.5], [True] * 4, [0] * 4, 3) == {
        "best": [0], "median": [1], "worst": [3]}
    assert report.select_samples([0.2], [True], [0.0], 3) == {"best": [0]}
    assert report.select_samples([0.2, 0.7], [True, True], [0, 0], 3) == {
        "best": [1], "worst": [0]}
    assert report.select_samples([0.0, 0.0], [False, False], [0.1, 0.2], 3) == {
        report.SILENT_GROUP: [1, 0]}
    with pytest.raises(ValueError, match="lengths differ"):
        report.select_samples([0.1, 0.2], [True], [0.0, 0.0])
    with pytest.raises(ValueError, match="per_group"):
        report.select_samples([0.1], [True], [0.0], per_group=0)


# --------------------------------------------------------------------------------- overlays


def test_overlay_pixels():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    heat = np.zeros((224, 224))
    heat[:, 112:] = 1.0
    boxes = np.array([[20.0, 30.0, 100.0, 90.0], [150.0, 150.0, 150.0, 200.0]])  # 2nd: empty
    image = np.asarray(report.overlay_image(frame, heat, boxes, caption="clip  cIoU 0.5"))
    assert image.shape == (224 + report.CAPTION_HEIGHT, 224, 3)
    expected = np.round(0.5 * frame + 0.5 * np.where(heat[..., None] > 0, jet(1.0), jet(0.0)))
    away = np.ones((224, 224), bool)
    away[28:92, 18:102] = False  # the box outline and its black edge
    np.testing.assert_allclose(image[:224][away], expected[away], atol=0.51)
    # White outline on the box's end-exclusive edges: rows 30 and 89, columns 20 and 99.
    assert (image[30, 20:100] == 255).all() and (image[89, 20:100] == 255).all()
    assert (image[30:90, 20] == 255).all() and (image[30:90, 99] == 255).all()
    assert (image[29, 19:101] == 0).all()  # the black edge just outside
    np.testing.assert_allclose(image[60, 60], expected[60, 60], atol=0.51)  # box interior
    # The caption strip holds dark text pixels on white.
    strip = image[224:]
    assert strip.max() == 255 and strip.min() < 100
    # Without a map: the frame itself, outside the outline.
    plain = np.asarray(report.overlay_image(frame, None, boxes))
    assert plain.shape == (224, 224, 3)
    np.testing.assert_array_equal(plain[away], frame[away])
    with pytest.raises(ValueError, match="uint8"):
        report.overlay_image(frame[:100], heat)
    with pytest.raises(ValueError, match="does not match"):
        report.overlay_image(frame, heat[:10])


def test_mask_outline_and_its_overlay():
    """AVSBench frames show the mask's outline (white, 2 px inside its edge), not a box."""
    mask = np.zeros((224, 224), bool)
    mask[50:60, 40:80] = True
    mask[60:100, 40:50] = True  # an L: its box would cover what the outline does not
    outline = report.mask_outline(mask)
    expected = mask.copy()
    expected[52:58, 42:78] = False  # the erosion of the upper bar by 2 px ...
    expected[52:98, 42:48] = False  # ... and of the lower bar
    np.testing.assert_array_equal(outline, expected)
    frame = np.full((224, 224, 3), 40, np.uint8)
    image = np.asarray(report.overlay_image(frame, None, mask=mask))
    assert (image[outline] == 255).all() and (image[~outline] == 40).all()
    with pytest.raises(ValueError, match="mask"):
        report.overlay_image(frame, None, mask=mask[:100])


# ------------------------------------------------- hand-made records with an oracle model


def gt_of(boxes):
    gt = np.zeros((224, 224), np.float32)
    for xmin, ymin, xmax, ymax in np.asarray(boxes).reshape(-1, 4).astype(int):
        gt[ymin:ymax, xmin:xmax] = 1.0
    return gt


@pytest.fixture(scope="module")
def fake_set():
    """15 records (12 sounding with one box, 3 non-sounding), noise frames; the spectrogram
    holds the record's index so that an oracle map function knows which sample it sees."""
    rng = np.random.default_rng(1)
    records, frames = [], []
    for i in range(15):
        frame = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        sounding = i < 12
        boxes = (np.array([[10 + 5 * i, 40, 130 + 5 * i, 170]], np.float32) if sounding
                 else np.zeros((0, 4), np.float32))
        records.append({"id": f"clip{i:02d}".encode(), "image": png_bytes(frame),
                        "spectrogram": np.full((257, 200), i, np.float16), "boxes": boxes,
                        "sounding": sounding, "label": 0})
        frames.append(frame)
    return records, frames


def oracle_maps(records, inverse=False):
    def maps(frames, spec):  # Evaluator.maps' signature: stored frames and spectrograms
        index = np.round(np.asarray(spec[:, 0, 0, 0], np.float64)).astype(int)
        gt = np.stack([gt_of(records[i]["boxes"]) for i in index])
        av = 1.0 - gt if inverse else gt
        return {"raw": av, "av": av, "ogl": 0.5 * gt}

    return maps


def fake_result(records, cious, kinds=("av",)):
    sounding = np.array([r["sounding"] for r in records])
    gt = np.stack([gt_of(r["boxes"]) for r in records])
    result = evaluator.EvalResult(
        name=FAKE_SET, ids=[r["id"].decode() for r in records],
        cious={k: np.asarray(cious, np.float64) for k in kinds},
        confidence=np.concatenate([np.linspace(0.1, 0.8, 12), SILENT_CONF]), sounding=sounding,
        num_boxes=np.array([len(r["boxes"]) for r in records]), areas=metrics.gt_areas(gt))
    result.summary = evaluator.summarize_result(result, metrics.protocol_variant())
    result.summary["checkpoint"] = f"/runs/{'-'.join(kinds)}"
    return result


def test_report_of_handmade_results(fake_set, tmp_path):
    records, frames = fake_set
    cious = np.concatenate([CIOUS, np.zeros(3)])
    config = ml_collections.ConfigDict({"image_size": 224})
    rep = report.Report(config, {FAKE_SET: records})
    rep.add_model("oracle", {FAKE_SET: fake_result(records, cious)}, oracle_maps(records))
    rep.add_model("inverse", {FAKE_SET: fake_result(records, 1.0 - cious, ("av", "ogl"))},
                  oracle_maps(records, inverse=True))
    path = rep.write(tmp_path)
    assert path == tmp_path / "report.html"
    html = path.read_text()
    check_links(tmp_path, html)

    # Groups in order, samples in the hand-worked order; each row: frame + 3 maps.
    headings = re.findall(r"<h3>(.*?)</h3>", html)
    assert headings == ["Extended evaluation (slavc variant)", "Best", "Median", "Worst",
                        "Non-sounding, most confident"]
    assert frame_ids(html) == [f"clip{i:02d}" for i in (1, 8, 3, 6, 10, 0, 5, 2, 9, 13, 14, 12)]
    assert all(row.count("<figure>") == 4 for row in rows(html))
    assert len(rows(html)) == 12
    assert "<b>oracle</b><br>cIoU 0.910" in html and "<b>inverse</b><br>cIoU 0.090" in html
    assert "<b>inverse + OGL</b><br>cIoU 0.090" in html
    assert "<b>oracle</b><br>confidence 0.900" in html  # clip13: a false alarm

    # Every kept map is the one of its own sample (the oracle map is its ground truth).
    shown = rep.shown[FAKE_SET]
    for j, sample in enumerate(shown):
        np.testing.assert_array_equal(rep.models[0].maps[FAKE_SET]["av"][j],
                                      gt_of(records[sample.index]["boxes"]))
        assert sample.clip_id == f"clip{sample.index:02d}"

    # The oracle overlay of the best sample: red (jet 1) inside its box, blue outside.
    first = re.search(r'<div class="row">(.*?)</div>', html).group(1)
    frame_png, oracle_png, *_ = re.findall(r'src="([^"]+)"', first)
    check_png(tmp_path / oracle_png, (224, 224 + report.CAPTION_HEIGHT))
    overlay = np.asarray(Image.open(tmp_path / oracle_png).convert("RGB"))[:224]
    frame = frames[1].astype(np.float64)  # clip01: box x 15..134, y 40..169
    np.testing.assert_allclose(overlay[100, 70], np.round(0.5 * frame[100, 70]
                                                          + 0.5 * jet(1.0)), atol=0.51)
    np.testing.assert_allclose(overlay[200, 200], np.round(0.5 * frame[200, 200]
                                                           + 0.5 * jet(0.0)), atol=0.51)
    plain = np.asarray(Image.open(tmp_path / frame_png).convert("RGB"))[:224]
    np.testing.assert_array_equal(plain[200, 200], frames[1][200, 200])

    # Plots: success curve, histogram and (non-sounding pairs present) precision-recall.
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert [p.split("-")[0] for p in plots] == ["hist", "pr", "success"]
    for name in plots:
        check_png(tmp_path / "plots" / name, PLOT_PIXELS)
    assert PLOT_PIXELS == tuple(round(v * report.PLOT_DPI) for v in report.PLOT_SIZE)

    # Metrics table: a described row per map, the protocol variant, the checkpoints.
    summary = rep.models[0].results[FAKE_SET].summary
    table = table_rows(html, "metrics")
    assert table[0] == ["model", "description", "test set", "map", "N", "cIoU", "AUC",
                        "mean cIoU"]
    assert table[1] == ["oracle", "/runs/av", FAKE_SET, "AV", "12",
                        f"{100 * np.mean(CIOUS >= 0.5):.2f}", f"{100 * summary['AUC']:.2f}",
                        f"{100 * np.mean(CIOUS):.2f}"]
    assert [row[:4] for row in table[2:]] == [["inverse", "/runs/av-ogl", FAKE_SET, "AV"],
                                              ["inverse", "/runs/av-ogl", FAKE_SET, "AV + OGL"]]
    assert "map &gt;= sorted(map)[S*S//2]" in html

    # The extended evaluation: per model and subset, every number from the summary and the
    # variant named in every row (the boxes of 120 x 130 pixels are all "large").
    ext = table_rows(html, "metrics extended")
    assert ext[0] == ["model", "variant", "subset", "N", "sounding", *metrics.EXTENDED_NAMES]
    assert [row[:5] for row in ext[1:]] == [
        [label, "slavc", subset, n, "12"] for label in ("oracle", "inverse")
        for subset, n in (("all", "15"), ("visible", "12"), ("large", "12"))]
    expected = metrics.extended_metrics(cious, summary_conf(records), [1] * 12 + [0] * 3,
                                        [120.0 * 130.0] * 12 + [0.0] * 3)
    assert summary["extended"] == {"variant": "slavc", **expected}
    assert ext[1][5:] == [f"{100 * expected['all'][k]:.2f}" for k in metrics.EXTENDED_NAMES]
    assert "<b>slavc</b>: SLAVC&#x27;s evaluator" in html
    assert "<td></td>" not in html


def table_rows(html, css):
    """The cells of the table with class `css` (header first), tags stripped."""
    (body,) = re.findall(rf'<table class="{css}">(.*?)</table>', html, re.S)
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def summary_conf(records):
    return np.concatenate([np.linspace(0.1, 0.8, 12), SILENT_CONF])


def baseline_summary(c):
    return metrics.summarize(np.asarray(c, np.float64))


def test_report_rows_of_the_baselines(fake_set, tmp_path):
    """add_rows: every baseline row of the evaluation in the table, described; the untrained
    model (added with its maps) only takes its description; nothing blank."""
    records, _ = fake_set
    cious = np.concatenate([CIOUS, np.zeros(3)])
    rep = report.Report(ml_collections.ConfigDict({"image_size": 224}), {FAKE_SET: records})
    rep.add_model("marginNCE", {FAKE_SET: fake_result(records, cious)}, oracle_maps(records))
    rep.add_model("untrained", {FAKE_SET: fake_result(records, cious / 2)},
                  oracle_maps(records, inverse=True))
    rows = {f"center / {FAKE_SET}": baseline_summary(CIOUS * 0.5),
            f"random / {FAKE_SET}": baseline_summary(CIOUS * 0.25),
            f"oracle / {FAKE_SET}": baseline_summary(np.full(12, 0.9)),
            f"untrained / {FAKE_SET}": rep.models[1].results[FAKE_SET].summary}
    rep.add_rows(rows, baselines.DESCRIPTIONS)
    html = rep.write(tmp_path).read_text()
    table = table_rows(html, "metrics")
    assert [row[0] for row in table[1:]] == ["marginNCE", "untrained", "center", "random",
                                             "oracle"]
    assert table[2][1] == f"{baselines.DESCRIPTIONS['untrained']}; /runs/av"
    for row, kind in zip(table[3:], ("center", "random", "oracle"), strict=True):
        s = rows[f"{kind} / {FAKE_SET}"]
        assert row == [kind, baselines.DESCRIPTIONS[kind], FAKE_SET, "reference", "12",
                       f"{100 * s['cIoU']:.2f}", f"{100 * s['AUC']:.2f}",
                       f"{100 * s['mean_cIoU']:.2f}"]
    assert all(cell.strip() for row in table for cell in row)  # nothing blank
    assert "<td></td>" not in html
    # Every baseline of sslocal.baselines has its description.
    assert set(baselines.DESCRIPTIONS) == {*baselines.KINDS, "untrained"}

    with pytest.raises(ValueError, match="no description of 'mystery'"):
        rep.add_rows({f"mystery / {FAKE_SET}": rows[f"center / {FAKE_SET}"]},
                     baselines.DESCRIPTIONS)
    with pytest.raises(ValueError, match="already added"):
        rep.add_rows({f"center / {FAKE_SET}": rows[f"center / {FAKE_SET}"]},
                     baselines.DESCRIPTIONS)
    with pytest.raises(ValueError, match="not 'LABEL / TEST SET'"):
        rep.add_rows({"center / other/set": rows[f"center / {FAKE_SET}"]},
                     baselines.DESCRIPTIONS)
    with pytest.raises(ValueError, match="lacks"):
        rep.add_rows({f"random2 / {FAKE_SET}": {"cIoU": 0.1}}, {"random2": "x"})


def test_report_errors(fake_set, tmp_path):
    records, _ = fake_set
    config = ml_collections.ConfigDict({"image_size": 224})
    cious = np.concatenate([CIOUS, np.zeros(3)])
    rep = report.Report(config, {FAKE_SET: records})
    with pytest.raises(ValueError, match="nothing to report"):
        rep.write(tmp_path)
    with pytest.raises(ValueError, match="no results for test sets"):
        rep.add_model("m", {}, oracle_maps(records))
    shuffled = fake_result(records, cious)
    shuffled.ids = shuffled.ids[::-1]
    with pytest.raises(RuntimeError, match="out of order"):
        rep.add_model("m", {FAKE_SET: shuffled}, oracle_maps(records))
    rep = report.Report(config, {FAKE_SET: records})
    rep.add_model("m", {FAKE_SET: fake_result(records, cious)}, oracle_maps(records))
    with pytest.raises(ValueError, match="already added"):
        rep.add_model("m", {FAKE_SET: fake_result(records, cious)}, oracle_maps(records))
    with pytest.raises(ValueError, match="no test sets"):
        report.Report(config, {})


# ------------------------------------------------------- two real checkpoints, side by side

DATASET = "synthetic_av/tiny"


def tiny_config(data_dir):
    config = tiny.get_config()
    config.data_dir = str(data_dir)
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """synthetic_av/tiny with 13 test scenes and two freshly initialised model directories
    (two "methods"), each named model/ inside its run folder."""
    data_dir = tmp_path_factory.mktemp("tfds")
    builders.get_builder(DATASET, data_dir=os.fspath(data_dir), num_train=16, num_test=13,
                         num_workers=1).download_and_prepare()
    runs = tmp_path_factory.mktemp("runs")
    config = tiny.get_config()
    dirs = []
    for seed, run in ((0, "marginnce"), (1, "ezvsl")):
        net = factory.build_model(config.model, seed)
        _, params, batch_stats = nnx.split(net, nnx.Param, nnx.BatchStat)
        model_config = {**config.model.to_dict(), "image_size": config.image_size}
        dirs.append(str(checkpointing.save_model(runs / run / "model", model_config, params,
                                                 batch_stats)))
    return data_dir, dirs


def test_two_checkpoints_side_by_side(tiny_run, tmp_path):
    data_dir, dirs = tiny_run
    out = tmp_path / "eval"
    summaries = evaluate.main(tiny_config(data_dir), dirs, report=True, out=str(out))
    assert list(summaries) == [f"marginnce/model / {DATASET}", f"ezvsl/model / {DATASET}"]
    html = (out / "report.html").read_text()
    check_links(out, html)
    assert len(rows(html)) == 9  # 13 samples: 3 best, 3 median, 3 worst
    for row in rows(html):
        captions = re.findall(r"<figcaption>(.*?)</figcaption>", row)
        assert len(captions) == 3
        assert captions[1].startswith("<b>marginnce/model</b><br>cIoU ")
        assert captions[2].startswith("<b>ezvsl/model</b><br>cIoU ")
    (success,) = (out / "plots").glob("success-*.png")
    check_png(success, PLOT_PIXELS)
    (overlay, *_) = sorted((out / "overlays").glob("*-m1.png"))
    check_png(overlay, (224, 224 + report.CAPTION_HEIGHT))

    # The captions are the evaluation's per-sample cIoU, in the first model's order.
    first = [float(v) for v in re.findall(r"<b>marginnce/model</b><br>cIoU ([0-9.]+)", html)]
    values = sorted(first, reverse=True)
    assert first[:3] == values[:3] and first[-3:] == sorted(first[-3:])


def test_report_table_holds_every_printed_row(tiny_run, tmp_path, capsys):
    """issue 16 item 4: with baselines, report.html's table holds every row the evaluation
    printed (the model, centre, random, oracle, untrained), each described, none blank."""
    data_dir, dirs = tiny_run
    out = tmp_path / "eval"
    summaries = evaluate.main(tiny_config(data_dir), dirs[:1], report=True, baselines=True,
                              out=str(out))
    printed = capsys.readouterr().out
    labels = [k for k in summaries if k != "gap_closed"]
    assert len(labels) == 5
    table = table_rows((out / "report.html").read_text(), "metrics")
    assert sorted(f"{row[0]} / {row[2]}" for row in table[1:]) == sorted(labels)
    for row in table[1:]:
        assert f"{row[0]} / {row[2]}" in printed
        assert all(cell.strip() for cell in row)
        summary = summaries[f"{row[0]} / {row[2]}"]
        assert row[5:] == [f"{100 * summary[k]:.2f}" for k in ("cIoU", "AUC", "mean_cIoU")]
    described = {row[0]: row[1] for row in table[1:]}
    for kind in ("center", "random", "oracle"):
        assert described[kind] == baselines.DESCRIPTIONS[kind]
    assert described["untrained"].startswith(baselines.DESCRIPTIONS["untrained"])
    model = labels[0].split(" / ")[0]
    assert model == "model" and described[model] == summaries[labels[0]]["checkpoint"] != ""


@pytest.mark.parametrize("variant", ["slavc", "exact"])
def test_evaluator_scores_the_extended_evaluation(tiny_run, fake_set, variant):
    """Evaluator.run on a set with non-sounding pairs (the hand-made records under a Flickr
    name: one box each, a 0.5-weighted consensus map): boxes per sample and ground-truth
    areas collected per sample, the configured variant's extended metrics in the summary,
    named there and in the protocol variant; the headline metrics on the sounding samples."""
    data_dir, dirs = tiny_run
    records, _ = fake_set
    config = tiny_config(data_dir)
    config.eval.extended = variant
    mesh = sharding.make_mesh(8)
    scorer = evaluator.Evaluator(config, mesh)
    result = scorer.run(load.load_model(dirs[0], mesh=mesh), records,
                        "flickr_soundnet/test_plus_silent")
    np.testing.assert_array_equal(result.num_boxes, [1] * 12 + [0] * 3)
    # SLAVC's area is sum(gt) (half of the box here), the exact variant's the pixel count.
    box = 120.0 * 130.0
    np.testing.assert_array_equal(result.areas, [box / 2 if variant == "slavc" else box] * 12
                                  + [0.0] * 3)
    s = result.summary
    assert s["protocol_variant"]["extended_variant"] == variant
    assert s["extended"] == {"variant": variant, **metrics.extended_metrics(
        result.cious["av"], result.confidence, result.num_boxes, result.areas, variant=variant)}
    # 7,800 px is "medium", 15,600 px "large".
    assert set(s["extended"]) == {"variant", "all", "visible",
                                  "medium" if variant == "slavc" else "large"}
    assert s["N"] == 12 and s["N_non_sounding"] == 3 and "AP" not in s
    assert s["cIoU"] == metrics.summarize(result.cious["av"][:12])["cIoU"]
    table = evaluate.metrics_table({"m / set": s})
    assert f"extended ({variant}, all): AP@50" in table and f"extended {variant}" in table


def test_evaluator_options_are_checked(tiny_run):
    config = tiny_config(tiny_run[0])
    assert evaluator.parse_threshold("adaptive") == "adaptive"
    mesh = sharding.make_mesh(8)
    for field, value in (("extended", "sklearn"), ("ogl_fusion", "mean")):
        bad = tiny_config(tiny_run[0])
        bad.eval[field] = value
        with pytest.raises(ValueError, match=f"eval.{field} must be one of"):
            evaluator.Evaluator(bad, mesh)
    # The defaults: the protocol's rules, SLAVC's extended evaluator, no OGL (no fusion).
    variant = evaluator.Evaluator(config, mesh).variant()
    assert (variant["prediction_threshold"], variant["upsample"], variant["extended_variant"],
            variant["ogl_fusion"]) == ("median_ge", "bilinear_align_corners", "slavc", None)


def test_report_maps_score_as_the_evaluation(tiny_run, tmp_path):
    """The report's recomputed maps (Evaluator.maps) score as the evaluation did (same
    samples, same maps) on 8 devices."""
    data_dir, dirs = tiny_run
    config = tiny_config(data_dir)
    mesh = sharding.make_mesh(8)
    model = load.load_model(dirs[0], mesh=mesh)
    scorer = evaluator.Evaluator(config, mesh)
    source = prepare.load_split(DATASET, "test", os.fspath(data_dir))
    result = scorer.run(model, source, DATASET)
    rep = report.Report(config, {DATASET: source})
    rep.add_model("m", {DATASET: result}, functools.partial(scorer.maps, model))
    shown = rep.shown[DATASET]
    gt = metrics.gt_maps([source[s.index]["boxes"] for s in shown], "vggss")
    np.testing.assert_allclose(metrics.ciou(rep.models[0].maps[DATASET]["av"], gt),
                               result.cious["av"][[s.index for s in shown]], atol=1e-6)
    assert scorer.num_traces == 1  # the report's maps ran the evaluation's compiled step
    path = rep.write(tmp_path)
    check_links(tmp_path, path.read_text())
