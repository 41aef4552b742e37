"""The PPO stage: its runner (models and data from the SFT and reward-model runs), what its checkpoints hold, and
what analysis reports of it; registered as "ppo".

Policy and frozen reference from ``train.init_from`` (the SFT run), the frozen reward model and the value model's
initial weights from ``ppo_init.reward_from`` (the reward-model run, with its own architecture); rollouts and
updates in ``stages/ppo/loop.py``.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Mapping

import numpy as np

from gptjax import sampling, sharding
from gptjax.data import batches, post_training
from gptjax.data.pipeline import make_lm_iterator
from gptjax.errors import ConfigError
from gptjax.model import GPT, ScoreModel
from gptjax.stages import common, registry
from gptjax.stages.ppo import bench as ppo_bench
from gptjax.stages.ppo import loop as ppo_loop
from gptjax.stages.ppo import plan as ppo_plan
from gptjax.stages.reward import load_reward_params
from gptjax.stages.rollouts import RolloutEngine


def prompt_len(stored) -> int:
    """The policy's model config is checked against the longest prompt (``sampling.max_prompt_len``)."""
    return int(stored.sampling.max_prompt_len)


def _reward_model(reward_from: str, tokenizer, seq_len: int) -> ScoreModel:
    """The reward model's own architecture (it may differ from the policy's), as its run stored it; dropout off."""
    model_cfg, _ = common.resolve_from_init(common.stored_config(reward_from, "ppo_init.reward_from"))
    return ScoreModel(common.no_dropout(common.build_model_config(model_cfg, tokenizer, seq_len)))


def run(cfg, workdir: str, eval_fn: Callable | None = None) -> ppo_loop.PPOResult:
    """PPO(-ptx): policy and reference from ``train.init_from`` (SFT), reward and value from ``ppo_init.reward_from``.

    ``eval_fn(policy_params, step) -> {name: value}`` adds evaluation metrics (``train.eval_every``)."""
    t = cfg.train
    if not t.init_from or not cfg.ppo_init.reward_from:
        raise ConfigError("PPO needs train.init_from (the SFT run) and ppo_init.reward_from (the reward-model run)")
    cfg = common.resolved_config(cfg)
    tokenizer = common.build_tokenizer(cfg.tokenizer)
    gpt_cfg = common.build_model_config(cfg.model, tokenizer, prompt_len(cfg))
    policy_model = GPT(common.no_dropout(gpt_cfg))  # dropout off in RL
    # The cheap checks first: prompts and lengths before any parameters are read.
    if not cfg.data.prompts_path:
        raise ConfigError("data.prompts_path: give the PPO prompts (JSONL, one {\"prompt\": ...} per line)")
    prompts = post_training.prompt_examples(cfg.data.prompts_path, tokenizer, prompt_len(cfg))
    if prompt_len(cfg) + int(cfg.sampling.max_new_tokens) > gpt_cfg.max_len:
        raise ConfigError(f"sampling.max_prompt_len + sampling.max_new_tokens = "
                          f"{prompt_len(cfg) + int(cfg.sampling.max_new_tokens)} exceeds the "
                          f"context model.max_len={gpt_cfg.max_len}")
    reward_model = _reward_model(cfg.ppo_init.reward_from, tokenizer, prompt_len(cfg))
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    policy_params = common.load_full_params(t.init_from, common.abstract_params_of(policy_model, mesh),
                                            "train.init_from")
    reward_abstract = common.abstract_params_of(reward_model, mesh)
    reward_params = load_reward_params(cfg.ppo_init.reward_from, reward_abstract, "ppo_init.reward_from")
    value_params = common.load_full_params(cfg.ppo_init.reward_from, reward_abstract, "ppo_init.reward_from")
    ptx_iter = None
    if cfg.ppo.ptx_coef > 0:
        ptx_iter = make_lm_iterator(cfg.ptx, tokenizer, split="train", global_batch_size=int(cfg.ppo.minibatch_size),
                                    seq_len=int(cfg.ptx_seq_len), seed=int(t.seed))
    return ppo_loop.run_ppo(cfg, workdir, policy_model=policy_model, value_model=reward_model,
                            reward_model=reward_model, policy_params=policy_params, value_params=value_params,
                            reward_params=reward_params, prompts=prompts, pad_id=tokenizer.pad_id,
                            eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size, ptx_iter=ptx_iter,
                            eval_fn=eval_fn, mesh=mesh)


def components(stored, tokenizer) -> list[registry.Component]:
    """A PPOState holds the policy and the value model; the value model has the reward model's architecture (it
    starts from it), or the policy's when that run is gone."""
    model_cfg, _ = common.resolve_from_init(stored)
    policy_cfg = common.no_dropout(common.build_model_config(model_cfg, tokenizer, prompt_len(stored)))
    path = stored.ppo_init.reward_from
    value_model = (_reward_model(path, tokenizer, prompt_len(stored)) if path and os.path.exists(path)
                   else ScoreModel(policy_cfg))
    return [registry.Component("policy", GPT(policy_cfg), "policy_params", "policy"),
            registry.Component("value", value_model, "value_params", "value")]


def split_loss(stored, model: GPT, tokenizer, params, split: str, max_batches: int | None) -> dict:
    """The policy's loss on the demonstrations of its reference run (``train.init_from``, SFT)."""
    path = stored.train.init_from
    reference = common.stored_config(path)
    stage = registry.stage_of(reference)
    if stage.batch is not batches.LM_BATCH or stage.split_loss is None:
        raise ConfigError(f"train.init_from={path!r} is a {stage.title} run; no demonstrations to score")
    return stage.split_loss(reference, model, tokenizer, params, split, max_batches)


def _reference_policy(run) -> tuple[str, dict]:
    """(path, params) of the run's ``train.init_from`` as a policy of the run's own architecture."""
    path = run.config.train.get("init_from", "")
    if not path:
        raise ConfigError(f"{run.workdir}: train.init_from is empty, so the run has no reference policy")
    item_key = registry.policy_component(common.stored_config(path), run.tokenizer, path).item_key
    abstract = common.abstract_params_of(run.components[0].model, run.mesh)
    return path, common.load_full_params(path, abstract, "train.init_from", item_key)


def policy_kl(run, params, ref_params, prompts_path: str, *, num_prompts: int, seed: int) -> dict:
    """KL(π ‖ π_ref) estimated on responses sampled from π (the PPO sampling settings) to the first prompts."""
    prompts = post_training.prompt_examples(prompts_path, run.tokenizer, prompt_len(run.config))
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


def report(run, params: Mapping, step: int, opts) -> dict:
    """KL(policy ‖ reference = train.init_from) on ``opts.kl_prompts`` (default: the run's own prompts)."""
    del step
    ref_path, ref_params = _reference_policy(run)
    prompts_path = opts.kl_prompts or run.config.data.prompts_path
    if not prompts_path:
        raise ConfigError("--kl_prompts: give a JSONL prompt file (the PPO run stores no data.prompts_path)")
    main = run.components[0]
    return {"kl": {"reference": ref_path, **policy_kl(run, params[main.name], ref_params, prompts_path,
                                                      num_prompts=opts.kl_num_prompts, seed=opts.seed)}}


STAGE = registry.register(registry.Stage(
    name="ppo", title="PPO", run=run, components=components, split_loss=split_loss, report=report,
    bench=ppo_bench.bench, plan=ppo_plan.plan))
