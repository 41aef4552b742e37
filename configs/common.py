"""Config sections shared by every stage (model, tokenizer, optim, train, mesh), each field documented here.

Stage configs (``configs/pretrain.py`` …) assemble these and set stage-specific values. Every field can be
overridden on the command line, e.g. ``--config.optim.lr=3e-4 --config.model.dtype=bfloat16``; an unknown
field is an error. ``None`` fields (placeholders) mean "take the model preset's / the derived value".
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder


def model_config(preset: str) -> ml_collections.ConfigDict:
    """A ``gptjax.presets`` preset plus per-field overrides of its GPTConfig (None = the preset's value)."""
    m = ml_collections.ConfigDict()
    m.preset = preset  # model preset name (gptjax.presets.PRESETS): gpt2-small, gpt3-xl, tiny, ...
    m.vocab_size = placeholder(int)  # None: the tokenizer's vocabulary rounded up to a multiple of 128
    m.max_len = placeholder(int)  # context length (learned positions); must be >= train.seq_len
    m.num_layers = placeholder(int)
    m.d_model = placeholder(int)  # residual width
    m.num_heads = placeholder(int)
    m.d_head = placeholder(int)  # None: d_model // num_heads
    m.d_ff = placeholder(int)  # MLP width; None: 4 * d_model
    m.dropout_embed = placeholder(float)  # dropout on token+position embeddings
    m.dropout_resid = placeholder(float)  # dropout on each residual branch
    m.dropout_attn = placeholder(float)  # dropout on attention probabilities (forces the slow XLA attention)
    m.post_ln = placeholder(bool)  # GPT-1 post-LayerNorm blocks
    m.attention_pattern = placeholder(str)  # comma-separated cycle of "dense"/"local", e.g. "dense,local"
    m.local_window = placeholder(int)  # band width of "local" layers
    m.attention_impl = placeholder(str)  # auto | xla | cudnn | blocked
    m.dtype = placeholder(str)  # compute dtype: float32 | bfloat16 | float16 (logits/loss stay float32)
    m.param_dtype = placeholder(str)  # parameter / optimizer master-copy dtype
    # bfloat16: a float32 model's projections and LM head take bfloat16 operands, accumulating in float32
    # (GPTConfig.matmul_dtype: ~15% faster steps on a CPU with bfloat16 matrix units); None = the compute dtype.
    m.matmul_dtype = placeholder(str)
    # Weights cast to this dtype under their own sharding before use, so FSDP all-gathers move it (e.g. bfloat16:
    # half the bytes of float32 parameters); None = cast after the gather (GPTConfig.gather_dtype).
    m.gather_dtype = placeholder(str)
    m.scan_layers = placeholder(bool)  # nn.scan over layers: compile time independent of depth
    m.remat = placeholder(str)  # none | full | save_dots | save_dots_no_batch
    m.xent_backward = placeholder(str)  # autodiff | fused (hand-written cross-entropy backward; see GPTConfig)
    m.init_std = placeholder(float)
    m.tie_embeddings = placeholder(bool)
    return m


def tokenizer_config(kind: str = "gpt2", path: str = "") -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.kind = kind  # bytes | gpt2 | sentencepiece (gptjax.tokenizers.make_tokenizer)
    # Tokenizer file; "" = the default (gpt2: the fetched asset; bytes: none). For sentencepiece also
    # "shakespeare:<pieces>": a model trained on the Shakespeare training split, made once and cached.
    t.path = path
    return t


def optim_config() -> ml_collections.ConfigDict:
    """AdamW with the GPT-3 recipe (Brown et al. 2020, App. B); see gptjax/train/optim.py."""
    o = ml_collections.ConfigDict()
    o.lr = 6e-4  # peak learning rate
    o.warmup_steps = 0  # linear warmup from ~0 to lr over this many updates
    o.decay_steps = 0  # cosine decay ends here (then stays at the final lr); 0 = train.steps
    o.final_lr_fraction = 0.1  # final lr = final_lr_fraction * lr (GPT-3: 10%)
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1  # decoupled (AdamW); applies to kernels and embeddings, not biases/LayerNorm
    o.clip_norm = 1.0  # global gradient-norm clip; 0 = off
    o.grad_accum_steps = 1  # microbatches per step: microbatch = train.batch_size / grad_accum_steps
    # GPT-3 batch ramp: the batch grows linearly from ramp_start_tokens to train.batch_size over the first
    # ramp_tokens tokens, in whole microbatches. 0 = off.
    o.ramp_start_tokens = 0
    o.ramp_tokens = 0
    # '/'-joined parameter paths (or prefixes) that are not trained, e.g. ("decoder/wte",): the token embedding
    # (and the tied LM head) stays as the run started. Adam moves even tokens that never appear as a target a full
    # lr-sized step per update (their tiny softmax gradients are normalised), so fine-tuning on some numbers pushes
    # the others' embeddings away; freezing them keeps what pretraining learned about every token. None = none.
    o.frozen = placeholder(tuple)
    # Token ids whose rows of the token embedding train although optim.frozen freezes "decoder/wte": the tokens the
    # pretraining corpus never contained (gptjax.data.packing.tokens_absent_from). Pretraining pushes all of those
    # rows the same way, to one shared vector, so with the embedding (and the tied LM head) frozen a fine-tuned
    # model cannot tell the chat role tokens apart, nor make one such token ("Sorry", when only the demonstrations
    # use it) likelier than the others: it gives all of them one probability. None = none.
    o.trainable_token_ids = placeholder(tuple)
    return o


def reward_config(source: str | None = "model", model_from: str | None = "",
                  function: str | None = "") -> ml_collections.ConfigDict:
    """Where an RL stage's reward comes from (gptjax/stages/online/rewards.py); None = the stage's default."""
    r = ml_collections.ConfigDict()
    r.source = placeholder(str) if source is None else source  # "model": a reward-model run; "function": a callable
    r.model_from = placeholder(str) if model_from is None else model_from  # the reward-model run (source "model")
    # "module.path:callable", called as fn(prompt_record: dict, answer: str) -> float (source "function")
    r.function = placeholder(str) if function is None else function
    return r


def dataclass_section(cls) -> ml_collections.ConfigDict:
    """Every field of a settings dataclass (PPOConfig, GRPOConfig, ...) with its default (documented there)."""
    return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(cls)})


