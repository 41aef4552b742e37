"""GRPO config: ``--config=configs/grpo.py --config.train.init_from=SFT_RUN --config.reward.model_from=RM_RUN
--config.data.prompts_path=prompts.jsonl``.

Group relative policy optimisation (gptjax/stages/grpo.py, GRPOConfig documents every ``grpo.*`` field) on the shared
RL loop: ``grpo.group_size`` responses per prompt, advantages normalised within each group, no value model.
``train.steps`` counts iterations of ``grpo.rollout_batch_size`` responses. A verifiable reward instead of the
reward model: ``--config.reward.source=function --config.reward.function=module.path:callable`` (e.g.
``gptjax.seed_world.rewards:gold_reward``, which reads each prompt record's "meta").
"""

from __future__ import annotations

import ml_collections

from configs import common
from gptjax.stages.grpo import GRPOConfig


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = common.online_rl_config("grpo")
    c.reward = common.reward_config()
    c.grpo = common.dataclass_section(GRPOConfig)
    return c
