"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023): the policy learns from the labelled comparisons directly,
offline, with no reward model and no sampling; registered as "dpo".

The data are the reward model's: K-wise rankings (``data.train_path``), every one of a ranking's C(K, 2) pairs a
preference of the better response y_w over the worse y_l, all K responses of a prompt in one batch element
(``batches.PREFERENCE_BATCH``). With sequence log-probs summed over each response's tokens and the reference π_ref the
SFT policy (``train.init_from``, also the starting point),

    h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]
    DPO: −log σ(β·h)           IPO (``dpo.loss = "ipo"``): (h − 1/(2τ))², τ = ``dpo.beta``

An element's loss is the mean over its pairs and the batch's the mean over its elements, as the K-wise reward-model
loss weighs them (``stages/reward.py``). Trained by the shared loop (``objective``/``batch``), dropout off (the
policy and the reference must score the same network).

The reference's sequence log-probs are computed once, when the run starts (``reference_logprobs``), and travel in
the batches (``ref_logprobs``): the reference and the data are both fixed, so one forward pass per response replaces
one per response per step, only the policy's parameters stay on the device, and the objective remains a pure
function of (params, batch) that the trainer, the planner and the sharding tests compile like any other. A resumed
run recomputes them (deterministic: the same program on the same inputs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import flops
from gptjax.data import batches, post_training
from gptjax.errors import ConfigError, dataclass_from_dict
from gptjax.model import GPT
from gptjax.stages import common, reference, registry, rl
from gptjax.stages.pretrain import policy_components
from gptjax.stages.reward import ranked_pairs_BKK
from gptjax.train import loop

Array = jax.Array
LOSSES = ("sigmoid", "ipo")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1  # β of DPO (Rafailov et al.: 0.1); τ of IPO
    loss: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if self.loss not in LOSSES:
            raise ConfigError(f"dpo.loss={self.loss!r} is unknown; valid choices: {list(LOSSES)}")

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "DPOConfig":
        return dataclass_from_dict(cls, fields, "dpo")


def preference_loss(logprobs_BK, ref_logprobs_BK, num_ranked_B, *, beta: float,
                    loss: str = "sigmoid") -> tuple[Array, dict[str, Array]]:
    """The DPO / IPO loss of K ranked responses per element from their sequence log-probs under the policy and the
    reference, and metrics: ``accuracy`` (pairs whose better response has the larger implicit reward β·(log π −
    log π_ref)), ``margin`` (mean β·h over pairs), ``logratio`` (mean log π − log π_ref of ranked responses),
    ``num_pairs``. Elements without a pair (padding) are left out of the mean."""
    K = logprobs_BK.shape[1]
    logratio_BK = (logprobs_BK - ref_logprobs_BK).astype(jnp.float32)
    pairs_BKK = ranked_pairs_BKK(num_ranked_B, K)
    h_BKK = logratio_BK[:, :, None] - logratio_BK[:, None, :]  # h[b, i, j]: i ranked above j
    if loss == "ipo":
        per_pair_BKK = jnp.square(h_BKK - 1.0 / (2.0 * beta))
    else:
        per_pair_BKK = -jax.nn.log_sigmoid(beta * h_BKK)
    num_pairs_B = jnp.sum(pairs_BKK, axis=(1, 2)).astype(jnp.float32)
    per_element_B = jnp.sum(jnp.where(pairs_BKK, per_pair_BKK, 0.0), axis=(1, 2)) / jnp.maximum(num_pairs_B, 1.0)
    has_pairs_B = (num_pairs_B > 0).astype(jnp.float32)
    value = jnp.sum(per_element_B * has_pairs_B) / jnp.maximum(jnp.sum(has_pairs_B), 1.0)
    total_pairs = jnp.maximum(jnp.sum(num_pairs_B), 1.0)
    ranked_BK = (jnp.arange(K)[None, :] < num_ranked_B[:, None]).astype(jnp.float32)
    metrics = {"loss": value, "accuracy": jnp.sum(pairs_BKK & (h_BKK > 0)) / total_pairs,
               "margin": beta * jnp.sum(jnp.where(pairs_BKK, h_BKK, 0.0)) / total_pairs,
               "logratio": jnp.sum(logratio_BK * ranked_BK) / jnp.maximum(jnp.sum(ranked_BK), 1.0),
               "num_pairs": jnp.sum(num_pairs_B)}
    return value, metrics


def response_logprobs(params, tokens_NT, valid_NT, response_mask_NT, *, model: GPT, loss_chunk: int = 0) -> Array:
    """Σ over each row's response tokens of log π(token | prefix): (N,) float32."""
    logprobs_NT, _ = rl.sequence_logprobs(params, tokens_NT, valid_NT, model=model, loss_chunk=loss_chunk)
    return jnp.sum(jnp.where(response_mask_NT, logprobs_NT, 0.0), axis=1)


def dpo_loss(params, batch, rng, *, model: GPT, cfg: DPOConfig, loss_chunk: int = 0,
             deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    """The preference loss of a ``batches.PREFERENCE_BATCH`` (dropout off: ``rng`` and ``deterministic`` unused)."""
    del rng, deterministic
    batches.check(batch, batches.PREFERENCE_BATCH, "dpo_loss")
    B, K, T = batch["tokens"].shape
    logprobs_B_K = response_logprobs(params, batch["tokens"].reshape(B * K, T), batch["valid"].reshape(B * K, T),
                                     batch["response_mask"].reshape(B * K, T), model=model, loss_chunk=loss_chunk)
    return preference_loss(logprobs_B_K.reshape(B, K), batch["ref_logprobs"], batch["num_ranked"], beta=cfg.beta,
                           loss=cfg.loss)


def reference_logprobs(model: GPT, ref_params, examples: Mapping[str, np.ndarray], *, batch_rows: int = 64,
                       loss_chunk: int = 0) -> np.ndarray:
    """(N, K) sequence log-probs of every slot of ``preference_examples`` under the reference (0 in empty slots),
    in fixed-size batches of rows (one compiled shape)."""
    N, K, T = examples["tokens"].shape
    rows = {k: examples[k].reshape(N * K, T) for k in ("tokens", "valid", "response_mask")}
    fn = jax.jit(functools.partial(response_logprobs, model=model, loss_chunk=loss_chunk))
    out = []
    for start in range(0, N * K, batch_rows):
        chunk = {k: v[start:start + batch_rows] for k, v in rows.items()}
        n = len(chunk["tokens"])
        if n < batch_rows:  # pad the last batch by repeating its last row
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch_rows - n, 0)]) for k, v in chunk.items()}
        out.append(np.asarray(fn(ref_params, chunk["tokens"], chunk["valid"], chunk["response_mask"]))[:n])
    return np.concatenate(out).reshape(N, K).astype(np.float32)


