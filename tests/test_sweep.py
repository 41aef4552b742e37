"""Sweep expansion, the resumable local runner, the SLURM array script and the results table.

References: expected run lists written out by hand (product / zip); a fake trainer (a small Python script that
counts its attempts per workdir and writes summary.json) so that "skipped", "resumed" and "ran once" are
observed, not assumed; the SLURM script executed by bash with SLURM_ARRAY_TASK_ID set; the shipped
shakespeare_sizes sweep checked against the real pretrain config schema and gptjax.model.count_params.
"""

import csv
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from gptjax.tools import sweep as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE_CONFIG = textwrap.dedent("""
    import ml_collections

    def get_config(arg="small"):
        c = ml_collections.ConfigDict()
        c.model = ml_collections.ConfigDict({"num_layers": 2, "d_model": 64, "dropout": 0.0})
        c.train = ml_collections.ConfigDict({"steps": 100, "dropout": 0.0, "name": arg, "scan": True,
                                             "prompts": ("",)})
        c.optim = ml_collections.ConfigDict({"lr": 1e-3})
        return c
""")

# A stand-in for experiments.train: counts attempts per workdir, can die (SIGKILL) on its first attempt,
# optionally killing its parent (the sweep process) first, and writes summary.json like the real trainer.
FAKE_TRAINER = textwrap.dedent("""
    import json, os, signal, sys
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    workdir = args["--workdir"]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "attempts.txt"), "a") as f:
        f.write("attempt\\n")
    attempts = len(open(os.path.join(workdir, "attempts.txt")).readlines())
    checkpoint = os.path.join(workdir, "checkpoint")
    resumed = os.path.exists(checkpoint)
    print(f"training {os.path.basename(workdir)} attempt {attempts}", flush=True)
    open(checkpoint, "w").close()
    if os.path.basename(workdir) == os.environ.get("FAKE_DIE_RUN") and attempts == 1:
        if os.environ.get("FAKE_KILL_PARENT"):
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    layers, d = int(args["--config.model.num_layers"]), int(args["--config.model.d_model"])
    n, tokens = 12 * layers * d * d, 1000 * int(args["--config.train.steps"])
    summary = {"params": n + 100 * d, "non_embedding_params": n, "tokens": tokens, "flops": 6 * n * tokens,
               "final_val_loss": (1e9 / n) ** 0.1, "best_val_loss": (1e9 / n) ** 0.1 - 0.01,
               "wall_time_s": 0.5, "steps": int(args["--config.train.steps"]), "resumed": resumed}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f)
""")


def _write(path, text):
    path.write_text(text)
    return str(path)


def _sweep_file(tmp_path, spec_body: str, name="sweep.py") -> str:
    base = _write(tmp_path / "base_config.py", BASE_CONFIG)
    return _write(tmp_path / name, textwrap.dedent(f"""
        import ml_collections

        def get_sweep():
            s = ml_collections.ConfigDict()
            s.base_config = {base + ':small'!r}
        """) + textwrap.indent(textwrap.dedent(spec_body), "    ") + "    return s\n")


SIZES_BY_LR = """
s.overrides = {"train": {"steps": 7}}
s.axes = [[{"model.num_layers": 1, "model.d_model": 32}, {"model.num_layers": 2, "model.d_model": 64}],
          {"optim.lr": [1e-3, 3e-3]}]
"""


def test_product_expansion_names_and_overrides(tmp_path):
    sweep = S.load_sweep(_sweep_file(tmp_path, SIZES_BY_LR))
    assert [r.name for r in sweep.runs] == [
        "num_layers=1_d_model=32_lr=0.001", "num_layers=1_d_model=32_lr=0.003",
        "num_layers=2_d_model=64_lr=0.001", "num_layers=2_d_model=64_lr=0.003"]
    assert sweep.swept_fields == ("model.num_layers", "model.d_model", "optim.lr")
    assert sweep.runs[3].overrides == {"train.steps": 7, "model.num_layers": 2, "model.d_model": 64,
                                       "optim.lr": 3e-3}
    assert sweep.runs[3].swept == {"model.num_layers": 2, "model.d_model": 64, "optim.lr": 3e-3}
    # Deterministic: a second expansion gives the same runs in the same order.
    assert S.load_sweep(_sweep_file(tmp_path, SIZES_BY_LR, "again.py")).runs == sweep.runs


