"""Small pure functions of the RLHF stages: padded-sequence layout, per-token log-probs and values of full rows, GAE,
whitening, KL controllers, per-token rewards (PPO) and sequence rewards (GRPO, RLOO).

Conventions (shared with the RL objectives, ``stages/reward.py`` and ``stages/dpo.py``):

* A rollout row is prompt + response in one (B, T) array. Prompts may be left-padded and responses right-padded
  after EOS; ``valid_BT`` marks real tokens, ``mask_BT`` marks response (action) tokens, EOS included.
* Per-token RL quantities are aligned with the *token* they concern: ``logprobs_BT[:, t]`` is
  log π(token_t | tokens_<t), ``values_BT[:, t]`` is the value of the state just before token t is chosen, and
  ``rewards_BT[:, t]`` is the reward for choosing it. Column t of every array is about the same action.
* Each row's response is one contiguous run of ``mask_BT``; after its last token the episode ends (no bootstrap).

Everything here is jit-friendly: no Python control flow on array values, state as pytrees.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from gptjax.errors import ConfigError
from gptjax.model import GPT, ScoreModel, last_valid_index
from gptjax.stages.pretrain import token_stats_of

Array = jax.Array


# --- Padded-sequence layout ---------------------------------------------------------------------------------------

def positions_and_segments(valid_BT) -> tuple[Array, Array]:
    """Positions counted from each row's first real token, and segment ids that keep padding out of attention.

    With these, a left-padded row computes exactly what its unpadded version does (positions start at 0 on the
    first real token, and real tokens never attend to padding), so rewards and log-probs do not depend on the
    padding side. The KV-cache sampler must use the same convention for rollouts.
    """
    valid_BT = valid_BT.astype(bool)
    positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0).astype(jnp.int32)
    return positions_BT, valid_BT.astype(jnp.int32)


# --- Per-token quantities of full rows ----------------------------------------------------------------------------

def _align_to_tokens(x_BT):
    """Move a quantity computed at position t−1 (about token t) to column t; column 0 (no prediction) is 0."""
    return jnp.pad(x_BT[:, :-1], ((0, 0), (1, 0)))


def sequence_logprobs(params, tokens_BT, valid_BT, *, model: GPT, temperature: float = 1.0, loss_chunk: int = 0,
                      with_entropy: bool = False) -> tuple[Array, Array | None]:
    """log π(token_t | tokens_<t) for every column t (0 in column 0), and optionally the entropy of that
    next-token distribution; both float32 (B, T). Mask with the response mask to keep actions only."""
    positions_BT, segment_ids_BT = positions_and_segments(valid_BT)
    next_tokens_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))  # the last position predicts nothing we keep
    stats = token_stats_of(params, tokens_BT, next_tokens_BT, model=model, positions_BT=positions_BT,
                           segment_ids_BT=segment_ids_BT, deterministic=True, loss_chunk=loss_chunk,
                           temperature=temperature, with_entropy=with_entropy)
    entropy_BT = _align_to_tokens(stats.entropy_BT) if with_entropy else None
    return _align_to_tokens(stats.logprob_BT), entropy_BT


def sequence_values(params, tokens_BT, valid_BT, *, model: ScoreModel) -> Array:
    """V(state before token t) for every column t: the value head's output at position t−1. float32 (B, T)."""
    positions_BT, segment_ids_BT = positions_and_segments(valid_BT)
    scores_BT = model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT, deterministic=True)
    return _align_to_tokens(scores_BT)


# --- Advantages ---------------------------------------------------------------------------------------------------

