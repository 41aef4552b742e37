"""Pretraining configs: ``--config=configs/pretrain.py:<preset>``.

<preset> is a model preset of gptjax.presets (gpt1, gpt2-small … gpt2-xl, gpt3-small … gpt3-175b, tiny …),
trained with its paper's recipe where one exists, or one of the runs below:

- ``shakespeare-demo``: the README's CPU demo — a small GPT on Shakespeare with GPT-2 BPE in minutes.
- ``shakespeare-sp``: the same corpus with a 4,096-piece SentencePiece vocabulary trained on its training split
  (``tokenizer.path = "shakespeare:4096"``, made on first use and cached): the base of the scaling sweep, where
  GPT-2's 50k-token output layer would dominate tiny models' compute.
- ``tiny-bytes``: a few-second smoke run (byte tokenizer) for tests and debugging.

GPT-3 recipe (Brown et al. 2020, Table 2.1 and App. B): context 2048, the table's batch and peak lr (its
"0.5M tokens" is 256 sequences x 2048 = 524,288 tokens; 3.2M is 1536 x 2048), warmup over 375M tokens,
cosine decay to 10% over 260B tokens, 300B tokens in all, batch ramp from 32k tokens over the first 4-12B
tokens (we use 4B up to 1.3B params, 8B up to 13B, 12B for 175B: the paper gives only the range).
GPT-2 presets use nanoGPT's recipe (lr 6e-4, 480 x 1024 tokens per step, 2000 warmup steps, 600k steps).
GPT-1 (Radford et al. 2018, §4.1): 64 x 512 tokens, lr 2.5e-4 with 2000 warmup steps and cosine to 0,
weight decay 0.01, dropout 0.1 (the paper trains 100 epochs of BooksCorpus; steps here assume ~1B tokens).
Step counts (steps, warmup, decay) are token budgets divided by the full batch; the ramp's smaller early
batches make the run slightly shorter in tokens. The microbatch (batch_size / grad_accum_steps) is sized
for one 80 GB GPU in bf16; on more devices lower grad_accum_steps so the microbatch is a multiple of the
data-parallel size.
"""

from __future__ import annotations

import ml_collections

from configs import common
from gptjax.data.pipeline import default_data_config
from gptjax.presets import PRESETS

# GPT-3 Table 2.1: (batch in 2048-token sequences, peak learning rate), and our ramp length (see docstring).
GPT3_RECIPE = {
    "gpt3-small": (256, 6.0e-4, 4e9),
    "gpt3-medium": (256, 3.0e-4, 4e9),
    "gpt3-large": (256, 2.5e-4, 4e9),
    "gpt3-xl": (512, 2.0e-4, 4e9),
    "gpt3-2.7b": (512, 1.6e-4, 8e9),
    "gpt3-6.7b": (1024, 1.2e-4, 8e9),
    "gpt3-13b": (1024, 1.0e-4, 8e9),
    "gpt3-175b": (1536, 0.6e-4, 12e9),
}
# Sequences per microbatch on one 80 GB GPU (bf16, remat for the larger ones); by parameter count.
MICROBATCH_BY_SIZE = ((400e6, 16), (1.6e9, 8), (7e9, 2), (float("inf"), 1))

RUNS = ("shakespeare-demo", "shakespeare-sp", "tiny-bytes")


def base_config(preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"  # which objective experiments.train runs (pretrain | sft | reward | ppo)
    c.model = common.model_config(preset)
    c.tokenizer = common.tokenizer_config("gpt2")
    c.data = default_data_config()  # documented in gptjax/data/pipeline.py
    c.optim = common.optim_config()
    c.train = common.train_config()
    c.mesh = common.mesh_config()
    return c


def _microbatch(params: float) -> int:
    return next(mb for limit, mb in MICROBATCH_BY_SIZE if params <= limit)


def _paper_recipe(c: ml_collections.ConfigDict, preset: str) -> None:
    p = PRESETS[preset]
    seq_len = p.config.max_len
    c.train.seq_len = seq_len
    c.model.dtype = "bfloat16"
    if preset in GPT3_RECIPE:
        c.train.batch_size, c.optim.lr, ramp_tokens = GPT3_RECIPE[preset]
        c.train.steps = int(300e9 // (c.train.batch_size * seq_len))
        c.optim.warmup_steps = int(375e6 // (c.train.batch_size * seq_len))
        c.optim.decay_steps = int(260e9 // (c.train.batch_size * seq_len))
        c.optim.ramp_start_tokens = 32 * 1024
        c.optim.ramp_tokens = int(ramp_tokens)
    elif preset == "gpt1":
        c.train.batch_size = 64
        c.optim.lr = 2.5e-4
        c.optim.warmup_steps = 2000
        c.optim.final_lr_fraction = 0.0
        c.optim.weight_decay = 0.01
        c.train.steps = 30_000
        c.model.dropout_embed = c.model.dropout_resid = c.model.dropout_attn = 0.1
    else:  # GPT-2: nanoGPT's recipe (480 x 1024 = 491,520 tokens per step)
        c.train.batch_size = 480
        c.optim.lr = 6e-4
        c.optim.warmup_steps = 2000
        c.train.steps = 600_000
    micro = _microbatch(p.paper_params)
    while c.train.batch_size % micro:
        micro //= 2
    c.optim.grad_accum_steps = c.train.batch_size // max(micro, 1)
    if p.paper_params > 1.6e9:
        c.model.remat = "save_dots_no_batch"
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.eval_batches = 50
    c.train.ckpt_every = 2000
    c.train.sample_every = 10_000


def _shakespeare_demo(c: ml_collections.ConfigDict) -> None:
    """~7 minutes on a 2-core CPU (~1.3 s/step): 4 layers, d_model 128, GPT-2 BPE, 128-token context."""
    c.model.max_len = 128
    c.model.num_layers = 4
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.dropout_resid = 0.0
    c.data.source = "shakespeare"
    c.train.seq_len = 128
    c.train.batch_size = 16
    c.train.steps = 300
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.1
    c.train.log_every = 20
    c.train.eval_every = 150
    c.train.eval_batches = 8
    c.train.ckpt_every = 150
    c.train.sample_prompts = ("ROMEO:",)
    c.train.sample_max_new_tokens = 48


def _tiny_bytes(c: ml_collections.ConfigDict) -> None:
    c.tokenizer.kind = "bytes"
    c.data.source = "text_files"
    c.train.seq_len = 64
    c.train.batch_size = 8
    c.train.steps = 50
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.eval_batches = 2
    c.train.ckpt_every = 25
    c.train.sample_max_new_tokens = 16


def get_config(preset: str = "shakespeare-demo") -> ml_collections.ConfigDict:
    if preset == "shakespeare-demo":
        c = base_config("tiny")
        _shakespeare_demo(c)
    elif preset == "shakespeare-sp":
        c = base_config("tiny")
        _shakespeare_demo(c)
        c.tokenizer.kind = "sentencepiece"
        c.tokenizer.path = "shakespeare:4096"
    elif preset == "tiny-bytes":
        c = base_config("tiny")
        _tiny_bytes(c)
    elif preset in PRESETS:
        c = base_config(preset)
        if PRESETS[preset].paper_params:
            _paper_recipe(c, preset)
    else:
        raise ValueError(f"unknown pretrain config {preset!r}; choose a model preset {sorted(PRESETS)} "
                         f"or a run {list(RUNS)}")
    return c
