"""The PPO(-ptx) loop: rollouts with the KV-cache sampler, scoring, GAE, and clipped updates.

One iteration (all of it jitted, on the mesh):
1. draw ``ppo.rollout_batch_size`` prompts (a pure function of the run seed and the iteration, so a resumed run
   draws the same prompts);
2. sample responses from the policy (temperature ``ppo.temperature``, the KV-cache sampler);
3. score them: policy and reference log-probs, values, and the reward model's score at EOS;
4. per-token rewards (score − β·KL, no-EOS penalty), GAE, advantage whitening (``stages/ppo/objective.py``);
5. ``ppo.ppo_epochs`` passes of ``ppo.num_minibatches`` gradient steps over the rollout batch, updating the
   policy and value model (each its own AdamW); with ``ppo.ptx_coef > 0`` every step also takes a pretraining
   batch (PPO-ptx);
6. update the KL controller with the batch's KL.

Roles: policy (init from SFT), reference (= SFT, frozen), reward model (frozen), value model (init from the
reward model, own parameters). Checkpoints hold the policy and value train states, the KL controller state and
the ptx data position; the frozen reference and reward model are re-read from their (immutable) source runs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from gptjax import sharding as sharding_lib
from gptjax import sampling as sample_lib
from gptjax.errors import ConfigError
from gptjax.model import GPT, ScoreModel
from gptjax.sampling import SamplingConfig, prompt_and_response
from gptjax.stages import rl
from gptjax.stages.ppo import objective as ppo_lib
from gptjax.stages.reward import sequence_rewards
from gptjax.train import run as run_lib
from gptjax.train import workdir as workdir_lib
from gptjax.train.optim import make_optimizer


@flax.struct.dataclass
class PPOState:
    step: jax.Array  # int32: PPO iterations completed
    policy_params: Any
    policy_opt: Any
    value_params: Any
    value_opt: Any
    kl: rl.KLControllerState
    rng: jax.Array  # raw key data of the run's base key


@dataclasses.dataclass
class PPOResult:
    step: int
    metrics: dict
    state: Any
    workdir: str


def make_experience_fn(policy_model: GPT, value_model: ScoreModel, reward_model: ScoreModel,
                       sampling_cfg: SamplingConfig, cfg: ppo_lib.PPOConfig):
    """(policy, ref, value, reward params, prompts, valid, key, kl_coef) -> rollout batch + metrics."""
    sample = functools.partial(sample_lib.sample, policy_model, cfg=sampling_cfg)

    def experience(policy_params, ref_params, value_params, reward_params, prompt_BP, prompt_valid_BP, key,
                   kl_coef):
        out = sample(policy_params, prompt_BP, prompt_valid_BP, key)
        tokens_BT, valid_BT, _ = prompt_and_response(prompt_BP, prompt_valid_BP, out)
        response_mask_BT = jnp.concatenate([jnp.zeros_like(prompt_valid_BP, bool), out.mask_BN], axis=1)
        logprobs_BT, _ = ppo_lib.sequence_logprobs(policy_params, tokens_BT, valid_BT, model=policy_model,
                                                   temperature=cfg.temperature, loss_chunk=cfg.loss_chunk)
        ref_logprobs_BT, _ = ppo_lib.sequence_logprobs(ref_params, tokens_BT, valid_BT, model=policy_model,
                                                       temperature=cfg.temperature, loss_chunk=cfg.loss_chunk)
        values_BT = ppo_lib.sequence_values(value_params, tokens_BT, valid_BT, model=value_model)
        scores_B = sequence_rewards(reward_params, tokens_BT, valid_BT, model=reward_model)
        advantages_BT, returns_BT, metrics = ppo_lib.compute_advantages(
            scores_B, logprobs_BT, ref_logprobs_BT, values_BT, response_mask_BT, out.finished_B, kl_coef, cfg)
        metrics["rm_score_raw"] = jnp.mean(scores_B)
        batch = {"tokens": tokens_BT, "valid": valid_BT, "response_mask": response_mask_BT,
                 "old_logprobs": logprobs_BT, "old_values": values_BT, "advantages": advantages_BT,
                 "returns": returns_BT}
        return batch, metrics

    return experience


def make_update_fn(policy_model: GPT, value_model: ScoreModel, policy_tx, value_tx, cfg: ppo_lib.PPOConfig):
    """(state, rollout batch, ptx batches, key) -> (new state, metrics averaged over all minibatch steps)."""
    grad_fn = jax.value_and_grad(
        functools.partial(ppo_lib.ppo_loss, policy_model=policy_model, value_model=value_model, cfg=cfg),
        argnums=(0, 1), has_aux=True)
    M, mb = cfg.num_minibatches, cfg.minibatch_size

    def update(state: PPOState, batch, ptx_EMB, key):
        def one_epoch(carry, xs):
            epoch_key, ptx_MB = xs
            perm = jax.random.permutation(epoch_key, cfg.rollout_batch_size).reshape(M, mb)

            def one_step(carry, xs):
                pp, po, vp, vo = carry
                idx, ptx = xs
                minibatch = jax.tree.map(lambda x: x[idx], batch)
                if ptx is not None:
                    minibatch["ptx"] = ptx
                (_, metrics), (g_policy, g_value) = grad_fn(pp, vp, minibatch, None)
                upd, po = policy_tx.update(g_policy, po, pp)
                pp = optax.apply_updates(pp, upd)
                upd, vo = value_tx.update(g_value, vo, vp)
                vp = optax.apply_updates(vp, upd)
                metrics["policy_grad_norm"] = optax.global_norm(g_policy)
                metrics["value_grad_norm"] = optax.global_norm(g_value)
                return (pp, po, vp, vo), metrics

            return jax.lax.scan(one_step, carry, (perm, ptx_MB))

        keys = jax.random.split(key, cfg.ppo_epochs)
        carry = (state.policy_params, state.policy_opt, state.value_params, state.value_opt)
        (pp, po, vp, vo), metrics = jax.lax.scan(one_epoch, carry, (keys, ptx_EMB))
        new_state = state.replace(policy_params=pp, policy_opt=po, value_params=vp, value_opt=vo)
        return new_state, jax.tree.map(jnp.mean, metrics)

    return update


@dataclasses.dataclass
class Iteration:
    """One PPO iteration's programs as ``run_ppo`` runs them (``experiments.bench`` times the same ones)."""

    policy_tx: optax.GradientTransformation
    value_tx: optax.GradientTransformation
    kl_ctl: Any  # rl.FixedKLController | rl.AdaptiveKLController
    experience: Callable  # jitted make_experience_fn
    update: Callable  # jitted make_update_fn; donates the state

    def init_state(self, policy_params, value_params, rng_key_data) -> PPOState:
        """A state at iteration 0 holding (not copying) the given parameters, fresh optimizers and KL coefficient."""
        return PPOState(step=jnp.zeros((), jnp.int32), policy_params=policy_params,
                        policy_opt=self.policy_tx.init(policy_params), value_params=value_params,
                        value_opt=self.value_tx.init(value_params), kl=self.kl_ctl.init(), rng=rng_key_data)


