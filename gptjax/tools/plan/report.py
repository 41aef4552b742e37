"""What a plan found (``ProgramResult`` per compiled program, ``Plan`` for the step) and how it is printed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gptjax.tools.plan import hlo
from gptjax.tools.plan.comm import COLLECTIVES, bandwidth_of
from gptjax.tools.plan.targets import GB, Target


@dataclasses.dataclass
class ProgramResult:
    """One compiled program; bytes and FLOPs per device, for one call."""

    name: str
    calls: int
    model_flops: float  # analytic, all devices, one call
    group_bytes: dict[str, float]  # named argument trees (parameters, optimizer state, batch ...)
    also_live_bytes: float  # held on its devices while it runs, not its arguments
    mesh: dict[str, int]
    argument_bytes: float = 0.0
    output_bytes: float = 0.0
    alias_bytes: float = 0.0
    temp_bytes: float = 0.0
    code_bytes: float = 0.0
    compiler_flops: float | None = None  # as reported: each loop body once
    counts: hlo.Counts | None = None  # from the optimized HLO: every loop iteration counted
    compiler_error: str | None = None  # the compiler's refusal (TPU: needs more HBM than there is)
    lower_s: float = 0.0
    compile_s: float = 0.0

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def hardware_flops(self) -> float | None:
        """FLOPs of one call per device, every loop iteration counted: the HLO walk's dots, or (a program written
        with convolutions: TPU) XLA's count scaled by the walk's every-iteration / once-per-body ratio."""
        c = self.counts
        if c is None:
            return None
        if c.convolutions and self.compiler_flops and c.flops_once:
            return self.compiler_flops * c.flops / c.flops_once
        return c.flops

    @property
    def peak_bytes(self) -> float:
        """Live at once: arguments, temporaries, outputs not aliased to (donated) arguments, code, and what the step
        holds beside it."""
        return (self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes
                + self.also_live_bytes)

    def breakdown(self) -> dict[str, float]:
        out = dict(self.group_bytes)
        out["activations and other temporaries"] = self.temp_bytes
        if self.also_live_bytes:
            out["held beside it"] = self.also_live_bytes
        return out

    def times(self, target: Target, bandwidth: dict[str, float], efficiency: float) -> dict[str, float]:
        """Seconds of one call: compute (HLO FLOPs, else model FLOPs, at ``efficiency`` of peak), memory (the dots'
        operand and result bytes over HBM bandwidth) and communication (measured bytes over each axis's bandwidth)."""
        if self.counts is None:
            return {"compute": self.model_flops / self.devices / (target.peak_flops * efficiency), "memory": 0.0,
                    "communication": 0.0}
        comm = sum(b / bandwidth_of(axes, bandwidth) for axes, b in self.counts.bytes_by_axes().items())
        return {"compute": self.hardware_flops / (target.peak_flops * efficiency),
                "memory": self.counts.dot_bytes / target.hbm_bandwidth, "communication": comm}


@dataclasses.dataclass
class Plan:
    """A stage's step on a target: its programs, their memory and the step time."""

    target: Target
    model_name: str
    stage: str
    planned: Any  # gptjax.train.aot.StagePlan
    params_total: int
    mesh: dict[str, int]
    frozen_mesh: dict[str, int] | None
    programs: list[ProgramResult]
    analytic_bytes: dict[str, float]  # the analytic estimate per mesh axis (train steps)
    bandwidth: dict[str, float]
    efficiency: float
    layer_flops: float | None = None  # cross-check of the train step's FLOPs (unscanned variants)
    layer_flops_s: float = 0.0

    @property
    def peak_bytes(self) -> float:
        return max(p.peak_bytes for p in self.programs)

    @property
    def fits(self) -> bool:
        return all(p.compiler_error is None and p.peak_bytes <= self.target.device_memory for p in self.programs)

    def program_seconds(self, p: ProgramResult) -> float:
        return p.calls * max(p.times(self.target, self.bandwidth, self.efficiency).values())

    @property
    def step_s(self) -> float:
        """The programs run one after the other; inside each, compute, memory and communication overlap."""
        return sum(self.program_seconds(p) for p in self.programs)

    @property
    def devices(self) -> int:
        return len(self.target.devices)

    @property
    def model_flops(self) -> float:
        return sum(p.calls * p.model_flops for p in self.programs)

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_s * self.target.peak_flops * self.devices)

    def bound(self, p: ProgramResult) -> str:
        times = p.times(self.target, self.bandwidth, self.efficiency)
        return max(times, key=times.get) + "-bound"

    def verdict(self) -> str:
        worst = max(self.programs, key=lambda p: p.peak_bytes)
        parts = worst.breakdown()
        dominant = max(parts, key=parts.get)
        slowest = max(self.programs, key=self.program_seconds)
        use = worst.peak_bytes / self.target.device_memory
        where = f" in {worst.name}" if len(self.programs) > 1 else ""
        time = f"{slowest.name} {self.bound(slowest)}" if len(self.programs) > 1 else self.bound(slowest)
        if self.fits:
            return (f"FITS: peak {_gb(worst.peak_bytes)}{where} of {_gb(self.target.device_memory)} per device "
                    f"({100 * use:.0f}%); {dominant} dominate; {time}")
        refused = "the compiler refused the program; " if worst.compiler_error else ""
        return (f"DOES NOT FIT: {refused}{_gb(worst.peak_bytes)}{where} per device > "
                f"{_gb(self.target.device_memory)} ({100 * use:.0f}%); {dominant} dominate -> try {_hint(dominant)}")


