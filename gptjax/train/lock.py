"""The workdir lock: one training process per workdir at a time.

``WORKDIR/lock.json`` names its holder (host, PID, start time, command). A run takes it when it enters
``RunContext``, before it writes anything, and removes it on every way out; a second process on the same workdir
(the same command launched twice, a requeued job racing its predecessor) is refused in one line naming the holder,
or, with ``wait=True`` (``--wait_for_lock``), polls until the lock is free.

A lock whose holder is gone (same host, no such PID: the process was killed with SIGKILL, the machine rebooted) is
taken over with a notice. A lock of another host is never taken over: that host may still be running; the message
says how to clear it when it is not. In a multi-host run only process 0 locks (all processes share the workdir).

Local files are created with ``O_CREAT | O_EXCL`` and taken over under ``flock``, so two racing processes never
both win. On an object store (``gs://``) there is no exclusive create: the lock is written after a look, which
keeps a second launch out but not two launched in the same second.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import time

from absl import logging
from etils import epath

from gptjax import paths
from gptjax.errors import WorkdirLockedError

LOCK_FILE = "lock.json"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv])}


def describe(holder: dict) -> str:
    return (f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command', '?')})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class WorkdirLock:
    """The lock of ``workdir``: ``acquire()`` (refuse or wait), ``release()`` (only our own lock is removed)."""

    def __init__(self, workdir, *, wait: bool = False, poll_s: float = 5.0):
        self.path = paths.as_path(workdir) / LOCK_FILE
        self.wait, self.poll_s = wait, poll_s
        self.mine = _me()
        self.held = False

    def acquire(self) -> None:
        waited = False
        while True:
            holder = self._try_acquire()
            if holder is None:
                self.held = True
                if waited:
                    logging.warning("the workdir lock is free: starting")
                return
            if not self.wait:
                raise WorkdirLockedError(self._refusal(holder))
            if not waited:
                logging.warning("waiting for %s to release %s (--wait_for_lock)", describe(holder), self.path)
                waited = True
            time.sleep(self.poll_s)

    def release(self) -> None:
        """Removes the lock if it is still ours (a takeover by another process is never undone)."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError):
            if self._read() == self.mine:
                self.path.unlink()

    def _refusal(self, holder: dict) -> str:
        text = f"workdir {self.path.parent} is in use by {describe(holder)}; its lock is {self.path}. "
        if holder.get("host") == self.mine["host"]:
            return text + ("Wait for it to finish (pass --wait_for_lock to start when it does), stop it, or use "
                           "another --workdir.")
        return text + (f"Wait for it (--wait_for_lock) or use another --workdir; if host {holder.get('host')} "
                       f"is down and no process runs there any more, delete {self.path}.")

    def _stale(self, holder: dict) -> bool:
        return holder.get("host") == self.mine["host"] and not _pid_alive(int(holder.get("pid", 0) or 0))

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # being written, or garbage: reported as an unknown holder
            return {"host": "?", "pid": 0, "started": "?", "command": "an unreadable lock file"}

    def _try_acquire(self) -> dict | None:
        """None when the lock is ours now, else its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not paths.is_local(self.path):
            holder = self._read()
            if holder is not None and not self._stale(holder):
                return holder
            self.path.write_text(json.dumps(self.mine))
            return None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over_if_stale()
        with os.fdopen(fd, "w") as f:
            json.dump(self.mine, f)
        return None

    def _take_over_if_stale(self) -> dict | None:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:  # released meanwhile: try again
            return self._try_acquire()
        with os.fdopen(fd, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one taker at a time; released on close
            if os.fstat(f.fileno()).st_ino != _inode(self.path):  # replaced or removed meanwhile
                return self._try_acquire()
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {"host": "?", "pid": 0, "started": "?", "command": "an unreadable lock file"}
            if not self._stale(holder):
                return holder
            f.seek(0)
            f.truncate()
            json.dump(self.mine, f)
        logging.warning("taking over the workdir lock of %s: no such process on this host any more", describe(holder))
        return None


def _inode(path: epath.Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
