"""SIGINT and SIGTERM during a run: finish the step, save it, stop cleanly; a second signal exits at once.

``StopSignals`` is installed while a run is inside ``RunContext``. The first SIGINT (Ctrl-C) or SIGTERM (a
scheduler's preemption notice) only sets ``signum``: the loop finishes its current step, checkpoints it and stops
(``RunContext.should_stop`` / ``stop``). A second one exits the process at once (status 128 + the signal), after
``on_force_exit`` (which releases the workdir lock); a checkpoint being written then is left unfinished, and the next
start deletes it.

Python runs a signal handler only when the main thread returns to the interpreter, which it does not do while it
waits on a long XLA computation (``block_until_ready``, a compile). So the second signal is also seen by a watcher
thread: the C-level handler writes every signal's number to a pipe (``signal.set_wakeup_fd``) at once, and the
watcher, blocked on that pipe, exits the process when it reads the second one.

Handlers can only be installed from the main thread; elsewhere (a run started from a worker thread) the signals
keep their previous behaviour. In a multi-process run SIGTERM is left to JAX's preemption service, which makes
every process stop at the same step (``jax.experimental.multihost_utils.reached_preemption_sync_point``), and
SIGINT keeps Python's default.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

from absl import logging

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class StopSignals:
    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM), on_force_exit: Callable[[], None] | None = None):
        self.signals, self.on_force_exit = tuple(signals), on_force_exit
        self.signum: int | None = None
        self._noticed = False
        self._previous: dict[int, object] = {}
        self._received = 0  # signals of `signals` seen by the watcher
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup_fd = -1
        self._watcher: threading.Thread | None = None

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, str(self.signum))

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.signals:
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)  # the C handler must never block on a full pipe
            self._pipe = (read_fd, write_fd)
            self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._watcher = threading.Thread(target=self._watch, args=(read_fd,), name="stop-signals", daemon=True)
            self._watcher.start()

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            os.close(self._pipe[1])  # the watcher reads end-of-file and returns
            self._watcher.join(timeout=5)
            os.close(self._pipe[0])
            self._pipe, self._watcher = None, None

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            ours = [signum for signum in data if signum in self.signals]
            self._received += len(ours)
            if self._received >= 2:
                self._force_exit(ours[-1])

    def _force_exit(self, signum: int) -> None:
        os.write(2, f"\n{NAMES.get(signum, signum)} again: exiting now without waiting for the step or its "
                    f"checkpoint (the next start resumes from the last finished checkpoint)\n".encode())
        if self.on_force_exit is not None:
            self.on_force_exit()
        os._exit(128 + signum)

    def _handle(self, signum, frame) -> None:
        del frame
        # Nothing here may take a lock the interrupted code could hold (logging, buffered stderr): the notice of a
        # first signal is logged by the loop when it polls (``take_notice``); a second one writes unbuffered.
        if self.signum is not None:
            self._force_exit(signum)
        self.signum = signum

    def take_notice(self) -> None:
        """Logs, once, that a first signal arrived and what happens now."""
        if self.signum is not None and not self._noticed:
            self._noticed = True
            logging.warning("%s: stopping after this step and its checkpoint (%s again exits at once)",
                            self.name, self.name)
