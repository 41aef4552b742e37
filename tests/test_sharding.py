"""Sharded execution on 8 fake CPU devices, checked against the same computation on one device.

Reference: every program run on a one-device mesh (no partitioning). For the (data, fsdp, tensor) meshes
(8,1,1), (1,8,1), (2,2,2) and (1,2,4), each jitted with input/output shardings from the logical rules inside
``sharding.activate(mesh)``:
- the losses, metrics and gradients of the four stage objectives (pretraining ``lm_loss``, ``sft_loss``,
  the K-wise ``reward_loss``, ``ppo_loss``) equal the reference to 1e-5 (float32);
- one real pretraining step (``loop.make_train_step``: 2 accumulated microbatches, clipping, AdamW) and one
  PPO update (``ppo_loop.make_update_fn``) give the same new parameters, optimizer state and metrics;
- the PPO rollout (``ppo_loop.make_experience_fn``: the KV-cache sampler, greedy, then policy/reference
  log-probs, values, rewards and advantages) gives identical tokens and equal scores, and stays batch-sharded;
- on (2,2,2) and (1,8,1): the objectives of the stage-3 alternatives (GRPO's and RLOO's clipped and REINFORCE
  losses, DPO's, rejection sampling's; the last two through the registry's ``objective`` hook), one GRPO and one
  RLOO update of the shared RL loop without a value model, and one DPO (IPO) train step of the shared trainer.
Golden shardings: the rules split each weight over the mesh axes they name. A checkpoint written on (2,2,2)
restores on (1,8,1) and on one device with bitwise-equal state, in the target's shardings. Bad input (mesh
size vs device count, an axis that does not divide the dimension it shards, an unknown logical axis) is one
error naming both sides. Multi-host start-up (``gptjax.distributed``) calls ``jax.distributed.initialize``
exactly when flags or a multi-process cluster environment say so (checked by recording the calls).

The mesh tests need 8 devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, as ``make test``
sets) and are skipped otherwise.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from gptjax import distributed, sharding
from gptjax.errors import ConfigError
from gptjax.model import GPT, GPTConfig, ScoreModel
from gptjax.sampling import SamplingConfig
from gptjax.stages import dpo, grpo, registry, rloo
from gptjax.stages.online import loop as online
from gptjax.stages.ppo import objective as ppo_lib
from gptjax.stages.ppo import loop as ppo_loop
from gptjax.stages.pretrain import lm_loss
from gptjax.stages.reward import reward_loss
from gptjax.stages.sft import sft_loss
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import loop
from gptjax.train import state as state_lib
from gptjax.train.optim import make_optimizer

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8,
    reason=f"needs 8 devices, found {jax.device_count()}: run with "
           f"XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test sets it)")

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
MESH_IDS = ["x".join(map(str, s)) for s in MESHES]
# The full optimizer steps (a superset of the objectives' programs, so one mesh that uses all three axes).
UPDATE_MESHES = [(2, 2, 2)]
B, T, K, PROMPT, NEW = 8, 16, 3, 6, 6  # B divides every data×fsdp; K responses per ranking prompt
# Every sharded dimension divides 8: vocab 256, d_model 64 (fsdp); 4 heads, d_ff 256 (tensor <= 4).
CFG = GPTConfig(vocab_size=256, max_len=32, num_layers=2, d_model=64, num_heads=4)
POLICY, SCORER = GPT(CFG), ScoreModel(CFG)
PPO_CFG = ppo_lib.PPOConfig(rollout_batch_size=B, minibatch_size=B, ppo_epochs=1)
TOL = 1e-5
# LLVM at -O0 halves CPU compile time; the reference is compiled the same way, so comparisons are unaffected.
JIT = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _optimizer(model=POLICY):
    o = common.optim_config()
    # eps 1e-3 keeps Adam's first step (g / (|g| + eps)) smooth in g: float round-off in a near-zero gradient
    # cannot flip a whole lr-sized step, so parameters after one step compare to 1e-5 like the gradients.
    o.lr, o.warmup_steps, o.eps, o.clip_norm = 1e-3, 0, 1e-3, 0.5
    return make_optimizer(o, 10, _abstract_params(model))


def _mesh(shape):
    if shape is None:  # the reference: one device, no partitioning
        return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return sharding.make_mesh(shape)


def _boxed(model):
    return state_lib.abstract_boxed_params(state_lib.default_init_params_fn(model, T), jax.random.key(0))


def _abstract_params(model):
    return nn.unbox(_boxed(model))


def _random_params(model, rng):
    """Random parameters of the model's shapes (biases and LayerNorm too: nothing is trivially zero or one)."""
    def leaf(path, x):
        offset = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return (offset + rng.normal(0, 0.05, x.shape)).astype(x.dtype)
    return jax.tree_util.tree_map_with_path(leaf, _abstract_params(model))


