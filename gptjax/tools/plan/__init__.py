"""Ahead-of-time planner: does a stage's step fit a cluster, how fast would it run there, and what would it cost?

Each stage names the jitted programs one of its steps runs (``Stage.plan``, ``gptjax.train.aot``): pretraining,
SFT and the reward model the shared train step (``train.loop.make_train_step`` with the config's AdamW and the
stage's objective); PPO the experience program (KV-cache sampler, policy/reference/value/reward forwards, GAE) and
the update program of an iteration. Each is lowered and compiled for the target's devices from abstract, sharded
arguments (nothing is allocated), and measured from the compiler's own output:

- memory per device (``memory_analysis``): arguments, temporaries, outputs, plus what the step holds beside the
  program (PPO's optimizer states during the rollout); the step's peak is the largest program's;
- FLOPs and communication from the optimized HLO (``hlo``): every dot and every all-gather / reduce-scatter /
  all-reduce / all-to-all / collective-permute, with its bytes and mesh axes, times the trip counts of the loops it
  sits in (XLA's own cost analysis counts a loop body once);
- time per program: max(compute = FLOPs / (peak × efficiency), memory = dot bytes / HBM bandwidth,
  communication = measured bytes / each axis's bandwidth), i.e. perfectly overlapped; the programs of a step run
  one after the other; MFU = analytic model FLOPs (``gptjax.flops``) / (step time × peak × devices).

Targets (``targets``): N fake CPU devices (the process must start with
``--xla_force_host_platform_device_count=N``; ``experiments.plan`` arranges that), or a TPU slice by name through
``jax.experimental.topologies`` (needs libtpu, not a TPU: the TPU compiler runs on this CPU). ``search`` looks for
the fastest recipe that fits; ``cost`` turns a plan into device-hours, dollars and energy.

Caveats for CPU targets: the program is the CPU compiler's. Its fusion and buffer assignment differ from a GPU
compiler's, so temporaries are an estimate of the GPU's (the TPU path uses the TPU compiler itself); it has no
16-bit collectives (it widens them to float32; ``hlo`` counts them at their own width) and it reduces gradients
with all-reduce where a GPU compiler would reduce-scatter (twice the bytes).
"""

from __future__ import annotations

from gptjax.tools.plan.comm import COLLECTIVES, axis_bandwidth, bandwidth_of, collective_bytes  # noqa: F401
from gptjax.tools.plan.programs import (compile_program, hardware_flops, per_device_bytes, plan_stage,  # noqa: F401
                                        stage_plan)
from gptjax.tools.plan.report import Plan, ProgramResult, format_plan, summary_row  # noqa: F401
from gptjax.tools.plan.targets import (DEFAULT_EFFICIENCY, GB, GPU_LINK_BANDWIDTH, GPU_NODE_BANDWIDTH,  # noqa: F401
                                      GPUS_PER_NODE, H100_PEAK, LIBTPU_HINT, LIBTPU_REQUIREMENT, LIBTPU_SIDE_DIR,
                                      TPU_LINK_BANDWIDTH, TPU_MEMORY, TPU_PEAK, Target, cpu_stand_in, cpu_target,
                                      format_bytes, libtpu_library, make_target_mesh, parse_bytes, tpu_target)
from gptjax.train.aot import resolve_microbatch  # noqa: F401
