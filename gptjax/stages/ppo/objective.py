"""Stage 3 objective: PPO(-ptx) on rollouts of the policy (InstructGPT §3.5; Huang et al. 2024 for the details).

Pieces, each a pure function the RL loop jits (``sequence_logprobs`` / ``sequence_values``, the per-token passes over
full prompt+response rows, live in ``stages/rl.py`` and are re-exported here):

* ``compute_advantages`` — rollout → per-token rewards (RM score at EOS, −β·KL per token, no-EOS penalty),
  optional reward whitening, GAE, advantage whitening, and the rollout metrics.
* ``ppo_policy_loss`` (clipped surrogate, via ``rlax.clipped_surrogate_pg_loss``), ``ppo_value_loss`` (clipped
  value loss) and ``ppo_loss``, which combines them for one minibatch with the optional PPO-ptx term.

Rollout layout (see ``stages/rl.py``): ``tokens`` (B, T) = left-padded prompt + right-padded response; ``valid``
marks real tokens, ``response_mask`` the response tokens up to and including EOS. Dropout is off throughout RL.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import rlax

from gptjax.data import batches
from gptjax.errors import ConfigError, check_ranges, dataclass_from_dict
from gptjax.model import GPT, ScoreModel
from gptjax.stages import rl
from gptjax.stages.pretrain import lm_loss
from gptjax.stages.rl import sequence_logprobs, sequence_values  # noqa: F401  (re-exported: PPO's per-token passes)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO settings. Defaults follow Huang et al. (2024) unless noted; InstructGPT's values in comments."""

    kl_coef: float = 0.05  # initial β of the per-token KL penalty to the SFT policy (InstructGPT: 0.02)
    kl_controller: str = "fixed"  # "fixed" or "adaptive" (Ziegler et al. 2019)
    kl_target: float = 6.0  # adaptive controller: target per-episode KL in nats (Ziegler et al.)
    kl_horizon: float = 10000.0  # adaptive controller: horizon in episodes (Ziegler et al.)
    gamma: float = 1.0  # discount (InstructGPT and Huang et al.: no discount)
    lam: float = 0.95  # GAE λ
    clip_eps: float = 0.2  # policy ratio clip ε
    value_clip_eps: float = 0.2  # value clip: new values stay within ±this of the rollout values
    vf_coef: float = 0.1  # weight of the value loss
    ppo_epochs: int = 4  # passes over each rollout batch (InstructGPT: 1)
    rollout_batch_size: int = 512  # episodes per PPO iteration (InstructGPT: 512)
    minibatch_size: int = 64  # episodes per gradient step (InstructGPT: 64)
    whiten_advantages: bool = True  # normalise advantages over the rollout batch (mean 0, std 1)
    whiten_rewards: bool = False  # scale per-token rewards to unit std (mean kept) before GAE
    score_clip: float = 0.0  # clip RM scores to ±score_clip before use; 0 = off
    no_eos_penalty: float | None = -1.0  # score that replaces the RM's for responses without EOS; None = off
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same temperature
    ptx_coef: float = 0.0  # γ_ptx: weight of the pretraining LM loss (PPO-ptx; InstructGPT: 27.8); 0 = off
    loss_chunk: int = 0  # >0: compute vocabulary projections this many positions at a time (memory)

    def __post_init__(self):
        check_ranges(self, "ppo", positive=("clip_eps", "value_clip_eps", "temperature", "ppo_epochs",
                                            "rollout_batch_size", "minibatch_size"),
                     non_negative=("kl_coef", "vf_coef", "ptx_coef", "score_clip", "loss_chunk"))
        if not (0.0 < self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"ppo.gamma must be in (0, 1] and ppo.lam in [0, 1]; got {self.gamma}, {self.lam}")
        if self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(f"ppo.minibatch_size={self.minibatch_size} must divide "
                              f"ppo.rollout_batch_size={self.rollout_batch_size}")
        self.make_kl_controller()  # validates kl_controller / kl_target / kl_horizon

    @property
    def num_minibatches(self) -> int:
        return self.rollout_batch_size // self.minibatch_size

    def make_kl_controller(self):
        return rl.make_kl_controller(self.kl_controller, self.kl_coef, self.kl_target, self.kl_horizon)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "PPOConfig":
        return dataclass_from_dict(cls, fields, "ppo")


