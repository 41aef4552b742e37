"""RLOO, REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to basics"; Kool et al. 2019), on the shared RL loop;
registered as "rloo".

k responses are sampled to each prompt. The whole response is one action: its reward is the score (reward model or
reward function, with the no-EOS penalty) with the KL to the reference folded in,

    r_i = score_i − β · Σ_t (log π(y_t) − log π_ref(y_t)),

and its baseline is the mean reward of the other k − 1 responses to the same prompt, so the advantage
A_i = r_i − mean_{j≠i} r_j = k/(k − 1) · (r_i − mean_j r_j) needs no value model. ``rloo.loss``:

* ``"reinforce"`` (the paper's): −A_i · Σ_t log π(y_t), averaged over responses;
* ``"clipped"``: PPO's clipped surrogate per token with A_i on every token of response i (useful with several
  epochs or minibatches, when the rollout is off-policy for later steps).
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
from gptjax.stages.ppo.objective import ppo_policy_loss

Array = jax.Array
LOSSES = ("reinforce", "clipped")


@dataclasses.dataclass(frozen=True)
class RLOOConfig:
    """RLOO settings (Ahmadian et al. 2024 use k = 2 or 4 and β 0.05 to 0.1)."""

    k: int = 4  # responses per prompt
    rollout_batch_size: int = 64  # responses per iteration: rollout_batch_size / k prompts
    minibatch_size: int = 32  # responses per gradient step
    epochs: int = 1  # passes over each rollout batch
    kl_coef: float = 0.05  # β of the KL folded into the reward
    loss: str = "reinforce"  # "reinforce" (whole-sequence REINFORCE) or "clipped" (PPO-clip per token)
    clip_eps: float = 0.2  # ratio clip ε of the "clipped" loss
    whiten_advantages: bool = False  # normalise the advantages over the rollout batch (mean 0, std 1)
    no_eos_penalty: float | None = -1.0  # score that replaces the reward of responses without EOS; None = off
    score_clip: float = 0.0  # clip scores to ±score_clip before use; 0 = off
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same temperature
    loss_chunk: int = 0  # >0: vocabulary projections this many positions at a time

    def __post_init__(self):
        check_ranges(self, "rloo", positive=("k", "rollout_batch_size", "minibatch_size", "epochs", "clip_eps",
                                             "temperature"),
                     non_negative=("kl_coef", "score_clip", "loss_chunk"))
        if self.k < 2:
            raise ConfigError(f"rloo.k={self.k}: the leave-one-out baseline needs at least 2 responses per prompt")
        if self.loss not in LOSSES:
            raise ConfigError(f"rloo.loss={self.loss!r} is unknown; valid choices: {list(LOSSES)}")

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "RLOOConfig":
        return dataclass_from_dict(cls, fields, "rloo")


def leave_one_out_advantages(rewards_B, k: int) -> Array:
    """r_i − (mean of the other k − 1 rewards of its group), for consecutive groups of ``k`` rows."""
    r_NK = rewards_B.astype(jnp.float32).reshape(-1, k)
    baseline_NK = (jnp.sum(r_NK, axis=1, keepdims=True) - r_NK) / (k - 1)
    return (r_NK - baseline_NK).reshape(-1)


def advantages(r, scores_B, kl_coef, *, cfg: RLOOConfig) -> tuple[dict, dict[str, Array]]:
    """The RLOO batch and rollout metrics of a scored rollout (``batches.SAMPLED_ROLLOUT``)."""
    rewards_B, score_B, kl_B = rl.sequence_rewards(scores_B, r["old_logprobs"], r["ref_logprobs"], r["response_mask"],
                                                   r["finished"], kl_coef, no_eos_penalty=cfg.no_eos_penalty,
                                                   score_clip=cfg.score_clip)
    advantages_B = leave_one_out_advantages(rewards_B, cfg.k)
    if cfg.whiten_advantages:
        advantages_B = rl.whiten(advantages_B, jnp.ones_like(advantages_B))
    metrics = rl.group_rollout_metrics(rewards_B, score_B, kl_B, r["response_mask"], r["finished"], cfg.k)
    return rl.policy_batch(r, advantages_B), metrics


def reinforce_loss(new_logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT) -> tuple[Array, dict[str, Array]]:
    """−mean over responses of A · Σ_t log π(y_t) (A: the response's advantage, on each of its tokens), and
    ``approx_kl`` to the sampling policy."""
    mask_BT = mask_BT.astype(jnp.float32)
    sequence_logprob_B = jnp.sum(jnp.where(mask_BT > 0, new_logprobs_BT, 0.0), axis=1)
    # Every token of a response carries the same advantage; read it back per row (0 for an empty response).
    advantage_B = jnp.sum(advantages_BT * mask_BT, axis=1) / jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0)
    loss = -jnp.mean(jax.lax.stop_gradient(advantage_B) * sequence_logprob_B)
    log_ratio_BT = jnp.where(mask_BT > 0, new_logprobs_BT - old_logprobs_BT, 0.0)
    return loss, {"approx_kl": rl.masked_mean(jnp.expm1(log_ratio_BT) - log_ratio_BT, mask_BT)}


def rloo_loss(policy_params, value_params, minibatch, rng, *, policy_model: GPT,
              cfg: RLOOConfig) -> tuple[Array, dict[str, Array]]:
    """RLOO's loss on a minibatch of ``batches.POLICY_ROLLOUT_BATCH`` (``value_params``, ``rng`` unused)."""
    del value_params, rng
    batches.check(minibatch, batches.POLICY_ROLLOUT_BATCH, "rloo_loss")
    mask_BT = minibatch["response_mask"]
    new_logprobs_BT, entropy_BT = rl.sequence_logprobs(policy_params, minibatch["tokens"], minibatch["valid"],
                                                       model=policy_model, temperature=cfg.temperature,
                                                       loss_chunk=cfg.loss_chunk, with_entropy=True)
    if cfg.loss == "clipped":
        loss, metrics = ppo_policy_loss(new_logprobs_BT, minibatch["old_logprobs"], minibatch["advantages"], mask_BT,
                                        cfg.clip_eps)
    else:
        loss, metrics = reinforce_loss(new_logprobs_BT, minibatch["old_logprobs"], minibatch["advantages"], mask_BT)
    return loss, {"loss": loss, "policy_loss": loss, **metrics, "entropy": rl.masked_mean(entropy_BT, mask_BT)}


def algorithm(cfg: RLOOConfig, policy_model: GPT) -> Algorithm:
    """RLOO as the shared loop runs it (β fixed: the KL controller only carries it)."""
    return Algorithm(name="rloo", rollout_batch_size=cfg.rollout_batch_size, minibatch_size=cfg.minibatch_size,
                     epochs=cfg.epochs, samples_per_prompt=cfg.k, temperature=cfg.temperature,
                     loss_chunk=cfg.loss_chunk, ptx_coef=0.0, has_value=False,
                     kl_controller=rl.FixedKLController(cfg.kl_coef),
                     advantages=functools.partial(advantages, cfg=cfg),
                     loss=functools.partial(rloo_loss, policy_model=policy_model, cfg=cfg),
                     batch=batches.POLICY_ROLLOUT_BATCH)


# --- the stage ------------------------------------------------------------------------------------------------

def run(cfg, workdir: str) -> online.RLResult:
    """RLOO from ``train.init_from`` (SFT: the initial policy and the reference) on ``data.prompts_path``."""
    rcfg = RLOOConfig.from_dict(cfg.rloo.to_dict())
    s = online_stage.setup(cfg, "RLOO")
    return online.run_rl(s.cfg, workdir, algo=algorithm(rcfg, s.policy_model), policy_model=s.policy_model,
                         value_model=None, policy_params=s.policy_params, value_params=None, reward=s.reward,
                         prompts=s.prompts, pad_id=s.tokenizer.pad_id, eos_id=s.tokenizer.eos_id,
                         vocab_size=s.tokenizer.vocab_size, mesh=s.mesh)


def bench(ctx) -> list:
    """One RLOO iteration at the bench config's RL shapes, k = 4."""
    p = ctx.c.ppo
    rcfg = RLOOConfig(k=4, rollout_batch_size=int(p.rollout_batch_size), minibatch_size=int(p.minibatch_size),
                      epochs=int(p.ppo_epochs), loss_chunk=int(p.loss_chunk))
    setup = {"rollout_batch_size": rcfg.rollout_batch_size, "minibatch_size": rcfg.minibatch_size,
             "epochs": rcfg.epochs, "k": rcfg.k}
    return online_bench.bench_iteration(
        ctx, "rloo", lambda policy, value: algorithm(rcfg, policy),
        note="sampling + policy/reference/reward scoring + leave-one-out advantages", setup=setup)


STAGE = registry.register(registry.Stage(
    name="rloo", title="RLOO", run=run, components=online_stage.policy_components, split_loss=reference.split_loss,
    report=online_stage.make_report("rloo"), bench=bench,
    sections=("rloo", "sampling")))
