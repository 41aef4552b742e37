"""Per-token statistics of a softmax over the vocabulary: log-prob of the target, log-normaliser, argmax hit, entropy.

Two implementations that agree to float32 round-off (tests/test_losses.py):

* ``token_stats(logits_BTV, ...)`` — from materialised logits (what ``GPT.__call__`` returns).
* ``chunked_token_stats(hidden_BTD, embedding_VD, ...)`` — computes the vocabulary projection C positions at a
  time inside ``jax.checkpoint``, so neither the forward nor the backward ever holds the full float32 (B, T, V)
  logits: the backward recomputes one chunk's logits at a time. For GPT-2's 50k vocabulary at B=16, T=1024 that
  is 3.3 GB of logits (plus as much again for their gradient) that never exist.

``cross_entropy``/``chunked_cross_entropy`` are the negative log-likelihood views of the same two functions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.matmuls import lm_logits
from gptjax.model import XENT_BACKWARDS

Array = jax.Array


class TokenStats(NamedTuple):
    """Per-position statistics, all float32 (B, T) except ``correct_BT`` (bool)."""

    logprob_BT: Array  # log softmax(logits / temperature)[target]
    logsumexp_BT: Array  # log-normaliser of logits / temperature (for the z-loss)
    correct_BT: Array  # argmax(logits) == target
    entropy_BT: Array | None  # entropy of softmax(logits / temperature); None unless asked for


def token_stats(logits_BTV, targets_BT, *, temperature: float = 1.0, with_entropy: bool = False,
                backward: str = "autodiff") -> TokenStats:
    """Statistics of the next-token distributions given materialised logits (any float dtype; math in fp32).

    ``backward``: how gradients reach the logits — "autodiff" (JAX differentiates the expressions) or "fused"
    (``target_logprob``'s hand-written backward). Same values and gradients to float32 round-off."""
    if backward == "fused":
        logprob_BT, lse_BT = target_logprob(logits_BTV, targets_BT, float(temperature))
    elif backward == "autodiff":
        logprob_BT, lse_BT = _target_logprob_fwd(logits_BTV, targets_BT, temperature)[0]
    else:
        raise ValueError(f"token_stats: backward={backward!r} is unknown; valid choices: {list(XENT_BACKWARDS)}")
    correct_BT = argmax_hit(logits_BTV, targets_BT)
    entropy_BT = None
    if with_entropy:
        # -Σ p log p from log p = z - lse: no cancellation between two large terms when one token dominates.
        logp_BTV = logits_BTV.astype(jnp.float32) / temperature - lse_BT[..., None]
        entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
    return TokenStats(logprob_BT, lse_BT, correct_BT, entropy_BT)


def argmax_hit(logits_BTV, targets_BT) -> Array:
    """``argmax(logits, -1) == targets`` (ties go to the lowest index, as argmax's), bool (B, T).

    Written as the target's logit equal to the maximum with no lower index reaching it: XLA:CPU lowers argmax to
    a variadic (value, index) reduce that does not vectorise, ~14 ms over a 4096 x 2048 float32 block (4% of the
    demo's pretraining step) against ~3 ms for these two plain reductions."""
    max_BT = jnp.max(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    vocab_ids_BTV = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, logits_BTV.ndim - 1)
    earlier_max_BT = jnp.any((logits_BTV == max_BT[..., None]) & (vocab_ids_BTV < targets_BT[..., None]), axis=-1)
    return (target_BT == max_BT) & ~earlier_max_BT


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def target_logprob(logits_BTV, targets_BT, temperature: float):
    """(log softmax(logits / temperature)[target], logsumexp(logits / temperature)), both float32 (B, T).

    The same values as the plain expression, with a hand-written backward: autodiff saved exp(z − max) as a
    second (B, T, V) float32 buffer and built the target's one-hot by a scatter-add into a zeroed third (the
    largest element-wise passes of a small model's step, e.g. GPT-2 124M at B 48 — README, Performance). Here
    the backward keeps only the logits and the (B, T) normaliser, and forms
    d logits = ((g_lse − g_logprob)·softmax + g_logprob·onehot) / temperature in one element-wise pass, in the
    logits' dtype, the one-hot an iota comparison that never exists in memory. The price is a second exp over
    the logits: free where the passes are memory-bound (GPUs, TPUs), not on a CPU, where exp is compute-bound.
    """
    return _target_logprob_fwd(logits_BTV, targets_BT, temperature)[0]


def _target_logprob_fwd(logits_BTV, targets_BT, temperature):
    scaled_BTV = logits_BTV.astype(jnp.float32) / temperature  # exact when temperature is 1
    lse_BT = jax.nn.logsumexp(scaled_BTV, axis=-1)
    target_BT = jnp.take_along_axis(scaled_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (target_BT - lse_BT, lse_BT), (logits_BTV, targets_BT, lse_BT)


def _target_logprob_bwd(temperature, residuals, cotangents):
    logits_BTV, targets_BT, lse_BT = residuals
    g_logprob_BT, g_lse_BT = (g.astype(jnp.float32) for g in cotangents)
    probs_BTV = jnp.exp(logits_BTV.astype(jnp.float32) / temperature - lse_BT[..., None])
    vocab_ids_BTV = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, logits_BTV.ndim - 1)
    onehot_BTV = vocab_ids_BTV == targets_BT[..., None].astype(jnp.int32)
    dscaled_BTV = (g_lse_BT - g_logprob_BT)[..., None] * probs_BTV + jnp.where(onehot_BTV, g_logprob_BT[..., None], 0.0)
    return (dscaled_BTV / temperature).astype(logits_BTV.dtype), None


target_logprob.defvjp(_target_logprob_fwd, _target_logprob_bwd)


def chunked_token_stats(hidden_BTD, embedding_VD, targets_BT, *, chunk: int, dtype=None,
                        temperature: float = 1.0, with_entropy: bool = False,
                        backward: str = "autodiff") -> TokenStats:
    """``token_stats(lm_logits(hidden, embedding), targets)`` without materialising the (B, T, V) logits.

    ``chunk`` positions are projected at a time (T need not be a multiple; the remainder is one more chunk).
    Each chunk's projection + statistics runs under ``jax.checkpoint``, so only (B, chunk, V) logits are ever
    live, in the backward as well as the forward. ``dtype`` is the matmul operand dtype
    (``model.matmul_operand_dtype(cfg)``; default: the hidden states' dtype); logits are accumulated in float32 as
    ``GPT.logits`` does.
    """
    if chunk <= 0:
        raise ValueError(f"chunked_token_stats: chunk must be a positive number of positions, got {chunk}")
    dtype = hidden_BTD.dtype if dtype is None else dtype
    B, T, D = hidden_BTD.shape

    @jax.checkpoint
    def stats_of_chunk(h_BCD, targets_BC):
        logits_BCV = nn.with_logical_constraint(lm_logits(h_BCD, embedding_VD, dtype), ("batch", "length", "vocab"))
        s = token_stats(logits_BCV, targets_BC, temperature=temperature, with_entropy=with_entropy,
                        backward=backward)
        entropy_BC = s.entropy_BT if with_entropy else jnp.zeros_like(s.logprob_BT)
        return s.logprob_BT, s.logsumexp_BT, s.correct_BT, entropy_BC

    n_full, rest = divmod(T, chunk)
    pieces = []
    if n_full:
        h_NBCD = hidden_BTD[:, :n_full * chunk].reshape(B, n_full, chunk, D).swapaxes(0, 1)
        t_NBC = targets_BT[:, :n_full * chunk].reshape(B, n_full, chunk).swapaxes(0, 1)
        _, out_N = jax.lax.scan(lambda carry, xs: (carry, stats_of_chunk(*xs)), None, (h_NBCD, t_NBC))
        pieces.append(tuple(x.swapaxes(0, 1).reshape(B, n_full * chunk) for x in out_N))
    if rest:
        pieces.append(stats_of_chunk(hidden_BTD[:, n_full * chunk:], targets_BT[:, n_full * chunk:]))
    logprob_BT, lse_BT, correct_BT, entropy_BT = (jnp.concatenate(xs, axis=1) for xs in zip(*pieces))
    return TokenStats(logprob_BT, lse_BT, correct_BT, entropy_BT if with_entropy else None)


def cross_entropy(logits_BTV, targets_BT) -> Array:
    """Token negative log-likelihood (B, T), float32."""
    return -token_stats(logits_BTV, targets_BT).logprob_BT


def chunked_cross_entropy(hidden_BTD, embedding_VD, targets_BT, *, chunk: int, dtype=None) -> Array:
    """``cross_entropy(lm_logits(hidden, embedding), targets)`` computed ``chunk`` positions at a time."""
    return -chunked_token_stats(hidden_BTD, embedding_VD, targets_BT, chunk=chunk, dtype=dtype).logprob_BT
