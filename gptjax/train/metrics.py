"""Training metrics: TensorBoard event files (no TensorFlow needed), ``metrics.jsonl`` and the progress line.

TensorBoard files are written with the ``tensorboard`` package alone (its EventFileWriter and protos), so
``tensorboard --logdir WORKDIR/tb`` reads them. ``metrics.jsonl`` holds one JSON object per log step
(``{"step": 100, "train/loss": ..., ...}``) and one per evaluation (``{"step": 100, "eval/loss": ...}``).

On resume from step S, records of steps after S (written by the interrupted run and about to be redone)
are dropped from ``metrics.jsonl`` and a TensorBoard ``SessionLog.START`` at S+1 makes TensorBoard discard
them too, so both show one consistent history. The writer touches nothing until its first record: a start that
writes none (a re-run of a finished run) leaves both as they were.

Files go through ``gptjax.paths`` (local or ``gs://``; TensorBoard's own file layer reaches object stores through
fsspec). An object store cannot append: there ``metrics.jsonl`` is rewritten whole with each record.
"""

from __future__ import annotations

import datetime
import json
import logging as std_logging
import math
import time
from typing import Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from gptjax import paths

METRICS_FILE = "metrics.jsonl"
# Libraries whose INFO records (orbax logs every file of every save) would bury the progress lines.
QUIET_LIBRARIES = ("/orbax/", "/tensorstore/", "/grain/", "/tensorflow_datasets/")
TB_DIR = "tb"


class _QuietLibraries(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        from absl import logging as absl_logging  # -v 1 (DEBUG) and up: the libraries' INFO records too

        return (record.levelno >= std_logging.WARNING or absl_logging.get_verbosity() >= absl_logging.DEBUG
                or not any(s in record.pathname for s in QUIET_LIBRARIES))


def quiet_library_logs() -> None:
    """Keep warnings, drop the INFO chatter of QUIET_LIBRARIES from absl's log output (binaries call this)."""
    from absl import logging as absl_logging
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def read_metrics(workdir: str) -> list[dict]:
    """All complete records of ``WORKDIR/metrics.jsonl`` in order (empty if none).

    A last line without its newline is the record a killed process was writing: it is skipped.
    """
    path = paths.as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


class _JsonLines:
    """metrics.jsonl open for appending: a local file, or (object store) the lines kept and written whole."""

    def __init__(self, path, kept: list[dict]):
        self._path = path
        self._lines = None if paths.is_local(path) else [json.dumps(r) + "\n" for r in kept]
        self._file = path.open("a") if self._lines is None else None

    def write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self._path.write_text("".join(self._lines))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class MetricsWriter:
    """Writes scalars/text to TensorBoard and scalars to metrics.jsonl. Only the primary process writes, and
    nothing before the first record."""

    def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
        self._enabled, self._opened = enabled, False
        self._dir, self._resume_step = paths.as_path(workdir), resume_step

    def _open(self) -> None:
        if self._opened:
            return
        self._opened = True
        self._dir.mkdir(parents=True, exist_ok=True)
        path, resume_step = self._dir / METRICS_FILE, self._resume_step
        kept = []
        if resume_step > 0 and path.exists():
            kept = [r for r in read_metrics(self._dir) if r.get("step", 0) <= resume_step]
            paths.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step == 0 and path.exists():
            path.unlink()  # a fresh run (no checkpoint): stale records of an aborted first attempt
        self._jsonl = _JsonLines(path, kept)
        self._tb = EventFileWriter(str(self._dir / TB_DIR), flush_secs=30)
        start = event_pb2.Event(wall_time=time.time(), step=resume_step + 1,
                                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
        self._tb.add_event(start)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        self._open()
        clean = {k: _to_float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in clean.items() if v is not None]
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Text summaries (TensorBoard's text plugin), e.g. sample generations."""
        if not self._enabled:
            return
        self._open()
        values = []
        for tag, text in texts.items():
            tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
                                            tensor_shape=tensor_shape_pb2.TensorShapeProto())
            meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
            values.append(summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor))
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        if self._enabled and self._opened:
            self._tb.flush()

    def close(self) -> None:
        if self._enabled and self._opened:
            self._jsonl.close()
            self._tb.close()
        self._enabled = False


def _to_float(v) -> float | None:
    v = float(np.asarray(v))
    return v if math.isfinite(v) else None  # JSON has no NaN/Inf; the NaN guard reports those separately


def format_progress(step: int, total: int, *, loss: float, tokens_per_s: float | None, mfu: float | None,
                    eta_s: float | None, extra: Mapping[str, float] | None = None) -> str:
    """One log line: ``step 120/2000 (6%) | loss 3.2104 | 12,345 tok/s | MFU 31.2% | ETA 0:12:31``.
    ``tokens_per_s`` None: no rate measured yet (a first interval of one step, whose time is mostly compilation)."""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)", f"loss {loss:.4f}"]
    for k, v in (extra or {}).items():
        parts.append(f"{k} {v:.3g}")
    parts.append("tok/s n/a" if tokens_per_s is None else f"{tokens_per_s:,.0f} tok/s")
    parts.append("MFU n/a" if mfu is None else f"MFU {100 * mfu:.1f}%")
    if eta_s is not None:
        parts.append(f"ETA {datetime.timedelta(seconds=round(eta_s))}")
    return " | ".join(parts)