def make_iteration(policy_model: GPT, value_model: ScoreModel, reward_model: ScoreModel,
                   sampling_cfg: SamplingConfig, cfg: ppo_lib.PPOConfig, optim_cfg, total_updates: int,
                   policy_params, value_params) -> Iteration:
    """The optimizers (AdamW of ``optim_cfg`` over ``total_updates`` minibatch steps), the KL controller and the
    jitted experience and update programs of one iteration."""
    policy_tx, _ = make_optimizer(optim_cfg, total_updates, policy_params)
    value_tx, _ = make_optimizer(optim_cfg, total_updates, value_params)
    experience = jax.jit(make_experience_fn(policy_model, value_model, reward_model, sampling_cfg, cfg))
    update = jax.jit(make_update_fn(policy_model, value_model, policy_tx, value_tx, cfg), donate_argnums=(0,))
    return Iteration(policy_tx, value_tx, cfg.make_kl_controller(), experience, update)


def run_ppo(cfg, workdir: str, *, policy_model: GPT, value_model: ScoreModel, reward_model: ScoreModel,
            policy_params, value_params, reward_params, prompts: Sequence[np.ndarray], pad_id: int, eos_id: int,
            vocab_size: int | None = None, ptx_iter=None,
            eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None, mesh=None) -> PPOResult:
    """Run (or resume) PPO in ``workdir``. ``*_params`` are the initial (SFT / RM) parameters: the policy and
    reference start from ``policy_params``, the value model from ``value_params``; ``reward_params`` stay frozen.

    ``prompts``: token arrays (rendered chat prompts ending with the assistant role token). ``ptx_iter``: LM
    batches of ``ppo.minibatch_size`` rows (needed when ``ppo.ptx_coef > 0``). ``eval_fn(policy_params, step)``
    returns extra metrics every ``train.eval_every`` iterations and at the end.
    """
    t = cfg.train
    pcfg = ppo_lib.PPOConfig.from_dict(cfg.ppo.to_dict())
    if pcfg.ptx_coef > 0 and ptx_iter is None:
        raise ConfigError(f"ppo.ptx_coef={pcfg.ptx_coef} needs pretraining data (config.ptx); set ppo.ptx_coef=0 "
                          f"to turn PPO-ptx off")
    if not prompts:
        raise ConfigError("PPO needs at least one prompt (data.prompts)")
    run = run_lib.RunContext(cfg, workdir)  # a workdir of another config is refused before anything is touched
    mesh = mesh if mesh is not None else sharding_lib.make_mesh(tuple(cfg.mesh.shape))
    sharding_lib.check_batch_divisible(pcfg.minibatch_size, mesh, field="ppo.minibatch_size")
    sampling_cfg = SamplingConfig(max_new_tokens=int(cfg.sampling.max_new_tokens), temperature=pcfg.temperature,
                                  top_k=int(cfg.sampling.top_k), top_p=float(cfg.sampling.top_p),
                                  eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size,
                                  decode_segments=int(cfg.sampling.get("decode_segments", 1)),
                                  unroll_layers=cfg.sampling.get("unroll_layers") is not False)
    # All prompts left-padded to one length (the longest), so every iteration compiles once.
    prompts_NP = sample_lib.left_pad(prompts, pad_id)
    total_updates = t.steps * pcfg.ppo_epochs * pcfg.num_minibatches
    iteration = make_iteration(policy_model, value_model, reward_model, sampling_cfg, pcfg, cfg.optim,
                               total_updates, policy_params, value_params)
    base_key = jax.random.key(t.seed)
    # Positions each iteration scores and trains on (prompt + response slots, padding included).
    episode_tokens = pcfg.rollout_batch_size * (prompts_NP[0].shape[1] + sampling_cfg.max_new_tokens)
    with run:
        state = _restore_or_init(run, iteration, policy_params, value_params, base_key, ptx_iter)
        writer = run.open_metrics(int(state.step))
        metrics: dict = {}
        start_step = int(state.step)
        clock = run_lib.StepClock(start_step, int(t.steps))
        for it in range(start_step, t.steps):
            # The frozen reference is the initial (SFT) policy.
            state, metrics, seconds = _iterate(it, state, iteration, policy_params, reward_params, prompts_NP,
                                               base_key, pcfg, ptx_iter, mesh, episode_tokens)
            step = it + 1
            if eval_fn is not None and (step % t.eval_every == 0 or step == t.steps):
                metrics.update({f"eval/{k}": float(v) for k, v in eval_fn(state.policy_params, step).items()})
            writer.write_scalars(step, metrics)
            if clock.step_done():
                logging.info("PPO iteration %d took %.1f s (compilation included; ETAs start after it)", step,
                             seconds)
            if step % t.log_every == 0 or step == t.steps:
                _log_progress(step, t.steps, metrics, clock.eta(step, seconds))
            stopping = run.should_stop(step)  # SIGINT/SIGTERM: save this iteration, then stop
            if stopping or step % t.ckpt_every == 0 or step == t.steps:
                run.ckpt.save(step, state, data_state=None if ptx_iter is None else ptx_iter.get_state(),
                              config=workdir_lib.config_to_dict(cfg))
            if stopping:
                run.stop(step)
    return PPOResult(step=int(state.step), metrics=metrics, state=state, workdir=run.workdir)


