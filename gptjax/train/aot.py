"""Programs to compile ahead of time: what a stage hands the planner (``Stage.plan``), and the shared train step as one.

A stage's plan is the list of jitted programs one of its steps runs (pretraining: the train step; PPO: the experience
and update programs of an iteration), each with abstract, sharded arguments (``jax.ShapeDtypeStruct`` with
shardings: nothing is allocated), the mesh it runs on, its analytic model FLOPs, and what else is held in device
memory while it runs (``also_live``: e.g. the optimizer states during PPO's rollout). ``gptjax.tools.plan``
compiles them and reads memory, FLOPs and communication from the compiler.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import sharding as sharding_lib
from gptjax.data import batches
from gptjax.errors import ConfigError
from gptjax.train import loop
from gptjax.train import state as state_lib
from gptjax.train.optim import make_optimizer


@dataclasses.dataclass
class PlannedProgram:
    """One jitted program of a stage's step, ready to lower with ``fn.lower(*args)`` under ``mesh``."""

    name: str  # e.g. "train step", "experience", "update"
    fn: Callable  # the jitted function, as the stage's loop jits it
    args: tuple  # abstract arguments (ShapeDtypeStructs with shardings)
    mesh: Mesh  # the devices it runs on
    model_flops: float  # analytic model FLOPs of one call, all devices together (gptjax.flops)
    groups: Mapping[str, Any]  # named argument trees for the memory breakdown ("parameters", "optimizer state", ...)
    calls: int = 1  # calls per step
    unknown_trips: int = 1  # trip count of its loops whose bound is an argument (the train step's accumulation)
    also_live: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # held on its devices, not its arguments


@dataclasses.dataclass
class StagePlan:
    """What one step of a stage runs, and what it consumes."""

    step: str  # "train step", "PPO iteration"
    programs: list[PlannedProgram]
    unit: str  # what a step consumes: "tokens" | "episodes"
    per_step: float  # of those, per step
    tokens_per_step: float  # tokens the step trains on (for tokens/s)
    model: Any  # the main network's GPTConfig (for the report)
    notes: list[str] = dataclasses.field(default_factory=list)
    commands: dict = dataclasses.field(default_factory=dict)  # config overrides that reproduce it (``--config.*``)
    shape: dict = dataclasses.field(default_factory=dict)  # batch, micro, accum, seq_len of a train step


def resolve_microbatch(batch_size: int, grad_accum_steps: int, data_parallel: int) -> tuple[int, int, str]:
    """(microbatch, accumulation steps, note): the config's, or — when its microbatch does not split evenly
    over the data-parallel devices — the smallest microbatch that does and divides the batch."""
    if batch_size < 1 or grad_accum_steps < 1 or batch_size % grad_accum_steps:
        raise ConfigError(f"train.batch_size={batch_size} must be a positive multiple of optim.grad_accum_steps="
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


def abstract_sharded(tree, shardings):
    """ShapeDtypeStructs of ``tree`` (arrays or structs) carrying ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def train_step_program(cfg, model: nn.Module, loss_fn: Callable, contract: batches.Contract, sizes: Mapping[str, int],
                       mesh: Mesh, *, micro: int, accum: int, flops_per_row: float) -> PlannedProgram:
    """The shared trainer's step (``loop.make_train_step`` with the config's AdamW), jitted as ``loop.run_training``
    jits it, on abstract arguments: the sharded train state and ``accum`` stacked microbatches of ``micro`` rows
    (``sizes`` gives the contract's other letters). ``flops_per_row``: model FLOPs per batch row."""
    t = cfg.train
    rng = jax.random.key(int(t.seed))
    boxed = state_lib.abstract_boxed_params(state_lib.default_init_params_fn(model, int(t.seq_len)), rng)
    tx, schedule = make_optimizer(cfg.optim, int(t.steps), nn.unbox(boxed))
    shardings = state_lib.state_shardings(boxed, tx, mesh)
    state = state_lib.abstract_state(boxed, tx, shardings, rng)
    batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))
    batch = batches.abstract(contract, {**sizes, "B": micro}, leading=(accum,), sharding=batch_sharding)
    num_micro = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    step = jax.jit(loop.make_train_step(loss_fn, tx, schedule, shardings.params),
                   in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None),
                   donate_argnums=(0,))
    return PlannedProgram("train step", step, (state, batch, num_micro), mesh, flops_per_row * micro * accum,
                          groups={"parameters": state.params, "optimizer state": state.opt_state, "batch": batch},
                          unknown_trips=accum)


def replicated_scalar(mesh: Mesh, dtype=jnp.float32):
    return jax.ShapeDtypeStruct((), dtype, sharding=sharding_lib.replicated(mesh))
