"""The RL loop PPO, GRPO and RLOO share: rollouts with the KV-cache sampler, scoring, advantages and clipped updates.

One iteration (on the mesh; the algorithm is an ``Algorithm`` record, ``stages/online/algorithm.py``):
1. draw ``rollout_batch_size / samples_per_prompt`` prompts (a pure function of the run seed and the iteration,
   so a resumed run draws the same ones) and repeat each ``samples_per_prompt`` times (a group: GRPO, RLOO);
2. sample responses from the policy (temperature ``algo.temperature``, the KV-cache sampler);
3. score them: policy and reference log-probs, values (algorithms with a value model) and the reward: a reward
   model inside the same jitted program, or a Python function on the host between two jitted programs
   (``stages/online/rewards.py``);
4. the algorithm's advantages (``algo.advantages``: PPO's GAE, GRPO's group normalisation, RLOO's leave-one-out);
5. ``algo.epochs`` passes of ``algo.num_minibatches`` gradient steps over the rollout batch on ``algo.loss``,
   updating the policy (and the value model; each its own AdamW); with ``algo.ptx_coef > 0`` every step also takes
   a pretraining batch (PPO-ptx);
6. update the KL controller with the batch's KL.

Roles: policy (init from SFT), reference (= SFT, frozen), reward (frozen model or function), value model (PPO: init
from the reward model, own parameters). Checkpoints hold ``RLState`` (policy and value train states, the KL
controller state, the base key) and the ptx data position; the frozen reference and reward model are re-read from
their (immutable) source runs.
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
from gptjax.stages.online.algorithm import Algorithm
from gptjax.stages.online.rewards import FunctionReward, ModelReward
from gptjax.stages.reward import sequence_rewards
from gptjax.stages.rollouts import Rollouts
from gptjax.train import run as run_lib
from gptjax.train import workdir as workdir_lib
from gptjax.train.optim import make_optimizer


@flax.struct.dataclass
class RLState:
    step: jax.Array  # int32: iterations completed
    policy_params: Any
    policy_opt: Any
    value_params: Any  # None without a value model
    value_opt: Any
    kl: rl.KLControllerState
    rng: jax.Array  # raw key data of the run's base key


@dataclasses.dataclass
class RLResult:
    step: int
    metrics: dict
    state: Any
    workdir: str


def make_rollout_fn(algo: Algorithm, policy_model: GPT, value_model: ScoreModel | None,
                    sampling_cfg: SamplingConfig):
    """(policy, ref, value params, prompts, valid, key) -> the sampled, log-prob-scored rollout
    (``batches.SAMPLED_ROLLOUT``)."""
    sample = functools.partial(sample_lib.sample, policy_model, cfg=sampling_cfg)

    def rollout(policy_params, ref_params, value_params, prompt_BP, prompt_valid_BP, key):
        out = sample(policy_params, prompt_BP, prompt_valid_BP, key)
        tokens_BT, valid_BT, _ = prompt_and_response(prompt_BP, prompt_valid_BP, out)
        response_mask_BT = jnp.concatenate([jnp.zeros_like(prompt_valid_BP, bool), out.mask_BN], axis=1)
        logprobs_BT, _ = rl.sequence_logprobs(policy_params, tokens_BT, valid_BT, model=policy_model,
                                              temperature=algo.temperature, loss_chunk=algo.loss_chunk)
        ref_logprobs_BT, _ = rl.sequence_logprobs(ref_params, tokens_BT, valid_BT, model=policy_model,
                                                  temperature=algo.temperature, loss_chunk=algo.loss_chunk)
        r = {"tokens": tokens_BT, "valid": valid_BT, "response_mask": response_mask_BT, "finished": out.finished_B,
             "old_logprobs": logprobs_BT, "ref_logprobs": ref_logprobs_BT}
        if algo.has_value:
            r["old_values"] = rl.sequence_values(value_params, tokens_BT, valid_BT, model=value_model)
        return r

    return rollout


def finish_rollout(algo: Algorithm, rollout, scores_B, kl_coef, score_metric: str):
    """The algorithm's batch and rollout metrics, plus the mean raw score as ``score_metric``."""
    batch, metrics = algo.advantages(rollout, scores_B, kl_coef)
    metrics[score_metric] = jnp.mean(scores_B)
    return batch, metrics


