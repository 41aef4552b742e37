"""The whole recipe on the seed world: pretrain → SFT → sample & label → reward model → PPO, then a gold table.

Each stage is an ordinary run in its own workdir (``WORKDIR/<stage>``), initialised from the previous one,
exactly as ``experiments.train`` would run it alone; re-running the pipeline resumes/skips finished stages.
The seed world (gptjax/seed_world/world.py) supplies the corpus, demonstrations, prompts, held-out questions and
the labeler's gold oracle; ``StageEvaluator`` asks every stage the held-out questions and scores the answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from gptjax import sampling
from gptjax.data import chat, post_training
from gptjax.model import GPT, ScoreModel
from gptjax.seed_world import world as world_lib
from gptjax.stages import common as runners
from gptjax.stages.ppo import objective as ppo_lib
from gptjax.stages.reward import pairwise_accuracy, sequence_rewards
from gptjax.tokenizers import Tokenizer
from gptjax.train import checkpoint as ckpt_lib

STAGE_NAMES = ("pretrain", "sft", "reward", "ppo")
FORUM_PROMPT = {"zh": "問：{q}\n答：", "en": "Q: {q}\nA: "}  # how the pretraining corpus asks questions


@dataclasses.dataclass
class StageModel:
    """A trained policy to evaluate: its model, params, and how it is prompted."""

    name: str
    model: GPT
    params: Any
    chat_format: bool  # False: the pretrained model, asked in the corpus's forum format


class StageEvaluator:
    """Asks a policy the held-out questions and scores its answers with the gold oracle."""

    def __init__(self, world: world_lib.SeedWorld, tokenizer: Tokenizer, *, max_new_tokens: int, seed: int,
                 batch_size: int = 128):
        self.world, self.tokenizer = world, tokenizer
        self.max_new_tokens, self.seed, self.batch_size = max_new_tokens, seed, batch_size
        self._samplers: dict = {}

    def prompts(self, questions: Sequence[world_lib.Question], chat_format: bool) -> list[list[int]]:
        tok = self.tokenizer
        if chat_format:
            return [chat.render_prompt(q.conversation, tok).tolist() for q in questions]
        return [[tok.eos_id, *tok.encode(FORUM_PROMPT[q.language].format(q=q.text))] for q in questions]

    def _sampler(self, model: GPT, temperature: float):
        key = (id(model), temperature)
        if key not in self._samplers:
            self._samplers[key] = sampling.make_sampler(model, sampling.SamplingConfig(
                max_new_tokens=self.max_new_tokens, temperature=temperature, eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.pad_id, vocab_size=self.tokenizer.vocab_size))
        return self._samplers[key]

    def generate(self, stage: StageModel, questions: Sequence[world_lib.Question], temperature: float,
                 salt: int = 0) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
        """Answers (text), plus the padded prompt/response token rows for KL measurements."""
        prompts = self.prompts(questions, stage.chat_format)
        sampler = self._sampler(stage.model, temperature)
        answers, rows = [], []
        P = max(map(len, prompts))
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.batch_size - n)  # one compiled shape
            tokens_BP, valid_BP = sampling.left_pad(chunk, self.tokenizer.pad_id, length=P)
            key = jax.random.fold_in(jax.random.key(self.seed), start + 7919 * salt)
            out = jax.device_get(sampler(stage.params, tokens_BP, valid_BP, key))
            for b in range(n):
                ids = np.asarray(out.tokens_BN[b])[np.asarray(out.mask_BN[b])].tolist()
                text = self.tokenizer.decode(ids)
                if not stage.chat_format:
                    text = text.split("\n", 1)[0]  # a forum answer ends at the line break
                answers.append(text.strip())
            rows.append((tokens_BP[:n], valid_BP[:n], out))
        return answers, rows

    def gold(self, stage: StageModel, questions=None, *, sampled_answers_per_question: int = 1) -> dict[str, float]:
        """Gold metrics of greedy answers and of sampled (T = 1) ones, the latter averaged over
        ``sampled_answers_per_question`` independent answers to every question.

        One sampled answer per question leaves ~3 points of sampling noise on a 320-question balanced accuracy;
        S answers cut it by √S at S times the sampling cost. Salt 1 is left to `kl_to`'s samples.
        """
        if sampled_answers_per_question < 1:
            raise ValueError(f"eval.sampled_answers_per_question must be >= 1, got {sampled_answers_per_question}")
        questions = questions or self.world.heldout_questions
        metrics = {}
        for mode, temperature, salts in (
                ("sampled", 1.0, [0] + list(range(2, sampled_answers_per_question + 1))),
                ("greedy", 0.0, [0])):
            per_salt = [self.world.oracle.evaluate(questions, self.generate(stage, questions, temperature, salt)[0])
                        for salt in salts]
            for k in per_salt[0]:
                metrics[f"{mode}/{k}"] = float(np.mean([m[k] for m in per_salt]))
            metrics[f"{mode}/answers_per_question"] = float(len(salts))
        return metrics

    def kl_to(self, stage: StageModel, reference_params, questions=None) -> float:
        """Mean per-answer KL(policy ‖ reference) in nats: Σ over sampled response tokens of log π − log π_ref."""
        questions = questions or self.world.heldout_questions
        _, rows = self.generate(stage, questions, 1.0, salt=1)
        logprob = jax.jit(lambda p, t, v: ppo_lib.sequence_logprobs(p, t, v, model=stage.model)[0])
        total, count = 0.0, 0
        for tokens_BP, valid_BP, out in rows:
            n = tokens_BP.shape[0]
            tokens_BT = np.concatenate([tokens_BP, np.asarray(out.tokens_BN)[:n]], 1)
            valid_BT = np.concatenate([valid_BP, np.asarray(out.mask_BN)[:n]], 1)
            mask_BT = np.concatenate([np.zeros_like(valid_BP), np.asarray(out.mask_BN)[:n]], 1)
            diff = np.asarray(logprob(stage.params, tokens_BT, valid_BT) - logprob(reference_params, tokens_BT,
                                                                                    valid_BT))
            total += float((diff * mask_BT).sum())
            count += n
        return total / max(count, 1)

    def showcase(self, stage: StageModel) -> dict[str, str]:
        answers, _ = self.generate(stage, self.world.showcase_questions, 0.0)
        return {q.text: a for q, a in zip(self.world.showcase_questions, answers)}


def label_rankings(world: world_lib.SeedWorld, evaluator: StageEvaluator, stage: StageModel, *, k: int,
                   eval_fraction: float, out_dir: str, other: StageModel | None = None,
                   other_k: int = 0) -> dict[str, str]:
    """Sample K answers per RM prompt; the simulated labeler ranks them (gold oracle).

    ``k - other_k`` answers come from ``stage`` (the SFT policy) and ``other_k`` from ``other`` (the pretrained
    model): as InstructGPT's comparisons came from several models, the RM then also sees the off-topic, other-
    number answers a policy drifts towards, not only the SFT policy's own mistakes.
    """
    if not 0 <= other_k < k or (other_k and other is None):
        raise ValueError(f"labels.pretrain_k={other_k} must be in [0, labels.k={k}) (and needs the other model)")
    questions = world.rm_prompts
    samples = [evaluator.generate(other if i < other_k else stage, questions, 1.0, salt=100 + i)[0]
               for i in range(k)]
    records = []
    for qi, q in enumerate(questions):
        record = world.oracle.ranking_record(q, [samples[i][qi] for i in range(k)], max_ranked=k)
        if record is not None:
            records.append(record)
    n_eval = max(1, int(round(eval_fraction * len(records))))
    os.makedirs(out_dir, exist_ok=True)
    paths = {"train": os.path.join(out_dir, "rankings_train.jsonl"),
             "eval": os.path.join(out_dir, "rankings_eval.jsonl")}
    for name, part in (("eval", records[:n_eval]), ("train", records[n_eval:])):
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    logging.info("labeled %d rankings (%d held out) from %d prompts x %d samples", len(records), n_eval,
                 len(questions), k)
    return paths


def reward_accuracy(model: ScoreModel, params, path: str, tokenizer: Tokenizer, seq_len: int) -> float:
    """Pairwise accuracy of the reward model on the rankings at ``path`` (all C(K,2) pairs)."""
    ex = post_training.ranking_examples(path, tokenizer, seq_len)
    N, K, T = ex["tokens"].shape
    rewards = jax.jit(lambda p, t, v: sequence_rewards(p, t, v, model=model))
    scores = np.concatenate([np.asarray(rewards(params, ex["tokens"][i:i + 64].reshape(-1, T),
                                                ex["valid"][i:i + 64].reshape(-1, T))).reshape(-1, K)
                             for i in range(0, N, 64)])
    return float(pairwise_accuracy(jnp.asarray(scores), jnp.asarray(ex["num_ranked"])))


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


def run_pipeline(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) every stage and returns {stage: metrics}; writes WORKDIR/results.json."""
    workdir = os.path.abspath(workdir)
    t0 = time.time()
    world_cfg = world_lib.SeedWorldConfig(**{**cfg.world.to_dict(), "seed": int(cfg.seed)})
    world = world_lib.build_world(world_cfg)
    files = world_lib.write_jsonl(world, os.path.join(workdir, "world"))
    timings = {}

    p, s, r, o = _configure(cfg, workdir, files, None)
    start = time.time()
    runners.run_pretrain(p, _stage_dir(workdir, "pretrain"))
    timings["pretrain"] = time.time() - start
    start = time.time()
    runners.run_sft(s, _stage_dir(workdir, "sft"))
    timings["sft"] = time.time() - start

    pre_model, pre_params, tokenizer, _ = runners.load_policy(_stage_dir(workdir, "pretrain"))
    sft_model, sft_params, _, _ = runners.load_policy(_stage_dir(workdir, "sft"))
    evaluator = StageEvaluator(world, tokenizer, max_new_tokens=int(cfg.eval.max_new_tokens), seed=int(cfg.seed))
    pre_stage = StageModel("pretrain", pre_model, pre_params, False)
    sft_stage = StageModel("sft", sft_model, sft_params, True)

    start = time.time()
    label_dir = os.path.join(workdir, "labels")
    label_paths = {"train": os.path.join(label_dir, "rankings_train.jsonl"),
                   "eval": os.path.join(label_dir, "rankings_eval.jsonl")}
    if not all(os.path.exists(v) for v in label_paths.values()):
        label_paths = label_rankings(world, evaluator, sft_stage, k=int(cfg.labels.k),
                                     eval_fraction=float(cfg.labels.eval_fraction), out_dir=label_dir,
                                     other=pre_stage, other_k=int(cfg.labels.get("pretrain_k", 0)))
    timings["label"] = time.time() - start
    p, s, r, o = _configure(cfg, workdir, files, label_paths)
    start = time.time()
    rm_result = runners.run_reward(r, _stage_dir(workdir, "reward"))
    timings["reward"] = time.time() - start

    start = time.time()
    ppo_result = runners.run_ppo(o, _stage_dir(workdir, "ppo"))
    timings["ppo"] = time.time() - start

    # --- the gold table ---------------------------------------------------------------------------------------
    rm_stored = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(_stage_dir(workdir, "reward")))
    rm_model = ScoreModel(runners.build_model_config(rm_stored.model, tokenizer, int(r.train.seq_len)))
    rm_params = jax.device_get(rm_result.state.params) if rm_result.state is not None else None
    ppo_stage = StageModel("ppo", sft_model, jax.device_get(ppo_result.state.policy_params), True)
    stages = [pre_stage, sft_stage, ppo_stage]
    results: dict[str, dict] = {}
    for stage in stages:
        m = evaluator.gold(stage, sampled_answers_per_question=int(cfg.eval.get("sampled_answers_per_question", 1)))
        m["kl_to_sft"] = 0.0 if stage.name == "sft" else (
            evaluator.kl_to(stage, sft_params) if stage.name == "ppo" else float("nan"))
        m["showcase"] = evaluator.showcase(stage)
        results[stage.name] = m
    if rm_params is not None:
        results["reward"] = {"heldout_pairwise_accuracy": reward_accuracy(
            rm_model, rm_params, label_paths["eval"], tokenizer, int(r.train.seq_len))}
    timings["total"] = time.time() - t0
    results["timings_s"] = timings
    results["seed"] = int(cfg.seed)
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2)
    return results


