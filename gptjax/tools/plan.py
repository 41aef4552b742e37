"""Ahead-of-time planner: does a config's train step fit a cluster, and how fast would it run there?

The real train step of the config's stage (``train.loop.make_train_step`` with the config's AdamW from
``train.optim`` and the stage's ``objective`` from the stage registry, jitted as ``loop.run_training`` jits it) is
lowered and compiled for the target's devices from abstract, sharded arguments (``jax.ShapeDtypeStruct`` with
shardings, the batch from the stage's batch contract: nothing is allocated). The memory figures are the
compiler's own for that program.

Targets: N fake CPU devices (the process must start with ``--xla_force_host_platform_device_count=N`` in
``XLA_FLAGS``; ``experiments.plan`` arranges that), or a TPU slice by name through
``jax.experimental.topologies`` (needs libtpu, not a TPU: the TPU compiler runs on this CPU).

What a plan reports, per device:
- bytes: parameters and optimizer state (from their shardings; with the batch they make up the compiler's
  argument bytes), gradients (estimated: one parameter-shaped copy, plus a float32 accumulator with gradient
  accumulation), the compiler's temporaries (activations, gradients, gathered FSDP weights …) and the peak;
- FLOPs per step: the compiler's count (``cost_analysis``) and the analytic 6·N + 12·L·d·T count of
  ``gptjax.flops`` (model FLOPs). XLA counts a loop body once — a 96-layer scan, and the gradient-accumulation
  loop — so the raw count is far too low; ``layer_flops=True`` also lowers 1- and 2-group unscanned variants
  to measure one layer group and reports the count times the trip counts (hardware FLOPs, remat recompute
  included; see ``hardware_flops``);
- time: compute = hardware FLOPs / (peak × efficiency); communication = the analytic bytes of the
  collectives each mesh axis implies (``collective_bytes``) / that axis's bandwidth (``axis_bandwidth``);
  step = max of the two (communication fully overlapped), MFU = model FLOPs / (step time × peak).

Caveat for CPU targets: the program is the CPU compiler's. Its fusion and buffer assignment differ from a GPU
compiler's, so temporaries are an estimate of the GPU's (the TPU path uses the TPU compiler itself).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import flops as flops_lib
from gptjax import sharding as sharding_lib
from gptjax.errors import ConfigError
from gptjax.data import batches
from gptjax.model import GPT, GPTConfig, count_params
from gptjax.stages import common, registry
from gptjax.train import loop
from gptjax.train import state as state_lib
from gptjax.train.optim import make_optimizer

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
               devices_per_node: int = GPUS_PER_NODE, name: str | None = None) -> Target:
    """``num_devices`` fake CPU devices standing in for accelerators with the given figures (default: H100 SXM
    nodes of 8 GPUs on NVLink, one 400 Gb/s NIC per GPU between nodes)."""
    devices = jax.devices("cpu")
    if num_devices < 1 or len(devices) < num_devices:
        raise ConfigError(f"the plan needs {num_devices} fake CPU devices but this process has {len(devices)}; "
                          f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} "
                          f"(python -m experiments.plan sets it)")
    return Target(name or f"{num_devices} fake CPU devices", tuple(devices[:num_devices]), float(device_memory),
                  float(peak_flops or H100_PEAK), float(link_bandwidth or GPU_LINK_BANDWIDTH),
                  float(node_bandwidth or GPU_NODE_BANDWIDTH), int(devices_per_node))


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
                  float(peak), float(bandwidth), topology=topology)


def make_target_mesh(target: Target, mesh_shape: Sequence[int]) -> Mesh:
    """A (data, fsdp, tensor) mesh over the target's devices (-1 auto-fills); TPU device order follows the torus."""
    shape = sharding_lib.resolve_mesh_shape(mesh_shape, len(target.devices))
    if target.topology is not None:
        from jax.experimental import topologies
        return topologies.make_mesh(target.topology, shape, sharding_lib.MESH_AXES)
    return Mesh(np.asarray(target.devices).reshape(shape), sharding_lib.MESH_AXES)


