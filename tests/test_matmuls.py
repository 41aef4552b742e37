"""``narrow_dot`` and ``GPTConfig.matmul_dtype``: bfloat16 operands, float32 accumulation, checked against float32
matmuls of the operands rounded to bfloat16 by hand (values and both gradients), and a float32 model with
``matmul_dtype="bfloat16"`` against the same model in float32."""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.errors import ConfigError
from gptjax.matmuls import narrow_dot
from gptjax.model import GPT, GPTConfig

BF16 = jnp.bfloat16


def _rounded(a):
    return np.asarray(jnp.asarray(a).astype(BF16).astype(jnp.float32), np.float64)


def _dots(fn, *args) -> Counter:
    """(batched, lhs type, rhs type) of every dot_general in ``fn``'s lowered program (StableHLO text). Batched
    dots are the attention's (heads and batch); the projections and the LM head contract without batch dims."""
    text = jax.jit(fn).lower(*args).as_text()
    lines = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    return Counter(("batching_dims" in line,) + re.search(r": \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)",
                                                            line).groups() for line in lines)


def test_narrow_dot_values_and_gradients_match_rounded_operands():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)  # (B, T, D)
    w = jnp.asarray(rng.normal(size=(16, 2, 4)), jnp.float32)  # (D, N, H): a 1-to-2 dimension projection
    dims = (((2,), (0,)), ((), ()))
    y = narrow_dot(x, w, dims, BF16)
    assert y.dtype == jnp.float32 and y.shape == (3, 5, 2, 4)
    expected = np.einsum("btd,dnh->btnh", _rounded(x), _rounded(w))
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-5)

    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    dx, dw = jax.grad(lambda a, b: jnp.sum(narrow_dot(a, b, dims, BF16) * g), argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.float32
    # Each backward matmul reads the gradient and the other operand rounded to bfloat16; its result is rounded
    # to bfloat16 too (one rounding: relative error <= 2^-8).
    dx_ref = np.einsum("btnh,dnh->btd", _rounded(g), _rounded(w))
    dw_ref = np.einsum("btnh,btd->dnh", _rounded(g), _rounded(x))
    np.testing.assert_allclose(np.asarray(dx, np.float64), dx_ref, rtol=2 ** -8, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref, rtol=2 ** -8, atol=1e-2)
    # ... and not what float32 operands give (the test would pass for a plain dot otherwise).
    assert np.max(np.abs(np.asarray(y) - np.einsum("btd,dnh->btnh", np.asarray(x), np.asarray(w)))) > 1e-4


def test_every_projection_of_a_training_step_reads_bfloat16_operands():
    """Forward and backward of the model's loss: with matmul_dtype every projection and LM-head dot (forward and
    both backward) reads bfloat16 operands, and only the attention's batched score and value contractions keep
    float32 ones: the same dots as the float32 model's, none of them mixing dtypes."""
    base = dict(vocab_size=64, max_len=16, num_layers=2, d_model=32, num_heads=2)
    tokens = jnp.zeros((2, 8), jnp.int32)
    dots = {}
    for matmul_dtype in (None, "bfloat16"):
        model = GPT(GPTConfig(**base, matmul_dtype=matmul_dtype))
        params = model.init(jax.random.key(0), tokens)["params"]

        def loss(p, model=model):
            logits, _ = model.apply({"params": p}, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

        dots[matmul_dtype] = _dots(jax.grad(loss), params)
    wide, narrow = dots[None], dots["bfloat16"]
    assert set(wide) == {(True, "f32", "f32"), (False, "f32", "f32")}
    assert set(narrow) == {(True, "f32", "f32"), (False, "bf16", "bf16")}
    assert narrow[True, "f32", "f32"] == wide[True, "f32", "f32"]
    assert narrow[False, "bf16", "bf16"] == wide[False, "f32", "f32"] >= 3 * 5  # 4 projections + LM head, x3


def test_model_with_bfloat16_matmuls_tracks_the_float32_model():
    base = dict(vocab_size=128, max_len=32, num_layers=2, d_model=64, num_heads=4)
    wide, narrow = GPT(GPTConfig(**base)), GPT(GPTConfig(**base, matmul_dtype="bfloat16"))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 16)), jnp.int32)
    params = wide.init(jax.random.key(1), tokens)["params"]
    logits_wide = np.asarray(wide.apply({"params": params}, tokens)[0])
    logits_narrow = np.asarray(narrow.apply({"params": params}, tokens)[0])
    assert logits_narrow.dtype == np.float32
    np.testing.assert_allclose(logits_narrow, logits_wide, atol=0.05 * np.std(logits_wide))
    assert not np.array_equal(logits_narrow, logits_wide)


def test_unknown_matmul_dtype_is_one_clear_error():
    with pytest.raises(ConfigError, match="matmul_dtype"):
        GPTConfig(matmul_dtype="int8")