def _batch_sharding(mesh):
    """Leading (batch) dimension over data×fsdp, any rank: a prefix for whole batch dicts."""
    return NamedSharding(mesh, P(("data", "fsdp")))


# --- inputs (numpy; built once) ------------------------------------------------------------------------------

def _lm_batch(rng):
    """Two packed documents per row (segment ids, restarting positions), 70% of targets weighted."""
    tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    second = np.arange(T) >= rng.integers(4, T, (B, 1))
    start = np.argmax(second, axis=1)[:, None]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": (1 + second).astype(np.int32),
            "positions": np.where(second, np.arange(T) - start, np.arange(T)).astype(np.int32),
            "weights": (rng.random((B, T)) < 0.7).astype(np.float32)}


def _ranking_batch(rng):
    lengths = rng.integers(4, T + 1, (B, K))
    valid = np.arange(T) < lengths[..., None]
    return {"tokens": np.where(valid, rng.integers(0, CFG.vocab_size, (B, K, T)), 0).astype(np.int32),
            "valid": valid, "num_ranked": rng.integers(2, K + 1, (B,)).astype(np.int32)}


def _rollout_batch(rng):
    """A PPO minibatch: left-padded prompt + response; old log-probs near a uniform policy's (-log V)."""
    col = np.arange(T)
    valid = (col >= rng.integers(0, 4, (B, 1))) & (col < PROMPT + rng.integers(2, T - PROMPT + 1, (B, 1)))
    response = (col >= PROMPT) & valid
    tokens = np.where(valid, rng.integers(0, CFG.vocab_size, (B, T)), 0).astype(np.int32)
    noise = lambda scale: rng.normal(0, scale, (B, T)).astype(np.float32)  # noqa: E731
    return {"tokens": tokens, "valid": valid, "response_mask": response,
            "old_logprobs": np.where(response, noise(0.3) - np.log(CFG.vocab_size), 0).astype(np.float32),
            "old_values": noise(0.5), "advantages": noise(1.0), "returns": noise(1.0)}


def _prompts(rng):
    """Left-padded prompts of different lengths."""
    valid = np.arange(PROMPT) >= rng.integers(0, PROMPT - 1, (B, 1))
    return np.where(valid, rng.integers(0, CFG.vocab_size, (B, PROMPT)), 0).astype(np.int32), valid


@functools.lru_cache(maxsize=None)
def _inputs():
    rng = np.random.default_rng(0)
    lm = _lm_batch(rng)
    return {"gpt": _random_params(POLICY, rng), "score": _random_params(SCORER, rng), "lm": lm,
            "ranking": _ranking_batch(rng), "rollout": _rollout_batch(rng), "prompts": _prompts(rng),
            "lm_micro": jax.tree.map(lambda a, b: np.stack([a, b]), lm, _lm_batch(rng))}


# --- the programs under test, each jitted with shardings from the rules ------------------------------------------

