"""GRPO, group relative policy optimisation (Shao et al. 2024, DeepSeekMath §4.1), on the shared RL loop; registered
as "grpo".

G responses are sampled to each prompt (a group). Each response's reward r_i (the reward model's score or a reward
function's, with the no-EOS penalty) becomes one advantage for every token of it:

    A_i = (r_i − mean(r_group)) / (std(r_group) + ε)        (std with ddof 1, ε = 1e-4, as TRL)

and the policy minimises the clipped surrogate with the KL to the reference as a loss term, the k3 estimator per
token (Schulman 2020):

    ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1 ± ε_clip) A_i) + β · (π_ref/π − log(π_ref/π) − 1),   ρ_t = π/π_old

averaged over each response's tokens, then over responses. ``grpo.kl_in = "reward"`` moves the KL into the reward
instead (r_i − β Σ_t log π/π_ref, as PPO and RLOO do). ``grpo.dr_grpo`` is Dr. GRPO (Liu et al. 2025): advantages
are not divided by the group std and the loss is the sum over all response tokens divided by a constant (responses
× ``sampling.max_new_tokens``), so neither the group's spread nor a response's length rescales its gradient.
No value model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from gptjax.data import batches
from gptjax.errors import ConfigError, check_ranges, dataclass_from_dict
from gptjax.model import GPT
from gptjax.stages import reference, registry, rl
from gptjax.stages.online import bench as online_bench
from gptjax.stages.online import loop as online
from gptjax.stages.online import stage as online_stage
from gptjax.stages.online.algorithm import Algorithm

Array = jax.Array
KL_IN = ("loss", "reward")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO settings; the paper's values (DeepSeekMath §4.2) in comments."""

    group_size: int = 8  # G responses per prompt (DeepSeekMath: 64)
    rollout_batch_size: int = 64  # responses per iteration: rollout_batch_size / G prompts (DeepSeekMath: 1024)
    minibatch_size: int = 32  # responses per gradient step
    epochs: int = 1  # μ: passes over each rollout batch (DeepSeekMath: 1)
    clip_eps: float = 0.2  # ratio clip ε
    kl_coef: float = 0.04  # β (DeepSeekMath: 0.04)
    kl_in: str = "loss"  # "loss": β·k3 per token in the loss; "reward": −β·Σ log π/π_ref in each response's reward
    dr_grpo: bool = False  # Dr. GRPO: no division by the group std, token sums over a constant length
    std_eps: float = 1e-4  # added to the group std
    no_eos_penalty: float | None = -1.0  # score that replaces the reward of responses without EOS; None = off
    score_clip: float = 0.0  # clip rewards to ±score_clip before use; 0 = off
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same temperature
    loss_chunk: int = 0  # >0: vocabulary projections this many positions at a time

    def __post_init__(self):
        check_ranges(self, "grpo", positive=("group_size", "rollout_batch_size", "minibatch_size", "epochs",
                                             "clip_eps", "temperature", "std_eps"),
                     non_negative=("kl_coef", "score_clip", "loss_chunk"))
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size={self.group_size}: a group needs at least 2 responses")
        if self.kl_in not in KL_IN:
            raise ConfigError(f"grpo.kl_in={self.kl_in!r} is unknown; valid choices: {list(KL_IN)}")

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "GRPOConfig":
        return dataclass_from_dict(cls, fields, "grpo")


# --- Rollout -> advantages ----------------------------------------------------------------------------------------

def group_advantages(rewards_B, group_size: int, *, normalize_std: bool = True, eps: float = 1e-4) -> Array:
    """(r − group mean) / (group std + eps) of consecutive groups of ``group_size`` rows; without
    ``normalize_std`` only the mean is subtracted (Dr. GRPO). std has ddof 1."""
    r_NG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
    advantages_NG = r_NG - jnp.mean(r_NG, axis=1, keepdims=True)
    if normalize_std:
        advantages_NG = advantages_NG / (jnp.std(r_NG, axis=1, ddof=1, keepdims=True) + eps)
    return advantages_NG.reshape(-1)


def advantages(r, scores_B, kl_coef, *, cfg: GRPOConfig) -> tuple[dict, dict[str, Array]]:
    """The GRPO batch and rollout metrics of a scored rollout (``batches.SAMPLED_ROLLOUT``)."""
    beta = kl_coef if cfg.kl_in == "reward" else 0.0
    rewards_B, score_B, kl_B = rl.sequence_rewards(scores_B, r["old_logprobs"], r["ref_logprobs"], r["response_mask"],
                                                r["finished"], beta, no_eos_penalty=cfg.no_eos_penalty,
                                                score_clip=cfg.score_clip)
    advantages_B = group_advantages(rewards_B, cfg.group_size, normalize_std=not cfg.dr_grpo, eps=cfg.std_eps)
    metrics = rl.group_rollout_metrics(rewards_B, score_B, kl_B, r["response_mask"], r["finished"], cfg.group_size)
    return rl.policy_batch(r, advantages_B), metrics


# --- Loss -------------------------------------------------------------------------------------------------------

