"""Joining a multi-process JAX cluster, from flags or the environment (before any JAX work).

- explicit: `distributed.coordinator="host:port"` with `num_processes` and `process_id` (CPU
  clusters, tests);
- Cloud TPU pod slices and SLURM / Open MPI GPU jobs: JAX detects the cluster itself;
- otherwise a single process.
"""

from __future__ import annotations

import os
from typing import Any

import jax

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


def initialize(config: Any) -> None:
    """Call jax.distributed.initialize when the config or the environment asks for a cluster."""
    if config.coordinator:
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
