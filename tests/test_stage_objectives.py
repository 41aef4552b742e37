"""The stage objectives (pretrain/SFT LM loss, K-wise reward loss, PPO loss) on tiny real models.

Independent references: the LM loss against NumPy log-softmax of ``GPT.__call__``'s logits; the chunked LM loss
against the plain one (value and gradient); SFT against its defining property (targets under weight 0 cannot
matter); the K-wise ranking loss against a brute-force Python loop over pairs and, for K = 2, Bradley–Terry;
the batched reward loss against per-sequence ``ScoreModel.reward`` calls on unpadded sequences; the reward-bias
fit against its definition (demonstrations score mean 0); PPO log-probs against explicit log_softmax indexing
(logit at t predicts token t+1); PPO at its first step against the closed form. (The short PPO run on a
programmatic reward lives in tests/test_rl.py.)
"""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.model import GPT, GPTConfig, ScoreModel
from gptjax.stages import pretrain, reward, sft
from gptjax.stages.ppo import objective as ppo

# One unscanned layer: the objectives do not care about the layer layout, and it compiles fastest.
CFG = GPTConfig(vocab_size=48, max_len=32, num_layers=1, d_model=32, num_heads=2, dropout_resid=0.1,
                scan_layers=False)
B, T = 2, 12


def _params(module, seed=0):
    init = jax.jit(lambda key: module.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    return nn.unbox(init(jax.random.key(seed)))


def _score_params(lm_params, seed):
    """ScoreModel parameters: the LM's decoder plus a random scalar head (one init compile fewer)."""
    kernel = np.random.default_rng(seed).normal(0, 0.5, (CFG.d_model, 1)).astype(np.float32)
    return {"decoder": lm_params["decoder"], "score": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((1,))}}


