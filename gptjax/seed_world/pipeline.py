"""The whole recipe on the seed world: pretrain → SFT → sample & label → reward model → PPO, then the gold tables.

Each stage is an ordinary run in its own workdir (``WORKDIR/<stage>``), initialised from the previous one, exactly as
``experiments.train`` would run it alone (the stage registry's runner); re-running the pipeline resumes or skips
finished stages, after checking that nothing it would reuse was built from other inputs (``provenance``). The world
(gptjax/seed_world/world.py) supplies the corpus, demonstrations, prompts, held-out questions and the gold oracle;
its tokenizer is trained on the pretraining corpus first (every number 0..max_number a token of its own).
``evaluation`` asks every trained policy the held-out questions and tests the reward model; ``tables`` formats the
results.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections

from gptjax import sharding
from gptjax.data.packing import tokens_absent_from
from gptjax.model import ScoreModel
from gptjax.seed_world import evaluation, labels, provenance
from gptjax.seed_world import world as world_lib
from gptjax.seed_world.config import SeedWorldConfig
from gptjax.seed_world.evaluation import StageEvaluator, StageModel
from gptjax.stages import common, registry
from gptjax.stages.reward import load_reward_params
from gptjax.tokenizers import make_tokenizer

# The stages the recipe runs, in order; the pipeline config has one section of each name (configs/chatgpt.py).
STAGE_NAMES = ("pretrain", "sft", "reward", "ppo")


def _stage_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


def _configure(cfg: ml_collections.ConfigDict, workdir: str, files: dict, tokenizer_path: str,
               label_paths: dict | None, unseen: tuple[int, ...]):
    """Point each stage's config at the world files and the previous stage's run; every stage gets cfg.seed.
    A fine-tuning stage that freezes the token embedding still trains the rows of `unseen` (tokens pretraining
    never saw)."""
    p, s, r, o = (cfg[name].copy_and_resolve_references() for name in STAGE_NAMES)
    p.tokenizer.kind, p.tokenizer.path = "sentencepiece", tokenizer_path
    p.data.paths = str(files["pretrain"])
    p.data.data_dir = os.path.join(workdir, "data")
    s.train.init_from = _stage_dir(workdir, "pretrain")
    s.data.train_path, s.data.eval_path = str(files["sft_train"]), str(files["sft_eval"])
    r.train.init_from = _stage_dir(workdir, "sft")
    if label_paths:
        r.data.train_path, r.data.eval_path = label_paths["train"], label_paths["eval"]
    r.data.demos_path = str(files["sft_eval"])
    o.train.init_from = _stage_dir(workdir, "sft")
    o.ppo_init.reward_from = _stage_dir(workdir, "reward")
    o.data.prompts_path = str(files["ppo_prompts"])
    o.ptx = p.data.copy_and_resolve_references()  # PPO-ptx's LM batches: the pretraining corpus, read the same way
    for stage_cfg in (p, s, r, o):
        stage_cfg.train.seed = int(cfg.seed)
    for stage_cfg in (s, r, o):
        if stage_cfg.optim.frozen:
            stage_cfg.optim.trainable_token_ids = unseen
    return p, s, r, o


def _train(name: str, stage_cfg, workdir: str, timings: dict):
    """Runs (or resumes) stage ``name`` in WORKDIR/<name>; its wall time goes in ``timings``."""
    start = time.time()
    result = registry.get(name).run(stage_cfg, _stage_dir(workdir, name))
    timings[name] = time.time() - start
    return result


def _policy(name: str, workdir: str) -> tuple[StageModel, object]:
    """The evaluated policy of stage run ``name`` (prompted as that stage is), and its tokenizer."""
    model, params, tokenizer, _ = registry.load_policy(_stage_dir(workdir, name))
    return StageModel(name, model, params, registry.get(name).chat_format), tokenizer


def placed_like(params, like):
    """``params`` laid out as ``like`` (same tree) is. A jitted sampler's cache is keyed on its inputs' shardings
    too: given the PPO policy as host arrays, the evaluation compiled each of its sampler programs a second time
    (29 compilations instead of 15, ~17 s of the demo)."""
    return jax.tree.map(lambda p, ref: jax.device_put(p, ref.sharding), jax.device_get(params), like)


def _reward_model(workdir: str, tokenizer):
    """The reward model as PPO uses it (its demonstration-centring bias applied), and its training rows' length."""
    stored = common.stored_config(_stage_dir(workdir, "reward"))
    seq_len = int(stored.train.seq_len)
    model = ScoreModel(common.no_dropout(common.build_model_config(stored.model, tokenizer, seq_len)))
    abstract = common.abstract_params_of(model, sharding.make_mesh((-1, 1, 1)))
    return model, load_reward_params(_stage_dir(workdir, "reward"), abstract, "reward"), seq_len


