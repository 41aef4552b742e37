"""Measuring a compiled program: XLA flags, ahead-of-time compilation, its memory, timed calls and a profile."""

from __future__ import annotations

import glob
import os
import time
from typing import Any, Callable

import jax

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

# XLA compile options of ``fast_compile``: no backend optimisation (smoke tests; the programs run slower).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_program(jitted, *args, fast: bool = False):
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


def device_limit(devices) -> int | None:
    stats = devices[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def peak_bytes(devices) -> int | None:
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
