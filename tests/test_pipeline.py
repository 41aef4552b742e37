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
from gptjax.seed_world.config import SeedWorldConfig
from gptjax.seed_world.numbers import number_class
from gptjax.stages import registry
from gptjax.tools.chat_session import ChatSession, run_repl
from gptjax.train import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(smoke_pipeline, smoke_results):
    return smoke_pipeline, chatgpt_config.get_config("smoke"), smoke_results


def test_a_policy_placed_like_another_reuses_its_compiled_sampler(smoke):
    workdir, cfg, _ = smoke
    sft, tokenizer = pipeline._policy("sft", workdir)
    world = world_lib.build_world(SeedWorldConfig(**{**cfg.world.to_dict(), "seed": 0}))
    evaluator = evaluation.StageEvaluator(tokenizer, max_new_tokens=4, seed=0)
    questions = world.heldout_questions[:4]
    first = evaluator.ask(sft, questions, 1.0).texts
    host = evaluation.StageModel("copy", sft.model, pipeline.placed_like(jax.device_get(sft.params), sft.params),
                                 sft.chat_format)
    assert evaluator.ask(host, questions, 1.0).texts == first
    engine = evaluator.engine(sft.model, 1.0, len(questions))
    assert engine._sample._cache_size() == 1


def test_pipeline_runs_every_stage_and_reports_gold_metrics(smoke):
    workdir, cfg, results = smoke
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert ckpt_lib.Checkpointer(os.path.join(workdir, stage), keep=0).latest_step() is not None, stage
    world = world_lib.build_world(SeedWorldConfig(**{**cfg.world.to_dict(), "seed": 0}))
    for stage in ("pretrain", "sft", "ppo"):
        for mode in ("sampled", "greedy"):
            for split in ("heldout", "train"):
                t = results[stage][f"helpful/{split}/{mode}"]
                for metric in ("balanced_accuracy", "valid_reason", "language_match", "off_topic", "eos",
                               "prime/accuracy", "easy/accuracy", "hard/accuracy"):
                    assert 0.0 <= t[metric] <= 1.0, (stage, mode, split, metric)
            assert results[stage][f"helpful/heldout/{mode}"]["prime/numbers"] == world.config.heldout_per_class[0]
            for axis, metric in (("honest", "honest"), ("honest", "hallucination"), ("harmless", "refused"),
                                 ("harmless", "over_refusal"), ("dialogue", "turns_ok")):
                assert 0.0 <= results[stage][f"{axis}/{mode}"][metric] <= 1.0
        for split in ("heldout", "train"):  # the world's tokenizer spells every number as one token
            copy = results[stage][f"copy/{split}"]
            assert all(0.0 < copy[c] < 1.0 for c in ("prime", "easy", "hard", "mean")), (stage, split, copy)
        assert set(results[stage]["showcase"]) == {"27 是不是質數？", "Is 27 a prime number?"}
        assert len(results[stage]["seed_dialogues"]) == 4
    for split in ("train", "heldout"):
        assert set(results["pretrain"][f"probe/{split}"]) >= {"prime", "easy", "hard"}
    assert np.isfinite(results["ppo"]["kl_to_sft"])
    # The RM's score of the chat stages' own sampled held-out answers, by kind: every such answer counted once.
    sampled = cfg.eval.sampled_answers_per_question * sum(q.kind == "number" for q in world.heldout_questions)
    assert "rm_by_kind" not in results["pretrain"]
    for stage in ("sft", "ppo"):
        by_kind = results[stage]["rm_by_kind"]
        assert sum(by_kind[f"{k}/answers"] for k in evaluation.ANSWER_KINDS) == sampled, (stage, by_kind)
        assert all(np.isfinite(by_kind[k]) for k in evaluation.ANSWER_KINDS if by_kind[f"{k}/answers"])
    for split in ("train", "heldout", "aligned"):
        assert all(0.0 <= v <= 1.0 for k, v in results["reward"][split].items() if not k.endswith("_se") and v == v)
    assert 0.0 <= results["reward"]["rankings_pairwise_accuracy"] <= 1.0
    report = tables.format_report(results)
    for heading in ("Helpful:", "Copying the number", "Honest answers by kind", "Knowledge probe",
                    "Reward model prefers", "Reward model's score of the stage's", "Helpful, honest, harmless",
                    "The talk's example"):
        assert heading in report
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
    # Every ranking holds >= 2 distinct responses; the labeler's written answers make it >= 2 for every prompt.
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
    tokenizer_path = os.path.join(workdir, "world", "tokenizer.model")
    _, s, r, _ = pipeline._configure(cfg, workdir, files, tokenizer_path, labels, ())
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


