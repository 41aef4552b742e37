"""How ``experiments.bench`` exercises an online RL stage: one iteration as ``run_rl`` runs it (``make_iteration``),
the experience program (rollout + scoring by a reward model + advantages) and the update program (state donated)
timed one after the other.

Rows ``<name>-rollout`` (new tokens/s), ``<name>-update`` (trained tokens/s, MFU) and ``<name>`` (the whole
iteration, episode tokens/s, with the rollout's share of its time). The shapes are the bench config's ``ppo``
section (rollout batch, minibatch, epochs, prompt and response lengths), shared by every RL stage so their rows
compare; ``ctx`` is the bench context (gptjax.tools.bench).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import flops, sampling, sharding
from gptjax.model import GPT, ScoreModel
from gptjax.stages.online import loop as online
from gptjax.stages.online.algorithm import Algorithm
from gptjax.train import loop


def _programs(ctx, make_algorithm: Callable[[GPT, ScoreModel], Algorithm]):
    """(algorithm, compiled experience, compiled update, their compile seconds, arguments of a call, state, batch,
    key)."""
    c, p = ctx.c, ctx.c.ppo
    cfg = ctx.model_config()
    prompt_len, N = int(p.prompt_len), int(p.max_new_tokens)
    T = prompt_len + N
    policy, value, reward = GPT(cfg), ScoreModel(cfg, zero_init_head=True), ScoreModel(cfg)
    algo = make_algorithm(policy, value)
    sharding.check_batch_divisible(algo.minibatch_size, ctx.mesh, field="ppo.minibatch_size")
    scfg = sampling.SamplingConfig(max_new_tokens=N, temperature=algo.temperature, eos_id=None, pad_id=0,
                                   unroll_layers=bool(c.sample.unroll_layers),
                                   decode_segments=int(c.sample.decode_segments))
    B = algo.rollout_batch_size
    rng = np.random.default_rng(c.seed)
    keys = jax.random.split(jax.random.key(c.seed), 5)
    with loop.mesh_context(ctx.mesh):
        policy_params = ctx.init_params(policy, T, keys[0])
        value_params = ctx.init_params(value, T, keys[1]) if algo.has_value else None
        reward_params = ctx.init_params(reward, T, keys[2])
        ref_params = jax.tree.map(jnp.copy, policy_params)
        iteration = online.make_iteration(algo, policy, value if algo.has_value else None, reward, scfg, c.optim,
                                          ctx.schedule_steps, policy_params, value_params)
        state = iteration.init_state(policy_params, value_params, jax.random.key_data(keys[3]))
        prompts, valid = (jnp.asarray(x) for x in ctx.prompts(rng, B // algo.samples_per_prompt, prompt_len,
                                                               cfg.vocab_size))
        prompts, valid = (jnp.repeat(x, algo.samples_per_prompt, axis=0) for x in (prompts, valid))

        def args(s):
            return (s.policy_params, ref_params, s.value_params, reward_params, prompts, valid, keys[4],
                    s.kl.kl_coef)

        compiled_exp, compile_exp_s = ctx.compile(iteration.experience, *args(state))
        batch, _ = compiled_exp(*args(state))
        compiled_upd, compile_upd_s = ctx.compile(iteration.update, state, batch, None, keys[4])
    return algo, (compiled_exp, compiled_upd), (compile_exp_s, compile_upd_s), args, state, batch, keys[4]


def bench_iteration(ctx, name: str, make_algorithm: Callable[[GPT, ScoreModel], Algorithm], *, note: str,
                    setup: dict) -> list:
    """Times ``warmup + repeats`` iterations (the first ``warmup`` untimed); medians per row. ``setup`` goes in
    every row's extra."""
    c = ctx.c
    cfg = ctx.model_config()
    algo, (compiled_exp, compiled_upd), (compile_exp_s, compile_upd_s), args, state, batch, key = _programs(
        ctx, make_algorithm)
    roll_times, upd_times = [], []
    for i in range(int(c.warmup) + int(c.repeats)):
        start = time.perf_counter()
        batch, roll_metrics = compiled_exp(*args(state))
        jax.block_until_ready((batch, roll_metrics))
        mid = time.perf_counter()
        state, upd_metrics = compiled_upd(state, batch, None, key)
        jax.block_until_ready((state, upd_metrics))
        end = time.perf_counter()
        if i >= int(c.warmup):
            roll_times.append(mid - start)
            upd_times.append(end - mid)
    ctx.trace(f"{name}-rollout", lambda: compiled_exp(*args(state)))

    def update_once():
        nonlocal state
        state, metrics = compiled_upd(state, batch, None, key)
        return state, metrics

    ctx.trace(f"{name}-update", update_once)
    B, prompt_len, N = algo.rollout_batch_size, int(c.ppo.prompt_len), int(c.ppo.max_new_tokens)
    T = prompt_len + N
    iter_times = [a + b for a, b in zip(roll_times, upd_times)]
    shares = [a / (a + b) for a, b in zip(roll_times, upd_times)]
    roll_s, upd_s, iter_s = (statistics.median(x) for x in (roll_times, upd_times, iter_times))
    update_tokens = algo.epochs * B * T
    update_fpt = flops.flops_per_token(cfg, T) + algo.has_value * flops.score_flops_per_token(cfg, T)
    common = dict(model=ctx.describe(cfg), batch=B, seq_len=T, peak_bytes=ctx.peak_bytes())
    setup = {**setup, "prompt_len": prompt_len, "max_new_tokens": N, "loss_chunk": algo.loss_chunk}
    return [
        ctx.result(f"{name}-rollout", tokens_per_call=B * N, step_s=roll_s, step_s_all=roll_times,
                   tokens_per_s=B * N / roll_s, program_bytes=ctx.program_bytes(compiled_exp),
                   compile_s=compile_exp_s, extra={**setup, "note": note}, **common),
        ctx.result(f"{name}-update", tokens_per_call=update_tokens, step_s=upd_s, step_s_all=upd_times,
                   tokens_per_s=update_tokens / upd_s, flops_per_token=update_fpt,
                   mfu=ctx.mfu(update_tokens / upd_s, update_fpt),
                   program_bytes=ctx.program_bytes(compiled_upd), compile_s=compile_upd_s, extra=setup, **common),
        ctx.result(name, tokens_per_call=B * T, step_s=iter_s, step_s_all=iter_times, tokens_per_s=B * T / iter_s,
                   compile_s=compile_exp_s + compile_upd_s,
                   extra={**setup, "rollout_share": statistics.median(shares), "rollout_s": roll_s,
                          "update_s": upd_s, "note": "episode tokens (prompt + response) per second"}, **common),
    ]
