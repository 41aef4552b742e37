"""A workdir belongs to one config: written at first start, checked (before anything is touched) on restart.

The resolved config is stored as ``WORKDIR/config.json``. A restart whose config differs in any field that
can change the run's results is refused with one error listing the differing fields; only the fields in
``RESTART_SAFE_FIELDS`` (how often to log/evaluate/sample/checkpoint, the mesh shape — a checkpoint
reshards onto any mesh — and the override switch itself) may change freely. ``train.allow_config_change``
(``--allow_config_change`` on the binary) accepts the change: the previous config is kept as
``config.<UTC time>.json`` and the new one becomes ``config.json``.

``check_usable`` refuses, before anything is written, a workdir that cannot hold a run: a file, or a local
directory this process cannot write. Paths go through ``gptjax.paths`` (local or ``gs://``).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping

from gptjax import paths
from gptjax.errors import ConfigError, WorkdirError

CONFIG_FILE = "config.json"

RESTART_SAFE_FIELDS = (
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.ckpt_every",
    "train.keep_ckpts",
    "train.sample_every",
    "train.sample_prompts",
    "train.sample_max_new_tokens",
    "train.peak_flops",
    "train.allow_config_change",
    "train.wait_for_lock",
    "mesh.shape",
)


class ConfigMismatchError(ConfigError):
    """The workdir holds a run of another config."""


def config_to_dict(cfg) -> dict:
    """Plain JSON-compatible dict of an ml_collections ConfigDict (or a mapping); tuples become lists."""
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.loads(json.dumps(raw, default=str))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(stored: Mapping, new: Mapping, ignore=RESTART_SAFE_FIELDS) -> list[tuple[str, Any, Any]]:
    """[(field, stored value, new value)] for every differing field not in ``ignore`` (missing = '<absent>').

    A field the stored config lacks and the new one leaves at None is no difference: None is "the default"
    (e.g. the preset's value), which is what a run written before the field existed used — so upgrading the
    code does not lock a run out of its own workdir."""
    a, b = _flatten(stored), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb and not (key not in a and vb is None):
            diffs.append((key, va, vb))
    return diffs


def check_usable(workdir) -> None:
    """A WorkdirError when ``workdir`` cannot hold a run: it is a file, or (local) it or the directory it would be
    made in cannot be written. Touches nothing."""
    if not paths.is_local(workdir):
        return
    path = os.fspath(paths.as_path(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir {path} is a file, not a directory; give a directory (a new one, or the "
                           f"workdir of a run to resume)")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"--workdir {path}: {existing} is a file, not a directory; give another --workdir")
    if not os.access(existing, os.W_OK | os.X_OK):
        readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if readonly else "is not writable by this user"
        raise WorkdirError(f"--workdir {path}: {existing} {why}; choose a writable --workdir"
                           + ("" if existing == path else f" (or make {existing} writable)"))


def check_or_write_config(workdir, cfg, *, allow_change: bool = False, write: bool = True) -> None:
    """Refuse a workdir holding another config; otherwise record ``cfg`` there.

    Nothing in ``workdir`` is created or modified before the check passes. ``write=False`` (non-primary
    processes) only checks.
    """
    new = config_to_dict(cfg)
    workdir = paths.as_path(workdir)
    path = workdir / CONFIG_FILE
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigMismatchError(f"{path} is unreadable ({e}); it is not a config written by this trainer. "
                                      f"Use a new --workdir.") from None
        diffs = config_diff(stored, new)
        if diffs and not allow_change:
            lines = "\n".join(f"  {k}: stored {va!r} -> now {vb!r}" for k, va, vb in diffs)
            raise ConfigMismatchError(
                f"workdir {workdir} holds a run with a different config ({len(diffs)} field(s) differ):\n{lines}\n"
                f"Nothing was changed. Use a new --workdir, or pass --allow_config_change "
                f"(train.allow_config_change=True) to continue this run with the new config.")
        if not diffs:
            if write and stored != new:  # only restart-safe fields changed: keep the record current
                _write_json(path, new)
            return
        if write:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            path.replace(workdir / f"config.{stamp}.json")
            _write_json(path, new)
        return
    foreign = [n for n in ("checkpoints", "metrics.jsonl") if (workdir / n).exists()]
    if foreign:
        raise ConfigMismatchError(f"workdir {workdir} holds {foreign} but no {CONFIG_FILE}: it was not written by "
                                  f"this trainer (or its config was deleted). Nothing was changed; use a new "
                                  f"--workdir.")
    if write:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_json(path, new)


def _write_json(path, obj) -> None:
    paths.write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
