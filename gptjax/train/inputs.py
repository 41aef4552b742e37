"""The trainer's input: microbatches prefetched onto the mesh by a background thread, and the evaluation batches.

``DevicePrefetcher`` keeps the device fed: while a step runs, the next steps' microbatches are already stacked
and sharded. ``EvalSource`` gives every evaluation the same batches.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding


class DevicePrefetcher:
    """Background thread: pulls ``k`` microbatches per step, stacks them, puts them on the mesh, and records
    the iterator state *after* them (what a checkpoint taken after that step must store)."""

    _DONE = object()

    def __init__(self, it: Iterator, microbatches_at: Callable[[int], int], max_microbatches: int, start_step: int,
                 end_step: int, sharding: NamedSharding, size: int = 2):
        self._it, self._micro_at, self._max, self._sharding = it, microbatches_at, max_microbatches, sharding
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start_step, end_step), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, start: int, end: int):
        try:
            for step in range(start, end):
                try:
                    rows = [next(self._it) for _ in range(self._micro_at(step))]
                except StopIteration:
                    break
                # Always max_microbatches slots (one program for every ramp size); unused slots are zeros
                # the step never reads.
                pad = [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (self._max - len(rows))
                stacked = {k: np.stack([np.asarray(r[k]) for r in rows + pad]) for k in rows[0]}
                data_state = self._it.get_state() if hasattr(self._it, "get_state") else None
                arrays = {k: jax.make_array_from_process_local_data(self._sharding, v) for k, v in stacked.items()}
                if not self._put((step, arrays, data_state, len(rows))):
                    return
            self._put(self._DONE)
        except BaseException as e:  # surfaced in the main thread by __next__
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


class EvalSource:
    """The same ``n`` evaluation batches every time: a factory is called afresh; an iterator with
    get_state/set_state is rewound to where it started; a plain iterator is read onward (logged)."""

    def __init__(self, source):
        self._source = source
        self._start = source.get_state() if hasattr(source, "get_state") and not callable(source) else None
        if not callable(source) and self._start is None:
            logging.warning("eval iterator has no get_state/set_state: each evaluation reads new batches")

    def batches(self, n: int):
        if callable(self._source):
            it = self._source()
        else:
            it = self._source
            if self._start is not None:
                it.set_state(self._start)
        for _ in range(n):
            try:
                yield next(it)
            except StopIteration:
                return
