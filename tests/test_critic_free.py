"""GRPO and RLOO (gptjax.stages.grpo, gptjax.stages.rloo) and the shared RL loop they run on.

Independent references: group-normalised and leave-one-out advantages against examples worked by hand and NumPy;
the GRPO loss (clipped surrogate + k3 KL, per-sequence or Dr. GRPO aggregation) and RLOO's REINFORCE loss against
NumPy re-implementations of their values and gradients; sequence rewards against their definition; and the whole
loop (``online.run_rl``: KV-cache sampling, reference log-probs, a reward function on the host, advantages, minibatch
epochs, checkpoints) on a programmatic reward: it must rise while the KL to the reference stays far below that of
the reward-greedy policy.
"""

import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from gptjax import sharding
from gptjax.errors import ConfigError
from gptjax.model import GPT, GPTConfig
from gptjax.stages import grpo, rl, rloo
from gptjax.stages.online import loop as online
from gptjax.stages.ppo.objective import PPOConfig
from gptjax.stages.rejection_sampling import RSConfig


def test_group_advantages_hand_examples():
    # Group 1: r = [1, 2, 3, 6]: mean 3, sample std sqrt((4 + 1 + 0 + 9) / 3) = 2.160247.
    # Group 2: r = [5, 5, 5, 5]: no spread, advantages 0 (not nan).
    r = jnp.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt(14 / 3)
    np.testing.assert_allclose(grpo.group_advantages(r, 4), [-2 / (std + 1e-4), -1 / (std + 1e-4), 0,
                                                             3 / (std + 1e-4), 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(grpo.group_advantages(r, 4, normalize_std=False), [-2, -1, 0, 3, 0, 0, 0, 0])
    rng = np.random.default_rng(0)
    x = rng.normal(size=24).astype(np.float32)
    g = x.reshape(-1, 6)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
    np.testing.assert_allclose(grpo.group_advantages(jnp.asarray(x), 6), want, rtol=1e-5, atol=1e-6)


def test_leave_one_out_advantages_hand_example():
    # k = 3, r = [3, 6, 0]: baselines (6 + 0)/2 = 3, (3 + 0)/2 = 1.5, (3 + 6)/2 = 4.5.
    np.testing.assert_allclose(rloo.leave_one_out_advantages(jnp.array([3.0, 6.0, 0.0, 1.0, 1.0, 4.0]), 3),
                               [0.0, 4.5, -4.5, -1.5, -1.5, 3.0])
    # Equivalently k/(k − 1) · (r − group mean).
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(rloo.leave_one_out_advantages(jnp.asarray(x.ravel()), 4),
                               (4 / 3 * (x - x.mean(1, keepdims=True))).ravel(), rtol=1e-5, atol=1e-6)


def test_sequence_rewards_fold_kl_and_penalise_missing_eos():
    mask = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], np.float32)
    logp = np.array([[9, -1.0, -2.0, 9], [9, 9, -0.5, -0.5]], np.float32)
    ref = np.array([[7, -1.5, -1.0, 7], [7, 7, -1.5, -2.5]], np.float32)
    scores, finished = jnp.array([2.0, 5.0]), jnp.array([True, False])
    reward, score, kl = rl.sequence_rewards(scores, logp, ref, mask, finished, 0.1, no_eos_penalty=-1.0, score_clip=3)
    np.testing.assert_allclose(kl, [0.5 - 1.0, 1.0 + 2.0])
    np.testing.assert_allclose(score, [2.0, -1.0])
    np.testing.assert_allclose(reward, [2.0 + 0.05, -1.0 - 0.3], rtol=1e-6)


def _batch(seed=3, shape=(4, 8)):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, shape).astype(np.float32)
    new = (old + rng.normal(0, 0.4, shape)).astype(np.float32)  # ratios on both sides of 1 ± 0.2
    ref = (old + rng.normal(0, 0.3, shape)).astype(np.float32)
    mask = (rng.random(shape) < 0.7).astype(np.float32)
    mask[:, 0] = 1
    adv = np.repeat(rng.normal(size=(shape[0], 1)), shape[1], 1).astype(np.float32) * mask
    return new, old, ref, adv, mask


