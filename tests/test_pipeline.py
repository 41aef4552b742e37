"""The seed-world pipeline end to end (smoke sizes), stage hand-off and the chat session.

References: hand-off is checked against the previous run's own checkpoint (a run with a vanishing learning
rate must end where it started); the streaming chat session against the batched, jitted sampler (two
independent decoders of the same greedy policy); gold metrics against the oracle's definition (ranges).
"""

import io
import json
import os

import jax
import numpy as np
import pytest

from configs import chatgpt as chatgpt_config
from gptjax import sampling
from gptjax.data import chat
from gptjax.errors import ConfigError
from gptjax.seed_world import evaluation, pipeline, tables
from gptjax.seed_world import world as world_lib
from gptjax.stages import registry
from gptjax.tools.chat_session import ChatSession, run_repl
from gptjax.train import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(smoke_pipeline, smoke_results):
    return smoke_pipeline, chatgpt_config.get_config("smoke"), smoke_results


def test_pipeline_runs_every_stage_and_reports_gold_metrics(smoke):
    workdir, _, results = smoke
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert ckpt_lib.Checkpointer(os.path.join(workdir, stage), keep=0).latest_step() is not None, stage
    for stage in ("pretrain", "sft", "ppo"):
        for mode in ("sampled", "greedy"):
            for metric in ("balanced_accuracy", "valid_reason_rate", "language_match"):
                assert 0.0 <= results[stage][f"{mode}/{metric}"] <= 1.0
        assert results[stage][f"sampled/num_questions"] == len(
            world_lib.build_world(world_lib.SeedWorldConfig(
                **{**chatgpt_config.get_config("smoke").world.to_dict(), "seed": 0})).heldout_questions)
        assert set(results[stage]["showcase"]) == {"27 是不是質數？", "Is 27 a prime number?"}
    assert results["sft"]["kl_to_sft"] == 0.0
    assert np.isfinite(results["ppo"]["kl_to_sft"])
    assert 0.0 <= results["reward"]["heldout_pairwise_accuracy"] <= 1.0
    table = tables.format_table(results)
    assert "pretrain" in table and "reward model" in table
    # Perplexity is reported for the token-NLL stages only, never for the RM's pairwise loss.
    for stage, has_perplexity in (("pretrain", True), ("sft", True), ("reward", False)):
        with open(os.path.join(workdir, stage, "metrics.jsonl"), encoding="utf-8") as f:
            evals = [row for row in map(json.loads, f) if "eval/loss" in row]
        assert evals and all(("eval/perplexity" in row) == has_perplexity for row in evals), stage
    # Progress rates: the trainer's first record carries the first step's time (compilation) and every record a
    # rate; PPO's rates are its positions and generated tokens over the iteration's measured times.
    with open(os.path.join(workdir, "pretrain", "metrics.jsonl"), encoding="utf-8") as f:
        train = [row for row in map(json.loads, f) if "train/loss" in row]
    assert train[0]["perf/first_step_s"] > 0 and all("perf/first_step_s" not in row for row in train[1:])
    assert all(row["perf/tokens_per_s"] > 0 for row in train[1:])
    with open(os.path.join(workdir, "ppo", "config.json"), encoding="utf-8") as f:
        rollout_batch = json.load(f)["ppo"]["rollout_batch_size"]
    with open(os.path.join(workdir, "ppo", "metrics.jsonl"), encoding="utf-8") as f:
        ppo_rows = [row for row in map(json.loads, f) if "time/rollout_s" in row]
    positions = {round(row["perf/episode_tokens_per_s"] * (row["time/rollout_s"] + row["time/update_s"]))
                 for row in ppo_rows}
    assert len(positions) == 1 and positions.pop() % rollout_batch == 0
    for row in ppo_rows:
        assert row["perf/rollout_new_tokens_per_s"] * row["time/rollout_s"] == pytest.approx(
            rollout_batch * row["rollout/response_length"], rel=1e-6)
    # The labeler ranked answers of both models (labels.pretrain_k of the K are the pretrained model's).
    with open(os.path.join(workdir, "labels", "rankings_train.jsonl"), encoding="utf-8") as f:
        assert all(len(json.loads(line)["responses"]) >= 2 for line in f)


def _params_close(a, b, atol=1e-6):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), dict(jax.tree_util.tree_leaves_with_path(b))
    assert flat_a, "no parameters"
    for path, x in flat_a:
        np.testing.assert_allclose(np.asarray(x), np.asarray(flat_b[path]), atol=atol, err_msg=str(path))