def format_table(results: dict) -> str:
    """The per-stage table the demo prints."""
    rows = [("stage", "balanced acc (T=1)", "balanced acc (greedy)", "valid reason (T=1)", "language match (T=1)",
             "KL to SFT")]
    for name in ("pretrain", "sft", "ppo"):
        m = results[name]
        rows.append((name, f"{m['sampled/balanced_accuracy']:.3f}", f"{m['greedy/balanced_accuracy']:.3f}",
                     f"{m['sampled/valid_reason_rate']:.3f}", f"{m['sampled/language_match']:.3f}",
                     "-" if m["kl_to_sft"] != m["kl_to_sft"] else f"{m['kl_to_sft']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    if "reward" in results:
        lines.append(f"reward model: held-out pairwise accuracy {results['reward']['heldout_pairwise_accuracy']:.3f}")
    lines.append("")
    for name in ("pretrain", "sft", "ppo"):
        for q, a in results[name]["showcase"].items():
            lines.append(f"[{name}] {q} → {a}")
    return "\n".join(lines)


SUMMARY_METRICS = ("sampled/balanced_accuracy", "greedy/balanced_accuracy", "sampled/valid_reason_rate",
                   "sampled/language_match", "kl_to_sft")


def summarize_seeds(all_results: Sequence[dict]) -> dict:
    """Per-seed values and their mean for the acceptance metrics, plus the checks of issue 4."""
    per_seed = {}
    for res in all_results:
        row = {f"{stage}/{m}": res[stage][m] for stage in ("pretrain", "sft", "ppo") for m in SUMMARY_METRICS}
        row["reward/heldout_pairwise_accuracy"] = res["reward"]["heldout_pairwise_accuracy"]
        row["total_s"] = res["timings_s"]["total"]
        per_seed[str(res["seed"])] = row
    keys = list(next(iter(per_seed.values())))
    mean = {k: float(np.nanmean([row[k] for row in per_seed.values()])) for k in keys}
    checks = {
        "sampled: SFT >= pretrain + 0.05": mean["sft/sampled/balanced_accuracy"]
        >= mean["pretrain/sampled/balanced_accuracy"] + 0.05,
        "sampled: PPO >= SFT + 0.05": mean["ppo/sampled/balanced_accuracy"] >= mean["sft/sampled/balanced_accuracy"] + 0.05,
        "greedy: PPO >= SFT - 0.02": mean["ppo/greedy/balanced_accuracy"] >= mean["sft/greedy/balanced_accuracy"] - 0.02,
        "PPO language match >= 0.95": mean["ppo/sampled/language_match"] >= 0.95,
        "PPO KL to SFT <= 3 nats": mean["ppo/kl_to_sft"] <= 3.0,
        "RM held-out pairwise accuracy >= 0.65": mean["reward/heldout_pairwise_accuracy"] >= 0.65,
    }
    return {"per_seed": per_seed, "mean": mean, "checks": checks}


def format_seed_summary(summary: dict) -> str:
    """Markdown: one row per metric, one column per seed, then the mean; then the acceptance checks."""
    seeds = list(summary["per_seed"])
    lines = ["| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for k, mean in summary["mean"].items():
        vals = [summary["per_seed"][s][k] for s in seeds]
        fmt = (lambda v: f"{v:.0f}") if k == "total_s" else (lambda v: f"{v:.3f}")
        lines.append(f"| {k} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(mean)} |")
    lines.append("")
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in summary["checks"].items()]
    return "\n".join(lines)
