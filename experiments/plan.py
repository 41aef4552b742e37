"""Will a stage's step fit a cluster, how fast, and at what cost? Compile it ahead of time and print memory, FLOPs,
communication (read from the compiled program), time and a verdict; or search for the fastest recipe that fits.

    python -m experiments.plan --config=configs/pretrain.py:gpt3-175b --mesh=1,64,1 --num_devices=64 \\
        --device_memory=80GB [--peak_flops=989e12] [--config.model.remat=full] [--config.model.gather_dtype=bfloat16]
    python -m experiments.plan --config=configs/pretrain.py:gpt3-175b --mesh=1,-1,1 --topology=v5p:4x4x4
    python -m experiments.plan --config=configs/ppo.py --config.model.preset=gpt3-6.7b --mesh=1,-1,1 \\
        --num_devices=64 --device_memory=80GB [--frozen_mesh=1,8,1]
    python -m experiments.plan ... --search [--search_budget_s=600]      # mesh x remat x microbatch
    python -m experiments.plan ... --cost --tokens=300e9 | --episodes=256000 [--price_per_device_hour=...]

Without ``--topology`` the step is compiled for ``--num_devices`` fake CPU devices standing in for accelerators
with ``--device_memory``/``--peak_flops`` (default: H100 SXM) in nodes of ``--devices_per_node`` linked at
``--node_bandwidth`` (NVLink) inside and ``--link_bandwidth`` (one 400 Gb/s NIC per GPU) between nodes;
this binary sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` itself (re-executing when JAX was
imported first). With ``--topology`` it compiles for that TPU slice with the TPU compiler (needs libtpu:
``pip install "jax[tpu]==0.10.2"``; no TPU needed); ``--search`` there searches on as many fake CPU devices and
confirms with the TPU compiler. See gptjax/tools/plan/ for what each figure means.
Bad input ends in one error line and exit status 1.
"""

from __future__ import annotations

import math
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
    n, topology = _flag(argv, "num_devices"), _flag(argv, "topology")
    if topology and any(a in ("--search", "--search=true") for a in argv):
        dims = topology.split(":")[-1].split("x")
        n = str(math.prod(int(d) for d in dims)) if all(d.isdigit() for d in dims) else None
    elif topology:
        return  # a TPU topology brings its own devices
    if n is None or not n.isdigit():
        return  # a bad value is reported by the flag parser
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
from gptjax.errors import ConfigError  # noqa: E402
from gptjax.tools import plan as plan_lib  # noqa: E402
from gptjax.tools.plan import cost as cost_lib  # noqa: E402
from gptjax.tools.plan import search as search_lib  # noqa: E402

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
_LAYER_FLOPS = flags.DEFINE_bool("layer_flops", False, "Also lower 1- and 2-group unscanned variants of a train step "
                                 "to cross-check the HLO's FLOP count.")
_FROZEN = flags.DEFINE_list("frozen_mesh", None, "Put the frozen networks (PPO: reference and reward model) on this "
                            "(data, fsdp, tensor) mesh of the last devices; the main mesh takes the rest.")
_SEARCH = flags.DEFINE_bool("search", False, "Search mesh x remat x microbatch for the fastest recipe that fits.")
_SEARCH_BUDGET = flags.DEFINE_float("search_budget_s", 540.0, "Seconds the search may spend compiling.")
_COST = flags.DEFINE_bool("cost", False, "Also print the run's cost: give --tokens or --episodes.")
_TOKENS = flags.DEFINE_float("tokens", None, "Tokens the run trains on (pretraining, SFT, reward model).")
_EPISODES = flags.DEFINE_float("episodes", None, "Episodes the run samples (PPO).")
_PRICE = flags.DEFINE_float("price_per_device_hour", None, "Dollars per device-hour (default: the device's on-demand "
                            "list price in gptjax/tools/plan/cost.py, an assumption).")
_WATTS = flags.DEFINE_float("device_watts", None, "Power per device for the energy figure (default: its TDP).")

def _target():
    if _TOPOLOGY.value:
        if _NUM_DEVICES.value:
            raise ConfigError("--num_devices is for fake CPU devices; a --topology brings its own chips")
        memory = plan_lib.parse_bytes(_DEVICE_MEMORY.value) if _DEVICE_MEMORY.value else None
        return plan_lib.tpu_target(_TOPOLOGY.value, device_memory=memory, peak_flops=_PEAK.value,
                                   link_bandwidth=_BANDWIDTH.value)
    if not _NUM_DEVICES.value or not _DEVICE_MEMORY.value:
        raise ConfigError("give --num_devices and --device_memory (e.g. --num_devices=64 --device_memory=80GB), or "
                          "a TPU --topology")
    return plan_lib.cpu_target(_NUM_DEVICES.value, plan_lib.parse_bytes(_DEVICE_MEMORY.value),
                               peak_flops=_PEAK.value, link_bandwidth=_BANDWIDTH.value,
                               node_bandwidth=_NODE_BANDWIDTH.value, devices_per_node=_PER_NODE.value)


def _search(cfg, target):
    """The search's winner (a TPU target: searched on its CPU stand-in, confirmed by the TPU compiler)."""
    stand_in = plan_lib.cpu_stand_in(target) if target.topology is not None else target
    print(f"searching mesh x remat x sequences per device for {target.name} (budget {_SEARCH_BUDGET.value:.0f} s):")
    best, tried = search_lib.search(cfg, stand_in, budget_s=_SEARCH_BUDGET.value,
                                    confirm=target if target.topology is not None else None)
    if best is None:
        raise ConfigError(f"no recipe of the {len(tried)} tried fits {target.name}; see the lines above")
    accum = best.plan.planned.shape["accum"]
    recipe = ("mesh.shape", "model.remat", "optim.grad_accum_steps")
    extra = "".join(f" {a}" for a in sys.argv[1:] if a.startswith("--config.")
                    and not any(a.startswith(f"--config.{k}=") for k in recipe))
    print(f"fastest recipe that fits ({len(tried)} compiled):\n  "
          + search_lib.recipe_command(_flag(sys.argv, "config"), best, accum, extra))
    return best.plan


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    try:
        mesh = tuple(int(s) for s in _MESH.value)
    except ValueError:
        raise ConfigError(f"--mesh={','.join(_MESH.value)}: give three integers (data, fsdp, tensor)") from None
    try:
        frozen = tuple(int(s) for s in _FROZEN.value) if _FROZEN.value else None
    except ValueError:
        raise ConfigError(f"--frozen_mesh={','.join(_FROZEN.value)}: give three integers") from None
    target = _target()
    if _COST.value and not (_TOKENS.value or _EPISODES.value):
        raise ConfigError("--cost needs --tokens=N (pretraining, SFT, reward model) or --episodes=N (PPO)")
    if _SEARCH.value:
        plan = _search(cfg, target)
    else:
        plan = plan_lib.plan_stage(cfg, target, mesh, efficiency=_EFFICIENCY.value, frozen_mesh=frozen,
                                   layer_flops=_LAYER_FLOPS.value)
    print(plan_lib.format_plan(plan))
    if _COST.value:
        amount = _EPISODES.value if plan.planned.unit == "episodes" else _TOKENS.value
        if amount is None:
            raise ConfigError(f"a {plan.stage} step consumes {plan.planned.unit}: give --{plan.planned.unit}=N")
        print(cost_lib.format_cost(plan, cost_lib.run_cost(plan, amount, price=_PRICE.value, watts=_WATTS.value)))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run(main)
