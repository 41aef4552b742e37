"""Train one stage from a config: ``python -m experiments.train --config=configs/pretrain.py:<preset> --workdir=DIR``.

Any config field can be overridden (``--config.optim.lr=3e-4``). Re-running the same command resumes from the
workdir's last checkpoint. ``config.stage`` names the stage (``gptjax.stages.registry``), whose runner turns
the config into a model, an objective and data iterators for its training loop.
Bad input ends in one error line and exit status 1.
"""

from __future__ import annotations

import importlib.util
import sys

from absl import app, flags, logging

from gptjax import cli
from gptjax import distributed
from gptjax.assets import AssetMissingError
from gptjax.errors import ConfigError, DataError
from gptjax.stages import registry
from gptjax.train import loop, metrics as metrics_lib

_CONFIG = cli.define_config_file("config", None, "Config file and preset, e.g. configs/pretrain.py:tiny.",
                                  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics. Resumed if it exists.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose stored config differs (sets train.allow_config_change).")
distributed.define_flags()  # --coordinator_address/--num_processes/--process_id/--distributed (multi-host)

# Errors that mean "the input is wrong": reported as one line, no traceback.
USER_ERRORS = (ConfigError, DataError, AssetMissingError, loop.TrainingStopped)


def _unknown_override(argv) -> str | None:
    """For an override of a config field that does not exist, one message naming it and the valid fields."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = cli.resolve_config_path(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("_config_for_error", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    for a in argv:
        if not a.startswith("--config."):
            continue
        keys = a[len("--config."):].split("=", 1)[0].split(".")
        node, seen = cfg, []
        for k in keys:
            if not hasattr(node, "keys") or k not in node:
                where = "config." + ".".join(seen) if seen else "config"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return (f"error: {a.split('=', 1)[0]}: {where} has no field {k!r}; valid fields: {valid}")
            node, seen = node[k], seen + [k]
    return None


def _parse_flags(argv):
    """absl flag parsing with one-line errors (config_flags raises a bare AttributeError for unknown fields)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        message = lines[0] if "Traceback" not in str(e) else f"{lines[0]} {lines[-1]}"
        sys.exit(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as e:
        sys.exit(_unknown_override(argv) or f"error: bad --config override: {e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    metrics_lib.quiet_library_logs()
    try:
        distributed.initialize_from_flags()  # before any other JAX call; a no-op for one process
    except ValueError as e:
        sys.exit(f"error: {e}")
    cfg, workdir = _CONFIG.value, _WORKDIR.value
    if _ALLOW_CONFIG_CHANGE.value:
        cfg.train.allow_config_change = True
    try:
        result = registry.run_stage(cfg, workdir)
    except USER_ERRORS as e:
        logging.flush()
        sys.exit(f"error: {e}")
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
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
