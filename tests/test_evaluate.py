"""Evaluation: every sample scored exactly once on 8 devices, exact cIoU against a per-sample
float64 recomputation, OGL end to end from a torch-written torchvision file, and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import auc as sklearn_auc

from configs import synthetic
from sslocal import checkpointing, evaluate, metrics, sharding
from sslocal.data import builders, pipeline, prepare
from sslocal.models import factory

DATASET = "synthetic_av/tiny"
NUM_TEST = 13
IMAGE = 64  # the tiny preset's frame size
REPO = Path(__file__).resolve().parent.parent


def tiny_config(data_dir, eval_batch_size=8):
    config = synthetic.get_config()
    config.test_datasets = (DATASET,)
    config.data_dir = str(data_dir)
    config.image_size = IMAGE
    config.model.width = 8
    config.model.embed_dim = 16
    config.eval_batch_size = eval_batch_size
    config.eval.report = False
    return config


def record_id(record):
    value = record["id"]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    builders.get_builder(DATASET, data_dir=os.fspath(path), num_train=16, num_test=NUM_TEST,
                         num_workers=1).download_and_prepare()
    return path


@pytest.fixture(scope="module")
def source(data_dir):
    test = prepare.load_split(DATASET, "test", os.fspath(data_dir))
    assert len(test) == NUM_TEST
    return test


@pytest.fixture(scope="module")
def model():
    """A freshly initialised tiny model: (graphdef, params, batch_stats) on the host."""
    net = factory.build_model(ml_collections.ConfigDict(
        {"width": 8, "embed_dim": 16, "dtype": "float32", "image_pretrained": ""}), seed=0)
    graphdef, params, batch_stats = nnx.split(net, nnx.Param, nnx.BatchStat)
    return graphdef, jax.device_get(params), jax.device_get(batch_stats)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    _, params, batch_stats = model
    return checkpointing.save_model(tmp_path_factory.mktemp("m") / "tiny_model",
                                    {"width": 8, "embed_dim": 16}, params, batch_stats)


@pytest.fixture(scope="module")
def result8(model, source, data_dir):
    """The evaluation of the 13-sample test set with batches of 8 on 8 devices."""
    graphdef, params, batch_stats = model
    mesh = sharding.make_mesh(8)
    params, batch_stats = jax.device_put((params, batch_stats), sharding.replicated(mesh))
    evaluator = evaluate.Evaluator(tiny_config(data_dir), graphdef, mesh)
    return evaluator.run(params, batch_stats, source, DATASET)


# -------------------------------------------------------------- independent float64 scoring


def gt_map64(boxes, size=224):
    """VGG-SS ground truth: union of the boxes (end exclusive), binarised."""
    gt = np.zeros((size, size))
    for xmin, ymin, xmax, ymax in np.asarray(boxes).reshape(-1, 4):
        gt[int(ymin):int(ymax), int(xmin):int(xmax)] = 1.0
    return gt


def ciou64(pred_map, gt):
    pred_map = np.asarray(pred_map, np.float64)
    thr = np.sort(pred_map.ravel())[pred_map.size // 2]
    pred = (pred_map >= thr).astype(np.float64)
    return np.sum(pred * gt) / (np.sum(gt) + np.sum(pred * (gt == 0)))


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("global_batch, processes", [(8, 1), (6, 2), (6, 3), (16, 2)])
def test_eval_indices_match_the_loader(source, global_batch, processes):
    """The slot -> test-set index formula agrees with what each host's loader yields."""
    seen = []
    for p in range(processes):
        loader = pipeline.eval_loader(source, global_batch_size=global_batch, image_size=IMAGE,
                                      gt_format="vggss", process_index=p,
                                      process_count=processes, num_threads=1)
        for k, batch in enumerate(loader):
            index = evaluate.eval_indices(k, global_batch, p, processes)
            assert len(index) == len(batch["id"]) == global_batch // processes
            for i, keep, clip_id in zip(index, batch["mask"], batch["id"], strict=True):
                if keep:
                    assert record_id(source[int(i)]) == clip_id
                    seen.append(int(i))
                else:
                    assert i >= NUM_TEST
    assert sorted(seen) == list(range(NUM_TEST))