def test_zip_expansion_and_ambiguous_names(tmp_path):
    spec = {"base_config": "x.py", "combine": "zip",
            "axes": [{"model.dropout": [0.0, 0.1, 0.2]}, [{"train.dropout": 0.5}, {"train.dropout": 0.6},
                                                          {"train.dropout": 0.7}]]}
    sweep = S.expand(spec, "zip.py")
    # "dropout" names two fields, so both keep their full path in run names.
    assert [r.name for r in sweep.runs] == ["model.dropout=0_train.dropout=0.5",
                                            "model.dropout=0.1_train.dropout=0.6",
                                            "model.dropout=0.2_train.dropout=0.7"]
    with pytest.raises(S.SweepError, match=r"zip.py: combine='zip' needs axes of equal length; got lengths \[3, 2\]"):
        S.expand({**spec, "axes": [spec["axes"][0], {"optim.lr": [1.0, 2.0]}]}, "zip.py")


@pytest.mark.parametrize("spec, message", [
    ({"base_config": "b.py", "axes": [{"a.b": [1, 2]}, {"a.b": [3]}]}, "'a.b' is swept by both axes"),
    ({"base_config": "b.py", "axes": [[{"a.b": 1}, {"a.b": 1}]]}, "same point twice"),
    ({"base_config": "b.py", "axes": [{"a.b": 3}]}, r"axes\[0\] maps fields to lists"),
    ({"base_config": "b.py", "axes": [{"a.b": [1]}], "combine": "grid"}, "valid choices: \\['product', 'zip'\\]"),
    ({"base_config": "b.py", "axis": []}, "unknown sweep key"),
])
def test_malformed_sweeps_are_one_clear_error(spec, message):
    with pytest.raises(S.SweepError, match=message):
        S.expand(spec, "bad.py")


def test_unknown_field_is_one_error_before_anything_runs(tmp_path):
    path = _sweep_file(tmp_path, 's.axes = [{"model.d_modle": [32, 64]}]\n')
    with pytest.raises(S.SweepError, match=r"unknown field 'model.d_modle'.*\['d_model', 'dropout', 'num_layers'\]"):
        S.validate(S.load_sweep(path))
    wrong_type = _sweep_file(tmp_path, 's.axes = [{"model.d_model": ["big"]}]\n', "typed.py")
    with pytest.raises(S.SweepError, match="field 'model.d_model' cannot take 'big'"):
        S.validate(S.load_sweep(wrong_type))
    # Through the binary: exit status 1, one line naming the field and the sweep file, no run started.
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--sweep={path}", f"--root={root}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "model.d_modle" in proc.stderr and path in proc.stderr
    assert not root.exists()


def test_command_line_parses_back_to_the_overrides(tmp_path):
    """ml_collections' own config_flags parser (what experiments.train uses) reads the values we meant."""
    from absl import flags
    from ml_collections import config_flags

    path = _sweep_file(tmp_path, """
s.overrides = {"train": {"scan": False, "prompts": ("ROMEO:", "a b"), "name": "x y"}}
s.axes = [{"optim.lr": [3e-4, 1 / 3], "model.d_model": [48, 96]}]
""")
    sweep = S.load_sweep(path)
    command = S.template_command(S.DEFAULT_COMMAND, sweep.base_config)
    for run in sweep.runs:
        argv = command(run, str(tmp_path / run.name))
        assert argv[1:5] == ["-m", "experiments.train", f"--config={sweep.base_config}",
                             f"--workdir={tmp_path / run.name}"]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=["train"] + argv[3:])
        flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
        flag_values(["train"] + argv[3:])
        config = flag_values.config
        for field, value in run.overrides.items():
            section, name = field.split(".")
            assert config[section][name] == value and type(config[section][name]) is type(value), field