def make_experience_fn(algo: Algorithm, policy_model: GPT, value_model: ScoreModel | None, reward_model: ScoreModel,
                       sampling_cfg: SamplingConfig):
    """(policy, ref, value, reward params, prompts, valid, key, kl_coef) -> rollout batch + metrics: the whole
    rollout scored by a reward model, one program."""
    rollout = make_rollout_fn(algo, policy_model, value_model, sampling_cfg)

    def experience(policy_params, ref_params, value_params, reward_params, prompt_BP, prompt_valid_BP, key,
                   kl_coef):
        r = rollout(policy_params, ref_params, value_params, prompt_BP, prompt_valid_BP, key)
        scores_B = sequence_rewards(reward_params, r["tokens"], r["valid"], model=reward_model)
        return finish_rollout(algo, r, scores_B, kl_coef, ModelReward.metric)

    return experience


def make_update_fn(algo: Algorithm, policy_tx, value_tx):
    """(state, rollout batch, ptx batches, key) -> (new state, metrics averaged over all minibatch steps)."""
    argnums = (0, 1) if algo.has_value else 0
    grad_fn = jax.value_and_grad(algo.loss, argnums=argnums, has_aux=True)
    M, mb = algo.num_minibatches, algo.minibatch_size

    def update(state: RLState, batch, ptx_EMB, key):
        def one_epoch(carry, xs):
            epoch_key, ptx_MB = xs
            perm = jax.random.permutation(epoch_key, algo.rollout_batch_size).reshape(M, mb)

            def one_step(carry, xs):
                pp, po, vp, vo = carry
                idx, ptx = xs
                minibatch = jax.tree.map(lambda x: x[idx], batch)
                if ptx is not None:
                    minibatch["ptx"] = ptx
                (_, metrics), grads = grad_fn(pp, vp, minibatch, None)
                g_policy, g_value = grads if algo.has_value else (grads, None)
                upd, po = policy_tx.update(g_policy, po, pp)
                pp = optax.apply_updates(pp, upd)
                metrics["policy_grad_norm"] = optax.global_norm(g_policy)
                if algo.has_value:
                    upd, vo = value_tx.update(g_value, vo, vp)
                    vp = optax.apply_updates(vp, upd)
                    metrics["value_grad_norm"] = optax.global_norm(g_value)
                return (pp, po, vp, vo), metrics

            return jax.lax.scan(one_step, carry, (perm, ptx_MB))

        keys = jax.random.split(key, algo.epochs)
        carry = (state.policy_params, state.policy_opt, state.value_params, state.value_opt)
        (pp, po, vp, vo), metrics = jax.lax.scan(one_epoch, carry, (keys, ptx_EMB))
        new_state = state.replace(policy_params=pp, policy_opt=po, value_params=vp, value_opt=vo)
        return new_state, jax.tree.map(jnp.mean, metrics)

    return update


@dataclasses.dataclass
class Iteration:
    """One iteration's programs as ``run_rl`` runs them (``experiments.bench`` times the same ones)."""

    algo: Algorithm
    policy_tx: optax.GradientTransformation
    value_tx: optax.GradientTransformation | None
    kl_ctl: Any  # rl.FixedKLController | rl.AdaptiveKLController
    experience: Callable | None  # jitted make_experience_fn (a reward model); None with a reward function
    rollout: Callable  # jitted make_rollout_fn (a reward function: then host scores, then ``advantages``)
    advantages: Callable  # jitted (rollout, scores, kl_coef) -> (batch, metrics) of a reward function
    update: Callable  # jitted make_update_fn; donates the state

    def init_state(self, policy_params, value_params, rng_key_data) -> RLState:
        """A state at iteration 0 holding (not copying) the given parameters, fresh optimizers and KL coefficient."""
        value_opt = self.value_tx.init(value_params) if self.algo.has_value else None
        return RLState(step=jnp.zeros((), jnp.int32), policy_params=policy_params,
                       policy_opt=self.policy_tx.init(policy_params),
                       value_params=value_params if self.algo.has_value else None, value_opt=value_opt,
                       kl=self.kl_ctl.init(), rng=rng_key_data)


