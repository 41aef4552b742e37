"""What a plan found (``Plan``) and how it is printed."""

from __future__ import annotations

import dataclasses

from gptjax.model import GPTConfig
from gptjax.tools.plan.comm import COLLECTIVES
from gptjax.tools.plan.targets import GB, Target, format_bytes


@dataclasses.dataclass
class Plan:
    """Everything a plan found; bytes and FLOPs are per device, times per optimizer step."""

    target: Target
    model_name: str
    model_cfg: GPTConfig
    params_total: int
    mesh: dict[str, int]
    batch_size: int  # sequences per optimizer step
    micro: int  # sequences per accumulation microbatch (global)
    accum: int  # microbatches per step
    seq_len: int
    notes: list[str]
    param_bytes: float
    opt_bytes: float
    batch_bytes: float
    grad_bytes: float  # estimate (inside temporaries)
    argument_bytes: float  # compiler
    output_bytes: float
    alias_bytes: float
    temp_bytes: float
    code_bytes: float
    compiler_flops: float | None  # as reported: loop bodies counted once (None: the compiler refused)
    hardware_flops: float | None  # compiler count times trip counts (None without layer_flops)
    model_flops: float  # analytic 6N + 12·L·d·T per token, this device's share of the step
    comm_bytes: dict[str, float]  # per mesh axis
    bandwidth: dict[str, float]  # per mesh axis
    efficiency: float
    lower_s: float
    compile_s: float
    layer_flops_s: float
    compiler_error: str | None = None  # the compiler's refusal (TPU: the program needs more HBM than there is)

    @property
    def peak_bytes(self) -> float:
        """Live at once: arguments, temporaries and outputs that do not reuse (donated) argument buffers."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.compiler_error is None and self.peak_bytes <= self.target.device_memory

    @property
    def breakdown(self) -> dict[str, float]:
        return {"parameters": self.param_bytes, "optimizer state": self.opt_bytes, "gradients": self.grad_bytes,
                "activations and other temporaries": max(self.temp_bytes - self.grad_bytes, 0.0)}

    @property
    def dominant(self) -> str:
        return max(self.breakdown.items(), key=lambda kv: kv[1])[0]

    @property
    def compute_s(self) -> float:
        flops = self.hardware_flops if self.hardware_flops else self.model_flops
        return flops / (self.target.peak_flops * self.efficiency)

    @property
    def comm_s(self) -> float:
        return sum(b / self.bandwidth[axis] for axis, b in self.comm_bytes.items())

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.comm_s)

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_s * self.target.peak_flops)

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.seq_len / self.step_s

    def verdict(self) -> str:
        use = self.peak_bytes / self.target.device_memory
        bound = "communication" if self.comm_s > self.compute_s else "compute"
        if self.fits:
            return (f"FITS: {format_bytes(self.peak_bytes)} of {format_bytes(self.target.device_memory)} per device "
                    f"({100 * use:.0f}%); {self.dominant} dominate; {bound}-bound")
        per_rank = self.micro // (self.mesh["data"] * self.mesh["fsdp"])
        shrink = []
        if per_rank > 1:
            shrink.append("a smaller microbatch per device (raise optim.grad_accum_steps)")
        if self.model_cfg.remat != "full":
            shrink.append("more remat (model.remat=full)")
        shrink.append("tensor parallelism (the mesh's tensor axis splits activations and weights)")
        split = "more devices on fsdp/tensor"
        hint = {"activations and other temporaries": " or ".join(shrink), "optimizer state": split,
                "parameters": split, "gradients": split + (" or fewer accumulation steps (no float32 "
                                                           "accumulator at optim.grad_accum_steps=1)"
                                                           if self.accum > 1 else "")}
        refused = "the compiler refused the program; " if self.compiler_error else ""
        return (f"DOES NOT FIT: {refused}{format_bytes(self.peak_bytes)} per device > "
                f"{format_bytes(self.target.device_memory)} ({100 * use:.0f}%); {self.dominant} dominate -> try "
                f"{hint[self.dominant]}")


def format_plan(plan: Plan) -> str:
    """The plan as a readable table (what experiments.plan prints)."""
    c, m = plan.model_cfg, plan.mesh
    big = max(plan.argument_bytes, plan.temp_bytes) >= 0.1 * GB
    scale, unit = (GB, "GB") if big else (1e6, "MB")
    gb = lambda b: f"{b / scale:10.2f} {unit}"  # noqa: E731
    lines = [
        f"plan: {plan.model_name} ({plan.params_total / 1e9:.2f}B params) train step on {plan.target.name}, "
        f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}",
        f"  batch {plan.batch_size} x {plan.seq_len} tokens = {plan.accum} microbatch(es) of {plan.micro} "
        f"({plan.micro // (m['data'] * m['fsdp'])} per data-parallel rank); remat {c.remat}; compute {c.dtype}, "
        f"params {c.param_dtype}",
        *[f"  note: {n}" for n in plan.notes],
        f"  lowered in {plan.lower_s:.1f} s, compiled in {plan.compile_s:.1f} s"
        + (f" (+ {plan.layer_flops_s:.1f} s lowering 1- and 2-group variants for the FLOP count)"
           if plan.hardware_flops is not None else ""),
        *([f"  the compiler refused: {plan.compiler_error}"] if plan.compiler_error else []),
        "per device memory",
        f"  parameters                        {gb(plan.param_bytes)}",
        f"  optimizer state                   {gb(plan.opt_bytes)}",
        f"  batch                             {gb(plan.batch_bytes)}",
        f"  = arguments (compiler)            {gb(plan.argument_bytes)}",
        f"  gradients (estimate)              {gb(plan.grad_bytes)}   part of the temporaries",
        f"  activations and other temporaries {gb(plan.breakdown['activations and other temporaries'])}",
        f"  = temporaries (compiler)          {gb(plan.temp_bytes)}",
        f"  outputs not aliased to arguments  {gb(plan.output_bytes - plan.alias_bytes)}",
        f"  peak                              {gb(plan.peak_bytes)}   of {gb(plan.target.device_memory).strip()}",
        "FLOPs per step per device",
    ]
    if plan.compiler_flops is not None:
        lines.append(f"  compiler, as reported             {plan.compiler_flops:10.3e}   (each loop body counted once)")
    if plan.hardware_flops is not None:
        lines.append(f"  compiler x loop trip counts       {plan.hardware_flops:10.3e}   (hardware FLOPs, incl. "
                     f"remat recompute)")
    lines += [
        f"  analytic 6N + 12LdT               {plan.model_flops:10.3e}   (model FLOPs, gptjax.flops)",
        f"time per step (peak {plan.target.peak_flops / 1e12:.0f} TFLOP/s per device at {100 * plan.efficiency:.0f}% "
        f"on {'hardware' if plan.hardware_flops else 'model'} FLOPs; communication overlapped)",
        f"  compute                           {plan.compute_s:10.3f} s",
    ]
    for axis, b in plan.comm_bytes.items():
        lines.append(f"  {COLLECTIVES[axis]:<50} {b / plan.bandwidth[axis]:10.3f} s   ({b / GB:,.1f} GB per device "
                     f"at {plan.bandwidth[axis] / 1e9:.0f} GB/s)")
    lines += [
        f"  step = max(compute, communication) {plan.step_s:9.3f} s   -> {plan.tokens_per_s:,.0f} tokens/s, "
        f"MFU {100 * plan.mfu:.1f}%",
        f"verdict: {plan.verdict()}",
    ]
    return "\n".join(lines)


def summary_row(plan: Plan) -> str:
    """One markdown table row: target, mesh, batch, remat, GB per device, step time, MFU, verdict."""
    m = plan.mesh
    return (f"| {plan.target.name} | {m['data']},{m['fsdp']},{m['tensor']} | {plan.batch_size}x{plan.seq_len} "
            f"({plan.micro // (m['data'] * m['fsdp'])}/rank x {plan.accum}) | {plan.model_cfg.remat} | "
            f"{plan.param_bytes / GB:.1f} / {plan.opt_bytes / GB:.1f} / {plan.temp_bytes / GB:.1f} | "
            f"{plan.peak_bytes / GB:.1f} of {plan.target.device_memory / GB:.0f} | {plan.step_s:.2f} s | "
            f"{100 * plan.mfu:.0f}% | {'fits' if plan.fits else 'does not fit'}; {plan.dominant} |")
