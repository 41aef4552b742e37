"""Reward-model over-optimisation on the seed world (Gao, Schulman & Hilton 2022, "Scaling laws for reward model
overoptimization").

The seed world's labeler (``GoldOracle``) is the *gold* reward. Proxy reward models of several sizes learn it from
the same labelled comparisons (the pipeline's ``labels/rankings_train.jsonl``); then the SFT policy is optimised
against each proxy by

* best-of-N: for held-out questions, sample answers from the SFT policy, keep the proxy's favourite of N; with
  KL(BoN ‖ π_SFT) = log N − (N − 1)/N (Gao et al. 2022, after Stiennon et al. 2020), and
* PPO: a run per proxy, its policy evaluated along training (gold and proxy reward, KL(π ‖ π_SFT) by sampling),

and gold and proxy reward are plotted against d = √KL. Gao et al.'s functional forms are fitted to the gold reward
gained over the SFT policy: R_BoN(d) = d(α − βd) and R_RL(d) = d(α − β·log d), both linear in (α, β) and fitted
by ordinary least squares (standard errors from the residual variance).

Proxy initialisation: each proxy's decoder is pretrained on the seed-world corpus with the pipeline's own
pretraining recipe (same data, steps, batch and learning rate; only the width and depth change), then trained as a
reward model with the pipeline's RM recipe. A proxy of the pipeline's model size reuses its pretraining run. A
decoder started from scratch on ~500 comparisons cannot know which numbers are prime (held-out numbers appear only
in pretraining text), and an SFT decoder exists only at the policy's size. Size-matched pretraining should give
proxies whose quality grows with size (the table reports each one's held-out accuracy to check it), as in Gao et
al., whose proxies are pretrained models of different sizes.

Everything lands in ``OUT`` (default ``WORKDIR/overopt``); each part is skipped when its result is already there,
so an interrupted study resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from gptjax import sampling, sharding

from gptjax.data import chat, post_training
from gptjax.errors import ConfigError
from gptjax.model import ScoreModel
from gptjax.seed_world import pipeline
from gptjax.seed_world import labeler
from gptjax.stages import common, registry, reward
from gptjax.stages import rollouts as rollouts_lib
from gptjax.stages.ppo import loop as ppo_loop
from gptjax.stages.ppo import stage as ppo_stage
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import metrics as metrics_lib
from gptjax.train import workdir as workdir_lib

STUDY_FILE = "overopt.json"
BON_FILE = "bon_samples.npz"


# --- the formulas -------------------------------------------------------------------------------------------------

def bon_kl(n) -> np.ndarray:
    """KL(best-of-n ‖ base policy) = log n − (n − 1)/n nats (exact for a continuous, tie-free proxy)."""
    n = np.asarray(n, np.float64)
    if np.any(n < 1):
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return np.log(n) - (n - 1) / n


def bon_expectation(values_S, proxy_S, n: int) -> float:
    """E[values of the proxy's favourite among n of the S samples drawn without replacement], exactly.

    With the samples sorted by proxy score, the i-th smallest (1-based) is the favourite of a uniformly random
    n-subset with probability C(i−1, n−1) / C(S, n) (Gao et al.'s unbiased best-of-n estimator). Ties in the proxy
    score are broken at random, so tied samples share their mean value.
    """
    values_S, proxy_S = np.asarray(values_S, np.float64), np.asarray(proxy_S, np.float64)
    _, inverse = np.unique(proxy_S, return_inverse=True)
    tie_mean = np.bincount(inverse, values_S) / np.bincount(inverse)
    order = np.argsort(proxy_S, kind="stable")
    return float(np.sum(bon_weights(len(values_S), n) * tie_mean[inverse[order]]))


@functools.lru_cache(maxsize=256)
def bon_weights(S: int, n: int) -> np.ndarray:
    """P(the i-th smallest of S is the largest of a random n-subset) = C(i−1, n−1) / C(S, n), i = 1..S."""
    if not 1 <= n <= S:
        raise ValueError(f"best-of-{n} needs 1 <= n <= the {S} samples per prompt")
    log_c = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)  # noqa: E731
    w = np.array([math.exp(log_c(i - 1, n - 1) - log_c(S, n)) if i >= n else 0.0 for i in range(1, S + 1)])
    w.setflags(write=False)
    return w


def _least_squares(d, r, second: np.ndarray) -> dict:
    """r ≈ α·d − β·second by OLS; standard errors from the residual variance (needs > 2 points)."""
    X = np.stack([d, -second], axis=1)
    coef, *_ = np.linalg.lstsq(X, r, rcond=None)
    resid = r - X @ coef
    dof = len(r) - 2
    sigma2 = float(resid @ resid / dof) if dof > 0 else float("nan")
    cov = sigma2 * np.linalg.pinv(X.T @ X)
    return {"alpha": float(coef[0]), "beta": float(coef[1]), "alpha_se": float(math.sqrt(max(cov[0, 0], 0.0))),
            "beta_se": float(math.sqrt(max(cov[1, 1], 0.0))), "rmse": float(np.sqrt(np.mean(resid ** 2))),
            "num_points": int(len(r))}


def _check_points(d, r, what: str) -> tuple[np.ndarray, np.ndarray]:
    d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
    if d.shape != r.shape or d.ndim != 1:
        raise ValueError(f"{what}: d and R must be 1-D of the same length, got shapes {d.shape} and {r.shape}")
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(r))) or np.any(d < 0):
        raise ValueError(f"{what}: d = √KL must be finite and >= 0 and R finite")
    if np.count_nonzero(d > 0) < 2:
        raise ValueError(f"{what}: need at least 2 points with d > 0 to fit α and β, got {int(np.sum(d > 0))}")
    return d, r


def fit_bon(d, r) -> dict:
    """Gao et al.'s best-of-n form R(d) = d(α − βd), fitted to gold-reward gains R at d = √KL."""
    d, r = _check_points(d, r, "fit_bon")
    return _least_squares(d, r, d ** 2)


def d_log_d(d) -> np.ndarray:
    d = np.asarray(d, np.float64)
    return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)  # its limit at d = 0 is 0


def fit_rl(d, r) -> dict:
    """Gao et al.'s RL form R(d) = d(α − β·log d), fitted to gold-reward gains R at d = √KL."""
    d, r = _check_points(d, r, "fit_rl")
    return _least_squares(d, r, d_log_d(d))


def bon_curve(d, fit: dict) -> np.ndarray:
    d = np.asarray(d, np.float64)
    return d * (fit["alpha"] - fit["beta"] * d)


def rl_curve(d, fit: dict) -> np.ndarray:
    return fit["alpha"] * np.asarray(d, np.float64) - fit["beta"] * d_log_d(d)


# --- proxies ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProxySpec:
    name: str
    num_layers: int
    d_model: int
    num_heads: int


_SPEC = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*:\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


def parse_proxies(text: str) -> list[ProxySpec]:
    """'S:1x32x2,M:2x64x4' -> proxy specs (name:layers x d_model x heads)."""
    specs = []
    for item in str(text).split(","):
        m = _SPEC.match(item)
        if not m:
            raise ConfigError(f"proxies: {item!r} is not 'name:LAYERSxD_MODELxHEADS' (e.g. 'S:1x32x2,M:2x64x4')")
        spec = ProxySpec(m.group(1), *(int(g) for g in m.groups()[1:]))
        if spec.d_model % spec.num_heads:
            raise ConfigError(f"proxies: {item!r}: {spec.num_heads} heads do not divide d_model {spec.d_model}")
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or len(specs) < 1:
        raise ConfigError(f"proxies: names must be distinct and at least one given, got {names}")
    return specs


def stored_config(run_dir: str) -> ml_collections.ConfigDict:
    """A pipeline stage's resolved config (its workdir's config.json)."""
    path = os.path.join(run_dir, workdir_lib.CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{path} is missing: {run_dir} is not a finished pipeline stage; run the pipeline "
                          f"(experiments.chatgpt) into that workdir first, or let experiments.overopt run it")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def run_finished(run_dir: str, cfg, steps: int) -> bool:
    """Whether the run in ``run_dir`` is complete; a run there of another config is an error, never reused."""
    workdir_lib.check_or_write_config(run_dir, cfg, write=False)
    done = ckpt_lib.finished_steps(run_dir)
    return bool(done) and done[-1] >= steps


def train_proxy(spec: ProxySpec, pipeline_dir: str, out_dir: str, *, pretrain_steps: int, rm_steps: int,
                rm_lr: float) -> tuple[str, str]:
    """(pretraining run, reward-model run) of one proxy; each is skipped when already finished."""
    p = stored_config(os.path.join(pipeline_dir, "pretrain"))
    steps = int(pretrain_steps) or int(p.train.steps)
    same_size = (int(p.model.num_layers), int(p.model.d_model), int(p.model.num_heads)) == (
        spec.num_layers, spec.d_model, spec.num_heads)
    pre_dir = os.path.join(pipeline_dir, "pretrain")
    if not (same_size and steps == int(p.train.steps)):
        pre_dir = os.path.join(out_dir, "proxies", spec.name, "pretrain")
        p.model.num_layers, p.model.d_model, p.model.num_heads = spec.num_layers, spec.d_model, spec.num_heads
        p.model.d_head, p.model.d_ff = None, None
        p.train.steps = steps
        p.train.sample_prompts = ()
        if not run_finished(pre_dir, p, steps):
            logging.info("proxy %s: pretraining %s for %d steps", spec.name, spec, steps)
            registry.get("pretrain").run(p, pre_dir)
    r = stored_config(os.path.join(pipeline_dir, "reward"))
    for key in list(r.model.keys()):  # the model (and tokenizer) come from the proxy's own pretraining run
        r.model[key] = None
    r.model.preset = common.FROM_INIT
    r.tokenizer.kind, r.tokenizer.path = common.FROM_INIT, ""
    r.train.init_from = pre_dir
    r.train.steps = int(rm_steps) or int(r.train.steps)
    if rm_lr:
        r.optim.lr = float(rm_lr)
    rm_dir = os.path.join(out_dir, "proxies", spec.name, "reward")
    if not run_finished(rm_dir, common.resolved_config(r), int(r.train.steps)):
        logging.info("proxy %s: reward model for %d steps from %s", spec.name, r.train.steps, pre_dir)
        registry.get("reward").run(r, rm_dir)
    return pre_dir, rm_dir


@dataclasses.dataclass
class Proxy:
    spec: ProxySpec
    run_dir: str
    model: ScoreModel
    params: Any  # demonstration-centred (the bias PPO sees)
    non_embedding_params: int
    heldout_accuracy: float


def load_proxy(spec: ProxySpec, rm_dir: str, labels_eval: str, tokenizer, mesh) -> Proxy:
    stored = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(rm_dir))
    seq_len = int(stored.train.seq_len)
    cfg = common.build_model_config(common.resolve_from_init(stored)[0], tokenizer, seq_len)
    model = ScoreModel(common.no_dropout(cfg))
    params = reward.load_reward_params(rm_dir, common.abstract_params_of(model, mesh), rm_dir)
    acc = reward.ranking_metrics(model, params, labels_eval, tokenizer, seq_len)["pairwise_accuracy"]
    return Proxy(spec, rm_dir, model, params, common.expected_counts(model)["non_embedding"], acc)


