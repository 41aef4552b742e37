"""Stage-3 alternatives compared on one seed world: PPO, GRPO and RLOO (each on the learned reward model and on the
gold labeler as a verifiable reward), DPO and rejection sampling, from the same SFT run and reward model, at equal
budgets, over several seeds; writes OUT/compare.{json,md} and OUT/compare_{kl,tokens}.png.

Every method is an ordinary stage run (``registry.get(cfg.stage).run``) in ``OUT/runs/<method>/seed<s>``, configured
by configs/compare.py with the pipeline's runs and files filled in (placeholders ``{sft}`` ...). A run's policy is
evaluated at its checkpoints: the final one with the seed world's held-out gold metrics (``heldout_metrics``, the
one call into gptjax/seed_world/evaluation.py), every one on a set of sampled answers (one per held-out question)
for the curves, KL(π ‖ π_SFT) and the reward model's score. Generated tokens and episodes are read from each run's
metrics (``rollout/generated_tokens``, ``rollout/episodes``); wall time is the training run's. Everything is
skipped when already there, so an interrupted comparison resumes (and each run resumes from its checkpoints).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from gptjax import sharding
from gptjax.model import ScoreModel
from gptjax.seed_world import compare_report, evaluation, labels, overopt
from gptjax.seed_world import world as world_lib
from gptjax.seed_world.evaluation import StageEvaluator, StageModel
from gptjax.stages import common, registry, reward
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import metrics as metrics_lib

RESULTS_FILE = "compare.json"
RUN_FILE = "compare_run.json"  # in a run's workdir once it has finished: its wall time
EVAL_VERSION = 2  # bumped when the evaluation changes: older cached evaluations are recomputed


def placeholders(pipeline_dir: str) -> dict[str, str]:
    """What the methods' config placeholders stand for: the pipeline's runs and files."""
    rankings = labels.rankings_paths(os.path.join(pipeline_dir, "labels"))
    return {"{sft}": os.path.join(pipeline_dir, "sft"), "{reward}": os.path.join(pipeline_dir, "reward"),
            "{prompts}": os.path.join(pipeline_dir, "world", "ppo_prompts.jsonl"),
            "{rankings_train}": rankings["train"], "{rankings_eval}": rankings["eval"]}


def method_config(method: ml_collections.ConfigDict, values: dict[str, str], seed: int) -> ml_collections.ConfigDict:
    """A method's stage config with its placeholders filled and ``train.seed`` set."""
    raw = _fill(method.to_dict(), values)
    raw["train"]["seed"] = int(seed)
    return ml_collections.ConfigDict(raw)


def _fill(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, str):
        for key, value in values.items():
            node = node.replace(key, value)
    return node


def reward_label(cfg) -> str:
    """How a method is rewarded: "RM", "gold" (a reward function) or "comparisons" (no reward section: DPO)."""
    section = cfg.get("reward")
    if section is None:
        return "comparisons"
    return "gold" if section.get("source") == "function" else "RM"


