"""Bucket paths end to end against a real GCS JSON API on 127.0.0.1 (gcp-storage-emulator, started
and stopped here): a tiny synthetic dataset prepared into the bucket and read back by the Grain
loader (ArrayRecord's own GCS reader), training with the workdir in the bucket (Orbax through
TensorStore's GCS driver, config.json, metrics.jsonl, TensorBoard events), SIGTERM and a
bitwise resume from the bucket, the best checkpoint, evaluate and localize from the bucket
checkpoint (inputs and outputs in the bucket), and no local `gs:` folder anywhere.

Every client reaches the emulator through its own documented switch: gcsfs and
google-cloud-storage STORAGE_EMULATOR_HOST, TensorStore TENSORSTORE_GCS_HTTP_URL, ArrayRecord's
reader (google-cloud-cpp) CLOUD_STORAGE_EMULATOR_ENDPOINT. gcsfs's gRPC probe (60 s before it
falls back to JSON) is turned off with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import jax
import numpy as np
import pytest

# Not imported here: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when it is first imported.
if find_spec("gcsfs") is None or find_spec("gcp_storage_emulator") is None:
    pytest.skip("needs the gcs and test extras: pip install sslocal[gcs,test]",
                allow_module_level=True)

from configs import tiny  # noqa: E402
from sslocal import checkpointing, train, writers  # noqa: E402
from sslocal.models import load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "sslocal-test"  # GCS bucket names have 3 to 63 characters
DATASET = "synthetic_av/tiny"

# The emulator, with two things of a media download that real GCS has and it lacks:
# - the object's generation in x-goog-generation, which TensorStore's GCS driver reads (OCDBT,
#   Orbax's format, makes its manifest writes conditional on it; without it they fail with
#   "Malformed StorageGeneration");
# - suffix ranges ("Range: bytes=-N", the last N bytes), with which ArrayRecord's reader reads a
#   file's footer; the emulator answers them with the whole object, which the reader then takes
#   for the footer ("Invalid Riegeli/records file ... Failed to read RiegeliPostscript");
# and one method: objects.move (POST .../o/SRC/moveTo/o/DST), which gcsfs tries first for every
# rename (TFDS renames each file it writes) and retries for 30 s on the emulator's 501 before it
# falls back to copy + delete. Everything else is the package's own server.
EMULATOR = r"""
import re
import sys
from http import HTTPStatus
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

original = objects.download

def download(request, response, storage, *args, **kwargs):
    try:
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        obj = storage.get_file_obj(bucket, name)
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
        suffix = re.fullmatch(r"\s*bytes=-([0-9]+)\s*", request.get_header("range") or "")
        if suffix:
            size = len(storage.get_file(bucket, name))
            headers = request._request_handler.headers
            del headers["Range"]
            headers["Range"] = f"bytes={max(0, size - int(suffix.group(1)))}-"
    except Exception:  # not found: the original handler answers 404
        pass
    return original(request, response, storage, *args, **kwargs)

def move(request, response, storage, *args, **kwargs):
    bucket = request.params["bucket_name"]
    try:
        moved = objects._copy(request.base_url, storage, bucket, request.params["object_id"],
                              bucket, request.params["dest_object_id"])
        objects._delete(storage, bucket, request.params["object_id"])
        response.json(moved)
    except objects.NotFound:
        response.status = HTTPStatus.NOT_FOUND

objects.download = download  # objects.get (alt=media) looks it up here
for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
        if handler is original:
            methods[method] = download
server.HANDLERS = ((r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
                    r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {server.POST: move}),
                   *server.HANDLERS)
server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True,
                     default_bucket=sys.argv[2]).run()
