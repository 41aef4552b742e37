"""Compiling a stage's programs (``Stage.plan``) for a target, and measuring them."""

from __future__ import annotations

import math
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gptjax import sharding as sharding_lib
from gptjax.errors import ConfigError
from gptjax.model import count_params
from gptjax.stages import registry
from gptjax.train import aot, loop
from gptjax.tools.plan import hlo
from gptjax.tools.plan.comm import axis_bandwidth, collective_bytes
from gptjax.tools.plan.report import Plan, ProgramResult
from gptjax.tools.plan.targets import DEFAULT_EFFICIENCY, Target, make_target_mesh


def per_device_bytes(abstract_tree) -> float:
    """Bytes one device holds of ShapeDtypeStructs/arrays carrying shardings."""
    total = 0
    for x in jax.tree.leaves(abstract_tree):
        total += math.prod(x.sharding.shard_shape(x.shape)) * _itemsize(x.dtype)
    return float(total)


def _itemsize(dtype) -> int:
    """Bytes per element; a typed PRNG key (an extended dtype) holds its key data."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
        return math.prod(data.shape) * jnp.dtype(data.dtype).itemsize
    return jnp.dtype(dtype).itemsize


def stage_plan(cfg, mesh: Mesh, frozen_mesh: Mesh | None = None) -> aot.StagePlan:
    """What ``cfg.stage`` runs per step (its ``Stage.plan``), on ``mesh``.

    Attention is planned as XLA's kernel: the CPU devices that stand in for a GPU/TPU target would otherwise pick
    the CPU-only ``blocked`` attention (``model.attention_impl=auto``), which no accelerator runs."""
    if cfg.model.get("attention_impl") in (None, "auto"):
        cfg = cfg.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.model.attention_impl = "xla"
    stage = registry.get(cfg.stage)
    if stage.plan is None:
        planned = [s.name for s in registry.stages() if s.plan is not None]
        raise ConfigError(f"config.stage={cfg.stage!r} names no programs to plan; stages with a plan: {planned}")
    return stage.plan(cfg, mesh, frozen_mesh) if frozen_mesh is not None else stage.plan(cfg, mesh)


def compile_program(program: aot.PlannedProgram, *, compile: bool = True) -> ProgramResult:
    """Lower and compile one program from its abstract arguments; memory, FLOPs and collectives from the compiler.
    A compiler that refuses the program for memory (the TPU compiler: RESOURCE_EXHAUSTED) gives a result with
    ``compiler_error`` set, its arguments from the shardings and its temporaries from the message."""
    result = ProgramResult(program.name, program.calls, program.model_flops,
                           {k: per_device_bytes(v) for k, v in program.groups.items()},
                           sum(per_device_bytes(v) for v in program.also_live.values()), dict(program.mesh.shape))
    with loop.mesh_context(program.mesh):
        t0 = time.perf_counter()
        lowered = program.fn.lower(*program.args)
        result.lower_s = time.perf_counter() - t0
        if not compile:
            return result
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            result.compile_s = time.perf_counter() - t0 - result.lower_s
            return _refused(result, program, str(e).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0])
        result.compile_s = time.perf_counter() - t0 - result.lower_s
    mem = compiled.memory_analysis()
    result.argument_bytes, result.output_bytes = float(mem.argument_size_in_bytes), float(mem.output_size_in_bytes)
    result.alias_bytes, result.temp_bytes = float(mem.alias_size_in_bytes), float(mem.temp_size_in_bytes)
    result.code_bytes = float(mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result.compiler_flops = float((cost or {}).get("flops", 0.0))
    result.counts = hlo.count(compiled.as_text(), sharding_lib.MESH_AXES, tuple(program.mesh.shape.values()),
                              unknown_trips=program.unknown_trips)
    return result


def _refused(result: ProgramResult, program: aot.PlannedProgram, message: str) -> ProgramResult:
    """Arguments from the shardings (equal to the compiler's figure whenever it compiles; tested), temporaries
    from the message when it names them ("HLO temporaries (103.08G)", binary units), else NaN."""
    found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    result.temp_bytes = float(found.group(1)) * 2 ** (10 * "KMGT".index(found.group(2)) + 10) if found else math.nan
    result.argument_bytes = result.output_bytes = result.alias_bytes = per_device_bytes(program.args)
    result.compiler_error = message
    return result


def plan_stage(cfg, target: Target, mesh_shape: Sequence[int], *, efficiency: float = DEFAULT_EFFICIENCY,
               frozen_mesh: Sequence[int] | None = None, model_name: str | None = None,
               layer_flops: bool = False) -> Plan:
    """Compile every program of one step of ``cfg.stage`` for ``target`` on a (data, fsdp, tensor) mesh (with
    ``frozen_mesh``: the frozen networks on that many of the devices) and measure it (see the package doc)."""
    if not 0 < efficiency <= 1:
        raise ConfigError(f"efficiency={efficiency}: the fraction of peak the matmuls reach must be in (0, 1]")
    meshes = make_target_mesh(target, mesh_shape, frozen_mesh)
    mesh, frozen = meshes if frozen_mesh is not None else (meshes, None)
    planned = stage_plan(cfg, mesh, frozen)
    results = [compile_program(p) for p in planned.programs]
    shape = tuple(mesh.shape.values())
    analytic = {}
    if planned.step == "train step" and len(planned.programs) == 1:
        params = planned.programs[0].args[0].params
        total = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
        gather = planned.model.gather_dtype
        if gather:  # weights move in the gather dtype
            total *= jnp.dtype(gather).itemsize / jnp.dtype(planned.model.param_dtype).itemsize
        analytic = collective_bytes(planned.model, shape, micro=planned.shape["micro"], accum=planned.shape["accum"],
                                    seq_len=planned.shape["seq_len"], param_bytes=total)
    plan = Plan(target=target, model_name=model_name or str(cfg.model.preset), stage=str(cfg.stage),
                planned=planned, params_total=count_params(planned.model)["total"], mesh=dict(mesh.shape),
                frozen_mesh=dict(frozen.shape) if frozen is not None else None, programs=results,
                analytic_bytes=analytic, bandwidth=axis_bandwidth(target, shape), efficiency=efficiency)
    if layer_flops and planned.step == "train step":
        t0 = time.perf_counter()
        plan.layer_flops = hardware_flops(cfg, planned, num_devices=mesh.size)
        plan.layer_flops_s = time.perf_counter() - t0
    return plan


def hardware_flops(cfg, planned: aot.StagePlan, *, num_devices: int) -> float | None:
    """A cross-check of the HLO's FLOP count for a train step: XLA's cost analysis counts a loop body once, so this
    lowers one- and two-group *unscanned* variants with one microbatch on one CPU device; their difference is one
    layer group, the rest is outside the layers: accum × (outside + groups × group) / devices."""
    model_cfg, accum, micro = planned.model, planned.shape["accum"], planned.shape["micro"]
    period = len(model_cfg.attention_pattern)
    one = Mesh(np.asarray(jax.devices("cpu")[:1]).reshape(1, 1, 1), sharding_lib.MESH_AXES)
    costs = []
    for groups in (1, 2):
        variant = cfg.copy_and_resolve_references()
        with variant.unlocked():
            variant.model.num_layers, variant.model.scan_layers = groups * period, False
            variant.train.batch_size, variant.optim.grad_accum_steps = micro, 1
        program = stage_plan(variant, one).programs[0]
        with loop.mesh_context(one):
            cost = program.fn.lower(*program.args).cost_analysis()
        if not cost:
            return None
        costs.append(float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]))
    group = costs[1] - costs[0]
    return accum * (costs[0] - group + model_cfg.num_groups * group) / num_devices