def _fake_command(tmp_path, base):
    trainer = _write(tmp_path / "fake_train.py", FAKE_TRAINER)
    return S.template_command("{python} " + trainer + " --workdir={workdir} {overrides}", base)


def _attempts(root, run):
    path = os.path.join(root, run.name, "attempts.txt")
    return len(open(path).readlines()) if os.path.exists(path) else 0


def test_local_runner_skips_finished_and_restarts_only_the_failed_run(tmp_path, monkeypatch, capsys):
    sweep = S.load_sweep(_sweep_file(tmp_path, SIZES_BY_LR))
    root = str(tmp_path / "root")
    command = _fake_command(tmp_path, sweep.base_config)
    monkeypatch.setenv("FAKE_DIE_RUN", sweep.runs[1].name)  # dies (SIGKILL) midway through its first attempt

    codes = S.run_local(sweep, root, command)
    assert codes[sweep.runs[1].name] == -9 and [codes[r.name] for r in sweep.runs if r != sweep.runs[1]] == [0] * 3
    assert [row["status"] for row in S.gather(sweep, root)] == ["finished", "failed", "finished", "finished"]

    codes = S.run_local(sweep, root, command)
    assert codes == {sweep.runs[1].name: 0}  # only the unfinished run was attempted
    assert [_attempts(root, r) for r in sweep.runs] == [1, 2, 1, 1]
    assert S.read_summary(os.path.join(root, sweep.runs[1].name))["resumed"] is True  # same workdir
    out = capsys.readouterr().out
    assert "[2/4] num_layers=1_d_model=32_lr=0.003: resuming (1 left, ETA" in out
    assert "[1/4] num_layers=1_d_model=32_lr=0.001: finished, skipped" in out
    assert "[2/4] training num_layers=1_d_model=32_lr=0.003 attempt 2" in out  # the run's output, streamed

    assert S.run_local(sweep, root, command) == {}
    assert [row["status"] for row in S.gather(sweep, root)] == ["finished"] * 4


