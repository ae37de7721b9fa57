"""sharding.initialize_distributed: which multi-host start each environment gets.

Every environment is faked the way it presents itself to JAX's own cluster detection
(jax/_src/clusters/): SLURM and Open MPI through their variables, a Cloud TPU VM through what
GceTpuCluster reads (the TPU found at import, the GCE metadata server's attributes; the metadata
function is replaced, so no network is touched), GKE TPUs through TPU_WORKER_HOSTNAMES.
`jax.distributed.initialize` is recorded instead of run, and JAX's own resolution of a no-argument
call is checked too. The last tests start two real processes per environment (localhost, CPU
collectives) and check that the preemption service PreemptionWatch relies on is up and stops
both processes after the same step. This file is also their worker (`python test_sharding.py`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from sslocal import sharding

_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
             "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_SERVICE_HOST")


def _no_metadata_server(key):
    raise AssertionError(f"the GCE metadata server was queried for {key!r} off a TPU VM")


def _fake_metadata_server(attributes: dict[str, str], asked: list[str] | None = None):
    """What cloud_tpu_cluster.get_metadata returns on a TPU VM: (text, HTTP status)."""

    def get_metadata(key):
        if asked is not None:
            asked.append(key)
        if key in attributes:
            return attributes[key], 200
        return "", 404

    return get_metadata


def _fake_tpu_vm(monkeypatch, attributes: dict[str, str], asked: list[str] | None = None):
    """A Cloud TPU VM as GceTpuCluster sees it: a TPU found when JAX was imported (no
    TPU_SKIP_MDS_QUERY) and a metadata server with the slice's attributes."""
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata",
                        _fake_metadata_server(attributes, asked))


@pytest.fixture
def calls(monkeypatch):
    """No cluster around (whatever machine runs the tests); records jax.distributed.initialize
    and jax.config.update instead of running them."""
    for key in list(os.environ):
        if key.startswith(_PREFIXES):
            monkeypatch.delenv(key)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", _no_metadata_server)
    record = {"initialize": [], "config": {}}
    monkeypatch.setattr(jax.distributed, "initialize",
                        lambda *args, **kwargs: record["initialize"].append((args, kwargs)))
    monkeypatch.setattr(jax.config, "update",
                        lambda key, value: record["config"].__setitem__(key, value))
    return record


def _jax_resolves():
    """What a no-argument jax.distributed.initialize() would fill in here (JAX's own code)."""
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None,
                                                                    None, 10)


def _set(monkeypatch, env: dict[str, str]):
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# --- no cluster, flags ---------------------------------------------------------------------


def test_single_process_starts_nothing(calls):
    assert sharding.detect_cluster() is None
    assert sharding.initialize_distributed() == "single"
    assert sharding.initialize_distributed("", 0, -1) == "single"
    assert calls["initialize"] == []


def test_flags_initialize_with_them_and_gloo(calls):
    assert sharding.initialize_distributed("10.0.0.1:8476", 2, 1) == "flags"
    assert calls["initialize"] == [(("10.0.0.1:8476", 2, 1), {})]
    assert calls["config"]["jax_cpu_collectives_implementation"] == "gloo"


def test_jax_variables_stand_in_for_the_flags(calls, monkeypatch):
    _set(monkeypatch, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4",
                       "JAX_PROCESS_ID": "0"})
    assert sharding.initialize_distributed() == "flags"
    assert calls["initialize"] == [(("10.0.0.1:8476", 4, 0), {})]


def test_one_process_by_flag_is_single(calls):
    assert sharding.initialize_distributed("10.0.0.1:8476", 1, 0) == "single"
    assert calls["initialize"] == []


@pytest.mark.parametrize("args", [("10.0.0.1:8476", 0, -1), ("", 2, 0), ("10.0.0.1:8476", 2, -1)])
def test_incomplete_flags_outside_a_cluster_are_an_error(calls, args):
    with pytest.raises(ValueError, match="--coordinator_address, --num_processes"):
        sharding.initialize_distributed(*args)
    assert calls["initialize"] == []


# --- SLURM -----------------------------------------------------------------------------------

# What srun gives each task of `sbatch --nodes=2 --ntasks-per-node=1` (launch/slurm.sbatch).
SLURM_TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[003-004]",
              "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
              "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NNODES": "2"}


def test_slurm_initializes_without_arguments(calls, monkeypatch):
    _set(monkeypatch, SLURM_TASK)
    assert sharding.detect_cluster() == ("slurm", 2)
    assert sharding.initialize_distributed() == "slurm"
    assert calls["initialize"] == [((), {})]
    assert calls["config"]["jax_cpu_collectives_implementation"] == "gloo"
    # JAX itself: coordinator on the first node, port from the job id, id from SLURM_PROCID,
    # and one GPU per task (its local id), which sslocal widens to all the node's GPUs.
    port = 123456 % 2**12 + (65535 - 2**12 + 1)
    assert _jax_resolves() == (f"gpu003:{port}", 2, 1, [0])
    assert calls["config"]["jax_cuda_visible_devices"] == "all"
    assert calls["config"]["jax_rocm_visible_devices"] == "all"


