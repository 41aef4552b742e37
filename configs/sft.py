"""SFT config: ``--config=configs/sft.py --config.train.init_from=PRETRAIN_RUN --config.data.train_path=sft.jsonl``.

Teacher forcing on conversations, loss on the assistant tokens only (gptjax/stages/sft.py). The model and
tokenizer are those of the pretraining run (``model.preset = "from_init"``); ``model.*`` fields that are set
override it (e.g. ``--config.model.dropout_resid=0.2``, InstructGPT's SFT dropout).
InstructGPT (Ouyang et al. 2022, App. C): 16 epochs, cosine decay to 10%, no warmup, residual dropout 0.2.
"""

from __future__ import annotations

import ml_collections

from configs import common


def sft_data_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.train_path = ""  # conversations, JSONL: {"messages": [{"role": "system"|"user"|"assistant", "content"}...]}
    d.eval_path = ""  # held-out conversations (same format) for the eval loss; "" = none
    return d


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.stage = "sft"  # experiments.train dispatches on this
    c.model = common.model_config("from_init")
    c.tokenizer = common.tokenizer_config("from_init")
    c.data = sft_data_config()
    c.optim = common.optim_config()
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.train = common.train_config()
    c.train.steps = 500
    c.train.seq_len = 512  # multi-turn dialogues need room; several short conversations pack into one row
    c.train.sample_prompts = ("27 是不是質數？", "Is 27 a prime number?")
    c.train.sample_temperature = 0.0
    c.mesh = common.mesh_config()
    return c
