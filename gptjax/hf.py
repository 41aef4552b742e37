"""Hugging Face transformers GPT-2 interop: config and weights in, config and weights out.

A transformers ``GPT2LMHeadModel`` state dict maps one-to-one onto gptjax's GPT parameters (pre-LN, dense
attention, tanh GELU, learned positions). Only the layouts differ:

  transformers (Conv1D weights are (in, out))          gptjax
  h.{l}.attn.c_attn.weight  (D, 3·N·H)                 groups_{g}/block_{j}/attn/qkv/kernel  (D, 3, N, H)
  h.{l}.attn.c_attn.bias    (3·N·H,)                   .../attn/qkv/bias                     (3, N, H)
  h.{l}.attn.c_proj.weight  (N·H, D)                   .../attn/out/kernel                   (N, H, D)
  h.{l}.mlp.c_fc / c_proj   (D, F) / (F, D)            .../mlp/fc, mlp/proj kernels          same
  h.{l}.ln_1/ln_2.weight    (D,)                       .../ln_1, ln_2 scale                  same
  wte.weight, wpe.weight    (V, D), (T, D)             decoder/wte, decoder/wpe embedding    same
  ln_f.weight/bias                                     decoder/ln_f scale/bias
  lm_head.weight            (V, D), tied to wte        lm_head (only when embeddings are untied)

with l = g · len(attention_pattern) + j. The c_attn columns are [q | k | v], each head-major, which is exactly
a row-major reshape to (3, N, H). The scanned layout is the unscanned one stacked by ``model.stack_layers``.

Weights are read from safetensors or, for ``pytorch_model.bin``, with ``torch.load(weights_only=True)``:
nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import ConfigError
from gptjax.model import GPT, GPTConfig, abstract_params, stack_layers, unstack_layers

# Both names are the tanh approximation of GELU that GPT-2 was trained with (and gptjax computes).
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# Buffers older transformers versions saved with the weights (the causal mask); not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_PREFIX = "transformer."
GPT2_EOS_ID = 50256  # <|endoftext|> of the GPT-2 BPE vocabulary

Shape = tuple[int, ...]


def _same(shape: Shape) -> Shape:
    return tuple(shape)


def _merge_after_first(shape: Shape) -> Shape:  # (D, 3, N, H) -> (D, 3NH)
    return (shape[0], math.prod(shape[1:]))


def _merge_before_last(shape: Shape) -> Shape:  # (N, H, D) -> (NH, D)
    return (math.prod(shape[:-1]), shape[-1])


def _flatten(shape: Shape) -> Shape:  # (3, N, H) -> (3NH,)
    return (math.prod(shape),)


# (transformers key suffix inside a layer, gptjax path inside a block, gptjax shape -> transformers shape)
_LAYER_SPEC: tuple[tuple[str, tuple[str, ...], Callable[[Shape], Shape]], ...] = (
    ("ln_1.weight", ("ln_1", "scale"), _same),
    ("ln_1.bias", ("ln_1", "bias"), _same),
    ("attn.c_attn.weight", ("attn", "qkv", "kernel"), _merge_after_first),
    ("attn.c_attn.bias", ("attn", "qkv", "bias"), _flatten),
    ("attn.c_proj.weight", ("attn", "out", "kernel"), _merge_before_last),
    ("attn.c_proj.bias", ("attn", "out", "bias"), _same),
    ("ln_2.weight", ("ln_2", "scale"), _same),
    ("ln_2.bias", ("ln_2", "bias"), _same),
    ("mlp.c_fc.weight", ("mlp", "fc", "kernel"), _same),
    ("mlp.c_fc.bias", ("mlp", "fc", "bias"), _same),
    ("mlp.c_proj.weight", ("mlp", "proj", "kernel"), _same),
    ("mlp.c_proj.bias", ("mlp", "proj", "bias"), _same),
)
_GLOBAL_SPEC: tuple[tuple[str, tuple[str, ...], Callable[[Shape], Shape]], ...] = (
    ("wte.weight", ("decoder", "wte", "embedding"), _same),
    ("wpe.weight", ("decoder", "wpe", "embedding"), _same),
    ("ln_f.weight", ("decoder", "ln_f", "scale"), _same),
    ("ln_f.bias", ("decoder", "ln_f", "bias"), _same),
)


# ----------------------------------------------------------------------------------------------- config

def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> GPTConfig:
    """GPTConfig equivalent to a transformers GPT-2 config (a config.json dict or a ``GPT2Config``).

    Missing fields take ``GPT2Config``'s defaults, as transformers does. Dropout rates are copied as they are
    (GPT-2's are 0.1); ``overrides`` set any GPTConfig field afterwards (e.g. ``scan_layers=False``,
    ``dtype="bfloat16"``, dropouts).
    """
    d = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
    model_type = d.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ConfigError(f"HF config model_type={model_type!r}: only 'gpt2' checkpoints can be imported")
    activation = d.get("activation_function", "gelu_new")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"HF config activation_function={activation!r} is not supported: gptjax uses the tanh "
                          f"GELU; valid choices: {list(SUPPORTED_ACTIVATIONS)}")
    for field, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                             ("add_cross_attention", False)):
        if field in d and bool(d[field]) != supported:
            raise ConfigError(f"HF config {field}={d[field]!r} is not supported; gptjax needs {field}={supported}")
    n_embd, n_head = int(d.get("n_embd", 768)), int(d.get("n_head", 12))
    if n_embd % n_head:
        raise ConfigError(f"HF config n_head={n_head} does not divide n_embd={n_embd}; GPT-2 needs "
                          f"n_embd = n_head * head_dim")
    fields = dict(
        vocab_size=int(d.get("vocab_size", 50257)),
        max_len=int(d.get("n_positions", 1024)),
        num_layers=int(d.get("n_layer", 12)),
        d_model=n_embd,
        num_heads=n_head,
        d_ff=None if d.get("n_inner") is None else int(d["n_inner"]),
        dropout_embed=float(d.get("embd_pdrop", 0.1)),
        dropout_resid=float(d.get("resid_pdrop", 0.1)),
        dropout_attn=float(d.get("attn_pdrop", 0.1)),
        ln_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        init_std=float(d.get("initializer_range", 0.02)),
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        post_ln=False,
        attention_pattern=("dense",),
    )
    fields.update(overrides)
    return GPTConfig.from_dict(fields)


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The config.json dict of the transformers GPT2LMHeadModel equivalent to ``cfg``."""
    _check_gpt2_compatible(cfg)
    # GPT-2's <|endoftext|> is only meaningful when the vocabulary contains it (the GPT-2 BPE, maybe padded).
    eos = GPT2_EOS_ID if cfg.vocab_size > GPT2_EOS_ID else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": None if cfg.ff_dim == 4 * cfg.d_model else cfg.ff_dim,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout_resid,
        "embd_pdrop": cfg.dropout_embed,
        "attn_pdrop": cfg.dropout_attn,
        "layer_norm_epsilon": cfg.ln_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "dtype": cfg.param_dtype,
    }


