"""What one PPO iteration runs, for the ahead-of-time planner: ``loop.make_iteration``'s experience and update
programs on abstract, sharded arguments, as ``run_ppo`` calls them.

Colocated (the loop's layout): the policy and value train states, the frozen reference and reward model all live on
one mesh; while the experience program runs (sampler + KV cache, policy/reference/value/reward forwards, GAE) the two
optimizer states are held beside it, while the update runs the reference and reward parameters are.

With ``frozen_mesh`` (a layout the planner can size, which ``run_ppo`` does not run yet) the reference and reward
model live on their own devices: the rollout program (sampler, policy log-probs, values) runs on the main mesh,
a scoring program (reference log-probs, rewards) on the frozen one, then the update on the main mesh; GAE is
elementwise and left out.

Models: the policy is ``model.*`` (a preset, or the ``train.init_from`` run's); the value and reward model are the
``ppo_init.reward_from`` run's architecture, else ``ppo_init.reward_preset``'s, else the policy's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import flops, sampling, sharding
from gptjax.data import batches
from gptjax.errors import ConfigError
from gptjax.model import GPT, ScoreModel
from gptjax.stages import common, rl
from gptjax.stages.ppo import loop as ppo_loop
from gptjax.stages.ppo import objective as ppo_lib
from gptjax.stages.reward import sequence_rewards
from gptjax.train import aot
from gptjax.train import state as state_lib


def _reward_config(cfg, tokenizer, seq_len: int):
    """The value/reward model's GPTConfig and a note saying where it came from."""
    source = cfg.ppo_init.get("reward_from") or ""
    if source:
        model_cfg, _ = common.resolve_from_init(common.stored_config(source))
        where = f"the reward-model run {source}"
    elif cfg.ppo_init.get("reward_preset"):
        model_cfg = cfg.model.copy_and_resolve_references()
        with model_cfg.unlocked():
            model_cfg.preset = cfg.ppo_init.reward_preset
        where = f"ppo_init.reward_preset={cfg.ppo_init.reward_preset}"
    else:
        return None, "value and reward model: the policy's architecture (set ppo_init.reward_preset to change it)"
    return (common.no_dropout(common.build_model_config(model_cfg, tokenizer, seq_len)),
            f"value and reward model: {where}")


def _train_state(model, tx, mesh, seed: int):
    """Abstract sharded (params, optimizer state) of ``model`` under ``tx``."""
    rng = jax.random.key(seed)
    boxed = state_lib.abstract_boxed_params(state_lib.default_init_params_fn(model, 8), rng)
    state = state_lib.abstract_state(boxed, tx, state_lib.state_shardings(boxed, tx, mesh), rng)
    return state.params, state.opt_state


def _forward_flops(cfg, T: int, score: bool = False) -> float:
    """Model FLOPs of one forward token (a third of the training count)."""
    return (flops.score_flops_per_token(cfg, T) if score else flops.flops_per_token(cfg, T)) / 3


def _models(cfg):
    pcfg = ppo_lib.PPOConfig.from_dict(cfg.ppo.to_dict())
    P_len, N = int(cfg.sampling.max_prompt_len), int(cfg.sampling.max_new_tokens)
    policy_cfg, tokenizer, notes = common.planning_model_config(cfg, P_len)
    if P_len + N > policy_cfg.max_len:
        raise ConfigError(f"sampling.max_prompt_len + sampling.max_new_tokens = {P_len + N} exceeds the context "
                          f"model.max_len={policy_cfg.max_len}")
    policy_cfg = common.no_dropout(policy_cfg)
    reward_cfg, note = _reward_config(cfg, tokenizer, P_len)
    reward_cfg = reward_cfg or policy_cfg
    scfg = sampling.SamplingConfig(max_new_tokens=N, temperature=pcfg.temperature, top_k=int(cfg.sampling.top_k),
                                   top_p=float(cfg.sampling.top_p), eos_id=tokenizer.eos_id,
                                   pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size,
                                   decode_segments=int(cfg.sampling.get("decode_segments", 1)),
                                   unroll_layers=cfg.sampling.get("unroll_layers") is not False)
    return pcfg, scfg, policy_cfg, reward_cfg, notes + [note], (P_len, N)


