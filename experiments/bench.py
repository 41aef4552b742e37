"""Benchmark the training steps and the sampler: ``python -m experiments.bench --config=configs/bench.py:<name>``.

    python -m experiments.bench --config=configs/bench.py:cpu-tiny [--workloads=pretrain,sample] [--out=r.json]
    python -m experiments.bench --merge='out/*.json' [--out=all.json]     # one table from several result files

Prints one Markdown table row per workload (tokens/s, MFU, peak memory, compile time, the target where the
config has one) and writes the rows as JSON (gptjax/tools/bench.py documents the method and every field). Config
fields can be overridden (``--config.batch_size=24``). XLA flags are not set here: pass them in XLA_FLAGS
(scripts/gpu_bench.sh uses ``gptjax.tools.bench.recommended_xla_flags``). Bad input ends in one error line.
"""

from __future__ import annotations

import glob
import os
import sys

from absl import app, flags

from gptjax import cli
from gptjax.errors import ConfigError
from gptjax.tools import bench

_CONFIG = cli.define_config_file("config", None, "Bench config, e.g. configs/bench.py:cpu-tiny.",
                                  lock_config=True)
_WORKLOADS = flags.DEFINE_string("workloads", None, f"Comma-separated subset of {','.join(bench.workloads())} "
                                 "(default: the config's own list).")
_OUT = flags.DEFINE_string("out", None, "Write the results (and environment) as JSON here.")
_LABEL = flags.DEFINE_string("label", "", "Tag for this run's rows (e.g. the variant measured).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Trace one more call of each workload with jax.profiler "
                                   "into this folder (TensorBoard/Perfetto) and print its top device ops.")
_MERGE = flags.DEFINE_string("merge", None, "Instead of measuring: glob of result JSON files to print as one table.")


def _merge(pattern: str) -> None:
    paths = sorted(glob.glob(pattern), key=os.path.getmtime)  # the order they were measured in
    if not paths:
        raise ConfigError(f"--merge={pattern!r} matches no files")
    rows, metas = [], []
    for path in paths:
        meta, results = bench.read_json(path)
        metas.append(meta)
        rows.extend(results)
    print(bench.format_table(rows))
    if _OUT.value:
        meta = dict(metas[0]) if metas else {}
        meta["merged_from"] = paths
        bench.write_json(_OUT.value, rows, meta)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _MERGE.value:
        _merge(_MERGE.value)
        return
    if _CONFIG.value is None:
        raise ConfigError("pass --config=configs/bench.py:<name> (or --merge=GLOB)")
    cfg = _CONFIG.value
    meta = bench.environment()
    print(f"# {cfg.name} on {meta['device_kind']} ({meta['platform']}), jax {meta['jax']}, "
          f"XLA_FLAGS={meta['xla_flags'] or '(none)'}", flush=True)

    def progress(result):  # each row as soon as it is measured, in case a later workload dies
        print("measured: " + " | ".join(bench.table_row(result)), file=sys.stderr, flush=True)

    results = bench.run(cfg, _WORKLOADS.value, label=_LABEL.value, on_result=progress,
                        profile_dir=_PROFILE_DIR.value)
    print(bench.format_table(results), flush=True)
    for r in results:
        if "top_ops" in r.extra:
            print(f"\n# device time by op, {r.workload}{' [' + r.label + ']' if r.label else ''} (one traced call)\n"
                  + bench.format_op_times(r.extra["top_ops"]), flush=True)
    if _OUT.value:
        bench.write_json(_OUT.value, results, meta)
    if any(r.status != "ok" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
