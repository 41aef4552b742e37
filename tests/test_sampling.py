"""The KV-cache sampler against full forwards without a cache, and its sampling distributions against softmax.

References: the model's plain (cache-free) forward on each unpadded prompt + generated sequence (second
implementation of every decode step: logits, greedy argmax, log-probs); each prompt sampled alone (padding
invariance); exact softmax / top-k / nucleus probabilities computed in float64 numpy (chi-square test on the
empirical frequencies); the no-EOS run truncated by hand (per-row EOS stop).

Models are tiny presets with random weights (init_std 0.3 so that greedy outputs vary and distributions
are peaked enough to test), float32.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gptjax.model import GPT, ConfigError, unstack_layers
from gptjax.presets import preset_config
from gptjax.sampling import SamplingConfig, left_pad, make_sampler, prompt_and_response

PROMPTS = [[5, 17, 300, 42, 7, 99, 256, 3, 11, 64], [8, 1], [400, 23, 23, 90, 12], [77]]


@functools.lru_cache(maxsize=None)
def _model(name, scan_layers=True, **overrides):
    cfg = preset_config(name, init_std=0.3, **overrides)
    params = nn.unbox(GPT(cfg.replace(scan_layers=True)).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    if not scan_layers:  # same weights, unscanned layout: the cache becomes a list of per-group dicts
        cfg, params = cfg.replace(scan_layers=False), unstack_layers(params)
    return GPT(cfg), params


@functools.lru_cache(maxsize=None)
def _sampler(cfg, name="tiny", scan_layers=True):
    """One jitted sampler per (model, config), reused across tests so each compiles once."""
    return make_sampler(_model(name, scan_layers)[0], cfg)


def _full_logits(model, params, tokens):
    """Cache-free forward of one unpadded sequence -> (T, V) float64."""
    logits, _ = model.apply({"params": params}, jnp.asarray([tokens], jnp.int32))
    return np.asarray(logits[0], np.float64)


def _generated(out, i):
    return [int(t) for t, m in zip(out.tokens_BN[i], out.mask_BN[i]) if m]


@pytest.mark.parametrize("name,scan", [("tiny", True), ("tiny", False), ("tiny-gpt1", True), ("tiny-sparse", True)])
def test_decode_logits_equal_full_forward_at_every_step(name, scan):
    model, params = _model(name, scan)
    N = 12
    toks, valid = left_pad(PROMPTS, pad_id=0)
    out = _sampler(SamplingConfig(max_new_tokens=N, temperature=0.0, return_logits=True), name, scan)(
        params, toks, valid, None)
    assert bool(out.mask_BN.all())  # no EOS: every step is a real decode step
    for i, prompt in enumerate(PROMPTS):
        new = _generated(out, i)
        full = _full_logits(model, params, prompt + new)[len(prompt) - 1:len(prompt) - 1 + N]
        np.testing.assert_allclose(np.asarray(out.logits_BNV[i]), full, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(new, full.argmax(-1))
        logp = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(out.logprobs_BN[i]), logp[np.arange(N), new], atol=1e-5)
    if name == "tiny-sparse":
        # The band must matter here, or this test would not check it: the same weights with dense layers only
        # give other logits on the longest sequence (22 tokens against a window of 8).
        dense_model = GPT(model.cfg.replace(attention_pattern=("dense", "dense")))
        seq = PROMPTS[0] + _generated(out, 0)
        assert np.abs(_full_logits(dense_model, params, seq) - _full_logits(model, params, seq)).max() > 1e-2


@pytest.mark.parametrize("name", ["tiny", "tiny-sparse"])
def test_padded_batch_equals_each_prompt_alone(name):
    model, params = _model(name)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    sampler = _sampler(cfg, name)
    toks, valid = left_pad(PROMPTS, pad_id=0)
    batch = np.asarray(sampler(params, toks, valid, None).tokens_BN)
    for i, prompt in enumerate(PROMPTS):
        alone = sampler(params, np.asarray([prompt], np.int32), np.ones((1, len(prompt)), bool), None)
        np.testing.assert_array_equal(batch[i], np.asarray(alone.tokens_BN[0]))


def test_eos_stops_each_row_and_pads_after():
    model, params = _model("tiny")
    N, pad = 10, 511
    toks, valid = left_pad(PROMPTS, pad_id=0)
    free = np.asarray(_sampler(SamplingConfig(max_new_tokens=N, temperature=0.0))(
        params, toks, valid, None).tokens_BN)
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
    # Every row done early: the loop exits, and the output is still well formed.
    one = _sampler(SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=eos, pad_id=pad))(
        params, toks[:1], valid[:1], None)
    np.testing.assert_array_equal(one.tokens_BN[0], out.tokens_BN[0])
    assert bool(one.finished_B[0]) and int(one.lengths_B[0]) == list(free[0]).index(eos) + 1


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model, params = _model("tiny")
    toks, valid = left_pad(PROMPTS, pad_id=0)
    greedy = _sampler(SamplingConfig(max_new_tokens=8, temperature=0.0))(params, toks, valid, None)
    for cfg in (SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=1),
                SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=1e-6)):
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


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.5), (1.3, 20, 0.7)])
def test_first_token_frequencies_match_softmax(temperature, top_k, top_p):
    model, params = _model("tiny")
    prompt, R = PROMPTS[2], 6000
    toks = np.tile(np.asarray([prompt], np.int32), (R, 1))
    cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    out = _sampler(cfg)(params, toks, np.ones_like(toks, bool), jax.random.key(42))
    drawn = np.asarray(out.tokens_BN[:, 0])
    probs, logp_tempered = _expected_probs(_full_logits(model, params, prompt)[-1], temperature, top_k, top_p)
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


def test_sampled_rollout_scores_like_full_forward():
    """Temperature-1 top-k rollouts: log-probs = the batched full forward's, tokens stay inside its top-k."""
    model, params = _model("tiny")
    N, k = 10, 4
    toks, valid = left_pad(PROMPTS, pad_id=0)
    out = _sampler(SamplingConfig(max_new_tokens=N, temperature=1.0, top_k=k, eos_id=7, pad_id=0))(
        params, toks, valid, jax.random.key(7))
    tokens_BT, valid_BT, positions_BT = prompt_and_response(toks, valid, out)
    logits_BTV, _ = model.apply({"params": params}, tokens_BT, positions_BT, valid_BT.astype(jnp.int32))
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
                       (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(cache_dtype="int8"), "cache_dtype")):
        with pytest.raises(ConfigError, match=f"sampling.{field}"):
            SamplingConfig(**bad)
    model, params = _model("tiny")  # max_len 128
    toks, valid = left_pad([[1] * 100], pad_id=0)
    with pytest.raises(ConfigError, match=r"100 \+ sampling.max_new_tokens=29 = 129 exceeds .*max_len=128"):
        make_sampler(model, SamplingConfig(max_new_tokens=29, temperature=0.0))(params, toks, valid, None)
    with pytest.raises(ConfigError, match="PRNG key"):
        make_sampler(model, SamplingConfig(max_new_tokens=2))(params, toks, valid, None)
