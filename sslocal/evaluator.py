"""The evaluator: every test set scored exactly once, used by training, `sslocal evaluate` and
`sslocal localize`.

Maps are computed on the device by one jitted step, built once per run: the model's graph is a
static argument, so every model of one architecture (each epoch's weights, the best checkpoint,
the untrained baseline, several checkpoints side by side) shares one compilation. The step
normalises the loader's uint8 frames and float16 spectrograms itself (as the train step does)
and computes its maps with `sslocal.maps`. cIoU is scored on the host in float64 numpy exactly as
the protocol does (docs/protocol.md sections 5-6). Evaluation batches are padded and masked and
carry each slot's test-set index, so every sample counts exactly once on any number of devices
and hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sslocal import maps, metrics, sharding
from sslocal.data import pipeline, spectrogram
from sslocal.data import prepare as data_prepare
from sslocal.models import factory
from sslocal.models.load import LoadedModel
from sslocal.protocol import CLIP_SAMPLES, SPEC_SHAPE
from sslocal.writers import progress


def parse_threshold(value: str | float) -> str | float:
    """The rules of metrics.THRESHOLDS ("median_ge", "median_gt", "adaptive") stay rules;
    anything else is a fixed threshold."""
    if isinstance(value, str) and value in metrics.THRESHOLDS:
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"eval.threshold must be one of {metrics.THRESHOLDS} or a number, "
                         f"not {value!r}") from None


@dataclass
class EvalResult:
    """Every sample of one test set in the test set's order (ids[i] is source[i]'s clip), and
    the summary of each map kind."""

    name: str
    ids: list[str]
    cious: dict[str, np.ndarray]  # "av" (and "ogl") -> (N,)
    confidence: np.ndarray
    sounding: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)
    # Ground-truth boxes per sample (0: non-sounding; default: 1 per sounding sample) and the
    # ground-truth area (metrics.gt_areas, of the extended variant; None: unknown).
    num_boxes: np.ndarray | None = None
    areas: np.ndarray | None = None
    # The benchmarks since 2023 (docs/protocol.md section 9), where the set or the config has
    # them: cIoU under further threshold rules (IS3: "adaptive") rule -> kind -> (N,); each
    # sample's image (IS3: image_id, the pairs of one image); per-frame mask scores (AVSBench,
    # metrics.mask_frame_scores) kind -> {"iou", "f", "nonempty"}; negative audio kind ->
    # {"pia", "threshold"[, "partner": the off-screen clip's index]}; the retrieval embeddings
    # {"image", "audio"} (N, D); and the conventions they were computed under (summaries).
    threshold_cious: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    groups: list[str] | None = None
    mask_frames: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    negative: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] | None = None
    benchmark: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_boxes is None:
            self.num_boxes = np.asarray(self.sounding, bool).astype(np.int64)


class Evaluator:
    """Scores models' maps on test sets (`run`) and computes maps of given inputs (`maps`).

    Both are collective: with several processes, every process calls them with the same
    arguments. `num_traces` counts the compilations of the eval step.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                 ogl: bool | None = None, batch_size: int | None = None):
        self.config = config
        self.mesh = mesh
        self.batch_size = batch_size or config.eval_batch_size
        sharding.check_batch_size(self.batch_size, mesh)
        self.threshold = parse_threshold(config.eval.threshold)
        if config.eval.upsample not in maps.UPSAMPLE_METHODS:
            raise ValueError(f"eval.upsample must be one of {maps.UPSAMPLE_METHODS}, not "
                             f"{config.eval.upsample!r}")
        self.upsample = config.eval.upsample
        self.ogl_alpha = float(config.eval.ogl_alpha)
        self.ogl_fusion = config.eval.get("ogl_fusion", "minmax")
        if self.ogl_fusion not in maps.OGL_FUSIONS:
            raise ValueError(f"eval.ogl_fusion must be one of {maps.OGL_FUSIONS}, not "
                             f"{self.ogl_fusion!r}")
        self.extended = config.eval.get("extended", "slavc")
        if self.extended not in metrics.EXTENDED_VARIANTS:
            raise ValueError(f"eval.extended must be one of {metrics.EXTENDED_VARIANTS}, not "
                             f"{self.extended!r}")
        self._ogl_graphdef, self._ogl_state = None, None
        if config.eval.ogl if ogl is None else ogl:
            self._ogl_graphdef, self._ogl_state = factory.build_ogl(config.eval.ogl_weights,
                                                                    mesh)
        self.kinds = ("av", "ogl") if self._ogl_graphdef is not None else ("av",)
        self.benchmark = BenchmarkSettings.from_config(config.eval)
        self.num_traces = 0
        self._step = jax.jit(self._maps_step, static_argnums=(0, 1),
                             out_shardings=sharding.batch_sharded(mesh))

    def _maps_step(self, graphdef: nnx.GraphDef, ogl_graphdef: nnx.GraphDef | None,
                   variables: dict[str, Any], image: jax.Array, spec: jax.Array):
        self.num_traces += 1  # Python runs this body only while tracing
        model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
        model.eval()
        image, spec = pipeline.model_inputs(image, spec)
        V, A = model(image, spec)
        features = None
        if ogl_graphdef is not None:
            features = nnx.merge(ogl_graphdef, variables["ogl"])(image)
        return {**maps.localization_maps(V, A, upsample=self.upsample, object_features=features,
                                         ogl_alpha=self.ogl_alpha, ogl_fusion=self.ogl_fusion),
                **self.benchmark.embeddings(V, A)}

    def variant(self, model: LoadedModel | None = None) -> dict:
        """The protocol variant of every number this evaluator produces (result files): the
        threshold rule, the upsampling, OGL's alpha and fusion (when OGL is on) and the
        extended evaluation's variant; with `model`, its map rule (maps.map_rule) and the
        released format it was converted from."""
        ogl = self._ogl_graphdef is not None
        heads = (model.model_config.get("heads", factory.MODEL_DEFAULTS["heads"])
                 if model is not None else 1)
        return metrics.protocol_variant(self.threshold, self.upsample,
                                        self.ogl_alpha if ogl else None,
                                        extended=self.extended,
                                        ogl_fusion=self.ogl_fusion if ogl else None,
                                        map_rule=maps.map_rule(heads),
                                        model_format=model.source_format if model else None)

    def _apply(self, model: LoadedModel, image: np.ndarray, spec: np.ndarray):
        """The step on one host-local batch slice of this process (global arrays out)."""
        variables = {"params": model.params, "batch_stats": model.batch_stats}
        if self._ogl_state is not None:
            variables["ogl"] = self._ogl_state
        batch = sharding.to_global({"image": image, "spec": spec}, self.mesh)
        return self._step(model.graphdef, self._ogl_graphdef, variables, batch["image"],
                          batch["spec"])

    def run(self, model: LoadedModel, source: Any, name: str) -> EvalResult:
        """Scores every sample of `source` exactly once, at the model's frame size: cIoU of
        every map kind; on IS3 also the adaptive threshold and each image's pairs, on AVSBench
        the masks, and the negative-audio and retrieval passes the config asks for
        (docs/protocol.md section 9), all through the one compiled step."""
        if len(source) == 0:
            raise ValueError(f"test set {name} is empty")
        kind = benchmark_kind(name)
        bench = self.benchmark
        extra_rules = ("adaptive",) if kind == "is3" and self.threshold != "adaptive" else ()
        info = (sample_info(source) if kind == "is3" or "offscreen" in bench.negative_audio
                else None)
        negatives = _Negatives(bench.negative_audio, source, info, self.config.seed, name)
        loader = pipeline.eval_loader(
            source, global_batch_size=self.batch_size, image_size=model.image_size,
            gt_format=data_prepare.gt_format(name), process_index=jax.process_index(),
            process_count=jax.process_count(), masks=kind == "avsbench")
        indices, cious, conf, sounding = [], {k: [] for k in self.kinds}, [], []
        num_boxes, areas = [], []
        rule_cious = {rule: {k: [] for k in self.kinds} for rule in extra_rules}
        masks = {k: {"iou": [], "f": [], "nonempty": []} for k in self.kinds} if (
            kind == "avsbench") else {}
        pia = {neg: {"pia": [], "threshold": []} for neg in bench.negative_audio}
        embeddings = {"image": [], "audio": []} if bench.retrieval else None
        local_ids: dict[int, str] = {}
        for batch in progress(iterable=loader, desc=f"eval {name}",
                              disable=jax.process_index() != 0):
            out = self._apply(model, batch["image"], batch["spec"])
            keep = np.asarray(batch["mask"], bool)
            gt = np.asarray(batch["gt_map"])[keep]
            for k in self.kinds:
                kind_maps = sharding.to_host_local(out[k], self.mesh)[keep]
                cious[k].append(metrics.ciou(kind_maps, gt, self.threshold))
                for rule in extra_rules:
                    rule_cious[rule][k].append(metrics.ciou(kind_maps, gt, rule))
                if masks:
                    frames = metrics.mask_frame_scores(
                        kind_maps, np.asarray(batch["gt_mask"])[keep],
                        threshold=bench.mask_threshold)
                    for key, value in frames.items():
                        masks[k][key].append(value)
            raw = sharding.to_host_local(out["raw"], self.mesh)[keep]
            conf.append(metrics.confidence(raw))
            sounding.append(np.asarray(batch["sounding"], bool)[keep])
            # Boxes per sample for the extended evaluation: 0 for a non-sounding pair.
            num_boxes.append(np.where(sounding[-1], np.asarray(batch["num_boxes"])[keep], 0))
            areas.append(metrics.gt_areas(gt, self.extended))
            index = np.asarray(batch["index"])
            for neg in bench.negative_audio:  # the same images with other audio, same step
                neg_out = self._apply(model, batch["image"], negatives.spectrograms(neg, index))
                neg_raw = sharding.to_host_local(neg_out["raw"], self.mesh)[keep]
                scored = self._negative_pia(neg_raw, raw, gt)
                pia[neg]["pia"].append(scored["pia"])
                pia[neg]["threshold"].append(scored["threshold"])
            if embeddings is not None:
                for side in ("image", "audio"):
                    embeddings[side].append(
                        sharding.to_host_local(out[f"{side}_embedding"], self.mesh)[keep])
            indices.append(index[keep])
            local_ids.update(zip(index[keep].tolist(), batch["id"][keep].tolist(), strict=True))
        # Hosts hold interleaved slices of the test set: gather, then back to its order.
        index = sharding.gather_to_all(np.concatenate(indices))
        order = np.argsort(index, kind="stable")
        if not np.array_equal(index[order], np.arange(len(source))):
            raise RuntimeError(f"evaluation of {name} scored {len(index)} samples for a test set "
                               f"of {len(source)}: a sample was dropped or repeated")

        def gathered(chunks: list[np.ndarray]) -> np.ndarray:
            return sharding.gather_to_all(np.concatenate(chunks))[order]

        # Ids stay on their host; another host's are read from the source (every host has it).
        ids = [local_ids[i] if i in local_ids else pipeline.record_id(source[i])
               for i in range(len(source))]
        if info is not None and info["id"] != ids:
            raise RuntimeError(f"{name}: the records changed during the evaluation")
        result = EvalResult(
            name=name, ids=ids,
            cious={k: gathered(v) for k, v in cious.items()},
            confidence=gathered(conf), sounding=gathered(sounding),
            num_boxes=gathered(num_boxes), areas=gathered(areas),
            threshold_cious={rule: {k: gathered(v) for k, v in per_kind.items()}
                             for rule, per_kind in rule_cious.items()},
            groups=info["image_id"] if kind == "is3" else None,
            mask_frames={k: {key: gathered(v) for key, v in parts.items()}
                         for k, parts in masks.items()},
            negative={neg: {**{key: gathered(v) for key, v in parts.items()},
                            **negatives.recorded(neg)} for neg, parts in pia.items()},
            embeddings=(None if embeddings is None
                        else {side: gathered(v) for side, v in embeddings.items()}),
            benchmark=self.benchmark_variant(kind, negatives),
        )
        result.summary = summarize_result(result, self.variant(model))
        result.summary["image_size"] = model.image_size
        return result

    def _negative_pia(self, neg_raw: np.ndarray, pos_raw: np.ndarray, gt: np.ndarray) -> dict:
        """pIA of negative pairs' raw maps at "the threshold the positive set uses": the
        evaluator's rule on each image's own raw map (a rule of ranks: the same pixels as on
        the normalised map; a number t on the normalised map is min + t (max - min) of the
        raw one), or eval.negative_threshold's number on the raw map."""
        threshold = self.benchmark.negative_threshold
        if threshold != "positive":
            return metrics.negative_audio_pia(neg_raw, float(threshold))
        if isinstance(self.threshold, str):
            return metrics.negative_audio_pia(neg_raw, self.threshold, positive_maps=pos_raw,
                                              gt_maps=gt)
        flat = pos_raw.reshape(len(pos_raw), -1).astype(np.float64)
        lo, hi = flat.min(axis=1), flat.max(axis=1)
        return metrics.negative_audio_pia(neg_raw, lo + self.threshold * (hi - lo))

    def benchmark_variant(self, kind: str, negatives: _Negatives | None = None) -> dict:
        """The conventions of a set's benchmark numbers (docs/protocol.md section 9), for its
        summary: the mask rule (AVSBench), the negative audio and its threshold, the
        retrieval pooling; only what applies to the set."""
        bench, out = self.benchmark, {"kind": kind}
        if kind == "avsbench":
            out["mask_threshold"] = bench.mask_threshold
            out["mask_threshold_rule"] = metrics.protocol_variant(
                bench.mask_threshold)["threshold_rule"]
        if bench.negative_audio:
            threshold = bench.negative_threshold
            if threshold == "positive":
                rule = metrics.protocol_variant(self.threshold)["threshold_rule"]
                threshold = (f"positive: eval.threshold {self.threshold} ({rule}) on each "
                             "image's own raw map")
            out["negative_threshold"] = threshold
            out["negative_audio"] = negatives.rules if negatives is not None else {}
        if bench.retrieval:
            out["retrieval_pooling"] = bench.retrieval_pooling
        return out

    def maps(self, model: LoadedModel, frames: Sequence[np.ndarray], specs: np.ndarray
             ) -> dict[str, np.ndarray]:
        """Maps of n given samples: uint8 (H, W, 3) frames of any size (squashed to the model's
        frame size as test frames are) and float16 log spectrograms (n, 257, 200, 1), as
        `pipeline.stored_spectrogram` makes them -> {"raw", "av"[, "ogl"]: (n, 224, 224)
        float32}. Padded to whole eval batches: the same compiled step as `run`."""
        images = np.stack([pipeline.eval_frame(f, model.image_size) for f in frames])
        specs = np.asarray(specs)
        n = len(images)
        per_host = self.batch_size // jax.process_count()
        lo = jax.process_index() * per_host
        out: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, self.batch_size):
            image = np.zeros((self.batch_size, *images.shape[1:]), images.dtype)
            spec = np.zeros((self.batch_size, *specs.shape[1:]), specs.dtype)
            chunk = slice(start, min(start + self.batch_size, n))
            image[:chunk.stop - start], spec[:chunk.stop - start] = images[chunk], specs[chunk]
            result = self._apply(model, image[lo:lo + per_host], spec[lo:lo + per_host])
            for kind, value in result.items():
                local = sharding.to_host_local(value, self.mesh)
                out.setdefault(kind, []).append(sharding.gather_to_all(local))
        return {kind: np.concatenate(v)[:n] for kind, v in out.items()}


