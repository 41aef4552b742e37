"""What analysis reports of a policy trained away from a reference (``train.init_from``, the SFT run): PPO, GRPO,
RLOO, DPO and rejection sampling share it.

``split_loss``: the policy's loss on the reference run's own demonstrations. ``policy_kl``: KL(π ‖ π_ref) estimated
on responses sampled from π. ``report_kl``: the ``kl`` section of a report (``experiments.analyze``).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from gptjax import sampling
from gptjax.data import batches, post_training
from gptjax.errors import ConfigError
from gptjax.model import GPT
from gptjax.stages import common, registry
from gptjax.stages.rollouts import RolloutEngine


def split_loss(stored, model: GPT, tokenizer, params, split: str, max_batches: int | None) -> dict:
    """The policy's loss on the demonstrations of its reference run (``train.init_from``, SFT)."""
    path = stored.train.init_from
    reference = common.stored_config(path)
    stage = registry.stage_of(reference)
    if stage.batch is not batches.LM_BATCH or stage.split_loss is None:
        raise ConfigError(f"train.init_from={path!r} is a {stage.title} run; no demonstrations to score")
    return stage.split_loss(reference, model, tokenizer, params, split, max_batches)


def reference_policy(run) -> tuple[str, dict]:
    """(path, params) of the run's ``train.init_from`` as a policy of the run's own architecture."""
    path = run.config.train.get("init_from", "")
    if not path:
        raise ConfigError(f"{run.workdir}: train.init_from is empty, so the run has no reference policy")
    item_key = registry.policy_component(common.stored_config(path), run.tokenizer, path).item_key
    abstract = common.abstract_params_of(run.components[0].model, run.mesh)
    return path, common.load_full_params(path, abstract, "train.init_from", item_key)


def policy_kl(run, params, ref_params, prompts_path: str, *, num_prompts: int, seed: int, temperature: float,
              max_new_tokens: int, max_prompt_len: int) -> dict:
    """KL(π ‖ π_ref) estimated on responses sampled from π (at ``temperature``) to the first prompts."""
    prompts = post_training.prompt_examples(prompts_path, run.tokenizer, max_prompt_len)
    prompts = prompts[:num_prompts]
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
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


def report_kl(run, params: Mapping, opts, *, temperature: float, max_new_tokens: int, max_prompt_len: int) -> dict:
    """KL(policy ‖ reference = train.init_from) on ``opts.kl_prompts`` (default: the run's ``data.prompts_path``)."""
    ref_path, ref_params = reference_policy(run)
    prompts_path = opts.kl_prompts or run.config.data.get("prompts_path", "")
    if not prompts_path:
        raise ConfigError(f"--kl_prompts: give a JSONL prompt file (the {run.stage} run stores no "
                          f"data.prompts_path)")
    main = run.components[0]
    return {"kl": {"reference": ref_path, **policy_kl(run, params[main.name], ref_params, prompts_path,
                                                      num_prompts=opts.kl_num_prompts, seed=opts.seed,
                                                      temperature=temperature, max_new_tokens=max_new_tokens,
                                                      max_prompt_len=max_prompt_len)}}
