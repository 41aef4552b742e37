"""Batched KV-cache sampling: the rollout engine for PPO, chat and sample generations at eval.

One jitted program per (batch, prompt length, config): prompts are left-padded to a common length P, the
whole prompt is prefilled into a preallocated cache in one forward, then a ``lax.while_loop`` decodes one
token per step and exits as soon as every row has emitted EOS (or after ``max_new_tokens``).

Left padding keeps every row's next token in the same cache slot (one ``cache_index`` for the batch);
positions count each row's real tokens, so a padded prompt is computed exactly as if it ran alone.

Shape suffixes: B batch, P prompt length, N new tokens, S cache length, V vocab, K candidate tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import ConfigError
from gptjax.attention import CACHE_LENGTH_AXIS
from gptjax.model import GPT, init_cache, unstack_layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to decode. Static under jit: each distinct config compiles its own program."""

    max_new_tokens: int = 64  # tokens generated per row (fewer if every row stops at EOS first)
    temperature: float = 1.0  # 0 = greedy (argmax); otherwise logits are divided by it before sampling
    top_k: int = 0  # keep only the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus: keep the smallest set whose probability sums to >= top_p (1.0 = off)
    eos_id: int | None = None  # a row stops after emitting it; None = never stop early
    pad_id: int = 0  # emitted in place of tokens after a row's EOS
    cache_dtype: str | None = None  # KV-cache storage dtype; None = the model's compute dtype
    return_logits: bool = False  # also return the fp32 logits of every step (B, N, V): tests/analysis only
    # Ids >= this are never sampled: the model's vocabulary is padded (to a multiple of 128) beyond the
    # tokenizer's, and those rows of the embedding are never trained. None = every id of the model.
    vocab_size: int | None = None
    # Decode a scanned model (GPTConfig.scan_layers) with its layers unrolled; the stacked parameters are sliced
    # once per call, outside the token loop. Under nn.scan the per-layer caches are the scan's input and output,
    # so XLA writes a fresh copy of the whole KV cache for every decoded token; unrolled, each layer's cache is
    # a loop-carried buffer that dynamic_update_slice updates in place. False keeps the scan (a smaller
    # program to compile for very deep models). Unscanned models are unaffected.
    unroll_layers: bool = True
    # Decode in this many loops, each attending over only the cache prefix it can have filled (the prompt plus the
    # tokens up to the loop's last step) instead of all P + max_new_tokens slots every step: decode attention
    # reads the whole cache it is given, so for long responses (PPO's 256 tokens) this cuts its memory traffic by
    # up to half. Each loop is its own copy of the decode step in the program (compile time grows with it).
    decode_segments: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1] (1.0 = off), got {self.top_p}")
        if self.decode_segments < 1:
            raise ConfigError(f"sampling.decode_segments must be >= 1 (1 = one loop over the whole cache), got "
                              f"{self.decode_segments}")
        if self.cache_dtype is not None and self.cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"sampling.cache_dtype={self.cache_dtype!r} is unknown; valid choices: "
                              f"[None, 'float32', 'bfloat16', 'float16']")