def summarize_result(result: EvalResult, variant: dict) -> dict[str, Any]:
    """cIoU@0.5, AUC, mean cIoU and N of each map kind on the sounding samples; when the set
    holds non-sounding pairs, the extended evaluation of the AV map under the variant's
    `extended_variant` ("slavc" unless the variant says otherwise), as
    summary["extended"] = {"variant": name, subset: {metric: value}, ...}
    (metrics.extended_metrics), and N_non_sounding; the protocol variant."""
    summary: dict[str, Any] = {}
    sounding = result.sounding
    for kind, cious in result.cious.items():
        prefix = "" if kind == "av" else f"{kind}_"
        for key, value in metrics.summarize(cious[sounding]).items():
            summary[prefix + key] = value
    if not sounding.all():
        name = variant.get("extended_variant", "slavc")
        summary["extended"] = {"variant": name, **metrics.extended_metrics(
            result.cious["av"], result.confidence, result.num_boxes, result.areas,
            variant=name)}
        summary["N_non_sounding"] = int((~sounding).sum())
    summary.update(benchmark_summary(result))
    summary["protocol_variant"] = variant
    return summary


# -- the benchmarks since 2023 (docs/protocol.md section 9) -------------------------------------

NEGATIVE_AUDIO = ("silence", "noise", "offscreen")
BENCHMARK_KINDS = ("is3", "avsbench")  # builder names with their own analyses; others: boxes
_NOISE_STREAM, _OFFSCREEN_STREAM = 1, 2  # seed streams: (config.seed, stream, test-set index)
IIOU_RULE = ("an image counts at t when each of its sources, scored with its own audio, has "
             "cIoU >= t (the minimum over its sources); iIoU at t = 0.5, iAUC the trapezoid "
             "over t = 0, 0.05, ..., 1 (SSLalignment's finalize_cIoU / finalize_IAUC)")
