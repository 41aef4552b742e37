"""Stage 2 objective: the K-wise reward-model loss of InstructGPT (Ouyang et al. 2022, §3.5 eq. 1).

A batch element is one prompt with K responses ranked best → worst (``gptjax.data.batches.RANKING_BATCH``:
``tokens``/``valid`` (B, K, T), ``num_ranked`` (B,)). All C(n, 2) pairs of an element's n ranked responses enter
its loss together:

    loss(x) = −1/C(n, 2) · Σ_{i<j<n} log σ(r(x, y_i) − r(x, y_j))

and the batch loss is the mean over elements, so every prompt weighs the same however many pairs it has. The
K responses take K forward passes (one batched call over B·K rows), not C(K, 2). The scalar reward is read at
each response's last valid (EOS) token by ``ScoreModel.reward``.

After training, ``fit_reward_bias`` shifts the score head's bias so the SFT demonstrations score mean 0, as
InstructGPT does before RL (the PPO reward then starts centred).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.data import batches
from gptjax.model import ScoreModel
from gptjax.stages.rl import positions_and_segments

Array = jax.Array

def _ranked_pairs_BKK(num_ranked_B, K: int) -> Array:
    """pairs[b, i, j]: response i is ranked above response j and both are among the first num_ranked[b]."""
    i_K1, j_1K = jnp.arange(K)[:, None], jnp.arange(K)[None, :]
    return (i_K1 < j_1K)[None] & (j_1K[None] < num_ranked_B[:, None, None])


def ranking_loss(scores_BK, num_ranked_B) -> Array:
    """Mean over the batch of each element's mean −log σ(s_i − s_j) over its ranked pairs i above j."""
    K = scores_BK.shape[1]
    if K < 2:
        raise ValueError(f"ranking_loss: need K >= 2 responses per prompt, got scores of shape {scores_BK.shape}")
    pairs_BKK = _ranked_pairs_BKK(num_ranked_B, K)
    margins_BKK = scores_BK[:, :, None] - scores_BK[:, None, :]
    n_B = num_ranked_B.astype(jnp.float32)
    num_pairs_B = jnp.maximum(n_B * (n_B - 1) / 2, 1.0)
    per_element_B = -jnp.sum(jnp.where(pairs_BKK, jax.nn.log_sigmoid(margins_BKK), 0.0), axis=(1, 2)) / num_pairs_B
    return jnp.mean(per_element_B)


def pairwise_accuracy(scores_BK, num_ranked_B) -> Array:
    """Fraction of all ranked pairs in the batch whose better response scores strictly higher."""
    pairs_BKK = _ranked_pairs_BKK(num_ranked_B, scores_BK.shape[1])
    correct_BKK = scores_BK[:, :, None] > scores_BK[:, None, :]
    return jnp.sum(pairs_BKK & correct_BKK) / jnp.maximum(jnp.sum(pairs_BKK), 1)


def sequence_rewards(params, tokens_BT, valid_BT, *, model: ScoreModel, rng=None,
                     deterministic: bool = True) -> Array:
    """Reward of each row (B,), read at its last valid token; padding side does not matter."""
    positions_BT, segment_ids_BT = positions_and_segments(valid_BT)
    rngs = None if deterministic or rng is None else {"dropout": rng}
    return model.apply({"params": params}, tokens_BT, valid_BT, positions_BT, segment_ids_BT,
                       deterministic=deterministic, rngs=rngs, method=ScoreModel.reward)


def reward_loss(params, batch, rng, *, model: ScoreModel,
                deterministic: bool = False) -> tuple[Array, dict[str, Array]]:
    """K-wise ranking loss of a ranking batch, and metrics.

    Metrics: ``loss``, ``accuracy`` (pairwise, over all ranked pairs), ``reward_mean``/``reward_std`` (over the
    ranked responses), ``num_pairs``. Unused slots (k >= num_ranked) are computed but never counted.
    """
    batches.check(batch, batches.RANKING_BATCH, "reward_loss")
    tokens_BKT, valid_BKT, num_ranked_B = batch["tokens"], batch["valid"], batch["num_ranked"]
    B, K, T = tokens_BKT.shape
    rewards_B_K = sequence_rewards(params, tokens_BKT.reshape(B * K, T), valid_BKT.reshape(B * K, T),
                                   model=model, rng=rng, deterministic=deterministic)
    scores_BK = rewards_B_K.reshape(B, K)
    loss = ranking_loss(scores_BK, num_ranked_B)
    ranked_BK = jnp.arange(K)[None, :] < num_ranked_B[:, None]
    num_ranked = jnp.maximum(jnp.sum(ranked_BK), 1)
    mean = jnp.sum(jnp.where(ranked_BK, scores_BK, 0.0)) / num_ranked
    var = jnp.sum(jnp.where(ranked_BK, jnp.square(scores_BK - mean), 0.0)) / num_ranked
    n_B = num_ranked_B.astype(jnp.float32)
    metrics = {"loss": loss, "accuracy": pairwise_accuracy(scores_BK, num_ranked_B), "reward_mean": mean,
               "reward_std": jnp.sqrt(var), "num_pairs": jnp.sum(n_B * (n_B - 1) / 2)}
    return loss, metrics


def shift_reward_bias(params, shift) -> dict:
    """``params`` with the score head's bias lowered by ``shift`` (every reward moves by −shift)."""
    if "score" not in params or "bias" not in params["score"]:
        raise KeyError(f"shift_reward_bias: params have no score-head bias (top-level keys {sorted(params)}); "
                       f"pass the parameters of a ScoreModel (reward model)")
    score = dict(params["score"])
    score["bias"] = score["bias"] - jnp.asarray(shift, score["bias"].dtype)
    return {**params, "score": score}


def fit_reward_bias(params, demonstrations: Iterable[Mapping[str, np.ndarray]], *,
                    model: ScoreModel) -> tuple[dict, float]:
    """Shift the score bias so the demonstrations' mean reward is 0; returns (new params, the shift).

    ``demonstrations`` yields dicts with ``tokens`` and ``valid`` (N, T): one conversation per row (prompt + the
    SFT demonstration, ending in EOS), either padding side. The shift is exact: rewards are linear in the bias.
    """
    rewards_fn = jax.jit(lambda p, t, v: sequence_rewards(p, t, v, model=model))
    total, count = 0.0, 0
    for i, demo in enumerate(demonstrations):
        batches.check(demo, batches.DEMONSTRATION_ROWS, f"fit_reward_bias (demonstration batch {i})")
        rewards = np.asarray(rewards_fn(params, jnp.asarray(demo["tokens"]), jnp.asarray(demo["valid"])),
                             np.float64)
        total, count = total + float(rewards.sum()), count + rewards.size
    if count == 0:
        raise ValueError("fit_reward_bias: no demonstrations given; pass the SFT demonstrations (tokens, valid)")
    shift = total / count
    if not math.isfinite(shift):
        raise FloatingPointError(f"fit_reward_bias: the demonstrations' mean reward is {shift}")
    return shift_reward_bias(params, shift), shift