def make_iteration(algo: Algorithm, policy_model: GPT, value_model: ScoreModel | None,
                   reward_model: ScoreModel | None, sampling_cfg: SamplingConfig, optim_cfg, total_updates: int,
                   policy_params, value_params) -> Iteration:
    """The optimizers (AdamW of ``optim_cfg`` over ``total_updates`` minibatch steps), the KL controller and the
    jitted programs of one iteration (``reward_model`` None: scored by a reward function on the host)."""
    policy_tx, _ = make_optimizer(optim_cfg, total_updates, policy_params)
    value_tx = make_optimizer(optim_cfg, total_updates, value_params)[0] if algo.has_value else None
    experience = None
    if reward_model is not None:
        experience = jax.jit(make_experience_fn(algo, policy_model, value_model, reward_model, sampling_cfg))
    rollout = jax.jit(make_rollout_fn(algo, policy_model, value_model, sampling_cfg))
    advantages = jax.jit(functools.partial(finish_rollout, algo, score_metric=FunctionReward.metric))
    update = jax.jit(make_update_fn(algo, policy_tx, value_tx), donate_argnums=(0,))
    return Iteration(algo, policy_tx, value_tx, algo.kl_controller, experience, rollout, advantages, update)


def run_rl(cfg, workdir: str, *, algo: Algorithm, policy_model: GPT, value_model: ScoreModel | None, policy_params,
           value_params, reward: ModelReward | FunctionReward, prompts: Sequence[np.ndarray], pad_id: int,
           eos_id: int, vocab_size: int | None = None, ptx_iter=None,
           eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None, mesh=None) -> RLResult:
    """Run (or resume) ``algo`` in ``workdir``. The policy and reference start from ``policy_params``, the value
    model (if the algorithm has one) from ``value_params``; the reward model's parameters stay frozen.

    ``prompts``: token arrays (rendered chat prompts ending with the assistant role token). ``ptx_iter``: LM
    batches of ``algo.minibatch_size`` rows (needed when ``algo.ptx_coef > 0``). ``eval_fn(policy_params, step)``
    returns extra metrics every ``train.eval_every`` iterations and at the end.
    """
    t = cfg.train
    if algo.ptx_coef > 0 and ptx_iter is None:
        raise ConfigError(f"{algo.name}.ptx_coef={algo.ptx_coef} needs pretraining data (config.ptx); set "
                          f"{algo.name}.ptx_coef=0 to turn the pretraining term off")
    if not prompts:
        raise ConfigError(f"{algo.name} needs at least one prompt (data.prompts_path)")
    run = run_lib.RunContext(cfg, workdir)  # a workdir of another config is refused before anything is touched
    mesh = mesh if mesh is not None else sharding_lib.make_mesh(tuple(cfg.mesh.shape))
    sharding_lib.check_batch_divisible(algo.minibatch_size, mesh, field=f"{algo.name}.minibatch_size")
    sampling_cfg = SamplingConfig(max_new_tokens=int(cfg.sampling.max_new_tokens), temperature=algo.temperature,
                                  top_k=int(cfg.sampling.top_k), top_p=float(cfg.sampling.top_p),
                                  eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size,
                                  decode_segments=int(cfg.sampling.get("decode_segments", 1)),
                                  unroll_layers=cfg.sampling.get("unroll_layers") is not False)
    # All prompts left-padded to one length (the longest), so every iteration compiles once.
    prompts_NP = sample_lib.left_pad(prompts, pad_id)
    total_updates = t.steps * algo.epochs * algo.num_minibatches
    iteration = make_iteration(algo, policy_model, value_model,
                               reward.model if isinstance(reward, ModelReward) else None, sampling_cfg, cfg.optim,
                               total_updates, policy_params, value_params)
    base_key = jax.random.key(t.seed)
    # Positions each iteration scores and trains on (prompt + response slots, padding included).
    episode_tokens = algo.rollout_batch_size * (prompts_NP[0].shape[1] + sampling_cfg.max_new_tokens)
    with run:
        state = _restore_or_init(run, iteration, policy_params, value_params, base_key, ptx_iter, mesh)
        writer = run.open_metrics(int(state.step))
        metrics: dict = {}
        start_step = int(state.step)
        clock = run_lib.StepClock(start_step, int(t.steps))
        for it in range(start_step, t.steps):
            # The frozen reference is the initial (SFT) policy.
            state, metrics, seconds = _iterate(it, state, iteration, policy_params, reward, prompts_NP, base_key,
                                               ptx_iter, mesh, episode_tokens)
            step = it + 1
            if eval_fn is not None and (step % t.eval_every == 0 or step == t.steps):
                metrics.update({f"eval/{k}": float(v) for k, v in eval_fn(state.policy_params, step).items()})
            writer.write_scalars(step, metrics)
            if clock.step_done():
                logging.info("%s iteration %d took %.1f s (compilation included; ETAs start after it)",
                             algo.name.upper(), step, seconds)
            if step % t.log_every == 0 or step == t.steps:
                _log_progress(algo.name, step, t.steps, metrics, clock.eta(step, seconds))
            stopping = run.should_stop(step)  # SIGINT/SIGTERM: save this iteration, then stop
            if stopping or step % t.ckpt_every == 0 or step == t.steps:
                run.ckpt.save(step, state, data_state=None if ptx_iter is None else ptx_iter.get_state(),
                              config=workdir_lib.config_to_dict(cfg))
            if stopping:
                run.stop(step)
    return RLResult(step=int(state.step), metrics=metrics, state=state, workdir=run.workdir)