def _restore_or_init(run: run_lib.RunContext, iteration: Iteration, policy_params, value_params, base_key,
                     ptx_iter) -> PPOState:
    """The workdir's latest checkpoint (and ptx data position), else a fresh state."""
    # Copies: the update donates the state's buffers, while the reference keeps the initial policy's.
    copy = functools.partial(jax.tree.map, jnp.copy)
    state = iteration.init_state(copy(policy_params), copy(value_params), jnp.copy(jax.random.key_data(base_key)))
    latest = run.ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                                state)
        restored = run.ckpt.restore(latest, abstract)
        state = restored.state
        if ptx_iter is not None and restored.data_state is not None:
            ptx_iter.set_state(restored.data_state)
        logging.info("PPO resumed from %s/%d", run.ckpt.directory, latest)
    return state


def _iterate(it: int, state: PPOState, iteration: Iteration, ref_params, reward_params, prompts_NP, base_key,
             pcfg: ppo_lib.PPOConfig, ptx_iter, mesh, episode_tokens: int) -> tuple[PPOState, dict, float]:
    """Iteration ``it``: rollout, update, KL controller; returns (new state, its metrics, its seconds)."""
    prompt_tokens, prompt_valid = prompts_NP
    it_key = jax.random.fold_in(base_key, it)
    draw_key, sample_key, update_key = jax.random.split(it_key, 3)
    # Prompts: a pure function of (seed, iteration) so resume draws the same ones.
    rng_np = np.random.default_rng(np.asarray(jax.random.key_data(draw_key)).astype(np.uint64))
    idx = rng_np.choice(len(prompt_tokens), pcfg.rollout_batch_size,
                        replace=len(prompt_tokens) < pcfg.rollout_batch_size)
    t_roll = time.time()
    # Prompts split over data x fsdp; under the mesh the model's logical constraints shard the rollout.
    prompts_BP = jax.device_put(prompt_tokens[idx], sharding_lib.batch_sharding(mesh))
    valid_BP = jax.device_put(prompt_valid[idx], sharding_lib.batch_sharding(mesh))
    with sharding_lib.activate(mesh):
        batch, roll_metrics = iteration.experience(state.policy_params, ref_params, state.value_params,
                                                   reward_params, prompts_BP, valid_BP, sample_key,
                                                   state.kl.kl_coef)
    jax.block_until_ready(batch)
    rollout_s = time.time() - t_roll
    ptx = None
    if pcfg.ptx_coef > 0:
        ptx_batches = [next(ptx_iter) for _ in range(pcfg.ppo_epochs * pcfg.num_minibatches)]
        ptx = jax.tree.map(lambda *xs: np.stack(xs).reshape(
            (pcfg.ppo_epochs, pcfg.num_minibatches) + xs[0].shape), *ptx_batches)
    t_upd = time.time()
    with sharding_lib.activate(mesh):
        state, upd_metrics = iteration.update(state, batch, ptx, update_key)
    new_kl = iteration.kl_ctl.update(state.kl, roll_metrics["kl"], pcfg.rollout_batch_size)
    state = state.replace(step=state.step + 1, kl=new_kl)
    jax.block_until_ready(state.step)
    update_s = time.time() - t_upd
    metrics = {f"rollout/{k}": float(v) for k, v in roll_metrics.items()}
    metrics.update({f"ppo/{k}": float(v) for k, v in upd_metrics.items()})
    metrics.update({"ppo/kl_coef": float(state.kl.kl_coef), "time/rollout_s": rollout_s,
                    "time/update_s": update_s,
                    "time/rollout_fraction": rollout_s / max(rollout_s + update_s, 1e-9),
                    "perf/episode_tokens_per_s": episode_tokens / max(rollout_s + update_s, 1e-9),
                    "perf/rollout_new_tokens_per_s": pcfg.rollout_batch_size
                    * metrics["rollout/response_length"] / max(rollout_s, 1e-9)})
    return state, metrics, rollout_s + update_s


def _log_progress(step: int, steps: int, metrics: Mapping[str, float], eta) -> None:
    logging.info("ppo %d/%d | score %.3f | kl %.3f | reward %.3f | eos %.2f | len %.1f | "
                 "clip %.3f | %s episode tok/s | rollout %.0f%%, %s new tok/s | ETA %s", step, steps,
                 metrics["rollout/score"], metrics["rollout/kl"], metrics["rollout/reward"],
                 metrics["rollout/eos_rate"], metrics["rollout/response_length"],
                 metrics["ppo/clip_frac"], f"{metrics['perf/episode_tokens_per_s']:,.0f}",
                 100 * metrics["time/rollout_fraction"],
                 f"{metrics['perf/rollout_new_tokens_per_s']:,.0f}", eta)
