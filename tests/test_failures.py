"""Bad input to every binary ends in one line: exit status 1, exactly one ``error: …`` line (the last on stderr), no
traceback, and every workdir it names left as it was (a new one never created).

The cases are a new user's battery: bad configs, data files of every post-training stage, paths, permissions,
locked workdirs, ``init_from`` of another model, and each binary's own inputs. They share one tiny pretraining run
(a module fixture); each case is one subprocess, as a user would start it, a few at a time. ``--verbose`` adds the
traceback above the same line.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess

import pytest

from run_helpers import assert_one_error_line, pretrain_args, run_binary, tree_digest, write_corpus

SFT_GOOD = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
RANKINGS_GOOD = [{"prompt": f"what is {i} plus {i}?", "responses": [f"it is {2 * i}.", f"it is {2 * i + 1}."]}
                 for i in range(16)]


def _jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


class Ctx:
    """The shared runs and data files, and the argument lists of each stage."""

    def __init__(self, root):
        self.root, self.n = root, 0
        self.corpus = write_corpus(root)
        self.pretrained = root / "pretrained"
        self.sft_good = _jsonl(root / "sft.jsonl", SFT_GOOD)
        self.rankings = _jsonl(root / "rankings.jsonl", RANKINGS_GOOD)
        self.prompts = _jsonl(root / "prompts.jsonl", [{"prompt": "what is 2 plus 2?"}])
        self.rm = root / "rm"  # a reward-model run as far as its stored config goes: see _reward_run

    def fresh(self):
        """A workdir path that does not exist yet."""
        self.n += 1
        return self.root / "new" / f"wd{self.n}"

    def file(self, name: str, records) -> str:
        return _jsonl(self.root / name, records)

    def pretrain(self, *extra, workdir=None):
        return [*pretrain_args(self.root, self.corpus, steps=4, ckpt_every=2), *extra,
                f"--workdir={workdir or self.fresh()}"]

    def sft(self, train_path, *extra, workdir=None):
        return ["--config=configs/sft.py", f"--config.train.init_from={self.pretrained}", "--config.train.seq_len=64",
                "--config.train.steps=2", f"--config.data.train_path={train_path}", *extra,
                f"--workdir={workdir or self.fresh()}"]

    def reward(self, train_path, *extra, workdir=None):
        return ["--config=configs/reward.py", f"--config.train.init_from={self.pretrained}",
                "--config.train.seq_len=64", "--config.train.steps=2", "--config.train.log_every=1",
                f"--config.data.train_path={train_path}", *extra, f"--workdir={workdir or self.fresh()}"]

    def ppo(self, prompts, *extra, workdir=None):
        return ["--config=configs/ppo.py", f"--config.train.init_from={self.pretrained}",
                f"--config.ppo_init.reward_from={self.rm}", f"--config.data.prompts_path={prompts}",
                "--config.sampling.max_prompt_len=32", "--config.sampling.max_new_tokens=16", *extra,
                f"--workdir={workdir or self.fresh()}"]

    def locked_copy(self, host: str, pid: int):
        """A copy of the pretrained run whose lock names ``host``/``pid``."""
        self.n += 1
        copy = self.root / f"locked{self.n}"
        shutil.copytree(self.pretrained, copy)
        (copy / "lock.json").write_text(json.dumps({"host": host, "pid": pid, "started": "2025-01-01T00:00:00+00:00",
                                                    "command": "python -m experiments.train ..."}))
        return copy


WORKERS = 3  # cases run at once (each is mostly start-up: imports)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    c = Ctx(tmp_path_factory.mktemp("failures"))
    proc = run_binary(c.root, "train", *c.pretrain(workdir=c.pretrained))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _reward_run(c.pretrained, c.rm)
    return c


def _reward_run(pretrained, rm) -> None:
    """``rm``: the pretrained run relabelled a reward-model run in its stored configs. Every case that names it is
    refused on the stage its config names (chat: no policy; analyze and PPO: before any parameter is read), so the
    parameters never matter and no reward model needs training here."""
    shutil.copytree(pretrained, rm)
    for path in [rm / "config.json", *rm.glob("checkpoints/*/config/metadata")]:
        stored = json.loads(path.read_text())
        stored["stage"] = "reward"
        path.write_text(json.dumps(stored))


@pytest.fixture(scope="module")
def outcomes(ctx):
    """name -> (the finished process, the paths it must not change, their digests before), all cases run."""
    plans = {}
    for name, (module, build, _) in CASES.items():
        args, watched = build(ctx)
        paths = [*watched, *(a.split("=", 1)[1] for a in args if a.startswith("--workdir=") and "/new/" in a)]
        plans[name] = (module, args, paths, [tree_digest(p) for p in paths])
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(run_binary, ctx.root, module, *args, stdin=subprocess.DEVNULL, timeout=600)
                   for name, (module, args, _, _) in plans.items()}
        return {name: (futures[name].result(), plans[name][2], plans[name][3]) for name in plans}


def _read_only_dir(c: Ctx):
    """An empty directory on a read-only file system (a tmpfs mounted read-only); skips where mount is refused."""
    path = c.root / "readonly"
    path.mkdir(exist_ok=True)
    if not os.path.ismount(path):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {done.stderr.decode().strip()}")
    return path


# name -> (binary, ctx -> (arguments, paths that must stay as they were), substrings of the error line)
CASES = {
    # --- configs and flags ------------------------------------------------------------------------------------
    "train/batch-size-0": ("train", lambda c: (c.pretrain("--config.train.batch_size=0"), []),
                           ["train.batch_size=0 must be >= 1"]),
    "train/steps-0": ("train", lambda c: (c.pretrain("--config.train.steps=0"), []), ["train.steps must be positive"]),
    "train/accumulation": ("train", lambda c: (c.pretrain("--config.optim.grad_accum_steps=3"), []),
                           ["not divisible by optim.grad_accum_steps=3"]),
    "train/seq-len-over-context": ("train", lambda c: (c.pretrain("--config.train.seq_len=256"), []),
                                   ["train.seq_len=256 exceeds the context model.max_len=128"]),
    "train/unknown-field": ("train", lambda c: (c.pretrain("--config.optim.nonexistent=1"), []),
                            ["config.optim has no field 'nonexistent'"]),
    "train/unknown-preset": ("train", lambda c: (["--config=configs/pretrain.py:tiny-bites", f"--workdir={c.fresh()}"],
                                                 []), ["tiny-bites"]),
    "train/unknown-tokenizer": ("train", lambda c: (c.pretrain("--config.tokenizer.kind=bites"), []),
                                ["tokenizer:", "bites"]),
    "train/unknown-stage": ("train", lambda c: (c.pretrain("--config.stage=kto"), []),
                            ["config.stage='kto' is unknown"]),
    "train/another-stages-config": ("train", lambda c: (c.pretrain("--config.stage=dpo"), []),
                                    ["config.stage='dpo'", "configs/dpo.py"]),
    "train/no-corpus": ("train", lambda c: (c.pretrain(f"--config.data.paths={c.root / 'nowhere'}"), []),
                        ["data.paths"]),
    "train/missing-workdir-flag": ("train", lambda c: (c.pretrain()[:-1], []), ["--workdir"]),
    # --- workdirs ---------------------------------------------------------------------------------------------
    "train/workdir-is-a-file": ("train", lambda c: (c.pretrain(workdir=c.corpus / "doc0.txt"), [c.corpus]),
                                ["is a file, not a directory"]),
    "train/workdir-read-only": ("train", lambda c: (c.pretrain(workdir=_read_only_dir(c)), [_read_only_dir(c)]),
                                ["read-only file system"]),
    "train/workdir-under-a-file": ("train", lambda c: (c.pretrain(workdir=c.corpus / "doc0.txt" / "run"), [c.corpus]),
                                   ["is a file, not a directory"]),
    "train/workdir-of-another-config": ("train", lambda c: (c.pretrain("--config.optim.lr=0.001",
                                                                       workdir=c.pretrained), [c.pretrained]),
                                        ["holds a run with a different config", "optim.lr: stored 0.003 -> now 0.001",
                                         "--allow_config_change"]),
    "train/workdir-locked-here": ("train", lambda c: _locked(c, socket.gethostname(), os.getpid()),
                                  ["is in use by process", "--wait_for_lock"]),
    "train/workdir-locked-elsewhere": ("train", lambda c: _locked(c, "gpu-node-7", 4242),
                                       ["is in use by process 4242 on gpu-node-7", "is down", "delete"]),
    # --- init_from --------------------------------------------------------------------------------------------
    "train/init-from-other-size": ("train", lambda c: (c.pretrain(f"--config.train.init_from={c.pretrained}",
                                                                  "--config.model.d_model=128"), [c.pretrained]),
                                   ["do not fit this model", "shape differs"]),
    "sft/init-from-missing": ("train", lambda c: (c.sft(c.sft_good, f"--config.train.init_from={c.root / 'nope'}"),
                                                  []), ["train.init_from=", "does not exist"]),
    "sft/init-from-no-checkpoint": ("train", lambda c: (c.sft(c.sft_good, f"--config.train.init_from={c.corpus}"),
                                                        [c.corpus]), ["holds no finished checkpoint"]),
    # --- SFT data ---------------------------------------------------------------------------------------------
    "sft/no-train-path": ("train", lambda c: (c.sft(""), []), ["data.train_path: give the SFT conversations"]),
    "sft/missing-file": ("train", lambda c: (c.sft(c.root / "missing.jsonl"), []), ["missing.jsonl", "no such"]),
    "sft/bad-json": ("train", lambda c: (c.sft(c.file("sft_json.jsonl", [SFT_GOOD[0], "{\"messages\": ["])), []),
                     ["sft_json.jsonl:2: not valid JSON"]),
    "sft/no-messages": ("train", lambda c: (c.sft(c.file("sft_nomsg.jsonl", [{"text": "hi"}])), []),
                        ["sft_nomsg.jsonl:1", "'messages'"]),
    "sft/unknown-role": ("train", lambda c: (c.sft(c.file("sft_role.jsonl", [
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])), []),
        ["sft_role.jsonl:1", "robot"]),
    "sft/no-assistant-turn": ("train", lambda c: (c.sft(c.file("sft_noasst.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}]}])), []), ["sft_noasst.jsonl:1", "assistant"]),
    "sft/empty-file": ("train", lambda c: (c.sft(c.file("sft_empty.jsonl", [])), []), ["no SFT conversations"]),
    "sft/too-long": ("train", lambda c: (c.sft(c.file("sft_long.jsonl", [
        {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]}])), []),
        ["sft_long.jsonl:1", "seq_len 64"]),
    "sft/batch-over-rows": ("train", lambda c: (c.sft(c.sft_good, "--config.train.batch_size=64"), []),
                            ["fewer than one batch of 64", "train.batch_size"]),
    "sft/bad-eval-file": ("train", lambda c: (c.sft(c.sft_good, "--config.data.eval_path=" + c.file(
        "sft_eval.jsonl", ["not json"])), []), ["sft_eval.jsonl:1: not valid JSON"]),
    # --- reward-model data ------------------------------------------------------------------------------------
    "reward/one-response": ("train", lambda c: (c.reward(c.file("rk1.jsonl", [{"prompt": "q", "responses": ["a"]}])),
                                                []), ["rk1.jsonl:1", "1 responses"]),
    "reward/duplicates": ("train", lambda c: (c.reward(c.file("rkdup.jsonl", [
        {"prompt": "q", "responses": ["a", "a"]}])), []), ["rkdup.jsonl:1", "identical"]),
    "reward/no-responses": ("train", lambda c: (c.reward(c.file("rknone.jsonl", [{"prompt": "q"}])), []),
                            ["rknone.jsonl:1", "'responses'"]),
    "reward/bad-demos": ("train", lambda c: (c.reward(c.rankings, "--config.data.demos_path=" + c.file(
        "demos_bad.jsonl", [{"messages": []}])), []), ["demos_bad.jsonl:1"]),
    "reward/missing-demos": ("train", lambda c: (c.reward(c.rankings, f"--config.data.demos_path={c.root / 'd.jsonl'}"),
                                                 []), ["d.jsonl", "no such"]),
    # --- PPO data ---------------------------------------------------------------------------------------------
    "ppo/empty-prompts": ("train", lambda c: (c.ppo(c.file("p_empty.jsonl", [])), [c.rm]), ["no prompts found"]),
    "ppo/prompt-ends-with-assistant": ("train", lambda c: (c.ppo(c.file("p_asst.jsonl", [{"prompt": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])), [c.rm]),
        ["p_asst.jsonl:1", "must end with a user turn"]),
    "ppo/prompt-too-long": ("train", lambda c: (c.ppo(c.file("p_long.jsonl", [{"prompt": "z" * 100}])), [c.rm]),
                            ["p_long.jsonl:1", "max_prompt_len 32"]),
    "ppo/no-reward-run": ("train", lambda c: (c.ppo(c.prompts, "--config.ppo_init.reward_from="), []),
                          ["ppo_init.reward_from"]),
    "ppo/reward-from-a-policy": ("train", lambda c: (c.ppo(c.prompts, f"--config.ppo_init.reward_from={c.pretrained}"),
                                                     [c.pretrained]), ["ppo_init.reward_from"]),
    # --- chat and analyze -------------------------------------------------------------------------------------
    "chat/no-checkpoint": ("chat", lambda c: ([f"--workdir={c.corpus}"], [c.corpus]),
                           ["--workdir=", "holds no finished checkpoint"]),
    "chat/nonexistent": ("chat", lambda c: ([f"--workdir={c.root / 'nope'}"], []), ["--workdir=", "does not exist"]),
    "chat/reward-run": ("chat", lambda c: ([f"--workdir={c.rm}"], [c.rm]), ["reward-model run", "holds no policy"]),
    "analyze/nonexistent": ("analyze", lambda c: ([f"--workdir={c.root / 'nope'}"], []), ["does not exist"]),
    "analyze/compare-missing": ("analyze", lambda c: ([f"--workdir={c.pretrained}", f"--compare={c.root / 'nope'}"],
                                                      [c.pretrained]), ["--compare="]),
    "analyze/answers-missing": ("analyze", lambda c: ([f"--workdir={c.rm}", f"--answers_file={c.root / 'a.jsonl'}"],
                                                      [c.rm]), ["a.jsonl", "no such"]),
    # --- the other binaries -----------------------------------------------------------------------------------
    "chatgpt/unknown-preset": ("chatgpt", lambda c: (["--config=configs/chatgpt.py:nonexistent",
                                                      f"--workdir={c.fresh()}"], []), ["nonexistent"]),
    "overopt/bad-n": ("overopt", lambda c: (["--config=configs/overopt.py:smoke", "--config.bon.n_values=(0,)",
                                             f"--workdir={c.fresh()}"], []), ["bon.n_values"]),
    "plan/bad-mesh": ("plan", lambda c: (["--config=configs/pretrain.py:tiny", "--mesh=1,x,1", "--num_devices=8",
                                          "--device_memory=1GB"], []), ["--mesh=1,x,1"]),
    "bench/no-config": ("bench", lambda c: ([], []), ["pass --config"]),
    "sweep/missing-file": ("sweep", lambda c: ([f"--sweep={c.root / 'nope.py'}", f"--root={c.fresh()}"], []),
                           ["nope.py"]),
    "hf/missing-dir": ("hf", lambda c: (["import", f"--hf_dir={c.root / 'nope'}", f"--workdir={c.fresh()}"], []),
                       ["nope"]),
    "prepare/no-corpus": ("prepare", lambda c: (["--config=configs/pretrain.py:tiny-bytes",
                                                 f"--config.data.paths={c.root / 'nowhere'}",
                                                 f"--config.data.data_dir={c.root / 'tfds_p'}"], []), ["data.paths"]),
    "model_info/unknown-preset": ("model_info", lambda c: (["--presets=gpt5"], []), ["unknown model preset 'gpt5'"]),
    "fit_scaling/missing-results": ("fit_scaling", lambda c: ([f"--results={c.root / 'r.csv'}"], []),
                                    ["r.csv", "does not exist"]),
}


def _locked(c: Ctx, host: str, pid: int):
    copy = c.locked_copy(host, pid)
    return c.pretrain(workdir=copy), [copy]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line(outcomes, name):
    proc, paths, before = outcomes[name]
    assert_one_error_line(proc, *CASES[name][2])
    assert [tree_digest(p) for p in paths] == before  # nothing written; a new workdir never made


def test_verbose_adds_the_traceback(ctx):
    proc = run_binary(ctx.root, "train", *ctx.pretrain("--config.train.batch_size=0"), "--verbose")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: train.batch_size=0 must be >= 1"


def teardown_module(module):
    for mount in _mounted():
        subprocess.run(["umount", mount], capture_output=True)


def _mounted() -> list[str]:
    try:
        with open("/proc/mounts") as f:
            return [line.split()[1] for line in f if "/failures" in line.split()[1] and "readonly" in line]
    except OSError:
        return []
