"""How ``experiments.bench`` exercises PPO: one iteration as ``run_ppo`` runs it (``loop.make_iteration``), the
experience program (rollout + policy/reference/value/reward scoring + GAE) and the update program (clipped
policy/value updates over the rollout batch, state donated) timed one after the other.

Rows: ``ppo-rollout`` (new tokens/s), ``ppo-update`` (trained tokens/s, MFU) and ``ppo`` (the whole iteration,
episode tokens/s, with the rollout's share of its time). ``ctx`` is the bench context (gptjax.tools.bench).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import flops, sampling, sharding
from gptjax.model import GPT, ScoreModel
from gptjax.stages.ppo import loop as ppo_loop
from gptjax.stages.ppo import objective as ppo_lib
from gptjax.train import loop


def _programs(ctx):
    """(pcfg, compiled experience, compiled update, their compile seconds, arguments of a call, state)."""
    c, p = ctx.c, ctx.c.ppo
    cfg = ctx.model_config()
    B, prompt_len, N = int(p.rollout_batch_size), int(p.prompt_len), int(p.max_new_tokens)
    T = prompt_len + N
    pcfg = ppo_lib.PPOConfig(rollout_batch_size=B, minibatch_size=int(p.minibatch_size),
                             ppo_epochs=int(p.ppo_epochs), loss_chunk=int(p.loss_chunk))
    sharding.check_batch_divisible(pcfg.minibatch_size, ctx.mesh, field="ppo.minibatch_size")
    scfg = sampling.SamplingConfig(max_new_tokens=N, temperature=pcfg.temperature, eos_id=None, pad_id=0,
                                   unroll_layers=bool(c.sample.unroll_layers),
                                   decode_segments=int(c.sample.decode_segments))
    policy, value, reward = GPT(cfg), ScoreModel(cfg, zero_init_head=True), ScoreModel(cfg)
    rng = np.random.default_rng(c.seed)
    keys = jax.random.split(jax.random.key(c.seed), 5)
    with loop.mesh_context(ctx.mesh):
        policy_params = ctx.init_params(policy, T, keys[0])
        value_params = ctx.init_params(value, T, keys[1])
        reward_params = ctx.init_params(reward, T, keys[2])
        ref_params = jax.tree.map(jnp.copy, policy_params)
        iteration = ppo_loop.make_iteration(policy, value, reward, scfg, pcfg, c.optim, ctx.schedule_steps,
                                            policy_params, value_params)
        state = iteration.init_state(policy_params, value_params, jax.random.key_data(keys[3]))
        prompts, valid = (jnp.asarray(x) for x in ctx.prompts(rng, B, prompt_len, cfg.vocab_size))

        def args(s):
            return (s.policy_params, ref_params, s.value_params, reward_params, prompts, valid, keys[4],
                    s.kl.kl_coef)

        compiled_exp, compile_exp_s = ctx.compile(iteration.experience, *args(state))
        batch, _ = compiled_exp(*args(state))
        compiled_upd, compile_upd_s = ctx.compile(iteration.update, state, batch, None, keys[4])
    return pcfg, (compiled_exp, compiled_upd), (compile_exp_s, compile_upd_s), args, state, batch, keys[4]


def bench(ctx) -> list:
    """Times ``warmup + repeats`` iterations (the first ``warmup`` untimed); medians per row."""
    c = ctx.c
    cfg = ctx.model_config()
    pcfg, (compiled_exp, compiled_upd), (compile_exp_s, compile_upd_s), args, state, batch, key = _programs(ctx)
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
    ctx.trace("ppo-rollout", lambda: compiled_exp(*args(state)))

    def update_once():
        nonlocal state
        state, metrics = compiled_upd(state, batch, None, key)
        return state, metrics

    ctx.trace("ppo-update", update_once)
    B, prompt_len, N = pcfg.rollout_batch_size, int(c.ppo.prompt_len), int(c.ppo.max_new_tokens)
    T = prompt_len + N
    iter_times = [a + b for a, b in zip(roll_times, upd_times)]
    shares = [a / (a + b) for a, b in zip(roll_times, upd_times)]
    roll_s, upd_s, iter_s = (statistics.median(x) for x in (roll_times, upd_times, iter_times))
    update_tokens = pcfg.ppo_epochs * B * T
    update_fpt = flops.flops_per_token(cfg, T) + flops.score_flops_per_token(cfg, T)  # policy + value model
    common = dict(model=ctx.describe(cfg), batch=B, seq_len=T, peak_bytes=ctx.peak_bytes())
    setup = {"rollout_batch_size": B, "minibatch_size": pcfg.minibatch_size, "ppo_epochs": pcfg.ppo_epochs,
             "prompt_len": prompt_len, "max_new_tokens": N, "loss_chunk": pcfg.loss_chunk}
    return [
        ctx.result("ppo-rollout", tokens_per_call=B * N, step_s=roll_s, step_s_all=roll_times,
                   tokens_per_s=B * N / roll_s, program_bytes=ctx.program_bytes(compiled_exp),
                   compile_s=compile_exp_s,
                   extra={**setup, "note": "sampling + policy/reference/value/reward scoring + GAE"}, **common),
        ctx.result("ppo-update", tokens_per_call=update_tokens, step_s=upd_s, step_s_all=upd_times,
                   tokens_per_s=update_tokens / upd_s, flops_per_token=update_fpt,
                   mfu=ctx.mfu(update_tokens / upd_s, update_fpt),
                   program_bytes=ctx.program_bytes(compiled_upd), compile_s=compile_upd_s, extra=setup, **common),
        ctx.result("ppo", tokens_per_call=B * T, step_s=iter_s, step_s_all=iter_times, tokens_per_s=B * T / iter_s,
                   compile_s=compile_exp_s + compile_upd_s,
                   extra={**setup, "rollout_share": statistics.median(shares), "rollout_s": roll_s,
                          "update_s": upd_s, "note": "episode tokens (prompt + response) per second"}, **common),
    ]
