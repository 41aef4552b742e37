"""Sweeps: expand a sweep file into runs, run them resumably (here or as a SLURM array), gather one results table.

A sweep file (``configs/sweeps/<name>.py``) defines ``get_sweep()`` returning a ConfigDict (or dict) with

    base_config  the trainer's ``--config`` value, e.g. "configs/pretrain.py:shakespeare-sp"
    overrides    fields set in every run: a nested mapping ({"train": {"steps": 300}}) or dotted keys
    axes         a list of axes. An axis is either a list of override mappings, one per point
                 ([{"model.num_layers": 2, "model.d_model": 64}, ...]: e.g. model sizes), or a mapping
                 field -> list of values whose lists are zipped ({"optim.lr": [1e-3, 3e-3]})
    combine      "product": every combination of one point per axis; "zip": the i-th point of every axis

A run is one trainer invocation in ``<root>/<run name>``; its name is derived from its swept values only, so
re-expanding the same file always gives the same workdirs. A run is finished once the trainer has written
``summary.json``; anything else is rerun in the same workdir, where the trainer resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from gptjax.cli import resolve_config_path
from gptjax.errors import UserError

SPEC_KEYS = ("base_config", "overrides", "axes", "combine")
COMBINE_MODES = ("product", "zip")
SUMMARY_FILE = "summary.json"
EVENTS_FILE = "sweep_events.jsonl"  # start/end of every local attempt: gives "failed" vs "incomplete"
# Columns taken from each run's summary.json, in table order.
RESULT_FIELDS = ("params", "non_embedding_params", "tokens", "flops", "final_val_loss", "best_val_loss",
                 "wall_time_s", "steps")
# {overrides} must stand alone: it expands to one --config.<field>=<value> argument per override.
DEFAULT_COMMAND = "{python} -m experiments.train --config={base_config} --workdir={workdir} {overrides}"

CommandFn = Callable[["Run", str], list[str]]


class SweepError(UserError, ValueError):
    """A sweep file, its base config or a sweep root is unusable; the message names the file/field and the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # directory name under the sweep root, derived from ``swept``
    swept: dict[str, Any]  # this run's axis values: dotted field -> value, in axis order
    overrides: dict[str, Any]  # every --config.<field> the run passes: base overrides updated by ``swept``


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str  # the sweep file, for error messages and the SLURM job name
    base_config: str  # "<config file>[:<arg>]" as the trainer's --config flag takes it
    swept_fields: tuple[str, ...]  # union of axis fields, in axis order: the table's parameter columns
    runs: tuple[Run, ...]

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


# ---------------------------------------------------------------------------------------------------------------
# Loading and expansion.


