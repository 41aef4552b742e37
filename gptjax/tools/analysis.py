"""Looking inside checkpoints: parameter counts per module, weight and update norms per layer, loss on a split,
samples, reward-model scores of given answers, KL(policy ‖ reference) and the difference between two checkpoints.

Works on runs of every stage; the stage is read from the checkpoint's stored config (``stage``):

    pretrain, sft   one GPT language model        (checkpoint item ``params``)
    reward          one ScoreModel                 (``params``)
    ppo             a PPOState: the policy (GPT, ``policy_params``) and the value model (ScoreModel,
                    ``value_params``); the reference policy is the run's ``train.init_from``

``analyze`` returns a JSON-able dict; ``write_report`` turns it into ``report.md`` and PNG plots. The building
blocks (``layer_leaves``, ``module_norms``, ``difference``, ``RolloutEngine`` …) are reused by the
over-optimisation study (gptjax/seed_world/overopt.py).

Layers are reported by their depth index whatever the parameter layout (scanned ``groups`` with a leading layer
axis, or ``groups_<i>``; a group holds one block per entry of ``attention_pattern``). Names: ``layer_3/attn/qkv``
is a module, ``attn/qkv`` its module type; embeddings (``wte``, ``wpe``), ``ln_f``, ``lm_head`` and the score head
``score`` are modules outside the layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax import sampling, sharding
from gptjax.data import chat, post_training
from gptjax.errors import ConfigError, DataFormatError
from gptjax.model import GPT, ScoreModel, count_params, unstack_layers
from gptjax.stages import rl
from gptjax.stages import common as runners
from gptjax.stages.pretrain import lm_loss
from gptjax.stages.reward import pairwise_accuracy, ranking_loss, sequence_rewards, shift_reward_bias
from gptjax.stages.sft import sft_loss
from gptjax.tokenizers import Tokenizer
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import loop
from gptjax.train import metrics as metrics_lib

STAGES = ("pretrain", "sft", "reward", "ppo")
POLICY_STAGES = ("pretrain", "sft", "ppo")
SPLITS = ("train", "eval")  # "eval" is the held-out split: pretraining's "validation", the post-training eval_path
_LAYER = re.compile(r"^layer_(\d+)/")


# --- runs and checkpoints ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Component:
    """One network held by a checkpoint."""

    name: str  # "model" (pretrain/sft/reward), "policy" or "value" (ppo)
    model: nn.Module  # GPT or ScoreModel, dropout off
    item_key: str  # the checkpoint state's field holding its params


@dataclasses.dataclass
class Run:
    """A training run's workdir: its finished checkpoints, stored config and networks."""

    workdir: str
    stage: str
    config: ml_collections.ConfigDict  # the config stored with the latest checkpoint
    tokenizer: Tokenizer
    steps: list[int]  # finished checkpoint steps, ascending
    components: list[Component]
    mesh: Any

    def step_dir(self, step: int | None = None) -> str:
        step = self.steps[-1] if step is None else step
        if step not in self.steps:
            raise ConfigError(f"--step={step}: {self.workdir} has checkpoints at steps {self.steps}")
        return os.path.join(self.workdir, ckpt_lib.CKPT_DIR, str(step))

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def load(self, component: Component, step: int | None = None) -> dict:
        """The component's parameters at ``step`` (default: the latest), on this run's mesh."""
        abstract = runners.abstract_params_of(component.model, self.mesh)
        return runners.load_full_params(self.step_dir(step), abstract, "--workdir", component.item_key)


def finished_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints under WORKDIR/checkpoints (an interrupted save has no plain <step> dir)."""
    directory = os.path.join(workdir, ckpt_lib.CKPT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state")))


def _no_dropout(cfg):
    return cfg.replace(dropout_embed=0.0, dropout_resid=0.0, dropout_attn=0.0)


def _gpt_config(stored, tokenizer: Tokenizer):
    model_cfg, _ = runners.resolve_from_init(stored)
    seq_len = int(stored.sampling.max_prompt_len) if stored.get("stage") == "ppo" else int(stored.train.seq_len)
    return _no_dropout(runners.build_model_config(model_cfg, tokenizer, seq_len))


def policy_item_key(stored) -> str:
    """Where a run's checkpoints keep the policy: PPO runs hold a PPOState, the others a TrainState."""
    return "policy_params" if stored.get("stage") == "ppo" else "params"