def gae(rewards_BT, values_BT, mask_BT, gamma: float, lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016) over the masked tokens of each row.

    δ_t = r_t + γ·V_{t+1}·[t+1 is a response token] − V_t and A_t = δ_t + γλ·A_{t+1}, computed by a reverse
    ``lax.scan``. The episode ends after the row's last response token: the bootstrap value there is 0.
    Returns (advantages_BT, returns_BT = advantages + values), both 0 outside ``mask_BT``.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    rewards_BT = rewards_BT.astype(jnp.float32) * mask_BT
    values_BT = values_BT.astype(jnp.float32) * mask_BT
    next_values_BT = jnp.pad(values_BT[:, 1:], ((0, 0), (0, 1)))
    next_mask_BT = jnp.pad(mask_BT[:, 1:], ((0, 0), (0, 1)))
    deltas_BT = rewards_BT + gamma * next_mask_BT * next_values_BT - values_BT

    def step(next_advantage_B, xs):
        delta_B, next_mask_B = xs
        advantage_B = delta_B + gamma * lam * next_mask_B * next_advantage_B
        return advantage_B, advantage_B

    _, advantages_TB = jax.lax.scan(step, jnp.zeros(rewards_BT.shape[0], jnp.float32),
                                    (deltas_BT.T, next_mask_BT.T), reverse=True)
    advantages_BT = advantages_TB.T * mask_BT
    return advantages_BT, (advantages_BT + values_BT) * mask_BT


def masked_mean(x, mask, axis=None):
    """Mean of ``x`` over entries where ``mask`` is set (0 when none is)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x, mask):
    """Population variance of ``x`` over the masked entries."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """Normalise the masked entries of ``x`` to unit variance (and zero mean if ``shift_mean``).

    ``shift_mean=False`` keeps the mean (used for rewards, whose sign carries meaning). Unmasked entries are 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.astype(whitened.dtype)


# --- KL controllers (Ziegler et al. 2019) -------------------------------------------------------------------------

@flax.struct.dataclass
class KLControllerState:
    """The controller's only state: the current KL coefficient β (checkpointed with the policy)."""

    kl_coef: Array  # float32 scalar


@dataclasses.dataclass(frozen=True)
class FixedKLController:
    """β stays at its initial value."""

    init_kl_coef: float = 0.05

    def init(self) -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(self.init_kl_coef, jnp.float32))

    def update(self, state: KLControllerState, current_kl, n_steps) -> KLControllerState:
        del current_kl, n_steps
        return state


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """Proportional control of β towards a target KL (Ziegler et al. 2019, §2.2).

    e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n_steps / horizon), where ``current_kl`` is the mean
    per-episode KL (summed over tokens) of the last batch and ``n_steps`` the number of episodes in it.
    The paper's values: β₀ 0.15, target 6 nats, horizon 10,000.
    """

    init_kl_coef: float = 0.15
    target: float = 6.0
    horizon: float = 10000.0

    def __post_init__(self):
        if self.target <= 0 or self.horizon <= 0:
            raise ConfigError(f"adaptive KL controller: ppo.kl_target={self.target} and "
                              f"ppo.kl_horizon={self.horizon} must both be positive")

    def init(self) -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(self.init_kl_coef, jnp.float32))

    def update(self, state: KLControllerState, current_kl, n_steps) -> KLControllerState:
        error = jnp.clip(current_kl / self.target - 1.0, -0.2, 0.2)
        return KLControllerState(kl_coef=state.kl_coef * (1.0 + error * n_steps / self.horizon))


KL_CONTROLLERS = ("fixed", "adaptive")


def make_kl_controller(kind: str, init_kl_coef: float, target: float = 6.0, horizon: float = 10000.0):
    """``kind`` is "fixed" or "adaptive" (``target``/``horizon`` only matter for the adaptive one)."""
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(init_kl_coef, target, horizon)
    raise ConfigError(f"ppo.kl_controller={kind!r} is unknown; valid choices: {list(KL_CONTROLLERS)}")


# --- Rewards ------------------------------------------------------------------------------------------------------