def _load_module(path: str, what: str):
    path = resolve_config_path(path)
    if not os.path.isfile(path):
        raise SweepError(f"{what} {path!r} does not exist (paths are relative to {os.getcwd()})")
    module_name = "_gptjax_loaded_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _to_plain(value):
    """ConfigDicts (and FieldReferences inside them) as plain dicts, lists kept as lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def _flatten(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in _to_plain(mapping).items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _axis_points(axis, index: int, where: str) -> list[dict[str, Any]]:
    axis = _to_plain(axis)
    if isinstance(axis, Mapping):
        fields = _flatten(axis)
        bad = [f for f, v in fields.items() if isinstance(v, str) or not isinstance(v, Sequence)]
        if bad:
            raise SweepError(f"{where}: axes[{index}] maps fields to lists of values, but {bad} "
                             f"{'is' if len(bad) == 1 else 'are'} not a list (write e.g. {{'{bad[0]}': [v1, v2]}})")
        lengths = {f: len(v) for f, v in fields.items()}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"{where}: axes[{index}] zips its lists, which need equal lengths; got {lengths}")
        points = [dict(zip(fields, values)) for values in zip(*fields.values())]
    elif isinstance(axis, Sequence) and not isinstance(axis, str):
        points = []
        for j, point in enumerate(axis):
            if not (isinstance(point, Mapping) or hasattr(point, "to_dict")):
                raise SweepError(f"{where}: axes[{index}][{j}] is {point!r}; each point of a list axis is a "
                                 f"mapping of overrides, e.g. {{'model.d_model': 64}}")
            points.append(_flatten(point))
    else:
        raise SweepError(f"{where}: axes[{index}] is {axis!r}; an axis is a list of override mappings or a "
                         f"mapping field -> list of values")
    if not points or not any(points):
        raise SweepError(f"{where}: axes[{index}] has no points")
    return points


def _format_name_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_format_name_value(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "none"


def run_name(swept: Mapping[str, Any], swept_fields: Sequence[str]) -> str:
    """``<field>=<value>`` joined by ``_``; a field is named by its last component unless that is ambiguous."""
    last = [f.rsplit(".", 1)[-1] for f in swept_fields]
    label = {f: (l if last.count(l) == 1 else f) for f, l in zip(swept_fields, last)}
    return "_".join(f"{label[f]}={_format_name_value(v)}" for f, v in swept.items())


def expand(spec: Mapping, path: str) -> Sweep:
    """Validate the structure of a ``get_sweep()`` result and expand it into named runs."""
    spec = _to_plain(spec)
    if not isinstance(spec, Mapping):
        raise SweepError(f"{path}: get_sweep() must return a ConfigDict or dict, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown sweep key(s) {unknown}; valid keys: {list(SPEC_KEYS)}")
    base_config = spec.get("base_config")
    if not isinstance(base_config, str) or not base_config:
        raise SweepError(f"{path}: base_config must be the trainer's --config value, "
                         f"e.g. 'configs/pretrain.py:shakespeare-sp'; got {base_config!r}")
    combine = spec.get("combine", "product")
    if combine not in COMBINE_MODES:
        raise SweepError(f"{path}: combine={combine!r} is unknown; valid choices: {list(COMBINE_MODES)}")
    base_overrides = _flatten(spec.get("overrides") or {})
    axes = _to_plain(spec.get("axes"))
    if not isinstance(axes, Sequence) or isinstance(axes, str) or not axes:
        raise SweepError(f"{path}: axes must be a non-empty list of axes; got {axes!r}")
    points = [_axis_points(axis, i, path) for i, axis in enumerate(axes)]

    owner: dict[str, int] = {}
    for i, axis_points in enumerate(points):
        for field in dict.fromkeys(f for p in axis_points for f in p):
            if field in owner:
                raise SweepError(f"{path}: field {field!r} is swept by both axes[{owner[field]}] and axes[{i}]; "
                                 f"put it in one axis")
            owner[field] = i
    swept_fields = tuple(owner)

    if combine == "zip":
        lengths = [len(p) for p in points]
        if len(set(lengths)) > 1:
            raise SweepError(f"{path}: combine='zip' needs axes of equal length; got lengths {lengths}")
        combos = list(zip(*points))
    else:
        combos = list(itertools.product(*points))

    runs, seen = [], {}
    for combo in combos:
        swept = {k: v for point in combo for k, v in point.items()}
        name = run_name(swept, swept_fields)
        if name in seen:
            raise SweepError(f"{path}: runs {seen[name]} and {swept} are both named {name!r}; "
                             f"the sweep lists the same point twice (or values that print alike)")
        seen[name] = swept
        runs.append(Run(name=name, swept=swept, overrides={**base_overrides, **swept}))
    return Sweep(path=path, base_config=base_config, swept_fields=swept_fields, runs=tuple(runs))


def load_sweep(path: str) -> Sweep:
    module = _load_module(path, "sweep file")
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep(); a sweep file returns its ConfigDict from get_sweep()")
    return expand(module.get_sweep(), path)


# ---------------------------------------------------------------------------------------------------------------
# Validation against the trainer's config.


def load_base_config(base_config: str, sweep_path: str = "<sweep>"):
    """The ConfigDict the trainer would build from ``--config=<file>[:<arg>]`` (before overrides)."""
    config_path, _, arg = base_config.partition(":")
    try:
        module = _load_module(config_path, f"base_config of {sweep_path}:")
    except SweepError:
        raise
    except Exception as e:  # the config file itself failed to import: say which file
        raise SweepError(f"{sweep_path}: base config file {config_path!r} failed to import: {e!r}") from e
    if not hasattr(module, "get_config"):
        raise SweepError(f"{sweep_path}: base config file {config_path!r} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        raise SweepError(f"{sweep_path}: {config_path}:get_config({arg!r}) failed: {e}") from e


def _set_field(config, field: str, value, where: str) -> None:
    node, parts = config, field.split(".")
    for depth, key in enumerate(parts):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if key not in keys:
            parent = ".".join(parts[:depth]) or "<top level>"
            raise SweepError(f"{where}: unknown field {field!r} (no {key!r} under {parent}); "
                             f"fields there: {sorted(keys)}")
        if depth < len(parts) - 1:
            node = node[key]
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise SweepError(f"{where}: field {field!r} cannot take {value!r}: {e}") from e


def validate(sweep: Sweep, base=None):
    """Apply every run's overrides to a copy of the base config; the first unknown/ill-typed field is an error.

    Returns the base config so callers (e.g. ``model_sizes``) can reuse it.
    """
    if base is None:
        base = load_base_config(sweep.base_config, sweep.path)
    where = f"sweep {sweep.path} (base config {sweep.base_config})"
    for run in sweep.runs:
        config = copy.deepcopy(base)
        for field, value in run.overrides.items():
            _set_field(config, field, value, where)
    return base


def model_sizes(sweep: Sweep, base_model: Mapping | None = None) -> list[tuple[str, dict[str, int]]]:
    """(label, count_params dict) per distinct model shape in the sweep, sorted by non-embedding size.

    The GPTConfig is the preset named by ``model.preset`` (when set) with every ``model.<field>`` that is a
    GPTConfig field applied on top: first from ``base_model`` (the base config's ``model`` section, if
    given), then from the run's overrides. None values mean "keep the preset's".
    """
    from gptjax.model import GPTConfig, count_params  # jax only when sizes are asked for
    from gptjax.presets import preset_config

    gpt_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    shapes: dict[str, GPTConfig] = {}
    for run in sweep.runs:
        fields = dict(_flatten(base_model or {}))
        fields.update({k[len("model."):]: v for k, v in run.overrides.items() if k.startswith("model.")})
        preset = fields.get("preset")
        cfg = preset_config(preset) if preset else GPTConfig()
        cfg = cfg.replace(**{k: v for k, v in fields.items() if k in gpt_fields and v is not None})
        label = f"L{cfg.num_layers}-d{cfg.d_model}-h{cfg.num_heads}"
        shapes.setdefault(label, cfg)
    sizes = [(label, count_params(cfg)) for label, cfg in shapes.items()]
    return sorted(sizes, key=lambda s: s[1]["non_embedding"])


# ---------------------------------------------------------------------------------------------------------------
# Commands.


def flag_value(value) -> str:
    """A value as ml_collections' config_flags parses it back (bool: true/false; floats exactly; tuples)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return str(value)


