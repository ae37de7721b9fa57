"""report.html: the metrics, success curves, cIoU histograms and map overlays of an evaluation.

One self-contained HTML file that opens without a server, with relative links to PNG files
beside it (plots/, overlays/). Each test set shows the best, median and worst samples by the
first model's cIoU (and, when the set holds non-sounding pairs, those the first model is most
confident on), with every model's map side by side and its cIoU, as the paper's Figures 1-2.

Only the shown samples' maps are kept: they are recomputed from their records with the
model's eval computation while each model is loaded (`Report.add_model`).

The metric table holds one row per (model or baseline, test set) with a description of each
(`Report.add_rows` takes the baselines' rows); a test set with non-sounding pairs gets the
extended evaluation's table per subset and its precision-recall plot, each number labelled
with the variant that computed it (docs/protocol.md section 6).
"""

from __future__ import annotations

import datetime
import html
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import ml_collections
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from sslocal import metrics
from sslocal.data import pipeline
from sslocal.writers import as_path

GROUPS = ("best", "median", "worst")
SILENT_GROUP = "non-sounding, most confident"
PLOT_SIZE = (5.0, 3.6)  # inches; PNGs are PLOT_SIZE * PLOT_DPI pixels
PLOT_DPI = 100
OVERLAY_SIZE = 224  # the ground-truth grid: boxes are in these pixel coordinates
CAPTION_HEIGHT = 20
HEATMAP = "jet"
BLEND = 0.5  # weight of the heatmap colour over the frame
KIND_NAMES = {"av": "", "ogl": " + OGL"}  # column label suffixes
KIND_TITLES = {"av": "AV", "ogl": "AV + OGL"}

MapFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


# -- which samples --------------------------------------------------------------------------

