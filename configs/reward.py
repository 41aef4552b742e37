"""Reward-model config:
``--config=configs/reward.py --config.train.init_from=SFT_RUN --config.data.train_path=r.jsonl``.

InstructGPT's K-wise loss over all C(K,2) pairs of each ranking, the K responses of a prompt in one batch
element (gptjax/stages/reward.py). The scalar head reads the final (EOS) token; its decoder starts from the SFT
(or pretraining) run, the head fresh. After training, a bias shift that makes ``data.demos_path``
demonstrations score mean 0 is written to ``WORKDIR/reward_bias.json`` and applied whenever the RM is loaded.
InstructGPT (App. C): 1 epoch, lr 9e-6, cosine to 10%.
"""

from __future__ import annotations

import ml_collections

from configs import common


def reward_data_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.train_path = ""  # rankings, JSONL: {"prompt": str | [messages], "responses": [best, ..., worst]} (2 <= K <= 9)
    d.eval_path = ""  # held-out rankings (same format): pairwise accuracy at each evaluation
    d.demos_path = ""  # SFT demonstrations (JSONL conversations) that should score mean 0; "" = no bias fit
    d.num_slots = 0  # K slots per batch element; 0 = the largest ranking in the file
    return d


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.stage = "reward"
    c.model = common.model_config("from_init")
    c.tokenizer = common.tokenizer_config("from_init")
    c.data = reward_data_config()
    # Pack several short rankings into one element of num_slots (best-fit, largest first): an element then holds
    # more than one prompt, so train.batch_size counts elements, not prompts. Rankings of 2 in 6 slots compute 3x
    # the rows they need; packed, every ranking still weighs the same in the loss. (The reward model's alone: DPO
    # pairs every ranked response of an element.)
    c.data.pack = False
    c.optim = common.optim_config()
    c.optim.lr = 9e-6
    c.train = common.train_config()
    c.train.steps = 200
    c.train.seq_len = 256
    c.train.init_from_fresh = ("score",)  # the head is new; the decoder comes from train.init_from
    c.train.sample_prompts = ()
    c.mesh = common.mesh_config()
    return c
