"""Gold evaluation on the seed world: a trained policy answers the held-out questions and the world's labeler
(``GoldOracle``) scores the answers; the same labeler ranks sampled answers into reward-model data."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gptjax import sampling
from gptjax.data import chat, post_training
from gptjax.model import GPT, ScoreModel
from gptjax.seed_world import labeler
from gptjax.seed_world import world as world_lib
from gptjax.stages.ppo import objective as ppo_lib
from gptjax.stages.reward import pairwise_accuracy, sequence_rewards
from gptjax.tokenizers import Tokenizer

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

    def prompts(self, questions: Sequence[labeler.Question], chat_format: bool) -> list[list[int]]:
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

    def generate(self, stage: StageModel, questions: Sequence[labeler.Question], temperature: float,
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
