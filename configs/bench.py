"""Benchmark configs: ``python -m experiments.bench --config=configs/bench.py:<name>``.

CPU sizes (run anywhere, seconds): ``cpu-tiny`` (the smoke test in ``make test``) and ``cpu-small``.
GPU workloads with targets (one card; compared with nanoGPT on the same card, docs/references.md):

- ``gpt2-124m-b48``, ``gpt2-124m-b12``, ``gpt2-350m-b16``, ``gpt2-1.5b-b8``: pretraining step, T 1024, bf16;
- ``gpt3-xl-t2048-b4``, ``gpt3-6.7b-t2048``: GPT-3 shapes at T 2048 (the 6.7B one needs the 141 GB H200; it
  tries the batch/remat candidates in order and keeps the first that fits the card);
- ``sample-124m``: KV-cache sampling, GPT-2 124M in bf16, B 64, prompt 64, 256 new tokens;
- ``ppo-124m``: one PPO iteration with a 124M policy (InstructGPT's rollout batch 512, minibatch 64, 1 epoch).

Every field is documented where it is defined below and can be overridden on the command line
(``--config.batch_size=24 --config.model.remat=full``). GPT-2/3 vocabularies are padded to 50,304 (a multiple of
128), as the stage runners pad the tokenizer's 50,257 and as nanoGPT does.
"""

from __future__ import annotations

import ml_collections

from configs import common

GPT2_PADDED_VOCAB = 50304
ALL_WORKLOADS = "pretrain,sft,reward,ppo,sample,loop"


