"""The GPT decoder family (GPT-1, GPT-2, GPT-3) in Flax Linen, with LM, reward and value heads.

Read top to bottom: config -> attention -> MLP -> block -> decoder -> heads.

Shape suffixes: B batch, T query length, S key/cache length, D d_model, N heads, H d_head,
F d_ff, V vocab, G scanned layer groups.

Every parameter carries logical axis names (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``,
``layers`` …); ``gptjax.sharding`` is the one place that maps them to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.attention import (CACHE_AXES, AttentionMasks, blocked_causal_attention, build_masks, cached_attention,
                              materialise_mask, reference_attention, resolve_attention_impl)
from gptjax.errors import ConfigError, dataclass_from_dict
from gptjax.matmuls import lm_logits, narrow_dot

Array = jax.Array

# Remat (activation checkpointing) policies, by config name. "save_dots" keeps every matmul output and
# recomputes only the cheap element-wise ops; "save_dots_no_batch" keeps weight matmuls but recomputes
# the attention score/value products (their outputs grow with T^2).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked")
# How the LM losses' gradient reaches the logits (gptjax.losses.token_stats): JAX's autodiff of the expressions,
# or a hand-written single-pass backward (gptjax.losses.target_logprob).
XENT_BACKWARDS = ("autodiff", "fused")
ATTENTION_KINDS = ("dense", "local")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape and numerics of one decoder. Presets live in ``gptjax.presets``."""

    vocab_size: int = 50257  # token ids are in [0, vocab_size)
    max_len: int = 1024  # context length: number of learned position embeddings
    num_layers: int = 12
    d_model: int = 768  # residual-stream width
    num_heads: int = 12
    # Width of one head. None means d_model // num_heads. Explicit so GPT-3 13B can be built as printed
    # (d_model 5140, 40 heads x 128: the attention width 5120 need not equal d_model).
    d_head: int | None = None
    d_ff: int | None = None  # MLP hidden width; None means 4 * d_model
    dropout_embed: float = 0.0  # on token+position embeddings
    dropout_resid: float = 0.0  # on each residual branch output (attention and MLP)
    dropout_attn: float = 0.0  # on attention probabilities (forces the XLA attention path)
    post_ln: bool = False  # GPT-1: LayerNorm after each residual add, no final LN. GPT-2/3: pre-LN + final LN
    ln_eps: float = 1e-5
    # Attention kind of each layer, repeated cyclically: ("dense",) everywhere, or ("dense", "local") for
    # GPT-3's alternating dense / locally banded pattern. num_layers must be a multiple of its length.
    attention_pattern: tuple[str, ...] = ("dense",)
    local_window: int = 256  # band width of "local" layers: a token sees itself and the previous window-1
    # auto: cuDNN flash on GPU when shapes/dtypes allow, "blocked" for causal training forwards on CPU (exact
    # softmax attention computed per block of queries over the keys up to the block's end), XLA otherwise.
    attention_impl: str = "auto"
    dtype: str = "float32"  # compute dtype of matmuls/activations; logits and losses are always float32
    # None: matmuls take compute-dtype operands. "bfloat16" in a float32 model: the projections and the LM head
    # cast their operands to bfloat16 and accumulate in float32 (matmuls.narrow_dot): ~15% faster training steps
    # on a CPU with bfloat16 matrix units; attention scores, activations and the optimizer stay float32.
    matmul_dtype: str | None = None
    param_dtype: str = "float32"  # storage dtype of parameters (and the optimizer's master copy)
    # None: weights are cast to the compute dtype where used (FSDP gathers param_dtype). A dtype, e.g. "bfloat16": cast
    # first, under their own sharding, so all-gathers and gradient reductions move it (half of float32's bytes).
    gather_dtype: str | None = None
    scan_layers: bool = True  # stack layers with nn.scan: compile time independent of depth
    remat: str = "none"  # one of REMAT_POLICIES
    # Backward of the cross-entropy over the vocabulary (one of XENT_BACKWARDS). "fused" never writes exp(logits)
    # or a one-hot buffer, at the cost of a second exp: meant for memory-bound GPUs/TPUs; on XLA:CPU, where exp is
    # compute-bound, 30-40% slower with a 16k vocabulary (README, Performance). Not yet timed on a GPU
    # (scripts/gpu_bench.sh runs the A/B).
    xent_backward: str = "autodiff"
    init_std: float = 0.02  # N(0, init_std) for weights; residual projections also / sqrt(2 * num_layers)
    tie_embeddings: bool = True  # LM head shares the token embedding matrix

    def __post_init__(self):
        if isinstance(self.attention_pattern, str):
            object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern.replace(" ", "").split(",")))
        else:
            object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
        positive = ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "local_window")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_head is None and self.d_model % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}: "
                f"the attention width is num_heads * d_head; set model.d_head explicitly "
                f"(e.g. d_head={self.d_model // self.num_heads}) or choose num_heads among "
                f"{[h for h in range(1, min(self.d_model, 128) + 1) if self.d_model % h == 0]}")
        for name, choices in (("remat", tuple(REMAT_POLICIES)), ("attention_impl", ATTENTION_IMPLS),
                              ("dtype", DTYPES), ("param_dtype", DTYPES), ("xent_backward", XENT_BACKWARDS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; valid choices: {list(choices)}")
        if self.matmul_dtype not in (None, "bfloat16"):
            raise ConfigError(f"model.matmul_dtype={self.matmul_dtype!r} is unknown; valid choices: [None, 'bfloat16']")
        if self.gather_dtype not in (None, *DTYPES):
            raise ConfigError(f"model.gather_dtype={self.gather_dtype!r} is unknown; valid choices: {[None, *DTYPES]}")
        bad = [k for k in self.attention_pattern if k not in ATTENTION_KINDS]
        if bad or not self.attention_pattern:
            raise ConfigError(f"model.attention_pattern={self.attention_pattern!r}: each entry must be one of "
                              f"{list(ATTENTION_KINDS)}")
        if self.num_layers % len(self.attention_pattern):
            raise ConfigError(f"model.num_layers={self.num_layers} must be a multiple of "
                              f"len(model.attention_pattern)={len(self.attention_pattern)}")
        for name in ("dropout_embed", "dropout_resid", "dropout_attn"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.num_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def attn_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_groups(self) -> int:
        """Number of scan steps: one step runs one cycle of ``attention_pattern``."""
        return self.num_layers // len(self.attention_pattern)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "GPTConfig":
        return dataclass_from_dict(cls, fields, "model")

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)


def _dtype(name: str):
    return jnp.dtype(name)


def matmul_operand_dtype(cfg: GPTConfig):
    """The dtype the model's matmul operands are cast to: ``matmul_dtype`` if set, else the compute dtype."""
    return _dtype(cfg.matmul_dtype or cfg.dtype)


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    # LayerNorm statistics in float32 whatever the compute dtype (as torch autocast does).
    return nn.LayerNorm(epsilon=cfg.ln_eps, dtype=jnp.float32, param_dtype=_dtype(cfg.param_dtype),
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_zeros(("norm",)), name=name)


def cast_for_use(w, axes: tuple[str | None, ...], dtype) -> Array:
    """``w`` in ``dtype`` (None: unchanged), cast under its own sharding (logical ``axes``), so that the all-gather
    that follows moves ``dtype`` (GPTConfig.gather_dtype)."""
    return w if dtype is None else nn.with_logical_constraint(w.astype(dtype), axes)


class Projection(nn.Module):
    """y = x · W + b contracting the trailing ``in_shape`` dims into ``out_shape`` dims.

    Used instead of nn.DenseGeneral because DenseGeneral initialises a flattened 2-D kernel and reshapes it,
    which applies our N-D logical sharding constraint to the 2-D array under an active mesh.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    init_std: float
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    dtype: Any
    param_dtype: Any
    gather_dtype: Any = None  # GPTConfig.gather_dtype
    matmul_dtype: Any = None  # GPTConfig.matmul_dtype

    @nn.compact
    def __call__(self, x):
        kernel = cast_for_use(self.param("kernel", _init(self.init_std, self.in_axes + self.out_axes),
                                         self.in_shape + self.out_shape, self.param_dtype),
                              self.in_axes + self.out_axes, self.gather_dtype)
        bias = cast_for_use(self.param("bias", _zeros(self.out_axes), self.out_shape, self.param_dtype),
                            self.out_axes, self.gather_dtype)
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        if self.matmul_dtype is not None:
            y = narrow_dot(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())), self.matmul_dtype)
        else:
            y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        return y + bias.astype(self.dtype)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig
    kind: str  # "dense" | "local"

    @nn.compact
    def __call__(self, x_BTD, masks: AttentionMasks, cache: dict | None, cache_index, deterministic: bool):
        cfg = self.cfg
        dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        N, H = cfg.num_heads, cfg.head_dim
        qkv_BT3NH = Projection((cfg.d_model,), (3, N, H), cfg.init_std, ("embed",), ("qkv", "heads", "kv"),
                               dtype, pdtype, cfg.gather_dtype, cfg.matmul_dtype, name="qkv")(x_BTD)
        q_BTNH, k_BTNH, v_BTNH = qkv_BT3NH[:, :, 0], qkv_BT3NH[:, :, 1], qkv_BT3NH[:, :, 2]
        new_cache = None
        local = self.kind == "local"
        mask = masks.local if local else masks.dense
        window = masks.kernel_window if local else None
        dropout_active = cfg.dropout_attn > 0 and not deterministic
        impl = resolve_attention_impl(cfg, dropout_active, decoding=cache is not None)
        if cache is not None:
            # Decode: write this step's keys/values into the preallocated (B, N, S, H) cache, attend over all of it.
            new_cache = {name: nn.with_logical_constraint(
                jax.lax.dynamic_update_slice(cache[name], x_BTNH.swapaxes(1, 2).astype(cache[name].dtype),
                                             (0, 0, cache_index, 0)), CACHE_AXES)
                for name, x_BTNH in (("k", k_BTNH), ("v", v_BTNH))}
            k_BNSH, v_BNSH = new_cache["k"].astype(dtype), new_cache["v"].astype(dtype)
            if impl != "cudnn":
                out_BTNH = cached_attention(q_BTNH, k_BNSH, v_BNSH, mask)
            else:
                out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BNSH.swapaxes(1, 2), v_BNSH.swapaxes(1, 2),
                                                        mask=mask, implementation=impl)
        elif impl == "blocked":
            out_BTNH = blocked_causal_attention(q_BTNH, k_BTNH, v_BTNH, mask, window)
        elif impl == "reference":
            full = materialise_mask(mask, masks.is_causal, window, q_BTNH.shape[1], k_BTNH.shape[1])
            out_BTNH = reference_attention(q_BTNH, k_BTNH, v_BTNH, full, nn.Dropout(cfg.dropout_attn),
                                           deterministic)
        else:
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BTNH, v_BTNH, mask=mask, is_causal=masks.is_causal,
                local_window_size=(window - 1, 0) if window else None, implementation=impl)
        out_BTD = Projection((N, H), (cfg.d_model,), cfg.init_std / math.sqrt(2 * cfg.num_layers), ("heads", "kv"),
                             ("embed",), dtype, pdtype, cfg.gather_dtype, cfg.matmul_dtype, name="out")(out_BTNH)
        out_BTD = nn.Dropout(cfg.dropout_resid)(out_BTD, deterministic=deterministic)
        return out_BTD, new_cache


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD, deterministic: bool):
        cfg = self.cfg
        dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        h_BTF = Projection((cfg.d_model,), (cfg.ff_dim,), cfg.init_std, ("embed",), ("mlp",), dtype, pdtype,
                           cfg.gather_dtype, cfg.matmul_dtype, name="fc")(x_BTD)
        h_BTF = nn.with_logical_constraint(jax.nn.gelu(h_BTF, approximate=True), ("batch", "length", "mlp"))
        out_BTD = Projection((cfg.ff_dim,), (cfg.d_model,), cfg.init_std / math.sqrt(2 * cfg.num_layers), ("mlp",),
                             ("embed",), dtype, pdtype, cfg.gather_dtype, cfg.matmul_dtype, name="proj")(h_BTF)
        return nn.Dropout(cfg.dropout_resid)(out_BTD, deterministic=deterministic)


class Block(nn.Module):
    cfg: GPTConfig
    kind: str

    @nn.compact
    def __call__(self, x_BTD, masks, cache, cache_index, deterministic: bool):
        cfg = self.cfg
        dtype = _dtype(cfg.dtype)
        attn = CausalSelfAttention(cfg, self.kind, name="attn")
        mlp = MLP(cfg, name="mlp")
        ln_1, ln_2 = _layer_norm(cfg, "ln_1"), _layer_norm(cfg, "ln_2")
        if cfg.post_ln:  # GPT-1
            a_BTD, new_cache = attn(x_BTD, masks, cache, cache_index, deterministic)
            x_BTD = ln_1(x_BTD + a_BTD).astype(dtype)
            x_BTD = ln_2(x_BTD + mlp(x_BTD, deterministic)).astype(dtype)
        else:  # GPT-2/3
            a_BTD, new_cache = attn(ln_1(x_BTD).astype(dtype), masks, cache, cache_index, deterministic)
            x_BTD = x_BTD + a_BTD
            x_BTD = x_BTD + mlp(ln_2(x_BTD).astype(dtype), deterministic)
        return nn.with_logical_constraint(x_BTD, ("batch", "length", "embed")), new_cache


class BlockGroup(nn.Module):
    """One cycle of ``attention_pattern`` (one block for all-dense models): the unit that is scanned."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD, cache, masks, cache_index, deterministic: bool):
        new_cache = {} if cache is not None else None
        for j, kind in enumerate(self.cfg.attention_pattern):
            x_BTD, c = Block(self.cfg, kind, name=f"block_{j}")(
                x_BTD, masks, None if cache is None else cache[f"block_{j}"], cache_index, deterministic)
            if cache is not None:
                new_cache[f"block_{j}"] = c
        return x_BTD, new_cache


class Decoder(nn.Module):
    """Token + learned position embeddings, the block stack and (pre-LN models) a final LayerNorm."""

    cfg: GPTConfig

    def setup(self):
        cfg = self.cfg
        pdtype = _dtype(cfg.param_dtype)
        self.wte = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pdtype, dtype=_dtype(cfg.dtype),
                            embedding_init=_init(cfg.init_std, ("vocab", "embed")), name="wte")
        self.wpe = nn.Embed(cfg.max_len, cfg.d_model, param_dtype=pdtype, dtype=_dtype(cfg.dtype),
                            embedding_init=_init(cfg.init_std, ("position", "embed")), name="wpe")
        self.ln_f = None if cfg.post_ln else _layer_norm(cfg, "ln_f")
        self.embed_dropout = nn.Dropout(cfg.dropout_embed)
        group_cls = BlockGroup
        if cfg.remat != "none":
            # prevent_cse is only needed outside scan (scan already stops XLA from CSE-ing the recompute).
            # static_argnums counts self: argument 5 is `deterministic`.
            group_cls = nn.remat(BlockGroup, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                                 static_argnums=(5,))
        if cfg.scan_layers:
            scanned = nn.scan(group_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_groups,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            self.groups = scanned(cfg, name="groups")
        else:
            self.groups = [group_cls(cfg, name=f"groups_{i}") for i in range(cfg.num_groups)]

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, cache=None, cache_index=None,
                 kv_valid_BS=None, deterministic: bool = True):
        """Hidden states (B, T, D) in the compute dtype, and the updated KV cache (None without one)."""
        cfg = self.cfg
        B, T = tokens_BT.shape
        if cache is None and T > cfg.max_len:
            raise ConfigError(f"sequence length {T} exceeds model.max_len={cfg.max_len} (the context); "
                              f"shorten the input or raise max_len")
        if positions_BT is None:
            offset = 0 if cache_index is None else cache_index
            positions_BT = jnp.broadcast_to(offset + jnp.arange(T), (B, T))
        wpe = cast_for_use(self.wpe.embedding, ("position", "embed"), cfg.gather_dtype)
        x_BTD = _lookup(self.embedding_matrix(), tokens_BT, "vocab") + _lookup(wpe, positions_BT, "position")
        x_BTD = self.embed_dropout(x_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD.astype(_dtype(cfg.dtype)), ("batch", "length", "embed"))
        masks = build_masks(cfg, T, segment_ids_BT, None if cache is None else (cache_index, kv_valid_BS))

        if cfg.scan_layers:
            x_BTD, new_cache = self.groups(x_BTD, cache, masks, cache_index, deterministic)
        else:
            new_cache = [] if cache is not None else None
            for i, group in enumerate(self.groups):
                x_BTD, c = group(x_BTD, None if cache is None else cache[i], masks, cache_index, deterministic)
                if cache is not None:
                    new_cache.append(c)
        if self.ln_f is not None:
            x_BTD = self.ln_f(x_BTD).astype(_dtype(cfg.dtype))
        return x_BTD, new_cache

    def embedding_matrix(self):
        return cast_for_use(self.wte.embedding, ("vocab", "embed"), self.cfg.gather_dtype)


def _lookup(table_VD, ids_BT, row_axis: str) -> Array:
    """Embedding lookup with the table's embed dimension gathered first (as FSDP gathers every weight before use).

    A gather from a table split over ``embed`` (fsdp) yields activations split over embed, which the partitioner
    cannot turn into the batch-split layout that follows without replicating them ("involuntary full
    rematerialization"); gathered over embed, the lookup's output can be split over batch directly.
    """
    table_VD = nn.with_logical_constraint(table_VD, (row_axis, None))
    return nn.with_logical_constraint(jnp.take(table_VD, ids_BT, axis=0), ("batch", "length", "embed"))


class GPT(nn.Module):
    """Language model: decoder + (tied) LM head. Returns float32 logits (B, T, V) and the new cache."""

    cfg: GPTConfig

    def setup(self):
        self.decoder = Decoder(self.cfg)
        if not self.cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", _init(self.cfg.init_std, ("vocab", "embed")),
                                      (self.cfg.vocab_size, self.cfg.d_model), _dtype(self.cfg.param_dtype))

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, cache=None, cache_index=None,
                 kv_valid_BS=None, deterministic: bool = True):
        hidden_BTD, new_cache = self.decoder(tokens_BT, positions_BT, segment_ids_BT, cache=cache,
                                             cache_index=cache_index, kv_valid_BS=kv_valid_BS,
                                             deterministic=deterministic)
        return self.logits(hidden_BTD), new_cache

    def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, deterministic: bool = True):
        """Final hidden states only (for losses that compute the vocabulary projection in chunks)."""
        return self.decoder(tokens_BT, positions_BT, segment_ids_BT, deterministic=deterministic)[0]

    def logits(self, hidden_BTD):
        embedding_VD = self.output_embedding()
        return nn.with_logical_constraint(lm_logits(hidden_BTD, embedding_VD, matmul_operand_dtype(self.cfg)),
                                          ("batch", "length", "vocab"))

    def output_embedding(self):
        return self.decoder.embedding_matrix() if self.cfg.tie_embeddings else \
            cast_for_use(self.lm_head, ("vocab", "embed"), self.cfg.gather_dtype)


