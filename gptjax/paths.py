"""Workdir paths through one filesystem layer (etils ``epath``), so a run directory may be local or ``gs://…``.

``as_path`` turns a path string into an ``epath.Path``: a local one made absolute (``~`` expanded), a URL
(``gs://bucket/run``) kept as it is. Everything a run writes outside its checkpoints (config.json, metrics.jsonl,
run_info.json, summary.json, the lock, reward_bias.json) goes through it; orbax writes checkpoints to either kind
itself. ``write_text_atomic`` writes a file whole or not at all (a rename; on an object store the upload is
atomic anyway). ``space_on`` says which device holds a local path and how much room it has, for the messages of a
full disk.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from etils import epath


def is_local(path) -> bool:
    """True unless ``path`` is a URL (``gs://``, ``s3://`` …)."""
    return "://" not in os.fspath(path)


def as_path(path) -> epath.Path:
    """``path`` as an ``epath.Path``: absolute when local, unchanged when a URL."""
    if isinstance(path, epath.Path) and not is_local(path):
        return path
    text = os.fspath(path)
    return epath.Path(os.path.abspath(os.path.expanduser(text)) if is_local(text) else text)


def write_text_atomic(path: epath.Path, text: str) -> None:
    """``path`` holds ``text`` afterwards, or (interrupted) still its old content: written aside, then renamed."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclasses.dataclass(frozen=True)
class Space:
    device: str  # as /proc/mounts names it (/dev/sda1, tmpfs, …)
    mount_point: str
    free: int  # bytes an unprivileged writer may still use
    total: int

    def describe(self) -> str:
        return (f"{self.device} (mounted at {self.mount_point}) has {fmt_bytes(self.free)} free of "
                f"{fmt_bytes(self.total)}")


def space_on(path) -> Space | None:
    """Free space on the device holding local ``path`` (or its nearest existing parent); None for a URL."""
    if not is_local(path):
        return None
    existing = os.path.realpath(os.fspath(path))
    while not os.path.exists(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    usage = shutil.disk_usage(existing)
    device, mount_point = "the disk", existing
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[:2] for line in f if len(line.split()) >= 2]
        best = max((m for m in mounts if existing == m[1] or existing.startswith(m[1].rstrip("/") + "/")),
                   key=lambda m: len(m[1]), default=None)
        if best is not None:
            device, mount_point = best
    except OSError:  # no /proc (macOS): the path itself stands for its device
        pass
    return Space(device, mount_point, usage.free, usage.total)


def fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
