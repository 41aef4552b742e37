"""Run a sweep of training runs from one sweep file, here or on a SLURM cluster, and gather the results table.

    python -m experiments.sweep --sweep=configs/sweeps/shakespeare_sizes.py --root=workdirs/sweep
    python -m experiments.sweep --sweep=... --root=... --mode=slurm --partition=gpu --time=02:00:00
    python -m experiments.sweep --sweep=... --root=... --mode=gather      # only rebuild results.csv/json
    python -m experiments.sweep --sweep=... --sizes_only                  # non-embedding params per model size

Every run's overrides are checked against the base config before anything runs. Local mode is resumable:
rerunning the same command skips finished runs and restarts the others in their workdirs.
"""

import sys

from absl import flags

from gptjax import cli
from gptjax.tools import sweep as sweep_lib

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (configs/sweeps/<name>.py) defining get_sweep().",
                             required=True)
_ROOT = flags.DEFINE_string("root", None, "Sweep root: one workdir per run, plus results.csv/json.")
_MODE = flags.DEFINE_enum("mode", "local", ["local", "slurm", "gather"],
                          "local: run here one after another; slurm: write commands.txt + sweep.sbatch; "
                          "gather: only rebuild the results table.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate and print each run's status and command; run nothing.")
_SIZES_ONLY = flags.DEFINE_bool("sizes_only", False, "Print the parameter counts of the sweep's model sizes.")
_COMMAND = flags.DEFINE_string("command", sweep_lib.DEFAULT_COMMAND,
                               "Command template per run: {python} {base_config} {workdir} {name}, and a lone "
                               "{overrides} that expands to the run's --config.<field>=<value> flags.")
_PARTITION = flags.DEFINE_string("partition", None, "SLURM partition (omitted from the script when unset).")
_GPUS_PER_TASK = flags.DEFINE_integer("gpus_per_task", 1, "SLURM --gpus-per-task (0: no GPU line).")
_CPUS_PER_TASK = flags.DEFINE_integer("cpus_per_task", None, "SLURM --cpus-per-task.")
_TIME = flags.DEFINE_string("time", "04:00:00", "SLURM --time limit per run.")
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", None, "SLURM array throttle (%N): runs at once.")


def _print_sizes(sweep, base):
    sizes = sweep_lib.model_sizes(sweep, base.get("model") if hasattr(base, "get") else None)
    print(f"{'model':<18} {'params':>12} {'non-embedding':>14}")
    for label, counts in sizes:
        print(f"{label:<18} {counts['total']:>12,} {counts['non_embedding']:>14,}")
    span = sizes[-1][1]["non_embedding"] / sizes[0][1]["non_embedding"]
    print(f"{len(sizes)} sizes spanning {span:.1f}x in non-embedding parameters")


def _print_table(rows):
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(f"results: {len(rows)} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})")
    for row in rows:
        loss = row.get("final_val_loss")
        print(f"  {row['status']:<10} {row['name']:<48} final_val_loss="
              f"{'-' if loss is None else f'{loss:.4f}'}")


def main(argv):
    del argv
    sweep = sweep_lib.load_sweep(_SWEEP.value)
    base = sweep_lib.validate(sweep)
    if _SIZES_ONLY.value:
        _print_sizes(sweep, base)
        return
    if not _ROOT.value:
        raise sweep_lib.SweepError("--root is required: the directory that holds one workdir per run")
    root = _ROOT.value
    command_fn = sweep_lib.template_command(_COMMAND.value, sweep.base_config)
    if _DRY_RUN.value:
        codes = sweep_lib.last_exit_codes(root)
        for i, run in enumerate(sweep.runs, start=1):
            workdir = sweep_lib.workdir_of(root, run)
            print(f"[{i}/{len(sweep.runs)}] {sweep_lib.run_status(root, run, codes):<10} {run.name}\n"
                  f"    {' '.join(command_fn(run, workdir))}")
        return
    failed = {}
    try:
        if _MODE.value == "local":
            codes = sweep_lib.run_local(sweep, root, command_fn)
            failed = {name: code for name, code in codes.items() if code != 0}
        elif _MODE.value == "slurm":
            commands, sbatch = sweep_lib.write_slurm(
                sweep, root, command_fn, partition=_PARTITION.value, gpus_per_task=_GPUS_PER_TASK.value,
                time_limit=_TIME.value, cpus_per_task=_CPUS_PER_TASK.value, max_parallel=_MAX_PARALLEL.value)
            print(f"wrote {commands}")
            print(f"submit: sbatch {sbatch}" if sbatch else "every run is finished: nothing to submit")
    finally:  # the table reflects whatever finished, even after a failure or Ctrl-C
        rows = sweep_lib.gather(sweep, root)
        csv_path, json_path = sweep_lib.write_results(sweep, rows, root)
    _print_table(rows)
    print(f"wrote {csv_path} and {json_path}")
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed: {failed}; see {root}/logs/<run>.log, then rerun this "
                 f"command to retry them")


if __name__ == "__main__":
    cli.run(main)
