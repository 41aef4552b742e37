"""Exact resume and workdir protection, through the real binary (``python -m experiments.train``).

Reference: an uninterrupted run. The same run is SIGKILLed between checkpoint writes and again while a
checkpoint is being written (a ``*.orbax-checkpoint-tmp`` directory exists), restarted each time, and must
log bitwise the same loss at every step and end with bitwise the same parameters (CPU, 8 fake devices,
dropout on, so the restored rng and data-iterator state matter). A workdir of another config is refused with
one error and left byte-for-byte unchanged; an unknown config field is one error line. The stage-3 alternatives
(GRPO, RLOO with a reward function, DPO, rejection sampling) on the smoke pipeline's runs: SIGKILLed after a
checkpoint (rejection sampling: inside a later round's fine-tuning), restarted, they log bitwise the same metrics and
end with bitwise the same policy as an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gptjax.train import workdir as workdir_lib
from gptjax.train.metrics import read_metrics
import run_helpers
from run_helpers import (REPO, assert_same_params, final_params, finished_steps, tmp_dirs, tree_digest,
                         write_corpus)

STEPS, CKPT_EVERY = 24, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(root)
    args = ["--config=configs/pretrain.py:tiny-bytes", f"--config.data.paths={corpus}",
            "--config.data.split_paragraphs=True", f"--config.data.data_dir={root / 'tfds'}",
            "--config.data.val_fraction=0", "--config.train.sample_prompts=()", "--config.train.log_every=1",
            f"--config.train.steps={STEPS}", f"--config.train.ckpt_every={CKPT_EVERY}", "--config.train.keep_ckpts=2",
            "--config.model.dropout_resid=0.1"]
    env = run_helpers.env(root)  # every run compiles the same programs: shared through JAX's cache
    return root, args, env


def start(setup, workdir, *extra):
    root, args, env = setup
    log = open(root / f"{os.path.basename(workdir)}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args, f"--workdir={workdir}", *extra],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_to_end(setup, workdir, *extra, timeout=300):
    p = start(setup, workdir, *extra)
    assert p.wait(timeout=timeout) == 0, open(setup[0] / f"{os.path.basename(workdir)}.log").read()[-3000:]


def wait_then_kill(p, condition, poll=0.0005, timeout=300) -> bool:
    """SIGKILL ``p`` as soon as ``condition()`` holds; False if ``p`` exited first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        if p.poll() is not None:
            return False
        time.sleep(poll)
    p.kill()
    raise TimeoutError("condition never held")


def losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(str(workdir)) if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(setup):
    workdir = setup[0] / "reference"
    run_to_end(setup, workdir)
    return workdir


