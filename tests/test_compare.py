"""The stage-3 comparison (experiments.compare): its budgets, its report's arithmetic, and a smoke run end to end.

References: the report's summary is checked against means, deltas and gaps worked out by hand on a made-up results
dict; the budgets against the rule configs/compare.py documents (every sampling method samples ``budget.episodes``
responses of at most ``sampling.max_new_tokens`` tokens); the gold reward adapter against the labeler itself.
"""

import json
import math
import os
import pathlib

import pytest

from configs import compare as compare_config
from gptjax.seed_world import compare, compare_report, labeler, rewards

import run_helpers

SAMPLING_STAGES = ("ppo", "grpo", "rloo", "rs")


def _episodes(method) -> int:
    """Responses a method's config samples in all (0 for DPO)."""
    if method.stage == "rs":
        return method.rs.rounds * method.rs.prompts_per_round * method.rs.samples_per_prompt
    if method.stage in SAMPLING_STAGES:
        return method.train.steps * method[method.stage].rollout_batch_size
    return 0


@pytest.mark.parametrize("preset", ["default", "smoke"])
def test_sampling_methods_sample_the_same_budget(preset):
    cfg = compare_config.get_config(preset)
    assert set(cfg.order) == set(cfg.methods) and cfg.reference_method in cfg.order
    sampling = [name for name in cfg.order if cfg.methods[name].stage in SAMPLING_STAGES]
    assert len(sampling) == 7
    for name in sampling:
        assert _episodes(cfg.methods[name]) == cfg.budget.episodes, name
    assert len({int(cfg.methods[name].sampling.max_new_tokens) for name in sampling}) == 1
    for rm_name, gold_name in cfg.gaps:
        assert compare.reward_label(cfg.methods[rm_name]) == "RM"
        assert compare.reward_label(cfg.methods[gold_name]) == "gold"
    assert compare.reward_label(cfg.methods.dpo) == "comparisons"


def test_placeholders_are_filled_and_the_seed_set(tmp_path):
    cfg = compare_config.get_config("smoke")
    filled = compare.method_config(cfg.methods.ppo, compare.placeholders(str(tmp_path)), seed=3)
    assert filled.train.seed == 3
    assert filled.train.init_from == str(tmp_path / "sft")
    assert filled.ppo_init.reward_from == str(tmp_path / "reward")
    assert filled.data.prompts_path == str(tmp_path / "world" / "ppo_prompts.jsonl")
    text = json.dumps(filled.to_dict())
    assert not any(key in text for key in compare.placeholders("x"))


def test_gold_reward_is_the_labelers_score_on_every_kind_of_record():
    oracle = labeler.GoldOracle()
    questions = [labeler.Question("number", "en", "Is 7 prime?", number=7),
                 labeler.Question("number", "zh", "那 9 呢？", number=9, context=(("user", "7 是質數嗎？"),
                                                                              ("assistant", "是的，7 是質數。"))),
                 labeler.Question("special", "en", "Is -7 prime?", value="-7", special="negative")]
    for q in questions:
        for answer in ("Yes, 7 is prime.", "9 可以被 3 整除，所以 9 不是質數。", "I cannot tell."):
            assert rewards.gold_reward(q.to_record(), answer) == oracle.score(q, answer)


def test_cached_evaluations_are_recomputed_when_the_settings_change(tmp_path):
    path, calls = str(tmp_path / "eval.json"), []
    compute = lambda: calls.append(1) or {"x": len(calls)}  # noqa: E731
    assert compare._cached(path, {"a": 1}, compute) == {"x": 1}
    assert compare._cached(path, {"a": 1}, compute) == {"x": 1}
    assert compare._cached(path, {"a": 2}, compute) == {"x": 2}
    assert len(calls) == 2