def select_samples(cious, sounding, confidence, per_group: int = 3) -> dict[str, list[int]]:
    """Test-set indices shown per group, in display order.

    best / median / worst: by cIoU among the sounding samples (descending, ties by index;
    worst first in its group); the groups are disjoint and hold min(per_group, n // 3)
    samples each (at least one, fewer distinct ones when n < 3). SILENT_GROUP: the
    non-sounding pairs with the highest confidence (the worst false alarms), if any.
    """
    cious = np.asarray(cious, np.float64).reshape(-1)
    sounding = np.asarray(sounding, bool).reshape(-1)
    confidence = np.asarray(confidence, np.float64).reshape(-1)
    if not cious.size == sounding.size == confidence.size:
        raise ValueError(f"lengths differ: cious {cious.size}, sounding {sounding.size}, "
                         f"confidence {confidence.size}")
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}")
    groups: dict[str, list[int]] = {}
    candidates = np.flatnonzero(sounding)
    order = [int(i) for i in candidates[np.lexsort((candidates, -cious[candidates]))]]
    n = len(order)
    if n:
        k = min(per_group, max(n // 3, 1))
        start = max((n - k) // 2, 0)
        groups["best"] = order[:k]
        groups["worst"] = [i for i in order[::-1][:k] if i not in groups["best"]]
        taken = set(groups["best"]) | set(groups["worst"])
        groups["median"] = [i for i in order[start:start + k] if i not in taken]
    silent = np.flatnonzero(~sounding)
    if silent.size:
        ranked = silent[np.lexsort((silent, -confidence[silent]))]
        groups[SILENT_GROUP] = [int(i) for i in ranked[:per_group]]
    return {name: groups[name] for name in (*GROUPS, SILENT_GROUP) if groups.get(name)}


# -- images ---------------------------------------------------------------------------------

def heat_colors(heat: np.ndarray) -> np.ndarray:
    """(H, W) map in [0, 1] -> float (H, W, 3) RGB in [0, 255] of the HEATMAP colormap (the
    colours of every heatmap sslocal draws: the report's and `sslocal localize`'s)."""
    return matplotlib.colormaps[HEATMAP](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0


def blend(frame: np.ndarray, heat: np.ndarray, alpha: float = BLEND) -> np.ndarray:
    """uint8 (H, W, 3) frame with the colours of an (H, W) map in [0, 1] blended at alpha."""
    frame = np.asarray(frame)
    heat = np.asarray(heat, np.float64)
    if heat.shape != frame.shape[:2]:
        raise ValueError(f"map {heat.shape} does not match the frame {frame.shape[:2]}")
    rgb = (1.0 - alpha) * frame.astype(np.float64) + alpha * heat_colors(heat)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def mask_outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The boundary of a binary (H, W) mask, `width` pixels wide inside it: the mask minus
    its erosion by a (2 width + 1) square."""
    m = np.asarray(mask, bool)
    eroded = m.copy()
    for _ in range(width):
        padded = np.pad(eroded, 1, constant_values=False)
        eroded = eroded & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & \
            padded[1:-1, 2:] & padded[:-2, :-2] & padded[2:, 2:] & padded[:-2, 2:] & \
            padded[2:, :-2]
    return m & ~eroded


def overlay_image(frame: np.ndarray, heat: np.ndarray | None = None, boxes=(),
                  caption: str = "", mask: np.ndarray | None = None) -> Image.Image:
    """The frame (uint8 (224, 224, 3)) with the map blended at BLEND, the ground-truth boxes
    (end-exclusive 224-px coordinates) as white rectangles or, for a mask ((224, 224)
    binary: AVSBench's ground truth), its outline in white, and a caption strip below."""
    frame = np.asarray(frame)
    if frame.shape != (OVERLAY_SIZE, OVERLAY_SIZE, 3) or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 ({OVERLAY_SIZE}, {OVERLAY_SIZE}, 3) frame, got "
                         f"{frame.dtype} {frame.shape}")
    pixels = frame if heat is None else blend(frame, heat)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != frame.shape[:2]:
            raise ValueError(f"mask {mask.shape} does not match the frame {frame.shape[:2]}")
        pixels = pixels.copy()
        pixels[mask_outline(mask)] = 255
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for xmin, ymin, xmax, ymax in np.asarray(boxes, np.float64).reshape(-1, 4).astype(int):
        if xmax > xmin and ymax > ymin:  # empty boxes (clipped coordinates) draw nothing
            # A black edge outside the white line keeps it visible on light frames.
            draw.rectangle([xmin - 1, ymin - 1, xmax, ymax], outline=(0, 0, 0), width=1)
            draw.rectangle([xmin, ymin, xmax - 1, ymax - 1], outline=(255, 255, 255), width=2)
    if not caption:
        return image
    framed = Image.new("RGB", (image.width, image.height + CAPTION_HEIGHT), (255, 255, 255))
    framed.paste(image, (0, 0))
    ImageDraw.Draw(framed).text((4, image.height + 3), caption, fill=(0, 0, 0),
                                font=ImageFont.load_default(size=12))
    return framed


def frame_224(record: Mapping[str, Any]) -> np.ndarray:
    """The record's test frame as uint8 (224, 224, 3): the ground-truth grid."""
    frame = pipeline.decode_image(record["image"])
    if frame.shape[:2] != (OVERLAY_SIZE, OVERLAY_SIZE):
        frame = np.asarray(Image.fromarray(frame).resize((OVERLAY_SIZE, OVERLAY_SIZE),
                                                         Image.BICUBIC))
    return frame


# -- plots ----------------------------------------------------------------------------------

def _figure() -> tuple[Figure, Any]:
    figure = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)  # no pyplot: no global state, Agg canvas
    return figure, figure.add_subplot()


def _save(figure: Figure, ax: Any, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    with path.open("wb") as f:  # a file object: matplotlib opens only local paths
        figure.savefig(f, format="png")


def _write_png(image: Image.Image, path: Path) -> None:
    """Through a file object: PIL, like matplotlib, opens only local paths (a gs:// one would
    become a local gs:/ path)."""
    with path.open("wb") as f:
        image.save(f, format="PNG")


def success_plot(curves: Mapping[str, np.ndarray], path: Path, title: str) -> Path:
    """success(t) = fraction of samples with cIoU >= t against t, one line per map; the legend
    gives each AUC (the area under its line)."""
    figure, ax = _figure()
    for label, cious in curves.items():
        t, success = metrics.success_curve(cious)
        auc = metrics.summarize(cious)["AUC"]
        ax.plot(t, success, marker="o", markersize=3, label=f"{label} (AUC {100 * auc:.1f})")
    ax.axvline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="cIoU threshold t",
           ylabel="fraction with cIoU \u2265 t", title=title)
    _save(figure, ax, path)
    return path


def histogram_plot(curves: Mapping[str, np.ndarray], path: Path, title: str) -> Path:
    """Histogram of the per-sample cIoU (bins of 0.05), one outline per map."""
    figure, ax = _figure()
    bins = np.linspace(0.0, 1.0, 21)
    for label, cious in curves.items():
        ax.hist(np.asarray(cious, np.float64), bins=bins, histtype="step", linewidth=1.5,
                label=label)
    ax.axvline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), xlabel="cIoU", ylabel="samples", title=title)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _save(figure, ax, path)
    return path


def precision_recall_plot(lines: Mapping[str, tuple[np.ndarray, np.ndarray, str, str]],
                          path: Path, title: str) -> Path:
    """Extended evaluation: precision against recall, one line per label: (recall, precision,
    matplotlib linestyle, colour), e.g. a colour per model and a style per IoU threshold
    (metrics.precision_recall_curve gives the points)."""
    figure, ax = _figure()
    for label, (recall, precision, style, colour) in lines.items():
        ax.plot(np.asarray(recall, np.float64), np.asarray(precision, np.float64),
                linestyle=style, color=colour, marker="o", markersize=2, linewidth=1.2,
                label=label)
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    _save(figure, ax, path)
    return path


def curve_plot(lines: Mapping[str, tuple[np.ndarray, np.ndarray, str]], path: Path, title: str,
               xlabel: str, ylabel: str, xlim=(0, 1)) -> Path:
    """One line per label: (x, y, matplotlib linestyle); the benchmark sets' curves."""
    figure, ax = _figure()
    for i, (label, (x, y, style)) in enumerate(lines.items()):
        ax.plot(np.asarray(x, np.float64), np.asarray(y, np.float64), linestyle=style,
                color=f"C{i % 10}", marker="o", markersize=2, linewidth=1.2, label=label)
    ax.set(xlim=xlim, ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
    _save(figure, ax, path)
    return path


# -- collecting and writing -----------------------------------------------------------------

@dataclass
class _Shown:
    """One shown sample: its frame on the ground-truth grid, boxes, and the stored test frame
    and spectrogram its maps are computed from."""

    group: str
    index: int
    clip_id: str
    sounding: bool
    frame: np.ndarray
    boxes: np.ndarray
    image: np.ndarray
    spec: np.ndarray
    mask: np.ndarray | None = None  # AVSBench: the ground-truth mask, drawn as an outline


@dataclass
class _Model:
    label: str
    results: dict[str, Any]  # test set -> evaluate.EvalResult
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # set -> kind -> (n,..)
    # IS3: the maps of the shown images' pairs (set -> kind -> (n,..)); negative audio: the
    # shown samples' predictions, raw map > the pIA threshold (set -> audio -> (n, 224, 224)).
    pair_maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    negative: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


class Report:
    """Collects what report.html shows while each model is loaded, then writes it.

        report = Report(config, sources)
        report.add_model("marginNCE", results, functools.partial(evaluator.maps, model))
        report.add_model("EZ-VSL", ...)
        report.write(out_dir)
    """

    def __init__(self, config: ml_collections.ConfigDict, sources: Mapping[str, Any], *,
                 per_group: int = 3):
        if not sources:
            raise ValueError("no test sets to report on")
        self.config = config
        self.sources = dict(sources)
        self.per_group = per_group
        self.models: list[_Model] = []
        self.shown: dict[str, list[_Shown]] = {}
        # IS3: the shown images' pairs (each image's pairs in source order); negative audio:
        # per audio kind the samples the first model lights up most (set -> kind -> samples).
        self.pairs: dict[str, list[_Shown]] = {}
        self.negative: dict[str, dict[str, list[_Shown]]] = {}
        self.rows: list[tuple[str, str, dict[str, Any]]] = []  # (label, test set, summary)
        self.descriptions: dict[str, str] = {}  # label -> its line in the metric table

    def add_model(self, label: str, results: Mapping[str, Any], maps: MapFn) -> None:
        """One model's results (test set -> EvalResult) and its map function (`Evaluator.maps`
        bound to the model): the shown samples (picked by the first model added) get their
        maps recomputed."""
        if any(m.label == label for m in self.models):
            raise ValueError(f"model {label!r} was already added")
        missing = [name for name in self.sources if name not in results]
        if missing:
            raise ValueError(f"{label}: no results for test sets {missing}")
        if not self.models:
            self.shown = {name: self._pick(name, results[name]) for name in self.sources}
            self.pairs = {name: self._pick_pairs(name, results[name]) for name in self.sources
                          if results[name].groups is not None}
            self.negative = {name: self._pick_negative(name, results[name])
                             for name in self.sources if results[name].negative}
        model = _Model(label, {name: results[name] for name in self.sources})
        for name, samples in self.shown.items():
            if len(results[name].ids) != len(self.sources[name]):
                raise ValueError(f"{label} / {name}: {len(results[name].ids)} results for "
                                 f"{len(self.sources[name])} samples")
            if samples:
                model.maps[name] = self._maps(maps, samples, list(results[name].cious))
        for name, samples in self.pairs.items():
            model.pair_maps[name] = self._maps(maps, samples, list(results[name].cious))
        for name, per_kind in self.negative.items():
            model.negative[name] = self._negative_maps(maps, name, results[name], per_kind)
        self.models.append(model)

    def add_rows(self, summaries: Mapping[str, Mapping[str, Any]],
                 descriptions: Mapping[str, str]) -> None:
        """Rows of the metric table beside the models: summaries keyed "LABEL / TEST SET", as
        `evaluate.evaluate_models` names them (the baselines "center / vggss/test", ...), and
        a one-line description of every LABEL (sslocal.baselines.DESCRIPTIONS). A LABEL added
        as a model already (the untrained baseline, whose maps are shown) only takes its
        description; every other entry becomes a row."""
        models = {m.label for m in self.models}
        taken = {(label, name) for label, name, _ in self.rows}
        for key, summary in summaries.items():
            label, sep, name = key.partition(" / ")
            if not sep or name not in self.sources:
                raise ValueError(f"row {key!r} is not 'LABEL / TEST SET' of a reported test set")
            if not str(descriptions.get(label, "")).strip():
                raise ValueError(f"row {key!r}: no description of {label!r}")
            missing = [k for k in ("cIoU", "AUC", "mean_cIoU", "N") if summary.get(k) is None]
            if missing:
                raise ValueError(f"row {key!r} lacks {missing}")
            self.descriptions[label] = str(descriptions[label])
            if label in models:
                continue
            if (label, name) in taken:
                raise ValueError(f"row {key!r} was already added")
            taken.add((label, name))
            self.rows.append((label, name, dict(summary)))

    def _pick(self, name: str, result: Any) -> list[_Shown]:
        """best / median / worst by cIoU (AVSBench: by the mask IoU; IS3 shows its images'
        pairs instead, `_pick_pairs`)."""
        if result.groups is not None:
            return []
        scores = (result.mask_frames["av"]["iou"] if result.mask_frames
                  else result.cious["av"])
        chosen = select_samples(scores, result.sounding, result.confidence, self.per_group)
        return [self._shown(name, result, group, index)
                for group, indices in chosen.items() for index in indices]

    def _shown(self, name: str, result: Any, group: str, index: int) -> _Shown:
        record = self.sources[name][index]
        clip_id = pipeline.record_id(record)
        if clip_id != result.ids[index]:
            raise RuntimeError(f"{name}: result {index} is {result.ids[index]!r} but "
                               f"the record is {clip_id!r}: results out of order")
        mask = None
        if result.mask_frames:
            from sslocal.data.builders._benchmark import decode_mask

            mask = decode_mask(record["mask"]).astype(bool)
        return _Shown(group=group, index=index, clip_id=clip_id,
                      sounding=bool(result.sounding[index]), frame=frame_224(record),
                      boxes=np.asarray(record["boxes"], np.float64).reshape(-1, 4),
                      image=pipeline.decode_image(record["image"]),
                      spec=pipeline.stored_spectrogram(record["spectrogram"]), mask=mask)

    def _pick_pairs(self, name: str, result: Any) -> list[_Shown]:
        """IS3: the best / median / worst images by the first model's minimum cIoU over their
        sources (what iIoU counts), every pair of each image, in source order."""
        groups = np.asarray(result.groups)
        names, inverse = np.unique(groups, return_inverse=True)
        minima = np.full(names.size, np.inf)
        np.minimum.at(minima, inverse, result.cious["av"])
        chosen = select_samples(minima, np.ones(names.size, bool), np.zeros(names.size),
                                self.per_group)
        return [self._shown(name, result, f"{group} images", int(i))
                for group, images in chosen.items() for image in images
                for i in np.flatnonzero(inverse == image)]

    def _pick_negative(self, name: str, result: Any) -> dict[str, list[_Shown]]:
        """Per negative audio, the samples whose prediction covers the most of the frame for
        the first model (the largest pIA: what a model that lights up everything shows)."""
        out = {}
        for kind, parts in result.negative.items():
            pia = np.asarray(parts["pia"])
            candidates = np.flatnonzero(result.sounding)  # as the metric: sounding samples
            order = candidates[np.lexsort((candidates, -pia[candidates]))][:min(self.per_group,
                                                                                  2)]
            out[kind] = [self._shown(name, result, f"{kind}: largest pIA", int(i))
                         for i in order]
        return out

    def _negative_maps(self, maps: MapFn, name: str, result: Any,
                       per_kind: dict[str, list[_Shown]]) -> dict[str, np.ndarray]:
        """The shown samples' predictions with each negative audio: raw map > that sample's
        pIA threshold, the pixels pIA counts (the negative spectrograms as the evaluation
        made them)."""
        from sslocal import evaluator

        out = {}
        for kind, samples in per_kind.items():
            partner = result.negative[kind].get("partner")
            specs = np.stack([evaluator.negative_spectrogram(kind, s.index, self.sources[name],
                                                             self.config.seed, partner)
                              for s in samples])
            raw = np.asarray(maps([s.image for s in samples], specs)["raw"], np.float32)
            thr = np.asarray(result.negative[kind]["threshold"])[[s.index for s in samples]]
            out[kind] = raw > thr[:, None, None].astype(np.float32)
        return out

    def _maps(self, maps: MapFn, samples: list[_Shown], kinds: list[str]) -> dict:
        out = maps([sample.image for sample in samples],
                   np.stack([sample.spec for sample in samples]))
        return {kind: np.asarray(out[kind], np.float32) for kind in kinds}

    # -- writing ----------------------------------------------------------------------------

    def write(self, out_dir: str | Path) -> Path:
        """Writes out_dir/report.html, out_dir/plots/*.png and out_dir/overlays/*.png."""
        if not self.models:
            raise ValueError("add_model was never called: nothing to report")
        out = as_path(out_dir)  # a folder or a gs:// URL
        for sub in ("plots", "overlays"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        sections = [self._section(out, t, name) for t, name in enumerate(self.sources)]
        path = out / "report.html"
        path.write_text(self._page(sections), encoding="utf-8")
        return path

    def _columns(self, name: str) -> list[tuple[_Model, str, str]]:
        """(model, map kind, display label) of every map shown for a test set."""
        return [(m, kind, m.label + KIND_NAMES.get(kind, f" ({kind})"))
                for m in self.models for kind in m.results[name].cious]

    def _section(self, out: Path, t: int, name: str) -> str:
        columns = self._columns(name)
        first = self.models[0].results[name]
        sounding = first.sounding
        slug = f"{t}-{_slug(name)}"
        curves = {label: m.results[name].cious[kind][sounding] for m, kind, label in columns}
        plots = [
            (success_plot(curves, out / "plots" / f"success-{slug}.png", f"{name}: success"),
             "Success curve: fraction of samples with cIoU &ge; t (AUC = area under it)."),
            (histogram_plot(curves, out / "plots" / f"hist-{slug}.png", f"{name}: cIoU"),
             "Per-sample cIoU; samples at or right of the dotted line count as localized."),
        ]
        extended = [m for m in self.models if "extended" in m.results[name].summary]
        if extended:
            lines = {}
            for i, m in enumerate(extended):
                result = m.results[name]
                ext = result.summary["extended"]
                for u, style in zip(metrics.EXTENDED_IOU_THRESHOLDS, ("-", "--"), strict=True):
                    tag = f"@{round(100 * u)}"
                    curve = metrics.precision_recall_curve(
                        result.cious["av"], result.confidence, result.num_boxes, u,
                        ext["variant"])
                    lines[f"{m.label} u={u} (AP{tag} {_pct(ext['all']['AP' + tag])}, "
                          f"{ext['variant']})"] = (curve["recall"], curve["precision"], style,
                                                   f"C{i % 10}")
            plots.append((precision_recall_plot(lines, out / "plots" / f"pr-{slug}.png",
                                                f"{name}: extended, all samples"),
                          "Extended evaluation, all samples: precision against recall as the "
                          "confidence threshold falls (non-sounding pairs are false "
                          "positives); solid u = 0.5, dashed u = 0.75."))
        plots += self._benchmark_plots(out, slug, name, columns)
        parts = [f'<section id="set-{t}"><h2>{_e(name)}</h2>',
                 f'<p class="meta">{int(sounding.sum())} sounding samples'
                 + (f", {int((~sounding).sum())} non-sounding pairs" if not sounding.all()
                    else "") + "</p>", '<div class="plots">']
        for path, caption in plots:
            parts.append(_figure_html(path.relative_to(out), caption, f"{name} plot"))
        parts.append("</div>")
        if extended:
            parts.append(self._extended_table(name, extended))
        parts.append(self._benchmark_tables(name, columns))
        shown = self.shown[name]
        if shown:
            by = ("the mask IoU" if first.mask_frames else "the cIoU")
            truth = ("white outlines: ground-truth masks" if first.mask_frames
                     else "white boxes: ground truth")
            parts.append(f'<p class="meta">Samples chosen by {by} of '
                         f"{_e(self.models[0].label)}; {truth}.</p>")
        for group in dict.fromkeys(s.group for s in shown):
            parts.append(f"<h3>{_e(group.capitalize())}</h3>")
            in_group = [(i, s) for i, s in enumerate(shown) if s.group == group]
            for j, (position, sample) in enumerate(in_group):
                parts.append(self._row(out, f"{slug}-{_slug(group)}{j}", position, sample,
                                       columns, name))
        parts += self._pair_rows(out, slug, name, columns)
        parts += self._negative_rows(out, slug, name)
        parts.append("</section>")
        return "\n".join(parts)

    # -- the benchmarks since 2023 (docs/protocol.md section 9) -----------------------------

    def _benchmark_plots(self, out: Path, slug: str, name: str, columns: list
                         ) -> list[tuple[Path, str]]:
        """IS3: the fraction of images whose every source reaches t (protocol and adaptive
        thresholds); AVSBench: the fraction of frames with mask IoU >= t and the F-curve;
        negative audio: C(t) per audio; retrieval: recall@k against k."""
        first = self.models[0].results[name]
        plots, t = [], metrics.AUC_THRESHOLDS
        if first.groups is not None:
            lines = {}
            for m, kind, label in columns:
                r = m.results[name]
                rules = {"protocol": r.cious[kind], **{rule: c[kind] for rule, c in
                                                        r.threshold_cious.items()}}
                for (rule, cious), style in zip(rules.items(), ("-", "--", ":"), strict=False):
                    _, minima, _ = metrics.image_min_ciou(cious, r.groups)
                    lines[f"{label}, {rule}"] = (t, [np.mean(minima >= x) for x in t], style)
            plots.append((curve_plot(lines, out / "plots" / f"iiou-{slug}.png",
                                     f"{name}: interactive success", "cIoU threshold t",
                                     "fraction of images, every source >= t"),
                          "Interactive success: the fraction of images whose every source, "
                          "queried with its own audio, has cIoU &ge; t (iAUC = area under "
                          "it); solid: the protocol threshold, dashed: adaptive."))
        if first.mask_frames:
            iou_lines, f_lines = {}, {}
            for m, kind, label in columns:
                frames = m.results[name].mask_frames[kind]
                iou_lines[label] = (t, [np.mean(frames["iou"] >= x) for x in t], "-")
                scores = metrics.mask_aggregate(frames["iou"], frames["f"], frames["nonempty"])
                f_lines[f"{label} (F {_pct(scores['F'])})"] = (
                    metrics.FSCORE_THRESHOLDS, scores["f_curve"], "-")
            plots.append((curve_plot(iou_lines, out / "plots" / f"miou-{slug}.png",
                                     f"{name}: mask IoU", "IoU threshold t",
                                     "fraction of frames with IoU >= t"),
                          "Per-frame mask IoU: the fraction of frames with IoU &ge; t (mIoU = "
                          "the area under it)."))
            plots.append((curve_plot(f_lines, out / "plots" / f"fcurve-{slug}.png",
                                     f"{name}: F-curve", "threshold of the binarised map",
                                     "F (beta^2 = 0.3), mean over frames"),
                          "F-measure averaged over the frames with a mask at each of the 255 "
                          "thresholds, then maximised (the binarised map: the whole frame at "
                          "0, the prediction above)."))
        if first.negative and first.sounding.any():
            lines = {}
            for m in self.models:
                r = m.results[name]
                for kind, parts in r.negative.items():
                    scores = metrics.pia_summary(parts["pia"][r.sounding])
                    lines[f"{m.label}, {kind} (AOC {_pct(scores['AOC'])})"] = (
                        *scores["curve"], "-")
            plots.append((curve_plot(lines, out / "plots" / f"pia-{slug}.png",
                                     f"{name}: negative audio", "pIA threshold t",
                                     "fraction of samples with pIA <= t"),
                          "Negative audio: the fraction of samples whose predicted area (pIA) "
                          "is at most t, with silence, noise or an off-screen sound in place "
                          "of the clip's audio (AOC = area under it; 1: nothing lights up)."))
        if first.embeddings is not None and first.sounding.any():
            lines = {}
            for m in self.models:
                r = m.results[name]
                if r.embeddings is None:
                    continue
                n = int(r.sounding.sum())
                ks = np.arange(1, min(n, 50) + 1)
                pooled = r.embeddings["image"][r.sounding][:, None, None]
                recall = metrics.retrieval_recall(
                    metrics.pooled_image_embeddings(pooled, r.benchmark["retrieval_pooling"]),
                    r.embeddings["audio"][r.sounding], ks=tuple(ks))
                for side, style in (("audio_to_image", "-"), ("image_to_audio", "--")):
                    lines[f"{m.label}, {side.replace('_to_', ' -> ')}"] = (
                        ks, [recall[side][f"R@{k}"] for k in ks], style)
            plots.append((curve_plot(lines, out / "plots" / f"recall-{slug}.png",
                                     f"{name}: retrieval", "k", "recall@k",
                                     xlim=(1, max(2, len(ks)))),
                          "Cross-modal retrieval: the fraction of queries whose own pair "
                          "ranks in the first k (solid audio &rarr; image, dashed image "
                          "&rarr; audio)."))
        return plots

    def _benchmark_tables(self, name: str, columns: list) -> str:
        """The set's own metric tables, each row naming its variant: IS3 (both thresholds),
        AVSBench's masks (the three aggregations), negative audio, retrieval."""
        parts, first = [], self.models[0].results[name]
        if first.groups is not None:
            rows = []
            for m, kind, label in columns:
                s, p = m.results[name].summary, "" if kind == "av" else f"{kind}_"
                variant = s.get("protocol_variant", {}).get("threshold_rule", "")
                entries = [(variant, s)] + [(s[rule]["threshold_rule"], s[rule])
                                            for rule in m.results[name].threshold_cious]
                for rule, e in entries:
                    rows.append([_e(label), _e(rule), str(e.get(p + "N", s["N"])),
                                 str(s.get(p + "N_images", ""))]
                                + [_pct(e.get(p + k)) for k in ("cIoU", "AUC", "iIoU",
                                                                 "iAUC")])
            parts.append("<h3>IS3: both sources of every image</h3>"
                         f'<p class="note">{_e(first.summary.get("iIoU_rule", ""))}.</p>'
                         + _table("metrics", ["model", "threshold", "pairs", "images", "cIoU",
                                              "AUC", "iIoU", "iAUC"], rows))
        if first.mask_frames:
            rows = []
            for m, kind, label in columns:
                s, p = m.results[name].summary, "" if kind == "av" else f"{kind}_"
                mask = s["mask"]
                rows.append([_e(label), "frames (averaged first)", str(mask[p + "N"]),
                             str(mask[p + "N_F"]), _pct(s[p + "mIoU"]), _pct(s[p + "F"])])
                for variant, v in mask.get("other_variants", {}).items():
                    rows.append([_e(label), _e(f"{variant}: {v['rule']}"), str(mask[p + "N"]),
                                 str(mask[p + "N_F"]), _pct(v[p + "mIoU"]), _pct(v[p + "F"])])
            mask = first.summary["mask"]
            parts.append(f"<h3>AVSBench masks (threshold {_e(mask['threshold'])}: "
                         f"{_e(mask['threshold_rule'])})</h3>"
                         f'<p class="note">{_e(mask["rule"])}.</p>'
                         + _table("metrics", ["model", "aggregation", "frames", "with a mask",
                                              "mIoU", "F"], rows))
        if "negative_audio" in first.summary:
            rows = []
            for m in self.models:
                neg = m.results[name].summary["negative_audio"]
                for kind in m.results[name].negative:
                    q = neg[kind]["quantiles"]
                    rows.append([_e(m.label), _e(kind), str(neg[kind]["N"]),
                                 _pct(neg[kind]["pIA"]), _pct(neg[kind]["AOC"])]
                                + [_pct(q[k]) for k in ("min", "q25", "median", "q75", "max")])
            neg = first.summary["negative_audio"]
            audio = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>"
                            for k, v in first.benchmark.get("negative_audio", {}).items())
            parts.append(f"<h3>Negative audio (threshold: {_e(neg['threshold'])})</h3>"
                         f'<p class="note">{_e(neg["rule"])}.</p><ul class="note">{audio}</ul>'
                         + _table("metrics", ["model", "audio", "N", "pIA", "AOC", "min",
                                              "q25", "median", "q75", "max"], rows))
        if "retrieval" in first.summary:
            rows = []
            for m in self.models:
                r = m.results[name].summary.get("retrieval")
                if r is None:
                    continue
                for side in ("audio_to_image", "image_to_audio"):
                    rows.append([_e(m.label), _e(side.replace("_to_", " -> ")), str(r["N"])]
                                + [_pct(r[side][f"R@{k}"]) for k in (1, 5, 10)]
                                + [f"{r[side]['MedR']:g}"])
            parts.append(f"<h3>Cross-modal retrieval ({_e(first.summary['retrieval']['pooling'])}"
                         f" pooling)</h3>"
                         f'<p class="note">{_e(first.summary["retrieval"]["rule"])}.</p>'
                         + _table("metrics", ["model", "direction", "N", "R@1", "R@5", "R@10",
                                              "median rank"], rows))
        return "\n".join(parts)

    def _pair_rows(self, out: Path, slug: str, name: str, columns: list) -> list[str]:
        """IS3: one row per shown image, its sources side by side, each with its own box and
        every model's map for that source's audio."""
        pairs = self.pairs.get(name, [])
        if not pairs:
            return []
        result = self.models[0].results[name]
        groups = np.asarray(result.groups)
        parts = [f'<p class="meta">Images chosen by the minimum cIoU over their sources of '
                 f"{_e(self.models[0].label)}; each source with its own box and audio.</p>"]
        for group in dict.fromkeys(s.group for s in pairs):
            parts.append(f"<h3>{_e(group.capitalize())}</h3>")
            in_group = [(i, s) for i, s in enumerate(pairs) if s.group == group]
            images = dict.fromkeys(groups[s.index] for _, s in in_group)
            for j, image in enumerate(images):
                cells = []
                for position, sample in in_group:
                    if groups[sample.index] != image:
                        continue
                    stem = f"{slug}-pair{_slug(group)}{j}-{sample.index}"
                    cells += self._cells(out, stem, position, sample, columns, name,
                                         "pair_maps")
                parts.append(f'<div class="row pair"><p class="meta">{_e(image)}</p>'
                             + "".join(cells) + "</div>")
        return parts

    def _negative_rows(self, out: Path, slug: str, name: str) -> list[str]:
        """Negative audio: the samples the first model lights up most with each audio, and
        every model's prediction (raw map > the sample's pIA threshold) in colour."""
        per_kind = self.negative.get(name, {})
        if not per_kind:
            return []
        parts = ['<p class="meta">Negative audio: the prediction of each model (the pixels '
                 "above the threshold of the positive map, in red) with the audio in place "
                 "of the clip's own.</p>"]
        for kind, samples in per_kind.items():
            group = samples[0].group
            parts.append(f"<h3>{_e(group[:1].upper() + group[1:])}</h3>")
            for j, sample in enumerate(samples):
                stem = f"{slug}-neg-{kind}{j}"
                frame_path = out / "overlays" / f"{stem}-frame.png"
                boxes = () if sample.mask is not None else sample.boxes
                _write_png(overlay_image(sample.frame, None, boxes, sample.clip_id,
                                         mask=sample.mask), frame_path)
                cells = [_figure_html(frame_path.relative_to(out),
                                      f"{_e(sample.clip_id)}<br>frame + ground truth",
                                      sample.clip_id)]
                for c, m in enumerate(self.models):
                    result = m.results[name]
                    pia = float(result.negative[kind]["pia"][sample.index])
                    path = out / "overlays" / f"{stem}-m{c}.png"
                    heat = m.negative[name][kind][j].astype(np.float64)
                    _write_png(overlay_image(sample.frame, heat, boxes,
                                             f"{m.label} {kind}: pIA {pia:.3f}",
                                             mask=sample.mask), path)
                    cells.append(_figure_html(path.relative_to(out),
                                              f"<b>{_e(m.label)}</b>, {_e(kind)}<br>"
                                              f"pIA {pia:.3f}",
                                              f"{m.label} {kind} prediction of "
                                              f"{sample.clip_id}"))
                parts.append('<div class="row">' + "".join(cells) + "</div>")
        return parts

    def _row(self, out: Path, stem: str, position: int, sample: _Shown, columns: list,
             name: str) -> str:
        """One sample: its frame with the boxes, then every model's map, side by side."""
        return ('<div class="row">' + "".join(self._cells(out, stem, position, sample, columns,
                                                           name)) + "</div>")

    def _cells(self, out: Path, stem: str, position: int, sample: _Shown, columns: list,
               name: str, maps: str = "maps") -> list[str]:
        """A sample's frame with its ground truth (boxes, or a mask's outline), then every
        model's map (`maps`: the _Model field holding them), with its score."""
        frame_path = out / "overlays" / f"{stem}-frame.png"
        boxes = () if sample.mask is not None else sample.boxes
        _write_png(overlay_image(sample.frame, None, boxes,
                                 f"{sample.clip_id}" + ("" if sample.sounding else " (no sound)"),
                                 mask=sample.mask), frame_path)
        cells = [_figure_html(frame_path.relative_to(out),
                              f"{_e(sample.clip_id)}<br>frame + ground truth", sample.clip_id)]
        for c, (model, kind, label) in enumerate(columns):
            result = model.results[name]
            value = float(result.cious[kind][sample.index])
            score = (f"cIoU {value:.3f}" if sample.sounding
                     else f"confidence {float(result.confidence[sample.index]):.3f}")
            if result.mask_frames:
                score = f"mask IoU {float(result.mask_frames[kind]['iou'][sample.index]):.3f}"
            path = out / "overlays" / f"{stem}-m{c}.png"
            heat = getattr(model, maps)[name][kind][position]
            _write_png(overlay_image(sample.frame, heat, boxes, f"{label}: {score}",
                                     mask=sample.mask), path)
            cells.append(_figure_html(path.relative_to(out),
                                      f"<b>{_e(label)}</b><br>{_e(score)}",
                                      f"{label} map of {sample.clip_id}"))
        return cells

    def _description(self, model: _Model) -> str:
        parts = [self.descriptions.get(model.label, ""), _checkpoint(model)]
        return "; ".join(p for p in parts if p) or "evaluated model"

    def _metrics_table(self) -> str:
        """One row per map of every model and per added row (baselines), per test set."""
        head = ["model", "description", "test set", "map", "N", "cIoU", "AUC", "mean cIoU"]
        rows = []
        for name in self.sources:
            for model, kind, _ in self._columns(name):
                s = model.results[name].summary
                p = "" if kind == "av" else f"{kind}_"
                cells = [_e(model.label), _e(self._description(model)), _e(name),
                         KIND_TITLES.get(kind, _e(kind)), str(s.get(p + "N", s.get("N")))]
                cells += [_pct(s.get(p + key)) for key in ("cIoU", "AUC", "mean_cIoU")]
                rows.append(cells)
            for label, set_name, s in self.rows:
                if set_name == name:
                    rows.append([_e(label), _e(self.descriptions[label]), _e(name),
                                 "reference", str(s["N"])]
                                + [_pct(s[key]) for key in ("cIoU", "AUC", "mean_cIoU")])
        return _table("metrics", head, rows)

    def _extended_table(self, name: str, models: list[_Model]) -> str:
        """The extended evaluation of the AV maps: one row per (model, subset), the variant
        that computed each row named in it."""
        head = ["model", "variant", "subset", "N", "sounding", *metrics.EXTENDED_NAMES]
        rows, variants = [], {}
        for m in models:
            ext = m.results[name].summary["extended"]
            variants[ext["variant"]] = m.results[name].summary.get(
                "protocol_variant", {}).get("extended", "")
            for subset in metrics.EXTENDED_SUBSETS:
                if subset in ext:
                    values = ext[subset]
                    rows.append([_e(m.label), _e(ext["variant"]), subset, str(values["N"]),
                                 str(values["N_sounding"])]
                                + [_pct(values[key]) for key in metrics.EXTENDED_NAMES])
        names = ", ".join(_e(v) for v in variants)
        rules = "".join(f"<li><b>{_e(v)}</b>: {_e(rule)}</li>" for v, rule in variants.items()
                        if rule)
        return (f"<h3>Extended evaluation ({names} variant)</h3>"
                + (f'<ul class="note">{rules}</ul>' if rules else "")
                + '<p class="note">AV maps; every pair is ranked by its confidence (the mean of '
                "the top quarter of its un-normalised map); a non-sounding pair above the "
                "threshold is a false positive. visible: the sounding samples; small / medium "
                "/ large / huge: sounding samples by ground-truth area (&lt; 32&sup2;, "
                "&lt; 96&sup2;, &lt; 144&sup2;, larger); u: the cIoU a detection needs. "
                "Subsets without a sample are left out; n/a: undefined on the subset.</p>"
                + _table("metrics extended", head, rows))

    def _variants(self) -> str:
        variants: dict[str, list[str]] = {}
        for m in self.models:
            for name in self.sources:
                variant = m.results[name].summary.get("protocol_variant")
                key = json.dumps(variant, sort_keys=True)
                variants.setdefault(key, []).append(f"{m.label} / {name}")
        parts = []
        for key, users in variants.items():
            variant = json.loads(key) or {}
            rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_flat(v))}</td></tr>"
                           for k, v in variant.items())
            who = "" if len(variants) == 1 else f"<p>{_e(', '.join(users))}</p>"
            parts.append(f'{who}<table class="kv">{rows}</table>')
        return "\n".join(parts)

    def _image_sizes(self) -> str:
        sizes = {r.summary.get("image_size", self.config.image_size)
                 for m in self.models for r in m.results.values()}
        return " / ".join(str(size) for size in sorted(sizes))

    def _page(self, sections: list[str]) -> str:
        checkpoints = "".join(f"<li><b>{_e(m.label)}</b>: {_e(_checkpoint(m))}</li>"
                              for m in self.models)
        nav = " &middot; ".join(f'<a href="#set-{t}">{_e(name)}</a>'
                                for t, name in enumerate(self.sources))
        when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>sslocal evaluation report</title>