def test_fine_tuning_trains_only_the_embedding_rows_pretraining_never_saw(smoke):
    """SFT, the reward model and PPO freeze the token embedding except the tokens absent from the pretraining corpus:
    every token of that corpus keeps its pretrained row; the chat role tokens, which only fine-tuning reads, move."""
    from gptjax.tokenizers import make_tokenizer

    workdir, _, _ = smoke
    tok = make_tokenizer("sentencepiece", os.path.join(workdir, "world", "tokenizer.model"))
    seen = {tok.eos_id}
    for line in open(os.path.join(workdir, "world", "pretrain.jsonl"), encoding="utf-8"):
        seen.update(tok.encode(json.loads(line)["text"]))
    roles = [tok.special_id(f"<|{r}|>") for r in ("user", "assistant", "end_of_turn")]
    for stage in ("sft", "reward", "ppo"):
        stored = json.load(open(os.path.join(workdir, stage, "config.json"), encoding="utf-8"))
        assert set(stored["optim"]["trainable_token_ids"]) == set(range(tok.vocab_size)) - seen, stage
    wte = {stage: np.asarray(registry.load_policy(os.path.join(workdir, stage))[1]["decoder"]["wte"]["embedding"])
           for stage in ("pretrain", "sft", "ppo")}
    rows = sorted(seen)
    for stage in ("sft", "ppo"):
        np.testing.assert_array_equal(wte[stage][rows], wte["pretrain"][rows])
        assert np.all(np.abs(wte[stage][roles] - wte["pretrain"][roles]).max(axis=1) > 1e-4), stage


def test_ppo_ptx_batches_come_from_the_worlds_pretraining_corpus(smoke):
    """PPO-ptx mixes in the pretraining corpus: every row of a ptx batch is a piece of the world's pretraining text."""
    from gptjax.data.pipeline import make_lm_iterator
    from gptjax.tokenizers import SPECIAL_TOKENS, make_tokenizer

    workdir, cfg, _ = smoke
    files = {n: os.path.join(workdir, "world", f"{n}.jsonl") for n in ("pretrain", "sft_train", "sft_eval",
                                                                        "ppo_prompts")}
    tokenizer_path = os.path.join(workdir, "world", "tokenizer.model")
    p, _, _, o = pipeline._configure(cfg, workdir, files, tokenizer_path, None, ())
    assert o.ptx.to_dict() == p.data.to_dict()
    tok = make_tokenizer("sentencepiece", tokenizer_path)
    batch = next(make_lm_iterator(o.ptx, tok, split="train", global_batch_size=4, seq_len=32, seed=0))
    corpus = "".join(json.loads(line)["text"] for line in open(files["pretrain"], encoding="utf-8"))
    first_special = tok.vocab_size - len(SPECIAL_TOKENS)
    for row in np.asarray(batch["inputs"]).tolist():
        segments, current = [], []  # the runs of text between specials (EOS ends each document)
        for t in row + [first_special]:
            if t >= first_special:
                segments, current = segments + [current] * bool(current), []
            else:
                current.append(t)
        assert sum(map(len, segments)) > 16
        for segment in segments:
            assert tok.decode(segment) in corpus, tok.decode(segment)


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
    """Sampled metrics: each number's accuracy is the mean over S independently sampled answers to each of its
    questions (S repetitions drawn in one call with salt 2: salt 1 belongs to the KL samples), and a class's
    accuracy the mean over its numbers; recomputed here from the evaluator's raw answers, the pipeline's
    results.json is reproduced."""
    workdir, cfg, results = smoke
    world = world_lib.build_world(SeedWorldConfig(**{**cfg.world.to_dict(), "seed": 0}))
    model, params, tokenizer, _ = registry.load_policy(os.path.join(workdir, "sft"))
    evaluator = evaluation.StageEvaluator(tokenizer, max_new_tokens=int(cfg.eval.max_new_tokens), seed=0)
    stage = evaluation.StageModel("sft", model, params, True)
    questions = world.heldout_questions
    S = int(cfg.eval.sampled_answers_per_question)
    sets = [answers.texts for answers in evaluator.ask_repeatedly(stage, questions, 1.0, S, salt=2)]
    assert len({tuple(t) for t in sets}) > 1, "the answer sets should differ"
    per_number: dict[int, list[float]] = {}
    for i, q in enumerate(questions):
        per_number.setdefault(q.number, []).extend(
            float(world.oracle.judge(q, answers[i]).verdict_correct) for answers in sets)
    table = results["sft"]["helpful/heldout/sampled"]
    for cls in ("prime", "easy", "hard"):
        means = [np.mean(v) for n, v in per_number.items() if number_class(n) == cls]
        assert table[f"{cls}/accuracy"] == pytest.approx(np.mean(means), abs=1e-12), cls
        assert table[f"{cls}/accuracy_se"] == pytest.approx(np.std(means, ddof=1) / np.sqrt(len(means)), abs=1e-12)
    balanced = np.mean([table[f"{c}/accuracy"] for c in ("prime", "easy", "hard")])
    assert table["balanced_accuracy"] == pytest.approx(balanced, abs=1e-12)