# --- the stage ------------------------------------------------------------------------------------------------

def objective(cfg, model: GPT):
    return functools.partial(dpo_loss, model=model, cfg=DPOConfig.from_dict(cfg.dpo.to_dict()),
                             loss_chunk=int(cfg.train.loss_chunk))


def _policy_model(gpt_cfg) -> GPT:
    return GPT(common.no_dropout(gpt_cfg))


def preference_data(path: str, tokenizer, model: GPT, ref_params, cfg) -> dict[str, np.ndarray]:
    """The rankings at ``path`` as preference arrays with the reference's sequence log-probs."""
    examples = post_training.preference_examples(path, tokenizer, int(cfg.train.seq_len),
                                                 num_slots=int(cfg.data.num_slots) or None)
    examples["ref_logprobs"] = reference_logprobs(model, ref_params, examples, loss_chunk=int(cfg.train.loss_chunk))
    return examples


def preference_batches(examples: dict[str, np.ndarray], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                       num_epochs: int | None = None, drop_remainder: bool = True) -> post_training.BatchIterator:
    """Batches of whole rankings (exact resume: ``get_state``/``set_state``); empty elements have no pair."""
    _, K, T = examples["tokens"].shape
    empty = {"tokens": np.zeros((K, T), np.int32), "valid": np.zeros((K, T), bool),
             "response_mask": np.zeros((K, T), bool), "num_ranked": np.zeros((), np.int32),
             "ref_logprobs": np.zeros((K,), np.float32)}
    return post_training.BatchIterator(lambda epoch: examples, empty, batch_size, seed=seed, shuffle=shuffle,
                                       num_epochs=num_epochs, drop_remainder=drop_remainder)