def grpo_policy_loss(new_logprobs_BT, old_logprobs_BT, ref_logprobs_BT, advantages_BT, mask_BT, *, clip_eps: float,
                     kl_coef: float, dr_grpo: bool, max_new_tokens: int) -> tuple[Array, dict[str, Array]]:
    """The GRPO loss of a minibatch (module docstring) and its metrics: ``clip_frac``, ``approx_kl`` (to the
    sampling policy), ``kl_ref`` (mean k3 per token), ``ratio_mean``."""
    mask_BT = mask_BT.astype(jnp.float32)
    on = mask_BT > 0
    log_ratio_BT = jnp.where(on, new_logprobs_BT - old_logprobs_BT, 0.0)  # padding: any value, gradient 0
    ratio_BT = jnp.exp(log_ratio_BT)
    clipped_BT = jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate_BT = -jnp.minimum(ratio_BT * advantages_BT, clipped_BT * advantages_BT)
    ref_log_ratio_BT = jnp.where(on, ref_logprobs_BT - new_logprobs_BT, 0.0)
    k3_BT = jnp.exp(ref_log_ratio_BT) - ref_log_ratio_BT - 1.0
    per_token_BT = (surrogate_BT + kl_coef * k3_BT) * mask_BT
    if dr_grpo:
        loss = jnp.sum(per_token_BT) / (mask_BT.shape[0] * max_new_tokens)
    else:
        loss = jnp.mean(jnp.sum(per_token_BT, axis=1) / jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0))
    metrics = {"clip_frac": rl.masked_mean((jnp.abs(ratio_BT - 1.0) > clip_eps).astype(jnp.float32), mask_BT),
               "approx_kl": rl.masked_mean((ratio_BT - 1.0) - log_ratio_BT, mask_BT),
               "kl_ref": rl.masked_mean(k3_BT, mask_BT), "ratio_mean": rl.masked_mean(ratio_BT, mask_BT)}
    return loss, metrics


def grpo_loss(policy_params, value_params, minibatch, rng, *, policy_model: GPT, cfg: GRPOConfig,
              max_new_tokens: int) -> tuple[Array, dict[str, Array]]:
    """GRPO's loss on a minibatch of ``batches.POLICY_ROLLOUT_BATCH`` (``value_params``, ``rng`` unused)."""
    del value_params, rng
    batches.check(minibatch, batches.POLICY_ROLLOUT_BATCH, "grpo_loss")
    mask_BT = minibatch["response_mask"]
    new_logprobs_BT, entropy_BT = rl.sequence_logprobs(policy_params, minibatch["tokens"], minibatch["valid"],
                                                       model=policy_model, temperature=cfg.temperature,
                                                       loss_chunk=cfg.loss_chunk, with_entropy=True)
    loss, metrics = grpo_policy_loss(new_logprobs_BT, minibatch["old_logprobs"], minibatch["ref_logprobs"],
                                     minibatch["advantages"], mask_BT, clip_eps=cfg.clip_eps,
                                     kl_coef=cfg.kl_coef if cfg.kl_in == "loss" else 0.0, dr_grpo=cfg.dr_grpo,
                                     max_new_tokens=max_new_tokens)
    return loss, {"loss": loss, "policy_loss": loss, **metrics, "entropy": rl.masked_mean(entropy_BT, mask_BT)}


def algorithm(cfg: GRPOConfig, policy_model: GPT, max_new_tokens: int) -> Algorithm:
    """GRPO as the shared loop runs it (β fixed: the KL controller only carries it)."""
    return Algorithm(name="grpo", rollout_batch_size=cfg.rollout_batch_size, minibatch_size=cfg.minibatch_size,
                     epochs=cfg.epochs, samples_per_prompt=cfg.group_size, temperature=cfg.temperature,
                     loss_chunk=cfg.loss_chunk, ptx_coef=0.0, has_value=False,
                     kl_controller=rl.FixedKLController(cfg.kl_coef),
                     advantages=functools.partial(advantages, cfg=cfg),
                     loss=functools.partial(grpo_loss, policy_model=policy_model, cfg=cfg,
                                            max_new_tokens=max_new_tokens),
                     batch=batches.POLICY_ROLLOUT_BATCH)


# --- the stage ------------------------------------------------------------------------------------------------

def run(cfg, workdir: str) -> online.RLResult:
    """GRPO from ``train.init_from`` (SFT: the initial policy and the reference) on ``data.prompts_path``."""
    gcfg = GRPOConfig.from_dict(cfg.grpo.to_dict())
    s = online_stage.setup(cfg, "GRPO")
    algo = algorithm(gcfg, s.policy_model, int(s.cfg.sampling.max_new_tokens))
    return online.run_rl(s.cfg, workdir, algo=algo, policy_model=s.policy_model, value_model=None,
                         policy_params=s.policy_params, value_params=None, reward=s.reward, prompts=s.prompts,
                         pad_id=s.tokenizer.pad_id, eos_id=s.tokenizer.eos_id, vocab_size=s.tokenizer.vocab_size,
                         mesh=s.mesh)


def bench(ctx) -> list:
    """One GRPO iteration at the bench config's RL shapes, groups of 4."""
    p = ctx.c.ppo
    gcfg = GRPOConfig(group_size=4, rollout_batch_size=int(p.rollout_batch_size),
                      minibatch_size=int(p.minibatch_size), epochs=int(p.ppo_epochs), loss_chunk=int(p.loss_chunk))
    setup = {"rollout_batch_size": gcfg.rollout_batch_size, "minibatch_size": gcfg.minibatch_size,
             "epochs": gcfg.epochs, "group_size": gcfg.group_size}
    return online_bench.bench_iteration(
        ctx, "grpo", lambda policy, value: algorithm(gcfg, policy, int(p.max_new_tokens)),
        note="sampling + policy/reference/reward scoring + group advantages", setup=setup)


STAGE = registry.register(registry.Stage(
    name="grpo", title="GRPO", run=run, components=online_stage.policy_components, split_loss=reference.split_loss,
    report=online_stage.make_report("grpo"), bench=bench,
    sections=("grpo", "sampling")))