def resolve_microbatch(batch_size: int, grad_accum_steps: int, data_parallel: int) -> tuple[int, int, str]:
    """(microbatch, accumulation steps, note): the config's, or — when its microbatch does not split evenly
    over the data-parallel devices — the smallest microbatch that does and divides the batch."""
    if batch_size % grad_accum_steps:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by optim.grad_accum_steps="
                          f"{grad_accum_steps}")
    micro = batch_size // grad_accum_steps
    if micro % data_parallel == 0:
        return micro, grad_accum_steps, ""
    fits = [m for m in range(data_parallel, batch_size + 1, data_parallel) if batch_size % m == 0 and m >= micro]
    if not fits:
        raise ConfigError(f"train.batch_size={batch_size} cannot be split into microbatches that are multiples of "
                          f"the {data_parallel} data-parallel devices (mesh data x fsdp); use a multiple of "
                          f"{data_parallel}")
    new = fits[0]
    return new, batch_size // new, (f"optim.grad_accum_steps {grad_accum_steps} -> {batch_size // new}: a microbatch "
                                    f"of {micro} does not split over {data_parallel} data-parallel devices; "
                                    f"{new} does ({new // data_parallel} per device)")


# What each mesh axis communicates, for the report (see collective_bytes).
COLLECTIVES = {"fsdp": "fsdp: all-gather weights x2, reduce-scatter grads", "data": "data: all-reduce grads",
               "tensor": "tensor: all-reduce activations"}


def collective_bytes(model_cfg: GPTConfig, mesh_shape: Sequence[int], *, micro: int, accum: int, seq_len: int,
                     param_bytes: float) -> dict[str, float]:
    """Bytes one device sends per step over each mesh axis (ring algorithms: an all-gather or reduce-scatter of
    S bytes over n devices moves S·(n−1)/n per device, an all-reduce twice that).

    - fsdp: every microbatch all-gathers the weights for the forward and again for the backward, and
      reduce-scatters the gradients (``param_bytes``: all parameters in their storage dtype, as the CPU-compiled
      program gathers them; a compiler that gathers after the cast to bf16 halves this);
    - data: every microbatch all-reduces the (fsdp×tensor-sharded) gradients;
    - tensor: per layer, the attention and MLP outputs are all-reduced in the forward, their input gradients in
      the backward, and again in the recomputed forward under remat (activations in the compute dtype).
    Ignored: the vocabulary-parallel logits' reductions, the loss and norm scalars.
    """
    data, fsdp, tensor = mesh_shape
    out: dict[str, float] = {}
    if fsdp > 1:
        out["fsdp"] = accum * 3 * param_bytes / tensor * (fsdp - 1) / fsdp
    if data > 1:
        out["data"] = accum * 2 * param_bytes / (fsdp * tensor) * (data - 1) / data
    if tensor > 1:
        rows = micro // (data * fsdp)
        act = rows * seq_len * model_cfg.d_model * jnp.dtype(model_cfg.dtype).itemsize
        per_layer = 2 * (2 + (1 if model_cfg.remat != "none" else 0))  # attn + MLP, fwd/bwd(/recompute)
        out["tensor"] = accum * model_cfg.num_layers * per_layer * 2 * act * (tensor - 1) / tensor
    return out


def axis_bandwidth(target: Target, mesh_shape: Sequence[int]) -> dict[str, float]:
    """Bandwidth of each mesh axis. Devices fill the mesh with ``tensor`` varying fastest, so an axis stays
    inside a node when its size times the sizes of the faster axes is at most ``devices_per_node``."""
    out, span = {}, 1
    for axis, size in reversed(list(zip(sharding_lib.MESH_AXES, mesh_shape))):
        span *= size
        inside = target.node_bandwidth is not None and span <= target.devices_per_node
        out[axis] = target.node_bandwidth if inside else target.link_bandwidth
    return out


