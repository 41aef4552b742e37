"""Stage 1, SFT: supervised fine-tuning on demonstrations (InstructGPT §3.5).

Teacher forcing with the LM loss of ``stages/pretrain.py``; what makes it SFT is the batch: the data pipeline sets
``weights`` to 1 only where the *target* is an assistant-turn token (every assistant turn of a multi-turn
conversation, its end-of-turn token included) and 0 on system/user/prompt tokens and padding, and packs several
conversations per row with distinct ``segment_ids`` so attention never crosses conversations. Prompt tokens still
feed the model as inputs; only their targets are ignored, so changing them cannot change the loss.

``sft_loss`` adds one SFT-specific metric: ``conversation_loss``, the mean over conversations of each one's mean
token NLL — the token-weighted ``loss`` lets a few long answers dominate, this one weighs every conversation alike.

The stage (registered at the end): the model and tokenizer of the ``train.init_from`` run (``from_init``),
trained by the shared loop on JSONL conversations, evaluated on held-out ones and sampled as a chat.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptjax import flops
from gptjax.data import batches, post_training
from gptjax.errors import ConfigError
from gptjax.model import GPT
from gptjax.stages import common, registry
from gptjax.stages import pretrain
from gptjax.stages.pretrain import lm_token_stats, policy_components
from gptjax.train import loop

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


# --- the stage ------------------------------------------------------------------------------------------------

def objective(cfg, model: GPT):
    return functools.partial(sft_loss, model=model, loss_chunk=int(cfg.train.loss_chunk))


def run(cfg, workdir: str) -> loop.TrainResult:
    """Teacher forcing on conversations (JSONL ``data.train_path``), loss on assistant tokens only."""
    cfg = common.resolved_config(cfg)
    t = cfg.train
    tokenizer, model, mesh, micro = common.build_for_training(
        cfg, GPT, train_data="the SFT conversations (JSONL, one {\"messages\": [...]} per line)")
    train_iter = post_training.sft_batches(cfg.data.train_path, tokenizer, int(t.seq_len), micro, seed=int(t.seed))
    eval_iter = common.held_out_batches(post_training.sft_batches, cfg, tokenizer, micro)
    return loop.run_training(cfg, workdir, model=model, loss_fn=objective(cfg, model), train_iter=train_iter,
                             eval_iter=eval_iter, mesh=mesh,
                             sample_fn=common.make_sample_fn(model, tokenizer, t, mesh, chat_prompts=True))


def split_loss(stored, model: GPT, tokenizer, params, split: str, max_batches: int | None) -> dict:
    """Token loss on the stored conversations of ``data.eval_path`` ("eval") or ``data.train_path``."""
    t = stored.train
    path = stored.data.eval_path if split == "eval" else stored.data.train_path
    if not path:
        raise ConfigError(f"--split={split}: the SFT run stores no data.{split}_path; choose another split")
    it = post_training.sft_batches(path, tokenizer, int(t.seq_len), common.eval_rows(stored), shuffle=False,
                                   num_epochs=1, drop_remainder=False)
    loss_fn = functools.partial(sft_loss, model=model, loss_chunk=int(t.loss_chunk))
    return {"split": split, "source": path,
            **common.eval_loss(loss_fn, params, it, int(max_batches or t.eval_batches))}


def bench(ctx) -> list:
    """One optimizer step of the shared trainer on synthetic conversations (loss on their second halves)."""
    c = ctx.c
    T, segments = int(c.seq_len), int(c.sft_segments)
    return [ctx.train_step(
        "sft", make_model=GPT,
        make_loss=lambda model: functools.partial(sft_loss, model=model, loss_chunk=int(c.loss_chunk)),
        make_batch=lambda cfg, rows, rng: ctx.lm_batch(rng, rows, T, cfg.vocab_size, segments, sft_weights=True),
        tokens_per_row=T, flops_per_token=lambda cfg: flops.flops_per_token(cfg, T), segments=segments)]


STAGE = registry.register(registry.Stage(
    name="sft", title="SFT", run=run, components=policy_components, objective=objective, batch=batches.LM_BATCH,
    split_loss=split_loss, bench=bench, plan=pretrain.plan))
