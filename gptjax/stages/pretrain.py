"""Stage 0, pretraining: next-token cross-entropy on packed LM batches (SFT and PPO-ptx reuse the objective).

``lm_loss(params, batch, rng, *, model, ...)`` is a pure function the shared trainer jits and differentiates.
Batch: ``gptjax.data.batches.LM_BATCH`` (all (B, T)): ``inputs``, ``targets``, ``weights`` and the optional
``positions``, ``segment_ids``.

    loss = Σ weights · nll / max(Σ weights, 1)

With ``loss_chunk > 0`` the vocabulary projection is computed that many positions at a time and recomputed in
the backward (``gptjax.losses.chunked_token_stats``), so the float32 (B, T, V) logits never exist: the value is
the same to float32 round-off.

The stage (registered at the end): a GPT from a preset, trained by the shared loop on a text corpus (the grain
pipeline of gptjax/data/pipeline.py), its held-out split evaluated and sampled as raw text.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptjax import flops, losses, sharding
from gptjax.data import batches
from gptjax.data.pipeline import make_lm_iterator
from gptjax.model import GPT, matmul_operand_dtype
from gptjax.stages import common, registry
from gptjax.train import loop

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
                                          dtype=matmul_operand_dtype(model.cfg), temperature=temperature,
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


# --- the stage ------------------------------------------------------------------------------------------------

def objective(cfg, model: GPT):
    """The LM loss the trainer differentiates, with the config's ``train.loss_chunk``."""
    return functools.partial(lm_loss, model=model, loss_chunk=int(cfg.train.loss_chunk))


def run(cfg, workdir: str) -> loop.TrainResult:
    t = cfg.train
    tokenizer, model, mesh, micro = common.build_for_training(cfg, GPT)
    shared = dict(seq_len=int(t.seq_len), seed=int(t.seed))
    train_iter = make_lm_iterator(cfg.data, tokenizer, split="train", global_batch_size=micro, **shared)
    eval_iter = None
    if cfg.data.source == "tfds" or cfg.data.val_fraction > 0:
        eval_batch = int(t.eval_batch_size) or micro
        sharding.check_batch_divisible(eval_batch, mesh, field="train.eval_batch_size")
        eval_iter = make_lm_iterator(cfg.data, tokenizer, split="validation", global_batch_size=eval_batch,
                                     num_epochs=1, **shared)
    return loop.run_training(cfg, workdir, model=model, loss_fn=objective(cfg, model), train_iter=train_iter,
                             eval_iter=eval_iter, sample_fn=common.make_sample_fn(model, tokenizer, t, mesh), mesh=mesh)


def policy_components(stored, tokenizer) -> list[registry.Component]:
    """A language-model run's one network: the policy (pretraining and SFT)."""
    model_cfg, _ = common.resolve_from_init(stored)
    gpt_cfg = common.build_model_config(model_cfg, tokenizer, int(stored.train.seq_len))
    return [registry.Component("model", GPT(common.no_dropout(gpt_cfg)), "params", "policy")]


def split_loss(stored, model: GPT, tokenizer, params, split: str, max_batches: int | None) -> dict:
    """Token loss on the stored corpus's validation ("eval") or train split."""
    t = stored.train
    name = "validation" if split == "eval" else "train"
    it = make_lm_iterator(stored.data, tokenizer, split=name, global_batch_size=common.eval_rows(stored),
                          seq_len=int(t.seq_len), seed=int(t.seed), num_epochs=1)
    loss_fn = functools.partial(lm_loss, model=model, loss_chunk=int(t.loss_chunk))
    source = f"{stored.data.source} {name} split"
    return {"split": split, "source": source,
            **common.eval_loss(loss_fn, params, it, int(max_batches or t.eval_batches))}


def bench(ctx) -> list:
    """One optimizer step of the shared trainer on synthetic packed documents (the batch-candidate search)."""
    c = ctx.c
    T, segments = int(c.seq_len), int(c.pretrain_segments)
    return [ctx.train_step(
        "pretrain", candidates=ctx.batch_candidates(), make_model=GPT,
        make_loss=lambda model: functools.partial(lm_loss, model=model, loss_chunk=int(c.loss_chunk)),
        make_batch=lambda cfg, rows, rng: ctx.lm_batch(rng, rows, T, cfg.vocab_size, segments),
        tokens_per_row=T, flops_per_token=lambda cfg: flops.flops_per_token(cfg, T), segments=segments)]


def plan(cfg, mesh, frozen_mesh=None):
    """The train step of an LM stage (pretraining, SFT: the objective differs, the program's shape does not)."""
    stage = registry.get(cfg.stage)
    T = int(cfg.train.seq_len)
    return common.plan_train_step(cfg, mesh, model_class=GPT, objective=stage.objective, contract=batches.LM_BATCH,
                                  sizes={"T": T}, flops_per_row=lambda m: flops.flops_per_token(m, T) * T,
                                  frozen_mesh=frozen_mesh)


STAGE = registry.register(registry.Stage(
    name="pretrain", title="pretraining", run=run, components=policy_components, inherits_model=False,
    chat_format=False, objective=objective, batch=batches.LM_BATCH, split_loss=split_loss, bench=bench, plan=plan))