def _restore_or_init(run: run_lib.RunContext, iteration: Iteration, policy_params, value_params, base_key,
                     ptx_iter, mesh) -> RLState:
    """The workdir's latest checkpoint (and ptx data position), else a fresh state."""
    # Copies: the update donates the state's buffers, while the reference keeps the initial policy's.
    copy = functools.partial(jax.tree.map, jnp.copy)
    state = iteration.init_state(copy(policy_params), copy(value_params), jnp.copy(jax.random.key_data(base_key)))
    # The state's scalars (step, optimizer counts, KL coefficient, key) replicated over the mesh, as the jitted
    # update returns them: left unplaced, the first iteration's update and rollout programs were compiled for them
    # and compiled again for the second's (6 s of the demo's PPO); restored, one device would be refused.
    replicated = sharding_lib.replicated(mesh)
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                         else jax.device_put(x, replicated), state)
    latest = run.ckpt.latest_step()
    if latest is not None:
        # Restored as the fresh state is laid out.
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = run.ckpt.restore(latest, abstract)
        state = restored.state
        if ptx_iter is not None and restored.data_state is not None:
            ptx_iter.set_state(restored.data_state)
        logging.info("%s resumed from %s/%d", iteration.algo.name.upper(), run.ckpt.directory, latest)
    return state


def draw_prompts(draw_key, num_prompts: int, algo: Algorithm) -> np.ndarray:
    """Indices of the iteration's prompts, each repeated ``samples_per_prompt`` times (a group per prompt)."""
    n = algo.prompts_per_iteration
    # Prompts: a pure function of (seed, iteration) so resume draws the same ones.
    rng_np = np.random.default_rng(np.asarray(jax.random.key_data(draw_key)).astype(np.uint64))
    idx = rng_np.choice(num_prompts, n, replace=num_prompts < n)
    return np.repeat(idx, algo.samples_per_prompt) if algo.samples_per_prompt > 1 else idx


def _experience(iteration: Iteration, state: RLState, ref_params, reward, idx, prompts_BP, valid_BP, sample_key,
                mesh):
    """The scored rollout batch and its metrics: one program with a reward model; else rollout, host scores,
    advantages."""
    with sharding_lib.activate(mesh):
        if iteration.experience is not None:
            return iteration.experience(state.policy_params, ref_params, state.value_params, reward.params,
                                        prompts_BP, valid_BP, sample_key, state.kl.kl_coef)
        r = iteration.rollout(state.policy_params, ref_params, state.value_params, prompts_BP, valid_BP, sample_key)
    host = jax.device_get({k: r[k] for k in ("tokens", "valid", "response_mask")})
    rows = Rollouts(host["tokens"], host["valid"], host["response_mask"], None, None)
    scores_B = jax.device_put(reward.score(idx, rows), sharding_lib.batch_sharding(mesh, 1))
    with sharding_lib.activate(mesh):
        return iteration.advantages(r, scores_B, state.kl.kl_coef)


