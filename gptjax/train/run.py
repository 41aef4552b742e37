"""The one entry and exit of every training run: what the shared trainer and the PPO loop both do around their steps.

    run = RunContext(cfg, workdir)      # refuses a workdir that is a file, not writable or of another config;
                                        # nothing is touched
    ...                                 # the caller validates its config, data and init_from and builds its
                                        # programs (no allocation): a bad run never claims a new workdir
    with run:                           # takes the workdir lock, records config.json, opens the checkpointer,
                                        # starts the clock, catches SIGINT/SIGTERM
        state = ... run.ckpt ...        # restore the latest checkpoint (a damaged one is set aside), or initialise
        writer = run.open_metrics(start_step)
        prefetch = run.closing(DevicePrefetcher(...))
        for each step:
            ...
            stopping = run.should_stop(step)    # a signal arrived (or a background save failed: raises)
            if stopping or <checkpoint due>: run.ckpt.save(step, ...)
            if stopping: run.stop(step)         # raises RunStopped
        run.write_summary({...})
    # on the way out, normal or not: what ``closing`` registered (newest first), then the checkpointer (waiting for
    # an async save in flight: a finished checkpoint is never thrown away), then the metrics writer; the signal
    # handlers are restored and the lock released

Files: ``config.json`` (gptjax.train.workdir), ``lock.json`` while a process runs (gptjax.train.lock),
``checkpoints/`` (gptjax.train.checkpoint), ``metrics.jsonl`` and ``tb/`` (gptjax.train.metrics), ``run_info.json``
(facts about this start) and ``summary.json`` (what a finished run amounts to), both written by the primary process
only, all through ``gptjax.paths`` (a local directory or ``gs://…``). ``elapsed()`` counts every segment of the run:
the time of earlier segments travels in each checkpoint. ``StepClock`` gives a loop without the trainer's reporter
its ETA.

Stopping (gptjax.train.signals): the first SIGINT or SIGTERM lets the loop finish its step, checkpoint it and raise
``RunStopped`` (exit status 130 for SIGINT, 143 for SIGTERM: the run did not finish, and re-running the same command
resumes it; a scheduler that requeues on preemption restarts it either way); a second one exits at once.
"""

from __future__ import annotations

import datetime
import json
import signal
import time
from typing import Any, Mapping

import jax
import numpy as np

from gptjax import paths
from gptjax.errors import RunStopped, WorkdirLockedError
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import lock as lock_lib
from gptjax.train import metrics as metrics_lib
from gptjax.train import signals as signals_lib
from gptjax.train import workdir as workdir_lib

RUN_INFO_FILE = "run_info.json"
SUMMARY_FILE = "summary.json"