def _gb(b: float) -> str:
    return f"{b / GB:.1f} GB" if abs(b) >= 0.1 * GB else f"{b / 1e6:.2f} MB"


def _hint(dominant: str) -> str:
    if dominant == "activations and other temporaries":
        return ("fewer sequences per device (more accumulation steps), more remat (model.remat=full) or tensor "
                "parallelism; in a rollout, gathered weights the compiler keeps through the decode loop "
                "(sampling.unroll_layers=false keeps the layer scan) or the frozen networks elsewhere (--frozen_mesh)")
    if dominant == "held beside it":
        return "more devices, or the frozen networks on their own devices (--frozen_mesh)"
    return "more devices on fsdp/tensor, or bf16 weight gathers (model.gather_dtype=bfloat16)"


# --- printing --------------------------------------------------------------------------------------------------

def format_plan(plan: Plan) -> str:
    """The plan as a readable table (what experiments.plan prints)."""
    c, m, s = plan.planned.model, plan.mesh, plan.planned.shape
    lines = [f"plan: {plan.model_name} ({plan.params_total / 1e9:.2f}B params) {plan.stage} {plan.planned.step} on "
             f"{plan.target.name}, mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}"
             + (f"; frozen networks on {plan.frozen_mesh}" if plan.frozen_mesh else "")]
    if plan.planned.step == "train step":
        rank = s["micro"] // (m["data"] * m["fsdp"])
        lines.append(f"  batch {s['batch']} x {s['seq_len']} tokens = {s['accum']} microbatch(es) of {s['micro']} "
                     f"({rank} per data-parallel rank); remat {c.remat}; compute {c.dtype}, params {c.param_dtype}, "
                     f"gathers {c.gather_dtype or c.param_dtype}")
    else:
        lines.append(f"  {s['batch']} episodes of {s['seq_len']} tokens; {s.get('epochs', 1)} epoch(s) of "
                     f"{s['accum']} minibatches of {s['micro']}; remat {c.remat}; compute {c.dtype}, params "
                     f"{c.param_dtype}, gathers {c.gather_dtype or c.param_dtype}")
    lines += [f"  note: {n}" for n in plan.planned.notes]
    for p in plan.programs:
        lines += _program_lines(plan, p)
    lines.append(f"step: {plan.step_s:.3f} s -> {plan.planned.per_step / plan.step_s:,.1f} {plan.planned.unit}/s, "
                 f"MFU {100 * plan.mfu:.1f}% (model FLOPs {plan.model_flops:.3e} per step)")
    lines.append(f"verdict: {plan.verdict()}")
    return "\n".join(lines)