def base_config(preset: str, seq_len: int, batch_size: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = ""  # the config's name, recorded in the results
    c.workloads = "pretrain"  # comma-separated subset of pretrain,sft,reward,ppo,sample run by default
    c.model = common.model_config(preset)  # preset + GPTConfig overrides (configs/common.py)
    c.seq_len = seq_len  # tokens per training row (pretrain, SFT; reward rows too)
    c.batch_size = batch_size  # rows per training step (pretrain, SFT); reward uses reward_prompts x reward_k
    c.grad_accum_steps = 1  # microbatches per step (the trainer's optim.grad_accum_steps)
    # "B:remat" pairs tried in order for the pretraining step: the first whose compiled program fits the device
    # memory (compiled.memory_analysis() against memory_stats()["bytes_limit"]) is timed. "" = batch_size as is.
    c.batch_candidates = ""
    c.loss_chunk = 0  # positions per chunk of the vocabulary projection in the LM losses (0 = whole logits)
    c.pretrain_segments = 0  # documents packed per pretraining row (0 = no segment ids: one causal mask, as nanoGPT)
    c.sft_segments = 4  # conversations packed per SFT row (segment ids; loss on the second half of each)
    c.reward_prompts = 4  # ranking batch: prompts per step
    c.reward_k = 4  # responses per prompt (K forward rows each)
    c.sample = ml_collections.ConfigDict()
    c.sample.batch_size = 8  # rows sampled together
    c.sample.prompt_len = 16  # prompt tokens per row (left-padded to this)
    c.sample.max_new_tokens = 32  # every row generates all of them (no EOS: timing is deterministic)
    c.sample.temperature = 1.0  # 0 = greedy
    c.sample.top_k = 0  # 0 = off
    c.sample.param_dtype = "bfloat16"  # parameters cast to this once before sampling ("" = as initialised)
    c.sample.unroll_layers = True  # SamplingConfig.unroll_layers: False decodes a scanned model through its scan
    c.sample.decode_segments = 1  # SamplingConfig.decode_segments (sample and ppo workloads)
    c.ppo = ml_collections.ConfigDict()
    c.ppo.rollout_batch_size = 16  # episodes per iteration
    c.ppo.minibatch_size = 8  # episodes per gradient step
    c.ppo.ppo_epochs = 1  # passes over the rollout batch
    c.ppo.prompt_len = 16  # prompt tokens per episode
    c.ppo.max_new_tokens = 16  # response tokens per episode (no EOS: every episode runs the full length)
    c.ppo.loss_chunk = 0  # PPOConfig.loss_chunk: vocabulary projection this many positions at a time
    c.optim = common.optim_config()  # AdamW as in training (gptjax/train/optim.py)
    # The loop workload (run_training itself): its trainer settings; batch_size, seq_len, steps, log_every and
    # checkpointing (once, at the end) are set from this config's fields.
    c.train = common.train_config()
    c.loop_log_every = 10  # loop workload: steps per log interval; warmup + repeats intervals, repeats timed
    c.mesh = common.mesh_config((1, 1, 1))  # (data, fsdp, tensor) over the first prod(shape) devices
    c.warmup = 2  # untimed calls after compiling (allocator, autotuning caches)
    c.repeats = 5  # timed calls; the median is reported
    c.seed = 0
    c.fast_compile = False  # compile without XLA backend optimisation: for smoke tests only (slower programs)
    # Reference figures and targets per workload (empty on CPU): "baseline" is text for the table,
    # "min_tokens_per_s" / "max_rollout_share" decide "met".
    c.targets = ml_collections.ConfigDict()
    return c


def _gpu(c: ml_collections.ConfigDict, vocab: int = GPT2_PADDED_VOCAB) -> None:
    c.model.dtype = "bfloat16"
    # Unrolled layers: on one GPU the scan's stacked activations and their dynamic-update-slice copies cost
    # 36% of GPT-2 124M's step (368k vs 499k tok/s, H200, 2026-11-26); compile time is still seconds here.
    c.model.scan_layers = False
    c.model.vocab_size = vocab
    c.warmup = 2
    c.repeats = 5


def _target(c, workload: str, baseline: str, **limits) -> None:
    c.targets[workload] = ml_collections.ConfigDict({"baseline": baseline, **limits})


def _cpu_tiny() -> ml_collections.ConfigDict:
    c = base_config("tiny", seq_len=64, batch_size=8)
    c.workloads = ALL_WORKLOADS
    c.reward_prompts, c.reward_k = 2, 4
    c.sample.batch_size, c.sample.prompt_len, c.sample.max_new_tokens = 4, 8, 16
    c.ppo.rollout_batch_size, c.ppo.minibatch_size = 8, 4
    c.ppo.prompt_len, c.ppo.max_new_tokens = 8, 8
    c.sample.param_dtype = ""  # float32 on CPU
    c.warmup, c.repeats = 1, 3
    c.loop_log_every = 4
    return c


def _cpu_small() -> ml_collections.ConfigDict:
    """The README demo's shape (4 layers, d_model 128, T 128) at B 32, byte-sized vocabulary."""
    c = base_config("tiny", seq_len=128, batch_size=32)
    c.workloads = ALL_WORKLOADS
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.max_len = 4, 128, 4, 256
    c.model.vocab_size = 512
    c.reward_prompts, c.reward_k = 8, 4
    c.sample.batch_size, c.sample.prompt_len, c.sample.max_new_tokens = 16, 32, 64
    c.ppo.rollout_batch_size, c.ppo.minibatch_size = 32, 8
    c.ppo.prompt_len, c.ppo.max_new_tokens = 32, 64
    c.sample.param_dtype = ""
    c.warmup, c.repeats = 1, 5
    return c


def _gpt2_train(preset: str, batch: int, baseline: str, target: float) -> ml_collections.ConfigDict:
    c = base_config(preset, seq_len=1024, batch_size=batch)
    _gpu(c)
    _target(c, "pretrain", baseline, min_tokens_per_s=target)
    return c


def _gpt3_xl() -> ml_collections.ConfigDict:
    c = base_config("gpt3-xl", seq_len=2048, batch_size=4)
    _gpu(c)
    _target(c, "pretrain", "60,115 tok/s at B 4 (55.2%), H200", min_tokens_per_s=69_000)
    return c


def _gpt3_6_7b() -> ml_collections.ConfigDict:
    c = base_config("gpt3-6.7b", seq_len=2048, batch_size=1)
    _gpu(c)
    c.loss_chunk = 1024  # the (B, T, V) fp32 logits and their gradient would cost 0.8 GB per row
    # State is ~107 GB (16 bytes/param); largest batch first. save_dots_no_batch keeps the weight matmuls'
    # outputs and recomputes element-wise ops and attention in the backward.
    c.batch_candidates = "2:save_dots_no_batch,1:none,1:save_dots_no_batch,1:full"
    c.warmup, c.repeats = 1, 3
    _target(c, "pretrain", "10,022 tok/s at B 1 (43.7%), H200", min_tokens_per_s=12_500)
    return c


def _sample_124m() -> ml_collections.ConfigDict:
    c = base_config("gpt2-small", seq_len=1024, batch_size=1)
    _gpu(c)
    c.workloads = "sample"
    c.sample.batch_size, c.sample.prompt_len, c.sample.max_new_tokens = 64, 64, 256
    c.sample.param_dtype = "bfloat16"  # as transformers' generate in torch_dtype=bfloat16
    c.sample.decode_segments = 4
    _target(c, "sample", "HF generate 6,580 (dynamic) / 30,849 (static cache)", min_tokens_per_s=62_000)
    return c


def _ppo_124m() -> ml_collections.ConfigDict:
    c = base_config("gpt2-small", seq_len=1024, batch_size=1)
    _gpu(c)
    c.workloads = "ppo"
    c.ppo.rollout_batch_size, c.ppo.minibatch_size, c.ppo.ppo_epochs = 512, 64, 1  # InstructGPT
    c.sample.decode_segments = 4  # the rollout's 256 tokens in 4 loops over growing cache prefixes
    c.ppo.prompt_len, c.ppo.max_new_tokens = 64, 256
    c.ppo.loss_chunk = 64  # scoring 512 x 320 tokens would otherwise hold 33 GB of fp32 logits
    c.warmup, c.repeats = 1, 3
    _target(c, "ppo", "-", max_rollout_share=0.5)
    return c


CONFIGS = {
    "cpu-tiny": _cpu_tiny,
    "cpu-small": _cpu_small,
    "gpt2-124m-b48": lambda: _gpt2_train("gpt2-small", 48, "nanoGPT 482,766 (41.7%)", 600_000),
    "gpt2-124m-b12": lambda: _gpt2_train("gpt2-small", 12, "nanoGPT 404,923 (35.0%)", 500_000),
    "gpt2-350m-b16": lambda: _gpt2_train("gpt2-medium", 16, "nanoGPT 179,904 (44.1%)", 225_000),
    "gpt2-1.5b-b8": lambda: _gpt2_train("gpt2-xl", 8, "nanoGPT 42,242 (43.9%)", 53_000),
    "gpt3-xl-t2048-b4": _gpt3_xl,
    "gpt3-6.7b-t2048": _gpt3_6_7b,
    "sample-124m": _sample_124m,
    "ppo-124m": _ppo_124m,
}
GPU_CONFIGS = tuple(name for name in CONFIGS if not name.startswith("cpu-"))


def get_config(name: str = "cpu-tiny") -> ml_collections.ConfigDict:
    if name not in CONFIGS:
        raise ValueError(f"unknown bench config {name!r}; choose one of {sorted(CONFIGS)}")
    c = CONFIGS[name]()
    c.name = name
    return c
