"""The KV-cache sampler against full forwards without a cache, and its sampling distributions against softmax.

References: the model's plain (cache-free) forward on each unpadded prompt + generated sequence (second
implementation of every decode step: logits, greedy argmax, log-probs); each prompt sampled alone (padding
invariance); exact softmax / top-k / nucleus probabilities computed in float64 numpy (chi-square test on the
empirical frequencies); the no-EOS run truncated by hand (per-row EOS stop).

Models are tiny presets with random weights (init_std 0.15 so that greedy outputs vary and distributions
are peaked enough to test, while logits stay O(1) so the 1e-5 tolerance is meaningful), float32.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gptjax.errors import ConfigError
from gptjax.model import GPT, unstack_layers
from gptjax.presets import preset_config
from gptjax.sampling import SamplingConfig, _categorical, left_pad, make_sampler, prompt_and_response

PROMPTS = [[5, 17, 300, 42, 7, 99, 256, 3, 11, 64], [8, 1], [400, 23, 23, 90, 12], [77]]
N_NEW = 12
# Shared by several tests so the program compiles once; per-step logits are cheap at this size.
GREEDY = SamplingConfig(max_new_tokens=N_NEW, temperature=0.0, return_logits=True)
REF_SHAPE = (len(PROMPTS), max(map(len, PROMPTS)) + N_NEW)


@functools.lru_cache(maxsize=None)
def _model(name, scan_layers=True):
    cfg = preset_config(name, init_std=0.15)
    params = nn.unbox(jax.jit(GPT(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    if not scan_layers:  # same weights, unscanned layout: the cache becomes a list of per-group dicts
        cfg, params = cfg.replace(scan_layers=False), unstack_layers(params)
    return GPT(cfg), params


@functools.lru_cache(maxsize=None)
def _sampler(cfg, name="tiny", scan_layers=True):
    """One jitted sampler per (model, config), reused across tests so each compiles once."""
    return make_sampler(_model(name, scan_layers)[0], cfg)


@functools.lru_cache(maxsize=None)
def _forward(name):
    model, params = _model(name)
    return jax.jit(lambda tokens_BT: model.apply({"params": params}, tokens_BT)[0])


def _full_logits(name, seqs):
    """Cache-free forward of each unpadded sequence -> list of (len, V) float64 arrays.

    Sequences are right-padded into one fixed-shape batch (one compile); under causal attention the
    padding after a sequence cannot change its logits.
    """
    tokens = np.zeros(REF_SHAPE, np.int32)
    for i, seq in enumerate(seqs):
        tokens[i, :len(seq)] = seq
    logits = np.asarray(_forward(name)(tokens), np.float64)
    return [logits[i, :len(seq)] for i, seq in enumerate(seqs)]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _generated(out, i):
    return [int(t) for t, m in zip(out.tokens_BN[i], out.mask_BN[i]) if m]


@pytest.mark.parametrize("name,scan,unroll,segments", [
    ("tiny", True, True, 1), ("tiny", True, False, 1), ("tiny", False, True, 1), ("tiny", True, True, 3),
    ("tiny", True, False, 4), ("tiny-gpt1", True, True, 1), ("tiny-sparse", True, True, 1),
    ("tiny-sparse", True, True, 3)])
def test_decode_logits_equal_full_forward_at_every_step(name, scan, unroll, segments):
    """Also: the padded batch's greedy tokens are the argmax of each prompt's own (unpadded) forward.

    A scanned model decodes unrolled by default (SamplingConfig.unroll_layers) and through the scan otherwise;
    with decode_segments > 1 each loop attends over a prefix of the cache only.
    """
    model, params = _model(name, scan)
    toks, valid = left_pad(PROMPTS, pad_id=0)
    cfg = dataclasses.replace(GREEDY, unroll_layers=unroll, decode_segments=segments)
    out = _sampler(cfg, name, scan)(params, toks, valid, None)
    assert bool(out.mask_BN.all())  # no EOS: every step is a real decode step
    seqs = [prompt + _generated(out, i) for i, prompt in enumerate(PROMPTS)]
    for i, (prompt, full) in enumerate(zip(PROMPTS, _full_logits(name, seqs))):
        steps = full[len(prompt) - 1:len(prompt) - 1 + N_NEW]  # the logits that predict each new token
        np.testing.assert_allclose(np.asarray(out.logits_BNV[i]), steps, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(_generated(out, i), steps.argmax(-1))
        np.testing.assert_allclose(np.asarray(out.logprobs_BN[i]),
                                   _log_softmax(steps)[np.arange(N_NEW), _generated(out, i)], atol=1e-5)
    if name == "tiny-sparse":
        # The band must matter here, or this test would not check it: the same weights with dense layers only
        # give other logits on the longest sequence (22 tokens against a window of 8).
        dense = GPT(model.cfg.replace(attention_pattern=("dense", "dense")))
        dense_logits = jax.jit(lambda t: dense.apply({"params": params}, t)[0])(jnp.asarray(seqs[:1], jnp.int32))
        assert np.abs(np.asarray(dense_logits[0]) - _full_logits(name, seqs[:1])[0]).max() > 1e-2


def test_padded_batch_equals_each_prompt_alone():
    model, params = _model("tiny")
    sampler = _sampler(GREEDY)
    toks, valid = left_pad(PROMPTS, pad_id=0)
    batch = np.asarray(sampler(params, toks, valid, None).tokens_BN)
    assert len({tuple(r) for r in batch}) == len(PROMPTS)  # rows differ, so a row mix-up would show
    for i, prompt in list(enumerate(PROMPTS))[1:]:  # the rows that the batch pads
        alone = sampler(params, np.asarray([prompt], np.int32), np.ones((1, len(prompt)), bool), None)
        np.testing.assert_array_equal(batch[i], np.asarray(alone.tokens_BN[0]))


def test_eos_stops_each_row_and_pads_after():
    model, params = _model("tiny")
    N, pad = N_NEW, 511
    toks, valid = left_pad(PROMPTS, pad_id=0)
    free = np.asarray(_sampler(GREEDY)(params, toks, valid, None).tokens_BN)
    # EOS := a token row 0 emits mid-way; rows that never emit it must run to max_new_tokens untouched.
    eos = int(free[0, 4])
    assert eos in free[0, :5] and any(eos not in row for row in free), "pick another EOS for a meaningful test"
    out = _sampler(SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=eos, pad_id=pad))(
        params, toks, valid, None)
    for i, row in enumerate(free):
        stop = list(row).index(eos) + 1 if eos in row else N
        np.testing.assert_array_equal(out.tokens_BN[i], list(row[:stop]) + [pad] * (N - stop))
        np.testing.assert_array_equal(out.mask_BN[i], [True] * stop + [False] * (N - stop))
        assert int(out.lengths_B[i]) == stop and bool(out.finished_B[i]) == (eos in row)
        assert np.all(np.asarray(out.logprobs_BN[i, stop:]) == 0)
    # Every row done early (all rows are prompt 0): the loop exits, and the output is still well formed.
    same = _sampler(SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=eos, pad_id=pad))(
        params, np.repeat(toks[:1], len(PROMPTS), 0), np.repeat(valid[:1], len(PROMPTS), 0), None)
    np.testing.assert_array_equal(same.tokens_BN, np.repeat(out.tokens_BN[:1], len(PROMPTS), 0))
    assert bool(same.finished_B.all()) and np.all(np.asarray(same.lengths_B) == list(free[0]).index(eos) + 1)
    # Segmented decoding: rows stop in different segments (or in none); later segments see every row done.
    segmented = _sampler(SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=eos, pad_id=pad,
                                        decode_segments=5))(params, toks, valid, None)
    for field in ("tokens_BN", "mask_BN", "lengths_B", "finished_B"):
        np.testing.assert_array_equal(getattr(segmented, field), getattr(out, field))


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model, params = _model("tiny")
    toks, valid = left_pad(PROMPTS, pad_id=0)
    greedy = _sampler(GREEDY)(params, toks, valid, None)
    for cfg in (SamplingConfig(max_new_tokens=N_NEW, temperature=1.5, top_k=1),
                SamplingConfig(max_new_tokens=N_NEW, temperature=1.5, top_p=1e-6)):
        out = _sampler(cfg)(params, toks, valid, jax.random.key(3))
        np.testing.assert_array_equal(out.tokens_BN, greedy.tokens_BN)


def _expected_probs(logits_V, temperature, top_k, top_p):
    """Reference truncated distribution in float64: softmax(l/T), keep top-k, then the smallest nucleus >= p."""
    z = logits_V / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    keep[order[:top_k or len(p)]] = True
    if top_p < 1:
        q = np.where(keep, p, 0) / p[keep].sum()
        cum = np.cumsum(q[order])
        n = int(np.searchsorted(cum, top_p) + 1)  # first index where the cumulative mass reaches top_p
        keep = np.zeros_like(keep)
        keep[order[:n]] = True
    p = np.where(keep, p, 0)
    return p / p.sum(), z - z.max() - np.log(np.exp(z - z.max()).sum())


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 20, 0.7)])
def test_first_token_frequencies_match_softmax(temperature, top_k, top_p):
    model, params = _model("tiny")
    prompt, R = PROMPTS[2], 6000
    toks = np.tile(np.asarray([prompt], np.int32), (R, 1))
    cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    out = _sampler(cfg)(params, toks, np.ones_like(toks, bool), jax.random.key(42))
    drawn = np.asarray(out.tokens_BN[:, 0])
    probs, logp_tempered = _expected_probs(_full_logits("tiny", [prompt])[0][-1], temperature, top_k, top_p)
    assert np.all(probs[drawn] > 0), "sampled a token outside the top-k / nucleus support"
    # log-probs are those of the tempered distribution before truncation (see SampleOutput).
    np.testing.assert_allclose(np.asarray(out.logprobs_BN[:, 0]), logp_tempered[drawn], atol=1e-5)
    # Chi-square goodness of fit; bins expected to hold < 5 samples are pooled.
    counts = np.bincount(drawn, minlength=len(probs)).astype(np.float64)
    expected = probs * R
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert len(obs) >= 4, "distribution too peaked to test"
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_categorical_draws_equal_jax_random_categorical():
    # The sampler's own categorical must draw exactly what jax.random.categorical draws with the same key,
    # including rows with masked (-inf) entries and rows of equal logits (ties between noisy values).
    logits_BV = jax.random.normal(jax.random.key(0), (64, 257)) * 3.0
    logits_BV = logits_BV.at[:8, 100:].set(-jnp.inf).at[8:16].set(0.0)
    for seed in range(5):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(jax.jit(_categorical)(key, logits_BV),
                                      jax.random.categorical(key, logits_BV, axis=-1))
    assert bool(jnp.all(jax.jit(_categorical)(jax.random.key(9), logits_BV)[:8] < 100))


def test_sampled_rollout_scores_like_full_forward():
    """Temperature-1 top-k rollouts: log-probs = the batched full forward's, tokens stay inside its top-k."""
    model, params = _model("tiny")
    N, k = N_NEW, 4
    toks, valid = left_pad(PROMPTS, pad_id=0)
    out = _sampler(SamplingConfig(max_new_tokens=N, temperature=1.0, top_k=k))(params, toks, valid, jax.random.key(7))
    tokens_BT, valid_BT, positions_BT = prompt_and_response(toks, valid, out)
    forward = jax.jit(lambda t, p, s: model.apply({"params": params}, t, p, s)[0])
    logits_BTV = forward(tokens_BT, positions_BT, valid_BT.astype(jnp.int32))  # padding = segment 0
    step_logits_BNV = logits_BTV[:, toks.shape[1] - 1:-1]  # the logits that predicted each new token
    logp_BNV = jax.nn.log_softmax(step_logits_BNV, axis=-1)
    chosen_BN = jnp.take_along_axis(logp_BNV, out.tokens_BN[..., None], axis=-1)[..., 0]
    mask = np.asarray(out.mask_BN)
    np.testing.assert_allclose(np.asarray(out.logprobs_BN)[mask], np.asarray(chosen_BN)[mask], atol=1e-5)
    kth_BN = jax.lax.top_k(step_logits_BNV, k)[0][..., -1]
    assert np.all(np.asarray(jnp.take_along_axis(step_logits_BNV, out.tokens_BN[..., None], -1)[..., 0]
                             >= kth_BN)[mask])


def test_left_pad_and_bad_input_errors():
    toks, valid = left_pad([[1, 2, 3], [4]], pad_id=9, length=4)
    np.testing.assert_array_equal(toks, [[9, 1, 2, 3], [9, 9, 9, 4]])
    np.testing.assert_array_equal(valid, [[False, True, True, True], [False, False, False, True]])
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        left_pad([[1], []], pad_id=0)
    with pytest.raises(ConfigError, match="length=2"):
        left_pad([[1, 2, 3]], pad_id=0, length=2)
    for bad, field in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                       (dict(cache_dtype="int8"), "cache_dtype")):
        with pytest.raises(ConfigError, match=f"sampling.{field}"):
            SamplingConfig(**bad)
    model, params = _model("tiny")  # max_len 128
    toks, valid = left_pad([[1] * 100], pad_id=0)
    with pytest.raises(ConfigError, match=r"100 \+ sampling.max_new_tokens=29 = 129 exceeds .*max_len=128"):
        make_sampler(model, SamplingConfig(max_new_tokens=29, temperature=0.0))(params, toks, valid, None)
    with pytest.raises(ConfigError, match="PRNG key"):
        make_sampler(model, SamplingConfig(max_new_tokens=2))(params, toks, valid, None)
