"""Multi-host start-up: JAX's own multi-controller runtime, one process per host (or per GPU).

``initialize`` is called once, before any other JAX call, by every binary. It:
- does nothing for a single process (no flags, no cluster environment);
- lets ``jax.distributed.initialize()`` auto-detect the cluster (SLURM, Open MPI, TPU pods, GKE/K8s …)
  when the environment announces one;
- uses explicit ``--coordinator_address/--num_processes/--process_id`` flags otherwise.
"""

from __future__ import annotations

import os

import jax

# Environment variables that announce a cluster type jax.distributed auto-detects.
_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "JAX_COORDINATOR_ADDRESS")


def _cluster_announced() -> bool:
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False  # a single SLURM task is a single process: nothing to coordinate
    return any(os.environ.get(v) for v in _CLUSTER_ENV)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> bool:
    """Start the multi-controller runtime when there is more than one process. Returns True if it did."""
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError("multi-host flags: --coordinator_address, --num_processes and --process_id must be "
                             "given together (or none, to auto-detect SLURM/MPI/TPU environments)")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        return True
    if _cluster_announced():
        jax.distributed.initialize()
        return True
    return False


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and the resolved config; every process takes part in checkpoints."""
    return jax.process_index() == 0