def open_run(workdir: str, mesh=None) -> Run:
    """The run in ``workdir``; one clear error when it holds no finished checkpoint or an unknown stage."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir!r} does not exist; give the workdir of a training run "
                          f"(pretrain, sft, reward or ppo)")
    steps = finished_steps(workdir)
    if not steps:
        raise ConfigError(f"--workdir={workdir!r} holds no finished checkpoint (expected "
                          f"{os.path.join(workdir, ckpt_lib.CKPT_DIR)}/<step>/state); give the workdir of a training "
                          f"run that saved at least one checkpoint")
    stored = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(os.path.join(workdir, ckpt_lib.CKPT_DIR,
                                                                               str(steps[-1]))))
    stage = stored.get("stage", "pretrain")
    if stage not in STAGES:
        raise ConfigError(f"{workdir}: the stored config's stage={stage!r} is unknown; valid stages: {list(STAGES)}")
    tokenizer = runners.build_tokenizer(runners.resolve_from_init(stored)[1])
    gpt_cfg = _gpt_config(stored, tokenizer)
    if stage in ("pretrain", "sft"):
        components = [Component("model", GPT(gpt_cfg), "params")]
    elif stage == "reward":
        components = [Component("model", ScoreModel(gpt_cfg), "params")]
    else:
        components = [Component("policy", GPT(gpt_cfg), "policy_params"),
                      Component("value", ScoreModel(_value_model_config(stored, tokenizer, gpt_cfg)), "value_params")]
    mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
    return Run(workdir, stage, stored, tokenizer, steps, components, mesh)


def _value_model_config(stored, tokenizer: Tokenizer, policy_cfg):
    """The value model has the reward model's architecture (it starts from it); the policy's if that run is gone."""
    path = stored.ppo_init.reward_from
    if path and os.path.exists(path):
        rm_stored = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(path))
        return _no_dropout(runners.build_model_config(runners.resolve_from_init(rm_stored)[0], tokenizer,
                                                      int(stored.sampling.max_prompt_len)))
    return policy_cfg


def load_reference_policy(run: Run) -> tuple[str, dict]:
    """(path, params) of the run's ``train.init_from`` as a policy of the run's own architecture."""
    path = run.config.train.get("init_from", "")
    if not path:
        raise ConfigError(f"{run.workdir}: train.init_from is empty, so the run has no reference policy")
    ref_stored = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(path))
    policy = run.components[0]
    abstract = runners.abstract_params_of(policy.model, run.mesh)
    return path, runners.load_full_params(path, abstract, "train.init_from", policy_item_key(ref_stored))


# --- parameters: counts, norms, differences --------------------------------------------------------------------

def layer_leaves(params: Mapping) -> dict[str, np.ndarray]:
    """Host copies of every parameter, keyed '/'-joined with the decoder's layers split out as ``layer_<i>/…``."""
    params = jax.device_get(params)
    if "decoder" in params:
        params = unstack_layers(params)
    out = {}
    for path, leaf in ckpt_lib.flatten(params).items():
        parts = list(path[1:] if path[0] == "decoder" else path)
        if parts[0].startswith("groups_"):
            group = params["decoder"][parts[0]]
            per_group = sum(1 for k in group if k.startswith("block_"))
            layer = int(parts[0].split("_")[1]) * per_group + int(parts[1].split("_")[1])
            parts = [f"layer_{layer}"] + parts[2:]
        out["/".join(parts)] = np.asarray(leaf)
    return out


def module_of(leaf_name: str) -> str:
    """``layer_3/attn/qkv/kernel`` -> ``layer_3/attn/qkv``; top-level leaves (``lm_head``) are their own module."""
    return leaf_name.rsplit("/", 1)[0] if "/" in leaf_name else leaf_name


def module_type(module: str) -> str:
    """``layer_3/attn/qkv`` -> ``attn/qkv``."""
    return _LAYER.sub("", module)


def layer_index(module: str) -> int | None:
    m = _LAYER.match(module + "/")
    return int(m.group(1)) if m else None


def num_layers(leaves: Mapping[str, np.ndarray]) -> int:
    return 1 + max((layer_index(module_of(k)) for k in leaves if layer_index(module_of(k)) is not None), default=-1)


def param_counts(leaves: Mapping[str, np.ndarray]) -> dict:
    """Counts per module type (summed over layers) and in all."""
    by_type: dict[str, int] = {}
    for name, x in leaves.items():
        t = module_type(module_of(name))
        by_type[t] = by_type.get(t, 0) + int(x.size)
    return {"total": int(sum(by_type.values())), "layers": num_layers(leaves), "by_module_type": by_type}


