"""Data parallelism: one mesh over every device of every process; the batch is split along it.

One device is a mesh of one, so the same code runs on a laptop, on 8 GPUs, and
on many hosts. Parameters and the resident data set are replicated; each step's
batch indices are sharded along the "data" axis, so each device gathers and
computes its slice of the batch, and XLA inserts the gradient all-reduce.

Several processes (hosts) join through `jax.distributed.initialize`, with the
coordinator address, process count and id from the config or the environment
(MNIST_FLAX_COORDINATOR, MNIST_FLAX_NUM_PROCESSES, MNIST_FLAX_PROCESS_ID, as
`launch/slurm.sbatch` sets them). Only process 0 writes logs, W&B and files.
"""

import os
from importlib import metadata

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnist_flax.errors import ConfigError

DATA_AXIS = "data"
# JAX's accelerator plugins: installed (the CUDA image), they still leave JAX on the CPU where no device is seen.
ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
ENV = {
    "coordinator": "MNIST_FLAX_COORDINATOR",
    "num_processes": "MNIST_FLAX_NUM_PROCESSES",
    "process_id": "MNIST_FLAX_PROCESS_ID",
}


def process_settings(distributed_config: ml_collections.ConfigDict) -> dict | None:
    """Coordinator, process count and id from the config, else the environment; None for one process."""
    coordinator = distributed_config.coordinator_address or os.environ.get(ENV["coordinator"], "")
    num_processes = distributed_config.num_processes or int(os.environ.get(ENV["num_processes"], "0") or 0)
    process_id = distributed_config.process_id
    if process_id < 0:
        process_id = int(os.environ.get(ENV["process_id"], "-1") or -1)
    if not coordinator or num_processes <= 1:
        return None
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"distributed.process_id: {process_id} is not in 0..{num_processes - 1} (set it or {ENV['process_id']})"
        )
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def initialize(distributed_config: ml_collections.ConfigDict) -> None:
    """Joins the processes of a multi-host run (before any other JAX call); no-op for one process."""
    settings = process_settings(distributed_config)
    if settings is None or jax.distributed.is_initialized():
        return
    # CPU devices need a collectives library across processes (no effect on GPUs). Asking for the
    # backend here would start it, which must come after initialize().
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process; every process must call it at the same point (an all-gather)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def is_primary() -> bool:
    """Whether this process writes logs, W&B runs and files."""
    return jax.process_index() == 0


def accelerator_fallback() -> str | None:
    """One line when an accelerator plugin is installed but JAX found no device and runs on the CPU, else None.

    JAX falls back by itself and says so only in its log (a traceback from the plugin, hidden by the run's
    log level); the run says it in words. None when JAX_PLATFORMS asks for the CPU: then it is no fallback.
    """
    if jax.default_backend() != "cpu" or os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    installed = []
    for name in ACCELERATOR_PLUGINS:
        try:
            installed.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    if not installed:
        return None
    return f"no accelerator found: {', '.join(installed)} is installed, but JAX sees no device; training on the CPU"


def make_mesh() -> Mesh:
    """A one-axis mesh over all devices of all processes."""
    return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_replicated(tree, mesh: Mesh):
    """A host (or single-device) pytree as global arrays replicated on every device of the mesh."""
    sharding = replicated(mesh)

    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def to_host(array) -> np.ndarray:
    """A replicated global array as NumPy (its local copy, when other processes hold the rest)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    return np.asarray(array.addressable_data(0))
