"""What a run does when things go wrong around it, through the real binary (``python -m experiments.train``).

Reference: one uninterrupted tiny run (dropout on, so the restored rng and data position matter). Against it:
- SIGTERM and SIGINT: the run finishes its step, saves it, exits 143 / 130 with one notice line and no unfinished
  checkpoint; resuming ends with bitwise the reference's parameters and losses (5 times each at random moments,
  saves included, in the slow test);
- a damaged latest checkpoint (a truncated or deleted data file, an emptied ``state/``) is moved aside with one
  warning and the run resumes from the previous one, again bitwise the reference;
- two launches on one workdir: one trains, the other is refused in one line (or waits with --wait_for_lock);
- a full disk (a small tmpfs): one line naming the device and the room needed, no step after it, no temporary
  directory left;
- re-running a finished run changes nothing (metrics.jsonl, TensorBoard events, summary.json); a resumed run's
  wall_time_s counts every segment; a lock left by a dead process is taken over.
Workdir files also go through an ``epath`` filesystem (a fake ``gs://``) as they do locally.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from run_helpers import (assert_one_error_line, assert_same_params, final_params, finished_steps, losses,
                         pretrain_args, run_binary, start_binary, tmp_dirs, tree_digest, write_corpus)

STEPS, CKPT_EVERY = 24, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    args = pretrain_args(root, write_corpus(root), steps=STEPS, ckpt_every=CKPT_EVERY, dropout=0.1)
    return root, args


@pytest.fixture(scope="module")
def reference(setup):
    root, args = setup
    workdir = root / "reference"
    proc = run_binary(root, "train", *args, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def _train(setup, workdir, *extra, timeout=300):
    root, args = setup
    return run_binary(root, "train", *args, f"--workdir={workdir}", *extra, timeout=timeout)


def _start(setup, workdir, log_name):
    root, args = setup
    log = open(root / log_name, "a")
    return start_binary(root, "train", *args, f"--workdir={workdir}", log=log), root / log_name


def _assert_like_reference(workdir, reference):
    assert not tmp_dirs(workdir)
    assert losses(workdir) == losses(reference)  # bitwise: JSON keeps every float32 digit
    assert_same_params(final_params(workdir, STEPS), final_params(reference, STEPS))


def _signal_when(p, condition, signum, timeout=300) -> bool:
    """Sends ``signum`` to ``p`` once ``condition()`` holds; False if ``p`` exited first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            return False
        if condition():
            p.send_signal(signum)
            return True
        time.sleep(0.002)
    p.kill()
    raise TimeoutError("condition never held")


