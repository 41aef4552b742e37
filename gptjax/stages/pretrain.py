"""Stage 0 objective: next-token cross-entropy on packed LM batches (pretraining; SFT and PPO-ptx reuse it).

``lm_loss(params, batch, rng, *, model, ...)`` is a pure function the shared trainer jits and differentiates.
Batch: ``gptjax.data.batches.LM_BATCH`` (all (B, T)): ``inputs``, ``targets``, ``weights`` and the optional
``positions``, ``segment_ids``.

    loss = Σ weights · nll / max(Σ weights, 1)

With ``loss_chunk > 0`` the vocabulary projection is computed that many positions at a time and recomputed in
the backward (``gptjax.losses.chunked_token_stats``), so the float32 (B, T, V) logits never exist: the value is
the same to float32 round-off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax import losses
from gptjax.data import batches
from gptjax.model import GPT

Array = jax.Array

def _hidden_and_embedding(module: GPT, tokens_BT, positions_BT, segment_ids_BT, deterministic):
    return module.hidden(tokens_BT, positions_BT, segment_ids_BT, deterministic=deterministic), \
        module.output_embedding()


def token_stats_of(params, tokens_BT, targets_BT, *, model: GPT, positions_BT=None, segment_ids_BT=None,
                   rng=None, deterministic: bool = True, loss_chunk: int = 0, temperature: float = 1.0,
                   with_entropy: bool = False) -> losses.TokenStats:
    """Per-position statistics of the policy's prediction of ``targets_BT`` after reading ``tokens_BT``.

    One forward pass. ``loss_chunk > 0`` avoids materialising the (B, T, V) logits.
    """
    variables = {"params": params}
    rngs = None if deterministic or rng is None else {"dropout": rng}
    if loss_chunk:
        hidden_BTD, embedding_VD = model.apply(variables, tokens_BT, positions_BT, segment_ids_BT, deterministic,
                                               rngs=rngs, method=_hidden_and_embedding)
        return losses.chunked_token_stats(hidden_BTD, embedding_VD, targets_BT, chunk=loss_chunk,
                                          dtype=jnp.dtype(model.cfg.dtype), temperature=temperature,
                                          with_entropy=with_entropy, backward=model.cfg.xent_backward)
    logits_BTV, _ = model.apply(variables, tokens_BT, positions_BT, segment_ids_BT, deterministic=deterministic,
                                rngs=rngs)
    return losses.token_stats(logits_BTV, targets_BT, temperature=temperature, with_entropy=with_entropy,
                              backward=model.cfg.xent_backward)


def lm_token_stats(params, batch, rng, *, model: GPT, deterministic: bool = False,
                   loss_chunk: int = 0) -> losses.TokenStats:
    """``token_stats_of`` for an LM batch dict (inputs -> targets, packed documents kept apart)."""
    batches.check(batch, batches.LM_BATCH, "lm_loss")
    return token_stats_of(params, batch["inputs"], batch["targets"], model=model,
                          positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"), rng=rng,
                          deterministic=deterministic, loss_chunk=loss_chunk)


def lm_loss(params, batch, rng, *, model: GPT, deterministic: bool = False, loss_chunk: int = 0,
            z_loss_coef: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """Weighted mean token NLL of an LM batch, and metrics.

    Metrics: ``loss`` (the cross-entropy), ``num_tokens`` (Σ weights), ``accuracy`` (weighted argmax hits) and,
    when ``z_loss_coef > 0``, ``z_loss`` — PaLM's auxiliary z_loss_coef · log²Z that keeps the softmax
    normaliser near 1 (off by default; 1e-4 in PaLM); the returned scalar is then loss + z_loss.
    """
    stats = lm_token_stats(params, batch, rng, model=model, deterministic=deterministic, loss_chunk=loss_chunk)
    weights_BT = batch["weights"].astype(jnp.float32)
    num_tokens = jnp.sum(weights_BT)
    denominator = jnp.maximum(num_tokens, 1.0)
    loss = -jnp.sum(weights_BT * stats.logprob_BT) / denominator
    metrics = {"loss": loss, "num_tokens": num_tokens,
               "accuracy": jnp.sum(weights_BT * stats.correct_BT) / denominator}
    total = loss
    if z_loss_coef:
        z_loss = z_loss_coef * jnp.sum(weights_BT * jnp.square(stats.logsumexp_BT)) / denominator
        metrics["z_loss"] = z_loss
        total = loss + z_loss
    return total, metrics


# Pretraining's objective by its stage's name: the LM loss with weights on every target.
pretrain_loss = lm_loss
