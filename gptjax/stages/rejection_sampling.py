"""Rejection-sampling fine-tuning (best-of-N, Llama 2: Touvron et al. 2023 §3.2.3); registered as "rs".

Each of ``rs.rounds`` rounds: draw ``rs.prompts_per_round`` prompts (a pure function of the seed and the round),
sample ``rs.samples_per_prompt`` answers to each from the current policy, score them with the reward source (the
reward model by default; ``stages/online/rewards.py``), keep each prompt's best (ties: the first sampled; answers
that never reached EOS, or are empty, are never kept), and fine-tune on the kept answers with the SFT loss for
``train.steps`` steps of the shared loop. Round 0 starts from ``train.init_from`` (the SFT run), round r from round
r − 1's policy.

Workdir layout: ``rounds/<r>/best.jsonl`` (round r's kept answers as SFT conversations, with their scores in
"meta") and ``rounds/<r>/`` (round r's fine-tuning: an ordinary shared-loop run); ``checkpoints/<r + 1>`` holds the
policy after round r (``{"params"}``) and ``metrics.jsonl`` one record per round (``rs/*``, ``round/*`` and, as the
RL stages log them, ``rollout/generated_tokens`` and ``rollout/episodes``). Resume is exact: a round's answers
are a pure function of the previous round's policy (read back from its checkpoint) and are written once
(atomically); a round's fine-tuning resumes as any shared-loop run does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from gptjax import flops, sampling, sharding
from gptjax.data import batches, post_training
from gptjax.errors import ConfigError, check_ranges, dataclass_from_dict
from gptjax.model import GPT
from gptjax.stages import common, reference, registry, sft
from gptjax.stages.online import rewards
from gptjax.stages.pretrain import policy_components
from gptjax.stages.rollouts import RolloutEngine, response_texts
from gptjax.train import loop
from gptjax.train import run as run_lib
from gptjax.train import workdir as workdir_lib

ROUNDS_DIR = "rounds"
BEST_FILE = "best.jsonl"
SAMPLING_FILE = "sampling.jsonl"  # the round's sampling metrics (one record)


@dataclasses.dataclass(frozen=True)
class RSConfig:
    rounds: int = 2  # sample → pick → fine-tune rounds (Llama 2: 5 rounds of RLHF-V1..V5)
    prompts_per_round: int = 128  # prompts drawn per round (without replacement when the file has enough)
    samples_per_prompt: int = 4  # N answers sampled per prompt; the reward source's best is kept
    temperature: float = 1.0  # sampling temperature

    def __post_init__(self):
        check_ranges(self, "rs", positive=("rounds", "prompts_per_round", "samples_per_prompt", "temperature"))

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "RSConfig":
        return dataclass_from_dict(cls, fields, "rs")


def pick_best(scores_PN, finished_PN) -> tuple[np.ndarray, np.ndarray]:
    """(index of each prompt's best finished answer, whether it has one): the argmax of the scores over the
    answers that reached EOS (the first on ties)."""
    scores_PN = np.where(np.asarray(finished_PN, bool), np.asarray(scores_PN, np.float64), -np.inf)
    return np.argmax(scores_PN, axis=1), np.isfinite(scores_PN.max(axis=1))


def _draw(seed: int, round_index: int, num_prompts: int, count: int) -> np.ndarray:
    rng = np.random.default_rng([seed, round_index, 7])  # the round's prompts: a pure function of (seed, round)
    return rng.choice(num_prompts, count, replace=num_prompts < count)


def sample_round(engine: RolloutEngine, params, conversations, prompts, reward, tokenizer, rcfg: RSConfig, *,
                 seed: int, round_index: int) -> tuple[list[dict], dict]:
    """One round's kept answers as SFT records, and the round's metrics."""
    N = rcfg.samples_per_prompt
    idx = _draw(seed, round_index, len(prompts), rcfg.prompts_per_round)
    rows = engine.generate(params, [prompts[i].tolist() for i in idx for _ in range(N)],
                           seed=int(np.random.default_rng([seed, round_index, 11]).integers(2 ** 31)))
    scores = reward.score(np.repeat(idx, N), rows)
    texts = response_texts(tokenizer, rows.tokens_BT, rows.response_mask_BT)
    usable = rows.finished_B & np.array([bool(t) for t in texts])
    best, keep = pick_best(scores.reshape(-1, N), usable.reshape(-1, N))
    records = []
    for p, (i, b) in enumerate(zip(idx, best)):
        if keep[p]:
            answer = {"role": "assistant", "content": texts[p * N + b]}
            records.append({"messages": list(conversations[i]) + [answer],
                            "meta": {"prompt_index": int(i), "score": float(scores[p * N + b])}})
    generated = float(np.sum(rows.response_mask_BT))
    metrics = {"rs/samples": float(len(texts)), "rs/kept": float(len(records)),
               "rs/mean_score": float(np.mean(scores)), "rs/best_score": float(np.mean(
                   [r["meta"]["score"] for r in records])) if records else float("nan"),
               "rs/eos_rate": float(np.mean(rows.finished_B)), "rollout/generated_tokens": generated,
               "rollout/episodes": float(len(texts))}
    return records, metrics


def _write_atomically(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


def _fine_tune(cfg, round_dir: str, init_from: str, tokenizer, mesh) -> loop.TrainResult:
    """One round's fine-tuning on its kept answers (``round_dir/best.jsonl``): SFT's loss and batches through the
    shared loop, in ``round_dir``, from ``init_from``. An epoch's last batch is filled with empty rows (weight 0),
    so a round with fewer packed rows than a batch still trains."""
    c = cfg.copy_and_resolve_references()
    c.train.init_from = init_from
    micro = common.micro_batch(c, mesh)
    model = GPT(common.build_model_config(c.model, tokenizer, int(c.train.seq_len)))
    train_iter = post_training.sft_batches(os.path.join(round_dir, BEST_FILE), tokenizer, int(c.train.seq_len),
                                           micro, seed=int(c.train.seed), drop_remainder=False)
    return loop.run_training(c, round_dir, model=model, loss_fn=sft.objective(c, model), train_iter=train_iter,
                             mesh=mesh)


def run(cfg, workdir: str) -> loop.TrainResult:
    """``rs.rounds`` rounds of sample → keep the best → fine-tune, from the SFT run ``train.init_from``."""
    if not cfg.train.init_from:
        raise ConfigError("rejection sampling needs train.init_from (the SFT run to sample from and fine-tune)")
    rcfg = RSConfig.from_dict(cfg.rs.to_dict())
    cfg = common.resolved_config(cfg)
    t = cfg.train
    tokenizer = common.build_tokenizer(cfg.tokenizer)
    max_prompt = int(cfg.sampling.max_prompt_len)
    policy = GPT(common.no_dropout(common.build_model_config(cfg.model, tokenizer, max_prompt)))
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    common.micro_batch(cfg, mesh)  # a bad batch size fails before any sampling
    if not cfg.data.prompts_path:
        raise ConfigError("data.prompts_path: give the prompts to sample answers to (JSONL {\"prompt\": ...})")
    records = list(post_training.iter_records(cfg.data.prompts_path))
    conversations = [post_training.parse_prompt(w, r) for w, r in records]
    prompts = post_training.prompt_examples(cfg.data.prompts_path, tokenizer, max_prompt)
    reward = rewards.build(cfg, tokenizer, mesh, max_prompt, prompts_path=cfg.data.prompts_path)
    engine = RolloutEngine(policy, sampling.SamplingConfig(
        max_new_tokens=int(cfg.sampling.max_new_tokens), temperature=rcfg.temperature,
        top_k=int(cfg.sampling.top_k), top_p=float(cfg.sampling.top_p), eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size), batch_size=min(
            64, rcfg.prompts_per_round * rcfg.samples_per_prompt))
    abstract = common.abstract_params_of(policy, mesh)
    run_ctx = run_lib.RunContext(cfg, workdir)
    result = None
    with run_ctx:
        done = run_ctx.ckpt.latest_step() or 0
        source = t.init_from if done == 0 else os.path.join(run_ctx.ckpt.directory, str(done))
        params = common.load_full_params(source, abstract, "train.init_from")
        writer = run_ctx.open_metrics(done)
        for r in range(done, rcfg.rounds):
            round_dir = os.path.join(run_ctx.workdir, ROUNDS_DIR, str(r))
            best_path = os.path.join(round_dir, BEST_FILE)
            metrics = {}
            metrics_path = os.path.join(round_dir, SAMPLING_FILE)
            if not os.path.exists(best_path):
                kept, metrics = sample_round(engine, params, conversations, prompts, reward, tokenizer, rcfg,
                                             seed=int(t.seed), round_index=r)
                if not kept:
                    raise ConfigError(f"rejection sampling round {r}: no sampled answer reached EOS; raise "
                                      f"sampling.max_new_tokens")
                _write_atomically(metrics_path, [metrics])  # first: the answers' file marks a finished round
                _write_atomically(best_path, kept)
            with open(metrics_path, encoding="utf-8") as f:
                metrics = json.loads(f.readline())
            init_from = t.init_from if r == 0 else os.path.join(run_ctx.workdir, ROUNDS_DIR, str(r - 1))
            result = _fine_tune(cfg, round_dir, init_from, tokenizer, mesh)
            params = common.load_full_params(round_dir, abstract, "rs round")
            run_ctx.ckpt.save(r + 1, {"params": params}, data_state=None, config=workdir_lib.config_to_dict(cfg))
            writer.write_scalars(r + 1, {**metrics, **{k.replace("train/", "round/"): v
                                                       for k, v in result.train_metrics.items() if "train/" in k}})
            logging.info("rs round %d/%d: kept %d of %d prompts, best score %.3f (mean %.3f)", r + 1, rcfg.rounds,
                         metrics["rs/kept"], metrics["rs/samples"] / rcfg.samples_per_prompt,
                         metrics["rs/best_score"], metrics["rs/mean_score"])
    return result or loop.TrainResult(step=done, train_metrics={}, eval_metrics={}, samples=[], workdir=workdir)


def report(run, params, step: int, opts) -> dict:
    del step
    return reference.report_kl(run, params, opts, temperature=float(run.config.rs.temperature),
                               max_new_tokens=int(run.config.sampling.max_new_tokens),
                               max_prompt_len=int(run.config.sampling.max_prompt_len))


def bench(ctx) -> list:
    """A round's fine-tuning step (the SFT loss on synthetic conversations); its sampling is the ``sample``
    workload's program."""
    c = ctx.c
    T, segments = int(c.seq_len), int(c.sft_segments)
    return [ctx.train_step(
        "rs", make_model=GPT,
        make_loss=lambda model: functools.partial(sft.sft_loss, model=model, loss_chunk=int(c.loss_chunk)),
        make_batch=lambda cfg, rows, rng: ctx.lm_batch(rng, rows, T, cfg.vocab_size, segments, sft_weights=True),
        tokens_per_row=T, flops_per_token=lambda cfg: flops.flops_per_token(cfg, T), segments=segments)]


STAGE = registry.register(registry.Stage(
    name="rs", title="rejection-sampling", run=run, components=policy_components, objective=sft.objective,
    batch=batches.LM_BATCH, split_loss=reference.split_loss, report=report, bench=bench,
    sections=("rs", "sampling")))