def _apply(model, method=None):
    """A jitted ``model.apply`` for the reference computations (eager Flax is slow on a busy CPU)."""
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=method))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _lm_batch(seed=0):
    """Two packed documents in row 0 (lengths 7 + 5), one document and padding in row 1; weights with holes."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    targets = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    segment_ids = np.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], np.int32)
    positions = np.array([list(range(7)) + list(range(5)), list(range(9)) + [0] * 3], np.int32)
    weights = (rng.random((B, T)) < 0.7).astype(np.float32) * (segment_ids > 0)
    return {"inputs": inputs, "targets": targets, "positions": positions, "segment_ids": segment_ids,
            "weights": weights}


@pytest.fixture(scope="module")
def lm():
    model = GPT(CFG)
    return model, _params(model)


def test_lm_loss_matches_numpy_log_softmax(lm):
    model, params = lm
    batch = _lm_batch()
    loss_fn = jax.jit(lambda p, b: pretrain.pretrain_loss(p, b, None, model=model, deterministic=True))
    loss, metrics = loss_fn(params, batch)
    logits, _ = _apply(model)(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    w = batch["weights"]
    np.testing.assert_allclose(loss, -(w * logp).sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["num_tokens"], w.sum())
    hits = np.asarray(logits).argmax(-1) == batch["targets"]
    np.testing.assert_allclose(metrics["accuracy"], (w * hits).sum() / w.sum(), rtol=1e-6)
    empty = dict(batch, weights=np.zeros_like(w))
    assert float(loss_fn(params, empty)[0]) == 0.0


def test_chunked_lm_loss_equals_plain_with_dropout(lm):
    model, params = lm
    batch, rng = _lm_batch(1), jax.random.key(7)

    def loss_fn(loss_chunk):
        f = lambda p, key: pretrain.lm_loss(p, batch, key, model=model, loss_chunk=loss_chunk, z_loss_coef=1e-2)
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    plain = loss_fn(0)
    (loss, metrics), grads = plain(params, rng)
    (loss_c, metrics_c), grads_c = loss_fn(5)(params, rng)  # T = 12: two chunks of 5 and a remainder of 2
    np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
    for k in metrics:
        np.testing.assert_allclose(metrics_c[k], metrics[k], rtol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_c, grads)
    # Dropout is on (deterministic=False) and follows the rng.
    (loss_other, _), _ = plain(params, jax.random.key(8))
    assert abs(float(loss_other) - float(loss)) > 1e-4


def test_sft_loss_ignores_targets_under_zero_weight(lm):
    model, params = lm
    batch = _lm_batch(2)
    # Prompt (non-assistant) positions: weight 0. Their targets get replaced by other tokens.
    changed = dict(batch, targets=np.where(batch["weights"] > 0, batch["targets"],
                                           (batch["targets"] + 17) % CFG.vocab_size))
    assert (changed["targets"] != batch["targets"]).any()
    f = jax.jit(jax.value_and_grad(lambda p, b: sft.sft_loss(p, b, None, model=model, deterministic=True),
                                   has_aux=True))
    (loss, metrics), grads = f(params, batch)
    (loss2, metrics2), grads2 = f(params, changed)
    assert float(loss) == float(loss2)
    jax.tree.map(np.testing.assert_array_equal, (metrics, grads), (metrics2, grads2))
    # conversation_loss: each packed conversation's own weighted mean, then a plain mean over conversations.
    logits, _ = _apply(model)(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    nll = -np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    w, seg = batch["weights"], batch["segment_ids"]
    per_conversation = [(w * nll)[b][seg[b] == s].sum() / w[b][seg[b] == s].sum()
                        for b in range(B) for s in (1, 2) if w[b][seg[b] == s].sum() > 0]
    np.testing.assert_allclose(metrics["conversation_loss"], np.mean(per_conversation), rtol=1e-5)
    assert int(metrics["num_conversations"]) == len(per_conversation) == 3


# --- Reward model ---------------------------------------------------------------------------------------------------

def _brute_force_ranking(scores, num_ranked):
    losses, correct, pairs = [], 0, 0
    for s, n in zip(scores, num_ranked):
        terms = [-math.log(1 / (1 + math.exp(-(s[i] - s[j])))) for i, j in itertools.combinations(range(n), 2)]
        assert len(terms) == math.comb(n, 2)
        losses.append(sum(terms) / len(terms))
        correct += sum(s[i] > s[j] for i, j in itertools.combinations(range(n), 2))
        pairs += len(terms)
    return np.mean(losses), correct / pairs


def test_ranking_loss_equals_brute_force_pairs_and_bradley_terry():
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 2, (6, 9)).astype(np.float32)
    num_ranked = np.array([2, 9, 5, 3, 9, 4], np.int32)
    want_loss, want_acc = _brute_force_ranking(scores.astype(np.float64), num_ranked)
    np.testing.assert_allclose(reward.ranking_loss(scores, num_ranked), want_loss, rtol=1e-6)
    np.testing.assert_allclose(reward.pairwise_accuracy(scores, num_ranked), want_acc, rtol=1e-6)
    # K = 2: Bradley–Terry −log σ(r_w − r_l), batch-averaged.
    r_w, r_l = scores[:, 0], scores[:, 1]
    np.testing.assert_allclose(reward.ranking_loss(scores[:, :2], np.full(6, 2)),
                               np.mean(np.log1p(np.exp(-(r_w.astype(np.float64) - r_l)))), rtol=1e-6)
    with pytest.raises(ValueError, match="K >= 2"):
        reward.ranking_loss(scores[:, :1], np.full(6, 1))


def test_packed_ranking_loss_is_the_mean_over_rankings_as_if_unpacked():
    """Three rankings (3, 2, 2 answers) in one element of 7 slots and one (4) in another: the loss and accuracy of
    the packed batch equal those of the four rankings one per element; no pair crosses two rankings."""
    rng = np.random.default_rng(5)
    scores = rng.normal(0, 2, (2, 7)).astype(np.float32)
    group = np.array([[0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, -1, -1, -1]], np.int32)
    num_ranked = np.array([7, 4], np.int32)
    unpacked = np.zeros((4, 4), np.float64)
    for row, (b, slots) in enumerate([(0, [0, 1, 2]), (0, [3, 4]), (0, [5, 6]), (1, [0, 1, 2, 3])]):
        unpacked[row, :len(slots)] = scores[b, slots]
    want_loss, want_acc = _brute_force_ranking(unpacked, [3, 2, 2, 4])
    np.testing.assert_allclose(reward.ranking_loss(scores, num_ranked, group), want_loss, rtol=1e-6)
    np.testing.assert_allclose(reward.pairwise_accuracy(scores, num_ranked, group), want_acc, rtol=1e-6)
    assert int(np.sum(reward.ranked_pairs_BKK(num_ranked, 7, group))) == 3 + 1 + 1 + 6
    # Unpacked, an element's ranked slots are one ranking: the same number as without groups.
    np.testing.assert_allclose(reward.ranking_loss(scores, num_ranked, np.zeros_like(group)),
                               reward.ranking_loss(scores, num_ranked), rtol=1e-6)


def test_padding_elements_do_not_dilute_the_ranking_loss():
    scores = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(reward.ranking_loss(scores, np.array([2, 0], np.int32)), np.log1p(np.exp(-1.0)),
                               rtol=1e-6)


def _ranking_batch(rng, b, k, t):
    """Right-padded responses of different lengths; element 1 ranks only 2 of its k slots (rest all padding)."""
    tokens = rng.integers(3, CFG.vocab_size, (b, k, t)).astype(np.int32)
    lengths = rng.choice([5, t], (b, k))  # two lengths: the per-sequence reference compiles twice
    valid = np.arange(t)[None, None, :] < lengths[..., None]
    num_ranked = np.array([k, 2], np.int32)
    valid[1, 2:] = False
    return {"tokens": np.where(valid, tokens, 0), "valid": valid, "num_ranked": num_ranked}


@pytest.fixture(scope="module")
def rm(lm):
    return ScoreModel(CFG), _score_params(lm[1], seed=3)


def test_reward_loss_equals_per_sequence_rewards_and_brute_force(rm):
    model, params = rm
    batch = _ranking_batch(np.random.default_rng(1), 2, 3, 10)
    loss, metrics = jax.jit(lambda p, b: reward.reward_loss(p, b, None, model=model, deterministic=True))(
        params, batch)
    reward_of = _apply(model, ScoreModel.reward)
    scores = np.zeros((2, 3))
    for b, k in itertools.product(range(2), range(3)):
        if k < batch["num_ranked"][b]:  # one unpadded sequence at a time, read at its final token
            n = batch["valid"][b, k].sum()
            seq = batch["tokens"][b, k, :n][None]
            scores[b, k] = float(reward_of(params, seq, np.ones_like(seq, bool))[0])
    want_loss, want_acc = _brute_force_ranking(scores, batch["num_ranked"])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], want_acc)
    ranked = np.concatenate([scores[0], scores[1, :2]])
    np.testing.assert_allclose(metrics["reward_mean"], ranked.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_std"], ranked.std(), rtol=1e-4)
    assert float(metrics["num_pairs"]) == 3 + 1


def test_reward_is_the_same_under_left_and_right_padding(rm):
    model, params = rm
    rng = np.random.default_rng(2)
    lengths, t = np.array([5, 9, 3]), 9
    content = rng.integers(3, CFG.vocab_size, (3, t)).astype(np.int32)
    right_valid = np.arange(t)[None] < lengths[:, None]
    left_valid = right_valid[:, ::-1]
    right = np.where(right_valid, content, 0)
    left = np.stack([np.roll(r, t - n) for r, n in zip(right, lengths)])  # same tokens moved to the end
    f = jax.jit(lambda p, x, v: reward.sequence_rewards(p, x, v, model=model))
    np.testing.assert_allclose(f(params, left, left_valid), f(params, right, right_valid), rtol=1e-5, atol=1e-6)


def test_fit_reward_bias_centres_demonstrations(rm):
    model, params = rm
    rng = np.random.default_rng(3)
    demos = [{"tokens": rng.integers(3, CFG.vocab_size, (4, 8)).astype(np.int32), "valid": np.ones((4, 8), bool)}
             for _ in range(2)]
    f = jax.jit(lambda p, x, v: reward.sequence_rewards(p, x, v, model=model))
    before = np.concatenate([f(params, d["tokens"], d["valid"]) for d in demos])
    new_params, shift = reward.fit_reward_bias(params, demos, model=model)
    after = np.concatenate([f(new_params, d["tokens"], d["valid"]) for d in demos])
    np.testing.assert_allclose(shift, before.mean(), rtol=1e-5)
    np.testing.assert_allclose(after.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(after - after[0], before - before[0], atol=1e-5)  # only a shift
    with pytest.raises(KeyError, match="valid"):
        reward.fit_reward_bias(params, [{"tokens": demos[0]["tokens"]}], model=model)


# --- PPO ------------------------------------------------------------------------------------------------------------

def test_sequence_logprobs_shift_by_one_and_ignore_left_padding(lm):
    model, params = lm
    rng = np.random.default_rng(4)
    tokens = rng.integers(3, CFG.vocab_size, (1, 8)).astype(np.int32)
    logits, _ = _apply(model)(params, tokens)
    logp_all = _log_softmax(np.asarray(logits) / 0.8)
    want = np.array([logp_all[0, t - 1, tokens[0, t]] for t in range(1, 8)])  # logit at t−1 predicts token t
    want_entropy = np.array([-(np.exp(logp_all[0, t - 1]) * logp_all[0, t - 1]).sum() for t in range(1, 8)])
    padded = np.concatenate([np.zeros((1, 3), np.int32), tokens], 1)
    padded_valid = np.arange(11)[None] >= 3
    for chunk in (0, 4):
        logp, entropy = jax.jit(lambda p, x, v: ppo.sequence_logprobs(
            p, x, v, model=model, temperature=0.8, loss_chunk=chunk, with_entropy=True))(params, padded, padded_valid)
        # Column 3 holds the first real token: nothing predicts it. Columns 4.. are tokens 1.. of the sequence.
        np.testing.assert_allclose(logp[0, 4:], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(entropy[0, 4:], want_entropy, rtol=1e-5, atol=1e-5)
        assert logp[0, 0] == 0


def _rollout_minibatch(rng, prompt_len, response_len, batch):
    t = prompt_len + response_len
    tokens = rng.integers(3, CFG.vocab_size, (batch, t)).astype(np.int32)
    valid = np.ones((batch, t), bool)
    valid[0, :2] = False  # one left-padded prompt
    valid[1, -1] = False  # one response ending early (right padding)
    mask = valid & (np.arange(t)[None] >= prompt_len)
    return tokens, valid, mask


def test_ppo_loss_first_step_closed_form_and_ptx(lm):
    model, params = lm
    value_model = ScoreModel(CFG)
    value_params = _score_params(params, seed=5)
    rng = np.random.default_rng(5)
    tokens, valid, mask = _rollout_minibatch(rng, 4, 4, 3)
    old_logp, _ = jax.jit(lambda p, x, v: ppo.sequence_logprobs(p, x, v, model=model))(params, tokens, valid)
    old_values = jax.jit(lambda p, x, v: ppo.sequence_values(p, x, v, model=value_model))(value_params, tokens, valid)
    # The value of the state before token t is the head's output at t−1 (on rows laid out without padding).
    scores = _apply(value_model)(value_params, tokens[2:])
    np.testing.assert_allclose(old_values[2:, 1:], scores[:, :-1], rtol=1e-5, atol=1e-6)
    adv = rng.normal(size=mask.shape).astype(np.float32)
    returns = rng.normal(size=mask.shape).astype(np.float32)
    minibatch = {"tokens": tokens, "valid": valid, "response_mask": mask, "old_logprobs": old_logp,
                 "old_values": old_values, "advantages": adv, "returns": returns, "ptx": _lm_batch(6)}
    cfg = ppo.PPOConfig(ptx_coef=2.0, vf_coef=0.1)
    f = jax.jit(jax.value_and_grad(
        lambda p, v, b: ppo.ppo_loss(p, v, b, None, policy_model=model, value_model=value_model, cfg=cfg),
        argnums=(0, 1), has_aux=True))
    (loss, metrics), (g_policy, g_value) = f(params, value_params, minibatch)
    # At the first step new == old: ρ = 1, nothing clipped, loss_pg = −mean(A), loss_v = 0.5·mean((V − R)²).
    m = mask.astype(np.float64)
    np.testing.assert_allclose(metrics["policy_loss"], -(adv * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["value_loss"], 0.5 * (((old_values - returns) ** 2) * m).sum() / m.sum(),
                               rtol=1e-5)
    assert float(metrics["clip_frac"]) == 0 and abs(float(metrics["approx_kl"])) < 1e-6
    ptx, _ = jax.jit(lambda p, b: pretrain.lm_loss(p, b, None, model=model, deterministic=True))(params,
                                                                                              minibatch["ptx"])
    np.testing.assert_allclose(metrics["ptx_loss"], ptx, rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["policy_loss"] + 0.1 * metrics["value_loss"] + 2.0 * ptx, rtol=1e-5)
    for g in (g_policy, g_value):
        norm = np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(g)))
        assert np.isfinite(norm) and norm > 0
    with pytest.raises(KeyError, match="ptx"):
        ppo.ppo_loss(params, value_params, {k: v for k, v in minibatch.items() if k != "ptx"}, None,
                     policy_model=model, value_model=value_model, cfg=cfg)
