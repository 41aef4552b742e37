"""The devices a plan is for: fake CPU devices standing in for GPUs, or a TPU slice compiled for with libtpu;
their memory, peak FLOP/s and link bandwidths."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from gptjax import sharding as sharding_lib
from gptjax.errors import ConfigError

GB = 1e9
H100_PEAK = 989e12  # dense bf16, H100/H200 SXM (gptjax.flops)
# Bytes per second one device moves in a collective, when the target does not say. GPU clusters: one
# 400 Gb/s InfiniBand NIC per GPU between nodes; NVLink (H100: 900 GB/s both directions) inside an 8-GPU node.
# TPU: ICI everywhere; v5p has 4,800 Gb/s per chip over 6 links, and a ring along one torus axis uses 2.
GPU_LINK_BANDWIDTH = 50e9
GPU_NODE_BANDWIDTH = 450e9
GPUS_PER_NODE = 8
TPU_LINK_BANDWIDTH = {"v4": 2 * 2400e9 / 8 / 6, "v5p": 2 * 4800e9 / 8 / 6, "v5e": 2 * 1600e9 / 8 / 4,
                      "v6e": 2 * 3584e9 / 8 / 4}
# HBM per chip by TPU generation (topology-name prefix). v5p: what the TPU compiler reports available (95.74G,
# binary units; it refuses programs that need more); the others: the published capacity.
TPU_MEMORY = {"v4": 32 * 2**30, "v5p": 95.74 * 2**30, "v5e": 16 * 2**30, "v5litepod": 16 * 2**30,
              "v6e": 32 * 2**30}
# HBM bandwidth per device (bytes/s): H100 SXM 3.35 TB/s (NVIDIA H100 datasheet); TPU: Cloud TPU system
# architecture pages (v4 1,200 GB/s, v5e 819 GB/s, v5p 2,765 GB/s, v6e 1,640 GB/s).
H100_HBM = 3.35e12
TPU_HBM = {"v4": 1.2e12, "v5p": 2.765e12, "v5e": 0.819e12, "v5litepod": 0.819e12, "v6e": 1.64e12}
TPU_PEAK = {"v4": 275e12, "v5p": 459e12, "v5e": 197e12, "v5litepod": 197e12, "v6e": 918e12}
LIBTPU_REQUIREMENT = "jax[tpu]==0.10.2"  # brings libtpu 0.0.42.1, which compiles for TPU topologies on a CPU
# libtpu is kept out of CPU environments (loaded there, JAX's backend probe prints TPU errors on every start), so
# `make setup` installs it beside the venv: <venv>/libtpu, found here and handed to JAX only for the planner.
LIBTPU_SIDE_DIR = "libtpu"
LIBTPU_HINT = (f"libtpu is not installed: `make setup` puts it in .venv/{LIBTPU_SIDE_DIR} (pip install --target "
               f"<venv>/{LIBTPU_SIDE_DIR} -r requirements-tpu-planner.txt), or pip install \"{LIBTPU_REQUIREMENT}\"")


def libtpu_library() -> str | None:
    """libtpu.so for the TPU compiler: $TPU_LIBRARY_PATH, the libtpu package, or the side install in the venv."""
    import importlib.util

    candidates = [os.environ.get("TPU_LIBRARY_PATH", "")]
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(os.path.join(list(spec.submodule_search_locations)[0], "libtpu.so"))
    side = os.environ.get("GPTJAX_LIBTPU_DIR") or os.path.join(sys.prefix, LIBTPU_SIDE_DIR)
    candidates.append(os.path.join(side, "libtpu", "libtpu.so"))
    return next((c for c in candidates if c and os.path.isfile(c)), None)
DEFAULT_EFFICIENCY = 0.6


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices a plan is for and their figures (all per device)."""

    name: str  # e.g. "64 fake CPU devices", "TPU v5p:4x4x4"
    devices: tuple  # jax Devices (fake CPU ones, or compile-only TPU ones)
    device_memory: float  # bytes of memory per device
    peak_flops: float  # dense bf16 FLOP/s per device
    link_bandwidth: float  # bytes/s a device sends (and receives) in a collective across nodes
    node_bandwidth: float | None = None  # the same inside a node (None: every link is link_bandwidth)
    devices_per_node: int = 1  # devices sharing the fast node_bandwidth links (e.g. 8 GPUs on NVLink)
    topology: Any = None  # jax TopologyDescription of a TPU target (device order follows the torus)
    hbm_bandwidth: float = H100_HBM  # bytes/s a device reads from its memory
    kind: str = "H100 SXM"  # the device, for cost (gptjax.tools.plan.cost)



def format_bytes(b: float) -> str:
    return f"{b / GB:.1f} GB" if abs(b) >= 0.1 * GB else f"{b / 1e6:.2f} MB"


