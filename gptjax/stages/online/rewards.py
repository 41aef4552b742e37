"""Where an RL run's reward comes from: the config's ``reward`` section, shared by PPO, GRPO, RLOO and rejection
sampling.

    reward.source     "model": a learned reward model (the run at ``reward.model_from``), scored inside the
                      jitted rollout program; "function": a Python callable, scored on the host
    reward.model_from the reward-model run (its demonstration-centring bias applied), for source "model"
    reward.function   "module.path:callable" for source "function"

A reward function is ``(prompt_record: dict, answer: str) -> float``: ``prompt_record`` is the prompt's record of
the prompts JSONL (``{"prompt": ..., "meta": {...}}``, so a verifiable reward can read the ground truth from its
"meta"), ``answer`` the decoded response (special tokens dropped, whitespace stripped). It is what RL from
verifiable rewards uses for math: the seed world's gold labeler is one (``gptjax.seed_world.rewards:gold_reward``).

With a function the rollout is split in three: the jitted sampling and scoring passes, the host decode and call, and
the jitted advantages and update; with a reward model the whole rollout stays one jitted program.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence

import numpy as np

from gptjax.data import post_training
from gptjax.errors import ConfigError
from gptjax.model import ScoreModel
from gptjax.stages import common, reward, rollouts
from gptjax.tokenizers import Tokenizer

SOURCES = ("model", "function")


@dataclasses.dataclass
class ModelReward:
    """A reward model's score at each response's EOS."""

    model: ScoreModel
    params: Any
    path: str  # its run
    metric = "rm_score_raw"  # the rollout metric of the raw scores' mean

    def score(self, prompt_idx_B, rows: rollouts.Rollouts) -> np.ndarray:
        """Host-side scores (B,) of sampled rows (rejection sampling; RL scores them inside its program)."""
        del prompt_idx_B
        return reward.reward_scores(self.model, self.params, rows.tokens_BT, rows.valid_BT).astype(np.float32)


@dataclasses.dataclass
class FunctionReward:
    """A Python callable of (prompt record, answer text), called on the host for every sampled response."""

    fn: Callable[[dict, str], float]
    records: Sequence[dict]  # the prompts file's records, in the order of its prompts
    tokenizer: Tokenizer
    spec: str  # "module.path:callable"
    metric = "function_score_raw"

    def score(self, prompt_idx_B, rows: rollouts.Rollouts) -> np.ndarray:
        texts = rollouts.response_texts(self.tokenizer, rows.tokens_BT, rows.response_mask_BT)
        scores = np.empty(len(texts), np.float32)
        for b, (i, text) in enumerate(zip(np.asarray(prompt_idx_B).tolist(), texts)):
            value = self.fn(dict(self.records[i]), text)
            if not np.isfinite(value):
                raise ValueError(f"reward.function={self.spec}: returned {value!r} for prompt {i} and answer "
                                 f"{text[:80]!r}; a reward must be a finite number")
            scores[b] = value
        return scores


def load_function(spec: str, field: str = "reward.function") -> Callable:
    """The callable named by ``"module.path:callable"``; one ConfigError saying what is wrong otherwise."""
    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field}={spec!r}: give the reward function as 'module.path:callable' (e.g. "
                          f"'gptjax.seed_world.rewards:gold_reward')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field}={spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{field}={spec!r}: {module_name} has no callable {attr!r}")
    return fn


def settings(cfg, default_model_from: str = "",
             default_field: str = "reward.model_from") -> tuple[str, str, str, str]:
    """(source, reward-model run, the field that named the run, function spec) of the config's ``reward`` section
    (None fields: the defaults, "model" and ``default_model_from``, which messages call ``default_field``),
    checked."""
    section = cfg.get("reward") or {}
    source = section.get("source") or "model"
    model_from, field = ((section["model_from"], "reward.model_from") if section.get("model_from")
                         else (default_model_from, default_field))
    function = section.get("function") or ""
    if source not in SOURCES:
        raise ConfigError(f"reward.source={source!r} is unknown; valid choices: {list(SOURCES)}")
    if source == "model" and not model_from:
        raise ConfigError("reward.source='model' needs the reward-model run: set reward.model_from")
    if source == "function" and not function:
        raise ConfigError("reward.source='function' needs reward.function='module.path:callable'")
    return source, model_from, field, function


def reward_model_of(run_dir: str, tokenizer: Tokenizer, seq_len: int, field: str = "reward.model_from") -> ScoreModel:
    """The reward model's own architecture (it may differ from the policy's), as its run stored it; dropout off.
    ``field`` is how messages name ``run_dir``."""
    model_cfg, _ = common.resolve_from_init(common.stored_config(run_dir, field))
    return ScoreModel(common.no_dropout(common.build_model_config(model_cfg, tokenizer, seq_len)))


def build(cfg, tokenizer: Tokenizer, mesh, seq_len: int, *, prompts_path: str,
          default_model_from: str = "", default_field: str = "reward.model_from") -> ModelReward | FunctionReward:
    """The reward source the config names: the reward model loaded onto ``mesh`` (centred), or the function with
    the prompt records of ``prompts_path``."""
    source, model_from, field, function = settings(cfg, default_model_from, default_field)
    if source == "function":
        records = [dict(r) for _, r in post_training.iter_records(prompts_path)]
        return FunctionReward(load_function(function), records, tokenizer, function)
    model = reward_model_of(model_from, tokenizer, seq_len, field)
    params = reward.load_reward_params(model_from, common.abstract_params_of(model, mesh), field)
    return ModelReward(model, params, model_from)
