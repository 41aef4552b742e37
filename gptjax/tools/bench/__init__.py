"""Benchmarks of the project's own hot paths: tokens/s, MFU, peak memory and compile time per workload.

Workloads (each the exact jitted function training uses, on synthetic data already on the device). Every stage
with a ``bench`` hook is one (``gptjax.stages.registry``):

- ``pretrain`` / ``sft``: ``train.loop.make_train_step`` with ``lm_loss`` / ``sft_loss`` (AdamW, clipping, NaN
  guard, state donated), as ``run_training`` jits it;
- ``reward``: the same step with ``reward_loss`` on (prompts, K, T) ranking batches;
- ``ppo``: one iteration's programs (``stages.ppo.loop.make_iteration``): the experience step (KV-cache rollout +
  policy/reference/value/reward scoring + GAE) and the update (clipped policy/value updates over the rollout
  batch, state donated), reported as ``ppo-rollout``, ``ppo-update`` and the whole iteration ``ppo`` with the
  rollout's share of its time;
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

Modules: ``results`` (rows, JSON, targets), ``table``, ``timing`` (compile, memory, timed calls, profiles),
``context`` (what a workload measures with; each stage's hook gets one), ``workloads`` (``run``).
"""

from gptjax.tools.bench.context import Context, batch_candidates, describe, make_mesh, model_config, model_mfu
from gptjax.tools.bench.results import RESULT_FIELDS, SCHEMA, Result, apply_target, environment, read_json, write_json
from gptjax.tools.bench.table import format_op_times, format_table, table_row
from gptjax.tools.bench.timing import EXPERIMENTAL_GPU_XLA_FLAGS, recommended_xla_flags
from gptjax.tools.bench.workloads import parse_workloads, run, workloads

__all__ = ["Context", "EXPERIMENTAL_GPU_XLA_FLAGS", "RESULT_FIELDS", "SCHEMA", "Result", "apply_target",
           "batch_candidates", "describe", "environment", "format_op_times", "format_table", "make_mesh",
           "model_config", "model_mfu", "parse_workloads", "read_json", "recommended_xla_flags", "run", "table_row",
           "workloads", "write_json"]
