"""The decoder against the papers' parameter counts, a materialised-mask reference, and invariances.

References: Brown et al. 2020 Table 2.1 and GPT-2 sizes recounted from the released checkpoints (Radford et al.
2019; both in docs/references.md); a plain-softmax
attention with an explicit mask (second implementation); properties (packing isolation, scan == loop,
remat == no remat, local attention's receptive field).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model as M
from gptjax.errors import ConfigError
from gptjax.presets import PRESETS, get_preset, preset_config


def _init(cfg, T=16, B=2, seed=0):
    m = M.GPT(cfg)
    toks = jnp.zeros((B, T), jnp.int32)
    return m, nn.unbox(m.init(jax.random.key(seed), toks)["params"])


def _tokens(cfg, B, T, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("gpt3")])
def test_gpt3_param_counts_within_2pct_of_table_2_1(name):
    p = get_preset(name)
    total = M.count_params(p.config)["total"]
    assert abs(total / p.paper_params - 1) <= 0.02, (name, total)


@pytest.mark.parametrize("name,recount", [("gpt2-small", 124e6), ("gpt2-medium", 355e6),
                                          ("gpt2-large", 774e6), ("gpt2-xl", 1558e6)])
def test_gpt2_param_counts_within_1pct(name, recount):
    assert abs(M.count_params(get_preset(name).config)["total"] / recount - 1) <= 0.01


def test_gpt2_small_exact_count_by_hand():
    # 124,439,808 is the parameter count of the released GPT-2 small checkpoint (tied head).
    V, T, D, L = 50257, 1024, 768, 12
    per_layer = (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D) + 4 * D
    assert M.count_params(get_preset("gpt2-small").config)["total"] == V * D + T * D + L * per_layer + 2 * D
    assert V * D + T * D + L * per_layer + 2 * D == 124_439_808


def test_gpt3_13b_constructible_as_printed():
    cfg = get_preset("gpt3-13b").config
    assert (cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.attn_width) == (5140, 40, 128, 5120)
    shapes = nn.unbox(M.abstract_params(M.GPT(cfg), cfg))["decoder"]["groups"]["block_0"]["attn"]
    assert shapes["qkv"]["kernel"].shape == (40, 5140, 3, 40, 128)
    assert shapes["out"]["kernel"].shape == (40, 40, 128, 5140)


def test_attention_matches_explicit_mask_reference():
    """jax.nn.dot_product_attention with is_causal/segment mask/window == softmax with a materialised mask."""
    cfg = preset_config("tiny-sparse")
    B, T = 2, 24
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, 4, 16)) for i in range(3))
    seg = jnp.array([[1] * 10 + [2] * 14, [1] * 24])
    masks = M.build_masks(cfg, T, seg, None)
    for local in (False, True):
        mask = masks.local if local else masks.dense
        window = masks.kernel_window if local else None
        fast = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            local_window_size=(window - 1, 0) if window else None)
        # Independent mask: same segment, causal, within window.
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        ref_mask = (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]) & (j <= i)
        if local:
            ref_mask &= (i - j) < cfg.local_window
        ref = M.reference_attention(q, k, v, jnp.asarray(ref_mask)[:, None], None, True)
        np.testing.assert_allclose(fast, ref, atol=1e-5)


@pytest.mark.parametrize("T", [20, 64, 100, 128])
def test_blocked_attention_equals_full_causal_softmax_in_value_and_gradient(T):
    """Query blocks over the keys they can see == one softmax over all keys under the materialised mask, with
    packed segments and with a local window that starts inside an earlier block (T 100: a short last block)."""
    B, N, H, window = 2, 2, 8, 40
    q, k, v, w = (jax.random.normal(jax.random.key(i), (B, T, N, H)) for i in range(4))
    seg_BT = jnp.asarray(np.repeat(np.arange(1, 6), -(-T // 5))[None, :T].repeat(B, 0))
    seg_mask_B1TT = (seg_BT[:, :, None] == seg_BT[:, None, :])[:, None]
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    for mask_B1TT, win in ((None, None), (seg_mask_B1TT, None), (seg_mask_B1TT, window)):
        want_mask = (j <= i) & ((i - j) < (win or T + 1))
        want_mask = jnp.asarray(want_mask)[None, None] & (True if mask_B1TT is None else mask_B1TT)

        def blocked(q, k, v):
            return jnp.sum(w * M.blocked_causal_attention(q, k, v, mask_B1TT, win))

        def full(q, k, v):
            return jnp.sum(w * M.reference_attention(q, k, v, want_mask, None, True))

        np.testing.assert_allclose(M.blocked_causal_attention(q, k, v, mask_B1TT, win),
                                   M.reference_attention(q, k, v, want_mask, None, True), atol=1e-5)
        for g_blocked, g_full in zip(jax.grad(blocked, (0, 1, 2))(q, k, v), jax.grad(full, (0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(g_blocked, g_full, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt1", "tiny-sparse"])
def test_scan_equals_loop_and_remat_equals_none(preset):
    cfg = preset_config(preset)
    m, params = _init(cfg)
    toks = _tokens(cfg, 2, 16)

    def loss(p, c):
        logits, _ = M.GPT(c).apply({"params": p}, toks[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1))

    ref_loss, ref_grads = jax.value_and_grad(loss)(params, cfg)
    loop_cfg = cfg.replace(scan_layers=False)
    l_loop, g_loop = jax.value_and_grad(loss)(M.unstack_layers(params), loop_cfg)
    assert abs(float(ref_loss - l_loop)) <= 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref_grads, M.stack_layers(g_loop))
    for policy in ("full", "save_dots", "save_dots_no_batch"):
        for c, p, conv in ((cfg.replace(remat=policy), params, lambda g: g),
                           (loop_cfg.replace(remat=policy), M.unstack_layers(params), M.stack_layers)):
            l_r, g_r = jax.value_and_grad(loss)(p, c)
            assert abs(float(ref_loss - l_r)) <= 1e-6, policy
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref_grads, conv(g_r))


@pytest.mark.parametrize("preset", ["tiny", "tiny-sparse"])
def test_packed_documents_do_not_see_each_other(preset):
    cfg = preset_config(preset)
    m, params = _init(cfg)
    T = 32
    seg = jnp.array([[1] * 9 + [2] * 15 + [3] * 8])
    pos = jnp.array([list(range(9)) + list(range(15)) + list(range(8))])
    toks = _tokens(cfg, 1, T)
    base, _ = m.apply({"params": params}, toks, pos, seg)
    # Change every token of document 2: documents 1 and 3 keep their logits exactly.
    changed = toks.at[:, 9:24].set((toks[:, 9:24] + 7) % cfg.vocab_size)
    out, _ = m.apply({"params": params}, changed, pos, seg)
    np.testing.assert_array_equal(np.asarray(base[:, :9]), np.asarray(out[:, :9]))
    np.testing.assert_array_equal(np.asarray(base[:, 24:]), np.asarray(out[:, 24:]))
    assert not np.allclose(base[:, 9:24], out[:, 9:24])
    # And each document equals that document run alone.
    alone, _ = m.apply({"params": params}, toks[:, 24:])
    np.testing.assert_allclose(base[:, 24:], alone, atol=1e-5)


def test_local_attention_receptive_field():
    # Only local layers: a token influences logits at most num_layers*(window-1) positions later.
    cfg = preset_config("tiny").replace(attention_pattern=("local",), local_window=4)
    m, params = _init(cfg, T=32)
    toks = _tokens(cfg, 1, 32)
    base, _ = m.apply({"params": params}, toks)
    out, _ = m.apply({"params": params}, toks.at[0, 0].set((toks[0, 0] + 1) % cfg.vocab_size))
    reach = cfg.num_layers * (cfg.local_window - 1)
    assert not np.allclose(base[0, reach], out[0, reach])
    np.testing.assert_array_equal(np.asarray(base[0, reach + 1:]), np.asarray(out[0, reach + 1:]))


def test_initialisation_follows_gpt2():
    cfg = preset_config("tiny").replace(d_model=256, num_heads=4, num_layers=4)
    _, params = _init(cfg)
    g = params["decoder"]["groups"]["block_0"]
    assert abs(float(jnp.std(g["mlp"]["fc"]["kernel"])) - 0.02) < 0.001
    assert abs(float(jnp.std(g["mlp"]["proj"]["kernel"])) - 0.02 / math.sqrt(2 * 4)) < 0.0005
    assert abs(float(jnp.std(g["attn"]["out"]["kernel"])) - 0.02 / math.sqrt(2 * 4)) < 0.0005
    assert float(jnp.abs(g["attn"]["qkv"]["bias"]).max()) == 0.0
    assert float(jnp.abs(g["ln_1"]["scale"] - 1).max()) == 0.0
    assert "ln_f" in params["decoder"]
    _, p1 = _init(preset_config("tiny-gpt1"))
    assert "ln_f" not in p1["decoder"]  # GPT-1 is post-LN without a final LayerNorm


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg = preset_config("tiny").replace(dtype="bfloat16")
    m, params = _init(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, _ = m.apply({"params": params}, _tokens(cfg, 2, 16))
    assert logits.dtype == jnp.float32
    ref, _ = M.GPT(cfg.replace(dtype="float32")).apply({"params": params}, _tokens(cfg, 2, 16))
    assert float(jnp.abs(logits - ref).max()) < 0.1


def test_dropout_is_active_only_when_not_deterministic():
    cfg = preset_config("tiny").replace(dropout_embed=0.1, dropout_resid=0.1, dropout_attn=0.1)
    m, params = _init(cfg)
    toks = _tokens(cfg, 2, 16)
    eval_a, _ = m.apply({"params": params}, toks)
    eval_b, _ = M.GPT(cfg.replace(dropout_embed=0, dropout_resid=0, dropout_attn=0)).apply({"params": params}, toks)
    np.testing.assert_allclose(eval_a, eval_b, atol=1e-6)
    tr1, _ = m.apply({"params": params}, toks, deterministic=False, rngs={"dropout": jax.random.key(1)})
    tr2, _ = m.apply({"params": params}, toks, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(tr1, tr2)


def test_score_model_reads_final_token_under_left_and_right_padding():
    cfg = preset_config("tiny")
    sm = M.ScoreModel(cfg)
    toks = _tokens(cfg, 1, 6)
    params = nn.unbox(sm.init(jax.random.key(0), toks)["params"])
    pad = 0
    right = jnp.concatenate([toks, jnp.full((1, 4), pad)], 1)
    right_valid = jnp.array([[True] * 6 + [False] * 4])
    alone = sm.apply({"params": params}, toks, jnp.ones((1, 6), bool), method=M.ScoreModel.reward)
    r_right = sm.apply({"params": params}, right, right_valid, method=M.ScoreModel.reward)
    np.testing.assert_allclose(alone, r_right, atol=1e-5)
    # Left padding: pads in their own segment, positions start at 0 at the first real token.
    left = jnp.concatenate([jnp.full((1, 4), pad), toks], 1)
    seg = jnp.array([[0] * 4 + [1] * 6])
    pos = jnp.array([[0] * 4 + list(range(6))])
    r_left = sm.apply({"params": params}, left, jnp.array([[False] * 4 + [True] * 6]), pos, seg,
                      method=M.ScoreModel.reward)
    np.testing.assert_allclose(alone, r_left, atol=1e-5)
    values = sm.apply({"params": params}, toks)
    assert values.shape == (1, 6) and values.dtype == jnp.float32
    np.testing.assert_allclose(values[:, -1], alone, atol=1e-5)


def test_last_valid_index():
    valid = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(M.last_valid_index(valid), [2, 4, 0])


@pytest.mark.parametrize("fields,needle", [
    (dict(d_model=64, num_heads=5), "num_heads=5 does not divide model.d_model=64"),
    (dict(remat="sometimes"), "valid choices: ['none', 'full', 'save_dots', 'save_dots_no_batch']"),
    (dict(attention_impl="flash"), "valid choices: ['auto', 'xla', 'cudnn', 'blocked']"),
    (dict(attention_pattern=("dense", "sparse")), "model.attention_pattern"),
    (dict(num_layers=3, attention_pattern=("dense", "local")), "multiple of len(model.attention_pattern)"),
])
def test_bad_config_raises_one_clear_error(fields, needle):
    with pytest.raises(ConfigError, match=None) as e:
        preset_config("tiny", **fields)
    assert needle in str(e.value)


def test_unknown_preset_and_field_and_too_long_sequence():
    with pytest.raises(ConfigError, match="valid presets: .*gpt2-small"):
        get_preset("gpt4")
    with pytest.raises(ConfigError, match="unknown model config field.*n_layers"):
        M.GPTConfig.from_dict({"n_layers": 3})
    cfg = preset_config("tiny")
    m, params = _init(cfg)
    with pytest.raises(ConfigError, match="exceeds model.max_len=128"):
        m.apply({"params": params}, jnp.zeros((1, 129), jnp.int32))
    with pytest.raises(ConfigError, match="exceeds model.max_len"):
        M.init_cache(cfg, 1, 200)
