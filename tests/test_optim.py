"""The optimizer recipe against closed-form references.

- lr schedule: linear warmup + cosine to a fraction of the peak, written out with ``math`` at every step;
- the AdamW chain's first update equals the hand-written AdamW step (GPT-3: β 0.9/0.95, ε 1e-8, decoupled
  weight decay 0.1 on matrices only, global-norm clip 1.0);
- the batch ramp equals an independent loop over its definition, and has the ramp's properties;
- the weight-decay mask is exactly the hand-listed set of matrices (nanoGPT's rule).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from gptjax.errors import ConfigError
from gptjax.model import GPT, ScoreModel, abstract_params
from gptjax.presets import preset_config
from gptjax.train.optim import BatchRamp, decay_mask, lr_schedule, make_optimizer


def optim_cfg(**overrides):
    c = ml_collections.ConfigDict(dict(lr=6e-4, warmup_steps=10, decay_steps=0, final_lr_fraction=0.1, b1=0.9,
                                       b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=1,
                                       ramp_start_tokens=0, ramp_tokens=0))
    c.update(overrides)
    return c


def reference_lr(step, peak, warmup, decay, final_fraction):
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= decay:
        return peak * final_fraction
    progress = (step - warmup) / (decay - warmup)
    final = peak * final_fraction
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup,decay,fraction", [(10, 100, 0.1), (0, 50, 0.1), (375, 2000, 0.0), (5, 5, 0.5)])
def test_schedule_equals_formula(warmup, decay, fraction):
    schedule = jax.jit(lr_schedule(6e-4, warmup_steps=warmup, decay_steps=decay, final_lr_fraction=fraction))
    steps = np.arange(0, decay + 20)
    got = np.asarray(jax.vmap(schedule)(steps))
    want = np.array([reference_lr(int(s), 6e-4, warmup, decay, fraction) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
    if warmup:
        assert got[warmup - 1] == pytest.approx(6e-4)  # peak reached at the end of warmup
    assert got[-1] == pytest.approx(6e-4 * fraction, abs=1e-12)


def test_first_adamw_update_equals_hand_computation():
    params = {"dense": {"kernel": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "bias": jnp.array([0.1, -0.2])}}
    grads = {"dense": {"kernel": jnp.array([[3.0, -4.0], [0.0, 12.0]]), "bias": jnp.array([0.0, 0.0])}}
    cfg = optim_cfg(warmup_steps=4)
    tx, schedule = make_optimizer(cfg, total_steps=100, params=params)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = 6e-4 * 1 / 4  # first warmup step
    norm = math.sqrt(9 + 16 + 144)  # 13 > clip 1.0
    for name, decays in (("kernel", True), ("bias", False)):
        g = np.asarray(grads["dense"][name]) / norm
        m_hat, v_hat = g, g * g  # first Adam step: bias-corrected moments are g and g^2
        want = -lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + (0.1 * np.asarray(params["dense"][name]) if decays else 0))
        np.testing.assert_allclose(np.asarray(updates["dense"][name]), want, rtol=1e-5, atol=1e-12)
    assert float(schedule(0)) == pytest.approx(lr)


def reference_ramp(full, micro, seq_len, start_tokens, ramp_tokens, steps):
    sizes, seen = [], 0
    for _ in range(steps):
        frac = min(seen / ramp_tokens, 1.0)
        target_seqs = (start_tokens + (full * seq_len - start_tokens) * frac) / seq_len
        k = min(max(math.floor(target_seqs / micro + 0.5), 1), full // micro)
        sizes.append(k * micro)
        seen += k * micro * seq_len
    return sizes


def test_batch_ramp_equals_formula():
    full, micro, T = 256, 8, 2048
    ramp = BatchRamp(full, micro, T, start_tokens=32 * 1024, ramp_tokens=20_000_000)
    steps = 400
    got = [ramp.microbatches_at(s) * micro for s in range(steps)]
    assert got == reference_ramp(full, micro, T, 32 * 1024, 20_000_000, steps)
    assert got[0] == 16  # 32k tokens / 2048 = 16 sequences = 2 microbatches
    assert all(b % micro == 0 for b in got) and got == sorted(got)  # whole microbatches, never shrinking
    assert got[-1] == full
    # Full once ramp_tokens are seen; still ramping while the target is more than half a microbatch short.
    short = 1 - (micro / 2 * T) / (full * T - 32 * 1024)
    for s in range(steps):
        frac = ramp.tokens_before(s) / 20_000_000
        assert (got[s] == full) if frac >= 1 else (got[s] < full if frac < short else True)
    assert ramp.tokens_before(10) == sum(got[:10]) * T


def test_batch_ramp_off_and_validation():
    ramp = BatchRamp(64, 16, 128)
    assert [ramp.microbatches_at(s) for s in range(3)] == [4, 4, 4]
    assert ramp.tokens_before(3) == 3 * 64 * 128
    with pytest.raises(ConfigError, match="not a multiple of the microbatch"):
        BatchRamp(60, 16, 128)


def _paths(tree):
    return {"/".join(str(k.key) for k in path): bool(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_is_exactly_the_matrices(scan):
    cfg = preset_config("tiny", scan_layers=scan)
    mask = _paths(decay_mask(nn.unbox(abstract_params(GPT(cfg), cfg))))
    layers = ["groups/block_0"] if scan else [f"groups_{i}/block_0" for i in range(cfg.num_layers)]
    decayed = {"decoder/wte/embedding", "decoder/wpe/embedding"}
    for layer in layers:
        decayed |= {f"decoder/{layer}/{m}/kernel" for m in ("attn/qkv", "attn/out", "mlp/fc", "mlp/proj")}
    assert {p for p, d in mask.items() if d} == decayed
    not_decayed = {p for p, d in mask.items() if not d}
    assert not_decayed and all(p.endswith(("/bias", "/scale")) for p in not_decayed)
    assert len(not_decayed) == 2 + len(layers) * 8  # ln_f (2) + per layer: 4 biases + 2 LayerNorms x 2


def test_decay_mask_untied_head_and_score_head():
    cfg = preset_config("tiny", tie_embeddings=False)
    assert _paths(decay_mask(nn.unbox(abstract_params(GPT(cfg), cfg))))["lm_head"] is True
    mask = _paths(decay_mask(nn.unbox(abstract_params(ScoreModel(cfg), cfg))))
    assert mask["score/kernel"] is True and mask["score/bias"] is False


def test_decay_mask_refuses_unknown_parameter_names():
    with pytest.raises(ConfigError, match="no weight-decay rule"):
        decay_mask({"layer": {"gamma": jnp.ones(3)}})


@pytest.mark.parametrize("field,value,message", [
    ("lr", 0.0, "optim.lr"), ("warmup_steps", 200, "shorter than optim.warmup_steps"),
    ("final_lr_fraction", 1.5, "final_lr_fraction"), ("b2", 1.0, "optim.b2"), ("grad_accum_steps", 0, "grad_accum"),
])
def test_bad_optim_config_is_one_clear_error(field, value, message):
    with pytest.raises(ConfigError, match=message):
        make_optimizer(optim_cfg(**{field: value}), total_steps=100, params={"w": {"kernel": jnp.ones((2, 2))}})


def _frozen_case():
    rng = np.random.default_rng(0)
    params = {"decoder": {"wte": {"embedding": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)},
                          "ln_f": {"scale": jnp.ones(3)}},
              "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    return params, grads


@pytest.mark.parametrize("trainable", [(), (1, 4)])
def test_frozen_embedding_keeps_its_rows_except_the_trainable_ones(trainable):
    """Frozen parameters never move (not even by weight decay), and they count nowhere: every other update, the
    trainable rows' included, equals an unfrozen optimizer's given the same gradients with the frozen ones zeroed."""
    params, grads = _frozen_case()
    frozen_rows = np.setdiff1d(np.arange(6), trainable)
    tx, _ = make_optimizer(optim_cfg(warmup_steps=0, frozen=("decoder/wte",), trainable_token_ids=trainable),
                           total_steps=100, params=params)
    free, _ = make_optimizer(optim_cfg(warmup_steps=0), total_steps=100, params=params)
    zeroed = jax.tree.map(lambda g: g, grads)  # a copy of the tree
    zeroed["decoder"]["wte"]["embedding"] = grads["decoder"]["wte"]["embedding"].at[frozen_rows].set(0.0)
    state, free_state, p, q = tx.init(params), free.init(params), params, params
    for _ in range(3):
        updates, state = tx.update(grads, state, p)
        free_updates, free_state = free.update(zeroed, free_state, q)
        p, q = optax.apply_updates(p, updates), optax.apply_updates(q, free_updates)
    wte, ref = np.asarray(p["decoder"]["wte"]["embedding"]), np.asarray(q["decoder"]["wte"]["embedding"])
    np.testing.assert_array_equal(wte[frozen_rows], np.asarray(params["decoder"]["wte"]["embedding"])[frozen_rows])
    if trainable:
        np.testing.assert_allclose(wte[list(trainable)], ref[list(trainable)], rtol=1e-6)
        assert not np.allclose(wte[list(trainable)], np.asarray(params["decoder"]["wte"]["embedding"])[list(trainable)])
    for path in (("dense", "kernel"), ("decoder", "ln_f", "scale")):
        got, want = p, q
        for key in path:
            got, want = got[key], want[key]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_a_nan_gradient_in_a_frozen_row_stays_out_of_the_update():
    params, grads = _frozen_case()
    grads["decoder"]["wte"]["embedding"] = grads["decoder"]["wte"]["embedding"].at[0, 0].set(jnp.nan)
    tx, _ = make_optimizer(optim_cfg(frozen=("decoder/wte",), trainable_token_ids=(2,), clip_norm=0.0),
                           total_steps=100, params=params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("overrides,message", [
    (dict(trainable_token_ids=(1,)), "optim.frozen is empty"),
    (dict(frozen=("dense",), trainable_token_ids=(1,)), "does not freeze"),
    (dict(frozen=("decoder/wte",), trainable_token_ids=(6,)), r"6 is not a row of the 6-row token embedding"),
    (dict(frozen=("decoder/wte",), trainable_token_ids=(-1,)), r"-1 is not a row"),
    (dict(frozen=("decoder/wpe",)), "match no parameter"),
])
def test_bad_frozen_config_is_one_clear_error(overrides, message):
    params, _ = _frozen_case()
    with pytest.raises(ConfigError, match=message):
        make_optimizer(optim_cfg(**overrides), total_steps=100, params=params)
