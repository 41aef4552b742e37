"""Benchmarks of the project's own hot paths: tokens/s, MFU, peak memory and compile time per workload.

Workloads (each the exact jitted function training uses, on synthetic data already on the device):

- ``pretrain`` / ``sft``: ``train.loop.make_train_step`` with ``lm_loss`` / ``sft_loss`` (AdamW, clipping, NaN
  guard, state donated), as ``run_training`` jits it;
- ``reward``: the same step with ``reward_loss`` on (prompts, K, T) ranking batches;
- ``ppo``: ``train.ppo_loop.make_experience_fn`` (KV-cache rollout + policy/reference/value/reward scoring + GAE)
  and ``make_update_fn`` (clipped policy/value updates over the rollout batch, state donated), reported as
  ``ppo-rollout``, ``ppo-update`` and the whole iteration ``ppo`` with the rollout's share of its time;
- ``sample``: ``sampling.make_sampler`` (prefill + ``lax`` decode loop over a preallocated cache);
- ``loop``: pretraining through ``train.loop.run_training`` itself — host loop, device prefetch from a host
  iterator, metrics and reporting — timed by the trainer's own per-interval tokens/s (warm-up intervals
  dropped), so it shows what the loop costs on top of the ``pretrain`` step.

Method: every function is lowered and compiled ahead of time (``compile_s`` = trace + lower + compile, autotuning
included on GPU), run ``warmup`` times, then timed ``repeats`` times, each call ended by ``block_until_ready`` (the
only host synchronisation in the timed region); the median is reported. MFU uses ``gptjax.flops`` (PaLM/nanoGPT
convention, full T×T attention) against ``flops.PEAK_FLOPS`` for the device kind ("n/a" on CPU). Memory:
``peak_bytes`` is the device allocator's ``peak_bytes_in_use`` (process-wide, so run one config per process
for per-workload peaks; None where the backend keeps no statistics, e.g. CPU) and ``program_bytes`` the compiled
program's own estimate (``compiled.memory_analysis()``), available on every backend.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import glob
import itertools
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import flops as flops_lib
from gptjax import sampling as sample_lib
from gptjax import sharding as sharding_lib
from gptjax.errors import ConfigError
from gptjax.model import GPT, REMAT_POLICIES, GPTConfig, ScoreModel
from gptjax.presets import preset_config
from gptjax.stages.pretrain import lm_loss
from gptjax.stages.reward import reward_loss
from gptjax.stages.sft import sft_loss
from gptjax.train import loop
from gptjax.train import state as state_lib
from gptjax.train.optim import make_optimizer

WORKLOADS = ("pretrain", "sft", "reward", "ppo", "sample", "loop")
SCHEMA = "gptjax.bench/1"
# A program "fits" when it needs at most this share of the device's memory (the rest: allocator fragmentation).
FIT_FRACTION = 0.97
# The optimizer's schedule length: any value works (the lr does not change the step's cost).
_SCHEDULE_STEPS = 1000

# XLA flags for NVIDIA GPUs, set through XLA_FLAGS before jax starts (scripts/gpu_bench.sh does; CPUs get none).
# Documented in the JAX GPU performance tips and baked into NVIDIA's JAX-Toolbox images. An unknown flag aborts
# the process, so callers should probe them first (gpu_bench.sh falls back to none).
RECOMMENDED_GPU_XLA_FLAGS = (
    # Schedules independent work (async copies, collectives) to overlap compute; on by default in JAX-Toolbox.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # cuBLAS for every matmul rather than autotuned Triton GEMMs: +4% on GPT-2 124M, B 48 (H200, 2026-11-26).
    "--xla_gpu_enable_triton_gemm=false",
)
# Measured against the recommended set by gpu_bench.sh before anyone makes them defaults.
EXPERIMENTAL_GPU_XLA_FLAGS = {
    # Record while/cond loops (the decode loop, scanned layers) into CUDA graphs with conditional nodes, so a
    # data-dependent loop does not copy its predicate to the host every iteration. Needs CUDA >= 12.3.
    "cuda-graph-loops": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",
}


def recommended_xla_flags(platform_name: str | None = None) -> list[str]:
    """XLA flags we recommend for ``platform_name`` ("gpu", "cpu", "tpu"; default: from JAX_PLATFORMS, else "gpu"
    when a CUDA plugin is installed). Empty except on GPUs: nothing is forced on the CPU. Does not start jax."""
    if platform_name is None:
        platform_name = _platform_without_starting_jax()
    return list(RECOMMENDED_GPU_XLA_FLAGS) if platform_name in ("gpu", "cuda") else []


def _platform_without_starting_jax() -> str:
    requested = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip()
    if requested:
        return requested
    import importlib.util
    has_cuda = any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    return "gpu" if has_cuda else "cpu"


# --- results ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """One table row. ``tokens_per_s`` counts training tokens (all rows × positions of a step, × micro-batches
    and epochs) for training workloads, and new (generated) tokens for ``sample`` and ``ppo-rollout``."""

    workload: str  # pretrain | sft | reward | ppo-rollout | ppo-update | ppo | sample
    config: str  # configs/bench.py name
    label: str  # variant tag set on the command line ("" for the config as written)
    status: str  # "ok", or why there is no measurement
    device_kind: str
    num_devices: int  # devices the workload ran on (MFU is against their summed peak)
    model: str  # preset and shape, e.g. "gpt2-small 12L d768 bf16"
    batch: int  # rows per call (sampling / rollout: sequences)
    seq_len: int  # tokens per row (sampling / rollout: prompt + new tokens)
    tokens_per_call: int  # tokens the rate counts per timed call
    step_s: float | None  # median seconds per call
    step_s_all: list[float]  # every timed call
    tokens_per_s: float | None
    flops_per_token: float | None  # model FLOPs per counted token (None where no training FLOPs apply)
    mfu: float | None  # fraction of the devices' dense bf16 peak; None on CPU / unknown devices
    peak_bytes: int | None  # allocator peak_bytes_in_use after the workload (process-wide); None on CPU
    program_bytes: int | None  # the compiled program's memory estimate (arguments + temporaries + outputs)
    compile_s: float | None  # trace + lower + compile (+ GPU autotuning)
    baseline: str = ""  # the reference figure of issue 6 on the same card ("" when none)
    target: str = ""  # e.g. ">= 600,000 tok/s"
    met: bool | None = None  # None when there is no target or no measurement
    extra: dict = dataclasses.field(default_factory=dict)  # workload-specific figures (e.g. rollout_share)


RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(Result))


def environment() -> dict:
    """What the numbers were measured on (JSON "meta")."""
    dev = jax.devices()[0]
    return {"schema": SCHEMA, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jax": jax.__version__,
            "jaxlib": _jaxlib_version(), "platform": dev.platform,
            "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "peak_flops_per_device": flops_lib.device_peak_flops(dev),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}


def _jaxlib_version() -> str | None:
    try:
        import jaxlib
        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def write_json(path: str, results: Sequence[Result], meta: dict | None = None) -> None:
    payload = {"meta": meta or environment(), "results": [dataclasses.asdict(r) for r in results]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def read_json(path: str) -> tuple[dict, list[Result]]:
    """(meta, results) of a file ``write_json`` wrote, or of a ``.jsonl`` file holding one such payload per line
    (gpu_bench.sh appends each run's; the first line's meta is returned)."""
    with open(path) as f:
        text = f.read()
    lines = [ln for ln in text.splitlines() if ln.strip()] if path.endswith(".jsonl") else [text]
    metas, results = [], []
    for line_no, line in enumerate(lines, 1):
        where = f"{path}:{line_no}" if path.endswith(".jsonl") else path
        try:
            payload = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e})") from None
        if not isinstance(payload, dict) or "results" not in payload:
            raise ConfigError(f"{where}: not a benchmark result (expected an object with 'meta' and 'results')")
        metas.append(payload.get("meta", {}))
        for i, row in enumerate(payload["results"]):
            missing = [k for k in RESULT_FIELDS if k not in row and k not in ("baseline", "target", "met", "extra")]
            if missing:
                raise ConfigError(f"{where}: result {i} lacks field(s) {missing}")
            results.append(Result(**{k: row[k] for k in RESULT_FIELDS if k in row}))
    return (metas[0] if metas else {}), results


# --- the table --------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("workload", "config", "card", "model", "B x T", "tok/s", "MFU", "peak mem", "program mem",
                 "compile", "baseline", "target", "met?")


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table_row(r: Result) -> list[str]:
    name = r.workload + (f" [{r.label}]" if r.label else "")
    if r.status != "ok":
        return [name, r.config, r.device_kind, r.model, f"{r.batch} x {r.seq_len}", r.status, "", "", "", "",
                r.baseline, r.target, "no" if r.target else ""]
    rate = f"{r.tokens_per_s:,.0f}"
    if "rollout_share" in r.extra:
        rate += f" (rollout {100 * r.extra['rollout_share']:.0f}%)"
    return [name, r.config, r.device_kind, r.model, f"{r.batch} x {r.seq_len}", rate,
            "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%", _bytes(r.peak_bytes), _bytes(r.program_bytes),
            "n/a" if r.compile_s is None else f"{r.compile_s:.1f} s", r.baseline, r.target,
            "" if r.met is None else ("yes" if r.met else "no")]


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per result."""
    rows = [list(TABLE_COLUMNS)] + [table_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# --- measuring --------------------------------------------------------------------------------------------------

# XLA compile options of ``fast_compile``: no backend optimisation (smoke tests; the programs run slower).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(jitted, *args, fast: bool = False):
    """(compiled executable, seconds spent tracing, lowering and compiling)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile(FAST_COMPILE_OPTIONS) if fast else lowered.compile()
    return compiled, time.perf_counter() - start


def program_bytes(compiled) -> int | None:
    """Device memory the compiled program needs: its peak if XLA reports one, else arguments + temporaries +
    outputs that do not reuse (alias) a donated argument."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    total = int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    return max(peak, total)


def _device_limit(devices) -> int | None:
    stats = devices[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _peak_bytes(devices) -> int | None:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return int(max(peaks)) if peaks else None


def time_calls(call: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones. ``call`` runs one step (threading its own
    state) and returns its outputs; the clock stops when they are ready on the device."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times


def device_op_times(trace_dir: str, top: int = 25) -> list[dict]:
    """The ops that took the most device time in the ``jax.profiler`` trace under ``trace_dir``.

    Returns ``[{name, ms, count, share}]`` (total milliseconds over the trace, share of all device-op time),
    largest first. GPU traces: the per-HLO-op line of each device plane when the trace has one, else its kernels;
    a CPU-only trace: the XLA client's threads on the host plane.
    """
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: the trace was not written")
    data = ProfileData.from_file(files[-1])
    device_planes = [p for p in data.planes if p.name.startswith("/device:")]
    lines = []
    for plane in device_planes:
        plane_lines = list(plane.lines)
        ops = [line for line in plane_lines if line.name == "XLA Ops"]
        lines += ops or [line for line in plane_lines if line.name not in ("XLA Modules", "Steps", "XLA TraceMe")]
    if not lines:  # CPU: ops run on the PjRt client's and Eigen's threads
        lines = [line for p in data.planes if p.name == "/host:CPU" for line in p.lines if "XLA" in line.name]
    totals: dict[str, list] = {}
    for line in lines:
        for event in line.events:
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += event.duration_ns
            entry[1] += 1
    all_ns = sum(ns for ns, _ in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"name": name, "ms": ns / 1e6, "count": n, "share": ns / all_ns} for name, (ns, n) in ranked]


def format_op_times(ops: list[dict]) -> str:
    width = max((len(o["name"][:90]) for o in ops), default=4)
    rows = [f"{'op':<{width}}  {'ms':>9}  {'calls':>6}  share"]
    rows += [f"{o['name'][:90]:<{width}}  {o['ms']:9.3f}  {o['count']:6d}  {100 * o['share']:5.1f}%" for o in ops]
    return "\n".join(rows)


# --- configs -> models and data ---------------------------------------------------------------------------------

def model_config(c) -> GPTConfig:
    """The bench config's GPTConfig: its preset with every non-None ``model.*`` override."""
    overrides = {k: v for k, v in c.model.items() if k != "preset" and v is not None}
    return preset_config(c.model.preset, **overrides)


def describe(cfg: GPTConfig, preset: str) -> str:
    text = f"{preset} {cfg.num_layers}L d{cfg.d_model}"
    if cfg.dtype != "float32":
        text += f" {'bf16' if cfg.dtype == 'bfloat16' else cfg.dtype}"
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


def score_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """``flops.flops_per_token`` of the decoder without the V×d output projection (a score head has none)."""
    return flops_lib.flops_per_token(cfg, seq_len) - 6 * cfg.vocab_size * cfg.d_model


def lm_batch(rng: np.random.Generator, rows: int, seq_len: int, vocab: int, segments: int,
             sft_weights: bool = False) -> dict[str, np.ndarray]:
    """A synthetic LM batch (the pipeline's format). ``segments`` > 0 packs that many equal documents per row
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
    """K right-padded responses per prompt, lengths in [T/2, T], all ranked."""
    tokens = rng.integers(0, vocab, (prompts, k, seq_len), dtype=np.int32)
    lengths = rng.integers(seq_len // 2, seq_len + 1, (prompts, k))
    valid = np.arange(seq_len)[None, None, :] < lengths[..., None]
    return {"tokens": tokens, "valid": valid, "num_ranked": np.full((prompts,), k, np.int32)}


def left_padded_prompts(rng: np.random.Generator, rows: int, length: int, vocab: int):
    """Prompts of [length/2, length] real tokens, left-padded to ``length`` (pad id 0)."""
    lengths = rng.integers(max(length // 2, 1), length + 1, rows)
    ids = rng.integers(1, vocab, (rows, length))
    return sample_lib.left_pad([row[length - n:] for row, n in zip(ids, lengths)], 0, length=length)


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _init_params(module, seq_len: int, key, fast: bool):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    compiled, _ = _compile(jax.jit(lambda k: module.init({"params": k}, tokens)["params"]), key, fast=fast)
    return nn.unbox(compiled(key))


# --- workloads --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Context:
    c: Any  # the bench config
    mesh: Any
    devices: list
    label: str
    profile_dir: str | None = None  # trace one extra call of each workload here (jax.profiler)
    profiles: dict = dataclasses.field(default_factory=dict)  # workload -> device_op_times of that trace

    def time(self, workload: str, call: Callable[[], Any]) -> list[float]:
        """``time_calls`` with the config's warmup/repeats; then, with a profile_dir, one traced call."""
        times = time_calls(call, int(self.c.warmup), int(self.c.repeats))
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
            self.profiles[workload] = device_op_times(trace_dir)
        except Exception as e:  # noqa: BLE001 - a profiler that cannot start (no CUPTI) must not lose the timing
            self.profiles[workload] = [{"name": f"(profile failed: {type(e).__name__}: {e})"[:200], "ms": 0.0,
                                        "count": 0, "share": 0.0}]

    def mfu(self, tokens_per_s: float, flops_per_token: float) -> float | None:
        return model_mfu(tokens_per_s, flops_per_token, self.devices)

    def result(self, workload: str, **fields) -> Result:
        target_cfg = self.c.targets.get(workload.split("-")[0] if workload.startswith("ppo") else workload)
        base = dict(workload=workload, config=self.c.name, label=self.label, status="ok",
                    device_kind=self.devices[0].device_kind, num_devices=len(self.devices), step_s_all=[],
                    step_s=None, tokens_per_s=None, flops_per_token=None, mfu=None, peak_bytes=None,
                    program_bytes=None, compile_s=None)
        base.update(fields)
        r = Result(**base)
        if target_cfg is not None and workload in ("pretrain", "sft", "reward", "sample", "ppo"):
            apply_target(r, target_cfg)
        return r


def apply_target(r: Result, target_cfg) -> None:
    """Fill ``baseline``, ``target`` and ``met`` of ``r`` from a config's ``targets.<workload>`` entry."""
    r.baseline = str(target_cfg.get("baseline", ""))
    if "min_tokens_per_s" in target_cfg:
        r.target = f">= {target_cfg['min_tokens_per_s']:,.0f} tok/s"
        if r.status == "ok":
            r.met = r.tokens_per_s >= target_cfg["min_tokens_per_s"]
    if "max_rollout_share" in target_cfg:
        r.target = f"rollout <= {100 * target_cfg['max_rollout_share']:.0f}% of the iteration"
        if r.status == "ok":
            r.met = r.extra["rollout_share"] <= target_cfg["max_rollout_share"]


def _batch_candidates(c, cfg: GPTConfig) -> list[tuple[int, str]]:
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


def _train_step_for(ctx: _Context, module, loss_fn, init_seq_len: int):
    """(jitted step, abstract state, state factory, batch sharding), exactly as ``run_training`` builds them."""
    c, mesh = ctx.c, ctx.mesh
    key = jax.random.key(c.seed)
    init_params_fn = state_lib.default_init_params_fn(module, init_seq_len)
    boxed = state_lib.abstract_boxed_params(init_params_fn, key)
    tx, schedule = make_optimizer(c.optim, _SCHEDULE_STEPS, nn.unbox(boxed))
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
            compiled, _ = _compile(jax.jit(init, out_shardings=shardings), init_rng, state_rng,
                                   fast=bool(c.fast_compile))
        return compiled(init_rng, state_rng)

    return step, abstract, make_state, batch_sharding


def _stack_micro(batch: dict, accum: int) -> dict:
    """(rows, ...) -> (accum, rows / accum, ...): the trainer's stacked microbatches."""
    return {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in batch.items()}


def _bench_train(ctx: _Context, workload: str) -> Result:
    """pretrain / sft / reward: one optimizer step of the shared trainer."""
    c = ctx.c
    base_cfg = model_config(c)
    T, accum = int(c.seq_len), int(c.grad_accum_steps)
    rng = np.random.default_rng(c.seed)
    if workload == "reward":
        candidates = [(int(c.reward_prompts), base_cfg.remat)]
    else:
        candidates = _batch_candidates(c, base_cfg) if workload == "pretrain" else [(int(c.batch_size), base_cfg.remat)]
    limit = _device_limit(ctx.devices)
    tried = []
    for index, (rows, remat) in enumerate(candidates):
        cfg = base_cfg.replace(remat=remat)
        if rows % accum:
            raise ConfigError(f"batch {rows} is not divisible by grad_accum_steps={accum}")
        sharding_lib.check_batch_divisible(rows // accum, ctx.mesh, field=f"{workload} microbatch")
        if workload == "reward":
            module = ScoreModel(cfg)
            loss_fn = functools.partial(reward_loss, model=module)
            host_batch = ranking_batch(rng, rows, int(c.reward_k), T, cfg.vocab_size)
            tokens_per_row, fpt = int(c.reward_k) * T, score_flops_per_token(cfg, T)
        else:
            module = GPT(cfg)
            objective = lm_loss if workload == "pretrain" else sft_loss
            loss_fn = functools.partial(objective, model=module, loss_chunk=int(c.loss_chunk))
            segments = int(c.pretrain_segments) if workload == "pretrain" else int(c.sft_segments)
            host_batch = lm_batch(rng, rows, T, cfg.vocab_size, segments, sft_weights=workload == "sft")
            tokens_per_row, fpt = T, flops_lib.flops_per_token(cfg, T)
        # Built outside the mesh context (unboxing abstract params under it would apply their constraints).
        step, abstract, make_state, batch_sharding = _train_step_for(ctx, module, loss_fn, T)
        batch = jax.device_put(_stack_micro(host_batch, accum), batch_sharding)
        num_micro = np.int32(accum)
        with loop.mesh_context(ctx.mesh):
            compiled, compile_s = _compile(step, abstract, batch, num_micro, fast=bool(c.fast_compile))
        need = program_bytes(compiled)
        tried.append(f"B{rows}/{remat}: {_bytes(need)}")
        fits = limit is None or need is None or need <= FIT_FRACTION * limit
        if not fits and index < len(candidates) - 1:
            del compiled, batch
            gc.collect()
            continue  # does not fit this card: try the next (smaller) candidate
        if not fits:
            return ctx.result(workload, status=f"does not fit: {'; '.join(tried)} > {_bytes(limit)}",
                              model=describe(cfg, c.model.preset), batch=rows, seq_len=T, tokens_per_call=0,
                              compile_s=compile_s, program_bytes=need)
        state = make_state()
        jax.block_until_ready(state)

        def call():
            nonlocal state
            state, metrics = compiled(state, batch, num_micro)
            return state, metrics

        times = ctx.time(workload, call)
        tokens = rows * tokens_per_row
        step_s = statistics.median(times)
        result = ctx.result(
            workload, model=describe(cfg, c.model.preset), batch=rows, seq_len=T, tokens_per_call=tokens,
            step_s=step_s, step_s_all=times, tokens_per_s=tokens / step_s, flops_per_token=fpt,
            mfu=ctx.mfu(tokens / step_s, fpt), peak_bytes=_peak_bytes(ctx.devices),
            program_bytes=need, compile_s=compile_s,
            extra={"grad_accum_steps": accum, "loss_chunk": int(c.loss_chunk),
                   "segments": 0 if workload == "reward" else segments, "candidates_tried": tried,
                   **({"responses_per_prompt": int(c.reward_k)} if workload == "reward" else {})})
        del state, compiled, batch
        gc.collect()
        return result
    raise AssertionError("unreachable: the last candidate always returns")  # pragma: no cover


def _bench_loop(ctx: _Context) -> Result:
    """``pretrain`` as ``run_training`` runs it, in a throw-away workdir: ``warmup + repeats`` log intervals of
    ``loop_log_every`` steps; each timed interval's rate is the trainer's ``perf/tokens_per_s`` (measured between
    device completions; the first step, compilation included, is ``compile_s``)."""
    import tempfile

    from gptjax.train import metrics as metrics_lib

    c = ctx.c
    cfg = model_config(c)
    rows, T, accum = int(c.batch_size), int(c.seq_len), int(c.grad_accum_steps)
    every, warmup, repeats = int(c.loop_log_every), int(c.warmup), int(c.repeats)
    if every < 2 or repeats < 1:
        raise ConfigError(f"the loop workload needs loop_log_every >= 2 and repeats >= 1 (got {every}, {repeats})")
    rng = np.random.default_rng(c.seed)
    # A host iterator that costs nothing, the same few microbatches in turn: the loop is measured, not data.
    # (run_training checks that grad_accum_steps divides the batch.)
    batches = [lm_batch(rng, rows // accum, T, cfg.vocab_size, int(c.pretrain_segments)) for _ in range(4)]
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
    return ctx.result("loop", model=describe(cfg, c.model.preset), batch=rows, seq_len=T, tokens_per_call=tokens,
                      step_s=step_s, step_s_all=times, tokens_per_s=tokens / step_s, flops_per_token=fpt,
                      mfu=ctx.mfu(tokens / step_s, fpt), peak_bytes=_peak_bytes(ctx.devices), compile_s=first_s,
                      extra={"log_every": every, "intervals_timed": len(timed), "grad_accum_steps": accum,
                             "loss_chunk": int(c.loss_chunk), "segments": int(c.pretrain_segments),
                             "note": "run_training's host loop; step_s per interval; compile_s = first step"})


def _bench_sample(ctx: _Context) -> Result:
    c, s = ctx.c, ctx.c.sample
    cfg = model_config(c)
    B, prompt_len, N = int(s.batch_size), int(s.prompt_len), int(s.max_new_tokens)
    rng = np.random.default_rng(c.seed)
    module = GPT(cfg)
    with loop.mesh_context(ctx.mesh):
        params = _init_params(module, prompt_len, jax.random.key(c.seed), bool(c.fast_compile))
        if s.param_dtype:
            params = _cast_floats(params, jnp.dtype(s.param_dtype))
        sampler = sample_lib.make_sampler(module, sample_lib.SamplingConfig(
            max_new_tokens=N, temperature=float(s.temperature), top_k=int(s.top_k), eos_id=None, pad_id=0,
            unroll_layers=bool(s.unroll_layers), decode_segments=int(s.decode_segments)))
        prompts, valid = (jnp.asarray(x) for x in left_padded_prompts(rng, B, prompt_len, cfg.vocab_size))
        key = jax.random.key(c.seed + 1)
        compiled, compile_s = _compile(sampler, params, prompts, valid, key, fast=bool(c.fast_compile))
    times = ctx.time("sample", lambda: compiled(params, prompts, valid, key))
    step_s = statistics.median(times)
    result = ctx.result("sample", model=describe(cfg, c.model.preset) + (f" params:{s.param_dtype}" if
                                                                         s.param_dtype else ""),
                        batch=B, seq_len=prompt_len + N, tokens_per_call=B * N, step_s=step_s, step_s_all=times,
                        tokens_per_s=B * N / step_s, peak_bytes=_peak_bytes(ctx.devices),
                        program_bytes=program_bytes(compiled), compile_s=compile_s,
                        extra={"prompt_len": prompt_len, "max_new_tokens": N, "ms_per_decode_step": 1e3 * step_s / N})
    del params, compiled
    gc.collect()
    return result


def _bench_ppo(ctx: _Context) -> list[Result]:
    """One PPO iteration as ``run_ppo`` runs it: experience (rollout + scoring + GAE), then the update."""
    # Imported here: the PPO stage needs rlax, which a GPU image may lack while the other workloads run.
    from gptjax.stages.ppo import objective as ppo_lib
    from gptjax.stages.ppo import loop as ppo_loop

    c, p = ctx.c, ctx.c.ppo
    cfg = model_config(c)
    B, prompt_len, N = int(p.rollout_batch_size), int(p.prompt_len), int(p.max_new_tokens)
    T = prompt_len + N
    pcfg = ppo_lib.PPOConfig(rollout_batch_size=B, minibatch_size=int(p.minibatch_size),
                             ppo_epochs=int(p.ppo_epochs), loss_chunk=int(p.loss_chunk))
    sharding_lib.check_batch_divisible(pcfg.minibatch_size, ctx.mesh, field="ppo.minibatch_size")
    scfg = sample_lib.SamplingConfig(max_new_tokens=N, temperature=pcfg.temperature, eos_id=None, pad_id=0,
                                     unroll_layers=bool(c.sample.unroll_layers),
                                     decode_segments=int(c.sample.decode_segments))
    policy, value, reward = GPT(cfg), ScoreModel(cfg, zero_init_head=True), ScoreModel(cfg)
    rng = np.random.default_rng(c.seed)
    keys = jax.random.split(jax.random.key(c.seed), 5)
    with loop.mesh_context(ctx.mesh):
        policy_params = _init_params(policy, T, keys[0], bool(c.fast_compile))
        value_params = _init_params(value, T, keys[1], bool(c.fast_compile))
        reward_params = _init_params(reward, T, keys[2], bool(c.fast_compile))
        ref_params = jax.tree.map(jnp.copy, policy_params)
        policy_tx, _ = make_optimizer(c.optim, _SCHEDULE_STEPS, policy_params)
        value_tx, _ = make_optimizer(c.optim, _SCHEDULE_STEPS, value_params)
        kl = pcfg.make_kl_controller()
        state = ppo_loop.PPOState(step=jnp.zeros((), jnp.int32), policy_params=policy_params,
                                  policy_opt=policy_tx.init(policy_params), value_params=value_params,
                                  value_opt=value_tx.init(value_params), kl=kl.init(),
                                  rng=jax.random.key_data(keys[3]))
        experience = jax.jit(ppo_loop.make_experience_fn(policy, value, reward, scfg, pcfg))
        update = jax.jit(ppo_loop.make_update_fn(policy, value, policy_tx, value_tx, pcfg), donate_argnums=(0,))
        prompts, valid = (jnp.asarray(x) for x in left_padded_prompts(rng, B, prompt_len, cfg.vocab_size))
        args = lambda s: (s.policy_params, ref_params, s.value_params, reward_params, prompts, valid,  # noqa: E731
                          keys[4], s.kl.kl_coef)
        compiled_exp, compile_exp_s = _compile(experience, *args(state), fast=bool(c.fast_compile))
        batch, _ = compiled_exp(*args(state))
        compiled_upd, compile_upd_s = _compile(update, state, batch, None, keys[4], fast=bool(c.fast_compile))
    roll_times, upd_times = [], []
    for i in range(int(c.warmup) + int(c.repeats)):
        start = time.perf_counter()
        batch, roll_metrics = compiled_exp(*args(state))
        jax.block_until_ready((batch, roll_metrics))
        mid = time.perf_counter()
        state, upd_metrics = compiled_upd(state, batch, None, keys[4])
        jax.block_until_ready((state, upd_metrics))
        end = time.perf_counter()
        if i >= int(c.warmup):
            roll_times.append(mid - start)
            upd_times.append(end - mid)
    ctx.trace("ppo-rollout", lambda: compiled_exp(*args(state)))

    def update_once():
        nonlocal state
        state, metrics = compiled_upd(state, batch, None, keys[4])
        return state, metrics

    ctx.trace("ppo-update", update_once)
    iter_times = [a + b for a, b in zip(roll_times, upd_times)]
    shares = [a / (a + b) for a, b in zip(roll_times, upd_times)]
    roll_s, upd_s, iter_s = (statistics.median(x) for x in (roll_times, upd_times, iter_times))
    peak = _peak_bytes(ctx.devices)
    model = describe(cfg, c.model.preset)
    update_tokens = pcfg.ppo_epochs * B * T
    update_fpt = flops_lib.flops_per_token(cfg, T) + score_flops_per_token(cfg, T)  # policy + value model
    common = dict(model=model, batch=B, seq_len=T, peak_bytes=peak)
    setup = {"rollout_batch_size": B, "minibatch_size": pcfg.minibatch_size, "ppo_epochs": pcfg.ppo_epochs,
             "prompt_len": prompt_len, "max_new_tokens": N, "loss_chunk": pcfg.loss_chunk}
    results = [
        ctx.result("ppo-rollout", tokens_per_call=B * N, step_s=roll_s, step_s_all=roll_times,
                   tokens_per_s=B * N / roll_s, program_bytes=program_bytes(compiled_exp), compile_s=compile_exp_s,
                   extra={**setup, "note": "sampling + policy/reference/value/reward scoring + GAE"}, **common),
        ctx.result("ppo-update", tokens_per_call=update_tokens, step_s=upd_s, step_s_all=upd_times,
                   tokens_per_s=update_tokens / upd_s, flops_per_token=update_fpt,
                   mfu=ctx.mfu(update_tokens / upd_s, update_fpt),
                   program_bytes=program_bytes(compiled_upd), compile_s=compile_upd_s, extra=setup, **common),
        ctx.result("ppo", tokens_per_call=B * T, step_s=iter_s, step_s_all=iter_times, tokens_per_s=B * T / iter_s,
                   compile_s=compile_exp_s + compile_upd_s,
                   extra={**setup, "rollout_share": statistics.median(shares), "rollout_s": roll_s,
                          "update_s": upd_s, "note": "episode tokens (prompt + response) per second"}, **common),
    ]
    del state, batch, compiled_exp, compiled_upd, policy_params, value_params, reward_params, ref_params
    gc.collect()
    return results


def parse_workloads(text: str) -> list[str]:
    names = [w.strip() for w in str(text).split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        raise ConfigError(f"workloads {bad or text!r}: choose a comma-separated subset of {list(WORKLOADS)}")
    return names


def run(c, workloads: Sequence[str] | str | None = None, *, label: str = "",
        on_result: Callable[[Result], None] | None = None, profile_dir: str | None = None) -> list[Result]:
    """Benchmark ``workloads`` (default: the config's) of bench config ``c``; ``on_result`` sees each row as it
    is measured. A workload that fails (e.g. out of memory) gives a row whose status says why; the others run.
    With ``profile_dir``, each workload's row gets ``extra["top_ops"]``: the device ops of one more traced call
    (``device_op_times``), after the timed ones."""
    names = parse_workloads(workloads if isinstance(workloads, str) else ",".join(workloads or []) or c.workloads)
    mesh = make_mesh(c)
    ctx = _Context(c=c, mesh=mesh, devices=list(mesh.devices.flat), label=label, profile_dir=profile_dir)
    results: list[Result] = []
    for name in names:
        try:
            if name in ("pretrain", "sft", "reward"):
                rows = [_bench_train(ctx, name)]
            elif name == "sample":
                rows = [_bench_sample(ctx)]
            elif name == "loop":
                rows = [_bench_loop(ctx)]
            else:
                rows = _bench_ppo(ctx)
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