class RunContext:
    """A training run in ``workdir`` per ``cfg`` (its ``train`` section: ``keep_ckpts``, ``allow_config_change``,
    ``wait_for_lock``)."""

    def __init__(self, cfg, workdir: str):
        self.cfg = cfg
        self.path = paths.as_path(workdir)
        self.workdir = str(self.path)
        self.primary = jax.process_index() == 0
        self._allow_change = bool(cfg.train.allow_config_change)
        # A workdir that cannot hold the run, or holds another config, is refused before anything in it is touched.
        workdir_lib.check_usable(self.path)
        workdir_lib.check_or_write_config(self.path, cfg, allow_change=self._allow_change, write=False)
        self.ckpt: ckpt_lib.Checkpointer | None = None
        self.writer: metrics_lib.MetricsWriter | None = None
        self.started: float | None = None
        self._closing: list[Any] = []
        self._lock = lock_lib.WorkdirLock(self.path, wait=bool(cfg.train.get("wait_for_lock", False)))
        # One process: its own handlers. Several: SIGTERM is JAX's preemption service's (should_stop), SIGINT Python's.
        self._signals = signals_lib.StopSignals(() if jax.process_count() > 1 else (signal.SIGINT, signal.SIGTERM),
                                                on_force_exit=self._lock.release)

    def __enter__(self) -> "RunContext":
        self._take_lock()
        try:
            # Checked again under the lock (a run that held it may have written config.json meanwhile), then recorded.
            workdir_lib.check_or_write_config(self.path, self.cfg, allow_change=self._allow_change,
                                              write=self.primary)
            self.ckpt = ckpt_lib.Checkpointer(self.workdir, keep=int(self.cfg.train.keep_ckpts),
                                              wall_time=self.elapsed)
            self.started = time.time()
            self._signals.install()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            try:
                for obj in reversed(self._closing):
                    obj.close()
            finally:
                try:
                    self.ckpt.close()  # waits for an async save in flight; a failed one raises CheckpointError
                finally:
                    if self.writer is not None:
                        self.writer.close()
        finally:
            self._signals.restore()
            self._lock.release()

    def _take_lock(self) -> None:
        """Process 0 takes the lock (or waits for it); in a multi-host run every process learns whether it did."""
        error = None
        if self.primary:
            try:
                self._lock.acquire()
            except WorkdirLockedError as e:
                error = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not held and error is None:
                error = WorkdirLockedError(f"process 0 could not lock workdir {self.workdir} (see its message)")
        if error is not None:
            raise error

    def should_stop(self, step: int) -> bool:
        """Call after every step (on every process): True when a SIGINT/SIGTERM asks the run to stop after saving
        ``step``. Raises CheckpointError when a background save failed, so no step runs after it."""
        self.ckpt.check_for_errors()
        if jax.process_count() > 1:
            return _reached_preemption_sync_point(step)
        self._signals.take_notice()
        return self._signals.signum is not None

    def stop(self, step: int) -> None:
        """Raises RunStopped after ``should_stop(step)`` said so and step ``step`` was saved; the checkpointer
        finishes writing it on the way out."""
        signum = self._signals.signum or signal.SIGTERM
        name = signals_lib.NAMES.get(signum, str(signum))
        raise RunStopped(f"stopped after step {step} on {name}: checkpoint {step} is in {self.ckpt.directory}; "
                         f"run the same command to resume", 128 + int(signum))

    def open_metrics(self, start_step: int) -> metrics_lib.MetricsWriter:
        """The metrics writer, continuing at ``start_step`` (later records of an interrupted run are dropped when it
        first writes)."""
        self.writer = metrics_lib.MetricsWriter(self.workdir, resume_step=start_step, enabled=self.primary)
        return self.writer

    def closing(self, obj):
        """``obj.close()`` runs on exit, before the checkpointer closes; returns ``obj``."""
        self._closing.append(obj)
        return obj

    def elapsed(self) -> float:
        """Seconds this run has taken: the earlier segments (as the restored checkpoint recorded) and this one."""
        prior = self.ckpt.prior_wall_s if self.ckpt is not None else 0.0
        return prior + (time.time() - self.started if self.started is not None else 0.0)

    def finished_summary(self, step: int, total_steps: int) -> dict | None:
        """``summary.json`` when the run already finished at ``step`` (a re-run of its command), else None."""
        path = self.path / SUMMARY_FILE
        if step < total_steps or not path.exists():
            return None
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            return None
        return summary if summary.get("steps") == step else None

    def write_run_info(self, info: Mapping[str, Any]) -> None:
        """``run_info.json``: facts about this start (not the config): what it resolved to on this machine."""
        self._write_json(RUN_INFO_FILE, info)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """``summary.json``: what the finished run amounts to (sweeps gather these)."""
        self._write_json(SUMMARY_FILE, summary)

    def _write_json(self, name: str, obj: Mapping[str, Any]) -> None:
        if self.primary:
            paths.write_text_atomic(self.path / name, json.dumps(obj, indent=2, default=str))


def _reached_preemption_sync_point(step: int) -> bool:
    """JAX's agreement of all processes on the step to stop at after one got SIGTERM (False without the service)."""
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service) or not initialised
        return False


def start_info(mesh, start_step: int) -> dict[str, Any]:
    """The machine-side facts of a start, for ``run_info.json``."""
    return {"start_step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jax_version": jax.__version__,
            "devices": jax.device_count(), "processes": jax.process_count(),
            "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape)}


class StepClock:
    """The ETA of a run whose first step (compilation included) says nothing about the others: the time per step
    is measured from the end of this run's first step."""

    def __init__(self, start_step: int, total_steps: int):
        self.start_step, self.total_steps = start_step, total_steps
        self._first_done: float | None = None

    def step_done(self) -> bool:
        """Call after each step; True after the run's first one (whose time the caller may log)."""
        if self._first_done is None:
            self._first_done = time.time()
            return True
        return False

    def eta(self, step: int, step_s: float) -> datetime.timedelta:
        """Time left after ``step``; ``step_s`` (the last step's seconds) serves until a second step is done."""
        done_since = step - self.start_step - 1
        per_step = (time.time() - self._first_done) / done_since if done_since else step_s
        return datetime.timedelta(seconds=round(per_step * (self.total_steps - step)))
