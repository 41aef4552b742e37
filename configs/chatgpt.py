"""The built-in end-to-end demo: the seed world through all four stages on a CPU (``make demo``).

    python -m experiments.chatgpt --workdir=workdirs/demo [--config=configs/chatgpt.py:demo] [--seeds=0,1,2]

Sections: ``world`` (gptjax/seed_world/world.py SeedWorldConfig fields), one full stage config per stage
(``pretrain``/``sft``/``reward``/``ppo``: the same configs experiments.train runs alone, their paths filled in
by the pipeline), ``labels`` (sampling K answers per RM prompt for the simulated labeler) and ``eval``.
Presets: ``demo`` (``make demo``, 9-15 minutes on an idle 2-core CPU by CPU and hour, ~24 running two seeds at
once; its numbers are in docs/results.md) and ``smoke`` (seconds, for tests).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import pretrain, ppo, reward, sft
from gptjax.seed_world.config import SeedWorldConfig


def _world() -> ml_collections.ConfigDict:
    fields = {f.name: f.default for f in dataclasses.fields(SeedWorldConfig) if f.name != "seed"}
    return ml_collections.ConfigDict(fields)


def _model(c, layers: int, d_model: int, heads: int, max_len: int):
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.max_len = layers, d_model, heads, max_len


def _pretrain_config() -> ml_collections.ConfigDict:
    p = pretrain.base_config("tiny")
    # The world's own tokenizer (trained by the pipeline, path filled in): BPE pieces, and every number
    # 0..max_number one token, so the model learns each number's facts on one symbol it can copy whole.
    p.tokenizer.kind = "sentencepiece"
    p.data.source = "text_files"
    p.data.text_field = "text"
    p.data.val_fraction = 0.01
    _model(p, 4, 128, 4, 256)
    p.model.scan_layers = False  # 4 layers: unrolled runs ~25% faster on XLA:CPU and compiles in seconds
    p.train.seq_len = 128
    p.train.batch_size = 32
    # 1,200 steps (4.9M tokens): copying the asked number into the answer is learned late. After 600 steps the
    # policies gave the asked number ~0.3 (pretrained) and 0.48 (SFT) probability where the answer names it, on
    # held-out numbers, and ~42% of SFT's sampled answers were about another number; after 1,200: 0.61 and 0.62,
    # 23% (three seeds; evaluation.number_copy). 1,000 steps save ~75 s of the demo but copy worse (0.54 pretrained)
    # and PPO's held-out sampled answers end 6 points lower (docs/results.md, "Where the budget goes").
    p.train.steps = 1200
    p.optim.lr = 3e-3
    p.optim.warmup_steps = 60
    p.train.log_every = 100
    p.train.eval_every = 1200
    p.train.eval_batches = 4
    p.train.ckpt_every = 1200
    p.train.sample_prompts = ("大家都知道，27", "問：27 是不是質數？\n答：", "Q: Is 27 a prime number?\nA: ")
    p.train.sample_max_new_tokens = 24
    return p


# Fine-tuning stages leave the token embedding (and the tied output layer) as pretraining made it. Adam turns the
# tiny, consistent "not this token" gradient of every number never seen as a target into a full lr-sized step, so
# fine-tuning on training numbers moved the held-out numbers' embeddings 2.5x as far as the others' (0.30 vs 0.12
# of a norm of ~0.85, 100 SFT steps) and the SFT policy answered 81% of held-out questions about another number.
# The rows of tokens the pretraining corpus never contains (the chat role tokens; pieces only answers use, such as
# "Sorry", "Because", "Use") still train: the pipeline sets optim.trainable_token_ids to them. Pretraining left
# them one shared vector, and frozen so, SFT gave "Sorry" 0.003 where its demonstrations begin with it.
FROZEN = ("decoder/wte",)


def _sft_config() -> ml_collections.ConfigDict:
    s = sft.get_config()
    s.train.seq_len = 256  # several conversations packed per row; the longest dialogue is ~200 tokens
    s.train.batch_size = 8
    # 400 steps: ~5 passes over the demonstrations, as 250 were before the 768 dialogues made the SFT text 1.5x as
    # long; at 250 steps with them the single-turn answers lost what the dialogues gained (docs/results.md).
    s.train.steps = 400
    s.optim.lr = 1e-3
    s.optim.frozen = FROZEN
    s.train.log_every = 50
    s.train.eval_every = 400
    s.train.ckpt_every = 400
    s.train.sample_max_new_tokens = 32
    return s


def _reward_config() -> ml_collections.ConfigDict:
    r = reward.get_config()
    r.train.seq_len = 96  # the longest prompt (one earlier exchange and a question, ~45 tokens) and its answer
    # Six of ten rankings are pairs (a written flaw against the expert's answer) in elements of six slots: packed,
    # an element holds ~2 rankings, so 8 elements carry as many rankings as 16 unpacked ones at half the rows.
    r.data.pack = True
    r.train.batch_size = 8
    # 300 steps (~3 passes over the rankings). At 150 the training loss was still falling fast (0.26 -> 0.18 over
    # the last 50 steps) and the reward model lost paired tests it passes at 300 (three seeds: verdict-only pairs
    # on training primes 0.94 -> 1.00, held-out answer vs over-refusal 0.84 -> 0.90); PPO on it answered held-out
    # questions better (sampled 0.766 -> 0.785, "27" 0.73 -> 0.83 of 16 samples). At 450 the held-out rankings'
    # loss rose (0.29 -> 0.34, three seeds) and PPO gained nothing more (docs/results.md, "The reward model's steps").
    r.train.steps = 300
    r.optim.lr = 3e-4
    r.optim.warmup_steps = 10
    r.optim.frozen = FROZEN
    r.train.log_every = 50
    r.train.eval_every = 300
    r.train.ckpt_every = 300
    return r


def _ppo_config() -> ml_collections.ConfigDict:
    o = ppo.get_config()
    o.ppo.rollout_batch_size = 64
    o.ppo.minibatch_size = 32
    o.ppo.ppo_epochs = 2
    # λ = 1: the value model (the RM's weights) has never scored a partial answer, so with λ < 1 the early tokens'
    # advantages are mostly its noise; with λ = 1 the advantage is (return − value), unbiased whatever it says.
    o.ppo.lam = 1.0
    # β in units of the RM's score: drifting from SFT must buy a clear RM gain.
    o.ppo.kl_coef = 0.5
    o.sampling.max_prompt_len = 48  # every prompt of a batch is padded to this; multi-turn prompts are ~45 tokens
    o.sampling.max_new_tokens = 40
    # PPO clips almost no ratio at 1e-4, yet 2e-4 gained nothing held out and at 4e-4 the policies stopped refusing
    # harmful requests (0.83 -> 0.46, three seeds; docs/results.md).
    o.optim.lr = 1e-4
    o.optim.frozen = FROZEN
    o.train.steps = 40
    o.train.log_every = 10
    o.train.eval_every = 1000
    o.train.ckpt_every = 20
    return o


def _labels_and_eval(c: ml_collections.ConfigDict) -> None:
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.pieces = 2048  # SentencePiece vocabulary of the world's tokenizer, whole numbers included
    # With dummy_prefix every text is read with one leading space (tokenizers.train_sentencepiece), so an answer's
    # first word is the piece the corpus spells after a space ("Sorry", not "S" + "orry"). Three seeds with it: SFT
    # stays on the asked number more often (off topic 0.17 -> 0.11), but PPO lowered honesty and dialogue turns and
    # raised over-refusal (docs/results.md, "Answers that open with a corpus piece"). Off in the demo.
    c.tokenizer.dummy_prefix = False
    c.labels = ml_collections.ConfigDict()
    c.labels.k = 4  # answers sampled from the SFT policy per RM prompt and ranked by the labeler (InstructGPT: 4..9)
    # The labeler also writes two answers per prompt (the expert's and a flawed one of the kind the prompt invites),
    # so every ranking holds a pair that differs in what matters: SFT samples of one prompt are often alike.
    c.labels.written = True
    # ... and, for number questions, the same bare sentence with the true and with the false verdict (a minimal
    # pair: the verdict alone decides which ranks higher).
    c.labels.verdict_pair = True
    # With topic_pairs, also, as a ranking of its own, the expert's answer against the same answer about another
    # number of the same class (for numbers beyond the range: about an in-range piece). The reward model then
    # tells the asked number from another (held-out class means of three seeds: 0.62-0.70 -> 0.91-0.93 of such
    # pairs), its verdict pairs hold (held-out 0.93-0.98 -> 0.99-1.00), and PPO on it answered the held-out
    # dialogues' turns right more often (greedy 0.78 -> 0.83) and drifted less from SFT (KL 0.63 -> 0.54). With
    # the reward model's 150 steps of earlier recipes its verdict pairs got worse (docs/results.md).
    c.labels.topic_pairs = True
    # With special_pairs, also, as a ranking of its own, the honest answer to a special value against the expert's
    # answer about one of its integer pieces ("4662" -> "46 不是質數…", "-27" -> "27 不是質數…", labels.topic_pair).
    c.labels.special_pairs = True
    # What "I can't tell" earns, as a share of an aligned answer's score, about a number beyond the range whose last
    # digit shows a divisor (GoldOracle.cannot_tell_credit): at 0.5 the labelers rank the verdict the digit proves
    # above it; at 1 both honest answers tie, and only a hallucinated verdict ranks below them.
    c.labels.cannot_tell_credit = 0.5
    c.labels.eval_fraction = 0.1  # share of rankings held out for the RM's pairwise accuracy
    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 40  # answer budget when asking the held-out questions
    # Sampled (T = 1) metrics average this many independent answers per held-out question: one answer leaves a
    # seed's balanced accuracy ~3 points of sampling noise, four halve it.
    c.eval.sampled_answers_per_question = 4
    c.eval.showcase_samples = 16  # sampled answers to each showcase question ("27 是不是質數？")


def _smoke(c: ml_collections.ConfigDict) -> None:
    """Seconds instead of minutes: tiny world, model and runs (the tests' shared pipeline)."""
    p, s, r, o = c.pretrain, c.sft, c.reward, c.ppo
    c.world.num_pretrain_docs = 2000
    c.world.num_sft_demos = 64
    c.world.num_special_demos = 16
    c.world.num_harmful_demos = 8
    c.world.num_benign_demos = 8
    c.world.num_sft_eval_demos = 16
    c.world.num_dialogues = 8
    c.world.num_ppo_prompts = 32
    # Enough RM prompts that the barely trained SFT policy yields a batch of rankings with distinct gold scores.
    c.world.num_rm_prompts = 128
    c.tokenizer.pieces = 1024
    _model(p, 2, 32, 2, 256)
    p.data.val_fraction = 0.05  # ~100 validation documents: the batches the tests evaluate on
    p.train.steps, p.train.batch_size, p.train.eval_every, p.train.ckpt_every = 20, 8, 20, 20
    p.optim.warmup_steps = 2
    # Batches divisible by the 8 fake CPU devices of the test environment.
    s.train.steps, s.train.batch_size, s.train.eval_every, s.train.ckpt_every = 6, 8, 6, 6
    r.train.steps, r.train.batch_size, r.train.eval_every, r.train.ckpt_every = 6, 8, 6, 6
    r.optim.warmup_steps = 1
    o.train.steps, o.ppo.rollout_batch_size, o.ppo.minibatch_size, o.ppo.ppo_epochs = 2, 16, 8, 1
    o.sampling.max_new_tokens = 16
    # The smaller tokenizer spells the context prompts in more pieces, and the barely trained policy's answers run
    # to their budget: longer rows than the demo's.
    r.train.seq_len = 160
    o.sampling.max_prompt_len = 96
    c.eval.max_new_tokens = 16
    c.eval.sampled_answers_per_question = 2
    c.eval.showcase_samples = 2


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
    if preset not in ("demo", "smoke"):
        raise ValueError(f"unknown chatgpt config {preset!r}; choose 'demo' or 'smoke'")
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds the world, every stage's init/data order and the evaluation samples
    c.world = _world()  # every SeedWorldConfig field (gptjax/seed_world/config.py documents them)
    c.pretrain = _pretrain_config()
    c.sft = _sft_config()
    c.reward = _reward_config()
    c.ppo = _ppo_config()
    _labels_and_eval(c)
    if preset == "smoke":
        _smoke(c)
    return c