def per_token_rewards(score_B, logprobs_BT, ref_logprobs_BT, mask_BT, kl_coef, no_eos_penalty, finished_B):
    """The RLHF reward of each response token: −β·(log π − log π_ref), plus the sequence score at the last token.

    ``score_B`` is the reward model's score read at EOS. Following Huang et al. (2024, "The N+ implementation
    details of RLHF with PPO"), a response that did not finish (``finished_B`` False: no EOS within the length
    budget) gets its score *replaced* by the fixed ``no_eos_penalty`` (e.g. −1): the RM never saw truncated
    responses, so its score on them is meaningless, and replacing it makes running out of length never pay.
    ``no_eos_penalty=None`` keeps the RM score. The score lands on the row's last response token (EOS when it
    finished), wherever padding puts it.

    Returns (rewards_BT, kl_BT), both 0 outside ``mask_BT``; kl_BT is the per-token log-ratio estimate.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    kl_BT = (logprobs_BT - ref_logprobs_BT).astype(jnp.float32) * mask_BT
    score_B = score_B.astype(jnp.float32)
    if no_eos_penalty is not None:
        score_B = jnp.where(finished_B, score_B, jnp.float32(no_eos_penalty))
    last_B = last_valid_index(mask_BT > 0)
    has_response_B = jnp.any(mask_BT > 0, axis=1)
    at_last_BT = jax.nn.one_hot(last_B, mask_BT.shape[1], dtype=jnp.float32) * has_response_B[:, None]
    rewards_BT = -kl_coef * kl_BT + score_B[:, None] * at_last_BT
    return rewards_BT, kl_BT


# --- Sequence-level rewards (critic-free RL: GRPO, RLOO) -----------------------------------------------------------

def sequence_rewards(scores_B, logprobs_BT, ref_logprobs_BT, mask_BT, finished_B, kl_coef, *, no_eos_penalty,
                     score_clip: float = 0.0) -> tuple[Array, Array, Array]:
    """(reward, score, kl) per response: the score clipped to ±``score_clip`` (0: off) and replaced by
    ``no_eos_penalty`` where the response has no EOS (None: kept, as in ``per_token_rewards``); kl = Σ over the
    response of log π − log π_ref (the sampling policy's log-probs); reward = score − kl_coef · kl."""
    scores_B = scores_B.astype(jnp.float32)
    if score_clip:
        scores_B = jnp.clip(scores_B, -score_clip, score_clip)
    if no_eos_penalty is not None:
        scores_B = jnp.where(finished_B, scores_B, jnp.float32(no_eos_penalty))
    kl_B = jnp.sum((logprobs_BT - ref_logprobs_BT).astype(jnp.float32) * mask_BT.astype(jnp.float32), axis=1)
    return scores_B - kl_coef * kl_B, scores_B, kl_B


def group_rollout_metrics(rewards_B, scores_B, kl_B, mask_BT, finished_B, group_size: int) -> dict[str, Array]:
    """The rollout metrics of a batch of groups (``group_size`` consecutive rows answer one prompt): ``score``,
    ``kl``, ``reward`` (per response), ``response_length``, ``eos_rate``, ``group_reward_std`` and
    ``zero_std_groups`` (the share of groups whose rewards are all equal: they carry no learning signal)."""
    r_NG = rewards_B.reshape(-1, group_size)
    return {"score": jnp.mean(scores_B), "kl": jnp.mean(kl_B), "reward": jnp.mean(rewards_B),
            "response_length": jnp.mean(jnp.sum(mask_BT.astype(jnp.float32), axis=1)),
            "eos_rate": jnp.mean(finished_B.astype(jnp.float32)),
            "group_reward_std": jnp.mean(jnp.std(r_NG, axis=1)),
            "zero_std_groups": jnp.mean((jnp.max(r_NG, axis=1) == jnp.min(r_NG, axis=1)).astype(jnp.float32))}


def policy_batch(rollout, advantages_B) -> dict:
    """The critic-free rollout batch (``batches.POLICY_ROLLOUT_BATCH``) of a sampled rollout: each response's
    sequence advantage on every one of its tokens."""
    mask_BT = rollout["response_mask"].astype(jnp.float32)
    return {"tokens": rollout["tokens"], "valid": rollout["valid"], "response_mask": rollout["response_mask"],
            "old_logprobs": rollout["old_logprobs"], "ref_logprobs": rollout["ref_logprobs"],
            "advantages": advantages_B.astype(jnp.float32)[:, None] * mask_BT}
