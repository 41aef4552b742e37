"""The benchmark (gptjax.tools.bench, experiments.bench, configs/bench.py), on the CPU with the tiny config.

Checked against: the JSON schema the GPU script and the README table read (every field present, rates positive
and finite, each rate equal to tokens counted / median time, token counts equal to the config's shapes worked
out by hand); MFU against the hand formula 6·(non-embedding params + V·d) + 12·L·d·T written out for GPT-2 small
(Radford et al. 2019 shapes, vocabulary padded to 50,304) and the H100's 989 TFLOP/s dense bf16 peak
(NVIDIA's H100 datasheet); the batch-candidate search against its rule (first candidate whose compiled program fits
the device memory); the one-shot GPU script against its contract (runs the configs it is given on a CPU when
allowed, prints one table, writes all.json). No timing is asserted.
"""

import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import types

import pytest

from configs.bench import CONFIGS, GPU_CONFIGS, get_config
from gptjax.errors import ConfigError
from gptjax.tools import bench
from gptjax.tools.bench import timing

H100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
CPU = types.SimpleNamespace(platform="cpu", device_kind="cpu")


def smoke_config(name="cpu-tiny"):
    c = get_config(name)
    # Unrolled layers and unoptimised XLA programs compile several times faster on a CPU; the timings of a
    # smoke run mean nothing anyway.
    c.model.scan_layers, c.model.num_layers = False, 1
    c.fast_compile = True
    c.warmup, c.repeats = 0, 2
    return c


def test_cpu_tiny_all_workloads_write_the_schema(tmp_path):
    c = smoke_config()
    seen = []
    results = bench.run(c, on_result=seen.append)
    path = tmp_path / "r.json"
    bench.write_json(str(path), results)

    raw = json.loads(path.read_text())
    assert raw["meta"]["schema"] == bench.SCHEMA and raw["meta"]["platform"] == "cpu"
    for key in ("device_kind", "jax", "xla_flags", "time"):
        assert key in raw["meta"]
    assert all(set(row) == set(bench.RESULT_FIELDS) for row in raw["results"])
    meta, rows = bench.read_json(str(path))
    assert [r.workload for r in rows] == ["pretrain", "sft", "reward", "ppo-rollout", "ppo-update", "ppo", "sample",
                                          "loop"]
    assert [r.workload for r in seen] == [r.workload for r in rows]

    by_name = {r.workload: r for r in rows}
    for r in rows:
        assert r.status == "ok", (r.workload, r.status)
        assert len(r.step_s_all) == c.repeats and all(t > 0 and math.isfinite(t) for t in r.step_s_all)
        assert r.step_s == pytest.approx(statistics.median(r.step_s_all))
        assert r.tokens_per_s == pytest.approx(r.tokens_per_call / r.step_s)
        assert r.tokens_per_s > 0 and math.isfinite(r.tokens_per_s)
        assert r.compile_s > 0 and r.mfu is None  # no peak for a CPU
        assert r.peak_bytes is None  # XLA:CPU keeps no allocator statistics
        assert r.program_bytes is None or r.program_bytes > 0
        assert r.device_kind == "cpu" and r.num_devices == 1
    for name in ("pretrain", "sft", "reward", "sample", "ppo-rollout", "ppo-update"):
        assert by_name[name].program_bytes > 0
    # The loop row is run_training's own report: `repeats` timed log intervals of the pretraining step's shape.
    assert by_name["loop"].extra["intervals_timed"] == c.repeats
    assert by_name["loop"].tokens_per_call == by_name["pretrain"].tokens_per_call

    T, B = c.seq_len, c.batch_size
    assert by_name["pretrain"].tokens_per_call == B * T == by_name["sft"].tokens_per_call
    assert by_name["reward"].tokens_per_call == c.reward_prompts * c.reward_k * T
    assert by_name["sample"].tokens_per_call == c.sample.batch_size * c.sample.max_new_tokens
    episode = c.ppo.prompt_len + c.ppo.max_new_tokens
    assert by_name["ppo-rollout"].tokens_per_call == c.ppo.rollout_batch_size * c.ppo.max_new_tokens
    assert by_name["ppo-update"].tokens_per_call == c.ppo.ppo_epochs * c.ppo.rollout_batch_size * episode
    ppo = by_name["ppo"]
    assert 0 < ppo.extra["rollout_share"] < 1
    assert ppo.step_s == pytest.approx(statistics.median(
        a + b for a, b in zip(by_name["ppo-rollout"].step_s_all, by_name["ppo-update"].step_s_all)))
    assert by_name["pretrain"].flops_per_token > 0 and by_name["reward"].flops_per_token > 0

    table = bench.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| workload")
    assert "(rollout " in table[2 + 5]  # the ppo row shows the rollout share


def gpt2_small_flops_per_token(vocab=50304, seq_len=1024):
    L, d = 12, 768
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * (d + d)
    non_embedding = L * per_layer + 2 * d
    return 6 * (non_embedding + vocab * d) + 12 * L * d * seq_len, 6 * vocab * d


