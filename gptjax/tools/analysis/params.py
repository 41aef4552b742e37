"""Parameters of a checkpoint by module and layer: counts, norms, and the difference between two checkpoints.

Layers are reported by their depth index whatever the parameter layout (scanned ``groups`` with a leading layer
axis, or ``groups_<i>``; a group holds one block per entry of ``attention_pattern``). Names: ``layer_3/attn/qkv``
is a module, ``attn/qkv`` its module type; embeddings (``wte``, ``wpe``), ``ln_f``, ``lm_head`` and the score head
``score`` are modules outside the layers.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import jax
import numpy as np

from gptjax.errors import ConfigError
from gptjax.model import unstack_layers
from gptjax.train import checkpoint as ckpt_lib

_LAYER = re.compile(r"^layer_(\d+)/")


def layer_leaves(params: Mapping) -> dict[str, np.ndarray]:
    """Host copies of every parameter, keyed '/'-joined with the decoder's layers split out as ``layer_<i>/…``."""
    params = jax.device_get(params)
    if "decoder" in params:
        params = unstack_layers(params)
    out = {}
    for path, leaf in ckpt_lib.flatten(params).items():
        parts = list(path[1:] if path[0] == "decoder" else path)
        if parts[0].startswith("groups_"):
            group = params["decoder"][parts[0]]
            per_group = sum(1 for k in group if k.startswith("block_"))
            layer = int(parts[0].split("_")[1]) * per_group + int(parts[1].split("_")[1])
            parts = [f"layer_{layer}"] + parts[2:]
        out["/".join(parts)] = np.asarray(leaf)
    return out


def module_of(leaf_name: str) -> str:
    """``layer_3/attn/qkv/kernel`` -> ``layer_3/attn/qkv``; top-level leaves (``lm_head``) are their own module."""
    return leaf_name.rsplit("/", 1)[0] if "/" in leaf_name else leaf_name


def module_type(module: str) -> str:
    """``layer_3/attn/qkv`` -> ``attn/qkv``."""
    return _LAYER.sub("", module)


def layer_index(module: str) -> int | None:
    m = _LAYER.match(module + "/")
    return int(m.group(1)) if m else None


def num_layers(leaves: Mapping[str, np.ndarray]) -> int:
    return 1 + max((layer_index(module_of(k)) for k in leaves if layer_index(module_of(k)) is not None), default=-1)


def param_counts(leaves: Mapping[str, np.ndarray]) -> dict:
    """Counts per module type (summed over layers) and in all."""
    by_type: dict[str, int] = {}
    for name, x in leaves.items():
        t = module_type(module_of(name))
        by_type[t] = by_type.get(t, 0) + int(x.size)
    return {"total": int(sum(by_type.values())), "layers": num_layers(leaves), "by_module_type": by_type}


def _sq_by_module(leaves: Mapping[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, x in leaves.items():
        m = module_of(name)
        out[m] = out.get(m, 0.0) + float(np.sum(np.square(x.astype(np.float64))))
    return out


def module_norms(leaves: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Frobenius norm of each module's parameters (all its leaves: kernel and bias, or scale and bias)."""
    return {m: math.sqrt(s) for m, s in _sq_by_module(leaves).items()}


def difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict:
    """‖a − b‖ and ‖a − b‖ / ‖b‖ per module, over the leaves both hold with the same shape.

    Leaves held by only one side, or with different shapes, are listed, not compared. ``total`` covers every
    compared leaf.
    """
    common = sorted(k for k in a if k in b and a[k].shape == b[k].shape)
    if not common:
        raise ConfigError("the two checkpoints share no parameter of the same name and shape: nothing to compare "
                          f"(first has {sorted(a)[:4]}…, second {sorted(b)[:4]}…)")
    diff_sq = _sq_by_module({k: a[k].astype(np.float64) - b[k] for k in common})
    ref_sq = _sq_by_module({k: b[k] for k in common})
    per_module = {m: {"diff": math.sqrt(diff_sq[m]), "ref": math.sqrt(ref_sq[m]),
                      "relative": math.sqrt(diff_sq[m]) / max(math.sqrt(ref_sq[m]), 1e-30)} for m in diff_sq}
    total_diff, total_ref = math.sqrt(sum(diff_sq.values())), math.sqrt(sum(ref_sq.values()))
    return {"modules": per_module,
            "total": {"diff": total_diff, "ref": total_ref, "relative": total_diff / max(total_ref, 1e-30)},
            "only_in_first": sorted(k for k in a if k not in b), "only_in_second": sorted(k for k in b if k not in a),
            "shape_differs": sorted(k for k in a if k in b and a[k].shape != b[k].shape)}