def _sq_by_module(leaves: Mapping[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, x in leaves.items():
        m = module_of(name)
        out[m] = out.get(m, 0.0) + float(np.sum(np.square(x.astype(np.float64))))
    return out


def module_norms(leaves: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Frobenius norm of each module's parameters (all its leaves: kernel and bias, or scale and bias)."""
    return {m: math.sqrt(s) for m, s in _sq_by_module(leaves).items()}


def difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict:
    """‖a − b‖ and ‖a − b‖ / ‖b‖ per module, over the leaves both hold with the same shape.

    Leaves held by only one side, or with different shapes, are listed, not compared. ``total`` covers every
    compared leaf.
    """
    common = sorted(k for k in a if k in b and a[k].shape == b[k].shape)
    if not common:
        raise ConfigError("the two checkpoints share no parameter of the same name and shape: nothing to compare "
                          f"(first has {sorted(a)[:4]}…, second {sorted(b)[:4]}…)")
    diff_sq = _sq_by_module({k: a[k].astype(np.float64) - b[k] for k in common})
    ref_sq = _sq_by_module({k: b[k] for k in common})
    per_module = {m: {"diff": math.sqrt(diff_sq[m]), "ref": math.sqrt(ref_sq[m]),
                      "relative": math.sqrt(diff_sq[m]) / max(math.sqrt(ref_sq[m]), 1e-30)} for m in diff_sq}
    total_diff, total_ref = math.sqrt(sum(diff_sq.values())), math.sqrt(sum(ref_sq.values()))
    return {"modules": per_module,
            "total": {"diff": total_diff, "ref": total_ref, "relative": total_diff / max(total_ref, 1e-30)},
            "only_in_first": sorted(k for k in a if k not in b), "only_in_second": sorted(k for k in b if k not in a),
            "shape_differs": sorted(k for k in a if k in b and a[k].shape != b[k].shape)}


def expected_counts(model: nn.Module) -> dict[str, int]:
    """model.count_params of the decoder's GPTConfig, plus the score head (d_model + 1) for a ScoreModel."""
    counts = dict(count_params(model.cfg))
    if isinstance(model, ScoreModel):
        counts["total"] += model.cfg.d_model + 1
        counts["non_embedding"] += model.cfg.d_model + 1
    return counts


# --- loss on a split ------------------------------------------------------------------------------------------

def _micro_batch(train_cfg, optim_cfg) -> int:
    return int(train_cfg.eval_batch_size) or int(train_cfg.batch_size) // int(optim_cfg.grad_accum_steps)


def _lm_eval(loss_fn, params, batches, max_batches: int) -> dict:
    """Token-weighted mean loss/accuracy over up to ``max_batches`` batches (the trainer's own eval step)."""
    step = jax.jit(loop.make_eval_step(loss_fn))
    loss_sum, weight, accuracy_sum, n = 0.0, 0.0, 0.0, 0
    for batch in batches:
        if n >= max_batches:
            break
        lw, w, sums = jax.device_get(step(params, batch))
        loss_sum, weight, accuracy_sum, n = loss_sum + float(lw), weight + float(w), \
            accuracy_sum + float(sums["accuracy"]), n + 1
    if weight == 0:
        raise ConfigError("the split produced no tokens to score (empty data?)")
    return {"loss": loss_sum / weight, "accuracy": accuracy_sum / weight, "num_tokens": weight, "num_batches": n}


def _lm_split_loss(stored, model: GPT, tokenizer: Tokenizer, params, split: str, max_batches: int | None) -> dict:
    t = stored.train
    batch = _micro_batch(t, stored.optim)
    max_batches = int(max_batches or t.eval_batches)
    if stored.get("stage", "pretrain") == "pretrain":
        from gptjax.data.pipeline import make_lm_iterator  # the grain/TFDS pipeline only when it is needed

        it = make_lm_iterator(stored.data, tokenizer, split="validation" if split == "eval" else "train",
                              global_batch_size=batch, seq_len=int(t.seq_len), seed=int(t.seed), num_epochs=1)
        loss_fn = functools.partial(lm_loss, model=model, loss_chunk=int(t.loss_chunk))
        source = f"{stored.data.source} {'validation' if split == 'eval' else 'train'} split"
    else:
        path = stored.data.eval_path if split == "eval" else stored.data.train_path
        if not path:
            raise ConfigError(f"--split={split}: the SFT run stores no data.{split}_path; choose another split")
        it = post_training.sft_batches(path, tokenizer, int(t.seq_len), batch, shuffle=False, num_epochs=1,
                                       drop_remainder=False)
        loss_fn = functools.partial(sft_loss, model=model, loss_chunk=int(t.loss_chunk))
        source = path
    return {"split": split, "source": source, **_lm_eval(loss_fn, params, it, max_batches)}


def reward_scores(model: ScoreModel, params, tokens_NT: np.ndarray, valid_NT: np.ndarray,
                  batch_size: int = 64) -> np.ndarray:
    """Reward of every row (read at its last valid token), in fixed-size batches (one compiled shape)."""
    fn = _reward_fn(model)
    n = len(tokens_NT)
    B = min(batch_size, n)
    out = []
    for start in range(0, n, B):
        t, v = tokens_NT[start:start + B], valid_NT[start:start + B]
        k = len(t)
        if k < B:  # pad the last batch by repeating its last row: one compiled shape
            t, v = np.concatenate([t, np.repeat(t[-1:], B - k, 0)]), np.concatenate([v, np.repeat(v[-1:], B - k, 0)])
        out.append(np.asarray(fn(params, t, v))[:k])
    return np.concatenate(out)


@functools.lru_cache(maxsize=16)
def _reward_fn(model: ScoreModel):
    return jax.jit(lambda p, t, v: sequence_rewards(p, t, v, model=model))


def ranking_metrics(model: ScoreModel, params, path: str, tokenizer: Tokenizer, seq_len: int,
                    num_slots: int | None = None) -> dict:
    """K-wise ranking loss and pairwise accuracy of a reward model over every ranking in ``path``."""
    ex = post_training.ranking_examples(path, tokenizer, seq_len, num_slots=num_slots)
    N, K, T = ex["tokens"].shape
    scores_NK = reward_scores(model, params, ex["tokens"].reshape(N * K, T), ex["valid"].reshape(N * K, T)
                              ).reshape(N, K)
    n = ex["num_ranked"].astype(np.int64)
    return {"source": path, "pairwise_accuracy": float(pairwise_accuracy(jnp.asarray(scores_NK),
                                                                        jnp.asarray(ex["num_ranked"]))),
            "ranking_loss": float(ranking_loss(jnp.asarray(scores_NK), jnp.asarray(ex["num_ranked"]))),
            "num_rankings": int(N), "num_pairs": int(np.sum(n * (n - 1) // 2))}


def split_loss(run: Run, params: dict, split: str, max_batches: int | None = None) -> dict:
    """LM runs: token loss on the split (PPO: the reference SFT run's data); RM runs: ranking loss/accuracy."""
    if split not in SPLITS:
        raise ConfigError(f"--split={split!r} is unknown; choose one of {list(SPLITS)} ('eval' = the held-out split)")
    model = run.components[0].model
    if run.stage == "reward":
        d = run.config.data
        path = d.eval_path if split == "eval" else d.train_path
        if not path:
            raise ConfigError(f"--split={split}: the reward run stores no data.{split}_path; choose another split")
        return {"split": split, **ranking_metrics(model, params, path, run.tokenizer, int(run.config.train.seq_len),
                                                  int(d.get("num_slots", 0)) or None)}
    stored = run.config
    if run.stage == "ppo":  # the policy's loss on its reference (SFT) run's demonstrations
        stored = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(run.config.train.init_from))
        if stored.get("stage") == "ppo":
            raise ConfigError(f"{run.workdir}: train.init_from is another PPO run; no demonstrations to score")
    return _lm_split_loss(stored, model, run.tokenizer, params, split, max_batches)


# --- sampling, KL and reward scores of answers -------------------------------------------------------------------

@dataclasses.dataclass
class Rollouts:
    """Sampled responses as full rows: left-padded prompt then right-padded response (T = P + N)."""

    tokens_BT: np.ndarray
    valid_BT: np.ndarray  # real tokens
    response_mask_BT: np.ndarray  # response tokens up to and including EOS
    finished_B: np.ndarray  # the response ended with EOS
    sampler_logprobs_BN: np.ndarray  # the sampler's log π of each response token (0 where masked)

    def response_ids(self, i: int) -> list[int]:
        return self.tokens_BT[i][self.response_mask_BT[i]].tolist()


def response_logprobs(params, tokens_BT, valid_BT, *, model: GPT, temperature: float = 1.0,
                      vocab_size: int | None = None):
    """log π(token_t | tokens_<t) for every column t (0 in column 0) under the distribution the sampler draws from:
    logits / temperature with ids >= ``vocab_size`` (the model's padded vocabulary) excluded. float32 (B, T).

    (stages/ppo/objective.sequence_logprobs normalises over the padded vocabulary too, which is fine for PPO's
    ratios but not for a KL between the sampled distributions.)
    """
    positions_BT, segment_ids_BT = rl.positions_and_segments(valid_BT)
    logits_BTV, _ = model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT, deterministic=True)
    logits_BTV = logits_BTV / temperature
    if vocab_size is not None:
        logits_BTV = jnp.where(jnp.arange(logits_BTV.shape[-1]) < vocab_size, logits_BTV, -jnp.inf)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(logp_BT, ((0, 0), (1, 0)))


class RolloutEngine:
    """Samples responses from a GPT policy and scores their log-probs; its jitted programs are built once."""

    def __init__(self, model: GPT, cfg: sampling.SamplingConfig, batch_size: int = 64):
        self.model, self.cfg, self.batch_size = model, cfg, batch_size
        self._sample = sampling.make_sampler(model, cfg)
        self._logprobs = jax.jit(functools.partial(response_logprobs, model=model,
                                                   temperature=cfg.temperature if cfg.temperature > 0 else 1.0,
                                                   vocab_size=cfg.vocab_size))

    def generate(self, params, prompts: Sequence[Sequence[int]], seed: int) -> Rollouts:
        """One response per prompt; prompts are left-padded to the longest, batches padded to ``batch_size``."""
        P, B = max(len(p) for p in prompts), self.batch_size
        parts = []
        for start in range(0, len(prompts), B):
            chunk = [list(p) for p in prompts[start:start + B]]
            n = len(chunk)
            chunk += [chunk[-1]] * (B - n)  # one compiled shape
            tokens_BP, valid_BP = sampling.left_pad(chunk, self.cfg.pad_id, length=P)
            key = jax.random.fold_in(jax.random.key(seed), start)
            out = jax.device_get(self._sample(params, tokens_BP, valid_BP, key))
            parts.append((np.concatenate([tokens_BP, np.asarray(out.tokens_BN)], 1)[:n],
                          np.concatenate([valid_BP, np.asarray(out.mask_BN)], 1)[:n],
                          np.concatenate([np.zeros_like(valid_BP), np.asarray(out.mask_BN)], 1)[:n],
                          np.asarray(out.finished_B)[:n], np.asarray(out.logprobs_BN)[:n]))
        return Rollouts(*(np.concatenate(xs) for xs in zip(*parts)))

    def sequence_logprobs(self, params, rollouts: Rollouts) -> np.ndarray:
        """Σ over each row's response tokens of log π(token | prefix), by a full forward pass. (B,)"""
        out, B = [], self.batch_size
        n = len(rollouts.tokens_BT)
        for start in range(0, n, B):
            t, v = rollouts.tokens_BT[start:start + B], rollouts.valid_BT[start:start + B]
            m = rollouts.response_mask_BT[start:start + B]
            k = len(t)
            if k < B:
                t, v, m = (np.concatenate([x, np.repeat(x[-1:], B - k, 0)]) for x in (t, v, m))
            logp_BT = np.asarray(self._logprobs(params, t, v))
            out.append(np.sum(np.where(m, logp_BT, 0.0), axis=1)[:k])
        return np.concatenate(out)

    def kl(self, params, ref_params, rollouts: Rollouts) -> np.ndarray:
        """Per-row Σ_t log π − log π_ref over the response: its mean estimates KL(π ‖ π_ref) in nats when the
        rollouts were sampled from π (with this engine's temperature)."""
        return self.sequence_logprobs(params, rollouts) - self.sequence_logprobs(ref_params, rollouts)


def render_prompts(texts: Sequence[str], tokenizer: Tokenizer, chat_format: bool) -> list[list[int]]:
    """Chat stages answer a user turn; a pretrained model continues raw text after an EOS (a fresh document)."""
    if chat_format:
        return [chat.render_prompt(chat.user_turn(t), tokenizer).tolist() for t in texts]
    return [[tokenizer.eos_id, *tokenizer.encode(t)] for t in texts]


def samples(model: GPT, params, tokenizer: Tokenizer, prompts: Sequence[str], *, chat_format: bool,
            temperature: float, max_new_tokens: int, seed: int) -> list[dict]:
    """One continuation per prompt (greedy at temperature 0)."""
    ids = render_prompts(prompts, tokenizer, chat_format)
    room = model.cfg.max_len - max(map(len, ids))
    if room < 1:
        raise ConfigError(f"--prompts: the longest prompt leaves no room in the context max_len={model.cfg.max_len}")
    cfg = sampling.SamplingConfig(max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    rollouts = RolloutEngine(model, cfg, batch_size=len(ids)).generate(params, ids, seed)
    return [{"prompt": p, "response": tokenizer.decode(rollouts.response_ids(i)),
             "finished": bool(rollouts.finished_B[i])} for i, p in enumerate(prompts)]


def read_answers(path: str) -> list[tuple[str, list[dict], str]]:
    """(where, prompt conversation, response) from JSONL lines {"prompt", "response"} or {"prompt", "responses"}."""
    out = []
    for where, record in post_training.iter_records(path):
        conversation = post_training.parse_prompt(where, record)
        if "response" in record:
            responses = [record["response"]]
        elif "responses" in record and isinstance(record["responses"], list):
            responses = record["responses"]
        else:
            raise DataFormatError(
                f"{where}: expected {{\"prompt\": ..., \"response\": str}} or {{\"prompt\": ..., \"responses\": "
                f"[str, ...]}} (present: {sorted(record)})")
        out += [(where, conversation, r) for r in responses]
    if not out:
        raise DataFormatError(f"{path}: no answers found")
    return out


def score_answers(model: ScoreModel, params, tokenizer: Tokenizer, path: str) -> list[dict]:
    """Reward of each (prompt, response) in ``path``, rendered as in reward-model training (prompt + answer + EOS)."""
    answers = read_answers(path)
    rows = [np.concatenate([chat.render_prompt(c, tokenizer, where=w), chat.render_response(r, tokenizer, where=w)])
            for w, c, r in answers]
    T = max(map(len, rows))
    if T > model.cfg.max_len:
        w = answers[int(np.argmax([len(r) for r in rows]))][0]
        raise ConfigError(f"{w}: prompt + response is {T} tokens > the reward model's context {model.cfg.max_len}")
    tokens = np.full((len(rows), T), tokenizer.pad_id, np.int32)
    valid = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], valid[i, :len(r)] = r, True
    scores = reward_scores(model, params, tokens, valid)
    return [{"where": w, "prompt": c[-1]["content"], "response": r, "score": float(s)}
            for (w, c, r), s in zip(answers, scores)]


def reward_bias(workdir: str, step: int) -> float | None:
    """The demonstration-centring shift fitted after RM training, if it was fitted on this step's params."""
    path = os.path.join(workdir, runners.REWARD_BIAS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return float(record["shift"]) if int(record.get("step", step)) == step else None


def policy_kl(run: Run, params, ref_params, prompts_path: str, *, num_prompts: int, seed: int) -> dict:
    """KL(π ‖ π_ref) estimated on responses sampled from π (the PPO sampling settings) to the first prompts."""
    prompts = post_training.prompt_examples(prompts_path, run.tokenizer, int(run.config.sampling.max_prompt_len))
    prompts = prompts[:num_prompts]
    temperature = float(run.config.ppo.temperature)
    cfg = sampling.SamplingConfig(max_new_tokens=int(run.config.sampling.max_new_tokens), temperature=temperature,
                                  eos_id=run.tokenizer.eos_id, pad_id=run.tokenizer.pad_id,
                                  vocab_size=run.tokenizer.vocab_size)
    engine = RolloutEngine(run.components[0].model, cfg, batch_size=min(64, len(prompts)))
    rollouts = engine.generate(params, [p.tolist() for p in prompts], seed)
    kl_B = engine.kl(params, ref_params, rollouts)
    lengths = rollouts.response_mask_BT.sum(1)
    return {"prompts": prompts_path, "num_samples": int(len(kl_B)), "temperature": temperature,
            "kl_mean": float(np.mean(kl_B)),
            "kl_stderr": float(np.std(kl_B, ddof=1) / math.sqrt(len(kl_B))) if len(kl_B) > 1 else float("nan"),
            "kl_per_token": float(np.sum(kl_B) / max(np.sum(lengths), 1)),
            "mean_response_length": float(np.mean(lengths)), "eos_rate": float(np.mean(rollouts.finished_B))}


# --- the whole analysis ------------------------------------------------------------------------------------------

DEFAULT_CHAT_PROMPTS = ("27 是不是質數？", "Is 27 a prime number?")


@dataclasses.dataclass
class Options:
    """What to compute beyond the parameter statistics (the binary's flags)."""

    step: int | None = None  # checkpoint step to analyse (default: the latest)
    compare: str = ""  # another run / checkpoint to compare with
    split: str = "eval"  # split for the loss: "eval" (held out) or "train"
    eval_batches: int | None = None  # LM batches to score (default: the run's train.eval_batches)
    prompts: Sequence[str] | None = None  # sample prompts; None: the run's train.sample_prompts or DEFAULT_CHAT_PROMPTS
    temperature: float = 0.0  # sampling temperature for the samples (0 = greedy)
    max_new_tokens: int = 64
    answers_file: str = ""  # JSONL answers for reward-model scores (reward runs)
    kl_prompts: str = ""  # JSONL prompts for the KL; "" = the PPO run's data.prompts_path
    kl_num_prompts: int = 64
    seed: int = 0


def _component_stats(component: Component, params, previous, prev_step) -> dict:
    leaves = layer_leaves(params)
    stats = {"counts": param_counts(leaves), "expected_counts": expected_counts(component.model),
             "weight_norms": module_norms(leaves)}
    if previous is not None:
        stats["update"] = {"from_step": prev_step, **difference(leaves, layer_leaves(previous))}
    return stats


def analyze(workdir: str, opts: Options = Options()) -> dict:
    """Every statistic of the run's checkpoint at ``opts.step``; JSON-able (see write_report for the layout)."""
    if opts.split not in SPLITS:
        raise ConfigError(f"--split={opts.split!r} is unknown; choose one of {list(SPLITS)} ('eval' = the held-out "
                          f"split)")
    run = open_run(workdir)
    step = run.steps[-1] if opts.step is None else opts.step
    run.step_dir(step)  # validates the step
    if opts.answers_file:
        read_answers(opts.answers_file)  # a bad file fails before any model work
    earlier = [s for s in run.steps if s < step]
    result: dict[str, Any] = {"workdir": run.workdir, "stage": run.stage, "step": step, "steps": run.steps,
                              "model": {c.name: {"class": type(c.model).__name__,
                                                 **{k: getattr(c.model.cfg, k) for k in (
                                                     "num_layers", "d_model", "num_heads", "vocab_size", "max_len")}}
                                        for c in run.components},
                              "components": {}}
    params = {}
    for c in run.components:
        params[c.name] = run.load(c, step)
        previous = run.load(c, earlier[-1]) if earlier else None
        result["components"][c.name] = _component_stats(c, params[c.name], previous, earlier[-1] if earlier else None)
    main = run.components[0]
    result["loss"] = split_loss(run, params[main.name], opts.split, opts.eval_batches)

    if run.stage in POLICY_STAGES:
        prompts = list(opts.prompts) if opts.prompts else (
            [p for p in run.config.train.get("sample_prompts", ()) if p] if run.stage == "pretrain" else [])
        prompts = prompts or list(DEFAULT_CHAT_PROMPTS)
        result["samples"] = samples(main.model, params[main.name], run.tokenizer, prompts,
                                    chat_format=run.stage != "pretrain", temperature=opts.temperature,
                                    max_new_tokens=opts.max_new_tokens, seed=opts.seed)
    if run.stage == "reward" and opts.answers_file:
        shift = reward_bias(run.workdir, step)
        scored_params = params[main.name] if shift is None else shift_reward_bias(params[main.name], shift)
        result["answer_scores"] = {"centred": shift is not None, "bias_shift": shift,
                                   "scores": score_answers(main.model, scored_params, run.tokenizer, opts.answers_file)}
    if run.stage == "ppo":
        ref_path, ref_params = load_reference_policy(run)
        prompts_path = opts.kl_prompts or run.config.data.prompts_path
        if not prompts_path:
            raise ConfigError("--kl_prompts: give a JSONL prompt file (the PPO run stores no data.prompts_path)")
        result["kl"] = {"reference": ref_path, **policy_kl(run, params[main.name], ref_params, prompts_path,
                                                           num_prompts=opts.kl_num_prompts, seed=opts.seed)}
    if opts.compare:
        result["compare"] = compare_with(run, params, opts.compare)
    result["last_metrics"] = last_metrics(run.workdir)
    return result


def compare_with(run: Run, params: Mapping[str, Any], other: str) -> dict:
    """Per-module relative difference between this checkpoint and ``other`` (a run, its checkpoints/ or a step
    dir). A PPO run is compared through its policy; the other side's matching network is found by its stage."""
    step_dir = str(ckpt_lib.resolve_checkpoint_dir(other, "--compare"))
    other_run = open_run(os.path.dirname(os.path.dirname(step_dir)), mesh=run.mesh)
    other_step = int(os.path.basename(step_dir))
    mine = run.components[0]
    theirs = other_run.components[0]
    diff = difference(layer_leaves(params[mine.name]), layer_leaves(other_run.load(theirs, other_step)))
    return {"other": other_run.workdir, "other_stage": other_run.stage, "other_step": other_step,
            "component": mine.name, **diff}


def last_metrics(workdir: str) -> dict:
    """The last training record and the last evaluation record of metrics.jsonl (empty if none)."""
    records = metrics_lib.read_metrics(workdir)
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    train = [r for r in records if any(k.startswith(("train/", "rollout/", "ppo/")) for k in r)]
    return {"train": train[-1] if train else {}, "eval": evals[-1] if evals else {}}


# --- report ----------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_table(values: Mapping[str, float]) -> tuple[list[str], dict[int, dict[str, float]]]:
    """Module types (columns) and {layer: {type: value}} for the modules inside layers."""
    rows: dict[int, dict[str, float]] = {}
    types: list[str] = []
    for module, v in values.items():
        i = layer_index(module)
        if i is None:
            continue
        t = module_type(module)
        if t not in types:
            types.append(t)
        rows.setdefault(i, {})[t] = v
    return types, dict(sorted(rows.items()))


def _plot_layers(values: Mapping[str, float], path: str, title: str, ylabel: str, log: bool = False) -> str | None:
    types, rows = _layer_table(values)
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    layers = list(rows)
    for t in types:
        ax.plot(layers, [rows[i].get(t, np.nan) for i in layers], marker="o", label=t)
    ax.set(xlabel="layer", ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_counts(counts: Mapping[str, int], path: str, title: str) -> str:
    plt = _pyplot()
    names = sorted(counts, key=lambda k: counts[k])
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(names) + 1.2))
    ax.barh(names, [counts[n] for n in names])
    ax.set(xlabel="parameters (all layers)", title=title)
    ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_layer_table(values: Mapping[str, float], fmt: str) -> list[str]:
    types, rows = _layer_table(values)
    if not rows:
        return []
    lines = ["| layer | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    lines += [f"| {i} | " + " | ".join(format(r[t], fmt) if t in r else "-" for t in types) + " |"
              for i, r in rows.items()]
    outside = {m: v for m, v in values.items() if layer_index(m) is None}
    if outside:
        lines += ["", "Outside the layers: " + ", ".join(f"{m} {format(v, fmt)}" for m, v in sorted(outside.items()))]
    return lines


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎")


def write_report(result: dict, out_dir: str) -> list[str]:
    """report.md, analysis.json and the PNGs in ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    L = [f"# Checkpoint analysis: `{result['workdir']}`", "",
         f"Stage **{result['stage']}**, step **{result['step']}** (finished checkpoints: {result['steps']}).", ""]
    for name, m in result["model"].items():
        L.append(f"- {name}: {m['class']}, {m['num_layers']} layers, d_model {m['d_model']}, {m['num_heads']} heads, "
                 f"vocab {m['vocab_size']}, context {m['max_len']}")
    for name, comp in result["components"].items():
        prefix = "" if name == "model" else f"{name}_"
        counts, expected = comp["counts"], comp["expected_counts"]
        L += ["", f"## Parameters ({name})", "",
              f"Total **{counts['total']:,}** in {counts['layers']} layers; model.count_params: total "
              f"{expected['total']:,} (embedding {expected['embedding']:,}, non-embedding "
              f"{expected['non_embedding']:,}).", "", "| module | parameters | share |", "|---|---|---|"]
        for t, n in sorted(counts["by_module_type"].items(), key=lambda kv: -kv[1]):
            L.append(f"| {t} | {n:,} | {n / counts['total']:.1%} |")
        path = _plot_counts(counts["by_module_type"], os.path.join(out_dir, f"{prefix}param_counts.png"),
                            f"parameters per module ({name})")
        written.append(path)
        L += ["", f"![parameters]({os.path.basename(path)})", "", f"## Weight norms per layer ({name})", "",
              "Frobenius norm of each module's parameters (weights and biases).", ""]
        L += _md_layer_table(comp["weight_norms"], ".4g")
        path = _plot_layers(comp["weight_norms"], os.path.join(out_dir, f"{prefix}weight_norms.png"),
                            f"weight norms ({name}, step {result['step']})", "‖θ‖")
        if path:
            written.append(path)
            L += ["", f"![weight norms]({os.path.basename(path)})"]
        L += ["", f"## Update norms per layer ({name})", ""]
        if "update" in comp:
            up = comp["update"]
            L += [f"‖θ_{result['step']} − θ_{up['from_step']}‖ / ‖θ_{up['from_step']}‖ per module "
                  f"(in all: {up['total']['relative']:.4g}, absolute {up['total']['diff']:.4g}).", ""]
            rel = {m: v["relative"] for m, v in up["modules"].items()}
            L += _md_layer_table(rel, ".3g")
            path = _plot_layers(rel, os.path.join(out_dir, f"{prefix}update_norms.png"),
                                f"relative update, step {up['from_step']} → {result['step']} ({name})",
                                "‖Δθ‖ / ‖θ‖", log=True)
            if path:
                written.append(path)
                L += ["", f"![update norms]({os.path.basename(path)})"]
        else:
            L.append(f"Only one checkpoint at or before step {result['step']} is kept, so there is no update to "
                     f"measure (keep more with train.keep_ckpts, or pass --compare).")
    loss = result["loss"]
    L += ["", f"## Loss on the {loss['split']} split", "", f"Data: `{loss['source']}`.", ""]
    if "pairwise_accuracy" in loss:
        L.append(f"Pairwise accuracy **{loss['pairwise_accuracy']:.4f}** over {loss['num_pairs']} ranked pairs of "
                 f"{loss['num_rankings']} rankings; K-wise ranking loss {loss['ranking_loss']:.4f}.")
    else:
        L.append(f"Token loss **{loss['loss']:.4f}** nats (perplexity {math.exp(min(loss['loss'], 50)):.3g}), "
                 f"accuracy {loss['accuracy']:.4f}, over {loss['num_tokens']:.0f} tokens in {loss['num_batches']} "
                 f"batch{'es' * (loss['num_batches'] != 1)}.")
    if "samples" in result:
        L += ["", "## Samples", "", "| prompt | response |", "|---|---|"]
        L += [f"| {_esc(s['prompt'])} | {_esc(s['response'])}{'' if s['finished'] else ' …'} |"
              for s in result["samples"]]
    if "answer_scores" in result:
        a = result["answer_scores"]
        note = (f"centred on the demonstrations (bias shift {a['bias_shift']:.4g} applied)" if a["centred"]
                else "raw (no demonstration-centring bias fitted for this step)")
        L += ["", "## Reward-model scores of the given answers", "", f"Scores are {note}.", "",
              "| prompt | response | reward |", "|---|---|---|"]
        L += [f"| {_esc(s['prompt'])} | {_esc(s['response'])} | {s['score']:.4f} |" for s in a["scores"]]
    if "kl" in result:
        k = result["kl"]
        L += ["", "## KL(policy ‖ reference)", "",
              f"Reference: `{k['reference']}`. Sampled {k['num_samples']} responses (temperature {k['temperature']}) "
              f"to prompts of `{k['prompts']}`: KL = **{k['kl_mean']:.4f} ± {k['kl_stderr']:.4f}** nats per response "
              f"({k['kl_per_token']:.4f} per token; mean length {k['mean_response_length']:.1f}, EOS rate "
              f"{k['eos_rate']:.2f}). √KL = {math.sqrt(max(k['kl_mean'], 0.0)):.3f}."]
    if "compare" in result:
        c = result["compare"]
        L += ["", "## Comparison with another checkpoint", "",
              f"`{c['other']}` ({c['other_stage']}, step {c['other_step']}): ‖θ − θ_other‖ / ‖θ_other‖ per "
              f"module of the {c['component']} (in all: **{c['total']['relative']:.4g}**).", ""]
        rel = {m: v["relative"] for m, v in c["modules"].items()}
        L += _md_layer_table(rel, ".3g")
        for key, label in (("only_in_first", "only in this checkpoint"), ("only_in_second", "only in the other"),
                           ("shape_differs", "shapes differ")):
            if c[key]:
                L.append(f"\nNot compared ({label}): {', '.join(c[key])}")
        path = _plot_layers(rel, os.path.join(out_dir, "compare.png"), "relative difference to the other checkpoint",
                            "‖θ − θ_other‖ / ‖θ_other‖", log=True)
        if path:
            written.append(path)
            L += ["", f"![comparison]({os.path.basename(path)})"]
    lm = result.get("last_metrics", {})
    for kind in ("train", "eval"):
        if lm.get(kind):
            L += ["", f"## Last {kind} record of metrics.jsonl (step {lm[kind].get('step')})", "", "| metric | value |",
                  "|---|---|"]
            L += [f"| {k} | {v:.5g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                  for k, v in sorted(lm[kind].items()) if k != "step"]
    report = os.path.join(out_dir, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(L) + "\n")
    data = os.path.join(out_dir, "analysis.json")
    with open(data, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False, default=float)
    return [report, data] + written
