"""PPO(-ptx) config: ``--config=configs/ppo.py --config.train.init_from=SFT_RUN --config.ppo_init.reward_from=RM_RUN
--config.data.prompts_path=prompts.jsonl``.

Policy and frozen reference from the SFT run, frozen reward model and the value model's initial weights from
the RM run (gptjax/stages/ppo/, on the shared RL loop of gptjax/stages/online/). ``train.steps`` counts PPO
iterations (each: one rollout batch, then ``ppo.ppo_epochs`` passes of minibatch updates). PPO fields are
documented in gptjax/stages/ppo/objective.py (PPOConfig); the sections every RL stage shares in configs/common.py.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common
from gptjax.data.pipeline import default_data_config
from gptjax.stages.ppo.objective import PPOConfig


def ppo_section() -> ml_collections.ConfigDict:
    """Every PPOConfig field with its default (documented on the dataclass)."""
    return common.dataclass_section(PPOConfig)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = common.online_rl_config("ppo")
    c.ppo_init = ml_collections.ConfigDict()
    c.ppo_init.reward_from = ""  # the reward-model run (its workdir); also the value model's initial weights
    # Planning without runs (experiments.plan): the reward and value model's preset; None = the policy's.
    c.ppo_init.reward_preset = placeholder(str)
    # The reward (gptjax/stages/online/rewards.py); None = the defaults: source "model", the RM of
    # ppo_init.reward_from. reward.source="function" with reward.function="module.path:callable" scores answers with
    # a Python function instead (e.g. gptjax.seed_world.rewards:gold_reward); the value model still starts from the RM.
    c.reward = common.reward_config(source=None, model_from=None, function=None)
    c.ppo = ppo_section()
    c.ptx = default_data_config()  # pretraining data for PPO-ptx (used when ppo.ptx_coef > 0)
    c.ptx_seq_len = 128  # sequence length of the PPO-ptx pretraining batches
    return c
