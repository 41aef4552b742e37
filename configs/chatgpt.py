"""The built-in end-to-end demo: the seed world through all four stages on a CPU (``make demo``).

    python -m experiments.chatgpt --workdir=workdirs/demo [--config=configs/chatgpt.py:demo] [--seeds=0,1,2]

Sections: ``world`` (gptjax/seed_world/world.py SeedWorldConfig fields), one full stage config per stage
(``pretrain``/``sft``/``reward``/``ppo``: the same configs experiments.train runs alone, their paths filled in
by the pipeline), ``labels`` (sampling K answers per RM prompt for the simulated labeler) and ``eval``.
Presets: ``demo`` (the README's numbers, ~12 minutes on 2 CPU cores) and ``smoke`` (seconds, for tests).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import pretrain, ppo, reward, sft
from gptjax.seed_world.world import SeedWorldConfig


def _world() -> ml_collections.ConfigDict:
    fields = {f.name: f.default for f in dataclasses.fields(SeedWorldConfig) if f.name != "seed"}
    return ml_collections.ConfigDict(fields)


def _model(c, layers: int, d_model: int, heads: int, max_len: int):
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.max_len = layers, d_model, heads, max_len


def _pretrain_config() -> ml_collections.ConfigDict:
    p = pretrain.base_config("tiny")
    p.tokenizer.kind = "bytes"  # any language byte-for-byte: the seed world is Chinese and English
    p.data.source = "text_files"
    p.data.text_field = "text"
    p.data.val_fraction = 0.01
    _model(p, 4, 128, 4, 512)
    p.model.scan_layers = False  # 4 layers: unrolled runs ~25% faster on XLA:CPU and compiles in seconds
    p.train.seq_len = 128
    p.train.batch_size = 32
    p.train.steps = 800
    p.optim.lr = 3e-3
    p.optim.warmup_steps = 100
    p.train.log_every = 100
    p.train.eval_every = 400
    p.train.eval_batches = 4
    p.train.ckpt_every = 400
    p.train.sample_prompts = ("問：27 是不是質數？\n答：", "Q: Is 27 a prime number?\nA: ")
    p.train.sample_max_new_tokens = 40
    return p


def _sft_config() -> ml_collections.ConfigDict:
    s = sft.get_config()
    s.train.seq_len = 512  # the longest multi-turn dialogues are ~500 bytes
    s.train.batch_size = 8
    s.train.steps = 80
    s.optim.lr = 1e-3
    s.train.log_every = 25
    s.train.eval_every = 80
    s.train.ckpt_every = 80
    s.train.sample_max_new_tokens = 48
    return s


def _reward_config() -> ml_collections.ConfigDict:
    r = reward.get_config()
    r.train.seq_len = 128
    r.train.batch_size = 16
    r.train.steps = 150  # ~5 epochs of ~440 rankings: the RM is the bottleneck (60 steps gave 0.60 accuracy)
    r.optim.lr = 3e-4
    r.optim.warmup_steps = 10
    r.train.log_every = 25
    r.train.eval_every = 150
    r.train.ckpt_every = 150
    return r


def _ppo_config() -> ml_collections.ConfigDict:
    o = ppo.get_config()
    o.ppo.rollout_batch_size = 64
    o.ppo.minibatch_size = 32
    o.ppo.ppo_epochs = 2
    # λ = 1: the verdict is the ~5th of ~50 response tokens, and the value model (the RM's weights) has never
    # scored a partial answer, so at λ = 0.95 the verdict token's advantage was 0.95^45 ≈ 10% final reward and 90%
    # noise from an untrained value head: at lr 3e-5 the RM score of rollouts did not rise in 40 iterations and
    # the policy random-walked to 1.8 nats from SFT. With λ = 1 the advantage is (return − value), an unbiased
    # estimate whatever the value head says.
    # β is in units of the RM's score, whose spread over one prompt's answers is ~2: β 0.5 makes drifting 1 nat
    # from SFT cost a quarter of that spread, so the policy moves where the RM separates answers clearly and not
    # along its noise (seeds 0/1, held-out sampled accuracy minus SFT's: β 0.2 / lr 5e-5 +2.5 / −1.0 at KL 1.2;
    # β 0.5 / lr 1e-4 +5.9 / +3.4 at KL ~1; β 1 +0.3 / +1.8 at KL 0.5). KL ~1 nat is also where best-of-N against
    # this reward model stops gaining gold (make overopt); β 0.05–0.1 reached 2–8 nats and lost accuracy.
    o.ppo.lam = 1.0
    o.ppo.kl_coef = 0.5
    o.sampling.max_prompt_len = 64
    o.sampling.max_new_tokens = 64
    o.optim.lr = 1e-4
    o.train.steps = 40
    o.train.log_every = 10
    o.train.eval_every = 1000
    o.train.ckpt_every = 20
    return o


def _labels_and_eval(c: ml_collections.ConfigDict) -> None:
    c.labels = ml_collections.ConfigDict()
    c.labels.k = 5  # answers sampled per RM prompt and ranked by the labeler (InstructGPT: K = 4..9)
    # Of the K answers, this many come from the pretrained model, the rest from the SFT policy (InstructGPT ranked
    # samples of several models): the RM then sees answers about the wrong number, which PPO otherwise finds and
    # exploits ("26 不是質數，因為它可以被 2 整除" scored high as an answer about 27).
    c.labels.pretrain_k = 1
    c.labels.eval_fraction = 0.1  # share of rankings held out for the RM's pairwise accuracy
    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 64  # answer budget when asking the held-out questions
    # Sampled (T = 1) metrics average this many independent answers per held-out question. With one, a seed's
    # balanced accuracy on 320 questions carries ~2.8 points of sampling noise (√(0.25/320)) and PPO − SFT ~4,
    # the size of the effects the table is there to show; four halve it for ~10 s more sampling per stage.
    c.eval.sampled_answers_per_question = 4


def _smoke(c: ml_collections.ConfigDict) -> None:
    """Seconds instead of minutes: tiny world, model and runs (the tests' shared pipeline)."""
    p, s, r, o = c.pretrain, c.sft, c.reward, c.ppo
    c.world.num_pretrain_docs = 2000
    c.world.num_sft_demos = 64
    c.world.num_sft_eval_demos = 16
    c.world.num_dialogues = 8
    c.world.num_rm_prompts = 32
    c.world.num_ppo_prompts = 32
    _model(p, 2, 32, 2, 512)
    p.train.steps, p.train.batch_size, p.train.eval_every, p.train.ckpt_every = 20, 8, 20, 20
    p.optim.warmup_steps = 2
    s.train.steps, s.train.batch_size, s.train.eval_every, s.train.ckpt_every = 6, 8, 6, 6
    # Batches divisible by the 8 fake CPU devices of the test environment, and enough RM prompts that the
    # barely trained SFT policy yields a batch of rankings with distinct gold scores.
    r.train.steps, r.train.batch_size, r.train.eval_every, r.train.ckpt_every = 6, 8, 6, 6
    c.world.num_rm_prompts = 512
    r.optim.warmup_steps = 1
    o.train.steps, o.ppo.rollout_batch_size, o.ppo.minibatch_size, o.ppo.ppo_epochs = 2, 16, 8, 1
    o.sampling.max_new_tokens = 16
    c.eval.max_new_tokens = 16
    c.eval.sampled_answers_per_question = 2


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
    if preset not in ("demo", "smoke"):
        raise ValueError(f"unknown chatgpt config {preset!r}; choose 'demo' or 'smoke'")
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds the world, every stage's init/data order and the evaluation samples
    c.world = _world()
    c.world.num_pretrain_docs = 30_000  # ~3.2M byte tokens: one pass in 800 steps of 32 x 128
    # Numbers 2..199 as in the first prototype (docs/references.md), not 499: a 0.8M-parameter model must learn
    # each number's facts in the CPU budget (greedy held-out accuracy: 0.59 after pretraining at 499, 0.64 at 299).
    # 55% of the primes >= 30 held out with as many composites, 4 phrasings x 2 languages: 320 questions.
    c.world.max_number = 199
    c.world.heldout_fraction = 0.55
    c.world.heldout_phrasings = 4
    c.world.num_rm_prompts = 768

    c.pretrain = _pretrain_config()
    c.sft = _sft_config()
    c.reward = _reward_config()
    c.ppo = _ppo_config()
    _labels_and_eval(c)
    if preset == "smoke":
        _smoke(c)
    return c