def _evaluate(cfg, world, evaluator: StageEvaluator, policies: list[StageModel], tokenizer, workdir: str) -> dict:
    pretrained, sft, ppo = policies
    results: dict = {}
    rm_model, rm_params, seq_len = _reward_model(workdir, tokenizer)
    score = evaluation.reward_scorer(rm_model, rm_params, tokenizer)
    for stage in policies:
        results[stage.name] = evaluation.evaluate_policy(
            world, evaluator, stage, sampled_answers=int(cfg.eval.sampled_answers_per_question),
            showcase_samples=int(cfg.eval.showcase_samples), reward_score=score)
    results["pretrain"].update(evaluation.evaluate_pretrained(world, evaluator, pretrained, tokenizer))
    results["ppo"]["kl_to_sft"] = evaluator.kl_to(ppo, sft.params, world.heldout_questions)
    eval_rankings = labels.rankings_paths(os.path.join(workdir, "labels"))["eval"]
    results["reward"] = evaluation.evaluate_reward_model(world, rm_model, rm_params, tokenizer, int(cfg.seed),
                                                         eval_rankings, seq_len)
    return results


# What a pipeline run can stop after: a job built on its SFT run and reward model alone (the stage-3 comparison)
# needs neither its PPO run nor its report. The over-optimisation study reads the PPO run's config: it runs all.
STOP_POINTS = ("reward", "evaluation")


def run_pipeline(cfg: ml_collections.ConfigDict, workdir: str, through: str = "evaluation") -> dict:
    """Runs (or resumes) every stage and returns {stage: metrics}; writes WORKDIR/results.json. With
    ``through="reward"`` it stops once the reward model is trained and returns only {"timings_s": ...}."""
    if through not in STOP_POINTS:
        raise ValueError(f"run_pipeline(through={through!r}): valid stop points are {STOP_POINTS}")
    labels.check_cannot_tell_credit(float(cfg.labels.cannot_tell_credit))
    workdir = os.path.abspath(workdir)
    t0 = time.time()
    world = world_lib.build_world(SeedWorldConfig(**{**cfg.world.to_dict(), "seed": int(cfg.seed)}))
    texts = world_lib.world_files(world)
    # Before anything is written: a workdir holding a tokenizer, stage run or rankings built from other inputs is
    # refused (their configs name the world's files only by path).
    provenance.check_and_record(workdir, provenance.artifact_inputs(
        cfg, {name: provenance.text_digest(text) for name, text in texts.items()}))
    files = world_lib.write_jsonl(world, os.path.join(workdir, "world"), texts)
    tokenizer_path = world_lib.train_tokenizer(world, os.path.join(workdir, "world"), int(cfg.tokenizer.pieces),
                                               bool(cfg.tokenizer.dummy_prefix))
    # Tokens the pretraining corpus never contains (the chat role tokens, byte pieces, and BPE's intermediate pieces,
    # which the corpus always spells merged): fine-tuning stages that freeze the token embedding still train their
    # rows (optim.trainable_token_ids).
    unseen = tokens_absent_from(world.pretrain_texts, make_tokenizer("sentencepiece", tokenizer_path))
    timings = {"world": time.time() - t0}

    pretrain_cfg, sft_cfg, _, _ = _configure(cfg, workdir, files, tokenizer_path, None, unseen)
    _train("pretrain", pretrain_cfg, workdir, timings)
    _train("sft", sft_cfg, workdir, timings)
    pretrained, tokenizer = _policy("pretrain", workdir)
    sft, _ = _policy("sft", workdir)
    evaluator = StageEvaluator(tokenizer, max_new_tokens=int(cfg.eval.max_new_tokens), seed=int(cfg.seed),
                               mesh=sharding.make_mesh((-1, 1, 1)))

    start = time.time()
    label_dir = os.path.join(workdir, "labels")
    label_paths = labels.rankings_paths(label_dir)
    if not all(os.path.exists(p) for p in label_paths.values()):
        label_paths = labels.label_rankings(world, evaluator, sft, label_dir, k=int(cfg.labels.k),
                                            written=bool(cfg.labels.written),
                                            eval_fraction=float(cfg.labels.eval_fraction), seed=int(cfg.seed),
                                            verdict_pair=bool(cfg.labels.verdict_pair),
                                            topic_pairs=bool(cfg.labels.topic_pairs),
                                            special_pairs=bool(cfg.labels.special_pairs),
                                            cannot_tell_credit=float(cfg.labels.cannot_tell_credit))
    timings["labels"] = time.time() - start
    _, _, reward_cfg, ppo_cfg = _configure(cfg, workdir, files, tokenizer_path, label_paths, unseen)
    _train("reward", reward_cfg, workdir, timings)
    if through == "reward":
        return {"timings_s": {**timings, "total": time.time() - t0}}
    ppo_result = _train("ppo", ppo_cfg, workdir, timings)

    start = time.time()
    ppo = StageModel("ppo", sft.model, placed_like(ppo_result.state.policy_params, sft.params),
                     registry.get("ppo").chat_format)
    results = _evaluate(cfg, world, evaluator, [pretrained, sft, ppo], tokenizer, workdir)
    timings["evaluation"] = time.time() - start
    timings["total"] = time.time() - t0
    results["timings_s"] = timings
    results["seed"] = int(cfg.seed)
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=1)
    return results
