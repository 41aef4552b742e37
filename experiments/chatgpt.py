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
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 2, "On a CPU, split the host into this many XLA devices and each batch over them (data "
    "parallel): on 2 cores the demo runs ~10% faster on 2 devices than on one. 0 leaves XLA_FLAGS as they are, and so "
    "does an XLA_FLAGS that sets --xla_force_host_platform_device_count itself. Several runs side by side on a small "
    "CPU: use 1 (a starved device stalls the others' collectives).")
_WAIT_FOR_LOCK = flags.DEFINE_bool("wait_for_lock", False, "When another process runs in a stage's workdir, wait "
                                   "for it to finish instead of refusing.")


def _split_host(devices: int) -> None:
    """Sets the host device count before JAX starts its CPU backend (XLA reads XLA_FLAGS then, not at import);
    accelerators are unaffected."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if devices > 0 and "--xla_force_host_platform_device_count" not in xla_flags:
        os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip()


def main(argv):
    del argv
    _split_host(_CPU_DEVICES.value)
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
