"""What a planned run costs: device-hours, days, dollars and energy, from a plan's step time.

Assumptions, stated where they are printed: the run takes ``tokens`` (pretraining, SFT, reward model) or
``episodes`` (PPO) divided by what one step consumes, each step as long as the plan's estimate (no restarts, no
evaluation, no checkpoints, no input stalls); dollars at a per-device-hour price; energy at the device's thermal
design power for the whole run (the device only: no host, network or cooling).

Default prices are on-demand list prices (assumptions, dated; pass ``--price_per_device_hour`` for yours):
- H100 SXM: $2.99 per GPU-hour, Lambda on-demand 8x H100 SXM instances (lambda.ai/pricing, 2025);
- TPU v5p $4.20, v5e $1.20, v6e $2.70, v4 $3.22 per chip-hour: Google Cloud TPU pricing, on-demand, us regions
  (cloud.google.com/tpu/pricing, 2024-2025).
Power (TDP): H100 SXM and H200 SXM up to 700 W (NVIDIA H100 / H200 datasheets), A100 SXM 400 W (NVIDIA A100
datasheet). Google publishes no per-chip TDP for TPUs: give ``--device_watts`` for energy there.

Reference figures: GPT-3 175B trained on 300B tokens for 3.14e23 FLOPs (Brown et al. 2020, Table D.1: 6·N·D,
attention left out); InstructGPT's PPO ran 256k episodes (Ouyang et al. 2022, App. C.4).
"""

from __future__ import annotations

import dataclasses

from gptjax import flops as flops_lib
from gptjax.errors import ConfigError
from gptjax.model import count_params
from gptjax.tools.plan.report import Plan

PRICE_PER_DEVICE_HOUR = {"H100 SXM": 2.99, "TPU v5p": 4.20, "TPU v5e": 1.20, "TPU v5litepod": 1.20,
                         "TPU v6e": 2.70, "TPU v4": 3.22}
DEVICE_WATTS = {"H100 SXM": 700.0, "H200 SXM": 700.0, "A100 SXM": 400.0}
GPT3_175B_PAPER_FLOPS = 3.14e23  # Brown et al. 2020, Table D.1
INSTRUCTGPT_PPO_EPISODES = 256_000  # Ouyang et al. 2022, App. C.4


@dataclasses.dataclass
class Cost:
    amount: float  # tokens or episodes
    unit: str
    steps: float
    seconds: float
    device_hours: float
    dollars: float | None
    kwh: float | None
    price: float | None
    watts: float | None
    devices: int
    six_n_d: float | None  # 6·N·D (pretraining-like stages)
    model_flops: float  # the plan's model FLOPs (attention included) over the run


def run_cost(plan: Plan, amount: float, *, price: float | None = None, watts: float | None = None) -> Cost:
    """The cost of consuming ``amount`` of the plan's unit (tokens or episodes) at the plan's step time."""
    if not amount > 0:
        raise ConfigError(f"--tokens/--episodes must be positive, got {amount}")
    if price is not None and price < 0 or watts is not None and watts <= 0:
        raise ConfigError("--price_per_device_hour must be >= 0 and --device_watts positive")
    planned = plan.planned
    steps = amount / planned.per_step
    seconds = steps * plan.step_s
    hours = seconds * plan.devices / 3600
    price = PRICE_PER_DEVICE_HOUR.get(plan.target.kind) if price is None else price
    watts = DEVICE_WATTS.get(plan.target.kind) if watts is None else watts
    six_n_d = 6 * count_params(planned.model)["total"] * amount if planned.unit == "tokens" else None
    return Cost(amount, planned.unit, steps, seconds, hours, None if price is None else hours * price,
                None if watts is None else hours * watts / 1000, price, watts, plan.devices, six_n_d,
                plan.model_flops * steps)


def format_cost(plan: Plan, cost: Cost) -> str:
    days = cost.seconds / 86400
    lines = [f"cost of {cost.amount:,.3g} {cost.unit} ({cost.steps:,.0f} steps of {plan.step_s:.2f} s, MFU "
             f"{100 * plan.mfu:.1f}%):"]
    if cost.six_n_d is not None:
        seq_len = plan.planned.shape.get("seq_len", 0)
        attn = flops_lib.flops_per_token(plan.planned.model, seq_len) * cost.amount
        lines.append(f"  training FLOPs: 6·N·D = {cost.six_n_d:.3e} (attention left out, as Brown et al. 2020, "
                     f"Table D.1 count GPT-3 175B: {GPT3_175B_PAPER_FLOPS:.2e}); with attention (6N + 12LdT) "
                     f"{attn:.3e}")
    lines += [f"  model FLOPs over the run {cost.model_flops:.3e} (the plan's, attention included)",
              f"  {cost.device_hours:,.0f} device-hours = {cost.device_hours / 24:,.0f} device-days = {days:,.1f} "
              f"days on {cost.devices} devices"]
    if cost.dollars is not None:
        lines.append(f"  ${cost.dollars:,.0f} at ${cost.price:.2f} per device-hour (assumed on-demand list price; "
                     f"--price_per_device_hour)")
    else:
        lines.append(f"  dollars: no price known for {plan.target.kind!r}; pass --price_per_device_hour")
    if cost.kwh is not None:
        lines.append(f"  {cost.kwh / 1000:,.1f} MWh at {cost.watts:.0f} W per device (TDP, device only)")
    else:
        lines.append(f"  energy: no published TDP for {plan.target.kind!r}; pass --device_watts")
    lines.append("  assumes every step as estimated: no restarts, evaluation, checkpoints or input stalls")
    return "\n".join(lines)