# --- Rollout -> advantages ----------------------------------------------------------------------------------------

def compute_advantages(scores_B, logprobs_BT, ref_logprobs_BT, values_BT, response_mask_BT, finished_B, kl_coef,
                       cfg: PPOConfig) -> tuple[Array, Array, dict[str, Array]]:
    """Advantages and returns (B, T) of a whole rollout batch, and its metrics.

    ``scores_B``: RM rewards at EOS; ``finished_B``: the response ended with EOS; ``kl_coef``: current β.
    Returns are computed before advantage whitening (they are the value targets).
    Metrics: ``score`` (after clipping and the no-EOS penalty), ``kl`` (mean per-episode Σ log π − log π_ref,
    what the adaptive controller tracks), ``reward`` (mean per-episode total reward), ``response_length``,
    ``eos_rate``.
    """
    mask_BT = response_mask_BT.astype(jnp.float32)
    if cfg.score_clip:
        scores_B = jnp.clip(scores_B, -cfg.score_clip, cfg.score_clip)
    rewards_BT, kl_BT = rl.per_token_rewards(scores_B, logprobs_BT, ref_logprobs_BT, mask_BT, kl_coef,
                                             cfg.no_eos_penalty, finished_B)
    metrics = {"score": jnp.mean(jnp.sum(rewards_BT + kl_coef * kl_BT, axis=1)),
               "kl": jnp.mean(jnp.sum(kl_BT, axis=1)), "reward": jnp.mean(jnp.sum(rewards_BT, axis=1)),
               "response_length": jnp.mean(jnp.sum(mask_BT, axis=1)),
               "eos_rate": jnp.mean(finished_B.astype(jnp.float32))}
    if cfg.whiten_rewards:
        rewards_BT = rl.whiten(rewards_BT, mask_BT, shift_mean=False)
    advantages_BT, returns_BT = rl.gae(rewards_BT, values_BT, mask_BT, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages_BT = rl.whiten(advantages_BT, mask_BT)
    return advantages_BT, returns_BT, metrics


# --- Losses ---------------------------------------------------------------------------------------------------------

def ppo_policy_loss(new_logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT,
                    clip_eps: float) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate −min(ρA, clip(ρ, 1±ε)A), mean over response tokens (Schulman et al. 2017).

    Metrics: ``clip_frac`` (tokens with |ρ − 1| > ε), ``approx_kl`` (mean (ρ − 1) − log ρ, an unbiased,
    non-negative estimate of KL(old ‖ new)), ``ratio_mean``.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    # Padding log-probs may be anything; zeroing their log-ratio keeps exp() finite and their gradient 0.
    log_ratio_BT = jnp.where(mask_BT > 0, new_logprobs_BT - old_logprobs_BT, 0.0)
    ratio_BT = jnp.exp(log_ratio_BT)
    # rlax takes an unmasked mean; with a 0/1 mask, min(ρ·mA, clip(ρ)·mA) = m·min(ρA, clip(ρ)A), so feeding
    # mask·A and rescaling the mean by N / Σmask gives the masked mean exactly.
    loss = rlax.clipped_surrogate_pg_loss(ratio_BT.reshape(-1), (advantages_BT * mask_BT).reshape(-1), clip_eps)
    loss = loss * mask_BT.size / jnp.maximum(jnp.sum(mask_BT), 1.0)
    metrics = {"clip_frac": rl.masked_mean((jnp.abs(ratio_BT - 1.0) > clip_eps).astype(jnp.float32), mask_BT),
               "approx_kl": rl.masked_mean((ratio_BT - 1.0) - log_ratio_BT, mask_BT),
               "ratio_mean": rl.masked_mean(ratio_BT, mask_BT)}
    return loss, metrics


def ppo_value_loss(new_values_BT, old_values_BT, returns_BT, mask_BT,
                   clip_eps: float) -> tuple[Array, dict[str, Array]]:
    """0.5 · max((V − R)², (V_clipped − R)²), mean over response tokens; V_clipped = V_old + clip(V − V_old, ±ε).

    Metrics: ``value_clip_frac`` (tokens where the clipped term is the larger), ``explained_variance``
    (1 − Var(R − V)/Var(R) of the new values).
    """
    clipped_BT = old_values_BT + jnp.clip(new_values_BT - old_values_BT, -clip_eps, clip_eps)
    squared_BT = jnp.square(new_values_BT - returns_BT)
    squared_clipped_BT = jnp.square(clipped_BT - returns_BT)
    loss = 0.5 * rl.masked_mean(jnp.maximum(squared_BT, squared_clipped_BT), mask_BT)
    metrics = {"value_clip_frac": rl.masked_mean((squared_clipped_BT > squared_BT).astype(jnp.float32), mask_BT),
               "explained_variance": explained_variance(new_values_BT, returns_BT, mask_BT)}
    return loss, metrics


def explained_variance(values_BT, returns_BT, mask_BT) -> Array:
    """1 − Var(returns − values) / Var(returns) over the masked tokens (1 = perfect, 0 = no better than a constant)."""
    var_returns = rl.masked_var(returns_BT, mask_BT)
    return 1.0 - rl.masked_var(returns_BT - values_BT, mask_BT) / jnp.maximum(var_returns, 1e-8)


def ppo_loss(policy_params, value_params, minibatch, rng, *, policy_model: GPT, value_model: ScoreModel,
             cfg: PPOConfig) -> tuple[Array, dict[str, Array]]:
    """policy loss + vf_coef · value loss (+ ptx_coef · LM loss on ``minibatch["ptx"]``), and metrics.

    Differentiate with ``jax.grad(ppo_loss, argnums=(0, 1), has_aux=True)``: policy and value model have their
    own parameters. ``minibatch`` holds the fields of ``batches.ROLLOUT_BATCH`` (B, T) and, when
    ``cfg.ptx_coef > 0``, ``ptx``: an LM batch of pretraining data (``batches.LM_BATCH``). ``rng`` is unused
    (dropout is off in RL) and kept for the common (params, batch, rng) signature.
    """
    batches.check(minibatch, batches.ROLLOUT_BATCH, "ppo_loss")
    if cfg.ptx_coef and "ptx" not in minibatch:
        raise KeyError(f"ppo_loss: ppo.ptx_coef={cfg.ptx_coef} needs a pretraining LM batch under "
                       f"minibatch['ptx']; set ppo.ptx_coef=0 to turn PPO-ptx off")
    tokens_BT, valid_BT, mask_BT = minibatch["tokens"], minibatch["valid"], minibatch["response_mask"]
    new_logprobs_BT, entropy_BT = sequence_logprobs(policy_params, tokens_BT, valid_BT, model=policy_model,
                                                    temperature=cfg.temperature, loss_chunk=cfg.loss_chunk,
                                                    with_entropy=True)
    policy_loss, policy_metrics = ppo_policy_loss(new_logprobs_BT, minibatch["old_logprobs"],
                                                  minibatch["advantages"], mask_BT, cfg.clip_eps)
    new_values_BT = sequence_values(value_params, tokens_BT, valid_BT, model=value_model)
    value_loss, value_metrics = ppo_value_loss(new_values_BT, minibatch["old_values"], minibatch["returns"],
                                               mask_BT, cfg.value_clip_eps)
    loss = policy_loss + cfg.vf_coef * value_loss
    metrics = {"policy_loss": policy_loss, "value_loss": value_loss, **policy_metrics, **value_metrics,
               "entropy": rl.masked_mean(entropy_BT, mask_BT),
               "value_mean": rl.masked_mean(new_values_BT, mask_BT),
               "return_mean": rl.masked_mean(minibatch["returns"], mask_BT)}
    if cfg.ptx_coef:
        ptx_loss, _ = lm_loss(policy_params, minibatch["ptx"], rng, model=policy_model, deterministic=True,
                              loss_chunk=cfg.loss_chunk)
        loss = loss + cfg.ptx_coef * ptx_loss
        metrics["ptx_loss"] = ptx_loss
    metrics["loss"] = loss
    return loss, metrics