MASK_RULE = ("per frame: IoU = |b & m| / (|b | m| + 1e-7), an empty mask the background's IoU; "
             "F (beta^2 0.3) at 255 thresholds of the binarised map b, averaged over frames "
             "first, maximised after")
PIA_RULE = ("pIA = the fraction of pixels of the raw upsampled alpha_ii (not min-max "
            "normalised) with map > thr; AOC = the trapezoid of C(t) = fraction with pIA <= t, "
            "t = 0, 0.05, ..., 1 (Juanola et al., ICASSP 2025, vssl_eval compute_pIA / "
            "compute_AUC_pIA); AV maps only")
RETRIEVAL_RULE = ("cosine of the L2-normalised embeddings in float64; image: V_i (unit per "
                  "position) pooled over positions ({pooling}), then L2-normalised; audio: A_i; "
                  "rank = 1 + the number of other items at least as similar (ties count "
                  "against); sounding samples only")


def benchmark_kind(name: str) -> str:
    """"is3", "avsbench" or "boxes": which analyses a test set gets besides cIoU."""
    from sslocal.data import builders

    cls, _ = builders.parse_dataset(name)
    return cls.name if cls.name in BENCHMARK_KINDS else "boxes"


@dataclass(frozen=True)
class BenchmarkSettings:
    """config.eval's benchmark fields (configs/default.py), checked once."""

    negative_audio: tuple[str, ...] = ()
    negative_threshold: str | float = "positive"
    retrieval: bool = False
    retrieval_pooling: str = "mean"
    mask_threshold: str | float = "median_gt"

    @classmethod
    def from_config(cls, eval_config: ml_collections.ConfigDict) -> BenchmarkSettings:
        kinds = eval_config.get("negative_audio", ()) or ()
        if isinstance(kinds, str):
            kinds = (kinds,)
        # "--config.eval.negative_audio=silence,noise" arrives as ("silence,noise",).
        kinds = tuple(k.strip() for item in kinds for k in str(item).split(",") if k.strip())
        unknown = [k for k in kinds if k not in NEGATIVE_AUDIO]
        if unknown or len(set(kinds)) != len(kinds):
            raise ValueError(f"eval.negative_audio must hold distinct kinds of {NEGATIVE_AUDIO}, "
                             f"not {kinds!r}")
        threshold = eval_config.get("negative_threshold", "positive")
        if threshold != "positive":
            try:
                threshold = float(threshold)
            except (TypeError, ValueError):
                raise ValueError(f"eval.negative_threshold must be 'positive' or a number, not "
                                 f"{threshold!r}") from None
        pooling = eval_config.get("retrieval_pooling", "mean")
        if pooling not in metrics.RETRIEVAL_POOLINGS:
            raise ValueError(f"eval.retrieval_pooling must be one of "
                             f"{metrics.RETRIEVAL_POOLINGS}, not {pooling!r}")
        try:
            mask_threshold = parse_threshold(eval_config.get("mask_threshold", "median_gt"))
        except ValueError:
            raise ValueError(f"eval.mask_threshold must be one of {metrics.THRESHOLDS} or a "
                             f"number, not {eval_config.get('mask_threshold')!r}") from None
        return cls(kinds, threshold, bool(eval_config.get("retrieval", False)), pooling,
                   mask_threshold)

    def embeddings(self, V: jax.Array, A: jax.Array) -> dict[str, jax.Array]:
        """Inside the eval step: the retrieval embeddings when asked for ({} otherwise, so the
        step's outputs stay the maps): V pooled over positions (B, D), A (B, D), float32;
        the host normalises them in float64 (metrics.pooled_image_embeddings)."""
        if not self.retrieval:
            return {}
        V = V.astype(jax.numpy.float32)
        pooled = V.mean(axis=(1, 2)) if self.retrieval_pooling == "mean" else V.max(axis=(1, 2))
        return {"image_embedding": pooled, "audio_embedding": A.astype(jax.numpy.float32)}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def sample_info(source: Any) -> dict[str, list]:
    """Every record's "id", "label", "sounding" and, where the set has them, "image_id" and
    "source_name" (IS3) or "video_id" (AVSBench), in test-set order. Read from the source
    itself (every host holds it), before the evaluation: the off-screen sounds are chosen from
    it, and IS3's pairs are regrouped by it."""
    out: dict[str, list] = {"id": [], "label": [], "sounding": []}
    optional = ("image_id", "source_name", "video_id")
    for i in range(len(source)):
        record = source[i]
        out["id"].append(pipeline.record_id(record))
        out["label"].append(int(record["label"]) if "label" in record else -1)
        out["sounding"].append(bool(record["sounding"]) if "sounding" in record else True)
        for key in optional:
            if key in record:
                out.setdefault(key, []).append(_text(record[key]))
    return out


