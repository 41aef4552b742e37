"""Communication: the analytic bytes each mesh axis implies, and each axis's bandwidth."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from gptjax import sharding as sharding_lib
from gptjax.model import GPTConfig
from gptjax.tools.plan.targets import Target

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




def bandwidth_of(axes: str, bandwidth: dict[str, float]) -> float:
    """Bandwidth of a collective over mesh axes written "a+b" (the slowest of them; "" or "-": the fastest)."""
    named = [bandwidth[a] for a in axes.split("+") if a in bandwidth]
    return min(named) if named else max(bandwidth.values())