# --- scoring sampled answers ------------------------------------------------------------------------------------

def score(rollouts: rollouts_lib.Rollouts, questions: Sequence[labeler.Question], tokenizer, oracle, proxies,
          no_eos_penalty: float | None) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(answer texts, gold scores, {proxy name: rewards}) of one response per question; as in PPO, an answer that
    never emitted EOS gets ``no_eos_penalty`` from every proxy (None: the raw reward)."""
    answers = [tokenizer.decode(rollouts.response_ids(i)).strip() for i in range(len(questions))]
    gold = np.array([oracle.score(q, a) for q, a in zip(questions, answers)])
    proxy = {}
    for p in proxies:
        s = reward.reward_scores(p.model, p.params, rollouts.tokens_BT, rollouts.valid_BT)
        proxy[p.spec.name] = s if no_eos_penalty is None else np.where(rollouts.finished_B, s, no_eos_penalty)
    return answers, gold, proxy


def spread(items: Sequence, k: int) -> list:
    """k items evenly spaced through ``items`` (the held-out questions are ordered by number)."""
    if k <= 0 or k >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


# --- best-of-N --------------------------------------------------------------------------------------------------

def best_of_n(engine: rollouts_lib.RolloutEngine, sft_params, questions, tokenizer, oracle, proxies, *,
              samples_per_prompt: int, n_values: Sequence[int], no_eos_penalty, seed: int, cache: str) -> dict:
    """Samples ``samples_per_prompt`` answers per question once; best-of-n curves for every n and proxy."""
    names = [p.spec.name for p in proxies]
    S = samples_per_prompt
    # What the samples and scores depend on: a cache of other settings is recomputed, never reused.
    meta = json.dumps({"questions": [q.text for q in questions], "S": S, "seed": seed, "sampling": repr(engine.cfg),
                       "proxies": {p.spec.name: [p.run_dir, ckpt_lib.finished_steps(p.run_dir)[-1]] for p in proxies},
                       "no_eos_penalty": no_eos_penalty}, sort_keys=True)
    cached = np.load(cache) if os.path.exists(cache) else None
    if cached is None or "meta" not in cached.files or str(cached["meta"]) != meta:
        prompts = [chat.render_prompt(q.conversation, tokenizer).tolist() for q in questions for _ in range(S)]
        repeated = [q for q in questions for _ in range(S)]
        rollouts = engine.generate(sft_params, prompts, seed)
        answers, gold, proxy = score(rollouts, repeated, tokenizer, oracle, proxies, no_eos_penalty)
        np.savez(cache, meta=np.array(meta), gold=gold.reshape(-1, S),
                 **{f"proxy_{k}": v.reshape(-1, S) for k, v in proxy.items()})
        with open(cache.replace(".npz", ".jsonl"), "w", encoding="utf-8") as f:
            for i, (q, a) in enumerate(zip(repeated, answers)):
                f.write(json.dumps({"question": q.text, "number": q.number, "answer": a, "gold": float(gold[i]),
                                    **{k: float(v[i]) for k, v in proxy.items()}}, ensure_ascii=False) + "\n")
        cached = np.load(cache)
    gold_PS = cached["gold"]
    out = {"num_prompts": int(gold_PS.shape[0]), "samples_per_prompt": S, "n": [int(n) for n in n_values],
           "kl": bon_kl(n_values).tolist(), "proxies": {}}
    for name in names:
        proxy_PS = cached[f"proxy_{name}"]
        gold_n = [float(np.mean([bon_expectation(g, p, n) for g, p in zip(gold_PS, proxy_PS)])) for n in n_values]
        proxy_n = [float(np.mean([bon_expectation(p, p, n) for p in proxy_PS])) for n in n_values]
        out["proxies"][name] = {"gold": gold_n, "proxy": proxy_n,
                                "gold_proxy_spearman": _spearman(gold_PS.ravel(), proxy_PS.ravel())}
    return out


def _spearman(a, b) -> float:
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1]) if np.std(ra) > 0 and np.std(rb) > 0 else float("nan")


def _ranks(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    mid = np.cumsum(counts) - (counts - 1) / 2.0  # average rank of each tie level
    return mid[inverse]


# --- PPO against a proxy ----------------------------------------------------------------------------------------

def run_ppo_on_proxy(cfg, workdir: str, eval_fn: Callable) -> ppo_loop.PPOResult:
    """PPO from the SFT run against the proxy at ``cfg.ppo_init.reward_from`` (reward and value model of the
    proxy run's own architecture), by the PPO stage's runner; PPO-ptx is not used here (ppo.ptx_coef must be 0)."""
    if float(cfg.ppo.ptx_coef) > 0:
        raise ConfigError(f"the over-optimisation study runs plain PPO: set ppo.ptx_coef=0 (got {cfg.ppo.ptx_coef})")
    return ppo_stage.run(cfg, workdir, eval_fn)


def ppo_config(pipeline_dir: str, rm_dir: str, rl) -> ml_collections.ConfigDict:
    """The pipeline's PPO config against a proxy, with the study's iterations, evaluation cadence, β and lr."""
    o = stored_config(os.path.join(pipeline_dir, "ppo"))
    o.ppo_init.reward_from = rm_dir
    o.train.steps = int(rl.steps)
    o.train.eval_every = int(rl.eval_every)
    o.train.ckpt_every = int(rl.eval_every)
    o.train.log_every = int(rl.eval_every)
    o.ppo.kl_coef = float(rl.kl_coef)
    o.ppo.kl_controller = "fixed"
    o.ppo.ptx_coef = 0.0
    o.optim.lr = float(rl.lr)
    if int(rl.rollout_batch_size):
        o.ppo.rollout_batch_size = int(rl.rollout_batch_size)
    if int(rl.minibatch_size):
        o.ppo.minibatch_size = int(rl.minibatch_size)
    return o


def ppo_curve(o, run_dir: str, evaluate: Callable[[Any, int], dict], initial: dict) -> dict:
    """PPO against one proxy (skipped when finished), and its evaluations along training, step 0 first."""
    if not run_finished(run_dir, o, int(o.train.steps)):
        run_ppo_on_proxy(o, run_dir, evaluate)
    records = [r for r in metrics_lib.read_metrics(run_dir) if "eval/gold" in r]
    evals = [{"step": 0, **initial}] + [{"step": int(r["step"]), **{k[5:]: r[k] for k in r if k.startswith("eval/")}}
                                        for r in records]
    return {"run": run_dir, "evals": evals}


# --- the study ----------------------------------------------------------------------------------------------

def ensure_pipeline(pipeline_cfg, workdir: str, through: str = "evaluation") -> str:
    """A seed-world pipeline in ``workdir`` finished at least ``through`` that point (pipeline.STOP_POINTS; a
    finished one has its results.json), running (or resuming) it if needed."""
    workdir = os.path.abspath(workdir)
    if not os.path.exists(os.path.join(workdir, "results.json")):
        logging.info("no finished pipeline in %s (no results.json): running it through %s", workdir, through)
        pipeline.run_pipeline(pipeline_cfg, workdir, through=through)
    return workdir


def _oracle(pipeline_dir: str) -> labeler.GoldOracle:
    del pipeline_dir  # the world's labeler has fixed weights (gptjax/seed_world/labeler.py)
    return labeler.GoldOracle()


def _heldout(pipeline_dir: str) -> list[labeler.Question]:
    """The held-out "is n prime?" questions the pipeline wrote (WORLD/heldout.jsonl holds every held-out kind)."""
    path = os.path.join(pipeline_dir, "world", "heldout.jsonl")
    questions = [labeler.Question.from_record(r, where) for where, r in post_training.iter_records(path)]
    return [q for q in questions if q.kind == "number"]


def _rl_curves(cfg, pipeline_dir: str, out_dir: str, sft_model, sft_params, sampling_cfg, questions, tokenizer,
               oracle, proxies, no_eos_penalty) -> dict:
    """PPO against each proxy, evaluated along training on ``questions``: {proxy name: ppo_curve}."""
    prompts = [chat.render_prompt(q.conversation, tokenizer).tolist() for q in questions]
    eval_engine = rollouts_lib.RolloutEngine(sft_model, sampling_cfg, batch_size=min(len(prompts), 128))
    rl = {}
    for proxy in proxies:
        def evaluate(policy_params, step, proxy=proxy):
            rollouts = eval_engine.generate(policy_params, prompts, int(cfg.seed) + 1)
            _, gold, scores = score(rollouts, questions, tokenizer, oracle, [proxy], no_eos_penalty)
            kl = eval_engine.kl(policy_params, sft_params, rollouts)
            n = len(gold)
            return {"gold": float(np.mean(gold)), "gold_stderr": float(np.std(gold, ddof=1) / math.sqrt(n)),
                    "proxy": float(np.mean(scores[proxy.spec.name])), "kl": float(np.mean(kl)),
                    "kl_stderr": float(np.std(kl, ddof=1) / math.sqrt(n)),
                    "eos_rate": float(np.mean(rollouts.finished_B))}

        o = ppo_config(pipeline_dir, proxy.run_dir, cfg.rl)
        rl[proxy.spec.name] = ppo_curve(o, os.path.join(out_dir, "ppo", proxy.spec.name), evaluate,
                                        evaluate(sft_params, 0))
    return rl


def _proxy_summary(p: Proxy, bon: dict, evals: list[dict]) -> dict:
    """A proxy's row: its size and accuracy, and the best-of-n and RL fits of the gold reward it gained."""
    b = bon["proxies"][p.spec.name]
    bon_d = np.sqrt(np.asarray(bon["kl"]))
    bon_gain = np.asarray(b["gold"]) - b["gold"][0]
    rl_d = np.sqrt(np.maximum([e["kl"] for e in evals], 0.0))
    rl_gain = np.asarray([e["gold"] for e in evals]) - evals[0]["gold"]
    return {**dataclasses.asdict(p.spec), "run": p.run_dir, "non_embedding_params": p.non_embedding_params,
            "heldout_pairwise_accuracy": p.heldout_accuracy,
            "gold_proxy_spearman": b["gold_proxy_spearman"],
            "bon_fit": _try_fit(fit_bon, bon_d, bon_gain), "rl_fit": _try_fit(fit_rl, rl_d, rl_gain),
            "bon_best_gain": float(bon_gain.max()), "rl_best_gain": float(rl_gain.max())}


def run_study(cfg, workdir: str, out_dir: str | None = None) -> dict:
    """The whole study (see the module docstring); writes OUT/overopt.{json,md,png} and returns the results."""
    t0 = time.time()
    timings = {}
    n_values = sorted({int(n) for n in cfg.bon.n_values})
    if not n_values or n_values[0] < 1 or n_values[-1] > int(cfg.bon.samples_per_prompt):
        raise ConfigError(f"bon.n_values={list(cfg.bon.n_values)} must lie in 1..bon.samples_per_prompt="
                          f"{cfg.bon.samples_per_prompt}")
    specs = parse_proxies(cfg.proxies)
    if int(cfg.rl.steps) % int(cfg.rl.eval_every):
        raise ConfigError(f"rl.eval_every={cfg.rl.eval_every} must divide rl.steps={cfg.rl.steps}")
    pipeline_dir = ensure_pipeline(cfg.pipeline, workdir)
    timings["pipeline_s"] = time.time() - t0
    out_dir = os.path.abspath(out_dir or os.path.join(pipeline_dir, "overopt"))
    os.makedirs(out_dir, exist_ok=True)

    start = time.time()
    rm_dirs = {s.name: train_proxy(s, pipeline_dir, out_dir, pretrain_steps=int(cfg.proxy_pretrain_steps),
                                   rm_steps=int(cfg.rm_steps), rm_lr=float(cfg.rm_lr))[1] for s in specs}
    timings["proxies_s"] = time.time() - start
    sft_model, sft_params, tokenizer, _ = registry.load_policy(os.path.join(pipeline_dir, "sft"))
    mesh = sharding.make_mesh((-1, 1, 1))
    labels_eval = stored_config(os.path.join(pipeline_dir, "reward")).data.eval_path
    proxies = [load_proxy(s, rm_dirs[s.name], labels_eval, tokenizer, mesh) for s in specs]
    oracle, heldout = _oracle(pipeline_dir), _heldout(pipeline_dir)
    o_base = stored_config(os.path.join(pipeline_dir, "ppo"))
    no_eos_penalty = o_base.ppo.no_eos_penalty
    sampling_cfg = sampling.SamplingConfig(
        max_new_tokens=int(cfg.max_new_tokens) or int(o_base.sampling.max_new_tokens),
        temperature=float(o_base.ppo.temperature), top_k=int(o_base.sampling.top_k),
        top_p=float(o_base.sampling.top_p), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        vocab_size=tokenizer.vocab_size)

    start = time.time()
    bon_questions = spread(heldout, int(cfg.bon.num_prompts))
    engine = rollouts_lib.RolloutEngine(sft_model, sampling_cfg, batch_size=int(cfg.bon.batch_size))
    bon = best_of_n(engine, sft_params, bon_questions, tokenizer, oracle, proxies,
                    samples_per_prompt=int(cfg.bon.samples_per_prompt), n_values=n_values,
                    no_eos_penalty=no_eos_penalty, seed=int(cfg.seed), cache=os.path.join(out_dir, BON_FILE))
    timings["best_of_n_s"] = time.time() - start

    rl_questions = spread(heldout, int(cfg.rl.eval_prompts))
    start = time.time()
    rl = _rl_curves(cfg, pipeline_dir, out_dir, sft_model, sft_params, sampling_cfg, rl_questions, tokenizer, oracle,
                    proxies, no_eos_penalty)
    timings["ppo_s"] = time.time() - start

    results = {"workdir": pipeline_dir, "out": out_dir, "proxies": {}, "best_of_n": bon, "rl": rl,
               "settings": {"samples_per_prompt": int(cfg.bon.samples_per_prompt), "bon_prompts": len(bon_questions),
                            "rl_eval_prompts": len(rl_questions), "rl_steps": int(cfg.rl.steps),
                            "rl_kl_coef": float(cfg.rl.kl_coef), "rl_lr": float(cfg.rl.lr),
                            "max_new_tokens": sampling_cfg.max_new_tokens, "no_eos_penalty": no_eos_penalty}}
    for p in proxies:
        results["proxies"][p.spec.name] = _proxy_summary(p, bon, rl[p.spec.name]["evals"])
    timings["total_s"] = time.time() - t0
    results["timings_s"] = timings
    results["plot"] = plot(results, os.path.join(out_dir, "overopt.png"))
    with open(os.path.join(out_dir, STUDY_FILE), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "overopt.md"), "w", encoding="utf-8") as f:
        f.write(format_table(results) + "\n")
    return results


