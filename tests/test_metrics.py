"""Metrics files read back by their own readers: TensorBoard's EventAccumulator (the ``tensorboard`` package,
no TensorFlow) and ``json``; a resumed run's records replace the interrupted run's later ones in both."""

import json
import os

from tensorboard.backend.event_processing import event_accumulator

from gptjax.train.metrics import TB_DIR, MetricsWriter, format_progress, read_metrics


def load_tb(workdir):
    acc = event_accumulator.EventAccumulator(os.path.join(workdir, TB_DIR))
    acc.Reload()
    return acc


def test_scalars_and_text_read_back_by_tensorboard(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for step in (10, 20, 30):
        w.write_scalars(step, {"train/loss": 5.0 - step / 10, "perf/tokens_per_s": 1000.0 * step})
    w.write_texts(30, {"samples/0": "ROMEO: hello"})
    w.close()
    acc = load_tb(str(tmp_path))
    assert set(acc.Tags()["scalars"]) == {"train/loss", "perf/tokens_per_s"}
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("train/loss")] == [(10, 4.0), (20, 3.0), (30, 2.0)]
    text = acc.Tensors("samples/0")[0]
    assert text.step == 30 and text.tensor_proto.string_val[0].decode() == "ROMEO: hello"
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[1] == {"step": 20, "train/loss": 3.0, "perf/tokens_per_s": 20000.0}


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        w.write_scalars(step, {"train/loss": float(step)})
    w.close()
    w = MetricsWriter(str(tmp_path), resume_step=2)  # the run was killed after step 4; checkpoint at 2
    for step in (3, 4):
        w.write_scalars(step, {"train/loss": 10.0 + step})
    w.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 13.0),
                                                                                  (4, 14.0)]
    values = [(e.step, e.value) for e in load_tb(str(tmp_path)).Scalars("train/loss")]
    assert values == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_non_finite_values_are_json_null(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write_scalars(1, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "train/lr": 1e-3})
    w.close()
    line = open(os.path.join(tmp_path, "metrics.jsonl")).read()
    assert json.loads(line) == {"step": 1, "train/loss": None, "train/grad_norm": None, "train/lr": 1e-3}


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(str(tmp_path / "wd"), enabled=False)
    w.write_scalars(1, {"x": 1.0})
    w.close()
    assert not (tmp_path / "wd").exists()


def test_progress_line():
    line = format_progress(120, 2000, loss=3.21041, tokens_per_s=12345.4, mfu=0.3123, eta_s=751, extra={"lr": 6e-4})
    assert line == "step 120/2000 (6%) | loss 3.2104 | lr 0.0006 | 12,345 tok/s | MFU 31.2% | ETA 0:12:31"
    assert "MFU n/a" in format_progress(1, 2, loss=1.0, tokens_per_s=1.0, mfu=None, eta_s=None)
    assert format_progress(1, 2, loss=1.0, tokens_per_s=None, mfu=None, eta_s=None) == (
        "step 1/2 (50%) | loss 1.0000 | tok/s n/a | MFU n/a")