def _check_gpt2_compatible(cfg: GPTConfig) -> None:
    if cfg.post_ln:
        raise ConfigError("model.post_ln=True (GPT-1 layout) has no transformers GPT-2 equivalent; use post_ln=False")
    if any(kind != "dense" for kind in cfg.attention_pattern):
        raise ConfigError(f"model.attention_pattern={cfg.attention_pattern!r}: transformers GPT-2 has dense "
                          f"attention only; use attention_pattern=('dense',)")
    if cfg.attn_width != cfg.d_model:
        raise ConfigError(f"model.num_heads * model.d_head = {cfg.attn_width} != model.d_model={cfg.d_model}: "
                          f"transformers GPT-2 needs the attention width to equal d_model")


# ----------------------------------------------------------------------------------------------- weights

def _key_map(cfg: GPTConfig) -> list[tuple[str, tuple[str, ...], Callable[[Shape], Shape]]]:
    """(transformers key without the ``transformer.`` prefix, unscanned gptjax path, shape map) per param."""
    period = len(cfg.attention_pattern)
    rows = list(_GLOBAL_SPEC[:2])  # transformers' order: embeddings, layers, final LayerNorm
    for layer in range(cfg.num_layers):
        block = ("decoder", f"groups_{layer // period}", f"block_{layer % period}")
        rows += [(f"h.{layer}.{suffix}", block + path, shape_map) for suffix, path, shape_map in _LAYER_SPEC]
    return rows + list(_GLOBAL_SPEC[2:])