def offscreen_partners(info: dict[str, list], seed: int, name: str = "test set"
                       ) -> tuple[np.ndarray, str]:
    """Each sample's off-screen sound: the index of another test clip whose audio plays in
    place of its own, chosen deterministically (a generator seeded (seed, 2, index)), and the
    rule in words.

    As vssl_eval draws it (a random class the picture does not show, then a random clip of
    that class): with classes (IS3: each pair's source name, the picture showing every
    source of its image; otherwise the label, when every sounding sample has one) a class
    outside the picture's, then a clip of it; without them, any clip of another picture (IS3
    image, AVSBench video, else clip). Only sounding clips lend their audio (a non-sounding
    pair's is not its picture's, and its class is unknown: any class fits its picture). Never a
    clip of the same picture; a sample with no candidate is an error, never given its own
    audio."""
    n = len(info["id"])
    groups = info.get("image_id") or info.get("video_id") or info["id"]
    sounding = info.get("sounding") or [True] * n
    labels = info["label"]
    if "source_name" in info:
        audio_class = list(info["source_name"])
        shown: dict[str, set] = {}
        for g, c in zip(groups, audio_class, strict=True):
            shown.setdefault(g, set()).add(c)
        picture = [shown[g] for g in groups]
        rule = ("another image's pair of a source class absent from the image (a class drawn "
                "uniformly, then one of its pairs)")
    elif all(label >= 0 for label, s in zip(labels, sounding, strict=True) if s):
        audio_class = list(labels)
        picture = [{c} if s else set() for c, s in zip(labels, sounding, strict=True)]
        rule = "a clip of another class (a class drawn uniformly, then one of its clips)"
    else:
        audio_class, picture = None, None
        rule = "any clip of another picture (no class labels), drawn uniformly"
    by_class: dict[Any, list[int]] = {}
    if audio_class is not None:
        for i, c in enumerate(audio_class):
            if sounding[i]:
                by_class.setdefault(c, []).append(i)
    classes = sorted(by_class, key=str)
    lenders = np.asarray(groups)[np.asarray(sounding, bool)]
    lender_index = np.flatnonzero(np.asarray(sounding, bool))
    partner = np.empty(n, np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, _OFFSCREEN_STREAM, i])
        if audio_class is not None:
            allowed = [c for c in classes if c not in picture[i]]
            candidates = None
            if allowed:
                chosen = allowed[int(rng.integers(len(allowed)))]
                candidates = [j for j in by_class[chosen] if groups[j] != groups[i]]
        else:
            candidates = lender_index[lenders != groups[i]].tolist()
        if not candidates:
            raise ValueError(f"{name}: no off-screen sound for {info['id'][i]}: every other "
                             "clip shares its picture or its classes")
        partner[i] = candidates[int(rng.integers(len(candidates)))]
    return partner, f"{rule}; seed (config.seed {seed}, index)"


