"""Will a config's train step fit a cluster? Compile it ahead of time and print memory, FLOPs, time and a verdict.

    python -m experiments.plan --config=configs/pretrain.py:gpt3-175b --mesh=1,64,1 --num_devices=64 \\
        --device_memory=80GB [--peak_flops=989e12] [--config.train.batch_size=...] [--config.model.remat=full]
    python -m experiments.plan --config=configs/pretrain.py:gpt3-175b --mesh=1,-1,1 --topology=v5p:4x4x4

Without ``--topology`` the step is compiled for ``--num_devices`` fake CPU devices standing in for accelerators
with ``--device_memory``/``--peak_flops`` (default: H100 SXM) in nodes of ``--devices_per_node`` linked at
``--node_bandwidth`` (NVLink) inside and ``--link_bandwidth`` (one 400 Gb/s NIC per GPU) between nodes;
this binary sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` itself (re-executing when JAX was
imported first). With ``--topology`` it compiles for that TPU slice with the TPU compiler (needs libtpu:
``pip install "jax[tpu]==0.10.2"``; no TPU needed). See gptjax/tools/plan/ for what each figure means.
Bad input ends in one error line and exit status 1.
"""

from __future__ import annotations

import os
import sys


def _flag(argv, name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _use_fake_devices(argv) -> None:
    """Give this process ``--num_devices`` CPU devices. XLA reads the flag once, when JAX starts its CPU backend,
    so it is set before JAX is imported; if JAX is already loaded the binary re-executes itself."""
    n = _flag(argv, "num_devices")
    if n is None or _flag(argv, "topology") or not n.isdigit():
        return  # a TPU topology brings its own devices; a bad value is reported by the flag parser
    wanted = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "").split()
    if wanted in flags and os.environ.get("JAX_PLATFORMS") == "cpu":
        return
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count=")] + [wanted]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        os.execv(sys.executable, [sys.executable, "-m", "experiments.plan", *argv[1:]])


if __name__ == "__main__":
    _use_fake_devices(sys.argv)

from absl import app, flags  # noqa: E402  (after the device count is set)

from gptjax import cli  # noqa: E402
from gptjax.assets import AssetMissingError  # noqa: E402
from gptjax.errors import ConfigError  # noqa: E402
from gptjax.tools import plan as plan_lib  # noqa: E402

_CONFIG = cli.define_config_file("config", None, "Config file and preset, e.g. configs/pretrain.py:gpt3-175b.",
                                  lock_config=True)
_MESH = flags.DEFINE_list("mesh", ["1", "-1", "1"], "(data, fsdp, tensor) mesh; one -1 takes the remaining devices "
                          "(default: pure FSDP).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Fake CPU devices to plan for (not with --topology).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4 (64 chips); needs libtpu.")
_DEVICE_MEMORY = flags.DEFINE_string("device_memory", None, "Memory per device, e.g. 80GB or 95GiB "
                                     "(default for TPU: the generation's HBM).")
_PEAK = flags.DEFINE_float("peak_flops", None, "Dense bf16 FLOP/s per device (default: H100 989e12, or the TPU's).")
_BANDWIDTH = flags.DEFINE_float("link_bandwidth", None, "Bytes/s a device moves in a collective between nodes "
                                "(default: 50e9, one 400 Gb/s NIC per GPU; TPU: two ICI links).")
_NODE_BANDWIDTH = flags.DEFINE_float("node_bandwidth", None, "The same inside a node (default 450e9: H100 NVLink).")
_PER_NODE = flags.DEFINE_integer("devices_per_node", plan_lib.GPUS_PER_NODE, "Devices on the fast links of a node.")
_EFFICIENCY = flags.DEFINE_float("efficiency", plan_lib.DEFAULT_EFFICIENCY,
                                 "Fraction of peak the compute reaches (for the step-time estimate).")
_LAYER_FLOPS = flags.DEFINE_bool("layer_flops", True, "Also lower 1- and 2-group unscanned variants to count the "
                                 "FLOPs of every loop iteration (the compiler counts a loop body once).")

USER_ERRORS = (ConfigError, AssetMissingError)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    try:
        mesh = tuple(int(s) for s in _MESH.value)
        if _TOPOLOGY.value:
            if _NUM_DEVICES.value:
                raise ConfigError("--num_devices is for fake CPU devices; a --topology brings its own chips")
            memory = plan_lib.parse_bytes(_DEVICE_MEMORY.value) if _DEVICE_MEMORY.value else None
            target = plan_lib.tpu_target(_TOPOLOGY.value, device_memory=memory, peak_flops=_PEAK.value,
                                         link_bandwidth=_BANDWIDTH.value)
        else:
            if not _NUM_DEVICES.value or not _DEVICE_MEMORY.value:
                raise ConfigError("give --num_devices and --device_memory (e.g. --num_devices=64 "
                                  "--device_memory=80GB), or a TPU --topology")
            target = plan_lib.cpu_target(_NUM_DEVICES.value, plan_lib.parse_bytes(_DEVICE_MEMORY.value),
                                         peak_flops=_PEAK.value, link_bandwidth=_BANDWIDTH.value,
                                         node_bandwidth=_NODE_BANDWIDTH.value, devices_per_node=_PER_NODE.value)
        plan = plan_lib.plan_train_step(cfg, target, mesh, efficiency=_EFFICIENCY.value,
                                        layer_flops=_LAYER_FLOPS.value)
    except ValueError as e:  # ConfigError, and int() of a bad --mesh entry
        sys.exit(f"error: {e}")
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    print(plan_lib.format_plan(plan))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