def test_13_samples_on_8_devices_are_scored_13_times(model, source, data_dir, monkeypatch):
    graphdef, params, batch_stats = model
    mesh = sharding.make_mesh(8)
    assert mesh.size == 8
    params, batch_stats = jax.device_put((params, batch_stats), sharding.replicated(mesh))
    scored = []
    real_ciou = metrics.ciou

    def counting_ciou(pred, gt, threshold="median_ge"):
        scored.append(len(pred))
        return real_ciou(pred, gt, threshold)

    monkeypatch.setattr(evaluate.metrics, "ciou", counting_ciou)
    for batch_size in (8, 16):  # 2 batches (3 padding slots) and 1 batch (3 padding slots)
        scored.clear()
        evaluator = evaluate.Evaluator(tiny_config(data_dir, batch_size), graphdef, mesh)
        result = evaluator.run(params, batch_stats, source, DATASET)
        assert sum(scored) == NUM_TEST
        assert result.summary["N"] == NUM_TEST
        assert len(result.ids) == NUM_TEST == len(set(result.ids))
        # Results are in the test set's order: ids[i] is source[i].
        assert result.ids == [record_id(source[i]) for i in range(NUM_TEST)]
        assert result.cious["av"].shape == result.confidence.shape == (NUM_TEST,)