@dataclasses.dataclass
class Plan:
    """Everything a plan found; bytes and FLOPs are per device, times per optimizer step."""

    target: Target
    model_name: str
    model_cfg: GPTConfig
    params_total: int
    mesh: dict[str, int]
    batch_size: int  # sequences per optimizer step
    micro: int  # sequences per accumulation microbatch (global)
    accum: int  # microbatches per step
    seq_len: int
    notes: list[str]
    param_bytes: float
    opt_bytes: float
    batch_bytes: float
    grad_bytes: float  # estimate (inside temporaries)
    argument_bytes: float  # compiler
    output_bytes: float
    alias_bytes: float
    temp_bytes: float
    code_bytes: float
    compiler_flops: float | None  # as reported: loop bodies counted once (None: the compiler refused)
    hardware_flops: float | None  # compiler count times trip counts (None without layer_flops)
    model_flops: float  # analytic 6N + 12·L·d·T per token, this device's share of the step
    comm_bytes: dict[str, float]  # per mesh axis
    bandwidth: dict[str, float]  # per mesh axis
    efficiency: float
    lower_s: float
    compile_s: float
    layer_flops_s: float
    compiler_error: str | None = None  # the compiler's refusal (TPU: the program needs more HBM than there is)

    @property
    def peak_bytes(self) -> float:
        """Live at once: arguments, temporaries and outputs that do not reuse (donated) argument buffers."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.compiler_error is None and self.peak_bytes <= self.target.device_memory

    @property
    def breakdown(self) -> dict[str, float]:
        return {"parameters": self.param_bytes, "optimizer state": self.opt_bytes, "gradients": self.grad_bytes,
                "activations and other temporaries": max(self.temp_bytes - self.grad_bytes, 0.0)}

    @property
    def dominant(self) -> str:
        return max(self.breakdown.items(), key=lambda kv: kv[1])[0]

    @property
    def compute_s(self) -> float:
        flops = self.hardware_flops if self.hardware_flops else self.model_flops
        return flops / (self.target.peak_flops * self.efficiency)

    @property
    def comm_s(self) -> float:
        return sum(b / self.bandwidth[axis] for axis, b in self.comm_bytes.items())

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.comm_s)

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_s * self.target.peak_flops)

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.seq_len / self.step_s

    def verdict(self) -> str:
        use = self.peak_bytes / self.target.device_memory
        bound = "communication" if self.comm_s > self.compute_s else "compute"
        if self.fits:
            return (f"FITS: {format_bytes(self.peak_bytes)} of {format_bytes(self.target.device_memory)} per device "
                    f"({100 * use:.0f}%); {self.dominant} dominate; {bound}-bound")
        per_rank = self.micro // (self.mesh["data"] * self.mesh["fsdp"])
        shrink = []
        if per_rank > 1:
            shrink.append("a smaller microbatch per device (raise optim.grad_accum_steps)")
        if self.model_cfg.remat != "full":
            shrink.append("more remat (model.remat=full)")
        shrink.append("tensor parallelism (the mesh's tensor axis splits activations and weights)")
        split = "more devices on fsdp/tensor"
        hint = {"activations and other temporaries": " or ".join(shrink), "optimizer state": split,
                "parameters": split, "gradients": split + (" or fewer accumulation steps (no float32 "
                                                           "accumulator at optim.grad_accum_steps=1)"
                                                           if self.accum > 1 else "")}
        refused = "the compiler refused the program; " if self.compiler_error else ""
        return (f"DOES NOT FIT: {refused}{format_bytes(self.peak_bytes)} per device > "
                f"{format_bytes(self.target.device_memory)} ({100 * use:.0f}%); {self.dominant} dominate -> try "
                f"{hint[self.dominant]}")


# --- compiling -------------------------------------------------------------------------------------------------

def model_config_of(cfg) -> GPTConfig:
    """The config's GPTConfig (preset + overrides; vocabulary from its tokenizer), as the stage runner builds it."""
    stage = registry.get(cfg.stage)
    if stage.objective is None or stage.batch is not batches.LM_BATCH:
        lm_stages = [s.name for s in registry.stages() if s.objective is not None and s.batch is batches.LM_BATCH]
        raise ConfigError(f"config.stage={cfg.stage!r}: the planner compiles the LM train step of stages "
                          f"{lm_stages}")
    if cfg.model.preset == common.FROM_INIT:
        raise ConfigError("model.preset='from_init' names no model; give the preset (e.g. "
                          "--config.model.preset=gpt3-175b)")
    return common.build_model_config(cfg.model, common.build_tokenizer(cfg.tokenizer), int(cfg.train.seq_len))