def _np_grpo(new, old, ref, adv, mask, eps, beta, dr, max_new):
    new, old, ref = (np.asarray(x, np.float64) for x in (new, old, ref))
    ratio = np.exp(new - old)
    clipped = np.clip(ratio, 1 - eps, 1 + eps)
    per = -np.minimum(ratio * adv, clipped * adv) + beta * (np.exp(ref - new) - (ref - new) - 1)
    active = (np.abs(ratio - 1) <= eps) | (ratio * adv < clipped * adv)
    dper = np.where(active, -ratio * adv, 0.0) + beta * (1 - np.exp(ref - new))
    B = mask.shape[0]
    weight = np.full_like(mask, 1 / (B * max_new)) if dr else mask / (B * mask.sum(1, keepdims=True))
    return (per * weight * mask).sum(), dper * weight * mask


@pytest.mark.parametrize("dr", [False, True], ids=["grpo", "dr_grpo"])
def test_grpo_loss_equals_numpy(dr):
    new, old, ref, adv, mask = _batch()
    want_loss, want_grad = _np_grpo(new, old, ref, adv, mask, 0.2, 0.04, dr, 8)
    ratio = np.exp(new - old)[mask > 0]
    assert 0.1 < np.mean(np.abs(ratio - 1) > 0.2) < 0.9  # both branches of the clip are exercised
    fn = lambda n: grpo.grpo_policy_loss(n, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.04, dr_grpo=dr,  # noqa
                                         max_new_tokens=8)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(new))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    k3 = (np.exp(ref - new) - (ref - new) - 1)[mask > 0]
    np.testing.assert_allclose(metrics["kl_ref"], k3.mean(), rtol=1e-4)
    # Padding may hold anything (even -inf log-probs): nothing changes.
    poisoned = np.where(mask > 0, new, -np.inf).astype(np.float32)
    np.testing.assert_allclose(fn(poisoned)[0], want_loss, rtol=1e-5)


def test_reinforce_loss_equals_numpy():
    new, old, _, adv, mask = _batch(seed=4)
    a = adv[:, 0]
    want = -np.mean(a * (new * mask).sum(1))
    (loss, _), grad = jax.value_and_grad(rloo.reinforce_loss, has_aux=True)(jnp.asarray(new), old, adv, mask)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(grad, -a[:, None] * mask / mask.shape[0], rtol=1e-5, atol=1e-7)


def test_configs_reject_bad_values():
    with pytest.raises(ConfigError, match="group_size"):
        grpo.GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match="kl_in"):
        grpo.GRPOConfig(kl_in="both")
    with pytest.raises(ConfigError, match="rloo.loss"):
        rloo.RLOOConfig(loss="ppo")
    with pytest.raises(ConfigError, match="multiple of the 3 samples"):
        grpo.algorithm(grpo.GRPOConfig(group_size=3, rollout_batch_size=16, minibatch_size=8), None, 4)


# --- the whole loop on a programmatic reward ----------------------------------------------------------------------

CFG = GPTConfig(vocab_size=48, max_len=16, num_layers=1, d_model=32, num_heads=2, scan_layers=False)
P, R, TARGET = 4, 3, 7


class CountTarget:
    """Reward function: how many of the response's tokens are TARGET (scored on the host, as a reward function)."""

    def score(self, prompt_idx_B, rows):
        del prompt_idx_B
        return np.sum((rows.tokens_BT == TARGET) & rows.response_mask_BT, axis=1).astype(np.float32)


