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


def overlay_image(frame: np.ndarray, heat: np.ndarray | None = None, boxes=(),
                  caption: str = "") -> Image.Image:
    """The frame (uint8 (224, 224, 3)) with the map blended at BLEND, the ground-truth boxes
    (end-exclusive 224-px coordinates) as white rectangles, and a caption strip below."""
    frame = np.asarray(frame)
    if frame.shape != (OVERLAY_SIZE, OVERLAY_SIZE, 3) or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 ({OVERLAY_SIZE}, {OVERLAY_SIZE}, 3) frame, got "
                         f"{frame.dtype} {frame.shape}")
    image = Image.fromarray(frame if heat is None else blend(frame, heat))
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


@dataclass
class _Model:
    label: str
    results: dict[str, Any]  # test set -> evaluate.EvalResult
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # set -> kind -> (n,..)


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
        model = _Model(label, {name: results[name] for name in self.sources})
        for name, samples in self.shown.items():
            if len(results[name].ids) != len(self.sources[name]):
                raise ValueError(f"{label} / {name}: {len(results[name].ids)} results for "
                                 f"{len(self.sources[name])} samples")
            if samples:
                model.maps[name] = self._maps(maps, samples, list(results[name].cious))
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
        chosen = select_samples(result.cious["av"], result.sounding, result.confidence,
                                self.per_group)
        source = self.sources[name]
        shown = []
        for group, indices in chosen.items():
            for index in indices:
                record = source[index]
                clip_id = pipeline.record_id(record)
                if clip_id != result.ids[index]:
                    raise RuntimeError(f"{name}: result {index} is {result.ids[index]!r} but "
                                       f"the record is {clip_id!r}: results out of order")
                shown.append(_Shown(
                    group=group, index=index, clip_id=clip_id,
                    sounding=bool(result.sounding[index]), frame=frame_224(record),
                    boxes=np.asarray(record["boxes"], np.float64).reshape(-1, 4),
                    image=pipeline.decode_image(record["image"]),
                    spec=pipeline.stored_spectrogram(record["spectrogram"])))
        return shown

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
        parts = [f'<section id="set-{t}"><h2>{_e(name)}</h2>',
                 f'<p class="meta">{int(sounding.sum())} sounding samples'
                 + (f", {int((~sounding).sum())} non-sounding pairs" if not sounding.all()
                    else "") + "</p>", '<div class="plots">']
        for path, caption in plots:
            parts.append(_figure_html(path.relative_to(out), caption, f"{name} plot"))
        parts.append("</div>")
        if extended:
            parts.append(self._extended_table(name, extended))
        shown = self.shown[name]
        if shown:
            parts.append(f'<p class="meta">Samples chosen by the cIoU of '
                         f"{_e(self.models[0].label)}; white boxes: ground truth.</p>")
        for group in dict.fromkeys(s.group for s in shown):
            parts.append(f"<h3>{_e(group.capitalize())}</h3>")
            in_group = [(i, s) for i, s in enumerate(shown) if s.group == group]
            for j, (position, sample) in enumerate(in_group):
                parts.append(self._row(out, f"{slug}-{_slug(group)}{j}", position, sample,
                                       columns, name))
        parts.append("</section>")
        return "\n".join(parts)

    def _row(self, out: Path, stem: str, position: int, sample: _Shown, columns: list,
             name: str) -> str:
        """One sample: its frame with the boxes, then every model's map, side by side."""
        frame_path = out / "overlays" / f"{stem}-frame.png"
        _write_png(overlay_image(sample.frame, None, sample.boxes,
                                 f"{sample.clip_id}" + ("" if sample.sounding else " (no sound)")),
                   frame_path)
        cells = [_figure_html(frame_path.relative_to(out),
                              f"{_e(sample.clip_id)}<br>frame + ground truth", sample.clip_id)]
        for c, (model, kind, label) in enumerate(columns):
            result = model.results[name]
            value = float(result.cious[kind][sample.index])
            score = (f"cIoU {value:.3f}" if sample.sounding
                     else f"confidence {float(result.confidence[sample.index]):.3f}")
            path = out / "overlays" / f"{stem}-m{c}.png"
            _write_png(overlay_image(sample.frame, model.maps[name][kind][position], sample.boxes,
                                     f"{label}: {score}"), path)
            cells.append(_figure_html(path.relative_to(out),
                                      f"<b>{_e(label)}</b><br>{_e(score)}",
                                      f"{label} map of {sample.clip_id}"))
        return '<div class="row">' + "".join(cells) + "</div>"

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