@flax.struct.dataclass
class SampleOutput:
    """What one call of the sampler returns (a pytree; every array has batch first).

    ``logprobs_BN`` is log softmax(raw logits / temperature) at the emitted token (raw logits for greedy):
    the log-probability under the tempered model distribution *before* top-k/top-p truncation. At
    temperature 1 this is the policy's own log-prob, which PPO needs. Entries where ``mask_BN`` is False are 0.
    """

    tokens_BN: Array  # int32 new tokens; pad_id after a row's EOS
    logprobs_BN: Array  # float32, see above
    mask_BN: Array  # bool: True for generated tokens up to and including EOS (the done mask)
    lengths_B: Array  # int32 number of generated tokens (EOS included) = mask_BN.sum(1)
    finished_B: Array  # bool: the row emitted EOS (False: it ran out of max_new_tokens)
    logits_BNV: Array | None = None  # fp32 per-step logits when SamplingConfig.return_logits, else None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Host-side: token lists -> (tokens_BP int32, valid_BP bool), left-padded to ``length`` (default: longest)."""
    if not prompts:
        raise ConfigError("left_pad: got no prompts; pass a non-empty list of token-id lists")
    lens = [len(p) for p in prompts]
    for i, n in enumerate(lens):
        if n == 0:
            raise ConfigError(f"left_pad: prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
    P = max(lens) if length is None else length
    if max(lens) > P:
        raise ConfigError(f"left_pad: prompt {lens.index(max(lens))} has {max(lens)} tokens > length={P}; "
                          f"raise length or truncate the prompt")
    tokens_BP = np.full((len(prompts), P), pad_id, np.int32)
    valid_BP = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        tokens_BP[i, P - len(p):] = p
        valid_BP[i, P - len(p):] = True
    return tokens_BP, valid_BP


def _categorical(key: Array, logits_BV: Array) -> Array:
    """``jax.random.categorical(key, logits_BV)``, the same draws: the first maximum of logits + Gumbel noise.

    Found as the maximum, then the lowest index holding it: XLA:CPU fuses categorical's Gumbel noise into argmax's
    (value, index) reduction, which does not vectorise, and that took ~4 ms per decode step at 128 x 2048 (a
    quarter of the step) against ~2 ms this way (most of it the noise itself)."""
    noisy_BV = logits_BV + jax.random.gumbel(key, logits_BV.shape, logits_BV.dtype)
    vocab_ids_BV = jax.lax.broadcasted_iota(jnp.int32, noisy_BV.shape, noisy_BV.ndim - 1)
    best_B1 = jnp.max(noisy_BV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(noisy_BV == best_B1, vocab_ids_BV, noisy_BV.shape[-1]), axis=-1)


def _choose(logits_BV: Array, key: Array | None, cfg: SamplingConfig) -> tuple[Array, Array]:
    """One token per row and its log-prob (see SampleOutput); all filtering in fp32."""
    logits_BV = logits_BV.astype(jnp.float32)
    if cfg.vocab_size is not None:
        logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < cfg.vocab_size, logits_BV, -jnp.inf)
    if cfg.temperature == 0:
        token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    else:
        scaled_BV = logits_BV / cfg.temperature
        logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
        if cfg.top_k or cfg.top_p < 1.0:
            # Candidates sorted by probability (all of V when only top-p is on), truncated, then sampled;
            # sampling among the k candidates directly means a tie at the k-th value never admits a k+1-th.
            k = cfg.top_k or scaled_BV.shape[-1]
            cand_BK, ids_BK = jax.lax.top_k(scaled_BV, k)
            if cfg.top_p < 1.0:
                probs_BK = jax.nn.softmax(cand_BK, axis=-1)
                mass_before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK  # exactly 0 for the top token
                cand_BK = jnp.where(mass_before_BK < cfg.top_p, cand_BK, -jnp.inf)
            pick_B = _categorical(key, cand_BK)
            token_B = jnp.take_along_axis(ids_BK, pick_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
        else:
            token_B = _categorical(key, scaled_BV).astype(jnp.int32)
    return token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]


def _last_logits(module: GPT, tokens_BT, positions_BT, cache, cache_index, kv_valid_BS):
    """Forward through the cache, projecting only the last position to the vocabulary (prefill needs no more)."""
    hidden_BTD, cache = module.decoder(tokens_BT, positions_BT, None, cache=cache, cache_index=cache_index,
                                       kv_valid_BS=kv_valid_BS, deterministic=True)
    return module.logits(hidden_BTD[:, -1:])[:, 0], cache


