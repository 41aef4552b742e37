"""The bench context: what a workload (and each stage's ``bench`` hook) measures with.

A stage's hook gets a ``Context`` and returns result rows. The context holds the bench config (``ctx.c``), the
mesh and its devices, and offers: the config's model (``model_config``, ``describe``), parameters and compiled
programs made the bench's way (``init_params``, ``compile``: fast compile options in smoke runs), synthetic
batches of each format (``lm_batch``, ``ranking_batch``, ``prompts``), timing and tracing (``time``, ``trace``),
memory (``program_bytes``, ``peak_bytes``), MFU and the result row itself (``result``, with the config's target).
``train_step`` measures one optimizer step of the shared trainer for a stage that trains with it, trying batch
candidates until the compiled program fits the device.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import statistics
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import flops as flops_lib
from gptjax import sampling
from gptjax import sharding as sharding_lib
from gptjax.errors import ConfigError
from gptjax.model import REMAT_POLICIES, GPTConfig
from gptjax.presets import preset_config
from gptjax.tools.bench import timing
from gptjax.tools.bench.results import Result, apply_target
from gptjax.tools.bench.table import format_bytes
from gptjax.train import loop
from gptjax.train import state as state_lib
from gptjax.train.optim import make_optimizer

# A program "fits" when it needs at most this share of the device's memory (the rest: allocator fragmentation).
FIT_FRACTION = 0.97
# The optimizer's schedule length: any value works (the lr does not change the step's cost).
SCHEDULE_STEPS = 1000


# --- configs -> models and data ---------------------------------------------------------------------------------

def model_config(c) -> GPTConfig:
    """The bench config's GPTConfig: its preset with every non-None ``model.*`` override."""
    overrides = {k: v for k, v in c.model.items() if k != "preset" and v is not None}
    return preset_config(c.model.preset, **overrides)


def describe(cfg: GPTConfig, preset: str) -> str:
    text = f"{preset} {cfg.num_layers}L d{cfg.d_model}"
    if cfg.dtype != "float32":
        text += f" {'bf16' if cfg.dtype == 'bfloat16' else cfg.dtype}"
    if cfg.matmul_dtype:
        text += f" matmul:{'bf16' if cfg.matmul_dtype == 'bfloat16' else cfg.matmul_dtype}"
    if cfg.remat != "none":
        text += f" remat:{cfg.remat}"
    return text


def make_mesh(c):
    shape = tuple(int(s) for s in c.mesh.shape)
    n = math.prod(shape) if -1 not in shape else jax.device_count()
    if n > jax.device_count():
        raise ConfigError(f"mesh.shape={shape} needs {n} devices; {jax.device_count()} are available")
    return sharding_lib.make_mesh(shape, devices=jax.devices()[:n])


def model_mfu(tokens_per_s: float, flops_per_token: float, devices: Sequence) -> float | None:
    """MFU of ``tokens_per_s`` (all devices together) against the summed dense bf16 peak of ``devices``
    (``flops.PEAK_FLOPS`` by device kind); None when a peak is unknown (CPU, unlisted devices)."""
    peaks = [flops_lib.device_peak_flops(d) for d in devices]
    if not peaks or any(p is None for p in peaks):
        return None
    return flops_lib.mfu(tokens_per_s, flops_per_token, sum(peaks))


def batch_candidates(c, cfg: GPTConfig) -> list[tuple[int, str]]:
    """(rows, remat) to try in turn, from ``batch_candidates`` ("8:none,4:full"), else the config's batch."""
    if not c.batch_candidates:
        return [(int(c.batch_size), cfg.remat)]
    out = []
    for item in str(c.batch_candidates).split(","):
        batch, _, remat = item.strip().partition(":")
        remat = remat or cfg.remat
        if not batch.isdigit() or int(batch) < 1 or remat not in REMAT_POLICIES:
            raise ConfigError(f"batch_candidates entry {item!r} must be 'B:remat' with B a positive integer and "
                              f"remat one of {list(REMAT_POLICIES)}")
        out.append((int(batch), remat))
    return out