def per_device_bytes(abstract_tree) -> float:
    """Bytes one device holds of ShapeDtypeStructs/arrays carrying shardings."""
    total = 0
    for x in jax.tree.leaves(abstract_tree):
        total += math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    return float(total)


def _cost(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0))


@dataclasses.dataclass
class CompiledStep:
    lowered: Any
    compiled: Any | None  # None when only lowered
    abstract_state: Any  # the TrainState's ShapeDtypeStructs with shardings
    abstract_batch: dict
    lower_s: float
    compile_s: float


def compile_train_step(cfg, model_cfg: GPTConfig, mesh: Mesh, *, micro: int, accum: int,
                       compile: bool = True) -> CompiledStep:
    """Lower (and compile) the trainer's step for ``mesh`` from abstract arguments (nothing is allocated)."""
    t = cfg.train
    seq_len = int(t.seq_len)
    model = GPT(model_cfg)
    rng = jax.random.key(int(t.seed))
    boxed = state_lib.abstract_boxed_params(state_lib.default_init_params_fn(model, seq_len), rng)
    tx, schedule = make_optimizer(cfg.optim, int(t.steps), nn.unbox(boxed))
    shardings = state_lib.state_shardings(boxed, tx, mesh)
    abstract = state_lib.abstract_state(boxed, tx, shardings, rng)
    loss_fn = registry.get(cfg.stage).objective(cfg, model)
    # The batch and the jit exactly as loop.run_training builds them: (microbatch slot, batch, length).
    batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))
    batch = batches.abstract(batches.LM_BATCH, {"B": micro, "T": seq_len}, leading=(accum,), sharding=batch_sharding)
    num_micro = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    step = jax.jit(loop.make_train_step(loss_fn, tx, schedule, shardings.params),
                   in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None),
                   donate_argnums=(0,))
    with loop.mesh_context(mesh):
        t0 = time.perf_counter()
        lowered = step.lower(abstract, batch, num_micro)
        t1 = time.perf_counter()
        compiled = lowered.compile() if compile else None
        t2 = time.perf_counter()
    return CompiledStep(lowered, compiled, abstract, batch, t1 - t0, t2 - t1)


def hardware_flops(cfg, model_cfg: GPTConfig, *, micro: int, accum: int, num_devices: int) -> float | None:
    """FLOPs of the whole step per device, every loop iteration counted (remat recompute included).

    XLA's cost analysis counts a loop body once, so this lowers one- and two-group *unscanned* variants of the
    step with one microbatch (on one CPU device: lowering is cheap and the unpartitioned program's count is the
    global one): their difference is one layer group, the rest is everything outside the layers; then
    step = accum × (outside + groups × one group) / devices, i.e. assuming the partitioned program adds no
    redundant compute (the optimizer, outside the accumulation loop, is over-counted accum-fold: negligible).
    None where the backend cannot analyse a lowered program.
    """
    period = len(model_cfg.attention_pattern)
    one_device = Mesh(np.asarray(jax.devices("cpu")[:1]).reshape(1, 1, 1), sharding_lib.MESH_AXES)
    costs = []
    for groups in (1, 2):
        variant = model_cfg.replace(num_layers=groups * period, scan_layers=False)
        lowered = compile_train_step(cfg, variant, one_device, micro=micro, accum=1, compile=False).lowered
        cost = lowered.cost_analysis()
        if not cost:
            return None
        costs.append(float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]))
    group = costs[1] - costs[0]
    outside = costs[0] - group
    return accum * (outside + model_cfg.num_groups * group) / num_devices


