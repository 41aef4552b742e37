"""Rejection-sampling (best-of-N) fine-tuning config: ``--config=configs/rs.py --config.train.init_from=SFT_RUN
--config.reward.model_from=RM_RUN --config.data.prompts_path=prompts.jsonl``.

Llama 2's rejection sampling (gptjax/stages/rejection_sampling.py; RSConfig documents ``rs.*``): ``rs.rounds``
rounds of sampling ``rs.samples_per_prompt`` answers to ``rs.prompts_per_round`` prompts, keeping the reward
model's best and fine-tuning on them with the SFT loss. ``train.steps`` is the fine-tuning steps of each round
(``train.batch_size`` conversations per step). ``reward`` as in the RL stages (a reward function works too).
"""

from __future__ import annotations

import ml_collections

from configs import common
from gptjax.stages.rejection_sampling import RSConfig


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.stage = "rs"
    c.model = common.model_config("from_init")
    c.tokenizer = common.tokenizer_config("from_init")
    c.data = ml_collections.ConfigDict()
    c.data.prompts_path = ""  # prompts, JSONL: {"prompt": str | [messages ending with a user turn], "meta": ...}
    c.reward = common.reward_config()
    c.rs = common.dataclass_section(RSConfig)
    c.sampling = common.sampling_config()
    c.optim = common.optim_config()
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 0
    c.train = common.train_config()
    c.train.steps = 50  # per round
    c.train.seq_len = 256
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.sample_prompts = ()
    c.mesh = common.mesh_config()
    return c