def last_valid_index(valid_BT) -> Array:
    """Index of the last True in each row: the final (EOS) token under left or right padding."""
    T = valid_BT.shape[1]
    return (T - 1 - jnp.argmax(valid_BT[:, ::-1], axis=1)).astype(jnp.int32)


class ScoreModel(nn.Module):
    """Decoder + scalar head (Dense d_model -> 1): the reward model and the PPO value model.

    ``__call__`` returns per-token scores (B, T) in float32 (the value model uses them as-is);
    ``reward`` reads the score at each sequence's final valid token. Both heads have the same parameter
    tree ({"decoder", "score"}), so a value model is initialised from a reward model by copying.
    """

    cfg: GPTConfig
    zero_init_head: bool = False  # value heads may start at 0; reward heads start small and random

    def setup(self):
        head_init = (nn.initializers.zeros_init() if self.zero_init_head
                     else nn.initializers.normal(1.0 / math.sqrt(self.cfg.d_model + 1)))
        self.decoder = Decoder(self.cfg)
        self.score = nn.Dense(1, dtype=jnp.float32, param_dtype=_dtype(self.cfg.param_dtype), name="score",
                              kernel_init=nn.with_logical_partitioning(head_init, ("embed", "score")),
                              bias_init=_zeros(("score",)))

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, deterministic: bool = True):
        hidden_BTD, _ = self.decoder(tokens_BT, positions_BT, segment_ids_BT, deterministic=deterministic)
        return self.score(hidden_BTD.astype(jnp.float32))[..., 0]

    def reward(self, tokens_BT, valid_BT, positions_BT=None, segment_ids_BT=None, *, deterministic: bool = True):
        """Scalar score per sequence, read at its last valid (EOS) token. (B,)"""
        hidden_BTD, _ = self.decoder(tokens_BT, positions_BT, segment_ids_BT, deterministic=deterministic)
        idx_B = last_valid_index(valid_BT)
        final_BD = jnp.take_along_axis(hidden_BTD, idx_B[:, None, None], axis=1)[:, 0]
        return self.score(final_BD.astype(jnp.float32))[:, 0]