def plan_train_step(cfg, target: Target, mesh_shape: Sequence[int], *, efficiency: float = DEFAULT_EFFICIENCY,
                    layer_flops: bool = True, model_name: str | None = None) -> Plan:
    """Compile ``cfg``'s train step for ``target`` on a (data, fsdp, tensor) mesh and measure it (see module doc)."""
    if not 0 < efficiency <= 1:
        raise ConfigError(f"efficiency={efficiency}: the fraction of peak the matmuls reach must be in (0, 1]")
    model_cfg = model_config_of(cfg)
    mesh = make_target_mesh(target, mesh_shape)
    dp = sharding_lib.data_parallel_size(mesh)
    micro, accum, note = resolve_microbatch(int(cfg.train.batch_size), int(cfg.optim.grad_accum_steps), dp)
    notes = [note] if note else []
    t0 = time.perf_counter()
    try:
        step = compile_train_step(cfg, model_cfg, mesh, micro=micro, accum=accum)
        mem, refusal = step.compiled.memory_analysis(), None
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that cannot fit its HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        failed_s = time.perf_counter() - t0
        step = compile_train_step(cfg, model_cfg, mesh, micro=micro, accum=accum, compile=False)
        step.compile_s = failed_s - step.lower_s
        mem, refusal = None, str(e).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
    t0 = time.perf_counter()
    hardware = (hardware_flops(cfg, model_cfg, micro=micro, accum=accum, num_devices=mesh.size)
                if layer_flops else None)
    layer_s = time.perf_counter() - t0

    seq_len = int(cfg.train.seq_len)
    params = step.abstract_state.params
    param_bytes = per_device_bytes(params)
    param_count_device = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(params))
    grad_bytes = param_bytes + (4.0 * param_count_device if accum > 1 else 0.0)  # + float32 accumulator
    total_param_bytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    num_devices = mesh.size
    model_flops = flops_lib.flops_per_token(model_cfg, seq_len) * int(cfg.train.batch_size) * seq_len / num_devices
    return Plan(
        target=target, model_name=model_name or str(cfg.model.preset), model_cfg=model_cfg,
        params_total=count_params(model_cfg)["total"], mesh=dict(mesh.shape), batch_size=int(cfg.train.batch_size),
        micro=micro, accum=accum, seq_len=seq_len, notes=notes,
        param_bytes=param_bytes, opt_bytes=per_device_bytes(step.abstract_state.opt_state),
        batch_bytes=per_device_bytes(step.abstract_batch), grad_bytes=grad_bytes,
        **(_memory_figures(mem) if mem is not None else _refusal_figures(refusal, step)),
        compiler_flops=_cost(step.compiled) if mem is not None else None, hardware_flops=hardware,
        model_flops=model_flops, compiler_error=refusal,
        comm_bytes=collective_bytes(model_cfg, tuple(mesh.shape.values()), micro=micro, accum=accum,
                                    seq_len=seq_len, param_bytes=total_param_bytes),
        bandwidth=axis_bandwidth(target, tuple(mesh.shape.values())),
        efficiency=efficiency, lower_s=step.lower_s, compile_s=step.compile_s, layer_flops_s=layer_s)


def _memory_figures(mem) -> dict[str, float]:
    return {"argument_bytes": float(mem.argument_size_in_bytes), "output_bytes": float(mem.output_size_in_bytes),
            "alias_bytes": float(mem.alias_size_in_bytes), "temp_bytes": float(mem.temp_size_in_bytes),
            "code_bytes": float(mem.generated_code_size_in_bytes)}


def _refusal_figures(message: str, step: CompiledStep) -> dict[str, float]:
    """Memory figures when the compiler refused: arguments from the shardings (equal to the compiler's figure
    whenever it does compile; tested), temporaries from the message when it names them ("HLO temporaries
    (103.08G)", binary units), else NaN."""
    found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    temp = float(found.group(1)) * 2 ** (10 * "KMGT".index(found.group(2)) + 10) if found else float("nan")
    arguments = per_device_bytes(step.abstract_state) + per_device_bytes(step.abstract_batch)
    return {"argument_bytes": arguments, "output_bytes": arguments, "alias_bytes": arguments, "temp_bytes": temp,
            "code_bytes": 0.0}


# --- reporting -------------------------------------------------------------------------------------------------