def parse_bytes(text: str | float | int) -> float:
    """'80GB' -> 80e9, '95GiB' -> 95·2^30, '8e10' -> 8e10 (plain numbers are bytes)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*(|B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", str(text))
    if not m:
        raise ConfigError(f"memory size {text!r}: write a number with an optional unit, e.g. 80GB, 95GiB, 8e10")
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    return float(m.group(1)) * units[m.group(2)]


def cpu_target(num_devices: int, device_memory: float, *, peak_flops: float | None = None,
               link_bandwidth: float | None = None, node_bandwidth: float | None = None,
               devices_per_node: int = GPUS_PER_NODE, name: str | None = None, hbm_bandwidth: float | None = None,
               kind: str = "H100 SXM") -> Target:
    """``num_devices`` fake CPU devices standing in for accelerators with the given figures (default: H100 SXM
    nodes of 8 GPUs on NVLink, one 400 Gb/s NIC per GPU between nodes)."""
    devices = jax.devices("cpu")
    if num_devices < 1 or len(devices) < num_devices:
        raise ConfigError(f"the plan needs {num_devices} fake CPU devices but this process has {len(devices)}; "
                          f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} "
                          f"(python -m experiments.plan sets it)")
    return Target(name or f"{num_devices} fake CPU devices", tuple(devices[:num_devices]), float(device_memory),
                  float(peak_flops or H100_PEAK), float(link_bandwidth or GPU_LINK_BANDWIDTH),
                  float(node_bandwidth or GPU_NODE_BANDWIDTH), int(devices_per_node),
                  hbm_bandwidth=float(hbm_bandwidth or H100_HBM), kind=kind)


def tpu_target(topology_name: str, *, device_memory: float | None = None, peak_flops: float | None = None,
               link_bandwidth: float | None = None) -> Target:
    """A TPU slice by topology name (e.g. 'v5p:4x4x4', 64 chips), compiled for with libtpu on this machine."""
    generation = topology_name.split(":")[0].lower()
    # libtpu takes a machine-wide lockfile when it loads, so a second jax process that loaded it (a training run,
    # another test) would make this fail; compiling for a described topology uses no TPU, so sharing is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    library = libtpu_library()
    if library is None:
        raise ConfigError(f"cannot describe TPU topology {topology_name!r}: {LIBTPU_HINT}")
    jax.devices()  # start the backends first, so that the path below never makes JAX probe libtpu for devices
    os.environ.setdefault("TPU_LIBRARY_PATH", library)
    try:
        from jax.experimental import topologies
        topology = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
    except Exception as e:  # no libtpu (RuntimeError/ImportError), or a name libtpu does not know
        raise ConfigError(f"cannot describe TPU topology {topology_name!r} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); it needs libtpu: pip install "
                          f"\"{LIBTPU_REQUIREMENT}\", and a name such as v5p:4x4x4, v4:2x2x4, v5e:8x8") from None
    memory = device_memory or TPU_MEMORY.get(generation)
    peak = peak_flops or TPU_PEAK.get(generation)
    if not memory or not peak:
        raise ConfigError(f"no built-in memory/peak figures for TPU generation {generation!r} (known: "
                          f"{sorted(TPU_PEAK)}); pass --device_memory and --peak_flops")
    bandwidth = link_bandwidth or TPU_LINK_BANDWIDTH.get(generation, TPU_LINK_BANDWIDTH["v5p"])
    return Target(f"TPU {topology_name} ({len(topology.devices)} chips)", tuple(topology.devices), float(memory),
                  float(peak), float(bandwidth), topology=topology,
                  hbm_bandwidth=TPU_HBM.get(generation, TPU_HBM["v5p"]), kind=f"TPU {generation}")


def cpu_stand_in(target: Target) -> Target:
    """Fake CPU devices with ``target``'s figures (for fast compiles: a TPU topology's search)."""
    n = len(target.devices)
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ConfigError(f"{target.name} needs {n} fake CPU devices to stand in for it but this process has "
                          f"{len(devices)}; start it with XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return dataclasses.replace(target, name=f"{target.name}, searched on {n} fake CPU devices",
                               devices=tuple(devices[:n]), topology=None)


def make_target_mesh(target: Target, mesh_shape: Sequence[int], frozen_shape: Sequence[int] | None = None):
    """A (data, fsdp, tensor) mesh over the target's devices (-1 auto-fills); TPU device order follows the torus.
    With ``frozen_shape`` (no -1), (main mesh over the first devices, frozen mesh over the last ``prod`` of them)."""
    devices = target.devices
    frozen = None
    if frozen_shape is not None:
        n = sharding_lib.resolve_mesh_shape(frozen_shape, int(np.prod(frozen_shape)))
        if int(np.prod(n)) >= len(devices):
            raise ConfigError(f"frozen mesh {tuple(frozen_shape)} takes {int(np.prod(n))} of the {len(devices)} "
                              f"devices; leave some for the main mesh")
        if target.topology is not None:
            devices = tuple(np.asarray(_torus_order(target)).reshape(-1))
        devices, rest = devices[:len(devices) - int(np.prod(n))], devices[len(devices) - int(np.prod(n)):]
        frozen = Mesh(np.asarray(rest).reshape(n), sharding_lib.MESH_AXES)
    shape = sharding_lib.resolve_mesh_shape(mesh_shape, len(devices))
    if target.topology is not None and frozen is None:
        from jax.experimental import topologies
        main = topologies.make_mesh(target.topology, shape, sharding_lib.MESH_AXES)
    else:
        main = Mesh(np.asarray(devices).reshape(shape), sharding_lib.MESH_AXES)
    return main if frozen_shape is None else (main, frozen)


def _torus_order(target: Target):
    from jax.experimental import topologies
    return topologies.make_mesh(target.topology, (1, len(target.devices), 1), sharding_lib.MESH_AXES).devices