def test_runs_load_from_relative_workdirs(smoke, monkeypatch):
    """Binaries take workdirs as the user types them: a path relative to the current directory loads the same
    policy as its absolute form (orbax itself reads absolute paths only)."""
    workdir, _, _ = smoke
    monkeypatch.chdir(os.path.dirname(workdir))
    relative = os.path.join(os.path.basename(workdir), "ppo")
    _, params, _, stage = registry.load_policy(relative)
    _, expected, _, _ = registry.load_policy(os.path.join(workdir, "ppo"))
    assert stage == "ppo"
    _params_close(params, expected, atol=0.0)


def test_pipeline_stops_after_the_reward_model_when_asked(smoke, monkeypatch):
    """`through="reward"` (what the stage-3 comparison needs) trains up to the reward model and neither runs PPO
    nor writes the report; on a finished workdir every stage it reaches is skipped."""
    workdir, cfg, _ = smoke
    report = os.path.join(workdir, "results.json")
    before = os.path.getmtime(report)
    ran, real_train = [], pipeline._train
    monkeypatch.setattr(pipeline, "_train", lambda name, *a: ran.append(name) or real_train(name, *a))
    out = pipeline.run_pipeline(cfg, workdir, through="reward")
    assert ran == ["pretrain", "sft", "reward"]
    assert set(out) == {"timings_s"} and {"pretrain", "sft", "labels", "reward", "total"} <= set(out["timings_s"])
    assert os.path.getmtime(report) == before
    with pytest.raises(ValueError, match="valid stop points"):
        pipeline.run_pipeline(cfg, workdir, through="ppo")


def test_a_rerun_with_another_tokenizer_is_refused_before_anything_is_written(smoke):
    """The finished stages name the tokenizer only by path: a re-run that would train another one is refused
    (gptjax/seed_world/provenance.py) with the artifacts it reaches, and the workdir is left as it was."""
    workdir, cfg, _ = smoke
    changed = cfg.copy_and_resolve_references()
    changed.tokenizer.pieces = int(cfg.tokenizer.pieces) + 64
    watched = [os.path.join(workdir, p) for p in ("results.json", "inputs.json", "world/pretrain.jsonl",
                                                   "world/tokenizer.model")]
    before = [os.path.getmtime(p) for p in watched]
    with pytest.raises(ConfigError, match=r"(?s)tokenizer.pieces: \d+ -> \d+.*  ppo \(ppo\).*rm -r "):
        pipeline.run_pipeline(changed, workdir)
    assert [os.path.getmtime(p) for p in watched] == before
