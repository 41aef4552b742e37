"""DPO / IPO (gptjax.stages.dpo) and rejection sampling (gptjax.stages.rejection_sampling).

Independent references: the preference loss against a NumPy loop over each ranking's C(K, 2) pairs (DPO's
−log σ(β·h) and IPO's (h − 1/(2β))²); its gradient's sign (it raises the better response's log-prob and lowers the
worse one's); one DPO step on a tiny GPT moves the sequence log-probs that way; the preference arrays' response mask
against the chat renderer; rejection sampling's pick against the argmax of the reward model's scores (computed
here, without the stage); and tiny runs of both methods on a programmatic reward (how many response tokens are 7):
the reward rises while the KL to the reference stays bounded.
"""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import sampling
from gptjax.data import chat, post_training
from gptjax.model import GPT, GPTConfig, ScoreModel
from gptjax.stages import dpo, rl, sft
from gptjax.stages import rejection_sampling as rs
from gptjax.stages.online.rewards import ModelReward
from gptjax.stages.reward import reward_scores
from gptjax.stages.rollouts import Rollouts
from gptjax.tokenizers import make_tokenizer


def _np_preference_loss(logp, ref, num_ranked, beta, kind):
    per_element = []
    for b in range(len(logp)):
        pairs = list(itertools.combinations(range(int(num_ranked[b])), 2))
        if not pairs:
            continue
        losses = []
        for i, j in pairs:
            h = (logp[b, i] - ref[b, i]) - (logp[b, j] - ref[b, j])
            losses.append(np.log1p(np.exp(-beta * h)) if kind == "sigmoid" else (h - 1 / (2 * beta)) ** 2)
        per_element.append(np.mean(losses))
    return np.mean(per_element)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_preference_loss_equals_numpy_pairs(kind):
    rng = np.random.default_rng(0)
    logp = rng.normal(-20, 3, (4, 4)).astype(np.float32)
    ref = (logp + rng.normal(0, 1, (4, 4))).astype(np.float32)
    num_ranked = np.array([4, 2, 3, 0], np.int32)  # the last element is padding: no pairs, left out of the mean
    loss, metrics = dpo.preference_loss(logp, ref, num_ranked, beta=0.1, loss=kind)
    np.testing.assert_allclose(loss, _np_preference_loss(logp.astype(np.float64), ref, num_ranked, 0.1, kind),
                               rtol=1e-5)
    assert float(metrics["num_pairs"]) == 6 + 1 + 3


def test_preference_gradient_raises_chosen_and_lowers_rejected():
    logp = jnp.array([[-10.0, -12.0, -9.0]])
    ref = jnp.array([[-11.0, -11.0, -11.0]])
    for kind in ("sigmoid", "ipo"):
        grad = jax.grad(lambda x: dpo.preference_loss(x, ref, jnp.array([3]), beta=0.1, loss=kind)[0])(logp)
        # Gradient descent moves each log-prob against its gradient: the best (slot 0) up, the worst (slot 2) down.
        assert grad[0, 0] < 0 < grad[0, 2], (kind, grad)


CFG = GPTConfig(vocab_size=48, max_len=16, num_layers=1, d_model=32, num_heads=2, scan_layers=False)
P, R, TARGET = 4, 3, 7


