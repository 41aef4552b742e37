"""PPO, GRPO, RLOO (learned and verifiable reward), DPO and rejection sampling compared on the seed world at equal
budgets; writes OUT/compare.{json,md} and OUT/compare_{kl,tokens}.png.

    python -m experiments.compare --workdir=workdirs/demo                   # make compare
    python -m experiments.compare --workdir=/tmp/smoke --config=configs/compare.py:smoke

--workdir is a seed-world pipeline workdir (experiments.chatgpt); without a finished pipeline there (results.json)
the pipeline runs first. Re-running skips every finished run and evaluation. Method: gptjax/seed_world/compare.py.
"""

import os
import sys

import jax
from absl import app, flags

from gptjax import cli
from gptjax.errors import ConfigError, DataFormatError
from gptjax.seed_world import compare, compare_report
from gptjax.train import metrics as metrics_lib

_CONFIG = cli.define_config_file("config", "configs/compare.py:default", "Comparison config.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "The seed-world pipeline workdir (run into if empty).")
_OUT = flags.DEFINE_string("out", None, "Where the runs, table and plots go (default: WORKDIR/compare).")


def main(argv):
    del argv
    metrics_lib.quiet_library_logs()
    # The seeds of a method compile the same programs: share them across runs (and re-runs) on disk.
    out = os.path.abspath(_OUT.value or os.path.join(_WORKDIR.value, "compare"))
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
    try:
        results = compare.run_comparison(_CONFIG.value, _WORKDIR.value, _OUT.value)
    except (ConfigError, DataFormatError) as e:
        sys.exit(f"compare: error: {e}")
    print(compare_report.format_table(results))
    print(f"\nwrote {compare.RESULTS_FILE}, compare.md and {', '.join(results['plots'].values())} in {out}")


if __name__ == "__main__":
    app.run(main)
