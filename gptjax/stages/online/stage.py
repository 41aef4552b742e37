"""What the online RL stages (PPO, GRPO, RLOO) build from a config the same way: the policy and its frozen
reference from ``train.init_from`` (the SFT run), the prompts, the reward source, the PPO-ptx data; and the hooks a
policy-only RL checkpoint shares (its networks, its report).

Config sections they share: ``data.prompts_path`` (prompts JSONL), ``sampling`` (``max_prompt_len``,
``max_new_tokens``, ``top_k``, ``top_p``, ``decode_segments``), ``reward`` (``stages/online/rewards.py``), and
``optim``, ``train`` (``train.steps`` counts iterations), ``mesh``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gptjax import sharding
from gptjax.data import post_training
from gptjax.data.pipeline import make_lm_iterator
from gptjax.errors import ConfigError
from gptjax.model import GPT
from gptjax.stages import common, reference, registry
from gptjax.stages.online import rewards
from gptjax.tokenizers import Tokenizer


def prompt_len(stored) -> int:
    """The policy's model config is checked against the longest prompt (``sampling.max_prompt_len``)."""
    return int(stored.sampling.max_prompt_len)


@dataclasses.dataclass
class Setup:
    """The pieces every online RL run starts from."""

    cfg: Any  # the config with the init_from model and tokenizer filled in (what the workdir stores)
    tokenizer: Tokenizer
    policy_model: GPT  # dropout off
    mesh: Any
    policy_params: dict  # the SFT policy: the initial policy and the frozen reference
    prompts: list  # token arrays, rendered chat prompts ending with the assistant role token
    reward: rewards.ModelReward | rewards.FunctionReward
    ptx_iter: Any  # LM batches of the minibatch size, or None


def setup(cfg, title: str, *, default_reward_from: str = "", default_reward_field: str = "reward.model_from",
          ptx_rows: int = 0) -> Setup:
    """Builds and loads what the config names; ``ptx_rows`` > 0 opens the PPO-ptx pretraining data (``cfg.ptx``).
    ``default_reward_from``: the reward-model run when ``reward.model_from`` is unset (messages name it
    ``default_reward_field``)."""
    if not cfg.train.init_from:
        raise ConfigError(f"{title} needs train.init_from (the SFT run: the initial policy and the reference)")
    rewards.settings(cfg, default_reward_from)  # a bad reward section fails before anything is loaded
    cfg = common.resolved_config(cfg)
    t = cfg.train
    tokenizer = common.build_tokenizer(cfg.tokenizer)
    gpt_cfg = common.build_model_config(cfg.model, tokenizer, prompt_len(cfg))
    policy_model = GPT(common.no_dropout(gpt_cfg))  # dropout off in RL
    # The cheap checks first: prompts and lengths before any parameters are read.
    if not cfg.data.prompts_path:
        raise ConfigError(f"data.prompts_path: give the {title} prompts (JSONL, one {{\"prompt\": ...}} per line)")
    prompts = post_training.prompt_examples(cfg.data.prompts_path, tokenizer, prompt_len(cfg))
    if prompt_len(cfg) + int(cfg.sampling.max_new_tokens) > gpt_cfg.max_len:
        raise ConfigError(f"sampling.max_prompt_len + sampling.max_new_tokens = "
                          f"{prompt_len(cfg) + int(cfg.sampling.max_new_tokens)} exceeds the "
                          f"context model.max_len={gpt_cfg.max_len}")
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    policy_params = common.load_full_params(t.init_from, common.abstract_params_of(policy_model, mesh),
                                            "train.init_from")
    reward = rewards.build(cfg, tokenizer, mesh, prompt_len(cfg), prompts_path=cfg.data.prompts_path,
                           default_model_from=default_reward_from, default_field=default_reward_field)
    ptx_iter = None
    if ptx_rows:
        ptx_iter = make_lm_iterator(cfg.ptx, tokenizer, split="train", global_batch_size=ptx_rows,
                                    seq_len=int(cfg.ptx_seq_len), seed=int(t.seed))
    return Setup(cfg, tokenizer, policy_model, mesh, policy_params, prompts, reward, ptx_iter)


def policy_components(stored, tokenizer) -> list[registry.Component]:
    """A critic-free RL checkpoint (``RLState``) holds the policy, under ``policy_params``."""
    model_cfg, _ = common.resolve_from_init(stored)
    policy_cfg = common.no_dropout(common.build_model_config(model_cfg, tokenizer, prompt_len(stored)))
    return [registry.Component("policy", GPT(policy_cfg), "policy_params", "policy")]


def make_report(section: str):
    """The ``report`` hook of an RL stage whose sampling temperature is ``<section>.temperature``: KL(policy ‖
    reference) on responses sampled as in training."""

    def report(run, params, step: int, opts) -> dict:
        del step
        return reference.report_kl(run, params, opts, temperature=float(run.config[section].temperature),
                                   max_new_tokens=int(run.config.sampling.max_new_tokens),
                                   max_prompt_len=prompt_len(run.config))

    return report
