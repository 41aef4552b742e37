"""RLOO config: ``--config=configs/rloo.py --config.train.init_from=SFT_RUN --config.reward.model_from=RM_RUN
--config.data.prompts_path=prompts.jsonl``.

REINFORCE leave-one-out (gptjax/stages/rloo.py, RLOOConfig documents every ``rloo.*`` field) on the shared RL loop:
``rloo.k`` responses per prompt, each one's baseline the mean reward of the others, the KL to the SFT policy folded
into the reward, no value model. ``train.steps`` counts iterations of ``rloo.rollout_batch_size`` responses. A
verifiable reward instead of the reward model: ``--config.reward.source=function
--config.reward.function=module.path:callable``.
"""

from __future__ import annotations

import ml_collections

from configs import common
from gptjax.stages.rloo import RLOOConfig


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = common.online_rl_config("rloo")
    c.reward = common.reward_config()
    c.rloo = common.dataclass_section(RLOOConfig)
    return c
