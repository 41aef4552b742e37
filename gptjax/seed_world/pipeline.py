"""The whole recipe on the seed world: pretrain → SFT → sample & label → reward model → PPO, then a gold table.

Each stage is an ordinary run in its own workdir (``WORKDIR/<stage>``), initialised from the previous one,
exactly as ``experiments.train`` would run it alone (the stage registry's runner); re-running the pipeline
resumes/skips finished stages. The seed world (gptjax/seed_world/world.py) supplies the corpus, demonstrations,
prompts, held-out questions and the labeler's gold oracle; ``evaluation.StageEvaluator`` asks every trained
policy the held-out questions and scores the answers; ``tables`` formats the results.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections

from gptjax.model import ScoreModel
from gptjax.seed_world import world as world_lib
from gptjax.seed_world.evaluation import StageEvaluator, StageModel, label_rankings, reward_accuracy
from gptjax.stages import common, registry
from gptjax.train import checkpoint as ckpt_lib

# The stages the recipe runs, in order; the pipeline config has one section of each name (configs/chatgpt.py).
STAGE_NAMES = ("pretrain", "sft", "reward", "ppo")


def _stage_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


def _configure(cfg: ml_collections.ConfigDict, workdir: str, files: dict, label_paths: dict | None):
    """Point each stage's config at the world files and the previous stage's run; every stage gets cfg.seed."""
    p, s, r, o = (cfg[name].copy_and_resolve_references() for name in STAGE_NAMES)
    p.data.paths = str(files["pretrain"])
    p.data.data_dir = os.path.join(workdir, "tfds")
    s.train.init_from = _stage_dir(workdir, "pretrain")
    s.data.train_path, s.data.eval_path = str(files["sft_train"]), str(files["sft_eval"])
    r.train.init_from = _stage_dir(workdir, "sft")
    if label_paths:
        r.data.train_path, r.data.eval_path = label_paths["train"], label_paths["eval"]
    r.data.demos_path = str(files["sft_eval"])
    o.train.init_from = _stage_dir(workdir, "sft")
    o.ppo_init.reward_from = _stage_dir(workdir, "reward")
    o.data.prompts_path = str(files["ppo_prompts"])
    o.ptx.paths = str(files["pretrain"])
    o.ptx.data_dir = os.path.join(workdir, "tfds")
    for stage_cfg in (p, s, r, o):
        stage_cfg.train.seed = int(cfg.seed)
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


def _labels(cfg, world, evaluator: StageEvaluator, sft: StageModel, pretrained: StageModel, workdir: str) -> dict:
    """The labeled rankings (train / eval JSONL paths), sampled and ranked unless they are there already."""
    label_dir = os.path.join(workdir, "labels")
    label_paths = {"train": os.path.join(label_dir, "rankings_train.jsonl"),
                   "eval": os.path.join(label_dir, "rankings_eval.jsonl")}
    if not all(os.path.exists(v) for v in label_paths.values()):
        label_paths = label_rankings(world, evaluator, sft, k=int(cfg.labels.k),
                                     eval_fraction=float(cfg.labels.eval_fraction), out_dir=label_dir,
                                     other=pretrained, other_k=int(cfg.labels.get("pretrain_k", 0)))
    return label_paths


def _gold_table(cfg, evaluator: StageEvaluator, policies: list[StageModel], sft_params) -> dict[str, dict]:
    """Gold metrics, KL to the SFT policy and showcase answers of each evaluated policy, by stage name."""
    # KL to the SFT policy: meaningless for the pretrained model, 0 for SFT itself, measured for the PPO policy.
    pretrained, sft, ppo = policies
    kl_to_sft = {pretrained.name: lambda: float("nan"), sft.name: lambda: 0.0,
                 ppo.name: lambda: evaluator.kl_to(ppo, sft_params)}
    results = {}
    for stage in policies:
        m = evaluator.gold(stage, sampled_answers_per_question=int(cfg.eval.get("sampled_answers_per_question", 1)))
        m["kl_to_sft"] = kl_to_sft[stage.name]()
        m["showcase"] = evaluator.showcase(stage)
        results[stage.name] = m
    return results


def run_pipeline(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) every stage and returns {stage: metrics}; writes WORKDIR/results.json."""
    workdir = os.path.abspath(workdir)
    t0 = time.time()
    world_cfg = world_lib.SeedWorldConfig(**{**cfg.world.to_dict(), "seed": int(cfg.seed)})
    world = world_lib.build_world(world_cfg)
    files = world_lib.write_jsonl(world, os.path.join(workdir, "world"))
    timings = {}

    pretrain_cfg, sft_cfg, _, _ = _configure(cfg, workdir, files, None)
    _train("pretrain", pretrain_cfg, workdir, timings)
    _train("sft", sft_cfg, workdir, timings)
    pretrained, tokenizer = _policy("pretrain", workdir)
    sft, _ = _policy("sft", workdir)
    evaluator = StageEvaluator(world, tokenizer, max_new_tokens=int(cfg.eval.max_new_tokens), seed=int(cfg.seed))

    start = time.time()
    label_paths = _labels(cfg, world, evaluator, sft, pretrained, workdir)
    timings["label"] = time.time() - start
    _, _, reward_cfg, ppo_cfg = _configure(cfg, workdir, files, label_paths)
    rm_result = _train("reward", reward_cfg, workdir, timings)
    ppo_result = _train("ppo", ppo_cfg, workdir, timings)

    # --- the gold table ---------------------------------------------------------------------------------------
    rm_stored = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(_stage_dir(workdir, "reward")))
    rm_model = ScoreModel(common.build_model_config(rm_stored.model, tokenizer, int(reward_cfg.train.seq_len)))
    rm_params = jax.device_get(rm_result.state.params) if rm_result.state is not None else None
    ppo = StageModel("ppo", sft.model, jax.device_get(ppo_result.state.policy_params), registry.get("ppo").chat_format)
    results: dict = _gold_table(cfg, evaluator, [pretrained, sft, ppo], sft.params)
    if rm_params is not None:
        results["reward"] = {"heldout_pairwise_accuracy": reward_accuracy(
            rm_model, rm_params, label_paths["eval"], tokenizer, int(reward_cfg.train.seq_len))}
    timings["total"] = time.time() - t0
    results["timings_s"] = timings
    results["seed"] = int(cfg.seed)
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2)
    return results