def template_command(template: str, base_config: str, python: str = sys.executable) -> CommandFn:
    """A CommandFn from a shell-like template with {python} {base_config} {workdir} {name} and a lone {overrides}."""
    tokens = shlex.split(template)
    if "{workdir}" not in template:
        raise SweepError(f"command template {template!r} has no {{workdir}}: every run needs its own workdir")

    def command(run: Run, workdir: str) -> list[str]:
        argv = []
        for token in tokens:
            if token == "{overrides}":
                argv += [f"--config.{k}={flag_value(v)}" for k, v in run.overrides.items()]
            else:
                argv.append(token.format(python=python, base_config=base_config, workdir=workdir, name=run.name))
        return argv

    return command


# ---------------------------------------------------------------------------------------------------------------
# Status of runs.


def workdir_of(root: str, run: Run) -> str:
    return os.path.join(root, run.name)


def read_summary(workdir: str) -> dict | None:
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SweepError(f"{path} is not valid JSON ({e}); delete it to rerun that run") from e


def last_exit_codes(root: str) -> dict[str, int]:
    codes = {}
    path = os.path.join(root, EVENTS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                event = json.loads(line)
                if event.get("event") == "end":
                    codes[event["run"]] = event["returncode"]
    return codes


def run_status(root: str, run: Run, exit_codes: Mapping[str, int]) -> str:
    """finished (summary.json), failed (last local attempt exited non-zero), incomplete (workdir only), pending."""
    workdir = workdir_of(root, run)
    if os.path.exists(os.path.join(workdir, SUMMARY_FILE)):
        return "finished"
    if exit_codes.get(run.name, 0) != 0:
        return "failed"
    return "incomplete" if os.path.isdir(workdir) else "pending"


# ---------------------------------------------------------------------------------------------------------------
# Local runner.


def _log_event(root: str, **event) -> None:
    with open(os.path.join(root, EVENTS_FILE), "a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_local(sweep: Sweep, root: str, command_fn: CommandFn, out: TextIO | None = None) -> dict[str, int]:
    """Run unfinished runs one after another in subprocesses; return {run name: exit code} of those attempted.

    Finished runs (summary.json present) are skipped; others restart in their workdir so the trainer resumes.
    A run that fails does not stop the sweep: the rest still run, and the failure shows in the results table.
    Each run's output is streamed with a ``[i/N]`` prefix and kept in ``<root>/logs/<run>.log``.
    """
    out = out or sys.stdout
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    total = len(sweep.runs)
    todo = [r for r in sweep.runs if read_summary(workdir_of(root, r)) is None]
    # Until a run of this invocation finishes, the ETA comes from the trainer's wall times of earlier runs.
    durations = [s["wall_time_s"] for r in sweep.runs if (s := read_summary(workdir_of(root, r)))
                 and isinstance(s.get("wall_time_s"), (int, float))]
    durations_here: list[float] = []
    print(f"sweep {sweep.path}: {total} runs, {total - len(todo)} finished, {len(todo)} to run, root {root}",
          file=out, flush=True)
    codes: dict[str, int] = {}
    for index, run in enumerate(sweep.runs, start=1):
        prefix = f"[{index}/{total}]"
        workdir = workdir_of(root, run)
        if run not in todo:
            print(f"{prefix} {run.name}: finished, skipped", file=out, flush=True)
            continue
        remaining = len(todo) - len(codes)
        known = durations_here or durations
        eta = f"ETA {_format_duration(remaining * sum(known) / len(known))}" if known else "ETA unknown"
        resuming = os.path.isdir(workdir)
        print(f"{prefix} {run.name}: {'resuming' if resuming else 'starting'} ({remaining} left, {eta})",
              file=out, flush=True)
        argv = command_fn(run, workdir)
        _log_event(root, event="start", run=run.name, argv=argv)
        start = time.time()
        with open(os.path.join(root, "logs", f"{run.name}.log"), "a") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            try:
                for line in proc.stdout:
                    log.write(line)
                    out.write(f"{prefix} {line}")
                    out.flush()
                returncode = proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reaches the child too (same process group); record and stop
                returncode = proc.wait()
                _log_event(root, event="end", run=run.name, returncode=returncode or -2)
                print(f"{prefix} {run.name}: interrupted; rerun the same command to resume", file=out, flush=True)
                raise
        elapsed = time.time() - start
        if returncode == 0 and read_summary(workdir) is None:
            print(f"{prefix} {run.name}: exited 0 without writing {SUMMARY_FILE}; counted as failed", file=out)
            returncode = 1
        _log_event(root, event="end", run=run.name, returncode=returncode, wall_s=elapsed)
        codes[run.name] = returncode
        if returncode == 0:
            durations_here.append(elapsed)
        verdict = "done" if returncode == 0 else f"FAILED (exit {returncode}; log {root}/logs/{run.name}.log)"
        print(f"{prefix} {run.name}: {verdict} in {_format_duration(elapsed)}", file=out, flush=True)
    return codes


# ---------------------------------------------------------------------------------------------------------------
# SLURM.


def _index_ranges(indices: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> '1-3,5' (SLURM --array syntax)."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def write_slurm(sweep: Sweep, root: str, command_fn: CommandFn, *, partition: str | None = None,
                gpus_per_task: int = 1, time_limit: str = "04:00:00", cpus_per_task: int | None = None,
                max_parallel: int | None = None, cwd: str | None = None) -> tuple[str, str | None]:
    """Write ``commands.txt`` (line i = run i, every run) and ``sweep.sbatch``, an array over the unfinished lines.

    Line numbers never change between regenerations, so a resubmission after a partial array covers exactly the
    runs still missing a summary.json. Returns (commands path, sbatch path or None when all runs are finished).
    """
    root = os.path.abspath(root)
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    commands_path = os.path.join(root, "commands.txt")
    with open(commands_path, "w") as f:
        for run in sweep.runs:
            f.write(shlex.join(command_fn(run, workdir_of(root, run))) + "\n")
    unfinished = [i for i, run in enumerate(sweep.runs, start=1) if read_summary(workdir_of(root, run)) is None]
    sbatch_path = os.path.join(root, "sweep.sbatch")
    if not unfinished:
        if os.path.exists(sbatch_path):
            os.remove(sbatch_path)
        return commands_path, None
    array = _index_ranges(unfinished) + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash",
             f"# Sweep {sweep.path}: {len(sweep.runs)} runs, {len(unfinished)} unfinished when written.",
             f"# Submit with: sbatch {sbatch_path}",
             f"#SBATCH --job-name=sweep-{sweep.name}",
             f"#SBATCH --array={array}",
             "#SBATCH --ntasks=1"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    lines += [f"#SBATCH --time={time_limit}",
              f"#SBATCH --output={root}/logs/%x-%A_%a.out",
              "set -euo pipefail",
              f"cd {shlex.quote(os.path.abspath(cwd or os.getcwd()))}",
              f'COMMAND=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(commands_path)})',
              'echo "task ${SLURM_ARRAY_TASK_ID}: ${COMMAND}"',
              'eval "${COMMAND}"']
    with open(sbatch_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return commands_path, sbatch_path


# ---------------------------------------------------------------------------------------------------------------
# Results table.


def table_columns(sweep: Sweep) -> list[str]:
    return ["name", *sweep.swept_fields, *RESULT_FIELDS, "status"]


def gather(sweep: Sweep, root: str) -> list[dict[str, Any]]:
    """One row per run: its swept values, the summary.json fields (None until finished) and its status."""
    codes = last_exit_codes(root)
    rows = []
    for run in sweep.runs:
        summary = read_summary(workdir_of(root, run)) or {}
        row = {"name": run.name, **{f: run.swept.get(f) for f in sweep.swept_fields}}
        row.update({f: summary.get(f) for f in RESULT_FIELDS})
        row["status"] = run_status(root, run, codes)
        rows.append(row)
    return rows


def _csv_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (list, tuple)):
        return flag_value(value)
    return repr(value) if isinstance(value, float) else str(value)


def write_results(sweep: Sweep, rows: Sequence[Mapping[str, Any]], root: str) -> tuple[str, str]:
    """``results.csv`` and ``results.json`` (a list of row objects) under the sweep root."""
    columns = table_columns(sweep)
    csv_path, json_path = os.path.join(root, "results.csv"), os.path.join(root, "results.json")
    os.makedirs(root, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])
    with open(json_path, "w") as f:
        json.dump([{c: row.get(c) for c in columns} for row in rows], f, indent=1)
    return csv_path, json_path