def _init(module, seed=0):
    return nn.unbox(jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def _preference_batch(rng, n):
    """n prompts with K = 2 random responses; the one with more 7s ranked first (ties dropped by num_ranked = 0)."""
    prompts = rng.integers(10, CFG.vocab_size, (n, 1, P))
    responses = np.where(rng.random((n, 2, R)) < 0.3, TARGET, rng.integers(10, CFG.vocab_size, (n, 2, R)))
    count = (responses == TARGET).sum(-1)
    order = np.argsort(-count, axis=1, kind="stable")
    responses = np.take_along_axis(responses, order[..., None], axis=1)
    tokens = np.concatenate([np.repeat(prompts, 2, 1), responses], -1).astype(np.int32)
    return {"tokens": tokens, "valid": np.ones(tokens.shape, bool),
            "response_mask": np.broadcast_to(np.arange(P + R) >= P, tokens.shape).copy(),
            "num_ranked": np.where(count.max(1) > count.min(1), 2, 0).astype(np.int32)}


def test_one_dpo_step_moves_logprobs_the_right_way():
    model = GPT(CFG)
    params = _init(model)
    batch = _preference_batch(np.random.default_rng(1), 8)
    batch["ref_logprobs"] = dpo.reference_logprobs(model, params, batch, batch_rows=16)
    loss_fn = functools.partial(dpo.dpo_loss, model=model, cfg=dpo.DPOConfig(beta=0.5))
    grads = jax.grad(lambda p: loss_fn(p, batch, None)[0])(params)
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    after = dpo.reference_logprobs(model, stepped, batch, batch_rows=16)
    ranked = batch["num_ranked"] == 2
    assert ranked.sum() >= 3
    change = after[ranked] - batch["ref_logprobs"][ranked]
    # On average over the pairs the better response's log-prob rises and the worse one's falls; every pair's
    # margin h grows (what the loss decreases with).
    assert change[:, 0].mean() > 0 > change[:, 1].mean(), change
    assert np.all(change[:, 0] > change[:, 1]), change


def test_preference_arrays_mask_exactly_the_responses():
    tok = make_tokenizer("bytes")
    records = [{"prompt": "Is 27 prime?", "responses": ["No, 3 × 9.", "Yes."]}]
    ex = post_training.preference_examples(records, tok, 64)
    prompt_len = len(chat.render_prompt(chat.user_turn("Is 27 prime?"), tok))
    for k, text in enumerate(records[0]["responses"]):
        response = chat.render_response(text, tok)
        np.testing.assert_array_equal(ex["tokens"][0, k][ex["response_mask"][0, k]], response)
        assert ex["response_mask"][0, k, :prompt_len].sum() == 0
    ranking = post_training.ranking_examples(records, tok, 64)
    assert set(ranking) == {"tokens", "valid", "num_ranked"}  # the reward model's batches are unchanged
    np.testing.assert_array_equal(ranking["tokens"], ex["tokens"])


def test_rejection_sampling_keeps_the_reward_models_argmax():
    tok = make_tokenizer("bytes")
    cfg = GPTConfig(vocab_size=384, max_len=64, num_layers=1, d_model=32, num_heads=2, scan_layers=False)
    scorer = ScoreModel(cfg)
    reward = ModelReward(scorer, _init(scorer, 3), "test")
    questions = ["Is 27 prime?", "Is 13 prime?"]
    answers = [["No.", "Yes.", "27 = 3 × 9.", "Maybe"], ["Yes, 13 is prime.", "No.", "13", "Prime."]]
    conversations = [chat.user_turn(q) for q in questions]
    prompts = [chat.render_prompt(c, tok) for c in conversations]
    rcfg = rs.RSConfig(rounds=1, prompts_per_round=2, samples_per_prompt=4)
    order = rs._draw(0, 0, 2, 2)  # the prompts the round draws, in its order
    rows = [np.concatenate([prompts[p], chat.render_response(a, tok)]) for p in order for a in answers[p]]
    T = max(map(len, rows))
    tokens = np.stack([np.pad(r, (0, T - len(r)), constant_values=tok.pad_id) for r in rows]).astype(np.int32)
    valid = np.stack([np.arange(T) < len(r) for r in rows])
    response = np.stack([(np.arange(T) >= len(prompts[order[i // 4]])) & v for i, v in enumerate(valid)])
    finished = np.ones(8, bool)
    finished[list(order).index(0) * 4 + 3] = False  # prompt 0's last answer never ended

    class Engine:  # the sampled rows, in the order sample_round asks for them (its prompts, 4 answers each)
        def generate(self, params, prompt_ids, seed):
            assert [len(p) for p in prompt_ids] == [len(prompts[order[i // 4]]) for i in range(8)]
            return Rollouts(tokens, valid, response, finished, None)

    kept, metrics = rs.sample_round(Engine(), None, conversations, prompts, reward, tok, rcfg, seed=0,
                                    round_index=0)
    scores = reward_scores(scorer, reward.params, tokens, valid).reshape(2, 4)
    assert len(kept) == 2 and metrics["rs/samples"] == 8
    for g, record in enumerate(kept):
        best = int(np.argmax(np.where(finished.reshape(2, 4)[g], scores[g], -np.inf)))
        assert record["messages"][-1]["content"] == answers[order[g]][best]
        assert record["messages"][:-1] == conversations[order[g]]
        assert record["meta"]["score"] == pytest.approx(float(scores[g, best]))
    best, keep = rs.pick_best(np.array([[1.0, 3.0, 3.0], [5.0, 0.0, 0.0]]), np.array([[1, 1, 1], [0, 0, 0]]))
    assert best[0] == 1 and list(keep) == [True, False]  # ties: the first; nothing finished: nothing kept


# --- tiny runs on a programmatic reward ---------------------------------------------------------------------------

def _sampler(model):
    cfg = sampling.SamplingConfig(max_new_tokens=R, temperature=1.0, eos_id=None)
    return jax.jit(functools.partial(sampling.sample, model, cfg=cfg))


def _score_and_kl(model, sample, params, ref_params, prompts, key):
    """(mean count of TARGET per response, mean Σ log π − log π_ref) on fresh samples from ``params``."""
    out = sample(params, prompts, jnp.ones(prompts.shape, bool), key)
    tokens = jnp.concatenate([prompts, out.tokens_BN], 1)
    valid, mask = jnp.ones(tokens.shape, bool), jnp.arange(P + R) >= P
    logp = rl.sequence_logprobs(params, tokens, valid, model=model)[0]
    ref = rl.sequence_logprobs(ref_params, tokens, valid, model=model)[0]
    return float(jnp.mean(jnp.sum(out.tokens_BN == TARGET, 1))), float(jnp.mean(jnp.sum((logp - ref) * mask, 1)))


def test_tiny_dpo_run_raises_programmatic_reward_with_bounded_kl():
    model = GPT(CFG)
    ref_params = _init(model)
    batch = _preference_batch(np.random.default_rng(2), 64)
    batch["ref_logprobs"] = dpo.reference_logprobs(model, ref_params, batch, batch_rows=64)
    loss_fn = jax.jit(jax.value_and_grad(lambda p, b: dpo.dpo_loss(p, b, None, model=model,
                                                                    cfg=dpo.DPOConfig(beta=0.3))[0]))
    opt = optax.adam(3e-3)
    params, state = ref_params, opt.init(ref_params)
    for _ in range(40):
        _, grads = loss_fn(params, batch)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    prompts = jnp.asarray(np.random.default_rng(3).integers(10, CFG.vocab_size, (256, P)), jnp.int32)
    sample = _sampler(model)
    before, _ = _score_and_kl(model, sample, ref_params, ref_params, prompts, jax.random.key(0))
    after, kl = _score_and_kl(model, sample, params, ref_params, prompts, jax.random.key(0))
    assert before < 0.25 and after > before + 0.3, (before, after)
    assert 0 < kl < 0.5 * R * math.log(CFG.vocab_size), kl


def test_tiny_rejection_sampling_rounds_raise_programmatic_reward_with_bounded_kl():
    model = GPT(CFG)
    ref_params = _init(model)
    sample = _sampler(model)
    N, n_prompts = 8, 64
    prompts = jnp.asarray(np.random.default_rng(4).integers(10, CFG.vocab_size, (n_prompts, P)), jnp.int32)
    loss = functools.partial(sft.sft_loss, model=model, deterministic=True)  # the stage's fine-tuning loss
    step = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, None)[0]))
    opt = optax.adam(3e-3)
    params = ref_params
    for round_index in range(3):
        repeated = jnp.repeat(prompts, N, 0)
        out = sample(params, repeated, jnp.ones(repeated.shape, bool), jax.random.key(10 + round_index))
        scores = np.asarray(jnp.sum(out.tokens_BN == TARGET, 1)).reshape(n_prompts, N)
        best, keep = rs.pick_best(scores, np.ones_like(scores, bool))
        chosen = np.asarray(out.tokens_BN).reshape(n_prompts, N, R)[np.arange(n_prompts), best]
        rows = np.concatenate([np.asarray(prompts), chosen], 1)[keep]
        lm = {"inputs": rows[:, :-1], "targets": rows[:, 1:],
              "weights": np.broadcast_to(np.arange(P + R - 1) >= P - 1, (len(rows), P + R - 1)).astype(np.float32)}
        state = opt.init(params)
        for _ in range(10):  # the SFT loss on the kept answers
            _, grads = step(params, lm)
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    before, _ = _score_and_kl(model, sample, ref_params, ref_params, prompts, jax.random.key(1))
    after, kl = _score_and_kl(model, sample, params, ref_params, prompts, jax.random.key(1))
    assert before < 0.25 and after > before + 0.3, (before, after)
    assert 0 < kl < 0.5 * R * math.log(CFG.vocab_size), kl