def _loop_config(steps: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train = common.train_config()
    c.train.update(steps=steps, log_every=steps, ckpt_every=steps, eval_every=steps, seed=0)
    c.sampling = common.sampling_config()
    c.sampling.max_new_tokens = R
    c.optim = common.optim_config()
    c.optim.update(lr=3e-3, warmup_steps=0, weight_decay=0.0, final_lr_fraction=1.0)
    c.mesh = common.mesh_config((1, 1, 1))
    return c


@pytest.mark.parametrize("make_algo", [
    lambda model: grpo.algorithm(grpo.GRPOConfig(group_size=4, rollout_batch_size=32, minibatch_size=16, epochs=2,
                                                 kl_coef=0.5, no_eos_penalty=None), model, R),
    lambda model: rloo.algorithm(rloo.RLOOConfig(k=4, rollout_batch_size=32, minibatch_size=16, epochs=2,
                                                 kl_coef=0.3, loss="clipped", no_eos_penalty=None), model),
    lambda model: rloo.algorithm(rloo.RLOOConfig(k=4, rollout_batch_size=32, minibatch_size=32, epochs=1,
                                                 kl_coef=0.1, no_eos_penalty=None), model),
], ids=["grpo", "rloo-clipped", "rloo-reinforce"])
def test_short_run_raises_programmatic_reward_with_bounded_kl(make_algo, tmp_path):
    model = GPT(CFG)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    prompts = [np.random.default_rng(i).integers(10, CFG.vocab_size, P).astype(np.int32) for i in range(64)]
    algo = make_algo(model)
    steps = 24
    result = online.run_rl(_loop_config(steps), str(tmp_path), algo=algo, policy_model=model, value_model=None,
                           policy_params=params, value_params=None, reward=CountTarget(), prompts=prompts, pad_id=0,
                           eos_id=None, mesh=sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    assert result.step == steps
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    scores, kls = np.array([[r["rollout/score"], r["rollout/kl"]] for r in rows]).T
    assert len(rows) == steps and scores[:3].mean() < 0.25  # the reference emits token 7 about 1 time in 48
    assert scores[-3:].mean() > scores[:3].mean() + 0.3, scores
    # The KL term keeps it far from the greedy "always 7" policy (score 3 at KL ≈ 3·log 48 ≈ 11.6 nats).
    assert np.all(kls < 0.5 * R * math.log(CFG.vocab_size)) and np.all(scores < 2.9), (scores, kls)
    assert (tmp_path / "checkpoints" / str(steps)).is_dir()


_make_iteration = online.make_iteration


def test_every_iteration_runs_the_programs_compiled_for_the_first(tmp_path, monkeypatch):
    """The fresh state is laid out as the update returns it, so iteration 2 compiles nothing (a state whose scalars
    were unplaced compiled the update and rollout programs twice)."""
    made = []

    def recording(*args, **kwargs):
        made.append(_make_iteration(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(online, "make_iteration", recording)
    model = GPT(CFG)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    prompts = [np.random.default_rng(i).integers(10, CFG.vocab_size, P).astype(np.int32) for i in range(16)]
    algo = rloo.algorithm(rloo.RLOOConfig(k=4, rollout_batch_size=16, minibatch_size=16, epochs=1), model)
    online.run_rl(_loop_config(3), str(tmp_path), algo=algo, policy_model=model, value_model=None,
                  policy_params=params, value_params=None, reward=CountTarget(), prompts=prompts, pad_id=0,
                  eos_id=None, mesh=sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    iteration = made[0]
    assert (iteration.update._cache_size(), iteration.rollout._cache_size(), iteration.advantages._cache_size()) \
        == (1, 1, 1)


@pytest.mark.parametrize("make, message", [
    (lambda: grpo.GRPOConfig(group_size=0), "grpo.group_size must be positive, got 0"),
    (lambda: grpo.GRPOConfig(kl_coef=-0.1), "grpo.kl_coef must be >= 0, got -0.1"),
    (lambda: rloo.RLOOConfig(epochs=0), "rloo.epochs must be positive, got 0"),
    (lambda: PPOConfig(vf_coef=-1.0), "ppo.vf_coef must be >= 0, got -1.0"),
    (lambda: RSConfig(rounds=0), "rs.rounds must be positive, got 0"),
])
def test_settings_out_of_range_name_the_field(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()