def format_plan(plan: Plan) -> str:
    """The plan as a readable table (what experiments.plan prints)."""
    c, m = plan.model_cfg, plan.mesh
    big = max(plan.argument_bytes, plan.temp_bytes) >= 0.1 * GB
    scale, unit = (GB, "GB") if big else (1e6, "MB")
    gb = lambda b: f"{b / scale:10.2f} {unit}"  # noqa: E731
    lines = [
        f"plan: {plan.model_name} ({plan.params_total / 1e9:.2f}B params) train step on {plan.target.name}, "
        f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}",
        f"  batch {plan.batch_size} x {plan.seq_len} tokens = {plan.accum} microbatch(es) of {plan.micro} "
        f"({plan.micro // (m['data'] * m['fsdp'])} per data-parallel rank); remat {c.remat}; compute {c.dtype}, "
        f"params {c.param_dtype}",
        *[f"  note: {n}" for n in plan.notes],
        f"  lowered in {plan.lower_s:.1f} s, compiled in {plan.compile_s:.1f} s"
        + (f" (+ {plan.layer_flops_s:.1f} s lowering 1- and 2-group variants for the FLOP count)"
           if plan.hardware_flops is not None else ""),
        *([f"  the compiler refused: {plan.compiler_error}"] if plan.compiler_error else []),
        "per device memory",
        f"  parameters                        {gb(plan.param_bytes)}",
        f"  optimizer state                   {gb(plan.opt_bytes)}",
        f"  batch                             {gb(plan.batch_bytes)}",
        f"  = arguments (compiler)            {gb(plan.argument_bytes)}",
        f"  gradients (estimate)              {gb(plan.grad_bytes)}   part of the temporaries",
        f"  activations and other temporaries {gb(plan.breakdown['activations and other temporaries'])}",
        f"  = temporaries (compiler)          {gb(plan.temp_bytes)}",
        f"  outputs not aliased to arguments  {gb(plan.output_bytes - plan.alias_bytes)}",
        f"  peak                              {gb(plan.peak_bytes)}   of {gb(plan.target.device_memory).strip()}",
        "FLOPs per step per device",
    ]
    if plan.compiler_flops is not None:
        lines.append(f"  compiler, as reported             {plan.compiler_flops:10.3e}   (each loop body counted once)")
    if plan.hardware_flops is not None:
        lines.append(f"  compiler x loop trip counts       {plan.hardware_flops:10.3e}   (hardware FLOPs, incl. "
                     f"remat recompute)")
    lines += [
        f"  analytic 6N + 12LdT               {plan.model_flops:10.3e}   (model FLOPs, gptjax.flops)",
        f"time per step (peak {plan.target.peak_flops / 1e12:.0f} TFLOP/s per device at {100 * plan.efficiency:.0f}% "
        f"on {'hardware' if plan.hardware_flops else 'model'} FLOPs; communication overlapped)",
        f"  compute                           {plan.compute_s:10.3f} s",
    ]
    for axis, b in plan.comm_bytes.items():
        lines.append(f"  {COLLECTIVES[axis]:<50} {b / plan.bandwidth[axis]:10.3f} s   ({b / GB:,.1f} GB per device "
                     f"at {plan.bandwidth[axis] / 1e9:.0f} GB/s)")
    lines += [
        f"  step = max(compute, communication) {plan.step_s:9.3f} s   -> {plan.tokens_per_s:,.0f} tokens/s, "
        f"MFU {100 * plan.mfu:.1f}%",
        f"verdict: {plan.verdict()}",
    ]
    return "\n".join(lines)


def summary_row(plan: Plan) -> str:
    """One markdown table row: target, mesh, batch, remat, GB per device, step time, MFU, verdict."""
    m = plan.mesh
    return (f"| {plan.target.name} | {m['data']},{m['fsdp']},{m['tensor']} | {plan.batch_size}x{plan.seq_len} "
            f"({plan.micro // (m['data'] * m['fsdp'])}/rank x {plan.accum}) | {plan.model_cfg.remat} | "
            f"{plan.param_bytes / GB:.1f} / {plan.opt_bytes / GB:.1f} / {plan.temp_bytes / GB:.1f} | "
            f"{plan.peak_bytes / GB:.1f} of {plan.target.device_memory / GB:.0f} | {plan.step_s:.2f} s | "
            f"{100 * plan.mfu:.0f}% | {'fits' if plan.fits else 'does not fit'}; {plan.dominant} |")
