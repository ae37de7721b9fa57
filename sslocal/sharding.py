"""The device mesh and the move from host-local numpy batches to global jax.Arrays.

Every device of every process sits on one ("data",) axis. Parameters are replicated; batches
are split along their first axis, so the B x B similarity inside the jitted step is computed on
the global batch and every device sees all negatives.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """Joins the processes of a multi-host run; a no-op for a single process.

    Cloud TPU and SLURM describe themselves to `jax.distributed.initialize()`; on plain GPU
    hosts the coordinator, process count and id come from flags (or the JAX_* variables).
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
    in_cluster = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    if coordinator_address and num_processes > 1:
        # Only the CPU client reads this; it gives CPU processes (tests) real collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif in_cluster or on_tpu_pod:
        jax.distributed.initialize()


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