def sampling_config() -> ml_collections.ConfigDict:
    """How the online RL stages sample their rollouts (gptjax/sampling.py SamplingConfig)."""
    s = ml_collections.ConfigDict()
    s.max_prompt_len = 128  # prompts are left-padded to the longest; longer ones are an error
    s.max_new_tokens = 64  # response budget; responses without EOS get the algorithm's no_eos_penalty
    s.top_k = 0  # 0 = off (RLHF samples the policy as a distribution: temperature <algorithm>.temperature)
    s.top_p = 1.0
    # SamplingConfig.decode_segments: rollouts decode in this many loops, each attending over only the cache prefix
    # it can have filled (less memory traffic for long responses; each loop adds compile time).
    s.decode_segments = 1
    # SamplingConfig.unroll_layers: decode a scanned model with its layers unrolled (caches updated in place). False
    # keeps the layer scan: with FSDP each layer's weights are gathered inside the token loop, where unrolled the
    # compiler may hoist every gathered weight out of it and keep them all (experiments.plan shows which). None = True.
    s.unroll_layers = placeholder(bool)
    return s


def online_rl_config(stage: str) -> ml_collections.ConfigDict:
    """What every online RL stage's config holds (PPO, GRPO, RLOO): the model and tokenizer of train.init_from (the
    SFT run), the prompts, sampling, AdamW at RL settings, train (``train.steps`` counts iterations), mesh."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.model = model_config("from_init")
    c.tokenizer = tokenizer_config("from_init")
    c.data = ml_collections.ConfigDict()
    c.data.prompts_path = ""  # prompts, JSONL: {"prompt": str | [messages ending with a user turn], "meta": ...}
    c.sampling = sampling_config()
    c.optim = optim_config()
    c.optim.lr = 1e-5
    c.optim.eps = 1e-5  # Huang et al. 2024
    c.optim.weight_decay = 0.0
    c.train = train_config()
    c.train.steps = 100
    c.train.log_every = 1
    c.train.eval_every = 25
    c.train.ckpt_every = 25
    c.mesh = mesh_config()
    return c


def train_config() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.seed = 0  # parameter init, dropout and data order
    t.batch_size = 8  # global sequences per optimizer step (all devices, all microbatches)
    t.seq_len = 128  # tokens per sequence
    t.steps = 1000  # optimizer steps in the whole run
    t.log_every = 10  # steps between progress lines / metrics records
    t.eval_every = 200  # steps between evaluations (0 = only at the end)
    t.eval_batches = 8  # validation batches per evaluation (the same ones each time)
    t.eval_batch_size = 0  # sequences per validation batch; 0 = the training microbatch
    t.ckpt_every = 200  # steps between checkpoints (one is always written at the end)
    t.keep_ckpts = 3  # most recent checkpoints kept (0 = all)
    t.sample_every = 0  # steps between sample generations (0 = only at the end)
    t.sample_prompts = ("",)  # prompts for sample generations ("" = start of a fresh document)
    t.sample_max_new_tokens = 64
    t.sample_temperature = 0.8  # 0 = greedy
    t.max_consecutive_bad_steps = 10  # stop after this many non-finite (skipped) steps in a row
    t.loss_chunk = 0  # positions per chunk of the vocabulary projection in the loss (0 = whole; saves memory)
    t.init_from = ""  # start from the params of another run: its workdir, checkpoints/ dir or a step dir
    t.init_from_fresh = ()  # '/'-joined param prefixes NOT taken from init_from (e.g. ("score",))
    t.allow_config_change = False  # resume a workdir whose stored config differs (else refused)
    t.wait_for_lock = False  # another process holds the workdir's lock: wait for it (else refused)
    t.peak_flops = 0.0  # device peak FLOP/s for MFU; 0 = from gptjax.flops.PEAK_FLOPS (n/a on CPU)
    return t


def mesh_config(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.shape = tuple(shape)  # (data, fsdp, tensor) device mesh; one -1 is filled with the remaining devices
    return m
