"""The one entry and exit of every training run: what the shared trainer and the PPO loop both do around their steps.

    run = RunContext(cfg, workdir)      # refuses a workdir that holds another config; nothing is touched
    ...                                 # the caller validates its config and builds its programs (no allocation)
    with run:                           # records config.json, opens the checkpointer, starts the clock
        state = ... run.ckpt ...        # restore the latest checkpoint, or initialise
        writer = run.open_metrics(start_step)
        prefetch = run.closing(DevicePrefetcher(...))
        ...                             # the steps
        run.write_summary({...})
    # on the way out, normal or not: what ``closing`` registered (newest first), then the checkpointer (waiting for
    # an async save in flight: a finished checkpoint is never thrown away), then the metrics writer

Files: ``config.json`` (gptjax.train.workdir), ``checkpoints/`` (gptjax.train.checkpoint), ``metrics.jsonl`` and
``tb/`` (gptjax.train.metrics), ``run_info.json`` (facts about this start) and ``summary.json`` (what a finished run
amounts to), both written by the primary process only. ``StepClock`` gives a loop without the trainer's reporter
its ETA. Whatever every run must do on the way in or out (a workdir lock, SIGINT/SIGTERM handling) belongs here.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any, Mapping

import jax

from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import metrics as metrics_lib
from gptjax.train import workdir as workdir_lib

RUN_INFO_FILE = "run_info.json"
SUMMARY_FILE = "summary.json"


class RunContext:
    """A training run in ``workdir`` per ``cfg`` (its ``train`` section: ``keep_ckpts``, ``allow_config_change``)."""

    def __init__(self, cfg, workdir: str):
        self.cfg = cfg
        self.workdir = os.path.abspath(workdir)
        self.primary = jax.process_index() == 0
        self._allow_change = bool(cfg.train.allow_config_change)
        # A workdir holding another config is refused before anything in it is touched.
        workdir_lib.check_or_write_config(self.workdir, cfg, allow_change=self._allow_change, write=False)
        self.ckpt: ckpt_lib.Checkpointer | None = None
        self.writer: metrics_lib.MetricsWriter | None = None
        self.started: float | None = None
        self._closing: list[Any] = []

    def __enter__(self) -> "RunContext":
        # The caller has validated its config by now, so a bad one never claims the workdir.
        workdir_lib.check_or_write_config(self.workdir, self.cfg, allow_change=self._allow_change,
                                          write=self.primary)
        self.ckpt = ckpt_lib.Checkpointer(self.workdir, keep=int(self.cfg.train.keep_ckpts))
        self.started = time.time()
        return self

    def __exit__(self, *exc_info) -> None:
        for obj in reversed(self._closing):
            obj.close()
        self.ckpt.close()  # waits for an async save in flight
        if self.writer is not None:
            self.writer.close()

    def open_metrics(self, start_step: int) -> metrics_lib.MetricsWriter:
        """The metrics writer, continuing at ``start_step`` (later records of an interrupted run are dropped)."""
        self.writer = metrics_lib.MetricsWriter(self.workdir, resume_step=start_step, enabled=self.primary)
        return self.writer

    def closing(self, obj):
        """``obj.close()`` runs on exit, before the checkpointer closes; returns ``obj``."""
        self._closing.append(obj)
        return obj

    def elapsed(self) -> float:
        """Seconds since the run started (entered)."""
        return time.time() - self.started

    def write_run_info(self, info: Mapping[str, Any]) -> None:
        """``run_info.json``: facts about this start (not the config): what it resolved to on this machine."""
        self._write_json(RUN_INFO_FILE, info)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """``summary.json``: what the finished run amounts to (sweeps gather these)."""
        self._write_json(SUMMARY_FILE, summary)

    def _write_json(self, name: str, obj: Mapping[str, Any]) -> None:
        if self.primary:
            with open(os.path.join(self.workdir, name), "w") as f:
                json.dump(obj, f, indent=2, default=str)


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