def sample(model: GPT, params, prompt_BP: Array, prompt_valid_BP: Array, rng: Array | None,
           cfg: SamplingConfig) -> SampleOutput:
    """Generate up to ``cfg.max_new_tokens`` tokens after each left-padded prompt. Pure; jit via make_sampler.

    ``params`` are the unboxed GPT parameters; ``prompt_valid_BP`` marks real tokens (each row needs >= 1);
    ``rng`` is a PRNG key (may be None when greedy). P + max_new_tokens must fit in the context ``max_len``
    so that the whole rollout can be scored by one full forward; the cache needs only P + max_new_tokens - 1
    slots (the last token is never fed back).
    """
    mcfg = model.cfg
    B, P = prompt_BP.shape
    N = cfg.max_new_tokens
    if P + N > mcfg.max_len:
        raise ConfigError(f"prompt length {P} + sampling.max_new_tokens={N} = {P + N} exceeds the model "
                          f"context model.max_len={mcfg.max_len}; shorten the prompts or lower max_new_tokens")
    if rng is None and cfg.temperature > 0:
        raise ConfigError(f"sampling.temperature={cfg.temperature} samples at random: pass a PRNG key as rng")
    if cfg.top_k > mcfg.vocab_size:
        raise ConfigError(f"sampling.top_k={cfg.top_k} exceeds model.vocab_size={mcfg.vocab_size}")
    if cfg.unroll_layers and mcfg.scan_layers:
        mcfg = dataclasses.replace(mcfg, scan_layers=False)
        model, params = model.clone(cfg=mcfg), unstack_layers(params)
    apply = functools.partial(model.apply, {"params": params}, method=_last_logits)

    valid_BP = prompt_valid_BP.astype(bool)
    positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1, dtype=jnp.int32) - 1, 0)
    num_real_B = valid_BP.sum(axis=1, dtype=jnp.int32)
    # Slots after the prompt hold generated tokens; the causal mask already hides those not yet written,
    # so they can be marked valid up front and the mask never changes inside the loop.
    kv_valid_BS = jnp.concatenate([valid_BP, jnp.ones((B, N - 1), bool)], axis=1)
    cache = init_cache(mcfg, B, P + N - 1, None if cfg.cache_dtype is None else jnp.dtype(cfg.cache_dtype))
    logits_BV, cache = apply(prompt_BP.astype(jnp.int32), positions_BP, cache, 0, kv_valid_BS)

    eos = -1 if cfg.eos_id is None else cfg.eos_id  # -1 never matches a token id

    def emit(i, logits_BV, done_B, out):
        """Sample token i for rows still running; rows already done emit pad_id."""
        key = None if cfg.temperature == 0 else jax.random.fold_in(rng, i)
        token_B, logp_B = _choose(logits_BV, key, cfg)
        token_B = jnp.where(done_B, cfg.pad_id, token_B)
        running_B = ~done_B
        out = {
            "tokens": out["tokens"].at[:, i].set(token_B),
            "logprobs": out["logprobs"].at[:, i].set(jnp.where(running_B, logp_B, 0.0)),
            "mask": out["mask"].at[:, i].set(running_B),
            "logits": None if out["logits"] is None else out["logits"].at[:, i].set(logits_BV),
        }
        return done_B | (token_B == eos), out

    out = {"tokens": jnp.full((B, N), cfg.pad_id, jnp.int32), "logprobs": jnp.zeros((B, N), jnp.float32),
           "mask": jnp.zeros((B, N), bool),
           "logits": jnp.zeros((B, N, logits_BV.shape[-1]), jnp.float32) if cfg.return_logits else None}
    done_B, out = emit(0, logits_BV, jnp.zeros((B,), bool), out)

    i = jnp.int32(1)
    for end in _segment_ends(N, cfg.decode_segments):
        # Steps [i, end) feed tokens into slots up to P + end - 2: attend over that prefix of the cache only.
        length = P + end - 1
        prefix = jax.tree.map(lambda c: jax.lax.slice_in_dim(c, 0, length, axis=c.ndim + CACHE_LENGTH_AXIS), cache)
        i, prefix, done_B, out = _decode_loop(apply, emit, i, end, prefix, done_B, out, P, num_real_B,
                                              kv_valid_BS[:, :length])
        cache = jax.tree.map(
            lambda c, p: jax.lax.dynamic_update_slice_in_dim(c, p, 0, axis=c.ndim + CACHE_LENGTH_AXIS), cache, prefix)
    finished_B = jnp.any(out["mask"] & (out["tokens"] == eos), axis=1)
    return SampleOutput(tokens_BN=out["tokens"], logprobs_BN=out["logprobs"], mask_BN=out["mask"],
                        lengths_B=out["mask"].sum(axis=1, dtype=jnp.int32), finished_B=finished_B,
                        logits_BNV=out["logits"])


def _segment_ends(N: int, segments: int) -> list[int]:
    """End step (exclusive) of each decode loop: steps 1 .. N-1 split into ``segments`` near-equal runs."""
    steps = N - 1
    segments = max(1, min(segments, steps))
    return [1 + (steps * (k + 1)) // segments for k in range(segments)] if steps else []


def _decode_loop(apply, emit, i, end, cache, done_B, out, P, num_real_B, kv_valid_BS):
    """Decode steps i .. end-1 (fewer if every row is done) with a while loop over a cache of any length."""

    def cond(state):
        i, _, done_B, _ = state
        return (i < end) & ~jnp.all(done_B)

    def body(state):
        i, cache, done_B, out = state
        # Feed token i-1 (cache slot P+i-1, position num_real+i-1) to get the logits of token i.
        prev_B1 = jax.lax.dynamic_slice_in_dim(out["tokens"], i - 1, 1, axis=1)
        logits_BV, cache = apply(prev_B1, (num_real_B + i - 1)[:, None], cache, P + i - 1, kv_valid_BS)
        done_B, out = emit(i, logits_BV, done_B, out)
        return i + 1, cache, done_B, out

    return jax.lax.while_loop(cond, body, (i, cache, done_B, out))


def make_sampler(model: GPT, cfg: SamplingConfig):
    """``sampler(params, prompt_BP, prompt_valid_BP, rng) -> SampleOutput``, jitted with the config static.

    The cache is allocated inside the program, so XLA updates it in place across the loop; nothing needs
    donating. On a mesh, pass sharded params and batch-sharded prompts; the model annotates the cache with
    logical axes (attention.CACHE_AXES) so it follows the batch/head sharding.
    """
    return jax.jit(functools.partial(sample, model, cfg=cfg))


def prompt_and_response(prompt_BP: Array, prompt_valid_BP: Array, out: SampleOutput):
    """The rollout as one sequence per row, for scoring with a full forward (reward, value, PPO log-probs).

    Returns (tokens_BT, valid_BT, positions_BT), T = P + N: left padding, prompt, response, right padding.
    Pass ``valid_BT.astype(int32)`` as segment ids so padding is never attended to; the last valid token is
    the EOS of finished rows.
    """
    tokens_BT = jnp.concatenate([prompt_BP, out.tokens_BN], axis=1).astype(jnp.int32)
    valid_BT = jnp.concatenate([prompt_valid_BP.astype(bool), out.mask_BN], axis=1)
    positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1, dtype=jnp.int32) - 1, 0)
    return tokens_BT, valid_BT, positions_BT
