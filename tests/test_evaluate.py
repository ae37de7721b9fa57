"""Evaluation: every sample scored exactly once on 8 devices, exact cIoU against a per-sample
float64 recomputation, OGL end to end from a torch-written torchvision file, and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import auc as sklearn_auc

from configs import tiny
from sslocal import checkpointing, evaluate, evaluator, metrics, sharding
from sslocal.data import builders, pipeline, prepare
from sslocal.models import factory, load

DATASET = "synthetic_av/tiny"
NUM_TEST = 13
IMAGE = 64  # the tiny preset's frame size
REPO = Path(__file__).resolve().parent.parent


def tiny_config(data_dir, eval_batch_size=8):
    config = tiny.get_config()
    config.data_dir = str(data_dir)
    config.eval_batch_size = eval_batch_size
    return config


record_id = pipeline.record_id


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
def model_dir(tmp_path_factory):
    """A freshly initialised tiny model, saved as a model directory."""
    config = tiny.get_config()
    net = factory.build_model(config.model, seed=0)
    _, params, batch_stats = nnx.split(net, nnx.Param, nnx.BatchStat)
    return checkpointing.save_model(
        tmp_path_factory.mktemp("m") / "tiny_model",
        {**config.model.to_dict(), "image_size": IMAGE}, params, batch_stats)


@pytest.fixture(scope="module")
def model8(model_dir):
    return load.load_model(model_dir, mesh=sharding.make_mesh(8))


@pytest.fixture(scope="module")
def result8(model8, source, data_dir):
    """The evaluation of the 13-sample test set with batches of 8 on 8 devices."""
    scorer = evaluator.Evaluator(tiny_config(data_dir), sharding.make_mesh(8))
    return scorer.run(model8, source, DATASET)


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


def test_13_samples_on_8_devices_are_scored_13_times(model8, source, data_dir, monkeypatch):
    mesh = sharding.make_mesh(8)
    assert mesh.size == 8
    scored = []
    real_ciou = metrics.ciou

    def counting_ciou(pred, gt, threshold="median_ge"):
        scored.append(len(pred))
        return real_ciou(pred, gt, threshold)

    monkeypatch.setattr(evaluator.metrics, "ciou", counting_ciou)
    for batch_size in (8, 16):  # 2 batches (3 padding slots) and 1 batch (3 padding slots)
        scored.clear()
        scorer = evaluator.Evaluator(tiny_config(data_dir, batch_size), mesh)
        result = scorer.run(model8, source, DATASET)
        assert sum(scored) == NUM_TEST
        assert result.summary["N"] == NUM_TEST and result.summary["image_size"] == IMAGE
        assert len(result.ids) == NUM_TEST == len(set(result.ids))
        # Results are in the test set's order: ids[i] is source[i].
        assert result.ids == [record_id(source[i]) for i in range(NUM_TEST)]
        assert result.cious["av"].shape == result.confidence.shape == (NUM_TEST,)


def test_scores_equal_a_per_sample_float64_recomputation(model_dir, source, data_dir, result8):
    """Each sample alone through the evaluator on one device, scored by the float64 code
    above: the very same cIoU; and the summary follows from the per-sample values."""
    model1 = load.load_model(model_dir, mesh=sharding.make_mesh(1))
    scorer = evaluator.Evaluator(tiny_config(data_dir), sharding.make_mesh(1))
    expected, expected_conf = [], []
    for i in range(NUM_TEST):
        record = source[i]
        out = scorer.maps(model1, [pipeline.decode_image(record["image"])],
                          pipeline.stored_spectrogram(record["spectrogram"])[None])
        expected.append(ciou64(out["av"][0], gt_map64(record["boxes"])))
        raw = np.sort(np.asarray(out["raw"], np.float64)[0].ravel())
        expected_conf.append(raw[-raw.size // 4:].mean())
    expected = np.array(expected)
    np.testing.assert_array_equal(result8.cious["av"], expected)
    np.testing.assert_allclose(result8.confidence, expected_conf, rtol=1e-6)
    assert len(np.unique(expected)) > 5  # a real spread of values, not a degenerate map
    assert scorer.num_traces == 1  # 13 calls of one padded batch: one compilation

    t = np.arange(21) / 20
    success = np.array([np.mean(expected >= x) for x in t])
    summary = result8.summary
    assert summary["cIoU"] == pytest.approx(np.mean(expected >= 0.5), abs=1e-12)
    assert summary["AUC"] == pytest.approx(sklearn_auc(t, success), abs=1e-12)
    assert summary["mean_cIoU"] == pytest.approx(expected.mean(), abs=1e-12)
    assert summary["protocol_variant"]["prediction_threshold"] == "median_ge"
    assert "AP" not in summary  # every synthetic tiny sample is sounding


def test_maps_match_the_sharded_evaluation(model8, source, data_dir, result8):
    """Evaluator.maps (report overlays, localize) gives the evaluation's maps."""
    scorer = evaluator.Evaluator(tiny_config(data_dir), sharding.make_mesh(8))
    records = [source[i] for i in range(3)]
    out = scorer.maps(model8, [pipeline.decode_image(r["image"]) for r in records],
                      np.stack([pipeline.stored_spectrogram(r["spectrogram"]) for r in records]))
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

    # The fused map of one sample against torch + float64 numpy (docs/protocol.md section 5).
    mesh = sharding.make_mesh(8)
    scorer = evaluator.Evaluator(config, mesh, ogl=True)
    record = source[0]
    frame = pipeline.decode_image(record["image"])
    maps = scorer.maps(load.load_model(model_dir, mesh=mesh), [frame],
                       pipeline.stored_spectrogram(record["spectrogram"])[None])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    image = ((frame / 255.0 - mean) / std).astype(np.float32)[None]
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
    # The demo's config says 112 px; the model was trained at 64 (its model.json): 64 is used.
    cmd = [sys.executable, "-m", "sslocal", "evaluate", "--config", "configs/synthetic.py",
           f"--config.data_dir={data_dir}", "--config.eval_batch_size=8", f"--dataset={DATASET}",
           f"--checkpoint={model_dir}", "--report", f"--out={out}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cIoU" in proc.stdout and "tiny_model / synthetic_av/tiny" in proc.stdout
    written = json.loads((out / "metrics.json").read_text())
    summary = written[f"tiny_model / {DATASET}"]
    assert summary["N"] == NUM_TEST and summary["image_size"] == IMAGE
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


def test_bad_input(model8, data_dir, source):
    with pytest.raises(ValueError, match="at least one checkpoint"):
        evaluate.main(tiny_config(data_dir), [])
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        evaluate.main(tiny_config(data_dir, eval_batch_size=12), ["unused"])
    with pytest.raises(FileNotFoundError, match="no/such/run"):
        evaluate.main(tiny_config(data_dir), ["/no/such/run"])
    scorer = evaluator.Evaluator(tiny_config(data_dir), sharding.make_mesh(8))
    with pytest.raises(ValueError, match="is empty"):
        scorer.run(model8, [], DATASET)
    with pytest.raises(ValueError, match="eval.threshold"):
        evaluator.parse_threshold("median")


def test_untrained_baseline_does_not_depend_on_the_checkpoints(model_dir, data_dir, source,
                                                               tmp_path):
    """The "untrained" row is config.model's initialisation, whatever models are evaluated
    beside it and in whichever order (a wider model first used to change it)."""
    config = tiny_config(data_dir)
    wide = tiny.get_config()
    wide.model.width = 16
    net = factory.build_model(wide.model, seed=3)
    _, params, batch_stats = nnx.split(net, nnx.Param, nnx.BatchStat)
    wide_dir = checkpointing.save_model(tmp_path / "wide", {**wide.model.to_dict(),
                                        "image_size": IMAGE}, params, batch_stats)
    rows = []
    for order in ([model_dir, wide_dir], [wide_dir, model_dir]):
        summaries = evaluate.main(config, [str(p) for p in order], baselines=True,
                                  out=str(tmp_path / f"out{len(rows)}"))
        rows.append(summaries[f"untrained / {DATASET}"])
    assert rows[0]["cIoU"] == rows[1]["cIoU"] and rows[0]["AUC"] == rows[1]["AUC"]
    assert rows[0]["checkpoint"] == f"config.model initialised with seed {config.seed}"


def test_a_named_test_subset_is_scored_recorded_and_its_missing_ids_reported(
        model_dir, data_dir, source, result8, tmp_path, capsys):
    chosen = [record_id(source[i]) for i in (7, 2, 11)]
    ids_file = tmp_path / "subset_3.txt"
    ids_file.write_text("\n".join([*chosen, "not_in_the_set", chosen[0]]) + "\n")
    summaries = evaluate.main(tiny_config(data_dir), [str(model_dir)], ids=str(ids_file),
                              out=str(tmp_path / "out"))
    (summary,) = summaries.values()
    assert summary["N"] == 3
    subset = summary["test_subset"]
    assert (subset["name"], subset["size"], subset["N_found"]) == ("subset_3.txt", 4, 3)
    assert subset["missing"] == ["not_in_the_set"] and len(subset["sha256"]) == 64
    assert "1 of the 4 ids of subset_3.txt are not in the prepared set" in capsys.readouterr().out
    (per_sample_file,) = (tmp_path / "out" / "per_sample").glob("*.json")
    per_sample = json.loads(per_sample_file.read_text())
    assert per_sample["ids"] == chosen and per_sample["test_subset"]["sha256"] == subset["sha256"]
    np.testing.assert_array_equal(per_sample["cIoU_av"], result8.cious["av"][[7, 2, 11]])
    with pytest.raises(FileNotFoundError, match="test id list not found"):
        evaluate.main(tiny_config(data_dir), [str(model_dir)], ids=str(tmp_path / "none.txt"))


# ------------------------------------------------- the benchmarks since 2023: the wiring


def test_offscreen_partners_follow_the_classes_and_never_the_picture():
    # IS3-like: each image shows the classes of its pairs; a partner is another image's pair
    # of a class the image does not show.
    info = {"id": ["a_x", "a_y", "b_x", "b_z", "c_w", "c_v"], "label": [-1] * 6,
            "image_id": ["a", "a", "b", "b", "c", "c"],
            "source_name": ["x", "y", "x", "z", "w", "v"]}
    shown = {"a": {"x", "y"}, "b": {"x", "z"}, "c": {"w", "v"}}
    partner, rule = evaluator.offscreen_partners(info, seed=0)
    for i, j in enumerate(partner):
        assert info["image_id"][j] != info["image_id"][i]
        assert info["source_name"][j] not in shown[info["image_id"][i]]
    assert "absent from the image" in rule and "seed (config.seed 0" in rule
    np.testing.assert_array_equal(evaluator.offscreen_partners(info, seed=0)[0], partner)
    # Labelled clips: a class drawn uniformly (not a clip: vssl_eval's random.choice of a
    # class, then of a file), so the rare class 2 is drawn about as often as class 1.
    labels = [0] * 50 + [1] * 45 + [2] * 5
    info = {"id": [f"v{i}" for i in range(100)], "label": labels}
    partner, rule = evaluator.offscreen_partners(info, seed=3)
    drawn = np.array(labels)[partner]
    assert np.all(drawn != np.array(labels)) and "another class" in rule
    assert 0.3 < np.mean(drawn[:50] == 2) < 0.7  # uniform over clips would give 0.1
    # A set with non-sounding pairs (label unknown): they borrow a sounding clip's audio of
    # any class, and never lend theirs (not their picture's, class unknown).
    info = {"id": ["s0", "s1", "s2", "n0"], "label": [0, 1, 1, -1],
            "sounding": [True, True, True, False]}
    partner, rule = evaluator.offscreen_partners(info, seed=1)
    assert "another class" in rule and 3 not in partner.tolist()
    assert partner[0] in (1, 2) and partner[1] == partner[2] == 0
    # Without labels: any clip of another video.
    info = {"id": ["p_1", "p_2", "q_1", "q_2"], "label": [-1] * 4,
            "video_id": ["p", "p", "q", "q"]}
    partner, rule = evaluator.offscreen_partners(info, seed=0)
    assert [info["video_id"][j] for j in partner] == ["q", "q", "p", "p"]
    assert "no class labels" in rule
    with pytest.raises(ValueError, match="no off-screen sound for s0"):
        evaluator.offscreen_partners({"id": ["s0", "s1"], "label": [4, 4]}, seed=0)


def test_negative_spectrograms_are_the_stored_spectrograms_of_their_audio():
    import scipy.signal

    def stored(wave):
        _, _, s = scipy.signal.spectrogram(wave, fs=16000, nperseg=512, noverlap=274)
        # float32 first, as the reference spectrogram is, then float16 as prepare stores it.
        return np.log(s + 1e-7).astype(np.float32).astype(np.float16)[..., None]

    noise = np.random.default_rng([7, 1, 5]).standard_normal(48000)
    np.testing.assert_array_equal(evaluator.noise_spectrogram(7, 5), stored(noise))
    assert not np.array_equal(evaluator.noise_spectrogram(7, 6), evaluator.noise_spectrogram(7, 5))
    np.testing.assert_array_equal(evaluator.silence_spectrogram(), stored(np.zeros(48000)))
    record = {"spectrogram": np.arange(257 * 200, dtype=np.float16).reshape(257, 200)}
    got = evaluator.negative_spectrogram("offscreen", 0, [None, record], 0, np.array([1, 0]))
    np.testing.assert_array_equal(got[..., 0], record["spectrogram"])
    with pytest.raises(ValueError, match="unknown negative audio"):
        evaluator.negative_spectrogram("music", 0, [record], 0)


def test_benchmark_options_are_checked_and_named(data_dir):
    config = tiny_config(data_dir)
    config.eval.negative_audio = ("silence,noise",)  # as a command line delivers it
    config.eval.negative_threshold = "0.25"
    settings = evaluator.BenchmarkSettings.from_config(config.eval)
    assert settings.negative_audio == ("silence", "noise")
    assert settings.negative_threshold == 0.25 and settings.mask_threshold == "median_gt"
    for field, value, message in (("negative_audio", ("silence", "loud"), "negative_audio"),
                                  ("negative_audio", ("noise", "noise"), "distinct"),
                                  ("negative_threshold", "high", "negative_threshold"),
                                  ("retrieval_pooling", "sum", "retrieval_pooling"),
                                  ("mask_threshold", "middle", "mask_threshold")):
        bad = tiny_config(data_dir)
        bad.eval[field] = value
        with pytest.raises(ValueError, match=message):
            evaluator.Evaluator(bad, sharding.make_mesh(8))
    assert evaluate.dataset_names(" is3/test, avsbench/s4 ") == ["is3/test", "avsbench/s4"]
    with pytest.raises(ValueError, match="more than once"):
        evaluate.dataset_names("is3/test,is3/test")
    with pytest.raises(ValueError, match="names no test set"):
        evaluate.dataset_names(" , ")
    assert evaluator.benchmark_kind("is3/test") == "is3"
    assert evaluator.benchmark_kind("avsbench/ms3_centre") == "avsbench"
    assert evaluator.benchmark_kind("vggss/test") == "boxes"
