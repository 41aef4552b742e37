"""Real multi-process training on CPU: two ``experiments.train`` processes joined by ``jax.distributed``.

Each process drives 4 CPU devices (8 global devices, gloo collectives) and trains on an FSDP mesh (1, 8, 1); the
reference is the same command in one process with 8 devices. The corpus makes the two runs see the same global
batches: every document is exactly one packed row (``seq_len`` bytes after its EOS) and shuffling is off, so
the two processes' rows at each step (documents ``8s + i, 8s + 2 + i, ...`` of process ``i``) are the
one-process batch's rows in another order, and the mean loss must agree (fp32, 1e-5). The corpus is prepared by
process 0 while process 1 waits. The checkpoint the two processes wrote is then read in this one process, and a
2-process SFT step from the reference run must equal the 1-process step (SFT splits each global batch by rows).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from gptjax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, STEPS = 64, 4
LETTERS = "abcdefghijklmnopqrstuvwxyz"
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS="
                             "--xla_force_host_platform_device_count=8 (make test sets it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args: list[str], workdir, processes: int, log) -> None:
    """``experiments.train`` in ``processes`` processes with 8 devices in all; waits for every one."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
    extra = [[]] if processes == 1 else [
        [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
        for port in [free_port()] for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.train", *args, f"--workdir={workdir}", *e],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT) for e in extra]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * processes, open(log.name).read()[-4000:]


def losses(workdir) -> list[float]:
    return [r["train/loss"] for r in read_metrics(str(workdir)) if "train/loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list(LETTERS), SEQ_LEN)) for _ in range(8 * STEPS * 2)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    common = ["--config=configs/pretrain.py:tiny-bytes", f"--config.data.paths={root / 'corpus.jsonl'}",
              f"--config.data.data_dir={root / 'data'}", "--config.data.val_fraction=0",
              "--config.data.shuffle=False", f"--config.train.seq_len={SEQ_LEN}", "--config.train.batch_size=8",
              f"--config.train.steps={STEPS}", "--config.train.log_every=1", f"--config.train.ckpt_every={STEPS}",
              "--config.optim.warmup_steps=1", "--config.train.sample_prompts=()", "--config.mesh.shape=(1,8,1)"]
    with open(root / "train.log", "a") as log:
        train(common, root / "one", 1, log)
        # Its own data_dir: process 0 prepares the corpus while process 1 waits for it.
        train(common + [f"--config.data.data_dir={root / 'data_two'}"], root / "two", 2, log)
    return root


@needs_8
def test_two_processes_match_one(runs):
    one, two = losses(runs / "one"), losses(runs / "two")
    assert len(one) == len(two) == STEPS
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


@needs_8
def test_checkpoint_of_two_processes_restores_in_one(runs):
    from gptjax.stages.registry import load_policy

    _, params_two, _, _ = load_policy(str(runs / "two"))
    _, params_one, _, _ = load_policy(str(runs / "one"))
    for a, b in zip(jax.tree.leaves(params_two), jax.tree.leaves(params_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)


@needs_8
def test_sft_step_in_two_processes_equals_one(runs):
    conversations = [[{"role": "user", "content": f"question {k}"}, {"role": "assistant", "content": "x" * (5 + k)}]
                     for k in range(16)]
    (runs / "sft.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    args = ["--config=configs/sft.py", f"--config.train.init_from={runs / 'one'}",
            f"--config.data.train_path={runs / 'sft.jsonl'}", "--config.train.steps=2", "--config.train.batch_size=8",
            f"--config.train.seq_len={SEQ_LEN}", "--config.train.log_every=1", "--config.mesh.shape=(1,8,1)",
            "--config.train.sample_prompts=()"]
    with open(runs / "sft.log", "a") as log:
        train(args, runs / "sft_one", 1, log)
        train(args, runs / "sft_two", 2, log)
    one, two = losses(runs / "sft_one"), losses(runs / "sft_two")
    assert len(one) == len(two) == 2
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