@pytest.mark.slow
def test_killed_runs_resume_bitwise(setup, reference):
    workdir = setup[0] / "interrupted"
    # 1. Killed between checkpoint writes: checkpoint 6 is finished and step 8 has run.
    p = start(setup, workdir)
    assert wait_then_kill(p, lambda: CKPT_EVERY in finished_steps(workdir) and max(losses(workdir), default=0) >= 8,
                          poll=0.005)
    assert max(finished_steps(workdir)) < STEPS
    # 2. Killed while a checkpoint is being written (its tmp directory exists), on restart; retried if the
    #    write finished before the signal landed.
    caught = []
    for _ in range(3):
        p = start(setup, workdir)
        if not wait_then_kill(p, lambda: bool(tmp_dirs(workdir))):
            break
        caught = tmp_dirs(workdir)
        if caught:
            break
    assert caught, "never killed a run in the middle of a checkpoint write"
    partial_step = int(caught[0].split(".")[0])
    assert partial_step not in finished_steps(workdir)  # never listed as a checkpoint
    # 3. Restart: resumes from the last finished checkpoint, deletes the partial one, runs to the end.
    run_to_end(setup, workdir)
    assert not tmp_dirs(workdir)
    ref, got = losses(reference), losses(workdir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert got == ref  # bitwise: JSON keeps every float32 digit
    assert_same_params(final_params(workdir, STEPS), final_params(reference, STEPS))


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_untouched(setup, reference):
    before = tree_digest(reference)
    p = subprocess.run([sys.executable, "-m", "experiments.train", *setup[1], f"--workdir={reference}",
                        "--config.optim.lr=0.001"], cwd=REPO, env=setup[2], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert "holds a run with a different config (1 field(s) differ)" in p.stderr
    assert "optim.lr: stored 0.003 -> now 0.001" in p.stderr and "--allow_config_change" in p.stderr
    assert "Traceback" not in p.stderr
    assert tree_digest(reference) == before


def test_unknown_config_field_is_one_clear_error(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/pretrain.py:tiny-bytes",
                        f"--workdir={tmp_path / 'wd'}", "--config.optim.nonexistent=1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith(
        "error: --config.optim.nonexistent: config.optim has no field 'nonexistent'; valid fields: ['b1', ")
    assert "Traceback" not in p.stderr and not (tmp_path / "wd").exists()


def test_config_check_unit(tmp_path):
    """workdir.check_or_write_config: write, accept same / restart-safe changes, refuse others, or archive."""
    cfg = {"optim": {"lr": 1e-3}, "train": {"steps": 10, "log_every": 5, "allow_config_change": False}}
    wd = str(tmp_path / "wd")
    workdir_lib.check_or_write_config(wd, cfg, write=False)
    assert not os.path.exists(wd)  # check-only never creates anything
    workdir_lib.check_or_write_config(wd, cfg)
    stored = json.load(open(os.path.join(wd, "config.json")))
    assert stored == cfg
    safe = {**cfg, "train": {**cfg["train"], "log_every": 1, "allow_config_change": True}}
    workdir_lib.check_or_write_config(wd, safe)  # restart-safe fields may change
    changed = {**cfg, "optim": {"lr": 2e-3}, "model": {"d_model": 64}}
    with pytest.raises(workdir_lib.ConfigMismatchError) as e:
        workdir_lib.check_or_write_config(wd, changed)
    assert "2 field(s) differ" in str(e.value) and "model.d_model: stored '<absent>' -> now 64" in str(e.value)
    # A field added to the code since (left at None, its default) is no difference.
    workdir_lib.check_or_write_config(wd, {**cfg, "model": {"xent_backward": None}})
    assert json.load(open(os.path.join(wd, "config.json")))["optim"]["lr"] == 1e-3
    workdir_lib.check_or_write_config(wd, changed, allow_change=True)
    assert json.load(open(os.path.join(wd, "config.json")))["optim"]["lr"] == 2e-3
    archived = [n for n in os.listdir(wd) if n.startswith("config.") and n != "config.json"]
    assert len(archived) == 1 and json.load(open(os.path.join(wd, archived[0])))["optim"]["lr"] == 1e-3
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints").mkdir(parents=True)
    with pytest.raises(workdir_lib.ConfigMismatchError, match="no config.json"):
        workdir_lib.check_or_write_config(str(foreign), cfg)
    assert os.listdir(foreign) == ["checkpoints"]


# --- the stage-3 alternatives: SIGKILLed between checkpoints, restarted, bitwise the uninterrupted run ------------

def _stage_args(smoke: str, stage: str) -> list[str]:
    """Tiny runs of each new stage on the smoke pipeline's SFT run, reward model, prompts and rankings (RLOO with
    the gold labeler as its reward: the host-side reward path)."""
    runs, world = os.path.join(smoke, "{}"), os.path.join(smoke, "world", "ppo_prompts.jsonl")
    common_rl = [f"--config.train.init_from={runs.format('sft')}", f"--config.data.prompts_path={world}",
                 "--config.sampling.max_prompt_len=64", "--config.sampling.max_new_tokens=8",
                 "--config.train.steps=4", "--config.train.ckpt_every=2", "--config.train.keep_ckpts=0"]
    rl_batch = [f"--config.{stage}.rollout_batch_size=16", f"--config.{stage}.minibatch_size=8",
                "--config.optim.lr=3e-4"]
    return {
        "grpo": common_rl + rl_batch + [f"--config.reward.model_from={runs.format('reward')}",
                                        "--config.grpo.group_size=4", "--config.grpo.epochs=2"],
        "rloo": common_rl + rl_batch + ["--config.reward.source=function",
                                        "--config.reward.function=gptjax.seed_world.rewards:gold_reward",
                                        "--config.rloo.k=4", "--config.rloo.loss=clipped"],
        "dpo": [f"--config.train.init_from={runs.format('sft')}", "--config.train.seq_len=128",
                f"--config.data.train_path={os.path.join(smoke, 'labels', 'rankings_train.jsonl')}",
                "--config.train.batch_size=8", "--config.train.steps=4", "--config.train.ckpt_every=2",
                "--config.train.log_every=1", "--config.train.keep_ckpts=0", "--config.optim.lr=1e-4",
                "--config.optim.warmup_steps=0"],
        # The smoke SFT policy seldom ends an answer early: room to reach EOS, and 64 answers a round.
        "rs": common_rl + [f"--config.reward.model_from={runs.format('reward')}", "--config.rs.rounds=2",
                           "--config.sampling.max_new_tokens=48",
                           "--config.rs.prompts_per_round=8", "--config.rs.samples_per_prompt=8",
                           "--config.train.batch_size=8", "--config.train.log_every=1"],
    }[stage]


def _last_step(workdir) -> int:
    return max((r["step"] for r in read_metrics(str(workdir))), default=0)


def _deterministic_metrics(workdir) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "round/perf"))}
            for r in read_metrics(str(workdir))]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "rloo", "dpo", "rs"])
def test_new_stages_resume_bitwise_after_sigkill(stage, smoke_pipeline, setup):
    root, _, env = setup
    args = [f"--config=configs/{stage}.py", *_stage_args(smoke_pipeline, stage)]

    def launch(workdir):
        log = open(root / f"{os.path.basename(workdir)}.log", "a")
        return subprocess.Popen([sys.executable, "-m", "experiments.train", *args, f"--workdir={workdir}"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    reference, interrupted = root / f"{stage}-reference", root / f"{stage}-interrupted"
    assert launch(reference).wait(timeout=600) == 0, open(root / f"{stage}-reference.log").read()[-3000:]
    # Rejection sampling's rounds are its own checkpoints: kill it inside round 1's fine-tuning, after that run's
    # first checkpoint; the others after their first checkpoint and a step beyond it.
    inner = interrupted / "rounds" / "1" if stage == "rs" else interrupted
    assert wait_then_kill(launch(interrupted), lambda: 2 in finished_steps(inner) and _last_step(inner) >= 3,
                          poll=0.005)
    assert max(finished_steps(interrupted)) < max(finished_steps(reference))
    assert launch(interrupted).wait(timeout=600) == 0, open(root / f"{stage}-interrupted.log").read()[-3000:]
    assert _deterministic_metrics(interrupted) == _deterministic_metrics(reference)
    want = final_params(reference, max(finished_steps(reference)))
    assert want
    assert_same_params(final_params(interrupted, max(finished_steps(interrupted))), want)
