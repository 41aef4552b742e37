"""The benchmark's workloads and its entry point: every registered stage's ``bench`` hook, plus ``sample`` (the
KV-cache sampler) and ``loop`` (pretraining through ``run_training`` itself, host loop included)."""

from __future__ import annotations

import functools
import gc
import itertools
import statistics
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax import flops as flops_lib
from gptjax import sampling
from gptjax.errors import ConfigError
from gptjax.model import GPT
from gptjax.stages import registry
from gptjax.stages.pretrain import lm_loss
from gptjax.tools.bench.context import Context, cast_floats, describe, make_mesh, model_config
from gptjax.tools.bench.results import Result
from gptjax.train import loop

def bench_loop(ctx: Context) -> Result:
    """``pretrain`` as ``run_training`` runs it, in a throw-away workdir: ``warmup + repeats`` log intervals of
    ``loop_log_every`` steps; each timed interval's rate is the trainer's ``perf/tokens_per_s`` (measured between
    device completions; the first step, compilation included, is ``compile_s``)."""
    import tempfile

    from gptjax.train import metrics as metrics_lib

    c = ctx.c
    cfg = ctx.model_config()
    rows, T, accum = int(c.batch_size), int(c.seq_len), int(c.grad_accum_steps)
    every, warmup, repeats = int(c.loop_log_every), int(c.warmup), int(c.repeats)
    if every < 2 or repeats < 1:
        raise ConfigError(f"the loop workload needs loop_log_every >= 2 and repeats >= 1 (got {every}, {repeats})")
    rng = np.random.default_rng(c.seed)
    # A host iterator that costs nothing, the same few microbatches in turn: the loop is measured, not data.
    # (run_training checks that grad_accum_steps divides the batch.)
    batches = [ctx.lm_batch(rng, rows // accum, T, cfg.vocab_size, int(c.pretrain_segments)) for _ in range(4)]
    run_cfg = ml_collections.ConfigDict({"train": c.train.to_dict(), "optim": c.optim.to_dict(),
                                         "mesh": c.mesh.to_dict()})
    steps = every * (warmup + repeats)
    run_cfg.train.update(seed=int(c.seed), batch_size=rows, seq_len=T, steps=steps, log_every=every,
                         ckpt_every=steps, keep_ckpts=1)
    run_cfg.optim.grad_accum_steps = accum
    module = GPT(cfg)
    loss_fn = functools.partial(lm_loss, model=module, loss_chunk=int(c.loss_chunk))
    fpt = flops_lib.flops_per_token(cfg, T)
    with tempfile.TemporaryDirectory(prefix="gptjax_bench_loop_") as workdir:
        loop.run_training(run_cfg, workdir, model=module, loss_fn=loss_fn, train_iter=itertools.cycle(batches),
                          mesh=ctx.mesh, flops_per_token=fpt)
        records = [r for r in metrics_lib.read_metrics(workdir) if "train/loss" in r]
    first_s = records[0].get("perf/first_step_s")
    timed = [r for r in records if r.get("perf/tokens_per_s")][-repeats:]
    tokens = rows * T
    times = [tokens / r["perf/tokens_per_s"] for r in timed]  # seconds per step, one value per interval
    step_s = statistics.median(times)
    return ctx.result("loop", model=ctx.describe(cfg), batch=rows, seq_len=T, tokens_per_call=tokens,
                      step_s=step_s, step_s_all=times, tokens_per_s=tokens / step_s, flops_per_token=fpt,
                      mfu=ctx.mfu(tokens / step_s, fpt), peak_bytes=ctx.peak_bytes(), compile_s=first_s,
                      extra={"log_every": every, "intervals_timed": len(timed), "grad_accum_steps": accum,
                             "loss_chunk": int(c.loss_chunk), "segments": int(c.pretrain_segments),
                             "note": "run_training's host loop; step_s per interval; compile_s = first step"})


def bench_sample(ctx: Context) -> Result:
    c, s = ctx.c, ctx.c.sample
    cfg = ctx.model_config()
    B, prompt_len, N = int(s.batch_size), int(s.prompt_len), int(s.max_new_tokens)
    rng = np.random.default_rng(c.seed)
    module = GPT(cfg)
    with loop.mesh_context(ctx.mesh):
        params = ctx.init_params(module, prompt_len, jax.random.key(c.seed))
        if s.param_dtype:
            params = cast_floats(params, jnp.dtype(s.param_dtype))
        sampler = sampling.make_sampler(module, sampling.SamplingConfig(
            max_new_tokens=N, temperature=float(s.temperature), top_k=int(s.top_k), eos_id=None, pad_id=0,
            unroll_layers=bool(s.unroll_layers), decode_segments=int(s.decode_segments)))
        prompts, valid = (jnp.asarray(x) for x in ctx.prompts(rng, B, prompt_len, cfg.vocab_size))
        key = jax.random.key(c.seed + 1)
        compiled, compile_s = ctx.compile(sampler, params, prompts, valid, key)
    times = ctx.time("sample", lambda: compiled(params, prompts, valid, key))
    step_s = statistics.median(times)
    result = ctx.result("sample", model=ctx.describe(cfg) + (f" params:{s.param_dtype}" if
                                                                         s.param_dtype else ""),
                        batch=B, seq_len=prompt_len + N, tokens_per_call=B * N, step_s=step_s, step_s_all=times,
                        tokens_per_s=B * N / step_s, peak_bytes=ctx.peak_bytes(),
                        program_bytes=ctx.program_bytes(compiled), compile_s=compile_s,
                        extra={"prompt_len": prompt_len, "max_new_tokens": N, "ms_per_decode_step": 1e3 * step_s / N})
    del params, compiled
    gc.collect()
    return result


# The tool's own workloads (no stage): name -> function(ctx) -> Result.
TOOL_WORKLOADS = {"sample": bench_sample, "loop": bench_loop}


def workloads() -> list[str]:
    """Workload names: the stages that have a ``bench`` hook (registry order), then the tool's own."""
    return [s.name for s in registry.stages() if s.bench is not None] + list(TOOL_WORKLOADS)


def parse_workloads(text: str) -> list[str]:
    names = [w.strip() for w in str(text).split(",") if w.strip()]
    valid = workloads()
    bad = [w for w in names if w not in valid]
    if bad or not names:
        raise ConfigError(f"workloads {bad or text!r}: choose a comma-separated subset of {valid}")
    return names


def _measure(ctx: Context, name: str) -> list[Result]:
    if name in TOOL_WORKLOADS:
        return [TOOL_WORKLOADS[name](ctx)]
    rows = registry.get(name).bench(ctx)
    gc.collect()
    return rows


def run(c, workloads: Sequence[str] | str | None = None, *, label: str = "",
        on_result: Callable[[Result], None] | None = None, profile_dir: str | None = None) -> list[Result]:
    """Benchmark ``workloads`` (default: the config's) of bench config ``c``; ``on_result`` sees each row as it
    is measured. A workload that fails (e.g. out of memory) gives a row whose status says why; the others run.
    With ``profile_dir``, each workload's row gets ``extra["top_ops"]``: the device ops of one more traced call
    (``device_op_times``), after the timed ones."""
    names = parse_workloads(workloads if isinstance(workloads, str) else ",".join(workloads or []) or c.workloads)
    mesh = make_mesh(c)
    ctx = Context(c=c, mesh=mesh, devices=list(mesh.devices.flat), label=label, profile_dir=profile_dir)
    results: list[Result] = []
    for name in names:
        try:
            rows = _measure(ctx, name)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - an OOM or compiler error must not lose the other rows
            message = " ".join(str(e).split())[:300]
            rows = [ctx.result(name, status=f"error: {type(e).__name__}: {message}",
                               model=describe(model_config(c), c.model.preset), batch=0, seq_len=0,
                               tokens_per_call=0)]
            gc.collect()
        for r in rows:
            ops = ctx.profiles.get(r.workload)
            if ops is not None:
                r.extra = {**(r.extra or {}), "top_ops": ops}
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results
