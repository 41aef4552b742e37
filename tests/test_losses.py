"""gptjax.losses: the chunked vocabulary statistics against the plain ones, and the plain ones against NumPy.

Checks: plain ``token_stats`` equals a float64 NumPy log-softmax / entropy; ``chunked_token_stats`` equals
``token_stats(lm_logits(...))`` in value and gradient (float32, 1e-6) for chunk sizes that divide T, that do not,
of 1 and larger than T; and the chunked backward never holds an array as large as the (B, T, V) logits.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import losses
from gptjax.model import lm_logits

B, T, D, V = 2, 10, 8, 33


def _inputs(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden_BTD = jax.random.normal(k1, (B, T, D), jnp.float32)
    embedding_VD = jax.random.normal(k2, (V, D), jnp.float32)
    targets_BT = jax.random.randint(k3, (B, T), 0, V)
    return hidden_BTD, embedding_VD, targets_BT


def test_plain_stats_match_numpy_log_softmax():
    hidden, emb, targets = _inputs()
    logits = np.asarray(hidden, np.float64) @ np.asarray(emb, np.float64).T
    for temperature in (1.0, 0.7):
        s = losses.token_stats(lm_logits(hidden, emb, jnp.float32), targets, temperature=temperature,
                               with_entropy=True)
        z = logits / temperature
        logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        t = np.asarray(targets)
        want_logprob = np.take_along_axis(logp, t[..., None], -1)[..., 0]
        np.testing.assert_allclose(s.logprob_BT, want_logprob, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.entropy_BT, -(np.exp(logp) * logp).sum(-1), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(s.correct_BT, logits.argmax(-1) == t)
    np.testing.assert_allclose(losses.cross_entropy(lm_logits(hidden, emb, jnp.float32), targets),
                               -losses.token_stats(lm_logits(hidden, emb, jnp.float32), targets).logprob_BT)


def test_argmax_hit_breaks_ties_as_numpy_argmax():
    # Few distinct values, so most rows hold several maxima: the hit must go to the lowest of them only.
    rng = np.random.default_rng(0)
    logits_BTV = rng.integers(0, 3, size=(4, 50, 7)).astype(np.float32)
    targets_BT = rng.integers(0, 7, size=(4, 50))
    want = logits_BTV.argmax(-1) == targets_BT
    assert 0 < want.sum() < want.size and (np.sum(logits_BTV == logits_BTV.max(-1, keepdims=True), -1) > 1).any()
    np.testing.assert_array_equal(losses.argmax_hit(jnp.asarray(logits_BTV), jnp.asarray(targets_BT)), want)
    for dtype in (jnp.bfloat16, jnp.float32):
        got = losses.argmax_hit(jnp.asarray(logits_BTV, dtype), jnp.asarray(targets_BT))
        np.testing.assert_array_equal(got, want)


def _objective(stats_fn):
    # A scalar touching every output that has a gradient, with position-dependent weights.
    w_BT = jnp.linspace(0.5, 1.5, B * T).reshape(B, T)

    def f(hidden, emb, targets):
        s = stats_fn(hidden, emb, targets)
        return jnp.sum(w_BT * (s.logprob_BT + 0.1 * s.entropy_BT + 0.01 * s.logsumexp_BT ** 2))
    return f


@pytest.mark.parametrize("chunk", [1, 3, 4, T, 16])
def test_chunked_equals_plain_value_and_gradient(chunk):
    hidden, emb, targets = _inputs(1)
    plain = lambda h, e, t: losses.token_stats(lm_logits(h, e, jnp.float32), t, temperature=0.9, with_entropy=True)
    chunked = lambda h, e, t: losses.chunked_token_stats(h, e, t, chunk=chunk, temperature=0.9, with_entropy=True)
    want, got = plain(hidden, emb, targets), chunked(hidden, emb, targets)
    for name in ("logprob_BT", "logsumexp_BT", "entropy_BT"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got.correct_BT, want.correct_BT)
    g_want = jax.jit(jax.grad(_objective(plain), argnums=(0, 1)))(hidden, emb, targets)
    g_got = jax.jit(jax.grad(_objective(chunked), argnums=(0, 1)))(hidden, emb, targets)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(losses.chunked_cross_entropy(hidden, emb, targets, chunk=chunk),
                               losses.cross_entropy(lm_logits(hidden, emb, jnp.float32), targets),
                               rtol=1e-6, atol=1e-6)


def _largest_intermediate(jaxpr) -> int:
    """Elements of the biggest array any equation (in any nested sub-jaxpr) produces."""
    largest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(v.aval, "shape", ()))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            largest = max(largest, _largest_intermediate(getattr(sub, "jaxpr", sub)))
    return largest


def test_chunked_backward_never_materialises_full_logits():
    hidden, emb, targets = _inputs(2)
    loss = lambda h, e: jnp.sum(losses.chunked_cross_entropy(h, e, targets, chunk=3))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, emb).jaxpr
    # Parameter- and activation-sized arrays (V·D, B·T·D) and one chunk of logits (B·3·V) are all it may hold.
    allowed = max(V * D, B * T * D, B * 3 * V)
    assert allowed < B * T * V
    assert _largest_intermediate(jaxpr) <= allowed
    plain = lambda h, e: jnp.sum(losses.cross_entropy(lm_logits(h, e, jnp.float32), targets))
    # The check can see a (B, T, V) array when there is one.
    assert _largest_intermediate(jax.make_jaxpr(jax.grad(plain, argnums=(0, 1)))(hidden, emb).jaxpr) >= B * T * V


def test_bad_chunk_is_one_clear_error():
    hidden, emb, targets = _inputs()
    with pytest.raises(ValueError, match="chunk must be a positive"):
        losses.chunked_token_stats(hidden, emb, targets, chunk=0)


def _dot_operand_dtypes(fn, *args):
    """Operand dtypes of every matmul in fn's program (jaxprs nested in custom_vjp / pjit included)."""
    found = []

    def walk(jaxpr):
        for eq in jaxpr.eqns:
            if eq.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eq.invars))
            for p in eq.params.values():
                for j in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(j, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        walk(inner)
                    elif hasattr(j, "eqns"):
                        walk(j)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bf16_logits_backward_runs_bf16_matmuls_and_matches_float32():
    """The bf16 output layer's backward casts the fp32 logit gradient down before its two matmuls.

    Left to autodiff, the cotangent stays float32 and both backward matmuls take a float32 operand (float32
    GEMMs on a GPU); the gradients must still equal the float32 computation to bf16 precision.
    """
    hidden, emb, targets = _inputs()
    loss = lambda h, e, dtype: jnp.sum(losses.cross_entropy(lm_logits(h, e, dtype), targets))
    grad_bf16 = jax.grad(lambda h, e: loss(h, e, jnp.bfloat16), argnums=(0, 1))
    dtypes = _dot_operand_dtypes(grad_bf16, hidden.astype(jnp.bfloat16), emb)
    assert len(dtypes) >= 3, dtypes  # forward (seen once per nested jaxpr that holds it) + two backward matmuls
    assert all(d == ("bfloat16", "bfloat16") for d in dtypes), dtypes
    dh16, de16 = grad_bf16(hidden.astype(jnp.bfloat16), emb)
    assert dh16.dtype == jnp.bfloat16 and de16.dtype == jnp.float32  # each gradient in its input's dtype
    # Reference: the same math in float32 from the bf16-rounded inputs.
    h32, e32 = hidden.astype(jnp.bfloat16).astype(jnp.float32), emb.astype(jnp.bfloat16).astype(jnp.float32)
    dh32, de32 = jax.grad(lambda h, e: loss(h, e, jnp.float32), argnums=(0, 1))(h32, e32)
    np.testing.assert_allclose(np.asarray(dh16, np.float32), dh32, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(de16, de32, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(loss(hidden.astype(jnp.bfloat16), emb, jnp.bfloat16), loss(h32, e32, jnp.float32),
                               rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_backward_equals_numpy_gradient_and_autodiff(temperature):
    # The hand-written backward against the analytic gradient in float64 NumPy: for a loss
    # Σ a·logprob + b·lse of z = logits / τ, d/dlogits = (a·(onehot − p) + b·p) / τ with p = softmax(z).
    hidden, emb, targets = _inputs(3)
    logits = lm_logits(hidden, emb, jnp.float32)
    a_BT, b_BT = jax.random.normal(jax.random.key(4), (2, B, T), jnp.float32)

    def objective(logits_BTV, backward):
        s = losses.token_stats(logits_BTV, targets, temperature=temperature, backward=backward)
        return jnp.sum(a_BT * s.logprob_BT + b_BT * s.logsumexp_BT)

    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(V)[np.asarray(targets)]
    a, b = np.asarray(a_BT, np.float64)[..., None], np.asarray(b_BT, np.float64)[..., None]
    want = (a * (onehot - p) + b * p) / temperature
    fused = jax.grad(objective)(logits, "fused")
    np.testing.assert_allclose(fused, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused, jax.grad(objective)(logits, "autodiff"), rtol=1e-5, atol=1e-6)
    assert objective(logits, "fused") == pytest.approx(float(objective(logits, "autodiff")), rel=1e-6)


def test_fused_backward_through_the_model_and_chunks_equals_autodiff():
    # End to end: the LM loss's parameter gradients, plain and chunked (under jax.checkpoint), bf16 compute.
    from gptjax.model import GPT
    from gptjax.presets import preset_config
    from gptjax.stages.pretrain import lm_loss

    tokens = np.asarray(jax.random.randint(jax.random.key(5), (2, 17), 0, 64), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((2, 16), np.float32)}
    grads = {}
    for backward in ("autodiff", "fused"):
        model = GPT(preset_config("tiny", vocab_size=64, max_len=16, num_layers=1, dtype="bfloat16",
                                  xent_backward=backward))
        params = model.init(jax.random.key(0), tokens[:, :-1])["params"]
        for chunk in (0, 5):
            grads[backward, chunk] = jax.grad(
                lambda p: lm_loss(p, batch, None, model=model, loss_chunk=chunk, z_loss_coef=1e-2)[0])(params)
    for chunk in (0, 5):
        for got, want in zip(jax.tree.leaves(grads["fused", chunk]), jax.tree.leaves(grads["autodiff", chunk])):
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2,
                                       atol=1e-5)


def test_fused_backward_keeps_no_exp_or_one_hot_buffer():
    # What the fused backward is for: the gradient of the mean NLL holds fewer (B, T, V) float32 buffers than
    # autodiff's (which saves exp(z − max) and scatters a one-hot into zeros), counted in XLA's optimized HLO.
    hidden, emb, targets = _inputs()
    logits = lm_logits(hidden, emb, jnp.float32)

    def btv_buffers(backward):
        grad = jax.jit(jax.grad(lambda x: -jnp.mean(losses.token_stats(x, targets, backward=backward).logprob_BT)))
        hlo = grad.lower(logits).compile().as_text()
        # Top-level fusions (the ones with a kind) are what XLA writes to memory.
        return sum(1 for line in hlo.splitlines()
                   if "kind=k" in line and line.split("=")[1].strip().startswith(f"f32[{B},{T},{V}]"))

    # Autodiff (3 on XLA:CPU, jax 0.10): exp(z − max), its product with the cotangent, the one-hot scatter.
    # Fused (2): the backward's one pass and, on XLA:CPU, the forward's exp before its reduction.
    assert btv_buffers("fused") <= 2 < btv_buffers("autodiff")


def test_unknown_xent_backward_is_one_clear_error():
    from gptjax.errors import ConfigError
    from gptjax.presets import preset_config

    with pytest.raises(ConfigError, match=r"xent_backward='fast' is unknown; valid choices: \['autodiff', 'fused'\]"):
        preset_config("tiny", xent_backward="fast")