def noise_spectrogram(seed: int, index: int) -> np.ndarray:
    """The stored spectrogram (257, 200, 1) float16 of sample `index`'s noise: 3 s of N(0, 1)
    samples at 16 kHz (vssl_eval's np.random.normal(0, 1, len(audio)), not clipped), seeded
    (seed, 1, index), through the protocol's log spectrogram."""
    rng = np.random.default_rng([seed, _NOISE_STREAM, int(index)])
    wave = rng.standard_normal(CLIP_SAMPLES)
    return pipeline.stored_spectrogram(spectrogram.log_spectrogram(wave))


NEGATIVE_AUDIO_RULES = {
    "silence": "3 s of zeros, through the log spectrogram (log 1e-7 everywhere)",
    "noise": "3 s of N(0, 1) samples, not clipped, seeded (config.seed, 1, index)",
    "offscreen": "the stored spectrogram of another test clip: "}


def silence_spectrogram() -> np.ndarray:
    """The stored spectrogram (257, 200, 1) float16 of 3 s of silence."""
    return pipeline.stored_spectrogram(spectrogram.log_spectrogram(np.zeros(CLIP_SAMPLES)))


def negative_spectrogram(kind: str, index: int, source: Any, seed: int,
                         partner: np.ndarray | None = None) -> np.ndarray:
    """Sample `index`'s negative audio of one kind as a stored spectrogram (257, 200, 1)
    float16, the path real audio takes: silence, its noise (`noise_spectrogram`) or its
    off-screen partner's stored spectrogram (`offscreen_partners`)."""
    if kind == "silence":
        return silence_spectrogram()
    if kind == "noise":
        return noise_spectrogram(seed, index)
    if kind == "offscreen":
        return pipeline.stored_spectrogram(source[int(partner[index])]["spectrogram"])
    raise ValueError(f"unknown negative audio {kind!r}; choose one of {NEGATIVE_AUDIO}")