def test_scores_equal_a_per_sample_float64_recomputation(model, source, result8):
    """Each sample alone through the eval step on one device, scored by the float64 code above:
    the very same cIoU; and the summary follows from the per-sample values."""
    graphdef, params, batch_stats = model
    step = evaluate.make_eval_step(graphdef, sharding.make_mesh(1),
                                   upsample="bilinear_align_corners")
    variables = {"params": params, "batch_stats": batch_stats}
    expected, expected_conf = [], []
    for i in range(NUM_TEST):
        record = source[i]
        image = pipeline.preprocess_eval_image(pipeline.decode_image(record["image"]), IMAGE)
        spec = pipeline.preprocess_spectrogram(record["spectrogram"])
        out = step(variables, image[None], spec[None])
        expected.append(ciou64(np.asarray(out["av"])[0], gt_map64(record["boxes"])))
        raw = np.sort(np.asarray(out["raw"], np.float64)[0].ravel())
        expected_conf.append(raw[-raw.size // 4:].mean())
    expected = np.array(expected)
    np.testing.assert_array_equal(result8.cious["av"], expected)
    np.testing.assert_allclose(result8.confidence, expected_conf, rtol=1e-6)
    assert len(np.unique(expected)) > 5  # a real spread of values, not a degenerate map

    t = np.arange(21) / 20
    success = np.array([np.mean(expected >= x) for x in t])
    summary = result8.summary
    assert summary["cIoU"] == pytest.approx(np.mean(expected >= 0.5), abs=1e-12)
    assert summary["AUC"] == pytest.approx(sklearn_auc(t, success), abs=1e-12)
    assert summary["mean_cIoU"] == pytest.approx(expected.mean(), abs=1e-12)
    assert summary["protocol_variant"]["prediction_threshold"] == "median_ge"
    assert "AP" not in summary  # every synthetic tiny sample is sounding


def test_local_maps_match_the_sharded_step(model, source, data_dir, result8):
    """The report's un-sharded map function gives the evaluation's maps."""
    graphdef, params, batch_stats = model
    mesh = sharding.make_mesh(8)
    params8, stats8 = jax.device_put((params, batch_stats), sharding.replicated(mesh))
    evaluator = evaluate.Evaluator(tiny_config(data_dir), graphdef, mesh)
    maps = evaluator.local_maps(params8, stats8)
    records = [source[i] for i in range(3)]
    image = np.stack([pipeline.preprocess_eval_image(pipeline.decode_image(r["image"]), IMAGE)
                      for r in records])
    spec = np.stack([pipeline.preprocess_spectrogram(r["spectrogram"]) for r in records])
    out = maps(image, spec)
    assert set(out) == {"raw", "av"} and out["av"].shape == (3, 224, 224)
    got = [ciou64(out["av"][i], gt_map64(r["boxes"])) for i, r in enumerate(records)]
    np.testing.assert_allclose(got, result8.cious["av"][:3], atol=1e-6)


# ------------------------------------------------------------------------------------- OGL


def torchvision_resnet18(width=8):
    """A torchvision-layout ResNet18, random weights and BatchNorm statistics, in eval mode."""
    from tests.torch_reference import TorchResNet18, randomize

    net = TorchResNet18(3, width)
    randomize(net, 3)
    return net.eval()


def test_ogl_end_to_end_with_a_torchvision_file(model_dir, source, data_dir, tmp_path):
    torch = pytest.importorskip("torch")
    net = torchvision_resnet18()
    weights = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), weights)
    config = tiny_config(data_dir)
    config.eval.ogl_weights = str(weights)
    out = tmp_path / "eval"
    summaries = evaluate.main(config, [str(model_dir)], ogl=True, out=str(out))
    (summary,) = summaries.values()
    for key in ("ogl_cIoU", "ogl_AUC", "ogl_mean_cIoU"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["protocol_variant"]["ogl_alpha"] == 0.4
    written = json.loads((out / "metrics.json").read_text())
    assert written[next(iter(summaries))]["ogl_cIoU"] == summary["ogl_cIoU"]
    (per_sample_file,) = (out / "per_sample").glob("*.json")
    per_sample = json.loads(per_sample_file.read_text())
    assert len(per_sample["cIoU_ogl"]) == len(per_sample["cIoU_av"]) == NUM_TEST
    assert per_sample["cIoU_ogl"] != per_sample["cIoU_av"]
    assert per_sample["protocol_variant"]["ogl_alpha"] == 0.4

    # The fused map of one sample against torch + float64 numpy (PROTOCOL 5).
    mesh = sharding.make_mesh(8)
    graphdef, params, batch_stats, _ = evaluate.load_for_eval(model_dir, config, mesh)
    evaluator = evaluate.Evaluator(config, graphdef, mesh, ogl=True)
    record = source[0]
    image = pipeline.preprocess_eval_image(pipeline.decode_image(record["image"]), IMAGE)[None]
    spec = pipeline.preprocess_spectrogram(record["spectrogram"])[None]
    maps = evaluator.local_maps(params, batch_stats)(image, spec)
    with torch.no_grad():
        features = net.features(torch.from_numpy(image).permute(0, 3, 1, 2).contiguous())
        obj = features.abs().mean(1, keepdim=True).double()
        obj = torch.nn.functional.interpolate(obj, size=(224, 224), mode="bilinear",
                                              align_corners=True)[0, 0].numpy()

    def minmax(x):
        return (x - x.min()) / (x.max() - x.min())

    av = minmax(np.asarray(maps["raw"][0], np.float64))
    fused = minmax(0.4 * av + 0.6 * minmax(obj))
    np.testing.assert_allclose(maps["ogl"][0], fused, atol=2e-4)
    assert per_sample["cIoU_ogl"][0] == pytest.approx(
        ciou64(maps["ogl"][0], gt_map64(record["boxes"])), abs=1e-6)


# ------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_evaluate_with_report(model_dir, data_dir, tmp_path):
    out = tmp_path / "cli_eval"
    cmd = [sys.executable, "-m", "sslocal", "evaluate", "--config", "configs/synthetic.py",
           f"--config.data_dir={data_dir}", f"--config.image_size={IMAGE}",
           "--config.eval_batch_size=8", "--config.model.width=8",
           "--config.model.embed_dim=16", f"--dataset={DATASET}",
           f"--checkpoint={model_dir}", "--report", f"--out={out}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cIoU" in proc.stdout and "tiny_model / synthetic_av/tiny" in proc.stdout
    written = json.loads((out / "metrics.json").read_text())
    summary = written[f"tiny_model / {DATASET}"]
    assert summary["N"] == NUM_TEST
    assert 0.0 <= summary["cIoU"] <= 1.0 and 0.0 <= summary["AUC"] <= 1.0
    assert summary["protocol_variant"]["threshold_rule"].startswith("map >=")
    assert summary["checkpoint"] == str(model_dir)
    per_sample = json.loads((out / "per_sample" / "tiny_model_synthetic_av_tiny.json")
                            .read_text())
    assert len(per_sample["ids"]) == NUM_TEST and "protocol_variant" in per_sample
    html = (out / "report.html").read_text()
    assert "tiny_model" in html and "<table" in html
    assert (out / "plots").is_dir() and list((out / "overlays").glob("*.png"))


# ---------------------------------------------------------------------------- small parts


def test_model_labels_are_short_and_unique():
    assert evaluate.model_labels(["runs/margin/best", "runs/ezvsl/best"]) == [
        "margin/best", "ezvsl/best"]
    assert evaluate.model_labels(["a/x", "b/y/"]) == ["x", "y"]
    same = evaluate.model_labels(["/r/m", "/r/m"])
    assert same == ["/r/m", "/r/m (2)"]


def test_bad_input(model, data_dir, source):
    with pytest.raises(ValueError, match="at least one checkpoint"):
        evaluate.main(tiny_config(data_dir), [])
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        evaluate.main(tiny_config(data_dir, eval_batch_size=12), ["unused"])
    graphdef, params, batch_stats = model
    evaluator = evaluate.Evaluator(tiny_config(data_dir), graphdef, sharding.make_mesh(8))
    with pytest.raises(ValueError, match="is empty"):
        evaluator.run(params, batch_stats, [], DATASET)
    with pytest.raises(ValueError, match="eval.threshold"):
        evaluate.parse_threshold("median")
