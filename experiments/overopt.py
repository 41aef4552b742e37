"""The reward over-optimisation study (Gao et al. 2022) on the seed world; writes OUT/overopt.{png,json,md}.

    python -m experiments.overopt --workdir=workdirs/demo                 # make overopt
    python -m experiments.overopt --workdir=/tmp/smoke --config=configs/overopt.py:smoke

--workdir is a seed-world pipeline workdir (experiments.chatgpt); without a finished pipeline there
(results.json) the pipeline runs first. Re-running skips every finished part. Method: gptjax/seed_world/overopt.py.
"""

import os

from absl import flags

from gptjax import cli
from gptjax.seed_world import overopt

_CONFIG = cli.define_config_file("config", "configs/overopt.py:default", "Study config.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "The seed-world pipeline workdir (run into if empty).")
_OUT = flags.DEFINE_string("out", None, "Where the study's runs, table and plot go (default: WORKDIR/overopt).")


def main(argv):
    del argv
    results = overopt.run_study(_CONFIG.value, _WORKDIR.value, _OUT.value)
    print(overopt.format_table(results))
    print(f"\nwrote {results['plot']} and {os.path.join(results['out'], overopt.STUDY_FILE)}")


if __name__ == "__main__":
    cli.run(main)
