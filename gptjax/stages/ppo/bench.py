"""How ``experiments.bench`` exercises PPO: one iteration as the shared RL loop runs it
(``stages/online/bench.py``), the experience program (rollout + policy/reference/value/reward scoring + GAE) and
the update program (clipped policy/value updates over the rollout batch, state donated) timed one after the other.

Rows: ``ppo-rollout`` (new tokens/s), ``ppo-update`` (trained tokens/s, MFU) and ``ppo`` (the whole iteration,
episode tokens/s, with the rollout's share of its time). ``ctx`` is the bench context (gptjax.tools.bench).
"""

from __future__ import annotations

from gptjax.stages.online import bench as online_bench
from gptjax.stages.ppo import loop as ppo_loop
from gptjax.stages.ppo import objective as ppo_lib


def bench(ctx) -> list:
    """Times ``warmup + repeats`` iterations (the first ``warmup`` untimed); medians per row."""
    p = ctx.c.ppo
    pcfg = ppo_lib.PPOConfig(rollout_batch_size=int(p.rollout_batch_size), minibatch_size=int(p.minibatch_size),
                             ppo_epochs=int(p.ppo_epochs), loss_chunk=int(p.loss_chunk))
    setup = {"rollout_batch_size": pcfg.rollout_batch_size, "minibatch_size": pcfg.minibatch_size,
             "ppo_epochs": pcfg.ppo_epochs}
    return online_bench.bench_iteration(
        ctx, "ppo", lambda policy, value: ppo_loop.algorithm(pcfg, policy, value),
        note="sampling + policy/reference/value/reward scoring + GAE", setup=setup)
