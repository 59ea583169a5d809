"""Joining a multi-process JAX cluster, from flags or the environment (before any JAX work).

- explicit: `distributed.coordinator="host:port"` with `num_processes` and `process_id` (CPU
  clusters, tests);
- Cloud TPU pod slices and SLURM / Open MPI GPU jobs: JAX detects the cluster itself;
- otherwise a single process.

Below: the few agreements processes make (a flag any of them raised, small values gathered, a
barrier before reading what one of them wrote).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fourd_jax.errors import InputError

CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def detected_cluster() -> str | None:
    """Which environment variable says this process is part of a cluster, if any."""
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return None  # a single-task SLURM job is just one process
    for name in CLUSTER_ENV:
        if os.environ.get(name):
            return name
    return None


def initialize(config: Any = None) -> None:
    """Call jax.distributed.initialize when the config (its `distributed` section) or the environment
    asks for a cluster; None: the environment only (commands without a distributed config)."""
    if config is not None and config.coordinator:
        if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
            raise InputError(f"distributed.process_id {config.process_id} must be in [0, num_processes "
                             f"{config.num_processes}).")
        # CPU collectives across processes go through gloo (only read when the backend is CPU; querying
        # the platform here would start the backend before initialize).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(config.coordinator, num_processes=config.num_processes,
                                   process_id=config.process_id)
    elif detected_cluster():
        jax.distributed.initialize()


# ----------------------------------------------------------------------------- agreeing across processes
# Each is a no-op with one process; with several, every process must call it at the same point.


def gather_ints(values: Any) -> np.ndarray:
    """Every process's small int vector `values`, as an array [processes, n]."""
    local = np.asarray(values, np.int32).reshape(1, -1)
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on some process (e.g. one host got SIGTERM): the same answer on all."""
    return bool(gather_ints([int(bool(flag))]).max())


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (the same list on every process)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = gather_ints([data.size])[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded[None], tiled=True))
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(every, sizes, strict=True)]


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_writer() -> bool:
    """Whether this process writes the files a job shares (process 0)."""
    return jax.process_index() == 0


def written_by_one(write: Any, what: str) -> None:
    """Run `write()` on process 0 only, while the others wait at a barrier until it is done; so every
    process reads only what is complete. If it fails, process 0 raises its error and the others one
    sentence (rather than waiting forever for a writer that is gone)."""
    error = None
    if is_writer():
        try:
            write()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = e
    if any_process(error is not None):  # the barrier: an allgather returns once every process is in it
        if error is not None:
            raise error
        raise InputError(f"process 0 failed to write {what}; see its output.")
