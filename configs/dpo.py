"""DPO config: ``--config=configs/dpo.py --config.train.init_from=SFT_RUN --config.data.train_path=rankings.jsonl``.

Direct preference optimisation (gptjax/stages/dpo.py) on the reward model's data, the K-wise rankings (every C(K,2)
pair a preference), against the SFT run (the reference and the starting policy); ``dpo.loss = "ipo"`` is IPO.
Offline: no sampling, no reward model. ``train.batch_size`` counts rankings per step. ``data.prompts_path``
(optional) is where ``experiments.analyze`` samples to measure the KL to the SFT policy.
Rafailov et al. 2023: β 0.1, lr 1e-6 with 150 warmup steps, batch 64 (of pairs).
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs.reward import reward_data_config
from gptjax.stages.dpo import DPOConfig


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.stage = "dpo"
    c.model = common.model_config("from_init")
    c.tokenizer = common.tokenizer_config("from_init")
    c.data = reward_data_config()  # train_path / eval_path: rankings; num_slots
    del c.data["demos_path"]
    c.data.prompts_path = ""  # prompts for the KL report (experiments.analyze); "" = none
    c.dpo = common.dataclass_section(DPOConfig)
    c.optim = common.optim_config()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 150
    c.optim.weight_decay = 0.0
    c.train = common.train_config()
    c.train.steps = 500
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.sample_prompts = ()
    c.mesh = common.mesh_config()
    return c
