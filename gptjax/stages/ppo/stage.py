"""The PPO stage: its runner (models and data from the SFT and reward-model runs), what its checkpoints hold, and
what analysis reports of it; registered as "ppo".

Policy and frozen reference from ``train.init_from`` (the SFT run); the value model's initial weights from
``ppo_init.reward_from`` (the reward-model run, with its own architecture), which is also the reward unless the
``reward`` section names another source (``stages/online/rewards.py``: ``reward.source = "function"`` scores with
a Python callable); rollouts and updates in the shared RL loop (``stages/online/loop.py``, PPO's pieces in
``stages/ppo/loop.py``).
"""

from __future__ import annotations

import os
from typing import Callable

from gptjax.errors import ConfigError
from gptjax.model import ScoreModel
from gptjax.stages import common, reference, registry
from gptjax.stages.online import loop as online
from gptjax.stages.online import rewards
from gptjax.stages.online import stage as online_stage
from gptjax.stages.online.stage import prompt_len
from gptjax.stages.ppo import bench as ppo_bench
from gptjax.stages.ppo import loop as ppo_loop
from gptjax.stages.ppo import plan as ppo_plan
from gptjax.stages.ppo.objective import PPOConfig


def run(cfg, workdir: str, eval_fn: Callable | None = None) -> online.RLResult:
    """PPO(-ptx): policy and reference from ``train.init_from`` (SFT), value model (and by default the reward) from
    ``ppo_init.reward_from``.

    ``eval_fn(policy_params, step) -> {name: value}`` adds evaluation metrics (``train.eval_every``)."""
    if not cfg.train.init_from or not cfg.ppo_init.reward_from:
        raise ConfigError("PPO needs train.init_from (the SFT run) and ppo_init.reward_from (the reward-model run)")
    pcfg = PPOConfig.from_dict(cfg.ppo.to_dict())
    s = online_stage.setup(cfg, "PPO", default_reward_from=cfg.ppo_init.reward_from,
                           default_reward_field="ppo_init.reward_from",
                           ptx_rows=pcfg.minibatch_size if pcfg.ptx_coef > 0 else 0)
    value_model = rewards.reward_model_of(cfg.ppo_init.reward_from, s.tokenizer, prompt_len(s.cfg),
                                          "ppo_init.reward_from")
    value_params = common.load_full_params(cfg.ppo_init.reward_from, common.abstract_params_of(value_model, s.mesh),
                                           "ppo_init.reward_from")
    return online.run_rl(s.cfg, workdir, algo=ppo_loop.algorithm(pcfg, s.policy_model, value_model),
                         policy_model=s.policy_model, value_model=value_model, policy_params=s.policy_params,
                         value_params=value_params, reward=s.reward, prompts=s.prompts, pad_id=s.tokenizer.pad_id,
                         eos_id=s.tokenizer.eos_id, vocab_size=s.tokenizer.vocab_size, ptx_iter=s.ptx_iter,
                         eval_fn=eval_fn, mesh=s.mesh)


def components(stored, tokenizer) -> list[registry.Component]:
    """A PPOState holds the policy and the value model; the value model has the reward model's architecture (it
    starts from it), or the policy's when that run is gone."""
    policy = online_stage.policy_components(stored, tokenizer)[0]
    path = stored.ppo_init.reward_from
    value_model = (rewards.reward_model_of(path, tokenizer, prompt_len(stored)) if path and os.path.exists(path)
                   else ScoreModel(policy.model.cfg))
    return [policy, registry.Component("value", value_model, "value_params", "value")]


STAGE = registry.register(registry.Stage(
    name="ppo", title="PPO", run=run, components=components, split_loss=reference.split_loss,
    report=online_stage.make_report("ppo"), bench=ppo_bench.bench, plan=ppo_plan.plan,
    sections=("ppo_init", "ppo", "sampling")))
