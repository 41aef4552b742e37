"""Stage-3 comparison config: ``python -m experiments.compare --config=configs/compare.py:<preset>``.

Presets: ``default`` (``make compare``: the demo pipeline's SFT run and reward model, every method at the same
budget, 3 seeds; sized for ≤ 45 minutes on a 2-core CPU including the pipeline) and ``smoke`` (the smoke pipeline,
one seed, a few iterations: for tests). The harness is gptjax/seed_world/compare.py.

Each entry of ``methods`` is a full stage config (the one ``experiments.train`` would run), built here from the
stage's own config file; the harness fills in the pipeline's runs and files where a string field holds a
placeholder: ``{sft}``, ``{reward}`` (the runs), ``{prompts}`` (the RL prompts), ``{rankings_train}``,
``{rankings_eval}`` (the labelled comparisons the reward model learned from), and sets ``train.seed``.

Budgets. The sampling methods (PPO, GRPO, RLOO, rejection sampling) all sample ``budget.episodes`` responses of at
most ``sampling.max_new_tokens`` tokens: RL runs ``episodes / rollout_batch_size`` iterations, rejection sampling
``rounds × prompts_per_round × samples_per_prompt`` answers. The methods that learn from the reward model (PPO,
GRPO, RLOO, rejection sampling) and DPO, which learns from the same comparisons directly, all use the pipeline's
labelled comparisons and nothing else; the ``-gold`` variants use the gold labeler as their reward instead (no
comparisons). The report counts the tokens each run actually generated.
"""

from __future__ import annotations

import ml_collections

from configs import chatgpt, dpo, grpo, rloo, rs

# The gold labeler as a reward function (every kind of prompt record the seed world writes).
GOLD_REWARD = "gptjax.seed_world.rewards:gold_reward"


# The smoke preset's answer budget for every sampling method: the barely trained smoke SFT policy ends only ~6% of
# its answers within 16 tokens (a rejection-sampling round needs at least one that does), ~25% within 48.
SMOKE_NEW_TOKENS = 48