def _try_fit(fit_fn, d, r) -> dict | None:
    try:
        return fit_fn(d, r)
    except ValueError as e:  # e.g. PPO never left the SFT policy: nothing to fit, said in the table
        logging.warning("%s", e)
        return None


# --- outputs ------------------------------------------------------------------------------------------------------

def _fit_text(fit: dict | None) -> str:
    if fit is None:
        return "n/a"
    return f"α {fit['alpha']:.3f}±{fit['alpha_se']:.3f}, β {fit['beta']:.3f}±{fit['beta_se']:.3f}"


def format_table(results: dict) -> str:
    """Markdown: one row per proxy (size, quality, fits, best gold gains), then the settings and timings."""
    lines = ["| proxy | layers × d_model | non-emb. params | RM held-out acc | gold–proxy ρ (BoN samples) | "
             "BoN fit d(α − βd) | best BoN gold gain | RL fit d(α − β log d) | best RL gold gain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, p in results["proxies"].items():
        lines.append(f"| {name} | {p['num_layers']} × {p['d_model']} | {p['non_embedding_params']:,} | "
                     f"{p['heldout_pairwise_accuracy']:.3f} | {p['gold_proxy_spearman']:.3f} | "
                     f"{_fit_text(p['bon_fit'])} "
                     f"| {p['bon_best_gain']:+.3f} | {_fit_text(p['rl_fit'])} | {p['rl_best_gain']:+.3f} |")
    s = results["settings"]
    lines += ["", f"Best-of-N: {s['bon_prompts']} held-out questions × {s['samples_per_prompt']} SFT samples, "
                  f"N = {results['best_of_n']['n']}; PPO: {s['rl_steps']} iterations, β = {s['rl_kl_coef']}, "
                  f"lr {s['rl_lr']}, evaluated on {s['rl_eval_prompts']} held-out questions. Gold gains are over "
                  f"the SFT policy (N = 1 / PPO step 0), in the labeler's points.",
              "", "Timings (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in results["timings_s"].items())]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: dict, path: str) -> str:
    """2 × 2: gold (top) and proxy (bottom) reward gained over the SFT policy against d = √KL; best-of-N left,
    PPO right; the fitted gold curves dotted."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    bon = results["best_of_n"]
    bon_d = np.sqrt(np.asarray(bon["kl"]))
    for i, (name, p) in enumerate(results["proxies"].items()):
        colour = f"C{i}"
        label = f"{name}: {p['num_layers']}×{p['d_model']}, {p['non_embedding_params'] / 1e3:.0f}k, " \
                f"acc {p['heldout_pairwise_accuracy']:.2f}"
        b = bon["proxies"][name]
        evals = results["rl"][name]["evals"]
        rl_d = np.sqrt(np.maximum([e["kl"] for e in evals], 0.0))
        for col, d, gold, proxy, fit, curve in (
                (0, bon_d, np.asarray(b["gold"]), np.asarray(b["proxy"]), p["bon_fit"], bon_curve),
                (1, rl_d, np.asarray([e["gold"] for e in evals]), np.asarray([e["proxy"] for e in evals]),
                 p["rl_fit"], rl_curve)):
            axes[0, col].plot(d, gold - gold[0], "o-", color=colour, label=label)
            if fit is not None:
                grid = np.linspace(0, max(d.max(), 1e-3) * 1.05, 100)
                axes[0, col].plot(grid, curve(grid, fit), ":", color=colour)
            axes[1, col].plot(d, proxy - proxy[0], "s--", color=colour, label=label)
    axes[0, 0].set_title("best-of-N: KL = log N − (N−1)/N")
    axes[0, 1].set_title("PPO: KL(π ‖ π_SFT) by sampling")
    axes[0, 0].set_ylabel("gold reward gain (labeler points)")
    axes[1, 0].set_ylabel("proxy reward gain (RM units)")
    for ax in axes[1]:
        ax.set_xlabel("d = √KL (nats^½)")
    for ax in axes.ravel():
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Reward over-optimisation on the seed world (dotted: Gao et al. fits to gold)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
