"""The device mesh and the move from host-local numpy batches to global jax.Arrays.

Every device of every process sits on one ("data",) axis. Parameters are replicated; batches
are split along their first axis, so the B x B similarity inside the jitted step is computed on
the global batch and every device sees all negatives.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
logger = logging.getLogger(__name__)


# JAX's cluster detectors (jax/_src/clusters/, in the order jax.distributed.initialize() tries
# them) -> the name initialize_distributed reports for each.
_CLUSTER_NAMES = {
    "OmpiCluster": "ompi",
    "SlurmCluster": "slurm",
    "GkeTpuCluster": "gke_tpu",
    "GceTpuCluster": "cloud_tpu",
    "K8sCluster": "k8s",
}


def detect_cluster() -> tuple[str, int] | None:
    """The cluster `jax.distributed.initialize()` would join, found the way JAX finds it.

    Runs JAX's own detectors (every `jax._src.clusters.ClusterEnv` that is not opt-in, first
    match wins, as in `ClusterEnv.auto_detect_unset_distributed_params`) and returns
    (name, process count), or None when none matches. Starts nothing and touches no device,
    so it may run before `jax.distributed.initialize`. What each detector reads:

    - "cloud_tpu" (GceTpuCluster: Cloud TPU VMs, `gcloud compute tpus tpu-vm` / queued
      resources): JAX found a TPU on the PCI bus when it was imported (its cloud_tpu_init;
      without one it sets TPU_SKIP_MDS_QUERY=1, which turns this detector off) and the GCE
      metadata server answers `instance/attributes/agent-worker-number` (this worker's index).
      The processes are the comma-separated `worker-network-endpoints` attribute, times
      MEGASCALE_NUM_SLICES (from the environment or the `tpu-env` attribute) for multislice.
    - "gke_tpu" (GkeTpuCluster, GKE): a TPU found at import and TPU_PROCESS_ADDRESSES or
      TPU_WORKER_HOSTNAMES (the slice's hosts, comma-separated) and TPU_WORKER_ID in the
      environment; GKE also sets TPU_SKIP_MDS_QUERY, which keeps GceTpuCluster (tried
      first) off the metadata server.
    - "slurm" (SlurmCluster): SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID
      and SLURM_LOCALID all set (what `srun` gives each task; a bare `sbatch` script or
      `salloc` shell has no SLURM_STEP_NODELIST); SLURM_NTASKS processes.
    - "ompi" (OmpiCluster): OMPI_MCA_orte_hnp_uri (mpirun / mpiexec); OMPI_COMM_WORLD_SIZE.
    - "k8s" (K8sCluster): KUBERNETES_SERVICE_HOST and the `kubernetes` package; the Job's
      parallelism from the Kubernetes API.
    """
    try:
        from jax._src import clusters  # JAX's own detection; there is no public API for it
        detectors = [env for env in clusters.ClusterEnv._cluster_types
                     if not env.opt_in_only_method]
    except (ImportError, AttributeError) as e:  # a JAX that moved them: say so, run alone
        logger.warning("cannot run JAX's cluster detection (%s); pass --coordinator_address, "
                       "--num_processes and --process_id for a multi-host run", e)
        return None
    for env in detectors:
        if env.is_env_present():
            name = _CLUSTER_NAMES.get(env.__name__, env.__name__)
            try:
                count = int(env.get_process_count())
            except Exception as e:
                raise RuntimeError(
                    f"JAX detected a {name} cluster ({env.__name__}) but could not count its "
                    f"processes: {e}") from e
            return name, count
    return None


def _one_process_on_this_host(cluster: str) -> bool:
    """Under SLURM / Open MPI, is this the only task on its node (one process per host)?"""
    if cluster == "ompi":
        return os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == "1"
    if cluster == "slurm":
        nodes = os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES")
        tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
        return bool(nodes and tasks) and int(nodes) == int(tasks)
    return False


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> str:
    """Joins the processes of a multi-host run; a no-op for a single process.

    Returns the path taken (also logged):

    - "flags": `coordinator_address`, `num_processes` > 1 and `process_id` (the CLI flags, or
      JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID) -> plain GPU hosts
      (launch/gpu_multihost.sh) and the localhost tests;
    - otherwise the cluster JAX detects (`detect_cluster`: "cloud_tpu", "gke_tpu", "slurm",
      "ompi", "k8s") when it has more than one process -> `jax.distributed.initialize()`, with
      no arguments: JAX finds the coordinator, count and id itself (launch/tpu_vm.sh,
      launch/slurm.sbatch);
    - "single": one process (no cluster, a one-host TPU VM, a one-task SLURM job); nothing
      is started.

    Every multi-process path calls `jax.distributed.initialize`, which also starts JAX's
    preemption service that `train.PreemptionWatch` needs on several processes. It sets CPU
    collectives to gloo first (only the CPU client reads it: CPU processes get real
    collectives). Under SLURM or Open MPI JAX would show each process one GPU (its local
    rank); with one task per node (launch/slurm.sbatch) the task keeps all the node's GPUs,
    as everywhere else in sslocal (one process per host). Values given without the rest
    (e.g. a coordinator address but no process count) are passed to JAX inside a detected
    cluster and are an error outside one, never a silent single-process run.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES") or 0)
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID") or -1)
    if num_processes == 1:
        path = "single"
    elif coordinator_address and num_processes > 1 and process_id >= 0:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        path = "flags"
    else:
        given: dict[str, str | int] = {}
        if coordinator_address:
            given["coordinator_address"] = coordinator_address
        if num_processes:
            given["num_processes"] = num_processes
        if process_id >= 0:
            given["process_id"] = process_id
        cluster = detect_cluster()
        if cluster is not None and cluster[1] > 1:
            path = cluster[0]
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(**given)
            if (path in ("slurm", "ompi") and "JAX_LOCAL_DEVICE_IDS" not in os.environ
                    and _one_process_on_this_host(path)):
                jax.config.update("jax_cuda_visible_devices", "all")
                jax.config.update("jax_rocm_visible_devices", "all")
        elif given:
            raise ValueError(
                "a multi-host run needs --coordinator_address, --num_processes (> 1) and "
                "--process_id together (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                f"JAX_PROCESS_ID), or a cluster JAX detects; got only {sorted(given)}")
        else:
            path = "single"
    logger.info("multi-host start: %s", path)
    return path


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ("data",) mesh over all devices of all processes (or the first `num_devices`).

    Auto axes: XLA propagates shardings through the step, so the B x B einsum of two
    batch-sharded operands needs no hand-written gather.
    """
    devices = jax.devices()
    if num_devices is not None:
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """Fails before any compilation when the batch cannot be split evenly."""
    if global_batch_size % mesh.size:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {mesh.size} devices of "
            f"the mesh; use a multiple of {mesh.size}")
    if global_batch_size % jax.process_count():
        raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host-local numpy arrays (this process's slice of the batch) -> global batch-sharded arrays.

    Non-numeric entries (clip ids) stay on the host and are dropped here.
    """
    sharding = batch_sharded(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
        if np.asarray(value).dtype.kind in "biuf"
    }


def to_host_local(array: jax.Array, mesh: jax.sharding.Mesh) -> np.ndarray:
    """The rows of a batch-sharded global array that belong to this process, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(array)
    return np.asarray(multihost_utils.global_array_to_host_local_array(array, mesh, P(DATA_AXIS)))


def gather_to_all(local: np.ndarray) -> np.ndarray:
    """Concatenates every process's host-local rows (in process order) on every process."""
    if jax.process_count() == 1:
        return np.asarray(local)
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))