def test_slurm_tasks_sharing_a_node_keep_one_gpu_each(calls, monkeypatch):
    _set(monkeypatch, {**SLURM_TASK, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
                       "SLURM_PROCID": "9", "SLURM_LOCALID": "1"})
    assert sharding.initialize_distributed() == "slurm"
    assert calls["initialize"] == [((), {})]
    assert "jax_cuda_visible_devices" not in calls["config"]


def test_slurm_user_device_ids_are_left_to_jax(calls, monkeypatch):
    _set(monkeypatch, {**SLURM_TASK, "JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert sharding.initialize_distributed() == "slurm"
    assert "jax_cuda_visible_devices" not in calls["config"]


def test_slurm_with_one_task_is_single(calls, monkeypatch):
    _set(monkeypatch, {**SLURM_TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                       "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "1"})
    assert sharding.detect_cluster() == ("slurm", 1)
    assert sharding.initialize_distributed() == "single"
    assert calls["initialize"] == []


def test_slurm_batch_shell_without_srun_is_not_a_cluster(calls, monkeypatch):
    """The sbatch script itself (no step): JAX does not detect it, nor does sslocal."""
    _set(monkeypatch, {k: v for k, v in SLURM_TASK.items() if not k.startswith("SLURM_STEP")})
    assert sharding.detect_cluster() is None
    assert sharding.initialize_distributed() == "single"


def test_slurm_with_an_explicit_coordinator_passes_it_to_jax(calls, monkeypatch):
    _set(monkeypatch, SLURM_TASK)
    assert sharding.initialize_distributed("gpu003:9000") == "slurm"
    assert calls["initialize"] == [((), {"coordinator_address": "gpu003:9000"})]


# --- Cloud TPU VM (GCE metadata server) -------------------------------------------------------

# The metadata attributes of worker 2 of a v4-32 slice (4 workers).
TPU_V4_32 = {"agent-worker-number": "2",
             "worker-network-endpoints": "10.130.0.5,10.130.0.6,10.130.0.7,10.130.0.8",
             "tpu-env": "ACCELERATOR_TYPE: 'v4-32'\nWORKER_ID: '2'\n"}


@pytest.mark.parametrize("endpoints", [
    "10.130.0.5,10.130.0.6,10.130.0.7,10.130.0.8",  # the new format: addresses
    "w-0:0:10.130.0.5,w-1:1:10.130.0.6,w-2:2:10.130.0.7,w-3:3:10.130.0.8",  # name:id:ip
], ids=["addresses", "triples"])
def test_cloud_tpu_vm_initializes_without_arguments(calls, monkeypatch, endpoints):
    asked = []
    _fake_tpu_vm(monkeypatch, {**TPU_V4_32, "worker-network-endpoints": endpoints}, asked)
    assert sharding.detect_cluster() == ("cloud_tpu", 4)
    assert {"agent-worker-number", "worker-network-endpoints"} <= set(asked)
    assert sharding.initialize_distributed() == "cloud_tpu"
    assert calls["initialize"] == [((), {})]
    assert calls["config"]["jax_cpu_collectives_implementation"] == "gloo"
    assert "jax_cuda_visible_devices" not in calls["config"]
    # JAX itself: worker 0 coordinates on its fixed port; this is process 2 of 4.
    assert _jax_resolves() == ("10.130.0.5:8482", 4, 2, None)


def test_cloud_tpu_multislice_counts_every_slice(calls, monkeypatch):
    tpu_env = ("MEGASCALE_COORDINATOR_ADDRESS: '10.130.0.5:8080'\nMEGASCALE_NUM_SLICES: '2'\n"
               "MEGASCALE_SLICE_ID: '1'\n")
    _fake_tpu_vm(monkeypatch, {**TPU_V4_32, "tpu-env": tpu_env})
    assert sharding.initialize_distributed() == "cloud_tpu"
    assert calls["initialize"] == [((), {})]
    assert _jax_resolves() == ("10.130.0.5:8482", 8, 6, None)


def test_one_host_tpu_vm_is_single(calls, monkeypatch):
    _fake_tpu_vm(monkeypatch, {"agent-worker-number": "0",
                               "worker-network-endpoints": "10.130.0.5"})
    assert sharding.detect_cluster() == ("cloud_tpu", 1)
    assert sharding.initialize_distributed() == "single"
    assert calls["initialize"] == []


def test_tpu_vm_without_worker_metadata_is_not_a_slice(calls, monkeypatch):
    _fake_tpu_vm(monkeypatch, {})  # the metadata server answers 404
    assert sharding.detect_cluster() is None
    assert sharding.initialize_distributed() == "single"


def test_tpu_skip_mds_query_turns_the_metadata_path_off(calls, monkeypatch):
    _fake_tpu_vm(monkeypatch, TPU_V4_32)
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", _no_metadata_server)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # what JAX sets where it found no TPU
    assert sharding.initialize_distributed() == "single"


def test_tpu_slice_whose_workers_cannot_be_listed_fails_loudly(calls, monkeypatch):
    _fake_tpu_vm(monkeypatch, {"agent-worker-number": "1"})
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (
        ("1", 200) if key == "agent-worker-number" else (_ for _ in ()).throw(
            RuntimeError("Getting metadata['worker-network-endpoints'] failed for 6 tries"))))
    with pytest.raises(RuntimeError, match="cloud_tpu cluster .* could not count"):
        sharding.initialize_distributed()
    assert calls["initialize"] == []


# --- GKE TPU, Open MPI ---------------------------------------------------------------------------


def test_gke_tpu_initializes_without_arguments(calls, monkeypatch):
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    # JAX looks for MEGASCALE_NUM_SLICES in the environment, then in the metadata's tpu-env.
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", _fake_metadata_server({}))
    # What GKE gives a TPU container.
    _set(monkeypatch, {"TPU_WORKER_HOSTNAMES": "job-0.svc,job-1.svc", "TPU_WORKER_ID": "1",
                       "TPU_SKIP_MDS_QUERY": "true"})
    assert sharding.detect_cluster() == ("gke_tpu", 2)
    assert sharding.initialize_distributed() == "gke_tpu"
    assert calls["initialize"] == [((), {})]


def test_open_mpi_initializes_without_arguments(calls, monkeypatch):
    _set(monkeypatch, {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
                       "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})
    assert sharding.initialize_distributed() == "ompi"
    assert calls["initialize"] == [((), {})]
    assert calls["config"]["jax_cuda_visible_devices"] == "all"


# --- two real processes per environment: the preemption service ------------------------------

_WORKER_ENV = {
    "slurm": lambda port, i: {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1",
                              "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": "0",
                              "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2",
                              "JAX_COORDINATOR_PORT": str(port)},
    "cloud_tpu": lambda port, i: {"JAX_COORDINATOR_PORT": str(port)},
    "flags": lambda port, i: {},
}


@pytest.mark.parametrize("environment", ["slurm", "cloud_tpu", "flags"])
def test_every_multi_process_path_starts_the_preemption_service(environment):
    """Process 1 alone gets SIGTERM before step 3; PreemptionWatch (JAX's preemption service)
    stops both processes after the same step."""
    import portpicker

    port = portpicker.pick_unused_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES)}
    base.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TPU_SKIP_MDS_QUERY": "1",
                 "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    procs = [subprocess.Popen(
        [sys.executable, __file__, environment, str(port), str(i)],
        env={**base, **_WORKER_ENV[environment](port, i)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    for out in outputs:
        assert f"PATH {environment}" in out, outputs
        assert "PROCESSES 2 SERVICE True" in out, outputs
    stopped = {re.search(r"STOPPED (\S+)", out).group(1) for out in outputs}
    assert len(stopped) == 1, outputs
    (step,) = stopped
    assert step != "None" and int(step) >= 3, outputs


def _worker(environment: str, port: int, process_id: int) -> None:
    """One of the two processes of the test above (argv: environment port process_id)."""
    if environment == "cloud_tpu":
        # This worker's view of a two-worker slice whose worker 0 is this machine.
        os.environ.pop("TPU_SKIP_MDS_QUERY", None)
        cloud_tpu_cluster.running_in_cloud_tpu_vm = True
        cloud_tpu_cluster.get_metadata = _fake_metadata_server(
            {"agent-worker-number": str(process_id),
             "worker-network-endpoints": "127.0.0.1,127.0.0.1", "tpu-env": ""})
    if environment == "flags":
        path = sharding.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    else:
        path = sharding.initialize_distributed()
    from jax._src import distributed
    from jax.experimental import multihost_utils

    from sslocal import train

    print("PATH", path, flush=True)
    service = distributed.global_state.preemption_sync_manager is not None
    print("PROCESSES", jax.process_count(), "SERVICE", service, flush=True)
    watch = train.PreemptionWatch()
    stopped = None
    for step in range(1, 400):  # stops within a few steps; the bound only ends a failure
        multihost_utils.sync_global_devices(f"step {step}")  # the step's collectives
        if jax.process_index() == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # let the service hear of it
        if watch(step):
            stopped = step
            break
        time.sleep(0.05)
    watch.close()
    print("STOPPED", stopped, flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