class Evaluator:
    """Held-out evaluation of a policy: the seed world's gold metrics, KL to the SFT policy, the RM's score.

    The held-out set asked is ``eval.num_questions`` "is n prime?" questions, ``eval.num_specials`` special
    questions (honesty) and every held-out request (harmlessness), each list spread evenly through the world's
    (0 = all of it); one ``StageEvaluator.ask`` per temperature and salt asks them all in the same batches."""

    def __init__(self, cfg, pipeline_dir: str):
        world_cfg = world_lib.SeedWorldConfig(**{**cfg.pipeline.world.to_dict(), "seed": int(cfg.pipeline.seed)})
        self.world = world_lib.build_world(world_cfg)
        self.oracle = self.world.oracle
        self.sft_model, self.sft_params, self.tokenizer, _ = registry.load_policy(os.path.join(pipeline_dir, "sft"))
        self.evaluator = StageEvaluator(self.tokenizer, max_new_tokens=int(cfg.pipeline.eval.max_new_tokens),
                                        seed=int(cfg.pipeline.seed))
        rm_dir = os.path.join(pipeline_dir, "reward")
        rm_stored = common.stored_config(rm_dir)
        self.rm = ScoreModel(common.no_dropout(common.build_model_config(
            common.resolve_from_init(rm_stored)[0], self.tokenizer, int(rm_stored.train.seq_len))))
        self.mesh = sharding.make_mesh((-1, 1, 1))
        self.rm_params = reward.load_reward_params(rm_dir, common.abstract_params_of(self.rm, self.mesh), rm_dir)
        self.answers_per_question = int(cfg.eval.sampled_answers_per_question)
        self.questions = overopt.spread(self.world.heldout_questions, int(cfg.eval.num_questions))
        self.specials = overopt.spread(self.world.heldout_specials, int(cfg.eval.get("num_specials", 0)))
        self.requests = list(self.world.heldout_requests)
        self.asked = self.questions + self.specials + self.requests

    def settings(self) -> dict:
        """What the evaluations depend on (a cached evaluation of other settings is recomputed)."""
        return {"questions": len(self.questions), "specials": len(self.specials), "requests": len(self.requests),
                "answers_per_question": self.answers_per_question, "max_new_tokens": self.evaluator.max_new_tokens,
                "version": EVAL_VERSION}

    def policy(self, name: str, params) -> StageModel:
        # Every compared policy has the SFT policy's architecture: one model object, so one compiled sampler.
        return StageModel(name, self.sft_model, params, True)

    def heldout_metrics(self, policy: StageModel) -> dict[str, float]:
        """The seed world's held-out gold tables of a policy, greedy (salt 0) and sampled (T = 1, salts 2.., as
        ``evaluation.evaluate_policy``; ``eval.sampled_answers_per_question`` answers per question), flattened
        as ``<mode>/<metric>``: evaluation.helpful_table's on the number questions (plus their EOS rate and mean
        gold score), honest_table's on the special questions and harmless_table's on the requests."""
        out: dict[str, float] = {}
        for mode, temperature, salts in (("greedy", 0.0, [0]),
                                         ("sampled", 1.0, range(2, self.answers_per_question + 2))):
            answers = [self.evaluator.ask(policy, self.asked, temperature, salt) for salt in salts]
            judged = [[self.oracle.judge(q, a.texts[i]) for a in answers] for i, q in enumerate(self.asked)]
            out.update({f"{mode}/{k}": v for k, v in self._tables(answers, judged).items()})
        return out

    def _tables(self, answers, judged) -> dict[str, float]:
        n, s = len(self.questions), len(self.questions) + len(self.specials)
        table = evaluation.helpful_table(self.questions, judged[:n])
        table["eos"] = float(np.mean([a.rollouts.finished_B[:n] for a in answers]))
        table["mean_gold_score"] = float(np.mean([j.score for js in judged[:n] for j in js]))
        honest = evaluation.honest_table(self.specials, judged[n:s])
        honest["special_values"] = honest.pop("values")
        table.update(honest)
        table.update(evaluation.harmless_table(self.requests, judged[s:]))
        return table

    def curve_point(self, policy: StageModel) -> dict[str, float]:
        """Gold metrics of one sampled answer per held-out number question (salt 1, the set ``kl_to`` uses), the
        mean per-answer KL(π ‖ π_SFT) on them and the reward model's mean score of them."""
        answers = self.evaluator.ask(policy, self.questions, 1.0, salt=1)
        judged = [[self.oracle.judge(q, a)] for q, a in zip(self.questions, answers.texts)]
        gold = evaluation.helpful_table(self.questions, judged)
        rollouts = answers.rollouts
        engine = self.evaluator.engine(policy.model, 1.0, len(rollouts.tokens_BT))
        kl = engine.kl(policy.params, self.sft_params, rollouts)
        rm = reward.reward_scores(self.rm, self.rm_params, rollouts.tokens_BT, rollouts.valid_BT)
        return {"curve/balanced_accuracy": gold["balanced_accuracy"],
                "curve/mean_gold_score": float(np.mean([js[0].score for js in judged])),
                "kl_to_sft": float(np.mean(kl)), "rm_score": float(np.mean(rm))}


def _budget_used(run_dir: str, step: int) -> dict[str, float]:
    rows = [r for r in metrics_lib.read_metrics(run_dir) if r.get("step", 0) <= step]
    return {"generated_tokens": float(sum(r.get("rollout/generated_tokens", 0.0) for r in rows)),
            "episodes": float(sum(r.get("rollout/episodes", 0.0) for r in rows))}