def _expected_unscanned(cfg: GPTConfig):
    """ShapeDtypeStructs of GPT(cfg)'s unboxed params in the unscanned layout (nothing allocated)."""
    expected = nn.unbox(abstract_params(GPT(cfg), cfg))
    return jax.eval_shape(unstack_layers, expected) if cfg.scan_layers else expected


def _get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _to_numpy(value) -> np.ndarray:
    """numpy view of an array-like; torch tensors (bf16 included) without importing torch here."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bf16: reinterpret the bits
            import torch
            return value.view(torch.int16).numpy().view(jnp.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _raise_problems(what: str, problems: list[str], hints: list[str] = ()) -> None:
    if not problems:
        return
    shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    raise ValueError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(shown)
                     + "".join(f"\nhint: {h}" for h in hints))


def params_from_hf(state_dict: Mapping[str, Any], cfg: GPTConfig) -> dict:
    """gptjax GPT(cfg) params (unboxed jax arrays in cfg.param_dtype) from a transformers GPT-2 state dict.

    Keys may carry the ``transformer.`` prefix (GPT2LMHeadModel) or not (GPT2Model); the causal-mask buffers
    old checkpoints contain are skipped. With tied embeddings ``lm_head.weight`` may be present and must
    equal ``wte.weight``. Missing, unexpected and wrongly shaped keys are all reported in one ValueError.
    The result is in the scanned layout when ``cfg.scan_layers``.
    """
    _check_gpt2_compatible(cfg)
    remaining: dict[str, tuple[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        short = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if short.endswith(_IGNORED_SUFFIXES):
            continue
        if short in remaining:
            raise ValueError(f"state dict holds both {remaining[short][0]!r} and {key!r} for the same parameter")
        remaining[short] = (key, value)

    expected = _expected_unscanned(cfg)
    rows = _key_map(cfg)
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ("lm_head",), _same))
    problems, tree, raw = [], {}, {}
    for short, path, to_hf_shape in rows:
        if short not in remaining:
            problems.append(f"missing key {short!r} (gptjax {'/'.join(path)})")
            continue
        key, value = remaining.pop(short)
        array = raw[short] = _to_numpy(value)
        want = _get(expected, path)
        want_hf = to_hf_shape(want.shape)
        if array.shape != want_hf:
            problems.append(f"{key!r} has shape {array.shape}, expected {want_hf} "
                            f"(gptjax {'/'.join(path)} {tuple(want.shape)})")
            continue
        _set(tree, path, array.reshape(want.shape).astype(want.dtype))
    if cfg.tie_embeddings and "lm_head.weight" in remaining:
        key, value = remaining.pop("lm_head.weight")
        wte = raw.get("wte.weight")
        if wte is not None and not np.array_equal(_to_numpy(value), wte):
            problems.append(f"{key!r} differs from wte.weight but the config ties embeddings "
                            f"(set tie_embeddings=False / tie_word_embeddings=false)")
    problems += [f"unexpected key {key!r}" for key, _ in remaining.values()]
    hints = []
    layers_found = {int(m.group(1)) for short in (*remaining, *raw) if (m := re.match(r"h\.(\d+)\.", short))}
    if layers_found and max(layers_found) + 1 != cfg.num_layers:
        hints.append(f"the state dict has {max(layers_found) + 1} layers, model.num_layers={cfg.num_layers}")
    _raise_problems("transformers GPT-2 state dict does not fit the gptjax config", problems, hints)

    params = jax.tree.map(jnp.asarray, tree)
    return stack_layers(params) if cfg.scan_layers else params


def params_to_hf(params: Mapping[str, Any], cfg: GPTConfig) -> dict[str, np.ndarray]:
    """transformers GPT2LMHeadModel state dict (numpy, the params' dtype) from gptjax GPT(cfg) params.

    Exact inverse of ``params_from_hf``; scanned or unscanned (boxed or not) params are accepted. The keys
    are those of ``GPT2LMHeadModel.state_dict()``, ``lm_head.weight`` included (equal to wte when tied).
    """
    _check_gpt2_compatible(cfg)
    params = nn.unbox(dict(params))
    if "decoder" not in params:
        raise ValueError(f"expected GPT params with a 'decoder' subtree, got top-level keys {sorted(params)}")
    params = unstack_layers(params)
    expected = _expected_unscanned(cfg)
    rows = _key_map(cfg)
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ("lm_head",), _same))
    problems, state_dict = [], {}
    for short, path, to_hf_shape in rows:
        try:
            array = np.asarray(_get(params, path))
        except (KeyError, TypeError, IndexError):
            problems.append(f"missing gptjax param {'/'.join(path)}")
            continue
        want = _get(expected, path)
        if array.shape != tuple(want.shape):
            problems.append(f"gptjax param {'/'.join(path)} has shape {array.shape}, expected {tuple(want.shape)}")
            continue
        key = short if short == "lm_head.weight" else _PREFIX + short
        state_dict[key] = array.reshape(to_hf_shape(array.shape))
    _raise_problems("gptjax params do not fit the config", problems)
    if cfg.tie_embeddings:
        state_dict["lm_head.weight"] = state_dict[_PREFIX + "wte.weight"]
    return state_dict


# ----------------------------------------------------------------------------------------------- files

def _read_state_dict(directory: Path) -> dict[str, np.ndarray]:
    import safetensors.numpy

    single, index, torch_bin = (directory / "model.safetensors", directory / "model.safetensors.index.json",
                                directory / "pytorch_model.bin")
    if single.exists():
        return safetensors.numpy.load_file(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(safetensors.numpy.load_file(directory / shard))
        return state_dict
    if torch_bin.exists():
        import torch  # only needed for this legacy format

        try:
            loaded = torch.load(torch_bin, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{torch_bin}: refused to load: it is not a plain tensor state dict "
                             f"(torch.load weights_only=True failed; gptjax never unpickles objects): {e}") from e
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{torch_bin}: expected a state dict (name -> tensor), got {type(loaded).__name__}")
        return {key: _to_numpy(value) for key, value in loaded.items()}
    present = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(f"{directory}: no weights found; expected model.safetensors, "
                            f"model.safetensors.index.json or pytorch_model.bin; the directory holds {present}")


def load_hf_checkpoint(path: str | os.PathLike, **overrides) -> tuple[GPTConfig, dict]:
    """(cfg, params) from a transformers GPT-2 directory (config.json + safetensors or pytorch_model.bin).

    ``overrides`` set GPTConfig fields (e.g. ``scan_layers=False``, ``dropout_resid=0.0``).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory; expected a transformers checkpoint directory "
                                f"with config.json and model.safetensors (or pytorch_model.bin)")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing; a transformers checkpoint directory holds config.json")
    cfg = config_from_hf(json.loads(config_file.read_text()), **overrides)
    return cfg, params_from_hf(_read_state_dict(directory), cfg)


def _atomic_write(target: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def save_hf_checkpoint(params: Mapping[str, Any], cfg: GPTConfig, path: str | os.PathLike) -> None:
    """Write config.json + model.safetensors that ``GPT2LMHeadModel.from_pretrained(path)`` loads.

    As transformers' own ``save_pretrained``, a tied ``lm_head.weight`` is not stored.
    """
    import safetensors.numpy

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = params_to_hf(params, cfg)
    if cfg.tie_embeddings:
        del state_dict["lm_head.weight"]
    tensors = {key: np.ascontiguousarray(value) for key, value in state_dict.items()}
    config_text = json.dumps(config_to_hf(cfg), indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / "model.safetensors",
                  lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(config_text))