def test_interrupted_sweep_restarts_only_unfinished_runs(tmp_path):
    """The sweep process itself is killed while run 2 of 4 trains; rerunning the binary finishes the rest."""
    sweep_path = _sweep_file(tmp_path, SIZES_BY_LR)
    sweep = S.load_sweep(sweep_path)
    root = str(tmp_path / "root")
    trainer = _write(tmp_path / "fake_train.py", FAKE_TRAINER)
    argv = [sys.executable, "-m", "experiments.sweep", f"--sweep={sweep_path}", f"--root={root}",
            f"--command={{python}} {trainer} --workdir={{workdir}} {{overrides}}"]
    env = {**os.environ, "FAKE_DIE_RUN": sweep.runs[1].name, "FAKE_KILL_PARENT": "1"}

    first = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == -9, first.stderr
    assert [_attempts(root, r) for r in sweep.runs] == [1, 1, 0, 0]
    finished = [os.path.exists(os.path.join(root, r.name, "summary.json")) for r in sweep.runs]
    assert finished == [True, False, False, False]

    second = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert [_attempts(root, r) for r in sweep.runs] == [1, 2, 1, 1]
    assert S.read_summary(os.path.join(root, sweep.runs[1].name))["resumed"] is True

    with open(os.path.join(root, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["name", "model.num_layers", "model.d_model", "optim.lr", "params",
                             "non_embedding_params", "tokens", "flops", "final_val_loss", "best_val_loss",
                             "wall_time_s", "steps", "status"]
    assert [r["name"] for r in rows] == [r.name for r in sweep.runs]
    assert rows[3]["non_embedding_params"] == str(12 * 2 * 64 * 64) and rows[3]["optim.lr"] == "0.003"
    assert {r["status"] for r in rows} == {"finished"}
    with open(os.path.join(root, "results.json")) as f:
        records = json.load(f)
    assert records[3]["final_val_loss"] == pytest.approx((1e9 / (12 * 2 * 64 * 64)) ** 0.1)


def test_results_table_of_a_partial_sweep(tmp_path):
    sweep = S.load_sweep(_sweep_file(tmp_path, SIZES_BY_LR))
    root = tmp_path / "root"
    (root / sweep.runs[0].name).mkdir(parents=True)
    (root / sweep.runs[0].name / "summary.json").write_text(json.dumps({"params": 5, "final_val_loss": 2.5}))
    (root / sweep.runs[1].name).mkdir()
    csv_path, _ = S.write_results(sweep, S.gather(sweep, str(root)), str(root))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished", "incomplete", "pending", "pending"]
    assert rows[0]["final_val_loss"] == "2.5" and rows[0]["tokens"] == "" and rows[2]["params"] == ""


def test_slurm_array_script(tmp_path):
    sweep = S.load_sweep(_sweep_file(tmp_path, SIZES_BY_LR))
    root = str(tmp_path / "root")
    command = _fake_command(tmp_path, sweep.base_config)
    for run in (sweep.runs[0], sweep.runs[1]):  # finished before the script is written
        os.makedirs(os.path.join(root, run.name))
        open(os.path.join(root, run.name, "summary.json"), "w").write("{}")

    commands_path, sbatch_path = S.write_slurm(sweep, root, command, partition="gpu", gpus_per_task=2,
                                               time_limit="01:30:00", max_parallel=2, cwd=REPO)
    lines = open(commands_path).read().splitlines()
    assert [shlex.split(line) for line in lines] == [command(r, os.path.join(root, r.name)) for r in sweep.runs]
    script = open(sbatch_path).read()
    for expected in ("#!/bin/bash", "#SBATCH --array=3-4%2", "#SBATCH --partition=gpu",
                     "#SBATCH --gpus-per-task=2", "#SBATCH --time=01:30:00", f"cd {REPO}",
                     f'sed -n "${{SLURM_ARRAY_TASK_ID}}p" {commands_path}'):
        assert expected in script
    # What SLURM would do for array task 4: run line 4 of commands.txt.
    subprocess.run(["bash", sbatch_path], env={**os.environ, "SLURM_ARRAY_TASK_ID": "4"}, check=True,
                   capture_output=True, timeout=60)
    assert [_attempts(root, r) for r in sweep.runs] == [0, 0, 0, 1]

    assert S._index_ranges([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"
    assert "--partition" not in open(S.write_slurm(sweep, root, command, gpus_per_task=0)[1]).read()


def test_shakespeare_sizes_sweep_spans_30x_and_fits_the_pretrain_schema():
    sweep = S.load_sweep(os.path.join(REPO, "configs/sweeps/shakespeare_sizes.py"))
    sizes = S.model_sizes(sweep)
    non_embedding = [counts["non_embedding"] for _, counts in sizes]
    assert len(sizes) >= 6
    assert non_embedding[-1] / non_embedding[0] >= 30
    # count_params against the closed form for a GPT block stack: 12·L·d² + 13·L·d (biases, LayerNorms) + 2d.
    for label, counts in sizes:
        layers, d = int(label.split("-")[0][1:]), int(label.split("-")[1][1:])
        assert counts["non_embedding"] == 12 * layers * d * d + 13 * layers * d + 2 * d
    # The sweep's fields exist in the pretrain config schema (every pretrain run shares configs/common.py).
    S.validate(sweep, S.load_base_config(os.path.join(REPO, "configs/pretrain.py") + ":shakespeare-demo"))