def _train(cfg, run_dir: str) -> float:
    """Runs (or resumes) the method in ``run_dir`` unless it finished; its training wall time in seconds."""
    marker = os.path.join(run_dir, RUN_FILE)
    if os.path.exists(marker):
        with open(marker) as f:
            return float(json.load(f)["wall_s"])
    start = time.time()
    registry.get(cfg.stage).run(cfg, run_dir)
    wall = time.time() - start
    with open(marker, "w") as f:
        json.dump({"wall_s": wall}, f)
    return wall


def evaluate_run(ev: Evaluator, run_dir: str, name: str, *, curve: bool) -> dict:
    """A finished run's final held-out metrics and its curve (every checkpoint when ``curve``, else the last)."""
    stored = common.stored_config(run_dir)
    component = registry.policy_component(stored, ev.tokenizer, run_dir)
    abstract = common.abstract_params_of(ev.sft_model, ev.mesh)
    steps = ckpt_lib.finished_steps(run_dir)
    points = []
    for step in steps if curve else steps[-1:]:
        params = common.load_full_params(os.path.join(run_dir, ckpt_lib.CKPT_DIR, str(step)), abstract, run_dir,
                                         component.item_key)
        points.append({"step": step, **_budget_used(run_dir, step), **ev.curve_point(ev.policy(name, params))})
    final = ev.heldout_metrics(ev.policy(name, params))
    return {"final": {**final, **points[-1]}, "curve": points}


def _cached(path: str, settings: dict, compute):
    """``compute()``, stored at ``path`` with ``settings``; read back while the settings are the same."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        if stored.get("settings") == settings:
            return stored["value"]
    value = compute()
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "value": value}, f, indent=1, ensure_ascii=False)
    return value


def run_comparison(cfg, workdir: str, out_dir: str | None = None) -> dict:
    """Every method × seed (see the module docstring); returns the results and writes the report."""
    t0 = time.time()
    # The methods start from the pipeline's SFT run and reward model: its own PPO run and report are not needed
    # (`make demo` on the same workdir resumes them).
    pipeline_dir = overopt.ensure_pipeline(cfg.pipeline, workdir, through="reward")
    timings = {"pipeline_s": time.time() - t0}
    out_dir = os.path.abspath(out_dir or os.path.join(pipeline_dir, "compare"))
    os.makedirs(out_dir, exist_ok=True)
    values = placeholders(pipeline_dir)
    ev = Evaluator(cfg, pipeline_dir)
    sft_policy = ev.policy("sft", ev.sft_params)
    sft = _cached(os.path.join(out_dir, "sft_eval.json"), ev.settings(), lambda: {"final": {
        **ev.heldout_metrics(sft_policy), **ev.curve_point(sft_policy), "generated_tokens": 0.0, "episodes": 0.0}})
    runs: dict = {}
    for s_index, seed in enumerate(cfg.seeds):
        for name in cfg.order:
            method = cfg.methods[name]
            run_dir = os.path.join(out_dir, "runs", name, f"seed{seed}")
            mcfg = method_config(method, values, seed)
            start = time.time()
            wall = _train(mcfg, run_dir)
            curve = s_index < int(cfg.eval.curve_seeds)
            result = _cached(os.path.join(run_dir, "compare_eval.json"), {**ev.settings(), "curve": curve},
                             lambda: evaluate_run(ev, run_dir, name, curve=curve))
            result.update(wall_s=wall, stage=mcfg.stage, reward=reward_label(mcfg))
            runs.setdefault(name, {})[str(seed)] = result
            logging.info("compare: %s seed %d done in %.0f s (training %.0f s)", name, seed, time.time() - start,
                         wall)
    timings["total_s"] = time.time() - t0
    # Paths relative to out_dir, where this file is written: the folder can be moved or committed as it is.
    results = {"workdir": os.path.relpath(pipeline_dir, out_dir), "seeds": list(cfg.seeds), "sft": sft, "runs": runs,
               "settings": {"episodes": int(cfg.budget.episodes), **ev.settings()},
               "reference_method": cfg.reference_method, "gaps": [list(g) for g in cfg.gaps],
               "timings_s": timings}
    results["summary"] = compare_report.summarize(results)
    results["plots"] = {name: os.path.relpath(path, out_dir)
                        for name, path in compare_report.plot(results, out_dir).items()}
    with open(os.path.join(out_dir, RESULTS_FILE), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(compare_report.format_table(results) + "\n")
    return results
