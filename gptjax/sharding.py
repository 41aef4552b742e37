"""The one place that maps logical axis names to mesh axes.

Parameters and key activations carry logical names (see gptjax/model.py); ``LOGICAL_RULES`` says which mesh
axis each one is split over. The mesh has three axes:

- ``data``: pure data parallelism (parameters replicated);
- ``fsdp``: data parallelism whose parameters/optimizer state are also split (ZeRO-3 / FSDP);
- ``tensor``: Megatron-style tensor parallelism inside attention heads, MLP width and vocabulary.

Flax assigns each mesh axis at most once per array, taking the rules in table order, so
``("batch", "length", "embed")`` activations split batch over data×fsdp and keep embed whole, while ``embed``
on a weight matrix is split over fsdp. An activation name missing from the table is left unsplit by Flax; a
parameter name missing from it is an error (``logical_specs``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("position", None),
    ("norm", None),
    ("layers", None),
    ("score", None),
)
LOGICAL_AXES = tuple(name for name, _ in LOGICAL_RULES)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) with at most one -1, filled so the product is the device count."""
    shape = [int(s) for s in mesh_shape]
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh shape {tuple(shape)}: entries must be positive, with at most one -1 (auto-fill)")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ConfigError(f"mesh shape {tuple(shape)}: the fixed axes ({known} devices) do not divide the "
                              f"{num_devices} available devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ConfigError(f"mesh shape {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices but "
                          f"{num_devices} are available; make the product equal the device count or use -1")
    return tuple(shape)


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all). Axis types are Auto (GSPMD propagation)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    if devices == jax.devices():
        try:
            from jax.sharding import AxisType
            return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
        except (ImportError, TypeError):  # older jax without axis types
            return jax.make_mesh(shape, MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _check_known_axes(logical_specs) -> None:
    for spec in jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P)):
        for name in spec:
            names = name if isinstance(name, tuple) else (name,)
            for n in names:
                if n is not None and n not in LOGICAL_AXES:
                    raise ConfigError(f"logical axis {n!r} (in {spec}) has no sharding rule; "
                                      f"known logical axes: {list(LOGICAL_AXES)}")


def logical_specs(boxed_tree):
    """Logical PartitionSpecs of a boxed (nn.LogicallyPartitioned) tree; unboxed leaves get P()."""
    specs = nn.get_partition_spec(boxed_tree)
    _check_known_axes(specs)
    return specs


def mesh_specs(boxed_tree, rules=LOGICAL_RULES):
    """Mesh PartitionSpecs for a boxed tree under ``rules``."""
    return nn.logical_to_mesh(logical_specs(boxed_tree), rules)


def logical_to_sharding(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for every leaf of a boxed tree, after checking each split divides its dimension."""
    specs = mesh_specs(boxed_tree, rules)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))
    check_divisible(nn.unbox(boxed_tree), specs, mesh)
    return shardings


def check_divisible(abstract_tree, specs, mesh: Mesh) -> None:
    """One clear error naming the parameter, its dimension and the mesh axis that does not divide it."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(flat, flat_specs):
        for dim, axes in zip(leaf.shape, tuple(spec)):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                raise ConfigError(f"{jax.tree_util.keystr(path)} has a dimension of {dim} that mesh axes {axes} "
                                  f"(size {size}) do not divide; change the mesh shape or the model width")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data×fsdp; the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def row_mesh(mesh: Mesh | None, batch: int) -> Mesh | None:
    """``mesh`` when its data axes hold several devices and they divide ``batch`` (rows worth splitting over them),
    else None. Inference (sampling, scoring) on a mesh whose devices would otherwise each repeat the whole batch."""
    if mesh is None or data_parallel_size(mesh) == 1 or batch % data_parallel_size(mesh):
        return None
    return mesh


def split_rows(mesh: Mesh | None, *rows):
    """Each array's leading (batch) dimension over ``mesh``'s data axes; unchanged without a mesh."""
    if mesh is None:
        return rows
    return tuple(jax.device_put(x, batch_sharding(mesh, np.ndim(x))) for x in rows)


def mesh_of(tree) -> Mesh | None:
    """The mesh a tree's arrays are placed on (its first leaf's NamedSharding), None for host or single-device
    arrays."""
    leaves = jax.tree.leaves(tree)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def check_batch_divisible(global_batch: int, mesh: Mesh, field: str = "batch_size") -> None:
    n = data_parallel_size(mesh)
    if global_batch % n:
        raise ConfigError(f"{field}={global_batch} is not divisible by the {n} data-parallel devices "
                          f"(mesh data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']}); use a multiple of {n}")


def axis_rules():
    """Context manager that activates LOGICAL_RULES for nn.with_logical_constraint inside jitted code."""
    return nn.logical_axis_rules(LOGICAL_RULES)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Make ``mesh`` current and LOGICAL_RULES active: wrap jit calls (and tracing) of sharded steps in this."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield mesh
