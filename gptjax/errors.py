"""The project's error types, and the helper that turns a config section into a dataclass.

Each ``UserError`` means "the input (config, data, workdir, disk) is wrong" and carries a message that names the
field, file or batch at fault and the fix; every binary reports one in one line, without a traceback
(``gptjax.cli.run``). ``RunStopped`` is no error: a run stopped on request (SIGINT/SIGTERM) after saving its state.
They live here, below every other module, so that raising one imports nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


class UserError(Exception):
    """Base of the errors a user causes and fixes; the message says what is wrong and the fix."""


class ConfigError(UserError, ValueError):
    """A config field holds a value that cannot work; the message names the field and the fix."""


class DataError(UserError, ValueError):
    """Bad data configuration or input file; the message names the field/file/line and the fix."""


class DataFormatError(UserError, ValueError):
    """Bad post-training input; the message names where (file:line or record index) and how to fix it."""


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot hold this run (a file, not writable, locked by another process)."""


class WorkdirLockedError(WorkdirError):
    """Another process holds the workdir's lock; the message names it and how to wait or clear it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written (disk full, permissions) or none can be read; the message says which."""


class RunStopped(Exception):
    """A run stopped on request (SIGINT or SIGTERM) after saving a checkpoint of its last step.

    ``exit_code``: 128 + the signal number (130 for SIGINT, 143 for SIGTERM), the code a process killed by that
    signal reports, so a scheduler or script treats the run as not finished; re-running resumes it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class BatchError(UserError, KeyError, ValueError):
    """A batch lacks a field its objective reads, or holds one of the wrong rank or size (gptjax.data.batches).

    A KeyError for a missing field and a ValueError for a malformed one; the message names the field."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def dataclass_from_dict(cls, fields: Mapping[str, Any], section: str):
    """``cls(**fields)`` for a config dataclass; an unknown key is one error naming the config section."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown {section} config field(s) {unknown}; valid fields: {sorted(known)}")
    return cls(**dict(fields))


def check_ranges(settings, section: str, *, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """One ConfigError naming ``section.field`` for the first field of a settings dataclass out of its range."""
    for name in positive:
        if not getattr(settings, name) > 0:
            raise ConfigError(f"{section}.{name} must be positive, got {getattr(settings, name)}")
    for name in non_negative:
        if getattr(settings, name) < 0:
            raise ConfigError(f"{section}.{name} must be >= 0, got {getattr(settings, name)}")
