"""Small pieces every binary shares: one-line errors, config-file paths that work from any directory, and a quiet
JAX start.

``run(main)`` is every binary's ``app.run(main)``: whatever a user can cause (a ``gptjax.errors.UserError`` — bad
config, data file, workdir, checkpoint, disk —, a missing or unreadable path, a full disk, Ctrl-C) ends as one
``error: …`` line on stderr and exit status 1 (130 for Ctrl-C); ``--verbose`` prints the traceback above it. A run
stopped by SIGINT/SIGTERM after saving (``RunStopped``) prints its one-line notice and exits 128 + the signal
number. Anything else is a bug and keeps its traceback. ``parse_flags`` reports a bad flag or ``--config.*``
override in one line too.

``--config=configs/pretrain.py:tiny`` names a file relative to the current directory, as ml_collections'
``config_flags`` reads it. When no such file exists there (the package was installed with pip and the command
runs elsewhere), ``resolve_config_path`` maps a ``configs/…`` path onto the installed ``configs`` package, so the
README's commands work from any directory. Everything else about ``config_flags`` is unchanged: the part after
the colon goes to ``get_config``, ``--config.a.b=v`` overrides fields.

``pin_cpu_without_accelerator``: JAX registers a TPU backend on every machine and, unless ``JAX_PLATFORMS`` says
otherwise, tries it at start-up: with libtpu importable (the ``tpu`` extra, or an older test install) that loads
libtpu on a machine without TPU chips, which prints "TPU initialization failed" and ``TPU_WORKER_HOSTNAMES``
errors; without it, JAX still logs "Unable to initialize backend 'tpu'". When the machine has no TPU chip, no
NVIDIA GPU and no other JAX accelerator plugin, the CPU is the only backend that can work, so pinning it changes
nothing but the noise. ``experiments/__init__.py`` calls it before any binary imports JAX.
"""

from __future__ import annotations

import errno
import functools
import glob
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from gptjax import errors, paths
from gptjax.assets import AssetMissingError