class _Negatives:
    """The negative audio of one test set: each kind's spectrograms for a batch's slots."""

    def __init__(self, kinds: tuple[str, ...], source: Any, info: dict | None, seed: int,
                 name: str):
        self.kinds, self.source, self.seed = kinds, source, seed
        self.n = len(source)
        self.rules = {kind: NEGATIVE_AUDIO_RULES[kind] for kind in kinds}
        self.partner = None
        self.silence = silence_spectrogram() if "silence" in kinds else None
        if "offscreen" in kinds:
            self.partner, rule = offscreen_partners(info, seed, name)
            self.rules["offscreen"] += rule

    def spectrograms(self, kind: str, index: np.ndarray) -> np.ndarray:
        """(b, 257, 200, 1) float16 for the slots' test-set indices; padding slots zeros."""
        out = np.zeros((len(index), *SPEC_SHAPE, 1), np.float16)
        for slot, i in enumerate(np.asarray(index).tolist()):
            if i < self.n:
                out[slot] = (self.silence if kind == "silence" else negative_spectrogram(
                    kind, i, self.source, self.seed, self.partner))
        return out

    def recorded(self, kind: str) -> dict[str, np.ndarray]:
        """What the per-sample results keep of a kind: the off-screen partner indices."""
        return {"partner": self.partner.copy()} if kind == "offscreen" else {}


