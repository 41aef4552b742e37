"""PPO(-ptx) on the shared RL loop (``stages/online/loop.py``): its ``Algorithm`` record, and the loop's programs
built for it.

PPO's pieces (``stages/ppo/objective.py``): per-token rewards (score − β·KL, no-EOS penalty), GAE and advantage
whitening over the rollout batch (``compute_advantages``); the clipped policy and value losses (``ppo_loss``); a value
model next to the policy, each with its own AdamW; one sample per prompt. A PPO checkpoint (``PPOState``, the loop's
``RLState``) holds the policy and value train states, the KL controller state and the base key.
"""

from __future__ import annotations

import functools

from gptjax.data import batches
from gptjax.model import GPT, ScoreModel
from gptjax.sampling import SamplingConfig
from gptjax.stages.online import loop as online
from gptjax.stages.online.algorithm import Algorithm
from gptjax.stages.ppo import objective as ppo_lib

PPOState = online.RLState
PPOResult = online.RLResult
Iteration = online.Iteration


def algorithm(cfg: ppo_lib.PPOConfig, policy_model: GPT, value_model: ScoreModel) -> Algorithm:
    """PPO as the shared loop runs it."""

    def advantages(r, scores_B, kl_coef):
        advantages_BT, returns_BT, metrics = ppo_lib.compute_advantages(
            scores_B, r["old_logprobs"], r["ref_logprobs"], r["old_values"], r["response_mask"], r["finished"],
            kl_coef, cfg)
        batch = {"tokens": r["tokens"], "valid": r["valid"], "response_mask": r["response_mask"],
                 "old_logprobs": r["old_logprobs"], "old_values": r["old_values"], "advantages": advantages_BT,
                 "returns": returns_BT}
        return batch, metrics

    loss = functools.partial(ppo_lib.ppo_loss, policy_model=policy_model, value_model=value_model, cfg=cfg)
    return Algorithm(name="ppo", rollout_batch_size=cfg.rollout_batch_size, minibatch_size=cfg.minibatch_size,
                     epochs=cfg.ppo_epochs, samples_per_prompt=1, temperature=cfg.temperature,
                     loss_chunk=cfg.loss_chunk, ptx_coef=cfg.ptx_coef, has_value=True,
                     kl_controller=cfg.make_kl_controller(), advantages=advantages, loss=loss,
                     batch=batches.ROLLOUT_BATCH)


def make_experience_fn(policy_model: GPT, value_model: ScoreModel, reward_model: ScoreModel,
                       sampling_cfg: SamplingConfig, cfg: ppo_lib.PPOConfig):
    """(policy, ref, value, reward params, prompts, valid, key, kl_coef) -> rollout batch + metrics."""
    return online.make_experience_fn(algorithm(cfg, policy_model, value_model), policy_model, value_model,
                                     reward_model, sampling_cfg)


def make_update_fn(policy_model: GPT, value_model: ScoreModel, policy_tx, value_tx, cfg: ppo_lib.PPOConfig):
    """(state, rollout batch, ptx batches, key) -> (new state, metrics averaged over all minibatch steps)."""
    return online.make_update_fn(algorithm(cfg, policy_model, value_model), policy_tx, value_tx)


def make_iteration(policy_model: GPT, value_model: ScoreModel, reward_model: ScoreModel,
                   sampling_cfg: SamplingConfig, cfg: ppo_lib.PPOConfig, optim_cfg, total_updates: int,
                   policy_params, value_params) -> online.Iteration:
    """The optimizers, the KL controller and the jitted experience and update programs of one PPO iteration."""
    return online.make_iteration(algorithm(cfg, policy_model, value_model), policy_model, value_model, reward_model,
                                 sampling_cfg, optim_cfg, total_updates, policy_params, value_params)