def _final(bal: float, gold: float, kl: float, tokens: float) -> dict:
    row = {key: 0.5 for key, _, _ in compare_report.COLUMNS if key != "wall_s"}
    row.update({"sampled/balanced_accuracy": bal, "sampled/mean_gold_score": gold, "kl_to_sft": kl,
                "generated_tokens": tokens, "episodes": 32.0})
    return row


def _run(bal, gold, kl, tokens, stage, reward, curve=True) -> dict:
    final = _final(bal, gold, kl, tokens)
    points = [{"step": 1, "generated_tokens": tokens / 2, "kl_to_sft": kl / 2, "curve/balanced_accuracy": bal / 2,
               "curve/mean_gold_score": gold / 2, "rm_score": 0.0},
              {"step": 2, "generated_tokens": tokens, "kl_to_sft": kl, "curve/balanced_accuracy": bal,
               "curve/mean_gold_score": gold, "rm_score": 1.0}]
    return {"final": final, "curve": points if curve else points[1:], "wall_s": 10.0, "stage": stage,
            "reward": reward}


def _results() -> dict:
    runs = {"ppo": {"0": _run(0.60, 1.0, 2.0, 100, "ppo", "RM"), "1": _run(0.70, 2.0, 4.0, 200, "ppo", "RM", False)},
            "ppo-gold": {"0": _run(0.80, 3.0, 1.0, 100, "ppo", "gold"),
                         "1": _run(0.90, 4.0, 3.0, 300, "ppo", "gold", False)},
            "dpo": {"0": _run(0.64, 1.5, 0.5, 0, "dpo", "comparisons")},
            "rs": {"0": _run(0.50, 0.5, 0.2, 100, "rs", "RM")}}
    sft = {"final": {**_final(0.4, 0.0, 0.0, 0.0), "curve/balanced_accuracy": 0.4, "rm_score": 0.0}}
    return {"seeds": [0, 1], "sft": sft, "runs": runs, "reference_method": "ppo",
            "gaps": [["ppo", "ppo-gold"], ["grpo", "grpo-gold"]],
            "settings": {"episodes": 32, "questions": 8, "specials": 4, "requests": 2, "answers_per_question": 1},
            "timings_s": {"pipeline_s": 1.0, "total_s": 9.0}}


