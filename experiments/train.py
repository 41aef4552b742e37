"""Train one stage from a config: ``python -m experiments.train --config=configs/pretrain.py:<preset> --workdir=DIR``.

Any config field can be overridden (``--config.optim.lr=3e-4``). Re-running the same command resumes from the
workdir's last checkpoint. ``config.stage`` names the stage (``gptjax.stages.registry``), whose runner turns
the config into a model, an objective and data iterators for its training loop.
A workdir is locked while a run uses it: a second launch on it is refused in one line (``--wait_for_lock``: it
waits instead). SIGINT (Ctrl-C) or SIGTERM (preemption) stops after the current step and its checkpoint (exit
status 130 / 143; re-run to resume); a second one exits at once. Re-running a finished run prints its summary and
changes nothing. Bad input (config, data, workdir, disk, checkpoints) ends in one error line and exit status 1;
``--verbose`` adds the traceback.
"""

from __future__ import annotations

import json

from absl import app, flags

from gptjax import cli
from gptjax import distributed
from gptjax.errors import ConfigError
from gptjax.stages import registry
from gptjax.train import metrics as metrics_lib

_CONFIG = cli.define_config_file("config", None, "Config file and preset, e.g. configs/pretrain.py:tiny.",
                                  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics. Resumed if it exists.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose stored config differs (sets train.allow_config_change).")
_WAIT_FOR_LOCK = flags.DEFINE_bool(
    "wait_for_lock", False, "When another process runs in the workdir, wait for it to finish instead of refusing "
    "(sets train.wait_for_lock).")
distributed.define_flags()  # --coordinator_address/--num_processes/--process_id/--distributed (multi-host)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    metrics_lib.quiet_library_logs()
    try:
        distributed.initialize_from_flags()  # before any other JAX call; a no-op for one process
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg, workdir = _CONFIG.value, _WORKDIR.value
    cfg.train.allow_config_change = cfg.train.allow_config_change or _ALLOW_CONFIG_CHANGE.value
    cfg.train.wait_for_lock = cfg.train.wait_for_lock or _WAIT_FOR_LOCK.value
    result = registry.run_stage(cfg, workdir)
    if getattr(result, "summary", None) is not None:
        print(f"{workdir} holds a finished run; nothing changed. Its summary: {json.dumps(result.summary)}")
    eval_metrics = getattr(result, "eval_metrics", None)
    if eval_metrics and "eval/loss" in eval_metrics:
        print(f"step {result.step}: validation loss {eval_metrics['eval/loss']:.4f} "
              f"(perplexity {eval_metrics.get('eval/perplexity', float('nan')):.2f})")
    else:
        final = getattr(result, "train_metrics", None) or getattr(result, "metrics", None) or {}
        print(f"step {result.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()
                                                   if isinstance(v, (int, float))))
    for text in getattr(result, "samples", None) or []:
        print(f"sample: {text!r}")


def run():
    """Console-script entry point (``gptjax-train``)."""
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)


if __name__ == "__main__":
    run()