def lm_batch(rng: np.random.Generator, rows: int, seq_len: int, vocab: int, segments: int,
             sft_weights: bool = False) -> dict[str, np.ndarray]:
    """A synthetic LM batch (``batches.LM_BATCH``). ``segments`` > 0 packs that many equal documents per row
    (segment ids, positions restarting); ``sft_weights`` puts the loss on the second half of each document."""
    tokens = rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((rows, seq_len), np.float32)}
    if segments:
        doc_len = max(seq_len // segments, 1)
        t = np.arange(seq_len)
        segment_T = np.minimum(t // doc_len, segments - 1)
        position_T = t - segment_T * doc_len
        batch["segment_ids"] = np.broadcast_to(segment_T + 1, (rows, seq_len)).astype(np.int32)
        batch["positions"] = np.broadcast_to(position_T, (rows, seq_len)).astype(np.int32)
        if sft_weights:
            batch["weights"] = np.broadcast_to(position_T >= doc_len // 2, (rows, seq_len)).astype(np.float32)
    return batch


def ranking_batch(rng: np.random.Generator, prompts: int, k: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    """K right-padded responses per prompt, lengths in [T/2, T], all ranked (``batches.RANKING_BATCH``)."""
    tokens = rng.integers(0, vocab, (prompts, k, seq_len), dtype=np.int32)
    lengths = rng.integers(seq_len // 2, seq_len + 1, (prompts, k))
    valid = np.arange(seq_len)[None, None, :] < lengths[..., None]
    return {"tokens": tokens, "valid": valid, "num_ranked": np.full((prompts,), k, np.int32)}


def left_padded_prompts(rng: np.random.Generator, rows: int, length: int, vocab: int):
    """Prompts of [length/2, length] real tokens, left-padded to ``length`` (pad id 0)."""
    lengths = rng.integers(max(length // 2, 1), length + 1, rows)
    ids = rng.integers(1, vocab, (rows, length))
    return sampling.left_pad([row[length - n:] for row, n in zip(ids, lengths)], 0, length=length)


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_params(module, seq_len: int, key, fast: bool):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    compiled, _ = timing.compile_program(jax.jit(lambda k: module.init({"params": k}, tokens)["params"]), key,
                                         fast=fast)
    return nn.unbox(compiled(key))


def _stack_micro(batch: dict, accum: int) -> dict:
    """(rows, ...) -> (accum, rows / accum, ...): the trainer's stacked microbatches."""
    return {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in batch.items()}


# --- the context --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    c: Any  # the bench config
    mesh: Any
    devices: list
    label: str
    profile_dir: str | None = None  # trace one extra call of each workload here (jax.profiler)
    profiles: dict = dataclasses.field(default_factory=dict)  # workload -> device_op_times of that trace
    schedule_steps: int = SCHEDULE_STEPS

    def model_config(self) -> GPTConfig:
        return model_config(self.c)

    def describe(self, cfg: GPTConfig) -> str:
        return describe(cfg, self.c.model.preset)

    def batch_candidates(self) -> list[tuple[int, str]]:
        return batch_candidates(self.c, self.model_config())

    def init_params(self, module, seq_len: int, key):
        return init_params(module, seq_len, key, bool(self.c.fast_compile))

    def compile(self, jitted, *args):
        """(compiled program, seconds spent tracing, lowering and compiling it)."""
        return timing.compile_program(jitted, *args, fast=bool(self.c.fast_compile))

    lm_batch = staticmethod(lm_batch)
    ranking_batch = staticmethod(ranking_batch)
    prompts = staticmethod(left_padded_prompts)

    def program_bytes(self, compiled) -> int | None:
        return timing.program_bytes(compiled)

    def peak_bytes(self) -> int | None:
        return timing.peak_bytes(self.devices)

    def time(self, workload: str, call: Callable[[], Any]) -> list[float]:
        """``time_calls`` with the config's warmup/repeats; then, with a profile_dir, one traced call."""
        times = timing.time_calls(call, int(self.c.warmup), int(self.c.repeats))
        self.trace(workload, call)
        return times

    def trace(self, workload: str, call: Callable[[], Any]) -> None:
        """With a profile_dir: one more call of ``call`` under ``jax.profiler``, its top device ops kept."""
        if not self.profile_dir:
            return
        trace_dir = os.path.join(self.profile_dir, f"{self.c.name}{'_' + self.label if self.label else ''}"
                                                   f"_{workload}")
        try:
            with jax.profiler.trace(trace_dir):
                jax.block_until_ready(call())
            self.profiles[workload] = timing.device_op_times(trace_dir)
        except Exception as e:  # noqa: BLE001 - a profiler that cannot start (no CUPTI) must not lose the timing
            self.profiles[workload] = [{"name": f"(profile failed: {type(e).__name__}: {e})"[:200], "ms": 0.0,
                                        "count": 0, "share": 0.0}]

    def mfu(self, tokens_per_s: float, flops_per_token: float) -> float | None:
        return model_mfu(tokens_per_s, flops_per_token, self.devices)

    def result(self, workload: str, **fields) -> Result:
        """A row of ``workload``; the config's ``targets.<workload>`` (if any) fills baseline, target and met."""
        base = dict(workload=workload, config=self.c.name, label=self.label, status="ok",
                    device_kind=self.devices[0].device_kind, num_devices=len(self.devices), step_s_all=[],
                    step_s=None, tokens_per_s=None, flops_per_token=None, mfu=None, peak_bytes=None,
                    program_bytes=None, compile_s=None)
        base.update(fields)
        r = Result(**base)
        target_cfg = self.c.targets.get(workload)
        if target_cfg is not None:
            apply_target(r, target_cfg)
        return r

    def train_step(self, workload: str, *, make_model: Callable[[GPTConfig], nn.Module],
                   make_loss: Callable[[nn.Module], Callable], make_batch: Callable[..., dict], tokens_per_row: int,
                   flops_per_token: Callable[[GPTConfig], float], segments: int,
                   candidates: list[tuple[int, str]] | None = None, rows: int | None = None,
                   extra: dict | None = None) -> Result:
        """One optimizer step of the shared trainer, as ``run_training`` jits it, on a synthetic batch.

        ``candidates`` (rows, remat) are tried in turn until the compiled program fits the device (default: one,
        ``rows`` or the config's batch_size at the model's remat). ``make_batch(model_cfg, rows, rng)`` draws the
        batch from the workload's generator; ``segments`` (packed documents per row) and ``extra`` go in the row.
        """
        c = self.c
        base_cfg = self.model_config()
        T, accum = int(c.seq_len), int(c.grad_accum_steps)
        rng = np.random.default_rng(c.seed)
        candidates = candidates or [(int(rows or c.batch_size), base_cfg.remat)]
        limit = timing.device_limit(self.devices)
        tried = []
        for index, (rows, remat) in enumerate(candidates):
            cfg = base_cfg.replace(remat=remat)
            if rows % accum:
                raise ConfigError(f"batch {rows} is not divisible by grad_accum_steps={accum}")
            sharding_lib.check_batch_divisible(rows // accum, self.mesh, field=f"{workload} microbatch")
            module = make_model(cfg)
            loss_fn = make_loss(module)
            host_batch = make_batch(cfg, rows, rng)
            # Built outside the mesh context (unboxing abstract params under it would apply their constraints).
            step, abstract, make_state, batch_sharding = self._train_step_for(module, loss_fn, T)
            batch = jax.device_put(_stack_micro(host_batch, accum), batch_sharding)
            num_micro = np.int32(accum)
            with loop.mesh_context(self.mesh):
                compiled, compile_s = self.compile(step, abstract, batch, num_micro)
            need = timing.program_bytes(compiled)
            tried.append(f"B{rows}/{remat}: {format_bytes(need)}")
            fits = limit is None or need is None or need <= FIT_FRACTION * limit
            if not fits and index < len(candidates) - 1:
                del compiled, batch
                gc.collect()
                continue  # does not fit this card: try the next (smaller) candidate
            if not fits:
                return self.result(workload, status=f"does not fit: {'; '.join(tried)} > {format_bytes(limit)}",
                                   model=self.describe(cfg), batch=rows, seq_len=T, tokens_per_call=0,
                                   compile_s=compile_s, program_bytes=need)
            return self._time_train_step(workload, compiled, make_state, batch, num_micro, cfg=cfg, rows=rows,
                                         tokens=rows * tokens_per_row, fpt=flops_per_token(cfg), need=need,
                                         compile_s=compile_s,
                                         extra={"grad_accum_steps": accum, "loss_chunk": int(c.loss_chunk),
                                                "segments": segments, "candidates_tried": tried, **(extra or {})})
        raise AssertionError("unreachable: the last candidate always returns")  # pragma: no cover

    def _time_train_step(self, workload: str, compiled, make_state, batch, num_micro, *, cfg, rows, tokens, fpt,
                         need, compile_s, extra) -> Result:
        state = make_state()
        jax.block_until_ready(state)

        def call():
            nonlocal state
            state, metrics = compiled(state, batch, num_micro)
            return state, metrics

        times = self.time(workload, call)
        step_s = statistics.median(times)
        result = self.result(
            workload, model=self.describe(cfg), batch=rows, seq_len=int(self.c.seq_len), tokens_per_call=tokens,
            step_s=step_s, step_s_all=times, tokens_per_s=tokens / step_s, flops_per_token=fpt,
            mfu=self.mfu(tokens / step_s, fpt), peak_bytes=self.peak_bytes(), program_bytes=need,
            compile_s=compile_s, extra=extra)
        del state, compiled, batch
        gc.collect()
        return result

    def _train_step_for(self, module, loss_fn, init_seq_len: int):
        """(jitted step, abstract state, state factory, batch sharding), exactly as ``run_training`` builds them."""
        c, mesh = self.c, self.mesh
        key = jax.random.key(c.seed)
        init_params_fn = state_lib.default_init_params_fn(module, init_seq_len)
        boxed = state_lib.abstract_boxed_params(init_params_fn, key)
        tx, schedule = make_optimizer(c.optim, self.schedule_steps, nn.unbox(boxed))
        shardings = state_lib.state_shardings(boxed, tx, mesh)
        abstract = state_lib.abstract_state(boxed, tx, shardings, key)
        batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))
        step = jax.jit(loop.make_train_step(loss_fn, tx, schedule, shardings.params),
                       in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None),
                       donate_argnums=(0,))
        init_rng, state_rng = jax.random.split(key)

        def make_state():
            # state_lib.create_sharded_state, compiled with the bench's compile options (fast_compile in smoke tests).
            def init(init_rng, state_rng):
                return state_lib.new_state(nn.unbox(init_params_fn(init_rng)), tx, state_rng)

            with loop.mesh_context(mesh):
                compiled, _ = self.compile(jax.jit(init, out_shardings=shardings), init_rng, state_rng)
            return compiled(init_rng, state_rng)

        return step, abstract, make_state, batch_sharding