def _program_lines(plan: Plan, p: ProgramResult) -> list[str]:
    scale, unit = (GB, "GB") if max(p.argument_bytes, p.temp_bytes) >= 0.1 * GB else (1e6, "MB")
    gb = lambda b: f"{b / scale:10.2f} {unit}"  # noqa: E731
    lines = [f"[{p.name}] x{p.calls} per step, on {p.devices} devices; lowered in {p.lower_s:.1f} s, compiled in "
             f"{p.compile_s:.1f} s", "  per device memory"]
    if p.compiler_error:
        lines.append(f"  the compiler refused: {p.compiler_error}")
    lines += [f"    {name:<34}{gb(b)}" for name, b in p.group_bytes.items()]
    lines += [f"    = arguments (compiler)            {gb(p.argument_bytes)}",
              f"    temporaries (compiler)            {gb(p.temp_bytes)}",
              f"    outputs not aliased to arguments  {gb(p.output_bytes - p.alias_bytes)}"]
    if p.also_live_bytes:
        lines.append(f"    held beside it                    {gb(p.also_live_bytes)}")
    lines.append(f"    peak                              {gb(p.peak_bytes)}   of "
                 f"{gb(plan.target.device_memory).strip()}")
    flops = p.hardware_flops if p.counts else float("nan")
    how = "XLA's count x loop trip counts" if p.counts and p.counts.convolutions else "HLO dots x loop trip counts"
    lines += ["  FLOPs per call per device",
              f"    {how:<34}{flops:10.3e}   (hardware FLOPs, incl. remat recompute)",
              f"    analytic model FLOPs              {p.model_flops / p.devices:10.3e}   (gptjax.flops)"]
    if plan.layer_flops is not None and len(plan.programs) == 1:
        lines.append(f"    unscanned-variant cross-check     {plan.layer_flops:10.3e}   ({plan.layer_flops_s:.1f} s)")
    lines += _comm_lines(plan, p)
    times = p.times(plan.target, plan.bandwidth, plan.efficiency)
    lines.append("  seconds per call: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
                 + f" -> {plan.bound(p)} (peak {plan.target.peak_flops / 1e12:.0f} TFLOP/s at "
                 f"{100 * plan.efficiency:.0f}%, HBM {plan.target.hbm_bandwidth / 1e12:.2f} TB/s)")
    return lines


def _comm_lines(plan: Plan, p: ProgramResult) -> list[str]:
    if p.counts is None:
        return []
    measured = p.counts.bytes_by_axes()
    lines = ["  communication per call per device: measured (HLO) | analytic estimate"]
    for axes in sorted(set(measured) | set(plan.analytic_bytes)):
        b, a = measured.get(axes, 0.0), plan.analytic_bytes.get(axes)
        bw = bandwidth_of(axes, plan.bandwidth)
        est = f"{_gb(a):>10} ({COLLECTIVES.get(axes, '')})" if a is not None and len(plan.programs) == 1 else ""
        lines.append(f"    {axes or '-':<14}{_gb(b):>10}  {b / bw:9.3f} s at {bw / 1e9:.0f} GB/s | {est}")
    for kind, axes, dtype, b, n in hlo.table(p.counts)[:6]:
        lines.append(f"      {kind:<18} {axes:<12} {dtype:<5} {_gb(b):>10} in {n:,.0f} ops")
    if p.counts.unknown_loops:
        lines.append(f"      ({p.counts.unknown_loops} loop(s) with a bound the HLO does not state: counted as the "
                     f"step's own trip count)")
    return lines


def summary_row(plan: Plan) -> str:
    """One markdown table row: target, mesh, batch, remat, gathers, peak GB, measured comm, step time, MFU, verdict."""
    m, s = plan.mesh, plan.planned.shape
    measured = sum(p.calls * p.counts.total_bytes() for p in plan.programs if p.counts)
    analytic = sum(plan.analytic_bytes.values())
    rank = s["micro"] // (m["data"] * m["fsdp"]) if "micro" in s else 0
    c = plan.planned.model
    return (f"| {plan.target.name} | {m['data']},{m['fsdp']},{m['tensor']} | {rank}/rank x {s.get('accum', 1)} | "
            f"{c.remat} | {c.gather_dtype or c.param_dtype} | {plan.peak_bytes / GB:.1f} of "
            f"{plan.target.device_memory / GB:.0f} | {analytic / GB:,.0f} | {measured / GB:,.0f} | "
            f"{plan.step_s:.1f} s | {100 * plan.mfu:.0f}% | {'fits' if plan.fits else 'does not fit'} |")
