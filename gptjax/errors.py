"""The project's error types, and the helper that turns a config section into a dataclass.

Each error means "the input is wrong" and carries a message that names the field, file or batch at fault and the
fix; the binaries report them in one line, without a traceback. They live here, below every other module, so
that raising one imports nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field and the fix."""


class DataError(ValueError):
    """Bad data configuration or input file; the message names the field/file/line and the fix."""


class DataFormatError(ValueError):
    """Bad post-training input; the message names where (file:line or record index) and how to fix it."""


class BatchError(KeyError, ValueError):
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