def _stop_once(setup, workdir, signum, condition, log_name) -> tuple[int, str] | None:
    """Starts the run, signals it when ``condition`` holds; (exit status, its last log line), None if it finished."""
    p, log = _start(setup, workdir, log_name)
    sent = _signal_when(p, condition, signum)
    code = p.wait(timeout=120)
    if not sent:
        assert code == 0, log.read_text()[-3000:]
        return None
    return code, log.read_text().strip().splitlines()[-1]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_step_and_stops(setup, reference, signum, code):
    workdir = setup[0] / f"stopped-{signum}"
    seen = {}

    def at_step_3():
        seen["step"] = max(losses(workdir), default=0)
        return seen["step"] >= 3

    outcome = _stop_once(setup, workdir, signum, at_step_3, f"stopped-{signum}.log")
    assert outcome is not None, "the run ended before the signal"
    status, last = outcome
    stopped = max(finished_steps(workdir))
    assert status == code and last.startswith(f"stopped after step {stopped} on {signal.Signals(signum).name}")
    assert seen["step"] < stopped <= seen["step"] + 3 < STEPS  # within a step (metrics are written a step late)
    assert not tmp_dirs(workdir) and not (workdir / "lock.json").exists()
    assert max(losses(workdir)) == stopped  # the metrics of every step done are written
    first_segment = json.loads((workdir / "checkpoints" / str(stopped) / "extras" / "metadata").read_text())
    started = time.time()
    proc = _train(setup, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_like_reference(workdir, reference)
    wall = json.loads((workdir / "summary.json").read_text())["wall_time_s"]
    assert first_segment["_wall_time_s"] < wall < first_segment["_wall_time_s"] + time.time() - started


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_at_random_moments_resume_bitwise(setup, reference, signum):
    """Five stops at random moments (one as a checkpoint is being written), then a run to the end."""
    workdir = setup[0] / f"random-{signum}"
    rng = random.Random(signum)
    stops = 0
    for attempt in range(12):
        if stops == 5:
            break
        if attempt % 3 == 1:  # as soon as a save has started writing
            condition = lambda: bool(tmp_dirs(workdir))  # noqa: E731
        else:
            target = max(losses(workdir), default=0) + rng.randint(1, 4)
            condition = lambda: max(losses(workdir), default=0) >= target  # noqa: E731
        outcome = _stop_once(setup, workdir, signum, condition, f"random-{signum}.log")
        if outcome is None:
            pytest.fail("the run ended before five stops")
        assert outcome[0] == 128 + signum and outcome[1].startswith("stopped after step")
        assert not tmp_dirs(workdir)
        stops += 1
    assert stops == 5
    proc = _train(setup, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_like_reference(workdir, reference)


@pytest.mark.parametrize("damage", ["truncated", "deleted", "emptied"])
def test_a_damaged_checkpoint_is_set_aside(setup, reference, damage):
    """The run stopped at step 18 (checkpoints 12, 18) and checkpoint 18 is damaged: it resumes from 12."""
    workdir = setup[0] / f"damaged-{damage}"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    (workdir / "summary.json").unlink()
    state = workdir / "checkpoints" / "18" / "state"
    data = sorted(state.glob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    if damage == "truncated":
        with open(data[-1], "r+b") as f:
            f.truncate(data[-1].stat().st_size // 2)
    elif damage == "deleted":
        data[-1].unlink()
    else:
        shutil.rmtree(state)
        state.mkdir()
    proc = _train(setup, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and "checkpoint 18 is damaged" in warnings[0] and "checkpoint 12 instead" in warnings[0]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    aside = [p.name for p in (workdir / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("18.damaged-")  # kept, never deleted
    _assert_like_reference(workdir, reference)


def test_two_launches_one_trains(setup, reference):
    workdir = setup[0] / "twice"
    first, first_log = _start(setup, workdir, "twice-1.log")
    second, second_log = _start(setup, workdir, "twice-2.log")
    codes = sorted([first.wait(timeout=300), second.wait(timeout=300)])
    logs = [first_log.read_text(), second_log.read_text()]
    assert codes == [0, 1], logs
    refused = next(log for log in logs if "error:" in log)
    errors = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by process" in errors[0] and "Traceback" not in refused
    assert errors[0] == refused.strip().splitlines()[-1]
    _assert_like_reference(workdir, reference)  # metrics.jsonl of the run that trained, every step once
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == STEPS and not (workdir / "lock.json").exists()


def test_wait_for_lock_waits_then_finds_the_run_finished(setup, reference):
    workdir = setup[0] / "waiting"
    first, first_log = _start(setup, workdir, "waiting-1.log")
    while not (workdir / "lock.json").exists():
        assert first.poll() is None, first_log.read_text()[-3000:]
        time.sleep(0.01)
    second = _train(setup, workdir, "--wait_for_lock")
    assert first.wait(timeout=300) == 0
    assert second.returncode == 0, second.stderr[-3000:]
    assert "waiting for process" in second.stderr and "holds a finished run; nothing changed" in second.stdout
    _assert_like_reference(workdir, reference)


def test_rerunning_a_finished_run_changes_nothing(setup, reference):
    files = [reference / "metrics.jsonl", reference / "summary.json", *sorted((reference / "tb").iterdir())]
    before = [tree_digest(f) for f in files] + [tree_digest(reference)]
    proc = _train(setup, reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "holds a finished run; nothing changed" in proc.stdout
    assert [tree_digest(f) for f in files] + [tree_digest(reference)] == before
    assert sorted((reference / "tb").iterdir()) == files[2:]


def test_a_lock_of_a_dead_process_is_taken_over(setup, reference):
    workdir = setup[0] / "stale"
    shutil.copytree(reference, workdir)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (workdir / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                   "started": "2025-01-01T00:00:00+00:00", "command": "killed"}))
    proc = _train(setup, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the workdir lock of process {gone.pid}" in proc.stderr
    assert not (workdir / "lock.json").exists()


def test_a_full_disk_stops_the_run_in_one_line(setup):
    """A 2.5 MB tmpfs holds the first checkpoint (about 1.5 MB), not the second."""
    mount = setup[0] / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        workdir = mount / "run"
        proc = _train(setup, workdir)
        line = assert_one_error_line(proc, f"no room for checkpoint {2 * CKPT_EVERY} in {workdir}/checkpoints",
                                     f"tmpfs (mounted at {mount}) has", "needs about")
        assert "free space there" in line.lower()
        assert finished_steps(workdir) == [CKPT_EVERY] and not tmp_dirs(workdir)
        assert max(losses(workdir)) <= 2 * CKPT_EVERY  # no step after the save that failed
        assert not (workdir / "lock.json").exists()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_workdir_files_go_through_epath(tmp_path, monkeypatch):
    """config.json, the lock, metrics.jsonl and summary.json on a ``gs://`` workdir, here a fake one: every epath
    call on a gs:// path is served from a local directory."""
    import ml_collections
    from etils.epath import testing as epath_testing

    from gptjax import paths
    from gptjax.errors import WorkdirLockedError
    from gptjax.train import lock as lock_lib, metrics as metrics_lib, workdir as workdir_lib

    bucket = tmp_path / "gs" / "bucket"

    def local(path):
        text = os.fspath(path)
        return str(tmp_path / "gs" / text[len("gs://"):]) if text.startswith("gs://") else text

    def served(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def served_two(original, path, dst, **kwargs):
        return original(local(path), local(dst), **kwargs)

    class NoTensorBoard:  # TensorBoard reaches gs:// through fsspec and gcsfs, which this test does not fake
        def __init__(self, *args, **kwargs):
            pass

        add_event = flush = close = lambda self, *args: None

    monkeypatch.setattr(metrics_lib, "EventFileWriter", NoTensorBoard)
    cfg = ml_collections.ConfigDict({"model": {"d_model": 8}, "train": {"allow_config_change": False}})
    workdir = "gs://bucket/run"
    fns = {name: served for name in ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree",
                                     "stat")}
    with epath_testing.mock_epath(**fns, rename=served_two, replace=served_two):
        assert str(paths.as_path(workdir)) == workdir and not paths.is_local(workdir)
        workdir_lib.check_or_write_config(workdir, cfg)
        workdir_lib.check_or_write_config(workdir, cfg, write=False)
        lock = lock_lib.WorkdirLock(workdir)
        lock.acquire()
        with pytest.raises(WorkdirLockedError, match="is in use by process"):
            lock_lib.WorkdirLock(workdir).acquire()
        assert json.loads((bucket / "run" / "lock.json").read_text())["pid"] == os.getpid()
        lock.release()
        writer = metrics_lib.MetricsWriter(workdir)
        writer.write_scalars(1, {"loss": 2.0})
        writer.write_scalars(2, {"loss": 1.5})
        writer.close()
        resumed = metrics_lib.MetricsWriter(workdir, resume_step=1)
        resumed.write_scalars(2, {"loss": 1.25})
        resumed.close()
        assert metrics_lib.read_metrics(workdir) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.25}]
        paths.write_text_atomic(paths.as_path(workdir) / "summary.json", json.dumps({"steps": 2}))
    assert json.loads((bucket / "run" / "config.json").read_text())["model"]["d_model"] == 8
    assert sorted(p.name for p in (bucket / "run").iterdir()) == ["config.json", "metrics.jsonl", "summary.json"]
