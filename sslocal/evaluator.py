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
from sslocal.data import pipeline
from sslocal.data import prepare as data_prepare
from sslocal.models import factory
from sslocal.models.load import LoadedModel
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
        return maps.localization_maps(V, A, upsample=self.upsample, object_features=features,
                                      ogl_alpha=self.ogl_alpha, ogl_fusion=self.ogl_fusion)

    def variant(self) -> dict:
        """The protocol variant of every number this evaluator produces (result files): the
        threshold rule, the upsampling, OGL's alpha and fusion (when OGL is on) and the
        extended evaluation's variant."""
        ogl = self._ogl_graphdef is not None
        return metrics.protocol_variant(self.threshold, self.upsample,
                                        self.ogl_alpha if ogl else None,
                                        extended=self.extended,
                                        ogl_fusion=self.ogl_fusion if ogl else None)

    def _apply(self, model: LoadedModel, image: np.ndarray, spec: np.ndarray):
        """The step on one host-local batch slice of this process (global arrays out)."""
        variables = {"params": model.params, "batch_stats": model.batch_stats}
        if self._ogl_state is not None:
            variables["ogl"] = self._ogl_state
        batch = sharding.to_global({"image": image, "spec": spec}, self.mesh)
        return self._step(model.graphdef, self._ogl_graphdef, variables, batch["image"],
                          batch["spec"])

    def run(self, model: LoadedModel, source: Any, name: str) -> EvalResult:
        """Scores every sample of `source` exactly once, at the model's frame size."""
        if len(source) == 0:
            raise ValueError(f"test set {name} is empty")
        loader = pipeline.eval_loader(
            source, global_batch_size=self.batch_size, image_size=model.image_size,
            gt_format=data_prepare.gt_format(name), process_index=jax.process_index(),
            process_count=jax.process_count())
        indices, cious, conf, sounding = [], {k: [] for k in self.kinds}, [], []
        num_boxes, areas = [], []
        local_ids: dict[int, str] = {}
        for batch in progress(iterable=loader, desc=f"eval {name}",
                              disable=jax.process_index() != 0):
            out = self._apply(model, batch["image"], batch["spec"])
            keep = np.asarray(batch["mask"], bool)
            gt = np.asarray(batch["gt_map"])[keep]
            for kind in self.kinds:
                kind_maps = sharding.to_host_local(out[kind], self.mesh)[keep]
                cious[kind].append(metrics.ciou(kind_maps, gt, self.threshold))
            conf.append(metrics.confidence(sharding.to_host_local(out["raw"], self.mesh)[keep]))
            sounding.append(np.asarray(batch["sounding"], bool)[keep])
            # Boxes per sample for the extended evaluation: 0 for a non-sounding pair.
            num_boxes.append(np.where(sounding[-1], np.asarray(batch["num_boxes"])[keep], 0))
            areas.append(metrics.gt_areas(gt, self.extended))
            index = np.asarray(batch["index"])[keep]
            indices.append(index)
            local_ids.update(zip(index.tolist(), batch["id"][keep].tolist(), strict=True))
        # Hosts hold interleaved slices of the test set: gather, then back to its order.
        index = sharding.gather_to_all(np.concatenate(indices))
        order = np.argsort(index, kind="stable")
        if not np.array_equal(index[order], np.arange(len(source))):
            raise RuntimeError(f"evaluation of {name} scored {len(index)} samples for a test set "
                               f"of {len(source)}: a sample was dropped or repeated")
        # Ids stay on their host; another host's are read from the source (every host has it).
        ids = [local_ids[i] if i in local_ids else pipeline.record_id(source[i])
               for i in range(len(source))]
        result = EvalResult(
            name=name, ids=ids,
            cious={k: sharding.gather_to_all(np.concatenate(v))[order] for k, v in cious.items()},
            confidence=sharding.gather_to_all(np.concatenate(conf))[order],
            sounding=sharding.gather_to_all(np.concatenate(sounding))[order],
            num_boxes=sharding.gather_to_all(np.concatenate(num_boxes))[order],
            areas=sharding.gather_to_all(np.concatenate(areas))[order],
        )
        result.summary = summarize_result(result, self.variant())
        result.summary["image_size"] = model.image_size
        return result

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
    summary["protocol_variant"] = variant
    return summary