def test_mfu_equals_hand_formula():
    cfg = bench.model_config(get_config("gpt2-124m-b48"))
    hand, head = gpt2_small_flops_per_token()
    assert hand == 855_383_040
    from gptjax import flops
    assert flops.flops_per_token(cfg, 1024) == hand
    assert flops.score_flops_per_token(cfg, 1024) == hand - head
    tokens_per_s = 600_000
    expected = tokens_per_s * hand / 989e12
    assert bench.model_mfu(tokens_per_s, hand, [H100]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.5189, abs=1e-4)
    # Two cards doing the same total rate are half as utilised; a CPU has no peak.
    assert bench.model_mfu(tokens_per_s, hand, [H100, H100]) == pytest.approx(expected / 2, rel=1e-12)
    assert bench.model_mfu(tokens_per_s, hand, [CPU]) is None


def test_targets_decide_met():
    c = get_config("gpt2-124m-b48")
    row = dict(workload="pretrain", config=c.name, label="", status="ok", device_kind="NVIDIA H100 80GB HBM3",
               num_devices=1, model="m", batch=48, seq_len=1024, tokens_per_call=48 * 1024, step_s=0.08,
               step_s_all=[0.08], tokens_per_s=614_400.0, flops_per_token=None, mfu=None, peak_bytes=None,
               program_bytes=None, compile_s=1.0)
    r = bench.Result(**row)
    bench.apply_target(r, c.targets.pretrain)
    assert r.met is True and r.target == ">= 600,000 tok/s" and "482,766" in r.baseline
    r = bench.Result(**{**row, "tokens_per_s": 590_000.0})
    bench.apply_target(r, c.targets.pretrain)
    assert r.met is False
    ppo = bench.Result(**{**row, "workload": "ppo", "extra": {"rollout_share": 0.62}})
    bench.apply_target(ppo, get_config("ppo-124m").targets.ppo)
    assert ppo.met is False and "50%" in ppo.target


def test_batch_candidates_take_the_first_that_fits(monkeypatch):
    c = smoke_config()
    c.batch_candidates = "8:none,4:full"
    sizes = iter([10**12, 10**3])  # the first program is "too big" for a 1 MB device, the second fits
    monkeypatch.setattr(timing, "device_limit", lambda devices: 10**6)
    monkeypatch.setattr(timing, "program_bytes", lambda compiled: next(sizes))
    (r,) = bench.run(c, "pretrain")
    assert r.status == "ok" and r.batch == 4 and "remat:full" in r.model
    assert len(r.extra["candidates_tried"]) == 2 and r.tokens_per_call == 4 * c.seq_len


def test_bad_input_gives_one_clear_error():
    c = get_config("cpu-tiny")
    with pytest.raises(ConfigError, match="pretrain,sft,reward,ppo,sample|'pretrain'"):
        bench.run(c, "pretrain,train")
    c.batch_candidates = "8:fast"
    with pytest.raises(ConfigError, match="B:remat"):
        bench.batch_candidates(c, bench.model_config(c))
    with pytest.raises(ValueError, match="cpu-tiny"):
        get_config("gpt4")


def test_every_gpu_config_is_a_target_workload_in_bf16():
    assert set(GPU_CONFIGS) == set(CONFIGS) - {"cpu-tiny", "cpu-small"}
    for name in GPU_CONFIGS:
        c = get_config(name)
        cfg = bench.model_config(c)
        assert cfg.dtype == "bfloat16" and cfg.vocab_size == 50304, name
        assert c.targets, name  # every GPU row has its target
    assert (get_config("gpt2-124m-b48").batch_size, get_config("gpt2-124m-b48").seq_len) == (48, 1024)
    assert (get_config("gpt3-xl-t2048-b4").batch_size, get_config("gpt3-xl-t2048-b4").seq_len) == (4, 2048)
    s = get_config("sample-124m").sample
    assert (s.batch_size, s.prompt_len, s.max_new_tokens) == (64, 64, 256)


def test_recommended_xla_flags_only_on_gpu():
    assert bench.recommended_xla_flags("cpu") == []
    flags = bench.recommended_xla_flags("gpu")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags


def test_gpu_script_prints_one_table_on_a_cpu(tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENCH_CONFIGS": "cpu-tiny", "REQUIRE_GPU": "0", "PY": sys.executable,
           "BENCH_ARGS": "--workloads=sample --config.fast_compile=True --config.model.num_layers=1 "
                         "--config.warmup=0 --config.repeats=1"}
    out = subprocess.run([str(repo / "scripts" / "gpu_bench.sh"), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| workload") and len(table) == 3 and "| sample " in table[2]
    meta, rows = bench.read_json(str(tmp_path / "all.json"))
    assert [r.workload for r in rows] == ["sample"] and rows[0].status == "ok"
    assert [r.workload for r in bench.read_json(str(tmp_path / "runs.jsonl"))[1]] == ["sample"]
    assert len(list(tmp_path.iterdir())) <= 8  # the device runner copies back at most 8 files
    assert "--xla_gpu" not in meta["xla_flags"]  # GPU flags are never forced on a CPU


def test_profile_dir_records_top_device_ops(tmp_path):
    """--profile_dir traces one more call per workload; its op table names real XLA ops with positive times."""
    results = bench.run(get_config("cpu-tiny"), "sample", profile_dir=str(tmp_path))
    ops = results[0].extra["top_ops"]
    assert ops and all(o["ms"] > 0 and o["count"] >= 1 for o in ops)
    assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
    assert 0 < sum(o["share"] for o in ops) <= 1 + 1e-9
    assert list(tmp_path.glob("**/*.xplane.pb"))  # the trace itself, for TensorBoard / Perfetto
    assert "calls" in bench.format_op_times(ops).splitlines()[0]