def test_stage_handoff_loads_the_previous_runs_parameters(smoke, tmp_path):
    workdir, cfg, _ = smoke
    files = {n: os.path.join(workdir, "world", f"{n}.jsonl") for n in ("pretrain", "sft_train", "sft_eval",
                                                                        "ppo_prompts")}
    labels = {"train": os.path.join(workdir, "labels", "rankings_train.jsonl"),
              "eval": os.path.join(workdir, "labels", "rankings_eval.jsonl")}
    _, s, r, _ = pipeline._configure(cfg, workdir, files, labels)
    # SFT for one step at a vanishing learning rate ends where pretraining ended.
    s.train.steps, s.optim.lr, s.optim.weight_decay = 1, 1e-12, 0.0
    s.train.eval_every, s.train.ckpt_every, s.train.sample_prompts = 0, 1, ()
    registry.get("sft").run(s, str(tmp_path / "sft"))
    _, pre_params, _, _ = registry.load_policy(os.path.join(workdir, "pretrain"))
    _, sft_params, _, _ = registry.load_policy(str(tmp_path / "sft"))
    _params_close(pre_params, sft_params)
    # The reward model's decoder comes from SFT; its score head is new.
    r.train.steps, r.optim.lr, r.optim.weight_decay, r.optim.warmup_steps = 1, 1e-12, 0.0, 0
    r.train.eval_every, r.train.ckpt_every = 0, 1
    r.data.demos_path = ""
    result = registry.get("reward").run(r, str(tmp_path / "rm"))
    _, sft_run_params, _, _ = registry.load_policy(os.path.join(workdir, "sft"))
    _params_close(sft_run_params["decoder"], jax.device_get(result.state.params)["decoder"])
    with pytest.raises(ConfigError, match="reward-model run"):
        registry.load_policy(str(tmp_path / "rm"))


def test_ppo_run_holds_its_policy_and_the_chat_session_matches_the_sampler(smoke):
    workdir, _, _ = smoke
    model, params, tokenizer, stage = registry.load_policy(os.path.join(workdir, "ppo"))
    assert stage == "ppo"
    question = "Is 27 a prime number?"
    session = ChatSession(model, params, tokenizer, temperature=0.0, max_new_tokens=12)
    streamed = "".join(session.reply(question))
    prompt = chat.render_prompt([{"role": "user", "content": question}], tokenizer).tolist()
    tokens_BP, valid_BP = sampling.left_pad([prompt], tokenizer.pad_id)
    out = sampling.make_sampler(model, sampling.SamplingConfig(
        max_new_tokens=12, temperature=0.0, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        vocab_size=tokenizer.vocab_size))(params, tokens_BP, valid_BP, None)
    ids = [t for t, m in zip(np.asarray(out.tokens_BN[0]), np.asarray(out.mask_BN[0])) if m and t != tokenizer.eos_id]
    assert streamed == tokenizer.decode(ids)
    # Multi-turn memory: the exchange is kept (or forgotten whole when the answer was empty).
    assert [m["role"] for m in session.messages] == (["user", "assistant"] if streamed.strip() else [])
    buf = io.StringIO()
    lines = iter(["And 13?", "/reset", "/quit"])
    run_repl(session, read=lambda _: next(lines), out=buf)
    assert "(new conversation)" in buf.getvalue()
    assert [m["role"] for m in session.messages] == []


def test_sampled_gold_metrics_average_independent_answer_sets(smoke):
    """S answers per question: each sampled metric is the mean of the oracle's metrics of S independently sampled
    answer sets (salt 0, then 2.. — salt 1 belongs to the KL samples); greedy ones are unchanged."""
    workdir, cfg, results = smoke
    world = world_lib.build_world(world_lib.SeedWorldConfig(**{**cfg.world.to_dict(), "seed": 0}))
    model, params, tokenizer, _ = registry.load_policy(os.path.join(workdir, "sft"))
    evaluator = evaluation.StageEvaluator(world, tokenizer, max_new_tokens=int(cfg.eval.max_new_tokens), seed=0)
    stage = evaluation.StageModel("sft", model, params, True)
    questions = world.heldout_questions
    per_set = [world.oracle.evaluate(questions, evaluator.generate(stage, questions, 1.0, salt)[0]) for salt in (0, 2, 3)]
    assert len({tuple(sorted(m.items())) for m in per_set}) > 1, "the answer sets should differ"
    metrics = evaluator.gold(stage, sampled_answers_per_question=3)
    for k in ("balanced_accuracy", "valid_reason_rate", "language_match", "mean_gold_score"):
        assert metrics[f"sampled/{k}"] == pytest.approx(np.mean([m[k] for m in per_set]), abs=1e-12), k
    assert metrics["sampled/answers_per_question"] == 3 and metrics["greedy/answers_per_question"] == 1
    assert metrics["sampled/num_questions"] == len(questions)
    # The pipeline's own table used the config's S: recomputing it reproduces results.json.
    assert int(cfg.eval.sampled_answers_per_question) == 2
    again = evaluator.gold(stage, sampled_answers_per_question=2)
    assert again["sampled/balanced_accuracy"] == pytest.approx(results["sft"]["sampled/balanced_accuracy"], abs=1e-12)
    assert again["greedy/balanced_accuracy"] == pytest.approx(results["sft"]["greedy/balanced_accuracy"], abs=1e-12)
    with pytest.raises(ValueError, match="sampled_answers_per_question"):
        evaluator.gold(stage, sampled_answers_per_question=0)