def _objectives(gpt, score, lm, ranking, rollout, rng):
    """(loss, metrics), grads of each stage objective (training mode: deterministic=False)."""
    def grads(loss_fn, *args, **kw):
        return jax.value_and_grad(functools.partial(loss_fn, **kw), has_aux=True)(*args)
    ppo = functools.partial(ppo_lib.ppo_loss, policy_model=POLICY, value_model=SCORER, cfg=PPO_CFG)
    return {"pretrain": grads(lm_loss, gpt, lm, rng, model=POLICY, deterministic=False),
            "sft": grads(sft_loss, gpt, lm, rng, model=POLICY, deterministic=False),
            "reward": grads(reward_loss, score, ranking, rng, model=SCORER, deterministic=False),
            "ppo": jax.value_and_grad(ppo, argnums=(0, 1), has_aux=True)(gpt, score, rollout, rng)}


@functools.lru_cache(maxsize=None)
def _run_mesh(mesh_shape):
    """Objectives and the PPO rollout (experience function, greedy sampler) in one program on one mesh.

    Returns (objectives, rollout batch, rollout metrics, whether every rollout array stayed batch-sharded).
    """
    mesh, x = _mesh(mesh_shape), _inputs()
    gpt_sh = sharding.logical_to_sharding(_boxed(POLICY), mesh)
    score_sh = sharding.logical_to_sharding(_boxed(SCORER), mesh)
    rep, data = sharding.replicated(mesh), _batch_sharding(mesh)
    experience = ppo_loop.make_experience_fn(POLICY, SCORER, SCORER, SamplingConfig(
        max_new_tokens=NEW, temperature=0.0, eos_id=None), PPO_CFG)

    def program(gpt, score, lm, ranking, rollout, prompts, prompts_valid, rng):
        # Policy = reference and value = reward model here: the sharded/unsharded comparison is what matters.
        return _objectives(gpt, score, lm, ranking, rollout, rng), experience(
            gpt, gpt, score, score, prompts, prompts_valid, rng, jnp.float32(0.05))

    objectives_sh = {"pretrain": ((rep, rep), gpt_sh), "sft": ((rep, rep), gpt_sh),
                     "reward": ((rep, rep), score_sh), "ppo": ((rep, rep), (gpt_sh, score_sh))}
    with sharding.activate(mesh):
        fn = JIT(program, in_shardings=(gpt_sh, score_sh) + (data,) * 5 + (rep,),
                 out_shardings=(objectives_sh, (data, rep)))
        objectives, (batch, metrics) = fn(x["gpt"], x["score"], x["lm"], x["ranking"], x["rollout"],
                                          *x["prompts"], jax.random.key(7))
        split = mesh.size == 1 or all(not v.sharding.is_fully_replicated for v in batch.values())
    return jax.device_get((objectives, batch, metrics)) + (split,)


@functools.lru_cache(maxsize=None)
def _run_updates(mesh_shape):
    """One pretraining train step and one PPO update from the same start."""
    mesh, x = _mesh(mesh_shape), _inputs()
    (tx, schedule), (value_tx, _) = _optimizer(POLICY), _optimizer(SCORER)
    train_sh = state_lib.state_shardings(_boxed(POLICY), tx, mesh)
    value_sh = state_lib.state_shardings(_boxed(SCORER), value_tx, mesh)
    rep, data = sharding.replicated(mesh), _batch_sharding(mesh)
    ppo_sh = ppo_loop.PPOState(step=rep, policy_params=train_sh.params, policy_opt=train_sh.opt_state,
                               value_params=value_sh.params, value_opt=value_sh.opt_state,
                               kl=rep, rng=rep)
    train_state = state_lib.new_state(x["gpt"], tx, jax.random.key(3))
    ppo_state = ppo_loop.PPOState(step=jnp.zeros((), jnp.int32), policy_params=x["gpt"],
                                  policy_opt=tx.init(x["gpt"]), value_params=x["score"],
                                  value_opt=value_tx.init(x["score"]), kl=PPO_CFG.make_kl_controller().init(),
                                  rng=jax.random.key_data(jax.random.key(4)))
    train_step = loop.make_train_step(functools.partial(lm_loss, model=POLICY), tx, schedule, train_sh.params)
    ppo_update = ppo_loop.make_update_fn(POLICY, SCORER, tx, value_tx, PPO_CFG)

    def both(train_state, micro_batches, ppo_state, rollout, key):
        return train_step(train_state, micro_batches, jnp.int32(2)), ppo_update(ppo_state, rollout, None, key)

    micro_sh = NamedSharding(mesh, P(None, ("data", "fsdp")))  # (microbatch, batch, ...)
    with sharding.activate(mesh):
        fn = JIT(both, in_shardings=(train_sh, micro_sh, ppo_sh, data, rep),
                 out_shardings=((train_sh, rep), (ppo_sh, rep)))
        return jax.device_get(fn(train_state, x["lm_micro"], ppo_state, x["rollout"], jax.random.key(5)))


