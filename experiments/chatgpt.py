"""The seed-world pipeline: pretrain → SFT → label → reward model → PPO, then the gold table.

    python -m experiments.chatgpt --workdir=workdirs/demo                  # one seed (make demo)
    python -m experiments.chatgpt --workdir=workdirs/seeds --seeds=0,1,2   # per-seed and mean table (README)

Each seed runs in WORKDIR/seed<N>/ (stages in their own workdirs; re-running resumes). With several seeds the
mean and per-seed values are written to WORKDIR/summary.md and WORKDIR/summary.json.
"""

import json
import os

from absl import flags

from gptjax import cli
from gptjax.seed_world import pipeline, tables
from gptjax.train import metrics as metrics_lib

_CONFIG = cli.define_config_file("config", "configs/chatgpt.py:demo", "Pipeline config.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where the stages' runs go.")
_SEEDS = flags.DEFINE_list("seeds", None, "Run these seeds (default: config.seed).")
_WAIT_FOR_LOCK = flags.DEFINE_bool("wait_for_lock", False, "When another process runs in a stage's workdir, wait "
                                   "for it to finish instead of refusing.")


def main(argv):
    del argv
    metrics_lib.quiet_library_logs()
    cfg = _CONFIG.value
    seeds = [int(s) for s in _SEEDS.value] if _SEEDS.value else [int(cfg.seed)]
    all_results, reports = [], []
    for seed in seeds:
        seed_cfg = cfg.copy_and_resolve_references()
        seed_cfg.seed = seed
        for name in pipeline.STAGE_NAMES:
            seed_cfg[name].train.wait_for_lock = _WAIT_FOR_LOCK.value
        workdir = _WORKDIR.value if len(seeds) == 1 else os.path.join(_WORKDIR.value, f"seed{seed}")
        results = pipeline.run_pipeline(seed_cfg, workdir)
        reports.append(f"=== seed {seed} ({results['timings_s']['total']:.0f} s) ===\n{tables.format_report(results)}")
        print("\n" + reports[-1])
        all_results.append(results)
    if len(seeds) > 1:
        summary = tables.summarize_seeds(all_results)
        with open(os.path.join(_WORKDIR.value, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        table = tables.format_seed_summary(summary)
        with open(os.path.join(_WORKDIR.value, "summary.md"), "w") as f:
            f.write(table + "\n\n" + "\n\n".join(f"```text\n{r}\n```" for r in reports) + "\n")
        print("\n" + table)


def run():
    """Console-script entry point (``gptjax-chatgpt``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