def _reference_params(cfg, model: GPT, mesh) -> dict:
    if not cfg.train.init_from:
        raise ConfigError("DPO needs train.init_from (the SFT run: the reference and the initial policy)")
    return common.load_full_params(cfg.train.init_from, common.abstract_params_of(model, mesh), "train.init_from")


def run(cfg, workdir: str) -> loop.TrainResult:
    """DPO / IPO on the rankings of ``data.train_path`` from (and against) the SFT run ``train.init_from``."""
    cfg = common.resolved_config(cfg)
    DPOConfig.from_dict(cfg.dpo.to_dict())
    t = cfg.train
    tokenizer, model, mesh, micro = common.build_for_training(
        cfg, _policy_model, train_data="the rankings (JSONL, {\"prompt\": ..., \"responses\": [best..worst]})")
    ref_params = _reference_params(cfg, model, mesh)
    train = preference_data(cfg.data.train_path, tokenizer, model, ref_params, cfg)
    held_out = preference_data(cfg.data.eval_path, tokenizer, model, ref_params, cfg) if cfg.data.eval_path else None
    del ref_params
    eval_rows = int(t.eval_batch_size) or micro
    eval_iter = None if held_out is None else functools.partial(
        preference_batches, held_out, eval_rows, shuffle=False, num_epochs=1, drop_remainder=False)
    return loop.run_training(cfg, workdir, model=model, loss_fn=objective(cfg, model),
                             train_iter=preference_batches(train, micro, seed=int(t.seed)), eval_iter=eval_iter,
                             mesh=mesh, loss_is_token_nll=False)


def split_loss(stored, model: GPT, tokenizer, params, split: str, max_batches: int | None) -> dict:
    """The preference loss and accuracy on the stored rankings of ``data.eval_path`` ("eval") or ``train_path``."""
    del max_batches  # every ranking is scored
    path = stored.data.eval_path if split == "eval" else stored.data.train_path
    if not path:
        raise ConfigError(f"--split={split}: the DPO run stores no data.{split}_path; choose another split")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    ref_params = common.load_full_params(stored.train.init_from, abstract, "train.init_from")
    examples = preference_data(path, tokenizer, model, ref_params, stored)
    it = preference_batches(examples, common.eval_rows(stored), shuffle=False, num_epochs=1, drop_remainder=False)
    return {"split": split, "source": path, **common.eval_loss(objective(stored, model), params, it, 10 ** 9)}


def report(run, params, step: int, opts) -> dict:
    """KL(policy ‖ reference) on ``--kl_prompts`` (or the run's ``data.prompts_path``), sampled at temperature 1."""
    del step
    max_new = int(opts.max_new_tokens)
    return reference.report_kl(run, params, opts, temperature=1.0, max_new_tokens=max_new,
                               max_prompt_len=run.components[0].model.cfg.max_len - max_new)


def bench(ctx) -> list:
    """One optimizer step of the shared trainer on synthetic rankings (``reward_k`` responses per prompt, the
    response the second half of each row)."""
    c = ctx.c
    T, k = int(c.seq_len), int(c.reward_k)
    dcfg = DPOConfig()

    def make_batch(cfg, rows, rng):
        batch = ctx.ranking_batch(rng, rows, k, T, cfg.vocab_size)
        batch["response_mask"] = batch["valid"] & (np.arange(T) >= T // 2)
        batch["ref_logprobs"] = rng.normal(-float(T), 1.0, (rows, k)).astype(np.float32)
        return batch

    return [ctx.train_step(
        "dpo", rows=int(c.reward_prompts), make_model=GPT,
        make_loss=lambda model: functools.partial(dpo_loss, model=model, cfg=dcfg, loss_chunk=int(c.loss_chunk)),
        make_batch=make_batch, tokens_per_row=k * T, flops_per_token=lambda cfg: flops.flops_per_token(cfg, T),
        segments=0, extra={"responses_per_prompt": k})]


STAGE = registry.register(registry.Stage(
    name="dpo", title="DPO", run=run, components=policy_components, objective=objective,
    batch=batches.PREFERENCE_BATCH, split_loss=split_loss, report=report, bench=bench, sections=("dpo",)))
