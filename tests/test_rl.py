"""The pure RL pieces of gptjax.stages.rl and the PPO losses of gptjax.stages.ppo.

Independent references: GAE against examples worked by hand and against rlax's
``truncated_generalized_advantage_estimation`` run row by row on the unpadded episodes; the adaptive KL
controller against Ziegler et al.'s formula evaluated in plain Python; whitening, per-token rewards and the
clipped policy/value losses (values and policy gradient) against NumPy re-implementations written here; and the
pieces together: a short PPO run on a programmatic reward must raise the reward (and the KL-penalised reward it
optimises) while the KL to the reference stays far below that of the reward-greedy policy.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rlax

from gptjax.errors import ConfigError
from gptjax.model import GPT, GPTConfig, ScoreModel
from gptjax.stages import rl
from gptjax.stages.ppo import objective as ppo

PAD = 9.0  # garbage at padded positions: results must not depend on it


def test_gae_matches_hand_computed_examples():
    # Row 0: γ=1, λ=0.95, r=[0,0,1], V=[0.5,0.4,0.3], right-padded.
    #   δ2 = 1 − 0.3 = 0.7; A2 = 0.7
    #   δ1 = 0 + 0.3 − 0.4 = −0.1; A1 = −0.1 + 0.95·0.7 = 0.565
    #   δ0 = 0 + 0.4 − 0.5 = −0.1; A0 = −0.1 + 0.95·0.565 = 0.43675
    rewards = jnp.array([[0.0, 0.0, 1.0, PAD, PAD]])
    values = jnp.array([[0.5, 0.4, 0.3, PAD, PAD]])
    mask = jnp.array([[1, 1, 1, 0, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(adv, [[0.43675, 0.565, 0.7, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.93675, 0.965, 1.0, 0, 0]], atol=1e-6)
    # Row 1: γ=0.9, λ=0.5, r=[1,0,2], V=[1,2,1], padded on both sides (prompt before, padding after).
    #   δ2 = 2 − 1 = 1; A2 = 1
    #   δ1 = 0 + 0.9·1 − 2 = −1.1; A1 = −1.1 + 0.45·1 = −0.65
    #   δ0 = 1 + 0.9·2 − 1 = 1.8; A0 = 1.8 + 0.45·(−0.65) = 1.5075
    rewards = jnp.array([[PAD, 1.0, 0.0, 2.0, PAD]])
    values = jnp.array([[PAD, 1.0, 2.0, 1.0, PAD]])
    mask = jnp.array([[0, 1, 1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    np.testing.assert_allclose(adv, [[0, 1.5075, -0.65, 1.0, 0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0, 2.5075, 1.35, 2.0, 0]], atol=1e-6)


def test_gae_matches_rlax_per_episode():
    rng = np.random.default_rng(0)
    B, T, gamma, lam = 6, 12, 0.97, 0.9
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    starts, lengths = rng.integers(0, 5, B), rng.integers(1, 8, B)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        mask[b, starts[b]:starts[b] + lengths[b]] = 1
    adv, ret = jax.jit(rl.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
    for b in range(B):
        s, n = starts[b], lengths[b]
        discounts = np.full(n, gamma, np.float32)
        discounts[-1] = 0.0  # the episode ends after its last token
        want = rlax.truncated_generalized_advantage_estimation(
            rewards[b, s:s + n], discounts, lam, np.append(values[b, s:s + n], np.float32(0)))
        np.testing.assert_allclose(adv[b, s:s + n], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[b, s:s + n], want + values[b, s:s + n], rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(adv[b])[mask[b] == 0] == 0)


def test_whiten_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(4, 7)).astype(np.float32)
    mask = rng.random((4, 7)) < 0.6
    sel = x[mask].astype(np.float64)
    want = (x - sel.mean()) / np.sqrt(sel.var() + 1e-8)
    got = rl.whiten(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got)[mask], want[mask], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[~mask] == 0)
    kept = rl.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False)
    np.testing.assert_allclose(np.asarray(kept)[mask], want[mask] + sel.mean(), rtol=1e-5, atol=1e-5)


def test_adaptive_kl_controller_follows_ziegler_formula():
    ctl = rl.AdaptiveKLController(init_kl_coef=0.15, target=6.0, horizon=10000.0)
    update = jax.jit(ctl.update)
    state, beta = ctl.init(), 0.15
    # KL far above target (error clipped to +0.2), far below (clipped to −0.2), and inside the band.
    for kl, n in [(9.0, 512), (30.0, 64), (3.0, 512), (0.0, 100), (6.6, 512), (5.4, 256)]:
        state = update(state, jnp.float32(kl), n)
        beta = beta * (1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * n / 10000.0)
        np.testing.assert_allclose(float(state.kl_coef), beta, rtol=1e-6)
    assert len(jax.tree.leaves(state)) == 1  # a pytree: checkpointed and carried through jit like any state
    fixed = rl.FixedKLController(0.05)
    assert float(fixed.update(fixed.init(), 100.0, 512).kl_coef) == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="valid choices"):
        rl.make_kl_controller("pid", 0.1)


def _rollout_rows():
    # Row 0: prompt then response right-padded; row 1: left-padded prompt, response ending at the last column.
    mask = np.array([[0, 0, 1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 1, 1, 1]], np.float32)
    rng = np.random.default_rng(2)
    logp = rng.normal(size=mask.shape).astype(np.float32)
    ref = rng.normal(size=mask.shape).astype(np.float32)
    return mask, logp, ref, np.array([4, 6])


def test_reward_sits_at_eos_under_left_and_right_padding():
    mask, logp, ref, eos_index = _rollout_rows()
    score, beta = np.array([2.0, -3.0], np.float32), 0.1
    rewards, kl = rl.per_token_rewards(jnp.asarray(score), logp, ref, mask, beta, -1.0, jnp.array([True, True]))
    want_kl = (logp - ref) * mask
    want = -beta * want_kl
    want[np.arange(2), eos_index] += score
    np.testing.assert_allclose(kl, want_kl, rtol=1e-6)
    np.testing.assert_allclose(rewards, want, rtol=1e-6, atol=1e-7)


def test_no_eos_penalty_replaces_the_score():
    mask, logp, ref, eos_index = _rollout_rows()
    score = jnp.array([2.0, -3.0])
    finished = jnp.array([False, True])
    rewards, _ = rl.per_token_rewards(score, logp, ref, mask, 0.0, -1.0, finished)
    np.testing.assert_allclose(np.asarray(rewards)[np.arange(2), eos_index], [-1.0, -3.0])
    assert np.count_nonzero(np.asarray(rewards)) == 2
    kept, _ = rl.per_token_rewards(score, logp, ref, mask, 0.0, None, finished)
    np.testing.assert_allclose(np.asarray(kept)[np.arange(2), eos_index], [2.0, -3.0])


# --- PPO losses against NumPy ---------------------------------------------------------------------------------------

def _np_policy_loss(new, old, adv, mask, eps):
    ratio = np.exp(new - old)
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)
    n = mask.sum()
    # d/dnew of −min(ρA, clip(ρ)A): −ρA where the unclipped term is the active one (ρ inside the band or the
    # unclipped objective is the smaller), else 0.
    active = (np.abs(ratio - 1) <= eps) | (ratio * adv < np.clip(ratio, 1 - eps, 1 + eps) * adv)
    grad = np.where(active & (mask > 0), -ratio * adv, 0.0) / n
    return ((per_token * mask).sum() / n, grad, (np.abs(ratio - 1) > eps)[mask > 0].mean(),
            ((ratio - 1) - (new - old))[mask > 0].mean())


def _np_value_loss(new, old, ret, mask, eps):
    clipped = old + np.clip(new - old, -eps, eps)
    per_token = 0.5 * np.maximum((new - ret) ** 2, (clipped - ret) ** 2)
    return (per_token * mask).sum() / mask.sum()


def _tiny_batch():
    rng = np.random.default_rng(3)
    shape = (3, 8)
    old = rng.normal(-2.0, 0.5, shape).astype(np.float32)
    new = (old + rng.normal(0, 0.4, shape)).astype(np.float32)  # ratios well outside 1 ± 0.2 on both sides
    adv = rng.normal(size=shape).astype(np.float32)
    mask = (rng.random(shape) < 0.7).astype(np.float32)
    return new, old, adv, mask


def test_ppo_policy_loss_equals_numpy_reference():
    new, old, adv, mask = _tiny_batch()
    want_loss, want_grad, want_clip, want_kl = _np_policy_loss(new.astype(np.float64), old, adv, mask, 0.2)
    assert 0.1 < want_clip < 0.9  # the batch exercises both the clipped and the unclipped branch
    (loss, metrics), grad = jax.value_and_grad(ppo.ppo_policy_loss, has_aux=True)(
        jnp.asarray(new), old, adv, mask, 0.2)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["clip_frac"], want_clip, rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], want_kl, rtol=1e-5)
    # Whatever sits at padded positions (even -inf log-probs) changes nothing.
    poisoned = np.where(mask > 0, new, -np.inf).astype(np.float32)
    np.testing.assert_allclose(ppo.ppo_policy_loss(poisoned, old, adv, mask, 0.2)[0], want_loss, rtol=1e-5)


def test_ppo_policy_loss_unmasked_equals_rlax():
    new, old, adv, _ = _tiny_batch()
    want = rlax.clipped_surrogate_pg_loss(jnp.exp(new - old).reshape(-1), adv.reshape(-1), 0.2)
    got, _ = ppo.ppo_policy_loss(new, old, adv, np.ones_like(adv), 0.2)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ppo_value_loss_equals_numpy_reference():
    rng = np.random.default_rng(4)
    _, _, _, mask = _tiny_batch()
    old = rng.normal(size=mask.shape).astype(np.float32)
    new = (old + rng.normal(0, 0.5, mask.shape)).astype(np.float32)
    ret = rng.normal(size=mask.shape).astype(np.float32)
    loss, metrics = ppo.ppo_value_loss(new, old, ret, mask, 0.2)
    np.testing.assert_allclose(loss, _np_value_loss(new, old, ret, mask, 0.2), rtol=1e-5)
    assert 0 < float(metrics["value_clip_frac"]) < 1
    np.testing.assert_allclose(ppo.explained_variance(ret, ret, mask), 1.0, atol=1e-6)
    np.testing.assert_allclose(ppo.explained_variance(np.full_like(ret, 0.3), ret, mask), 0.0, atol=1e-5)


def test_compute_advantages_composes_rewards_gae_and_whitening():
    mask, logp, ref, eos_index = _rollout_rows()
    values = np.random.default_rng(5).normal(size=mask.shape).astype(np.float32)
    score, finished, beta = jnp.array([1.5, 0.5]), jnp.array([True, False]), 0.05
    cfg = ppo.PPOConfig(whiten_advantages=False)
    adv, ret, metrics = ppo.compute_advantages(score, logp, ref, values, mask, finished, beta, cfg)
    rewards, kl = rl.per_token_rewards(score, logp, ref, mask, beta, -1.0, finished)
    want_adv, want_ret = rl.gae(rewards, values, mask, 1.0, 0.95)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-6)
    np.testing.assert_allclose(metrics["score"], (1.5 - 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], np.sum(kl) / 2, rtol=1e-5)
    assert float(metrics["eos_rate"]) == 0.5 and float(metrics["response_length"]) == 3.0
    white, ret2, _ = ppo.compute_advantages(score, logp, ref, values, mask, finished, beta, ppo.PPOConfig())
    np.testing.assert_allclose(ret2, want_ret, rtol=1e-6)  # value targets come before whitening
    np.testing.assert_allclose(float(rl.masked_mean(white, mask)), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(rl.masked_var(white, mask)), 1.0, rtol=1e-4)


def test_ppo_config_defaults_and_errors():
    cfg = ppo.PPOConfig()
    # Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"): β, γ, λ, both clips, value coefficient,
    # epochs, no-EOS penalty, whitening; InstructGPT (Ouyang et al. 2022, App. C): rollout batch 512, minibatch 64.
    assert (cfg.kl_coef, cfg.gamma, cfg.lam, cfg.clip_eps, cfg.value_clip_eps, cfg.vf_coef, cfg.ppo_epochs,
            cfg.no_eos_penalty, cfg.whiten_advantages) == (0.05, 1.0, 0.95, 0.2, 0.2, 0.1, 4, -1.0, True)
    assert cfg.num_minibatches == 512 // 64
    with pytest.raises(ConfigError, match="minibatch_size"):
        ppo.PPOConfig(rollout_batch_size=100, minibatch_size=64)
    with pytest.raises(ConfigError, match="kl_controller"):
        ppo.PPOConfig(kl_controller="pid")
    with pytest.raises(ConfigError, match="valid fields"):
        ppo.PPOConfig.from_dict({"clip": 0.2})


# --- Everything together ----------------------------------------------------------------------------------------

CFG = GPTConfig(vocab_size=48, max_len=16, num_layers=1, d_model=32, num_heads=2, scan_layers=False)


def test_short_ppo_run_raises_programmatic_reward_with_bounded_kl():
    """Score = how many of the 3 response tokens are token 7 (the whole PPO loop in miniature: sampling,
    reference and value passes, per-token rewards, GAE, whitening, minibatch epochs with Adam, KL controller)."""
    model, value_model = GPT(CFG), ScoreModel(CFG, zero_init_head=True)
    init = lambda module, seed: nn.unbox(jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
                                         ["params"])
    ref_params, value_params = init(model, 0), init(value_model, 9)
    cfg = ppo.PPOConfig(kl_coef=0.3, rollout_batch_size=32, minibatch_size=16, ppo_epochs=2, no_eos_penalty=None)
    P, R, target = 4, 3, 7
    optimizer = optax.adam(3e-3)
    kl_ctl = cfg.make_kl_controller()
    grad_fn = jax.grad(lambda p, v, mb: ppo.ppo_loss(p, v, mb, None, policy_model=model, value_model=value_model,
                                                     cfg=cfg), argnums=(0, 1), has_aux=True)

    def sample(params, prompts, key):
        def one_token(i, carry):  # no KV cache needed at this size: a full forward per new token
            tokens, key = carry
            logits, _ = model.apply({"params": params}, tokens)
            key, sub = jax.random.split(key)
            next_logits = jax.lax.dynamic_index_in_dim(logits, P + i - 1, axis=1, keepdims=False)
            return tokens.at[:, P + i].set(jax.random.categorical(sub, next_logits / cfg.temperature)), key
        tokens = jnp.concatenate([prompts, jnp.zeros((prompts.shape[0], R), jnp.int32)], 1)
        return jax.lax.fori_loop(0, R, one_token, (tokens, key))[0]

    @jax.jit
    def iteration(params, value_params, opt_state, kl_state, key):
        k_prompt, k_sample, k_perm = jax.random.split(key, 3)
        prompts = jax.random.randint(k_prompt, (cfg.rollout_batch_size, P), 10, CFG.vocab_size)
        tokens = sample(params, prompts, k_sample)
        valid = jnp.ones(tokens.shape, bool)
        mask = jnp.broadcast_to(jnp.arange(P + R) >= P, tokens.shape)
        logp, _ = ppo.sequence_logprobs(params, tokens, valid, model=model)
        ref_logp, _ = ppo.sequence_logprobs(ref_params, tokens, valid, model=model)
        values = ppo.sequence_values(value_params, tokens, valid, model=value_model)
        score = jnp.sum(tokens[:, P:] == target, axis=1).astype(jnp.float32)
        adv, ret, metrics = ppo.compute_advantages(score, logp, ref_logp, values, mask, jnp.ones(score.shape, bool),
                                                   kl_state.kl_coef, cfg)
        rollout = {"tokens": tokens, "valid": valid, "response_mask": mask, "old_logprobs": logp,
                   "old_values": values, "advantages": adv, "returns": ret}

        def update(carry, idx):
            params, value_params, opt_state = carry
            grads, _ = grad_fn(params, value_params, jax.tree.map(lambda x: x[idx], rollout))
            updates, opt_state = optimizer.update(grads, opt_state, (params, value_params))
            return (*optax.apply_updates((params, value_params), updates), opt_state), None

        order = jnp.concatenate([jax.random.permutation(k, cfg.rollout_batch_size)
                                 for k in jax.random.split(k_perm, cfg.ppo_epochs)])
        (params, value_params, opt_state), _ = jax.lax.scan(
            update, (params, value_params, opt_state), order.reshape(-1, cfg.minibatch_size))
        kl_state = kl_ctl.update(kl_state, metrics["kl"], cfg.rollout_batch_size)
        return params, value_params, opt_state, kl_state, metrics

    params, opt_state, kl_state = ref_params, optimizer.init((ref_params, value_params)), kl_ctl.init()
    history = []
    for it in range(20):
        params, value_params, opt_state, kl_state, metrics = iteration(params, value_params, opt_state, kl_state,
                                                                      jax.random.key(100 + it))
        history.append((float(metrics["score"]), float(metrics["kl"])))
    scores, kls = np.array(history).T
    assert scores[:3].mean() < 0.2  # the reference emits token 7 about 1 time in 48
    assert scores[-3:].mean() > scores[:3].mean() + 0.3, scores
    # PPO raises what it optimises, the KL-penalised score ...
    assert (scores[-3:] - cfg.kl_coef * kls[-3:]).mean() > scores[:3].mean() + 0.1, (scores, kls)
    # ... and the penalty keeps it far from the greedy "always 7" policy (score 3 at KL ≈ 3·log 48 ≈ 11.6 nats).
    assert np.all(kls < 0.5 * R * math.log(CFG.vocab_size)) and np.all(scores < 2.5), (scores, kls)
