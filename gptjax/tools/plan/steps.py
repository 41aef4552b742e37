"""Compiling a config's train step from abstract, sharded arguments, and measuring it."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import flops as flops_lib
from gptjax import sharding as sharding_lib
from gptjax.data import batches
from gptjax.errors import ConfigError
from gptjax.model import GPT, GPTConfig, count_params
from gptjax.stages import common, registry
from gptjax.train import loop
from gptjax.train import state as state_lib
from gptjax.train.optim import make_optimizer
from gptjax.tools.plan.comm import axis_bandwidth, collective_bytes
from gptjax.tools.plan.report import Plan
from gptjax.tools.plan.targets import DEFAULT_EFFICIENCY, Target, make_target_mesh


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