def _assert_close(actual, expected, what, tol=TOL):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_a == tree_e, f"{what}: tree structures differ"
    for (path, a), e in zip(flat_a, flat_e):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=tol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


# --- tests -----------------------------------------------------------------------------------------------------

@needs_8
@pytest.mark.parametrize("mesh_shape", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
def test_objective_loss_and_grads_match_one_device(stage, mesh_shape):
    (loss, metrics), grads = _run_mesh(mesh_shape)[0][stage]
    (ref_loss, ref_metrics), ref_grads = _run_mesh(None)[0][stage]
    assert np.isfinite(ref_loss) and abs(float(loss) - float(ref_loss)) <= TOL
    _assert_close(metrics, ref_metrics, f"{stage} metrics")
    _assert_close(grads, ref_grads, f"{stage} grads")
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 100 * TOL  # not vacuous


@needs_8
@pytest.mark.parametrize("mesh_shape", UPDATE_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_train_step_and_ppo_update_match_one_device(mesh_shape):
    (train_state, train_metrics), (ppo_state, ppo_metrics) = _run_updates(mesh_shape)
    (ref_train_state, ref_train_metrics), (ref_ppo_state, ref_ppo_metrics) = _run_updates(None)
    _assert_close(train_state, ref_train_state, "train state")
    _assert_close(train_metrics, ref_train_metrics, "train metrics")
    _assert_close(ppo_state, ref_ppo_state, "ppo state")
    _assert_close(ppo_metrics, ref_ppo_metrics, "ppo metrics")
    moved = np.abs(train_state.params["decoder"]["wte"]["embedding"] - _inputs()["gpt"]["decoder"]["wte"]["embedding"])
    assert moved.max() > 1e-4 and int(train_state.step) == 1  # the step did update


@needs_8
@pytest.mark.parametrize("mesh_shape", MESHES, ids=MESH_IDS)
def test_rollout_greedy_tokens_identical_and_sharded(mesh_shape):
    _, batch, metrics, split = _run_mesh(mesh_shape)
    _, ref_batch, ref_metrics, _ = _run_mesh(None)
    np.testing.assert_array_equal(batch["tokens"], ref_batch["tokens"])
    np.testing.assert_array_equal(batch["response_mask"], ref_batch["response_mask"])
    _assert_close(batch, ref_batch, "rollout")
    _assert_close(metrics, ref_metrics, "rollout metrics")
    assert split, "rollout arrays were gathered instead of staying batch-sharded"


@needs_8
def test_inference_rows_split_over_the_mesh_match_one_device():
    """Sampling (RolloutEngine with a mesh) and reward scoring (parameters replicated on a mesh) split each batch's
    rows over the 8 devices: the same greedy tokens, sampled tokens, log-probs and scores as on one device."""
    from gptjax.stages import rollouts as rollouts_lib
    from gptjax.stages.reward import reward_scores
    x, mesh = _inputs(), _mesh((8, 1, 1))
    assert sharding.row_mesh(mesh, 16) is mesh and sharding.row_mesh(mesh, 12) is None
    assert sharding.row_mesh(_mesh((1, 1, 8)), 16) is None  # tensor-only: no data axes to split rows over
    prompts = [list(range(3 + i % 4, 9 + i % 5)) for i in range(20)]  # 20 rows: a full batch of 16, then 4
    for temperature in (0.0, 1.0):
        cfg = SamplingConfig(max_new_tokens=NEW, temperature=temperature, eos_id=1, pad_id=0, vocab_size=256)
        one = rollouts_lib.RolloutEngine(POLICY, cfg, batch_size=16).generate(x["gpt"], prompts, seed=3)
        split_engine = rollouts_lib.RolloutEngine(POLICY, cfg, batch_size=16, mesh=mesh)
        assert split_engine.mesh is mesh
        split = split_engine.generate(x["gpt"], prompts, seed=3)
        np.testing.assert_array_equal(split.tokens_BT, one.tokens_BT)
        np.testing.assert_allclose(split.sampler_logprobs_BN, one.sampler_logprobs_BN, atol=TOL)
        np.testing.assert_allclose(split_engine.sequence_logprobs(x["gpt"], split),
                                   rollouts_lib.RolloutEngine(POLICY, cfg, batch_size=16).sequence_logprobs(
                                       x["gpt"], one), atol=1e-4)
    tokens, valid = np.asarray(x["rollout"]["tokens"]), np.asarray(x["rollout"]["valid"])
    placed = jax.device_put(x["score"], sharding.replicated(mesh))
    assert sharding.mesh_of(placed) is mesh and sharding.mesh_of(x["score"]) is None
    np.testing.assert_allclose(reward_scores(SCORER, placed, tokens, valid),
                               reward_scores(SCORER, x["score"], tokens, valid), atol=TOL)


@functools.lru_cache(maxsize=None)
def _bf16_lm_grads(mesh_shape, gather_dtype):
    """(loss, grads) of the LM loss in bfloat16 compute, weights cast after (None) or before the gather."""
    model = GPT(CFG.replace(dtype="bfloat16", gather_dtype=gather_dtype))
    mesh, x = _mesh(mesh_shape), _inputs()
    gpt_sh = sharding.logical_to_sharding(_boxed(model), mesh)

    def fn(params, batch):
        return jax.value_and_grad(lambda p: lm_loss(p, batch, None, model=model, deterministic=True)[0])(params)

    with sharding.activate(mesh):
        out = JIT(fn, in_shardings=(gpt_sh, _batch_sharding(mesh)), out_shardings=(sharding.replicated(mesh), gpt_sh))
        return jax.device_get(out(x["gpt"], x["lm"]))


@needs_8
@pytest.mark.parametrize("mesh_shape", MESHES, ids=MESH_IDS)
def test_bf16_gathers_match_float32_gathers(mesh_shape):
    """model.gather_dtype=bfloat16 (weights cast before the FSDP all-gather) against the float32-gather path: the
    same loss and gradients to bfloat16 precision (the matmuls see the same bf16 weights either way; what differs is
    the embedding sum's rounding and the gradient reductions in bf16)."""
    loss, grads = _bf16_lm_grads(mesh_shape, "bfloat16")
    ref_loss, ref_grads = _bf16_lm_grads(mesh_shape, None)
    assert abs(float(loss) - float(ref_loss)) <= 1e-2 * abs(float(ref_loss))
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        assert g.dtype == np.float32  # gradients arrive in the parameters' dtype
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-2 * scale, err_msg=jax.tree_util.keystr(path))


@needs_8
@pytest.mark.parametrize("mesh_shape", MESHES, ids=MESH_IDS)
def test_rules_split_weights_over_the_named_axes(mesh_shape):
    """Golden per-device shapes: embed over fsdp; vocab, heads and mlp over tensor; layers never split."""
    data, fsdp, tensor = mesh_shape
    sh = sharding.logical_to_sharding(_boxed(POLICY), _mesh(mesh_shape))
    params = _abstract_params(POLICY)
    G, D, F, V, N, H = CFG.num_groups, CFG.d_model, CFG.ff_dim, CFG.vocab_size, CFG.num_heads, CFG.head_dim

    def local(*path):
        leaf_sh, leaf = sh, params
        for k in path:
            leaf_sh, leaf = leaf_sh[k], leaf[k]
        return leaf_sh.shard_shape(leaf.shape)

    block = ("decoder", "groups", "block_0")
    assert local("decoder", "wte", "embedding") == (V // tensor, D // fsdp)
    assert local(*block, "attn", "qkv", "kernel") == (G, D // fsdp, 3, N // tensor, H)
    assert local(*block, "attn", "out", "kernel") == (G, N // tensor, H, D // fsdp)
    assert local(*block, "mlp", "fc", "kernel") == (G, D // fsdp, F // tensor)
    assert local(*block, "mlp", "proj", "kernel") == (G, F // tensor, D // fsdp)
    assert local(*block, "ln_1", "scale") == (G, D)


@needs_8
def test_checkpoint_restores_on_other_meshes(tmp_path):
    """Written on (2,2,2); restored on (1,8,1) and one device: bitwise equal, in the target's shardings."""
    tx, _ = _optimizer()
    boxed, rng = _boxed(POLICY), jax.random.key(0)
    params = _inputs()["gpt"]
    # Optimizer moments that are not zero, so restoring them is checked too.
    state = state_lib.new_state(params, tx, rng)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x,
                                                 state.opt_state))
    state = jax.device_put(state, state_lib.state_shardings(boxed, tx, _mesh((2, 2, 2))))
    expected = jax.device_get(state)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1, async_save=False)
    ckpt.save(3, state, data_state={"pos": 3}, config={"mesh": [2, 2, 2]})
    ckpt.close()
    for target in [(1, 8, 1), None]:
        mesh = _mesh(target)
        shardings = state_lib.state_shardings(boxed, tx, mesh)
        reader = ckpt_lib.Checkpointer(str(tmp_path), keep=1, async_save=False)
        restored = reader.restore(3, state_lib.abstract_state(boxed, tx, shardings, rng))
        reader.close()
        for got, want_sh in zip(jax.tree.leaves(restored.state), jax.tree.leaves(shardings)):
            assert got.sharding.is_equivalent_to(want_sh, got.ndim)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), expected)
        assert restored.data_state == {"pos": 3}


# --- the stage-3 alternatives: GRPO, RLOO, DPO, rejection sampling --------------------------------------------------

NEW_MESHES = [(2, 2, 2), (1, 8, 1)]
GROUP = 4
GRPO_ALGO = grpo.algorithm(grpo.GRPOConfig(group_size=GROUP, rollout_batch_size=B, minibatch_size=B // 2, epochs=2),
                           POLICY, T - PROMPT)
RLOO_ALGO = rloo.algorithm(rloo.RLOOConfig(k=GROUP, rollout_batch_size=B, minibatch_size=B, loss="clipped"), POLICY)
NEW_OBJECTIVES = ("grpo", "rloo", "rloo-reinforce", "dpo", "rs")


def _policy_rollout_batch(rng):
    """A critic-free minibatch: the PPO rollout's rows, reference log-probs, one advantage per response."""
    r = _rollout_batch(rng)
    response = r["response_mask"]
    advantages = np.repeat(rng.normal(size=(B, 1)), T, 1).astype(np.float32) * response
    ref = np.where(response, r["old_logprobs"] + rng.normal(0, 0.2, (B, T)), 0).astype(np.float32)
    return {"tokens": r["tokens"], "valid": r["valid"], "response_mask": response,
            "old_logprobs": r["old_logprobs"], "ref_logprobs": ref, "advantages": advantages}


def _preference_batch(rng):
    """A DPO batch: the ranking batch with response tokens after a prompt of 4 and reference sequence log-probs."""
    r = _ranking_batch(rng)
    return {**r, "response_mask": r["valid"] & (np.arange(T) >= 4),
            "ref_logprobs": rng.normal(-3 * T, 2.0, (B, K)).astype(np.float32)}


@functools.lru_cache(maxsize=None)
def _new_inputs():
    rng = np.random.default_rng(11)
    return {"policy": _policy_rollout_batch(rng), "preference": _preference_batch(rng)}


def _stage_config(dpo_loss: str = "sigmoid") -> ml_collections.ConfigDict:
    """What the DPO and rejection-sampling ``objective`` hooks read of a stage config."""
    return ml_collections.ConfigDict({"train": common.train_config(), "dpo": {"beta": 0.1, "loss": dpo_loss}})


def _new_objectives(gpt, lm, policy_batch, preference, rng):
    """(loss, metrics), grads of each new stage's objective, through the registry where the stage has one."""
    reinforce = rloo.algorithm(rloo.RLOOConfig(k=GROUP, rollout_batch_size=B, minibatch_size=B), POLICY).loss
    dpo_loss = registry.get("dpo").objective(_stage_config(), POLICY)
    rs_loss = registry.get("rs").objective(_stage_config(), POLICY)
    grads = lambda fn: jax.value_and_grad(fn, has_aux=True)(gpt)  # noqa: E731
    return {"grpo": grads(lambda p: GRPO_ALGO.loss(p, None, policy_batch, None)),
            "rloo": grads(lambda p: RLOO_ALGO.loss(p, None, policy_batch, None)),
            "rloo-reinforce": grads(lambda p: reinforce(p, None, policy_batch, None)),
            "dpo": grads(lambda p: dpo_loss(p, preference, rng)),
            "rs": grads(lambda p: rs_loss(p, lm, rng, deterministic=False))}


@functools.lru_cache(maxsize=None)
def _run_new(mesh_shape):
    """The new stages' objectives, one GRPO and one RLOO update (no value model) and one DPO train step."""
    mesh, x, y = _mesh(mesh_shape), _inputs(), _new_inputs()
    (tx, schedule) = _optimizer(POLICY)
    gpt_sh = sharding.logical_to_sharding(_boxed(POLICY), mesh)
    train_sh = state_lib.state_shardings(_boxed(POLICY), tx, mesh)
    rep, data = sharding.replicated(mesh), _batch_sharding(mesh)
    rl_sh = online.RLState(step=rep, policy_params=train_sh.params, policy_opt=train_sh.opt_state,
                           value_params=None, value_opt=None, kl=rep, rng=rep)
    rl_state = online.RLState(step=jnp.zeros((), jnp.int32), policy_params=x["gpt"], policy_opt=tx.init(x["gpt"]),
                              value_params=None, value_opt=None, kl=GRPO_ALGO.kl_controller.init(),
                              rng=jax.random.key_data(jax.random.key(4)))
    dpo_step = loop.make_train_step(registry.get("dpo").objective(_stage_config("ipo"), POLICY), tx, schedule,
                                    train_sh.params)
    updates = {"grpo": online.make_update_fn(GRPO_ALGO, tx, None), "rloo": online.make_update_fn(RLOO_ALGO, tx, None)}

    def program(gpt, lm, policy_batch, preference, rl_state, train_state, key):
        stacked = jax.tree.map(lambda a: a[None], preference)
        return (_new_objectives(gpt, lm, policy_batch, preference, key),
                {n: u(rl_state, policy_batch, None, key) for n, u in updates.items()},
                dpo_step(train_state, stacked, jnp.int32(1)))

    objectives_sh = {name: ((rep, rep), gpt_sh) for name in NEW_OBJECTIVES}
    train_state = state_lib.new_state(x["gpt"], tx, jax.random.key(3))
    with sharding.activate(mesh):
        fn = JIT(program, in_shardings=(gpt_sh, data, data, data, rl_sh, train_sh, rep),
                 out_shardings=(objectives_sh, {n: (rl_sh, rep) for n in updates}, (train_sh, rep)))
        return jax.device_get(fn(x["gpt"], x["lm"], y["policy"], y["preference"], rl_state, train_state,
                                 jax.random.key(5)))


@needs_8
@pytest.mark.parametrize("mesh_shape", NEW_MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stage", NEW_OBJECTIVES)
def test_new_stage_objectives_match_one_device(stage, mesh_shape):
    (loss, metrics), grads = _run_new(mesh_shape)[0][stage]
    (ref_loss, ref_metrics), ref_grads = _run_new(None)[0][stage]
    assert np.isfinite(ref_loss) and abs(float(loss) - float(ref_loss)) <= TOL
    _assert_close(metrics, ref_metrics, f"{stage} metrics")
    _assert_close(grads, ref_grads, f"{stage} grads")
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 100 * TOL  # not vacuous


@needs_8
@pytest.mark.parametrize("mesh_shape", NEW_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_new_stage_updates_match_one_device(mesh_shape):
    _, updates, dpo_step = _run_new(mesh_shape)
    _, ref_updates, ref_dpo_step = _run_new(None)
    for name in updates:
        _assert_close(updates[name], ref_updates[name], f"{name} update")
        moved = np.abs(updates[name][0].policy_params["decoder"]["wte"]["embedding"]
                       - _inputs()["gpt"]["decoder"]["wte"]["embedding"])
        assert moved.max() > 1e-4, name
    _assert_close(dpo_step[0], ref_dpo_step[0], "dpo train state")
    for name, value in dpo_step[1].items():  # IPO's squared margins: losses and gradient norms in the hundreds
        np.testing.assert_allclose(value, ref_dpo_step[1][name], rtol=1e-6, atol=TOL, err_msg=f"dpo {name}")
    assert int(dpo_step[0].step) == 1


# --- bad input -------------------------------------------------------------------------------------------------

@needs_8
def test_mesh_size_must_equal_device_count():
    with pytest.raises(ConfigError, match=r"uses 4 devices but 8 are available"):
        sharding.make_mesh((2, 2, 1))
    with pytest.raises(ConfigError, match=r"fixed axes \(3 devices\) do not divide the 8 available devices"):
        sharding.make_mesh((3, -1, 1))


@needs_8
def test_axis_that_does_not_divide_its_dimension_is_named():
    six_heads = GPT(CFG.replace(num_heads=6, d_head=16))  # 6 heads on tensor=4
    with pytest.raises(ConfigError) as e:
        sharding.logical_to_sharding(_boxed(six_heads), _mesh((1, 2, 4)))
    message = str(e.value)
    assert "['attn']" in message and "dimension of 6" in message and "'tensor'" in message and "size 4" in message


def test_unknown_logical_axis_is_named():
    class Bogus(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "experts")), (4, 2))
            return x @ w

    boxed = jax.eval_shape(Bogus().init, jax.random.key(0), jnp.ones((1, 4)))["params"]
    with pytest.raises(ConfigError, match=r"logical axis 'experts'.*known logical axes: \['batch'"):
        sharding.logical_to_sharding(boxed, _mesh(None))


# --- multi-host start-up ---------------------------------------------------------------------------------------

@pytest.fixture
def init_calls(monkeypatch):
    """Records jax.distributed.initialize calls instead of starting a runtime; a clean, cluster-free env."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in distributed._CLUSTER_ENV + ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_single_process_does_not_start_the_runtime(init_calls, monkeypatch):
    assert not distributed.initialize() and not init_calls
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # an allocation, but a one-task step
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert not distributed.initialize() and not init_calls


def test_cluster_environment_is_auto_detected(init_calls, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")  # srun -n 16: JAX reads the rest from SLURM itself
    assert distributed.initialize() and init_calls == [{"local_device_ids": None}]
    assert not distributed.initialize(distributed=False) and len(init_calls) == 1  # forbidden


def test_forced_and_explicit_initialisation(init_calls):
    assert distributed.initialize(distributed=True) and init_calls[-1] == {"local_device_ids": None}
    assert distributed.initialize("10.0.0.1:1234", 2, 1)
    assert init_calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
                              "local_device_ids": None}
    with pytest.raises(ValueError, match=r"--process_id missing; --coordinator_address, --num_processes and "
                                         r"--process_id go together"):
        distributed.initialize("10.0.0.1:1234", 2)
    with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        distributed.initialize("10.0.0.1:1234", 2, 2)
    assert len(init_calls) == 2