def test_summary_means_deltas_gaps_and_curves():
    results = _results()
    s = compare_report.summarize(results)
    ppo, gold = s["methods"]["ppo"], s["methods"]["ppo-gold"]
    assert ppo["sampled/balanced_accuracy"]["mean"] == pytest.approx(0.65)
    assert ppo["sampled/balanced_accuracy"]["std"] == pytest.approx(math.sqrt(0.005))  # ddof 1 over two seeds
    assert ppo["generated_tokens"]["mean"] == 150 and ppo["sampled/balanced_accuracy"]["n"] == 2
    assert s["methods"]["dpo"]["kl_to_sft"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert (ppo["stage"], ppo["reward"], gold["reward"]) == ("ppo", "RM", "gold")
    assert ppo["delta_vs_reference"] == 0.0
    assert gold["delta_vs_reference"] == pytest.approx(0.20)
    assert s["methods"]["dpo"]["delta_vs_reference"] == pytest.approx(-0.01)
    assert s["methods"]["rs"]["delta_vs_reference"] == pytest.approx(-0.15)
    assert s["within_2_points"] == ["ppo-gold", "dpo"]
    assert set(s["gaps"]) == {"ppo"}  # no grpo runs: no gap
    assert s["gaps"]["ppo"]["gold_method"] == "ppo-gold"
    assert s["gaps"]["ppo"]["sampled/balanced_accuracy"] == pytest.approx(0.20)
    assert s["gaps"]["ppo"]["sampled/mean_gold_score"] == pytest.approx(2.0)
    assert s["gaps"]["ppo"]["kl_to_sft"] == pytest.approx(-1.0)
    # The curve: step 1 only from seed 0 (the curve seed), step 2 the mean over both seeds.
    assert [p["seeds"] for p in ppo["curve"]] == [1, 2]
    assert ppo["curve"][0]["curve/balanced_accuracy"] == pytest.approx(0.30)
    assert ppo["curve"][1]["generated_tokens"] == pytest.approx(150)
    assert ppo["curve"][1]["rm_score"] == 1.0


def test_table_rows_and_plots(tmp_path):
    results = _results()
    results["summary"] = compare_report.summarize(results)
    table = compare_report.format_table(results)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["method", "stage", "reward"] and header[-1] == "Δ vs ppo"
    assert len(header) == 4 + len(compare_report.COLUMNS)
    rows = {line.split("|")[1].strip(): line for line in lines[2:7]}
    assert set(rows) == {"SFT", "ppo", "ppo-gold", "dpo", "rs"}
    assert "0.650 ± 0.071" in rows["ppo"] and "+20.0 pt" in rows["ppo-gold"] and "-15.0 pt" in rows["rs"]
    assert "ppo → ppo-gold: balanced accuracy +20.0 pt, mean gold score +2.000, KL -1.00 nats" in table
    assert "Within 2 points of ppo's sampled balanced accuracy: ppo-gold, dpo." in table
    paths = compare_report.plot(results, str(tmp_path))
    assert set(paths) == {"compare_kl.png", "compare_tokens.png"}
    assert all(os.path.getsize(p) > 1000 for p in paths.values())


@pytest.mark.slow
def test_smoke_comparison_end_to_end(smoke_pipeline, tmp_path):
    cfg = compare_config.get_config("smoke")
    out = tmp_path / "compare"
    proc = run_helpers.run_binary(tmp_path, "compare", "--config=configs/compare.py:smoke",
                                  f"--workdir={smoke_pipeline}", f"--out={out}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "compare.json", encoding="utf-8") as f:
        results = json.load(f)
    methods = results["summary"]["methods"]
    assert list(methods) == list(cfg.order)
    keys = [key for key, _, _ in compare_report.COLUMNS]
    for name, m in methods.items():
        for key in keys:
            assert math.isfinite(m[key]["mean"]), (name, key)
        final = results["runs"][name]["0"]["final"]
        for key in keys[:-1] + ["greedy/prime/accuracy", "greedy/honest", "greedy/refused", "sampled/eos"]:
            assert math.isfinite(final[key]), (name, key)
        for key in ("sampled/balanced_accuracy", "greedy/balanced_accuracy", "sampled/off_topic", "sampled/honest",
                    "sampled/refused", "sampled/over_refusal"):
            assert 0.0 <= final[key] <= 1.0, (name, key)
        assert [p["step"] for p in m["curve"]] == sorted(p["step"] for p in m["curve"]) and m["curve"]
    # The budget rule: every sampling method sampled budget.episodes responses of at most max_new_tokens tokens.
    sampling = [n for n in cfg.order if cfg.methods[n].stage in SAMPLING_STAGES]
    max_new = int(cfg.methods[sampling[0]].sampling.max_new_tokens)
    for name in sampling:
        final = results["runs"][name]["0"]["final"]
        assert final["episodes"] == cfg.budget.episodes, name
        assert 0 < final["generated_tokens"] <= cfg.budget.episodes * max_new, name
    assert results["runs"]["dpo"]["0"]["final"]["generated_tokens"] == 0
    assert set(results["summary"]["gaps"]) == {rm for rm, _ in cfg.gaps}
    for name in ("compare_kl.png", "compare_tokens.png"):
        assert os.path.getsize(out / name) > 1000
        assert results["plots"][name] == name  # paths relative to the results file: the folder can move
    assert (out / results["workdir"]).resolve() == pathlib.Path(smoke_pipeline).resolve()
    assert (out / "compare.md").read_text(encoding="utf-8").startswith("| method | stage | reward |")
    assert "Δ vs ppo" in proc.stdout
