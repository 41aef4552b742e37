"""PPO(-ptx) config: ``--config=configs/ppo.py --config.train.init_from=SFT_RUN --config.ppo_init.reward_from=RM_RUN
--config.data.prompts_path=prompts.jsonl``.

Policy and frozen reference from the SFT run, frozen reward model and the value model's initial weights from
the RM run (gptjax/stages/ppo/, on the shared RL loop of gptjax/stages/online/). ``train.steps`` counts PPO iterations (each: one rollout batch, then
``ppo.ppo_epochs`` passes of minibatch updates). PPO fields are documented in gptjax/stages/ppo/objective.py
(PPOConfig).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from gptjax.data.pipeline import default_data_config
from gptjax.stages.ppo.objective import PPOConfig


def ppo_section() -> ml_collections.ConfigDict:
    """Every PPOConfig field with its default (documented on the dataclass)."""
    return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(PPOConfig)})


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.stage = "ppo"
    c.model = common.model_config("from_init")
    c.tokenizer = common.tokenizer_config("from_init")
    c.ppo_init = ml_collections.ConfigDict()
    c.ppo_init.reward_from = ""  # the reward-model run (its workdir); also the value model's initial weights
    # The reward (gptjax/stages/online/rewards.py); None = the defaults: source "model", the RM of
    # ppo_init.reward_from. reward.source="function" with reward.function="module.path:callable" scores answers with
    # a Python function instead (e.g. gptjax.seed_world.rewards:gold_reward); the value model still starts from the RM.
    c.reward = common.reward_config(source=None, model_from=None, function=None)
    c.data = ml_collections.ConfigDict()
    c.data.prompts_path = ""  # prompts, JSONL: {"prompt": str | [messages ending with a user turn]}
    c.ppo = ppo_section()
    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_prompt_len = 128  # prompts are left-padded to the longest; longer ones are an error
    c.sampling.max_new_tokens = 64  # response budget; responses without EOS get ppo.no_eos_penalty
    c.sampling.top_k = 0  # 0 = off (RLHF samples the policy as a distribution: temperature ppo.temperature)
    c.sampling.top_p = 1.0
    # SamplingConfig.decode_segments: rollouts decode in this many loops, each attending over only the cache prefix
    # it can have filled (less memory traffic for long responses; each loop adds compile time).
    c.sampling.decode_segments = 1
    c.ptx = default_data_config()  # pretraining data for PPO-ptx (used when ppo.ptx_coef > 0)
    c.ptx_seq_len = 128  # sequence length of the PPO-ptx pretraining batches
    c.optim = common.optim_config()
    c.optim.lr = 1e-5
    c.optim.eps = 1e-5  # Huang et al. 2024
    c.optim.weight_decay = 0.0
    c.train = common.train_config()
    c.train.steps = 100
    c.train.log_every = 1
    c.train.eval_every = 25
    c.train.ckpt_every = 25
    c.mesh = common.mesh_config()
    return c