def _rl_common(c, pipeline, steps: int, points: int) -> None:
    """The pipeline's sampling and optimiser settings, the comparison's iterations and checkpoints."""
    c.sampling.max_prompt_len = int(pipeline.ppo.sampling.max_prompt_len)
    c.sampling.max_new_tokens = int(pipeline.ppo.sampling.max_new_tokens)
    c.train.init_from, c.data.prompts_path = "{sft}", "{prompts}"
    c.train.steps = steps
    c.train.log_every = max(1, steps // 4)
    c.train.ckpt_every = max(1, -(-steps // points))
    c.train.keep_ckpts = 0
    c.train.eval_every = 10 ** 6


def _ppo(pipeline, steps, points):
    c = pipeline.ppo.copy_and_resolve_references()  # the demo's PPO (β 0.5, λ 1, lr 1e-4, 2 epochs of 2 minibatches)
    _rl_common(c, pipeline, steps, points)
    c.ppo_init.reward_from = "{reward}"
    return c


def _grpo(pipeline, steps, points):
    c = grpo.get_config()
    _rl_common(c, pipeline, steps, points)
    c.reward.model_from = "{reward}"
    g = c.grpo
    g.rollout_batch_size, g.minibatch_size, g.epochs = pipeline.ppo.ppo.rollout_batch_size, 32, 2
    g.group_size = 8
    g.kl_coef = 0.04
    c.optim.lr = 5e-5
    return c


def _rloo(pipeline, steps, points):
    c = rloo.get_config()
    _rl_common(c, pipeline, steps, points)
    c.reward.model_from = "{reward}"
    r = c.rloo
    r.rollout_batch_size, r.minibatch_size, r.epochs = pipeline.ppo.ppo.rollout_batch_size, 32, 2
    r.k, r.kl_coef, r.loss = 4, 0.1, "clipped"
    c.optim.lr = 5e-5
    return c


def _gold(c):
    c = c.copy_and_resolve_references()
    c.reward.source, c.reward.function = "function", GOLD_REWARD
    return c


def _dpo(pipeline, steps, points):
    c = dpo.get_config()
    c.train.init_from = "{sft}"
    c.data.train_path, c.data.eval_path, c.data.prompts_path = "{rankings_train}", "{rankings_eval}", "{prompts}"
    c.train.seq_len = int(pipeline.reward.train.seq_len)
    c.train.batch_size = 16
    c.train.steps = steps
    c.train.log_every = max(1, steps // 4)
    c.train.eval_every = steps
    c.train.ckpt_every = max(1, -(-steps // points))
    c.train.keep_ckpts = 0
    c.dpo.beta = 0.1
    c.optim.lr = 5e-5
    c.optim.warmup_steps = 5
    return c


def _rs(pipeline, episodes: int, rounds: int):
    c = rs.get_config()
    c.train.init_from, c.reward.model_from, c.data.prompts_path = "{sft}", "{reward}", "{prompts}"
    c.sampling.max_prompt_len = int(pipeline.ppo.sampling.max_prompt_len)
    c.sampling.max_new_tokens = int(pipeline.ppo.sampling.max_new_tokens)
    c.rs.rounds, c.rs.samples_per_prompt = rounds, 4
    c.rs.prompts_per_round = episodes // (rounds * c.rs.samples_per_prompt)
    c.train.seq_len = int(pipeline.sft.train.seq_len)
    c.train.batch_size = int(pipeline.sft.train.batch_size)
    c.train.steps = 20
    c.train.log_every = 10
    c.train.ckpt_every = 20
    c.optim.lr = 1e-4
    return c


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    if preset not in ("default", "smoke"):
        raise ValueError(f"unknown compare config {preset!r}; choose 'default' or 'smoke'")
    c = ml_collections.ConfigDict()
    # The seed-world pipeline run when --workdir holds no finished one (WORKDIR/results.json).
    c.pipeline = pipeline = chatgpt.get_config("demo" if preset == "default" else "smoke")
    c.seeds = (0, 1, 2)  # every method runs once per seed (train.seed); the pipeline's runs are shared
    c.budget = ml_collections.ConfigDict()
    c.budget.episodes = 1280  # responses sampled by each sampling method (20 RL iterations of 64)
    c.budget.points = 3  # checkpoints per run evaluated for the curves (the last is the final one)
    c.eval = ml_collections.ConfigDict()
    c.eval.sampled_answers_per_question = 2  # T = 1 answers per held-out question for the final gold metrics
    c.eval.curve_seeds = 1  # seeds whose intermediate checkpoints are evaluated too (one answer per question)
    c.eval.num_questions = 0  # held-out "is n prime?" questions asked, evenly spread over the numbers; 0 = all
    c.eval.num_specials = 0  # held-out special questions (honesty) asked, evenly spread; 0 = all. Every held-out
    # request (harmlessness) is asked.
    c.reference_method = "ppo"  # the table's Δ column and the "within 2 points" check compare with it
    c.gaps = (("ppo", "ppo-gold"), ("grpo", "grpo-gold"), ("rloo", "rloo-gold"))  # (learned RM, gold reward)
    if preset == "smoke":
        c.seeds = (0,)
        c.budget.episodes = 32
        c.budget.points = 2
        c.eval.sampled_answers_per_question = 1
        c.eval.num_questions = 32  # with 32 specials and the 26 requests: one evaluation batch of 128
        c.eval.num_specials = 32
    rollout = int(pipeline.ppo.ppo.rollout_batch_size) if preset == "default" else 16
    steps, points = c.budget.episodes // rollout, int(c.budget.points)
    c.order = ("ppo", "grpo", "rloo", "ppo-gold", "grpo-gold", "rloo-gold", "dpo", "rs")  # the methods run, in order
    c.methods = ml_collections.ConfigDict()
    c.methods.ppo = _ppo(pipeline, steps, points)
    c.methods.grpo = _grpo(pipeline, steps, points)
    c.methods.rloo = _rloo(pipeline, steps, points)
    c.methods["ppo-gold"] = _gold(c.methods.ppo)
    c.methods["grpo-gold"] = _gold(c.methods.grpo)
    c.methods["rloo-gold"] = _gold(c.methods.rloo)
    c.methods.dpo = _dpo(pipeline, 60 if preset == "default" else 2, points)
    c.methods.rs = _rs(pipeline, int(c.budget.episodes), 2 if preset == "default" else 1)
    if preset == "smoke":
        for name in ("ppo", "grpo", "rloo", "ppo-gold", "grpo-gold", "rloo-gold"):
            m = c.methods[name]
            section = m[m.stage]
            section.rollout_batch_size, section.minibatch_size = rollout, 8
            m.sampling.max_new_tokens = SMOKE_NEW_TOKENS
        c.methods.grpo.grpo.group_size = c.methods["grpo-gold"].grpo.group_size = 4
        c.methods.rs.sampling.max_new_tokens = SMOKE_NEW_TOKENS  # one round of 32 answers (8 prompts × 4)
        c.methods.rs.train.steps, c.methods.rs.train.ckpt_every = 2, 2  # per round
        c.methods.dpo.train.batch_size = 8
        c.methods.dpo.optim.warmup_steps = 0
    return c
