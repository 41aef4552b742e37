"""Over-optimisation study config: ``python -m experiments.overopt --config=configs/overopt.py:<preset>``.

Presets: ``default`` (``make overopt``: the demo pipeline's workdir, three proxy sizes, best-of-N up to 256, PPO
against each proxy; sized for ≤ 40 minutes on a 2-core CPU including the pipeline when it has not been run) and
``smoke`` (seconds on the smoke pipeline, for tests). The study itself is gptjax/seed_world/overopt.py.
Every field can be overridden, e.g. ``--config.proxies=S:1x32x2,L:4x128x4 --config.rl.steps=40``.
"""

from __future__ import annotations

import ml_collections

from configs import chatgpt


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    if preset not in ("default", "smoke"):
        raise ValueError(f"unknown overopt config {preset!r}; choose 'default' or 'smoke'")
    c = ml_collections.ConfigDict()
    # The seed-world pipeline run (pretrain, SFT, labels, ...) when --workdir holds no finished one
    # (WORKDIR/results.json); a finished workdir is reused as it is, with the configs stored in its stage runs.
    c.pipeline = chatgpt.get_config("demo" if preset == "default" else "smoke")
    c.seed = 0  # sampling seed of best-of-N and of the PPO evaluations
    # Proxy reward models, "name:LAYERSxD_MODELxHEADS" comma-separated. Each decoder is pretrained on the seed-world
    # corpus with the pipeline's recipe (a proxy of the pipeline's size reuses its pretraining run), then trained on
    # the pipeline's comparisons with its RM recipe. The default spans 1×32 to 4×128 (12k to 790k non-embedding
    # parameters); the 4×128 proxy has the policy's size.
    c.proxies = "S:1x32x2,M:2x64x4,L:4x128x4"
    c.proxy_pretrain_steps = 0  # 0: the pipeline's pretraining steps (the same token budget for every size)
    c.rm_steps = 0  # 0: the pipeline's reward-model steps
    c.rm_lr = 0.0  # 0: the pipeline's reward-model learning rate
    c.max_new_tokens = 0  # answer budget when sampling; 0: the pipeline's PPO sampling.max_new_tokens

    c.bon = ml_collections.ConfigDict()
    c.bon.num_prompts = 48  # held-out questions, evenly spread over the held-out numbers
    # SFT answers sampled per question; best-of-N for N <= this is computed from them without bias (Gao et al.)
    c.bon.samples_per_prompt = 256
    c.bon.n_values = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    c.bon.batch_size = 256  # rows per sampling / scoring call

    c.rl = ml_collections.ConfigDict()
    c.rl.steps = 60  # PPO iterations against each proxy
    c.rl.eval_every = 5  # iterations between evaluations (and checkpoints)
    c.rl.eval_prompts = 128  # held-out questions asked at each evaluation (one sampled answer each)
    # No KL penalty: the policy is free to drift, and KL is measured rather than constrained (Gao et al. run RL
    # mostly without one, and find a penalty acts much like early stopping).
    c.rl.kl_coef = 0.0
    # Well above an earlier pipeline PPO lr of 3e-5 (where β = 0.05 let PPO reach ~8 nats in 100 iterations and
    # exploit the RM), so that 60 unpenalised iterations go well past the point where gold reward turns down.
    c.rl.lr = 5e-5
    c.rl.rollout_batch_size = 0  # 0: the pipeline's
    c.rl.minibatch_size = 0  # 0: the pipeline's

    if preset == "smoke":
        c.proxies = "S:1x16x2,M:2x32x2"  # M has the smoke pipeline's size and reuses its pretraining run
        c.proxy_pretrain_steps = 0
        c.bon.num_prompts = 4
        c.bon.samples_per_prompt = 8
        c.bon.n_values = (1, 2, 4, 8)
        c.bon.batch_size = 32
        c.rl.steps = 2
        c.rl.eval_every = 1
        c.rl.eval_prompts = 8
        c.rl.lr = 1e-3
    return c
