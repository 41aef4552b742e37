"""Multi-host start-up: JAX's own multi-controller runtime, one process per host (TPU) or per GPU.

Every binary calls ``initialize`` (or ``initialize_from_flags``) once, before any other JAX call. It:
- does nothing for a single process (no flags, no cluster environment);
- lets ``jax.distributed.initialize()`` auto-detect the cluster when the environment announces one: SLURM
  (``srun`` with more than one task; JAX then gives each task the GPU ``SLURM_LOCALID``, so launch one task per
  GPU), Open MPI (``mpirun``), a GKE TPU job (``TPU_WORKER_HOSTNAMES``), Megascale, or ``JAX_COORDINATOR_ADDRESS``;
- with ``distributed=True`` always calls it (Cloud TPU VM pod slices announce themselves through the GCE
  metadata server rather than the environment: pass ``--distributed`` there);
- uses explicit ``--coordinator_address/--num_processes/--process_id`` otherwise (any other cluster).

After it, ``jax.devices()`` lists every process's devices, the mesh spans all of them, each process feeds its
own rows of the batch (``jax.make_array_from_process_local_data``; the data pipeline shards documents by
``jax.process_index()``), and orbax writes one checkpoint from all processes.
"""

from __future__ import annotations

import os

import jax

# Environment variables that announce a cluster type jax.distributed auto-detects.
_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "JAX_COORDINATOR_ADDRESS")


def _cluster_announced() -> bool:
    if os.environ.get("SLURM_JOB_ID"):
        # Inside an allocation, only a multi-task step (srun -n >1) is a multi-process run; a single task
        # (e.g. an interactive shell or `srun -n 1`) is one process with nothing to coordinate.
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1
    return any(os.environ.get(v) for v in _CLUSTER_ENV)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               distributed: bool | None = None) -> bool:
    """Start the multi-controller runtime when there is more than one process. Returns True if it did.

    ``distributed``: None = decide from the flags/environment; True = always (auto-detecting what is not
    given); False = never (a single-process run even inside a cluster allocation).
    """
    if distributed is False:
        return False
    explicit = coordinator_address is not None or (num_processes or 1) > 1 or process_id is not None
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                     "--process_id": process_id}
            missing = [k for k, v in given.items() if v is None]
            raise ValueError(f"multi-host flags: {', '.join(missing)} missing; --coordinator_address, "
                             f"--num_processes and --process_id go together (or give none of them, to "
                             f"auto-detect SLURM/MPI/TPU environments)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"multi-host flags: --process_id={process_id} must be in [0, --num_processes="
                             f"{num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        return True
    if distributed or _cluster_announced():
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return True
    return False


def define_flags() -> None:
    """The multi-host absl flags of a binary (read by ``initialize_from_flags``)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a cluster JAX does not detect.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.DEFINE_list("local_device_ids", None, "Devices this process drives (default: JAX's choice).")
    flags.DEFINE_bool("distributed", None, "Force (True) or forbid (False) jax.distributed.initialize(); "
                      "default: when flags or the environment (SLURM, MPI, GKE TPU) announce several processes. "
                      "Pass --distributed on Cloud TPU VM pod slices.")


def initialize_from_flags() -> bool:
    from absl import flags

    f = flags.FLAGS
    ids = [int(i) for i in f.local_device_ids] if f.local_device_ids else None
    return initialize(f.coordinator_address, f.num_processes, f.process_id, ids, f.distributed)


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and the resolved config; every process takes part in checkpoints."""
    return jax.process_index() == 0
