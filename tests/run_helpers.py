"""What the subprocess tests of runs share: the binaries' environment, a tiny corpus, tiny runs, tree digests.

Every binary runs as a user would start it (``python -m experiments.<name>``) on 8 fake CPU devices; compiled
programs are shared between the runs of a test session through JAX's persistent cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the quick brown fox jumps over a lazy dog while seven cats sat on warm mats near old trees and "
         "birds sang songs of rain").split()


def env(root) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
                JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def write_corpus(root):
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for f in range(2):
        paragraphs = [" ".join(rng.choice(WORDS, rng.integers(20, 60))) for _ in range(40)]
        (corpus / f"doc{f}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return corpus


def pretrain_args(root, corpus, *, steps: int, ckpt_every: int, dropout: float = 0.0) -> list[str]:
    """A tiny byte-level pretraining run on ``corpus``: a loss record every step."""
    return ["--config=configs/pretrain.py:tiny-bytes", f"--config.data.paths={corpus}",
            "--config.data.split_paragraphs=True", f"--config.data.data_dir={root / 'tfds'}",
            "--config.data.val_fraction=0", "--config.train.sample_prompts=()", "--config.train.log_every=1",
            f"--config.train.steps={steps}", f"--config.train.ckpt_every={ckpt_every}", "--config.train.keep_ckpts=3",
            "--config.optim.warmup_steps=1", f"--config.model.dropout_resid={dropout}"]


def run_binary(root, module: str, *args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *map(str, args)], cwd=REPO, env=env(root),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def start_binary(root, module: str, *args, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"experiments.{module}", *map(str, args)], cwd=REPO,
                            env=env(root), stdout=log, stderr=subprocess.STDOUT)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 1, no traceback, exactly one ``error:`` line, the last line of stderr, holding ``expected``."""
    lines = error_lines(proc.stderr)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == lines[0], proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def tree_digest(path) -> str:
    """Names, sizes, modification times and contents of every file under ``path`` ("" when it does not exist)."""
    if not os.path.exists(path):
        return ""
    if os.path.isfile(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        h.update(f"dir {os.path.relpath(dirpath, path)}\n".encode())
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)} {st.st_size} {st.st_mtime_ns}\n".encode())
            h.update(open(full, "rb").read())
    return h.hexdigest()


def finished_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def tmp_dirs(workdir) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n] if os.path.isdir(d) else []


def losses(workdir) -> dict[int, float]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.endswith("\n")]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def final_params(workdir, step: int) -> dict[str, np.ndarray]:
    """The trained network's arrays at ``step``: ``params``, or an RL state's ``policy_params``."""
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    key = "policy_params" if "policy_params" in restored else "params"
    return {k: np.asarray(v) for k, v in _flatten(restored[key]).items()}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
