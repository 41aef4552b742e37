"""Matmuls whose operands are narrower than their result: the LM head's float32 logits from 16-bit operands, and
``narrow_dot`` (GPTConfig.matmul_dtype), a float32 model's projections with bfloat16 operands.

Both cast the backward's incoming gradient to the operand dtype before its two matmuls, as torch autocast does:
left to autodiff, a float32 gradient meets a 16-bit operand and both backward matmuls run as float32 GEMMs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def lm_logits(hidden_BTD, embedding_VD, dtype) -> Array:
    """Output layer: logits in float32 whatever the operands' dtype ``dtype`` (the model's compute dtype, or its
    ``matmul_dtype``).

    With 16-bit operands the backward casts the float32 logit gradient to that dtype before its two matmuls. Left
    to autodiff they would take a float32 operand and run as float32 GEMMs (TF32 at best: half the bf16 rate) over
    the largest matrices of a small model, and move twice the bytes.
    """
    dtype = jnp.dtype(dtype)
    hidden_BTD, embedding_VD = hidden_BTD.astype(dtype), embedding_VD.astype(dtype)
    if dtype.itemsize >= 4:
        return jnp.einsum("btd,vd->btv", hidden_BTD, embedding_VD, preferred_element_type=jnp.float32)
    return _float32_logits(hidden_BTD, embedding_VD)


@jax.custom_vjp
def _float32_logits(hidden_BTD, embedding_VD):
    return jnp.einsum("btd,vd->btv", hidden_BTD, embedding_VD, preferred_element_type=jnp.float32)


def _float32_logits_fwd(hidden_BTD, embedding_VD):
    return _float32_logits(hidden_BTD, embedding_VD), (hidden_BTD, embedding_VD)


def _float32_logits_bwd(residuals, dlogits_BTV):
    hidden_BTD, embedding_VD = residuals
    dlogits_BTV = dlogits_BTV.astype(hidden_BTD.dtype)
    dhidden_BTD = jnp.einsum("btv,vd->btd", dlogits_BTV, embedding_VD, preferred_element_type=jnp.float32)
    dembedding_VD = jnp.einsum("btv,btd->vd", dlogits_BTV, hidden_BTD, preferred_element_type=jnp.float32)
    return dhidden_BTD.astype(hidden_BTD.dtype), dembedding_VD.astype(embedding_VD.dtype)


_float32_logits.defvjp(_float32_logits_fwd, _float32_logits_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def narrow_dot(x, w, dimension_numbers, operand_dtype) -> Array:
    """``lax.dot_general(x, w, dimension_numbers)`` with both operands cast to ``operand_dtype`` and the products
    accumulated and returned in x's dtype (float32); the backward's two matmuls take ``operand_dtype`` operands
    too. On a CPU with bfloat16 matrix units (AMX) a float32 model's training step ran ~15% faster (the demo's
    shape: 4 layers, d_model 128, T 128, B 32, vocabulary 2048; docs/results.md, CPU); its parameters,
    activations and optimizer stay float32."""
    return _narrow_dot(x, w, dimension_numbers, operand_dtype)


def _narrow_dot(x, w, dimension_numbers, operand_dtype):
    return jax.lax.dot_general(x.astype(operand_dtype), w.astype(operand_dtype), dimension_numbers,
                               preferred_element_type=jnp.float32).astype(x.dtype)


def _narrow_dot_fwd(x, w, dimension_numbers, operand_dtype):
    return _narrow_dot(x, w, dimension_numbers, operand_dtype), (x.astype(operand_dtype), w.astype(operand_dtype),
                                                                  jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _narrow_dot_bwd(dimension_numbers, operand_dtype, residuals, dy):
    x_narrow, w_narrow, x_like, w_like = residuals
    # The transposes of the dot with narrow operands and a narrow result: both backward matmuls read narrow operands
    # (the incoming gradient cast as torch autocast does); their results, rounded to the narrow dtype as autocast's
    # are, return in the inputs' dtypes.
    _, transpose = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dimension_numbers), x_narrow, w_narrow)
    dx, dw = transpose(dy.astype(operand_dtype))
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


narrow_dot.defvjp(_narrow_dot_fwd, _narrow_dot_bwd)
