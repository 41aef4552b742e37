"""Small pieces every binary shares: config-file paths that work from any directory, and a quiet JAX start.

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

import glob
import importlib.util
import os
from pathlib import Path

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
