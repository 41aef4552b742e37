"""What the shared RL loop (``stages/online/loop.py``) needs to know of an RL algorithm: one ``Algorithm`` record.

The loop owns everything the algorithms share: drawing prompts, sampling ``samples_per_prompt`` responses to each
with the KV-cache sampler, the policy's and the frozen reference's log-probs of every sampled token (and the value
model's values when the algorithm has one), the reward (a reward model inside the jitted program, or a Python
function on the host: ``stages/online/rewards.py``), ``epochs`` passes of minibatch updates with AdamW, the KL
controller and checkpoints. An algorithm supplies the two pieces that differ:

* ``advantages(rollout, scores_B, kl_coef) -> (batch, metrics)``: from the scored rollout (fields of
  ``batches.SCORED_ROLLOUT``) to the batch its loss trains on (``batch``, a contract of ``gptjax.data.batches``)
  and the rollout metrics. The metrics must include ``score``, ``kl`` (mean per-episode Σ log π − log π_ref: what
  the KL controller tracks), ``reward``, ``response_length`` and ``eos_rate``.
* ``loss(policy_params, value_params, minibatch, rng) -> (loss, metrics)``: the loss of one minibatch (a slice of
  that batch; with ``ptx_coef > 0`` it also holds ``"ptx"``, an LM batch). Without a value model
  (``has_value=False``) ``value_params`` is None and only the policy is differentiated.

PPO (``stages/ppo``), GRPO (``stages/grpo.py``) and RLOO (``stages/rloo.py``) are the three records.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from gptjax.data import batches
from gptjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str  # the metrics' prefix ("ppo/clip_frac") and the log line's label
    rollout_batch_size: int  # episodes per iteration: rollout_batch_size / samples_per_prompt prompts
    minibatch_size: int  # episodes per gradient step
    epochs: int  # passes over each rollout batch
    samples_per_prompt: int  # responses sampled to each drawn prompt (PPO 1; GRPO's G, RLOO's k)
    temperature: float  # sampling temperature; log-probs are computed at the same temperature
    loss_chunk: int  # >0: vocabulary projections this many positions at a time
    ptx_coef: float  # >0: every minibatch also takes a pretraining LM batch (PPO-ptx)
    has_value: bool  # the algorithm trains a value model next to the policy
    kl_controller: Any  # rl.FixedKLController | rl.AdaptiveKLController (its state is checkpointed)
    advantages: Callable  # (rollout, scores_B, kl_coef) -> (batch, metrics)
    loss: Callable  # (policy_params, value_params | None, minibatch, rng) -> (loss, metrics)
    batch: batches.Contract  # the batch ``advantages`` makes and ``loss`` reads

    def __post_init__(self):
        section = self.name
        if self.samples_per_prompt < 1 or self.rollout_batch_size % self.samples_per_prompt:
            raise ConfigError(f"{section}: the rollout batch of {self.rollout_batch_size} episodes must be a "
                              f"multiple of the {self.samples_per_prompt} samples per prompt")
        if self.minibatch_size < 1 or self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(f"{section}.minibatch_size={self.minibatch_size} must divide the rollout batch of "
                              f"{self.rollout_batch_size} episodes")

    @property
    def num_minibatches(self) -> int:
        return self.rollout_batch_size // self.minibatch_size

    @property
    def prompts_per_iteration(self) -> int:
        return self.rollout_batch_size // self.samples_per_prompt