def init_cache(cfg: GPTConfig, batch: int, cache_len: int, dtype=None):
    """Zeroed KV cache with the layout the decoder expects (stacked over groups when scanned)."""
    if cache_len > cfg.max_len:
        raise ConfigError(f"cache length {cache_len} (prompt + new tokens) exceeds model.max_len={cfg.max_len}")
    dtype = _dtype(cfg.dtype) if dtype is None else dtype
    shape = (batch, cfg.num_heads, cache_len, cfg.head_dim)  # CACHE_AXES

    def group(prefix=()):
        return {f"block_{j}": {"k": jnp.zeros(prefix + shape, dtype), "v": jnp.zeros(prefix + shape, dtype)}
                for j in range(len(cfg.attention_pattern))}

    if cfg.scan_layers:
        return group((cfg.num_groups,))
    return [group() for _ in range(cfg.num_groups)]


def stack_layers(params: dict) -> dict:
    """Unscanned decoder params (groups_0 … groups_{G-1}) -> the scanned layout (groups, leading axis G)."""
    dec = dict(params["decoder"])
    keys = sorted((k for k in dec if k.startswith("groups_")), key=lambda k: int(k.split("_")[1]))
    if not keys:
        return params
    dec["groups"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[dec.pop(k) for k in keys])
    return {**params, "decoder": dec}


def unstack_layers(params: dict) -> dict:
    """Scanned decoder params -> one subtree per group (the unscanned layout)."""
    dec = dict(params["decoder"])
    if "groups" not in dec:
        return params
    stacked = dec.pop("groups")
    G = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(G):
        dec[f"groups_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "decoder": dec}


def abstract_params(module: nn.Module, cfg: GPTConfig, seq_len: int = 8):
    """Boxed (logically partitioned) parameter ShapeDtypeStructs, without allocating anything."""
    tokens = jax.ShapeDtypeStruct((1, min(seq_len, cfg.max_len)), jnp.int32)
    return jax.eval_shape(lambda t: module.init(jax.random.key(0), t), tokens)["params"]


def count_params(cfg: GPTConfig) -> dict[str, int]:
    """Parameter counts from the module's own shapes (jax.eval_shape: nothing is allocated).

    ``non_embedding`` excludes token and position embeddings (Kaplan et al.'s N).
    """
    params = nn.unbox(abstract_params(GPT(cfg), cfg))
    total = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))
    dec = params["decoder"]
    embedding = int(math.prod(dec["wte"]["embedding"].shape) + math.prod(dec["wpe"]["embedding"].shape))
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