def plan(cfg, mesh, frozen_mesh=None) -> aot.StagePlan:
    """The programs of one PPO iteration (see the module docstring)."""
    pcfg, scfg, policy_cfg, reward_cfg, notes, (P_len, N) = _models(cfg)
    B, T = pcfg.rollout_batch_size, P_len + N
    for field, rows in (("ppo.rollout_batch_size", B), ("ppo.minibatch_size", pcfg.minibatch_size)):
        sharding.check_batch_divisible(rows, mesh, field=field)
    policy, scorer = GPT(policy_cfg), ScoreModel(reward_cfg)
    frozen = frozen_mesh if frozen_mesh is not None else mesh
    ref_params = common.abstract_params_of(policy, frozen)
    reward_params = common.abstract_params_of(scorer, frozen)
    total_updates = int(cfg.train.steps) * pcfg.ppo_epochs * pcfg.num_minibatches
    it = ppo_loop.make_iteration(policy, scorer, scorer, scfg, pcfg, cfg.optim, total_updates,
                                 common.abstract_params_of(policy, mesh), common.abstract_params_of(scorer, mesh))
    seed = int(cfg.train.seed)
    policy_params, policy_opt = _train_state(policy, it.policy_tx, mesh, seed)
    value_params, value_opt = _train_state(scorer, it.value_tx, mesh, seed)
    rep = sharding.replicated(mesh)
    scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
    raw_key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = ppo_loop.PPOState(step=scalar(jnp.int32), policy_params=policy_params, policy_opt=policy_opt,
                              value_params=value_params, value_opt=value_opt,
                              kl=rl.KLControllerState(kl_coef=scalar(jnp.float32)),
                              rng=scalar(raw_key.dtype, raw_key.shape))
    rows = sharding.batch_sharding(mesh)
    prompts = (jax.ShapeDtypeStruct((B, P_len), jnp.int32, sharding=rows),
               jax.ShapeDtypeStruct((B, P_len), jnp.bool_, sharding=rows))
    rollout = batches.abstract(batches.ROLLOUT_BATCH, {"B": B, "T": T}, sharding=rows)
    update = _update_program(cfg, pcfg, it, state, rollout, key, policy_cfg, reward_cfg, T, mesh)
    if frozen_mesh is None:
        update.also_live = {"reference parameters": ref_params, "reward-model parameters": reward_params}
        experience = aot.PlannedProgram(
            "experience", it.experience, (policy_params, ref_params, value_params, reward_params, *prompts, key,
                                          scalar(jnp.float32)), mesh,
            B * T * (2 * _forward_flops(policy_cfg, T) + 2 * _forward_flops(reward_cfg, T, score=True))
            + B * T * _forward_flops(policy_cfg, T),
            groups={"policy parameters": policy_params, "reference parameters": ref_params,
                    "value parameters": value_params, "reward-model parameters": reward_params, "prompts": prompts},
            also_live={"policy optimizer state": policy_opt, "value optimizer state": value_opt})
        programs = [experience, update]
    else:
        programs = _split_programs(policy, scorer, scfg, pcfg, policy_params, value_params, ref_params,
                                   reward_params, prompts, key, policy_opt, value_opt, mesh, frozen_mesh, T)
        programs.append(update)
        notes.append("reference and reward model on their own devices: a layout run_ppo does not run yet")
    return aot.StagePlan("PPO iteration", programs, "episodes", B, B * T, policy_cfg, notes,
                         shape={"batch": B, "micro": pcfg.minibatch_size, "accum": pcfg.num_minibatches,
                                "seq_len": T, "epochs": pcfg.ppo_epochs})


def _update_program(cfg, pcfg, it, state, rollout, key, policy_cfg, reward_cfg, T, mesh) -> aot.PlannedProgram:
    """``ppo.ppo_epochs`` passes of minibatch steps over the rollout batch (PPO-ptx batches when ptx_coef > 0)."""
    ptx, ptx_flops = None, 0.0
    E, M, mb = pcfg.ppo_epochs, pcfg.num_minibatches, pcfg.minibatch_size
    if pcfg.ptx_coef > 0:
        ptx_T = int(cfg.ptx_seq_len)
        ptx = batches.abstract(batches.LM_BATCH, {"B": mb, "T": ptx_T}, leading=(E, M),
                               sharding=NamedSharding(mesh, P(None, None, ("data", "fsdp"))))
        ptx_flops = E * M * mb * ptx_T * flops.flops_per_token(policy_cfg, ptx_T)
    model_flops = E * pcfg.rollout_batch_size * T * (flops.flops_per_token(policy_cfg, T)
                                                       + flops.score_flops_per_token(reward_cfg, T)) + ptx_flops
    return aot.PlannedProgram(
        "update", it.update, (state, rollout, ptx, key), mesh, model_flops,
        groups={"policy parameters": state.policy_params, "policy optimizer state": state.policy_opt,
                "value parameters": state.value_params, "value optimizer state": state.value_opt,
                "rollout batch": rollout, "ptx batches": ptx})


def _split_programs(policy, scorer, scfg, pcfg, policy_params, value_params, ref_params, reward_params, prompts,
                    key, policy_opt, value_opt, mesh, frozen_mesh, T) -> list[aot.PlannedProgram]:
    """Rollout on the main mesh; reference log-probs and rewards on the frozen one."""
    B = pcfg.rollout_batch_size
    logprobs = functools.partial(ppo_lib.sequence_logprobs, model=policy, temperature=pcfg.temperature,
                                 loss_chunk=pcfg.loss_chunk)

    def rollout(policy_params, value_params, prompt_BP, valid_BP, key):
        out = sampling.sample(policy, policy_params, prompt_BP, valid_BP, key, cfg=scfg)
        tokens_BT, valid_BT, _ = sampling.prompt_and_response(prompt_BP, valid_BP, out)
        return (tokens_BT, valid_BT, logprobs(policy_params, tokens_BT, valid_BT)[0],
                ppo_lib.sequence_values(value_params, tokens_BT, valid_BT, model=scorer))

    def frozen_scores(ref_params, reward_params, tokens_BT, valid_BT):
        return (logprobs(ref_params, tokens_BT, valid_BT)[0],
                sequence_rewards(reward_params, tokens_BT, valid_BT, model=scorer))

    frozen_rows = sharding.batch_sharding(frozen_mesh)
    rows = (jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=frozen_rows),
            jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=frozen_rows))
    fwd_policy, fwd_score = _forward_flops(policy.cfg, T), _forward_flops(scorer.cfg, T, score=True)
    return [aot.PlannedProgram("rollout", jax.jit(rollout), (policy_params, value_params, *prompts, key), mesh,
                               B * T * (2 * fwd_policy + fwd_score),
                               groups={"policy parameters": policy_params, "value parameters": value_params,
                                       "prompts": prompts},
                               also_live={"policy optimizer state": policy_opt, "value optimizer state": value_opt}),
            aot.PlannedProgram("frozen scoring", jax.jit(frozen_scores), (ref_params, reward_params, *rows),
                               frozen_mesh, B * T * (fwd_policy + fwd_score),
                               groups={"reference parameters": ref_params, "reward-model parameters": reward_params,
                                       "rollouts": rows})]
