"""Stage 1 objective: supervised fine-tuning on demonstrations (InstructGPT §3.5).

Teacher forcing with the LM loss of ``stages/pretrain.py``; what makes it SFT is the batch: the data pipeline sets
``weights`` to 1 only where the *target* is an assistant-turn token (every assistant turn of a multi-turn
conversation, its end-of-turn token included) and 0 on system/user/prompt tokens and padding, and packs several
conversations per row with distinct ``segment_ids`` so attention never crosses conversations. Prompt tokens still
feed the model as inputs; only their targets are ignored, so changing them cannot change the loss.

``sft_loss`` adds one SFT-specific metric: ``conversation_loss``, the mean over conversations of each one's mean
token NLL — the token-weighted ``loss`` lets a few long answers dominate, this one weighs every conversation alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.model import GPT
from gptjax.stages.pretrain import lm_token_stats

Array = jax.Array


def per_segment_mean_nll(nll_BT, weights_BT, segment_ids_BT) -> tuple[Array, Array]:
    """Mean over segments (packed conversations with Σ weights > 0) of their weighted mean NLL, and their count."""
    B, T = nll_BT.shape
    # Segment ids are 1..n per row (0 = padding), n <= T: one global id per (row, segment).
    flat_ids = (jnp.arange(B)[:, None] * (T + 1) + jnp.clip(segment_ids_BT, 0, T)).reshape(-1)
    num_segments = B * (T + 1)
    nll_sum_S = jax.ops.segment_sum((weights_BT * nll_BT).reshape(-1), flat_ids, num_segments)
    weight_sum_S = jax.ops.segment_sum(weights_BT.reshape(-1), flat_ids, num_segments)
    present_S = weight_sum_S > 0
    count = jnp.sum(present_S)
    per_segment_S = nll_sum_S / jnp.maximum(weight_sum_S, 1e-9)
    return jnp.sum(jnp.where(present_S, per_segment_S, 0.0)) / jnp.maximum(count, 1), count


def sft_loss(params, batch, rng, *, model: GPT, deterministic: bool = False,
             loss_chunk: int = 0) -> tuple[Array, dict[str, Array]]:
    """Weighted mean NLL over assistant tokens; metrics as ``lm_loss`` plus ``conversation_loss`` and
    ``num_conversations``. SFT uses no z-loss (the model is already trained)."""
    stats = lm_token_stats(params, batch, rng, model=model, deterministic=deterministic, loss_chunk=loss_chunk)
    weights_BT = batch["weights"].astype(jnp.float32)
    nll_BT = -stats.logprob_BT
    num_tokens = jnp.sum(weights_BT)
    denominator = jnp.maximum(num_tokens, 1.0)
    loss = jnp.sum(weights_BT * nll_BT) / denominator
    segment_ids_BT = batch.get("segment_ids")
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(weights_BT.shape, jnp.int32)
    conversation_loss, num_conversations = per_segment_mean_nll(nll_BT, weights_BT, segment_ids_BT)
    metrics = {"loss": loss, "num_tokens": num_tokens,
               "accuracy": jnp.sum(weights_BT * stats.correct_BT) / denominator,
               "conversation_loss": conversation_loss, "num_conversations": num_conversations}
    return loss, metrics
