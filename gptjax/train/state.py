"""The train state pytree and its shardings; created sharded under jit (never materialised on one device).

Shardings come from the parameters' logical axis names (``gptjax.sharding``); the optimizer state mirrors
the parameters (Adam's moments get the parameter's sharding, optax's scalar counters are replicated).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (including skipped ones); the next step's 0-based index
    params: Any  # unboxed parameter pytree
    opt_state: Any  # optax state for ``params``
    rng: jax.Array  # uint32 raw key data (jax.random.key_data): stored raw so orbax saves it as an array
    consecutive_bad: jax.Array  # int32: non-finite steps in a row, skipped (reset by a good step)
    total_bad: jax.Array  # int32: all skipped steps; step - total_bad = updates applied = optax's count

    @property
    def updates_applied(self):
        return self.step - self.total_bad


def new_state(params, tx: optax.GradientTransformation, rng_key) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=jax.random.key_data(rng_key),
                      consecutive_bad=zero, total_bad=zero)


def default_init_params_fn(model: nn.Module, seq_len: int) -> Callable[[jax.Array], Any]:
    """rng -> boxed params from ``model.init`` on a dummy (1, seq_len) token batch."""

    def init(rng):
        tokens_1T = jnp.zeros((1, seq_len), jnp.int32)
        return model.init({"params": rng}, tokens_1T)["params"]

    return init


def abstract_boxed_params(init_params_fn, rng_key):
    """Boxed ShapeDtypeStructs of the parameters (logical names kept, nothing allocated)."""
    return jax.eval_shape(init_params_fn, rng_key)


def state_shardings(boxed_abstract_params, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf of the TrainState (same pytree structure as the real state)."""
    param_sh = sharding_lib.logical_to_sharding(boxed_abstract_params, mesh)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, nn.unbox(boxed_abstract_params))
    is_sh = lambda x: isinstance(x, NamedSharding)  # noqa: E731
    opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                              transform_non_params=lambda _: replicated, is_leaf=is_sh)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                      consecutive_bad=replicated, total_bad=replicated)


def abstract_state(boxed_abstract_params, tx, shardings: TrainState, rng_key) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the state: the restore target for checkpoints."""
    shapes = jax.eval_shape(lambda p, k: new_state(p, tx, k), nn.unbox(boxed_abstract_params), rng_key)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def create_sharded_state(init_params_fn, tx, shardings: TrainState, mesh: Mesh, rng_key) -> TrainState:
    """Initialise params and optimizer state directly into their shardings (one jit, out_shardings)."""
    init_rng, state_rng = jax.random.split(rng_key)

    def init(init_rng, state_rng):
        return new_state(nn.unbox(init_params_fn(init_rng)), tx, state_rng)

    with sharding_lib.activate(mesh):
        return jax.jit(init, out_shardings=shardings)(init_rng, state_rng)


def state_with_params(params, tx, shardings: TrainState, mesh: Mesh, rng_key) -> TrainState:
    """A fresh state (step 0, new optimizer state) around given (already sharded) params: ``init_from``."""
    _, state_rng = jax.random.split(rng_key)
    with sharding_lib.activate(mesh):
        return jax.jit(lambda p, k: new_state(p, tx, k), out_shardings=shardings)(params, state_rng)