def benchmark_summary(result: EvalResult) -> dict[str, Any]:
    """The benchmark numbers of a result, each under the convention that computed it
    (result.benchmark): IS3's iIoU / iAUC (top level, the protocol threshold) and the
    adaptive threshold ("adaptive": cIoU, AUC, mean cIoU, iIoU, iAUC); AVSBench's mIoU and F
    (top level, the "frames" aggregation) with the named per-batch aggregations ("mask");
    "negative_audio" (pIA, AOC, the distribution per kind); "retrieval" (R@1/5/10 and the
    median rank both ways). Map kinds other than "av" carry their prefix ("ogl_iIoU")."""
    out: dict[str, Any] = {}
    bench = result.benchmark
    sounding = result.sounding
    if result.groups is not None:
        groups = np.asarray(result.groups)[sounding]
        for kind, cious in result.cious.items():
            p = "" if kind == "av" else f"{kind}_"
            interactive = metrics.iiou_iauc(cious[sounding], groups)
            out[p + "iIoU"], out[p + "iAUC"] = interactive["iIoU"], interactive["iAUC"]
            out[p + "N_images"], out[p + "sources"] = (interactive["N_images"],
                                                       interactive["sources"])
        out["iIoU_rule"] = IIOU_RULE
    for rule, per_kind in result.threshold_cious.items():
        entry: dict[str, Any] = {"threshold_rule": metrics.protocol_variant(rule)[
            "threshold_rule"]}
        for kind, cious in per_kind.items():
            p = "" if kind == "av" else f"{kind}_"
            entry.update({p + k: v for k, v in metrics.summarize(cious[sounding]).items()})
            if result.groups is not None:
                interactive = metrics.iiou_iauc(cious[sounding],
                                                np.asarray(result.groups)[sounding])
                entry[p + "iIoU"], entry[p + "iAUC"] = interactive["iIoU"], interactive["iAUC"]
        out[rule] = entry
    if result.mask_frames:
        mask: dict[str, Any] = {"variant": "frames", "threshold": bench.get("mask_threshold"),
                                "threshold_rule": bench.get("mask_threshold_rule"),
                                "fscore_input": "binarised", "rule": MASK_RULE}
        for kind, frames in result.mask_frames.items():
            p = "" if kind == "av" else f"{kind}_"
            scores = metrics.mask_aggregate(frames["iou"], frames["f"], frames["nonempty"])
            out[p + "mIoU"], out[p + "F"] = scores["mIoU"], scores["F"]
            mask[p + "N"], mask[p + "N_F"] = scores["N"], scores["N_F"]
            for variant in ("sslalignment", "per_batch"):
                other = metrics.mask_aggregate(frames["iou"], frames["f"], frames["nonempty"],
                                               variant=variant)
                mask.setdefault("other_variants", {}).setdefault(variant, {
                    "batch_size": metrics.SSLALIGNMENT_BATCH,
                    "rule": _MASK_VARIANT_RULES[variant]}).update(
                    {p + "mIoU": other["mIoU"], p + "F": other["F"]})
        out["mask"] = mask
    if result.negative and sounding.any():
        negative: dict[str, Any] = {"threshold": bench.get("negative_threshold"),
                                    "rule": PIA_RULE}
        for kind, parts in result.negative.items():  # the sounding samples, as every metric
            scores = metrics.pia_summary(parts["pia"][sounding])
            negative[kind] = {
                "pIA": scores["pIA"], "AOC": scores["AOC"], "N": scores["N"],
                "quantiles": scores["quantiles"], "curve": scores["curve"][1].tolist(),
                "histogram": scores["histogram"].tolist(),
                "audio": bench.get("negative_audio", {}).get(kind, "")}
        out["negative_audio"] = negative
    if result.embeddings is not None and sounding.any():
        pooling = bench.get("retrieval_pooling", "mean")
        # Pooled on the device already: a 1 x 1 map, normalised here in float64.
        pooled = result.embeddings["image"][sounding][:, None, None]
        image = metrics.pooled_image_embeddings(pooled, pooling)
        recall = metrics.retrieval_recall(image, result.embeddings["audio"][sounding])
        out["retrieval"] = {"pooling": pooling, "rule": RETRIEVAL_RULE.format(pooling=pooling),
                            **recall}
    return out


_MASK_VARIANT_RULES = {
    "sslalignment": "mIoU = mean of the means of consecutive batches of 64 frames "
                    "(SSLalignment's finalize_mIoU); F as frames",
    "per_batch": "per batch of 64 frames the maximum of its averaged F-curve, then the mean "
                 "over batches (AVSBench's test.py: the known bug); mIoU as sslalignment",
}
