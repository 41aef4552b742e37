"""Which rows of a global batch this process feeds (multi-host data parallelism), checked once for every iterator."""

from __future__ import annotations

from gptjax.errors import DataError


def local_rows(global_batch_size: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[int, int, int]:
    """(process_index, process_count, rows per process) for a global batch; the indices default to JAX's.

    Each process feeds ``global_batch_size // process_count`` rows, which ``jax.make_array_from_process_local_data``
    assembles into the global batch; a batch the processes cannot share evenly is one clear error.
    """
    if process_index is None or process_count is None:
        import jax  # only the process topology: the data code stays numpy

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} is not divisible by the number of processes "
                        f"({process_count}); choose a multiple of {process_count}")
    return process_index, process_count, global_batch_size // process_count
