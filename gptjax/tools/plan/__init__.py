"""Ahead-of-time planner: does a config's train step fit a cluster, and how fast would it run there?

The real train step of the config's stage (``train.loop.make_train_step`` with the config's AdamW from
``train.optim`` and the stage's ``objective`` from the stage registry, jitted as ``loop.run_training`` jits it) is
lowered and compiled for the target's devices from abstract, sharded arguments (``jax.ShapeDtypeStruct`` with
shardings, the batch from the stage's batch contract: nothing is allocated). The memory figures are the
compiler's own for that program.

Targets: N fake CPU devices (the process must start with ``--xla_force_host_platform_device_count=N`` in
``XLA_FLAGS``; ``experiments.plan`` arranges that), or a TPU slice by name through
``jax.experimental.topologies`` (needs libtpu, not a TPU: the TPU compiler runs on this CPU).

What a plan reports, per device:
- bytes: parameters and optimizer state (from their shardings; with the batch they make up the compiler's
  argument bytes), gradients (estimated: one parameter-shaped copy, plus a float32 accumulator with gradient
  accumulation), the compiler's temporaries (activations, gradients, gathered FSDP weights …) and the peak;
- FLOPs per step: the compiler's count (``cost_analysis``) and the analytic 6·N + 12·L·d·T count of
  ``gptjax.flops`` (model FLOPs). XLA counts a loop body once — a 96-layer scan, and the gradient-accumulation
  loop — so the raw count is far too low; ``layer_flops=True`` also lowers 1- and 2-group unscanned variants
  to measure one layer group and reports the count times the trip counts (hardware FLOPs, remat recompute
  included; see ``hardware_flops``);
- time: compute = hardware FLOPs / (peak × efficiency); communication = the analytic bytes of the
  collectives each mesh axis implies (``collective_bytes``) / that axis's bandwidth (``axis_bandwidth``);
  step = max of the two (communication fully overlapped), MFU = model FLOPs / (step time × peak).

Caveat for CPU targets: the program is the CPU compiler's. Its fusion and buffer assignment differ from a GPU
compiler's, so temporaries are an estimate of the GPU's (the TPU path uses the TPU compiler itself).
"""

from __future__ import annotations

from gptjax.tools.plan.comm import COLLECTIVES, axis_bandwidth, collective_bytes  # noqa: F401
from gptjax.tools.plan.report import Plan, format_plan, summary_row  # noqa: F401
from gptjax.tools.plan.steps import (CompiledStep, compile_train_step, hardware_flops, model_config_of,  # noqa: F401
                                    per_device_bytes, plan_train_step, resolve_microbatch)
from gptjax.tools.plan.targets import (DEFAULT_EFFICIENCY, GB, GPU_LINK_BANDWIDTH, GPU_NODE_BANDWIDTH,  # noqa: F401
                                      GPUS_PER_NODE, H100_PEAK, LIBTPU_HINT, LIBTPU_REQUIREMENT, LIBTPU_SIDE_DIR,
                                      TPU_LINK_BANDWIDTH, TPU_MEMORY, TPU_PEAK, Target, cpu_target, format_bytes,
                                      libtpu_library, make_target_mesh, parse_bytes, tpu_target)