<style>{_CSS}</style></head>
<body>
<h1>Sound source localization: evaluation report</h1>
<p class="meta">{_e(when)} &middot; frames {_e(self._image_sizes())} px &middot; test sets:
{nav}</p>
<h2>Metrics</h2>
{self._metrics_table()}
<p class="note">cIoU: percentage of samples with cIoU &ge; 0.5; AUC: area under the success
curve (t = 0, 0.05, ..., 1); mean cIoU: the average. All &times; 100, on the sounding samples.
Reference rows are the baselines, scored by the same protocol. Test sets with non-sounding pairs
show the extended evaluation in their own section.</p>
<ul class="models">{checkpoints}</ul>
<details><summary>Protocol variant</summary>
{self._variants()}
</details>
{"".join(sections)}
<footer>Written by <code>sslocal evaluate --report</code>. Heatmaps: normalised maps
(colormap {HEATMAP}) blended at {BLEND} over the frame.</footer>
</body></html>
"""


def _checkpoint(model: _Model) -> str:
    return str(next(iter(model.results.values())).summary.get("checkpoint", ""))


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.2f}"


def _table(css: str, head: list[str], rows: list[list[str]]) -> str:
    return (f'<table class="{css}"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>"
            + "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
            + "</tbody></table>")


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_flat(v)}" for k, v in value.items())
    return "none" if value is None else str(value)


def _figure_html(relative: Path, caption_html: str, alt: str) -> str:
    return (f'<figure><img src="{_e(relative.as_posix())}" alt="{_e(alt)}" loading="lazy">'
            f"<figcaption>{caption_html}</figcaption></figure>")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
.meta, .note, footer { color: #666; font-size: .9em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .3em .7em; }
table.metrics td:nth-child(n+5), table.extended td:nth-child(n+4) { text-align: right;
  font-variant-numeric: tabular-nums; }
table.metrics thead th { background: #f3f3f3; }
table.kv th { text-align: left; background: #f8f8f8; font-weight: 600; }
.plots, .row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.row { margin-bottom: 14px; padding: 8px; background: #fafafa; border-radius: 6px; }
figure { margin: 0; text-align: center; font-size: .85em; }
figure img { display: block; border: 1px solid #ccc; }
.plots img { max-width: 500px; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: 600; }
footer { margin-top: 3em; border-top: 1px solid #ddd; padding-top: .5em; }
"""