def _iterate(it: int, state: RLState, iteration: Iteration, ref_params, reward, prompts_NP, base_key, ptx_iter, mesh,
             episode_tokens: int) -> tuple[RLState, dict, float]:
    """Iteration ``it``: rollout, update, KL controller; returns (new state, its metrics, its seconds)."""
    algo = iteration.algo
    prompt_tokens, prompt_valid = prompts_NP
    it_key = jax.random.fold_in(base_key, it)
    draw_key, sample_key, update_key = jax.random.split(it_key, 3)
    idx = draw_prompts(draw_key, len(prompt_tokens), algo)
    t_roll = time.time()
    # Prompts split over data x fsdp; under the mesh the model's logical constraints shard the rollout.
    prompts_BP = jax.device_put(prompt_tokens[idx], sharding_lib.batch_sharding(mesh))
    valid_BP = jax.device_put(prompt_valid[idx], sharding_lib.batch_sharding(mesh))
    batch, roll_metrics = _experience(iteration, state, ref_params, reward, idx, prompts_BP, valid_BP, sample_key,
                                      mesh)
    jax.block_until_ready(batch)
    rollout_s = time.time() - t_roll
    ptx = None
    if algo.ptx_coef > 0:
        ptx_batches = [next(ptx_iter) for _ in range(algo.epochs * algo.num_minibatches)]
        ptx = jax.tree.map(lambda *xs: np.stack(xs).reshape(
            (algo.epochs, algo.num_minibatches) + xs[0].shape), *ptx_batches)
    t_upd = time.time()
    with sharding_lib.activate(mesh):
        state, upd_metrics = iteration.update(state, batch, ptx, update_key)
    new_kl = iteration.kl_ctl.update(state.kl, roll_metrics["kl"], algo.rollout_batch_size)
    state = state.replace(step=state.step + 1, kl=new_kl)
    jax.block_until_ready(state.step)
    update_s = time.time() - t_upd
    metrics = {f"rollout/{k}": float(v) for k, v in roll_metrics.items()}
    metrics.update({f"{algo.name}/{k}": float(v) for k, v in upd_metrics.items()})
    generated = algo.rollout_batch_size * metrics["rollout/response_length"]
    metrics.update({f"{algo.name}/kl_coef": float(state.kl.kl_coef), "rollout/generated_tokens": generated,
                    "rollout/episodes": float(algo.rollout_batch_size),
                    "time/rollout_s": rollout_s, "time/update_s": update_s,
                    "time/rollout_fraction": rollout_s / max(rollout_s + update_s, 1e-9),
                    "perf/episode_tokens_per_s": episode_tokens / max(rollout_s + update_s, 1e-9),
                    "perf/rollout_new_tokens_per_s": generated / max(rollout_s, 1e-9)})
    return state, metrics, rollout_s + update_s


def _log_progress(name: str, step: int, steps: int, metrics: Mapping[str, float], eta) -> None:
    clip = metrics.get(f"{name}/clip_frac", float("nan"))
    logging.info("%s %d/%d | score %.3f | kl %.3f | reward %.3f | eos %.2f | len %.1f | "
                 "clip %.3f | %s episode tok/s | rollout %.0f%%, %s new tok/s | ETA %s", name, step, steps,
                 metrics["rollout/score"], metrics["rollout/kl"], metrics["rollout/reward"],
                 metrics["rollout/eos_rate"], metrics["rollout/response_length"], clip,
                 f"{metrics['perf/episode_tokens_per_s']:,.0f}", 100 * metrics["time/rollout_fraction"],
                 f"{metrics['perf/rollout_new_tokens_per_s']:,.0f}", eta)