CONFIGS_PREFIX = "configs/"
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor (as jax's hardware_utils checks)
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def resolve_config_path(spec: str | None) -> str | None:
    """``configs/x.py[:arg]`` -> the installed package's file when the relative path does not exist here."""
    if not spec:
        return spec
    path, colon, arg = spec.partition(":")
    if os.path.exists(path) or not path.replace(os.sep, "/").startswith(CONFIGS_PREFIX):
        return spec
    spec_of_configs = importlib.util.find_spec("configs")
    if spec_of_configs is None or not spec_of_configs.submodule_search_locations:
        return spec
    installed = Path(list(spec_of_configs.submodule_search_locations)[0]) / path[len(CONFIGS_PREFIX):]
    return f"{installed}{colon}{arg}" if installed.is_file() else spec


def define_config_file(name: str, default: str | None = None, help_string: str = "Config file and preset.",
                       **kwargs):
    """``config_flags.DEFINE_config_file`` whose value (and default) go through ``resolve_config_path``."""
    from absl import flags
    from ml_collections import config_flags

    holder = config_flags.DEFINE_config_file(name, resolve_config_path(default), help_string, **kwargs)
    flag = flags.FLAGS[name]
    parse = flag.parser.parse
    flag.parser.parse = lambda path: parse(resolve_config_path(path) if isinstance(path, str) else path)
    return holder


# OSErrors a user causes (a path that is missing, not writable, a file instead of a directory, a full disk), with
# the fix the one-line message suggests.
_OS_ERROR_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "fix its permissions or choose another path",
    errno.EPERM: "fix its permissions or choose another path",
    errno.EROFS: "choose a path on a writable file system",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "remove it or choose another path",
    errno.ENOSPC: "free space there or choose a path on another disk",
    errno.EDQUOT: "free space there or choose a path on another disk",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def one_line(message: str) -> str:
    """A multi-line message as one line: its lines, stripped, joined with '; '."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else "(no message)"


def describe(e: BaseException) -> tuple[int, str] | None:
    """(exit status, the one line to print) for an exception a user causes; None for a bug (keep the traceback)."""
    if isinstance(e, errors.RunStopped):
        return e.exit_code, one_line(str(e))
    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted (Ctrl-C)"
    if isinstance(e, (errors.UserError, AssetMissingError)):
        return 1, "error: " + one_line(str(e))
    code = _errno_of(e)
    if code in _OS_ERROR_FIXES:
        where = e.filename
        what = f"{where}: {e.strerror}" if where is not None else one_line(str(e))
        if code in (errno.ENOSPC, errno.EDQUOT) and where is not None:
            space = paths.space_on(where)
            what += f" ({space.describe()})" if space else ""
        return 1, f"error: {what}; {_OS_ERROR_FIXES[code]}"
    return None


def _errno_of(e: BaseException) -> int | None:
    """The errno of an OSError; for one raised with a message only (``FileNotFoundError("x: no such file")``), that
    of its class."""
    if not isinstance(e, OSError):
        return None
    if e.errno is not None:
        return e.errno
    by_class = ((FileNotFoundError, errno.ENOENT), (PermissionError, errno.EACCES), (IsADirectoryError, errno.EISDIR),
                (NotADirectoryError, errno.ENOTDIR), (FileExistsError, errno.EEXIST))
    return next((code for cls, code in by_class if isinstance(e, cls)), None)


def _call(main, argv):
    try:
        return main(argv)
    except Exception as e:  # noqa: BLE001 — a user's error is reported in one line, a bug re-raised
        _exit_with(e)
        raise
    except KeyboardInterrupt as e:
        _exit_with(e)
        raise


def _exit_with(e: BaseException) -> None:
    outcome = describe(e)
    if outcome is None:
        return
    from absl import flags, logging

    logging.flush()
    if flags.FLAGS.is_parsed() and "verbose" in flags.FLAGS and flags.FLAGS.verbose:
        traceback.print_exc()
    sys.stderr.flush()
    print(outcome[1], file=sys.stderr, flush=True)
    sys.exit(outcome[0])


def run(main, flags_parser=None) -> None:
    """``absl.app.run(main)`` with one-line errors (see the module docstring) and the ``--verbose`` flag."""
    from absl import app, flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "On an error, print its traceback above the one-line message.")
    app.run(functools.partial(_call, main), flags_parser=flags_parser or parse_flags)


def parse_flags(argv):
    """absl flag parsing with one-line errors (config_flags raises a bare AttributeError for unknown fields)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        message = lines[0] if "Traceback" not in str(e) else f"{lines[0]} {lines[-1]}"
        sys.exit(f"error: {message} (pass --helpshort to see the flags)")
    except (AttributeError, KeyError) as e:
        detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\"").split())
        sys.exit(unknown_override(argv) or f"error: bad --config override: {detail}")


def unknown_override(argv) -> str | None:
    """For an override of a config field that does not exist, one message naming it and the valid fields."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = resolve_config_path(spec).partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_config_for_error", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        cfg = module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 — the config itself fails: the caller's generic message stands
        return None
    for a in argv:
        if not a.startswith("--config."):
            continue
        keys = a[len("--config."):].split("=", 1)[0].split(".")
        node, seen = cfg, []
        for k in keys:
            if not hasattr(node, "keys") or k not in node:
                where = "config." + ".".join(seen) if seen else "config"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return f"error: {a.split('=', 1)[0]}: {where} has no field {k!r}; valid fields: {valid}"
            node, seen = node[k], seen + [k]
    return None


def tpu_chips_present() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def _accelerator_plugins() -> bool:
    """Whether a JAX PJRT plugin (CUDA, ROCm, Metal, ...) is installed: JAX would want to try it."""
    from importlib import metadata

    return bool(metadata.entry_points(group="jax_plugins")) or importlib.util.find_spec("jax_plugins") is not None


def pin_cpu_without_accelerator() -> bool:
    """Set JAX_PLATFORMS=cpu when this machine has no TPU chip, no NVIDIA GPU and no accelerator plugin.

    Does nothing when JAX_PLATFORMS is already set. Returns True if it pinned the CPU.
    """
    if "JAX_PLATFORMS" in os.environ:
        return False
    if tpu_chips_present() or any(os.path.exists(d) for d in _NVIDIA_DEVICES) or _accelerator_plugins():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    import sys

    if "jax" in sys.modules:  # JAX already imported (by a test, say): it reads its config now, not the environment
        try:
            sys.modules["jax"].config.update("jax_platforms", "cpu")
        except Exception:  # backends already started: nothing left to quiet
            pass
    return True