"""

EMULATOR_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                "CLOUD_STORAGE_EMULATOR_ENDPOINT", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module's runs: the same train and eval
    programs compile once, not once per run (they dominate the time of a tiny run)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {name: jax.config.values[name] for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0)
    jax.config.update(names[2], 0)
    cc.reset_cache()  # whether a cache is used is decided once, at the first compilation
    try:
        yield
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        cc.reset_cache()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's URL, with every client pointed at it and the working directory in a
    fresh folder (where a folded gs:/ path would land, and be seen)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", EMULATOR, str(port), BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the storage emulator did not start (exit {proc.poll()})")
            time.sleep(0.1)
    assert "gcsfs" not in sys.modules, "gcsfs was imported before its gRPC probe was turned off"
    saved = {k: os.environ.get(k) for k in EMULATOR_ENV}
    os.environ.update({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                       "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
                       "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
    cwd = os.getcwd()
    work = tmp_path_factory.mktemp("cwd")
    os.chdir(work)
    try:
        yield {"url": url, "cwd": work}
    finally:
        os.chdir(cwd)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def assert_no_local_gs_folder(*folders):
    """pathlib folds gs://b/x into gs:/b/x, and pathlib.Path(epath.Path("gs://b/x")) is
    /gs/b/x: no such folder anywhere sslocal could write."""
    stray = f"/gs/{BUCKET}"
    if os.path.exists(stray):  # removed (it is this test's bucket name), then reported
        shutil.rmtree(stray, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir("/gs")
        pytest.fail(f"a local {stray} folder was written")
    for folder in {*map(str, folders), os.getcwd(), tempfile.gettempdir(), str(REPO)}:
        for root, dirs, _ in os.walk(folder):
            assert "gs:" not in dirs, f"a local gs: folder in {root}"
            if root != folder:  # the top of each folder, and one level down: fast enough
                dirs.clear()


def test_paths_stay_urls_and_append(gcs):
    url = f"gs://{BUCKET}/paths"
    path = writers.as_path(url)
    assert os.fspath(path) == url and writers.is_url(path)
    assert os.fspath(writers.as_path(Path(url))) == url  # pathlib's gs:/ folded back
    assert os.fspath(writers.absolute(url)) == url
    assert not writers.is_url(writers.as_path("~/x")) and "~" not in os.fspath(
        writers.as_path("~/x"))
    writers.append_text(path / "a.jsonl", "1\n")
    writers.append_text(path / "a.jsonl", "2\n")  # an object is rewritten whole
    assert (path / "a.jsonl").read_text() == "1\n2\n"
    assert_no_local_gs_folder(gcs["cwd"])


def test_a_missing_extra_is_one_line_before_anything_runs(tmp_path):
    """`sslocal train --workdir gs://...` without gcsfs: one line naming the extra, nothing run
    or written (gcsfs hidden from the import system in a fresh process)."""
    code = ("import sys; sys.modules['gcsfs'] = None; from sslocal import cli; "
            "cli.run(sys.argv)")
    out = subprocess.run(
        [sys.executable, "-c", code, "train", "--config", str(REPO / "configs" / "tiny.py"),
         "--workdir", "gs://my-bucket/runs/demo"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "gs://my-bucket/runs/demo" in lines[0]
    assert "needs `pip install sslocal[gcs]`" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no gs: folder, nothing else


def config_for(data_dir, max_steps):
    config = tiny.get_config()
    config.data_dir = data_dir
    config.max_steps = max_steps  # 32 training scenes, batches of 8: 4 steps an epoch
    config.log_every_steps = 2
    config.checkpoint_every_steps = 100
    return config


def latest_params(workdir):
    model = load.load_model(workdir, which="latest")
    return jax.device_get(model.params), model.description


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(gcs, compilation_cache, tmp_path_factory):
    """The dataset prepared into the bucket; a straight 6-step run (local workdir, data in the
    bucket, no evaluation: only its parameters are compared); a run in the bucket stopped by
    SIGTERM after step 3, then resumed to step 6."""
    from sslocal.data import prepare

    data_dir = f"gs://{BUCKET}/tfds"
    manifest = prepare.prepare(DATASET, data_dir=data_dir, num_train=32, num_test=8,
                               num_workers=1)
    straight = tmp_path_factory.mktemp("straight")
    reference = config_for(data_dir, 6)
    reference.test_datasets = ()
    train.train_and_evaluate(reference, straight)

    workdir = f"gs://{BUCKET}/runs/demo"
    make_step = train.make_train_step

    def make_preempted_step(*args, **kwargs):  # SIGTERM arrives while step 3 runs
        step = make_step(*args, **kwargs)

        def preempted(state, batch):
            if int(state.step) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(state, batch)

        return preempted

    train.make_train_step = make_preempted_step
    try:
        preempted = train.train_and_evaluate(config_for(data_dir, 6), workdir)
    finally:
        train.make_train_step = make_step
    checkpoints = writers.as_path(workdir) / "checkpoints"
    after_preemption = sorted(p.name for p in checkpoints.iterdir())
    # A save of step 4 killed midway, as a bucket keeps it: the step's folder with some of its
    # files and no commit_success.txt. It is not the latest step, and the resume replaces it.
    (checkpoints / "4" / "state").mkdir(parents=True, exist_ok=True)
    (checkpoints / "4" / "_CHECKPOINT_METADATA").write_text("{}")
    (checkpoints / "4" / "state" / "manifest.ocdbt").write_bytes(b"partial")
    latest_before_resume = checkpointing.latest_saved_step(workdir)
    resumed_config = config_for(data_dir, 6)
    resumed_config.keep_checkpoints = 3  # a change a resume records in config_changes.jsonl
    results = train.train_and_evaluate(resumed_config, workdir)
    return {"data_dir": data_dir, "manifest": manifest, "straight": straight,
            "workdir": workdir, "preempted": preempted, "after_preemption": after_preemption,
            "latest_before_resume": latest_before_resume, "results": results}


@pytest.mark.slow
def test_prepare_train_preempt_and_resume_bitwise_in_the_bucket(gcs, run):
    bucket = writers.as_path(f"gs://{BUCKET}")
    version = bucket / "tfds" / "synthetic_av" / "tiny" / "1.0.0"
    assert (version / "dataset_info.json").is_file() and (version / "manifest.json").is_file()
    shards = [p.name for p in version.iterdir() if ".array_record" in p.name]
    assert any("train" in s for s in shards) and any("test" in s for s in shards)
    assert run["manifest"]["splits"]["train"]["written"] == 32

    assert run["preempted"] == {"preempted_at_step": 3}
    assert run["after_preemption"] == ["3"]
    assert run["latest_before_resume"] == 3  # the half-written step 4 does not count
    workdir = writers.as_path(run["workdir"])
    # Orbax marks a finished step in a bucket with commit_success.txt (no renames there).
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "4", "6"]
    for step in ("3", "4", "6"):
        assert (workdir / "checkpoints" / step / "commit_success.txt").is_file()
    expected, _ = latest_params(run["straight"])
    got, what = latest_params(run["workdir"])
    assert what == f"{run['workdir']}/checkpoints/6"
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)

    # The run's record files, in the bucket: config.json, the resume's change, every metric
    # line of both runs (objects are rewritten whole), TensorBoard events of both runs.
    assert json.loads((workdir / "config.json").read_text())["keep_checkpoints"] == 2
    (change,) = read_jsonl(workdir / train.CONFIG_CHANGES)
    assert change["step"] == 3 and change["changed"] == {"keep_checkpoints": [2, 3]}
    lines = read_jsonl(workdir / "metrics.jsonl")
    assert [x["step"] for x in lines if "train/loss" in x] == [2, 3, 4, 6]
    evals = {x["step"]: x[f"eval/{DATASET}/cIoU"] for x in lines
             if f"eval/{DATASET}/cIoU" in x}
    assert sorted(evals) == [4, 6]
    assert len(list((workdir / "tb").glob("events.out.tfevents.*"))) == 2
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final == json.loads(json.dumps(run["results"]))
    assert final[DATASET]["cIoU"] == evals[6]

    # The best checkpoint: the evaluated step with the highest cIoU.
    best = load.load_model(run["workdir"])
    best_step = int(best.description.rsplit("/", 1)[1])
    assert best.description.startswith(f"{run['workdir']}/best/")
    assert evals[best_step] == max(evals.values())
    assert_no_local_gs_folder(gcs["cwd"], run["straight"])


@pytest.mark.slow
def test_localize_from_the_bucket_checkpoint_into_the_bucket(gcs, run, tmp_path):
    from sslocal import localize
    from sslocal.data import synthetic

    scene = synthetic.make_scene(synthetic.PRESETS["tiny"], 0)
    frame, audio = synthetic.write_scene(tmp_path, "clip", scene)
    inputs = writers.as_path(f"gs://{BUCKET}/inputs")
    writers.upload(frame, inputs / "clip.jpg")
    writers.upload(audio, inputs / "clip.wav")
    out = f"gs://{BUCKET}/localize"
    summary = localize.main(checkpoint=run["workdir"], image=f"{inputs}/clip.jpg",
                            audio=f"{inputs}/clip.wav", out=out, config=tiny.get_config())
    assert summary["checkpoint"].startswith(f"{run['workdir']}/best/")
    out = writers.as_path(out)
    with (out / "map.npy").open("rb") as f:
        heatmap = np.load(f)
    assert heatmap.shape == (224, 224) and 0 <= heatmap.min() <= heatmap.max() <= 1
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "localize.json").read_text())["image_size"] == 64
    assert_no_local_gs_folder(gcs["cwd"], tmp_path)


@pytest.mark.slow
def test_evaluate_from_the_bucket_checkpoint_into_the_bucket(gcs, run):
    from sslocal import evaluate

    out = f"gs://{BUCKET}/eval"
    config = config_for(run["data_dir"], 6)
    config.eval.report = True
    try:
        summaries = evaluate.main(config, [run["workdir"]], out=out, report=True)
    finally:
        assert_no_local_gs_folder(gcs["cwd"])
    out = writers.as_path(out)
    written = json.loads((out / "metrics.json").read_text())
    (label,) = [k for k in written if k.endswith(f" / {DATASET}")]
    assert written[label]["cIoU"] == summaries[label]["cIoU"]
    assert written[label]["checkpoint"].startswith(f"{run['workdir']}/best/")
    assert list((out / "per_sample").iterdir())
    assert "<html" in (out / "report.html").read_text().lower()
    assert list((out / "plots").glob("*.png")) and list((out / "overlays").glob("*.png"))
