"""The one training loop of every stage that trains by gradient steps on batches (pretraining, SFT, reward model).

Per step: the host takes a prefetched, already-sharded stack of accumulation microbatches
(``(A, micro, ...)``, A = optim.grad_accum_steps) and dispatches one jitted step that loops over the first
``k`` of them (``k = A``, or fewer while the GPT-3 batch ramp is on — same program, no recompiles),
averages gradients weighted by each microbatch's token count (so accumulation equals one big batch), clips,
and applies AdamW — or, if the loss or gradient norm is not finite, keeps params and optimizer state
unchanged and counts the step as skipped. The state is donated, so it is updated in place.

The host never waits for the device inside the loop: step metrics stay on the device until a log step,
where the host reads the *previous* log interval's metrics (long finished by then), so the device always
has the next interval queued. The NaN-guard counter is checked then too. Evaluation, samples and
checkpoints (async; only the device-to-host copy blocks) happen at their own intervals.

``loss_fn(params, batch, rng, deterministic) -> (loss, metrics)``: a scalar mean loss over the batch and a
dict of scalars; ``metrics["num_tokens"]`` (if present) weights the batch in accumulation and evaluation.
Metrics named ``num_*`` are summed over microbatches/batches, the others averaged with those weights.

The run's setup and teardown (workdir, checkpointer, metrics writer, run_info.json / summary.json) are
``gptjax.train.run.RunContext``'s, shared with every other loop (PPO's). The loop knows no stage: a stage hands it
a model, an objective and data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import flops as flops_lib
from gptjax import sharding as sharding_lib
from gptjax.errors import ConfigError, UserError
from gptjax.model import GPTConfig, count_params
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import metrics as metrics_lib
from gptjax.train import run as run_lib
from gptjax.train import state as state_lib
from gptjax.train import workdir as workdir_lib
from gptjax.train.inputs import DevicePrefetcher, EvalSource
from gptjax.train.optim import BatchRamp, make_optimizer

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


def mesh_context(mesh):
    """The context jitted steps are traced and run in: the mesh plus the logical-axis rules, so the model's
    activation constraints (``nn.with_logical_constraint``) apply."""
    return sharding_lib.activate(mesh)


class TrainingStopped(UserError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why and what to do."""


@dataclasses.dataclass
class TrainResult:
    step: int  # steps completed
    train_metrics: dict  # last logged train metrics
    eval_metrics: dict  # last evaluation (empty without an eval iterator)
    samples: list[str]  # last sample generations (empty without sample_fn)
    workdir: str
    state: Any = None  # the final TrainState (sharded on the mesh)
    summary: dict | None = None  # summary.json, when the run had already finished (a re-run changed nothing)


# --- the jitted steps -------------------------------------------------------------------------------------------

def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule, param_shardings):
    """(state, batch (A, B, ...) of A stacked microbatches, num_micro) -> (new state, metrics). Pure; jit it.

    Only the first ``num_micro`` (a traced int32 <= A) microbatches are used: the batch ramp changes it from
    step to step without recompiling (the unused slots are padding that is never read). Gradients and
    metrics are weighted by each microbatch's ``num_tokens``, so accumulation equals one big batch.
    """

    def grads_of(params, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, deterministic=False)
        weight = jnp.asarray(metrics.get("num_tokens", 1.0), jnp.float32)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items() if k != "loss"}
        return jnp.asarray(loss, jnp.float32), metrics, weight, grads

    def weighted(loss, metrics, weight):
        """Sums that combine over microbatches: loss·w, w, metric·w (``num_*`` metrics as they are)."""
        return (loss * weight, weight, {k: v if k.startswith("num_") else v * weight for k, v in metrics.items()})

    def step(state: state_lib.TrainState, batch, num_micro):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

        def micro_at(i):
            return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), batch)

        if jax.tree.leaves(batch)[0].shape[0] == 1:
            loss, metrics, weight, grads = grads_of(state.params, micro_at(0), jax.random.fold_in(step_rng, 0))
            sums = weighted(loss, metrics, weight)
        else:
            def body(i, carry):
                grad_sum, sums = carry
                loss, metrics, weight, grads = grads_of(state.params, micro_at(i), jax.random.fold_in(step_rng, i))
                grad_sum = jax.tree.map(lambda acc, g: acc + weight * g.astype(jnp.float32), grad_sum, grads)
                return grad_sum, jax.tree.map(jnp.add, sums, weighted(loss, metrics, weight))

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
            sums_shape = jax.eval_shape(lambda: weighted(*grads_of(state.params, micro_at(0), step_rng)[:3]))
            init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
            grad_sum, sums = jax.lax.fori_loop(0, num_micro, body, init)
            total = jnp.maximum(sums[1], 1e-12)
            grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grad_sum, state.params)
        loss_w, weight, metric_sums = sums
        total = jnp.maximum(weight, 1e-12)
        loss = loss_w / total
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, apply, lambda _: (state.params, state.opt_state), None)
        bad = (~finite).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(rng),
                                  consecutive_bad=jnp.where(finite, 0, state.consecutive_bad + 1),
                                  total_bad=state.total_bad + bad)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.updates_applied),
                   "skipped": bad, "consecutive_bad": new_state.consecutive_bad,
                   **{k: v if k.startswith("num_") else v / total for k, v in metric_sums.items()}}
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn):
    """(params, batch) -> (loss·weight, weight, {metric·weight or num_* sums}): sums over batches stay exact."""

    def step(params, batch):
        loss, metrics = loss_fn(params, batch, jax.random.key(0), deterministic=True)
        weight = jnp.asarray(metrics.get("num_tokens", 1.0), jnp.float32)
        sums = {k: jnp.asarray(v, jnp.float32) * (1.0 if k.startswith("num_") else weight)
                for k, v in metrics.items() if k != "loss"}
        return jnp.asarray(loss, jnp.float32) * weight, weight, sums

    return step


# --- metrics, evaluation, start-up --------------------------------------------------------------------------

class _Reporter:
    """Turns per-step device metrics into log records one log interval late, so the host never waits for the
    device: at a log step it starts the device-to-host copies of this interval and reports the previous one
    (finished long ago). Checks the NaN guard's counter while doing so.

    Rates are measured between *completion* times of interval boundaries (the run's first step, then each
    interval's last step), never host dispatch times: the host may run an interval ahead of the device, a few
    steps (XLA:CPU bounds the steps in flight) or none, and dispatch times would misreport the first and last
    intervals. A boundary's completion is stamped the first time it is seen ready: polled without
    blocking at every step, or waited for when its interval is reported. The first step's time (compilation
    included) goes in the first record as ``perf/first_step_s`` and is kept out of the rates."""

    def __init__(self, writer: metrics_lib.MetricsWriter, train_cfg, *, flops_per_token: float | None,
                 peak_flops_total: float | None, latest_checkpoint: Callable[[], int | None],
                 clock: Callable[[], float] = time.perf_counter):
        self._writer, self._t, self._clock = writer, train_cfg, clock
        self._flops, self._peak, self._latest_ckpt = flops_per_token, peak_flops_total, latest_checkpoint
        self._pending: list[tuple[int, dict, int]] = []  # (step, device metrics, tokens) of the open interval
        self._queued: list[tuple[int, dict, int]] = []  # the closed interval waiting to be reported
        self._started = clock()
        self._first: int | None = None  # this run's first step (after a resume: the step after the checkpoint)
        self._first_step_s: float | None = None  # start to the first step's completion; goes in the first record
        self._unstamped: list[tuple[int, Any]] = []  # boundaries (step, a metric array) not yet seen complete
        self._last_watched: int | None = None  # the latest boundary step handed to _watch
        self._stamps: dict[int, float] = {}  # boundary step -> when it was first seen complete
        self._origin: int | None = None  # the boundary the next reported interval's rate is measured from
        self.last: dict[str, float] = {}  # the last reported train scalars

    def add(self, step: int, metrics: dict, tokens: int) -> None:
        if self._first is None:  # the run's first step: the rates start where it ends
            self._first = self._origin = step
            self._watch(step, metrics)
        self._pending.append((step, metrics, tokens))
        closes = step % int(self._t.log_every) == 0 or step == int(self._t.steps)
        if closes:
            self._watch(step, metrics)
        self._poll()
        if closes:
            for x in jax.tree.leaves([m for _, m, _ in self._pending]):
                x.copy_to_host_async()
            if self._queued:
                self._report(self._queued, final=False)
            self._queued, self._pending = self._pending, []

    def finish(self) -> None:
        entries, self._queued, self._pending = self._queued + self._pending, [], []
        if entries:
            self._watch(*entries[-1][:2])  # the data ran out mid-interval: its last step ends the report
            self._report(entries, final=True)

    def _watch(self, step: int, metrics: dict) -> None:
        """Makes ``step`` a boundary whose completion time is taken (once; boundaries come in step order)."""
        if step != self._last_watched:
            self._last_watched = step
            self._unstamped.append((step, jax.tree.leaves(metrics)[0]))

    def _poll(self) -> None:
        """Stamps the boundaries that completed since the last look (in order: a later one is never ready first)."""
        while self._unstamped and self._unstamped[0][1].is_ready():
            self._stamp(self._unstamped.pop(0)[0])

    def _stamp(self, step: int) -> None:
        self._stamps[step] = now = self._clock()
        if step == self._first:
            self._first_step_s = first_s = now - self._started
            logging.info("step %d done %.1f s after the start (compilation included; not counted in tok/s)",
                         step, first_s)

    def settle(self) -> None:
        """Waits for the boundaries not yet seen complete, in order, stamping each. The loop calls it before the
        host blocks on a later result (a checkpoint, an evaluation, samples): that wait would pass their
        completions unseen, and the same total wait taken here in order times each one exactly."""
        while self._unstamped:
            self._wait_next()

    def _wait_next(self) -> None:
        boundary, array = self._unstamped.pop(0)
        jax.block_until_ready(array)
        self._stamp(boundary)

    def _wait_for(self, step: int) -> float:
        """When boundary ``step`` completed, waiting for it (and the boundaries before it) if need be."""
        while step not in self._stamps:
            self._wait_next()
        return self._stamps[step]

    def _report(self, entries, final: bool) -> None:
        t = self._t
        start_step, end_step = self._origin, entries[-1][0]
        start_time, end_time = self._wait_for(start_step), self._wait_for(end_step)
        self._origin = end_step
        self._stamps = {s: v for s, v in self._stamps.items() if s >= end_step}
        values = jax.device_get([m for _, m, _ in entries])
        timed = [(s, n) for s, _, n in entries if s > start_step]  # the steps between the two completions
        elapsed, tokens = end_time - start_time, sum(n for _, n in timed)
        rate = tokens / elapsed if timed and elapsed > 0 else None
        good = [v for v in values if not v["skipped"]]  # a skipped step's NaN loss would poison the means
        scalars = {f"train/{k}": float(np.mean([v[k] for v in good])) if good else float("nan")
                   for k in values[-1] if k not in ("skipped", "lr", "consecutive_bad") and not k.startswith("num_")}
        scalars.update({f"train/{k}": float(sum(v[k] for v in values)) for k in values[-1] if k.startswith("num_")})
        scalars["train/lr"] = float(values[-1]["lr"])
        scalars["train/skipped_steps"] = float(sum(v["skipped"] for v in values))
        scalars["perf/batch_size"] = sum(n for _, _, n in entries) / len(entries) / int(t.seq_len)
        if self._first_step_s is not None:
            scalars["perf/first_step_s"], self._first_step_s = self._first_step_s, None
        util = None
        if rate is not None:
            scalars["perf/tokens_per_s"] = rate
            util = flops_lib.mfu(rate, self._flops, self._peak) if self._flops else None
            if util is not None:
                scalars["perf/mfu"] = util
        self._writer.write_scalars(end_step, scalars)
        eta = None if final or rate is None else (int(t.steps) - end_step) * elapsed / len(timed)
        logging.info(metrics_lib.format_progress(
            end_step, int(t.steps), loss=scalars["train/loss"], tokens_per_s=rate, mfu=util, eta_s=eta,
            extra={"lr": scalars["train/lr"], "gnorm": scalars.get("train/grad_norm", float("nan"))}))
        self.last = scalars
        bad = int(values[-1]["consecutive_bad"])
        if bad >= int(t.max_consecutive_bad_steps):
            raise TrainingStopped(
                f"stopping at step {end_step}: {bad} consecutive steps had a non-finite loss or gradient norm "
                f"(limit train.max_consecutive_bad_steps={t.max_consecutive_bad_steps}); those updates were "
                f"skipped, so parameters are those of the last good step. The last checkpoint is step "
                f"{self._latest_ckpt()}. Lower optim.lr, check the data, or compute in float32 (model.dtype).")


def _evaluate(eval_step, evaluator: EvalSource, params, mesh, num_batches: int,
              perplexity: bool = True) -> dict[str, float]:
    """Weighted validation loss (and its perplexity) and metrics over the same ``num_batches`` batches."""
    sums = None
    with mesh_context(mesh):
        for batch in evaluator.batches(num_batches):
            arrays = {k: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh, np.ndim(v)),
                                                                 np.asarray(v)) for k, v in batch.items()}
            out = eval_step(params, arrays)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
        raise ConfigError("the eval iterator yielded no batches (check the validation split)")
    loss_w, weight, rest = jax.device_get(sums)
    weight = max(float(weight), 1e-12)
    result = {"eval/loss": float(loss_w) / weight}
    if perplexity:
        result["eval/perplexity"] = math.exp(min(result["eval/loss"], 50.0))
    result.update({f"eval/{k}": float(v) if k.startswith("num_") else float(v) / weight for k, v in rest.items()})
    return result


def _check_train_config(t, optim_cfg, mesh) -> int:
    """The microbatch size, after checking the batch fields against each other and the mesh."""
    if t.steps <= 0:
        raise ConfigError(f"train.steps must be positive, got {t.steps}")
    if t.batch_size % optim_cfg.grad_accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by optim.grad_accum_steps="
                          f"{optim_cfg.grad_accum_steps}; the microbatch is batch_size / grad_accum_steps")
    micro = t.batch_size // optim_cfg.grad_accum_steps
    sharding_lib.check_batch_divisible(t.batch_size, mesh, field="train.batch_size")
    sharding_lib.check_batch_divisible(micro, mesh, field="train.batch_size / optim.grad_accum_steps (microbatch)")
    for name in ("log_every", "ckpt_every"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
    return micro


@dataclasses.dataclass
class _Setup:
    """What a run derives from its config before it touches the workdir (nothing allocated): the validated batch
    sizes, the optimizer and the train state's shardings and shapes."""

    micro: int  # rows per accumulation microbatch
    ramp: BatchRamp
    rng: jax.Array
    init_params_fn: Callable
    tx: optax.GradientTransformation
    schedule: Callable
    shardings: state_lib.TrainState
    abstract: state_lib.TrainState


def _setup(cfg, model: nn.Module, mesh, init_params_fn: Callable | None) -> _Setup:
    t = cfg.train
    micro = _check_train_config(t, cfg.optim, mesh)
    ramp = BatchRamp(t.batch_size, micro, t.seq_len, int(cfg.optim.ramp_start_tokens), int(cfg.optim.ramp_tokens))
    rng = jax.random.key(t.seed)
    init_params_fn = init_params_fn or state_lib.default_init_params_fn(model, t.seq_len)
    boxed = state_lib.abstract_boxed_params(init_params_fn, rng)
    tx, schedule = make_optimizer(cfg.optim, int(t.steps), nn.unbox(boxed))
    shardings = state_lib.state_shardings(boxed, tx, mesh)
    abstract = state_lib.abstract_state(boxed, tx, shardings, rng)
    return _Setup(micro, ramp, rng, init_params_fn, tx, schedule, shardings, abstract)


def _restore_or_init(ckpt: ckpt_lib.Checkpointer, t, setup: _Setup, *, mesh, train_iter,
                     extra_ckpt_items) -> state_lib.TrainState:
    """The latest checkpoint of the workdir (with data position and extras), else a fresh or init_from state."""
    latest = ckpt.latest_step()
    if latest is not None:
        restored = ckpt.restore(latest, setup.abstract)
        if restored.data_state is not None:
            if not hasattr(train_iter, "set_state"):
                raise ConfigError("the train iterator has no set_state(): cannot resume the data position")
            train_iter.set_state(restored.data_state)
        else:
            logging.warning("checkpoint %d has no data-iterator state: data restarts from the beginning", latest)
        for name, (_, set_fn) in extra_ckpt_items.items():
            if name in restored.extras:
                set_fn(restored.extras[name])
        logging.info("resumed from %s/%d", ckpt.directory, restored.step)
        return restored.state
    state = state_lib.create_sharded_state(setup.init_params_fn, setup.tx, setup.shardings, mesh, setup.rng)
    if t.init_from:
        loaded = ckpt_lib.load_params(t.init_from, setup.abstract.params, keep_fresh=tuple(t.init_from_fresh))
        params = jax.tree_util.tree_map_with_path(
            lambda path, fresh: loaded.get(tuple(str(getattr(k, "key", k)) for k in path), fresh), state.params)
        state = state_lib.state_with_params(params, setup.tx, setup.shardings, mesh, setup.rng)
    return state


# --- the loop ---------------------------------------------------------------------------------------------------

class _Trainer:
    """A run's jitted steps, its state, and what the loop does at its intervals: evaluate, sample, checkpoint."""

    def __init__(self, run: run_lib.RunContext, cfg, setup: _Setup, mesh, loss_fn: LossFn, state, *, eval_iter,
                 sample_fn, extra_ckpt_items, perplexity: bool):
        self.run, self.t, self.setup, self.mesh, self.state = run, cfg.train, setup, mesh, state
        self.steps = int(cfg.train.steps)
        self.batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))  # (microbatch slot, batch, ...)
        self.train_step = jax.jit(make_train_step(loss_fn, setup.tx, setup.schedule, setup.shardings.params),
                                  in_shardings=(setup.shardings, self.batch_sharding, None),
                                  out_shardings=(setup.shardings, None), donate_argnums=(0,))
        self.eval_step = jax.jit(make_eval_step(loss_fn),
                                 in_shardings=(setup.shardings.params, sharding_lib.batch_sharding(mesh, 1)))
        self.evaluator = EvalSource(eval_iter) if eval_iter is not None else None
        self.sample_fn, self.extra_ckpt_items, self.perplexity = sample_fn, extra_ckpt_items, perplexity
        self.config_dict = workdir_lib.config_to_dict(cfg)
        self.eval_result: dict = {}
        self.sample_texts: list[str] = []

    def evaluate(self, step: int) -> None:
        self.eval_result = _evaluate(self.eval_step, self.evaluator, self.state.params, self.mesh,
                                     int(self.t.eval_batches), perplexity=self.perplexity)
        self.run.writer.write_scalars(step, self.eval_result)
        logging.info("eval @ step %d: %s", step, _fmt(self.eval_result))

    def samples(self, step: int) -> None:
        self.sample_texts = texts = list(self.sample_fn(self.state.params))
        self.run.writer.write_texts(step, {f"samples/{i}": s for i, s in enumerate(texts)})
        for i, s in enumerate(texts):
            logging.info("sample %d @ step %d: %r", i, step, s)

    def save(self, step: int, data_state) -> None:
        extras = {name: get_fn() for name, (get_fn, _) in self.extra_ckpt_items.items()}
        self.run.ckpt.save(step, self.state, data_state=data_state, config=self.config_dict, extras=extras)

    def _due(self, every, step: int) -> bool:
        return every > 0 and step % int(every) == 0 and step != self.steps

    def train(self, train_iter: Iterator, reporter: _Reporter, start_step: int) -> int:
        """Steps from ``start_step`` until ``train.steps`` (or the data's end); returns the last step done."""
        t, setup = self.t, self.setup
        data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
        prefetch = self.run.closing(DevicePrefetcher(train_iter, setup.ramp.microbatches_at,
                                                     setup.ramp.max_microbatches, start_step, self.steps,
                                                     self.batch_sharding))
        step = start_step
        for step_index, batch, data_state, num_micro in prefetch:
            with mesh_context(self.mesh):
                self.state, step_metrics = self.train_step(self.state, batch, np.int32(num_micro))
            step = step_index + 1
            reporter.add(step, step_metrics, num_micro * setup.micro * int(t.seq_len))
            stopping = self.run.should_stop(step)  # SIGINT/SIGTERM: save this step, then stop
            evaluating = self.evaluator is not None and self._due(t.eval_every, step) and not stopping
            sampling = self.sample_fn is not None and self._due(t.sample_every, step) and not stopping
            saving = step % int(t.ckpt_every) == 0 or step == self.steps or stopping
            if evaluating or sampling or saving:
                reporter.settle()  # each of them waits for this step: first time the steps before it
            if evaluating:
                self.evaluate(step)
            if sampling:
                self.samples(step)
            if saving:
                self.save(step, data_state)  # data_state: the iterator right after this step's batch
            if stopping:
                reporter.finish()  # the steps so far reach metrics.jsonl
                self.run.stop(step)
        reporter.finish()
        if step < self.steps:
            logging.warning("the training data ran out after step %d of %d", step, self.steps)
            if step > start_step and step % int(t.ckpt_every):
                self.save(step, data_state)
        if self.evaluator is not None:
            self.evaluate(step)
        if self.sample_fn is not None:
            self.samples(step)
        return step


def run_training(cfg, workdir: str, *, model: nn.Module, loss_fn: LossFn, train_iter: Iterator,
                 init_params_fn: Callable | None = None, eval_iter=None,
                 sample_fn: Callable[[Any], list[str]] | None = None, mesh=None,
                 extra_ckpt_items: Mapping[str, tuple[Callable[[], Any], Callable[[Any], None]]] | None = None,
                 flops_per_token: float | None = None, loss_is_token_nll: bool = True) -> TrainResult:
    """Train (or resume) in ``workdir`` per ``cfg`` (sections ``train``, ``optim``, ``mesh``).

    ``train_iter`` yields *microbatches* of ``train.batch_size / optim.grad_accum_steps`` rows (this process's
    share of them) as dicts of numpy arrays, and should have ``get_state``/``set_state`` for exact resume.
    ``eval_iter``: a factory of fresh iterators, or an iterator with get/set_state (rewound each time).
    ``init_params_fn(rng) -> boxed params`` (default: ``model.init`` on a dummy batch).
    ``sample_fn(params) -> [str]`` makes sample generations. ``extra_ckpt_items``: name -> (get, set) of
    JSON-able state saved with each checkpoint and given back on resume. ``loss_is_token_nll``: the loss is a
    mean per-token negative log-likelihood, so eval also reports its perplexity (False for the reward model's
    pairwise loss, whose exp means nothing). ``flops_per_token`` for MFU
    (default: gptjax.flops of ``model.cfg``).
    """
    t = cfg.train
    run = run_lib.RunContext(cfg, workdir)  # a workdir of another config is refused before anything is touched
    # The config, init_from and data are validated (no allocation) before anything is recorded, so a bad run never
    # claims the workdir.
    mesh = mesh if mesh is not None else sharding_lib.make_mesh(tuple(cfg.mesh.shape))
    setup = _setup(cfg, model, mesh, init_params_fn)
    if t.init_from and not ckpt_lib.finished_steps(run.workdir):
        ckpt_lib.fitting_params(t.init_from, setup.abstract.params, keep_fresh=tuple(t.init_from_fresh))
    if hasattr(train_iter, "validate"):
        train_iter.validate()  # e.g. an epoch of fewer rows than one batch
    extra_ckpt_items = dict(extra_ckpt_items or {})
    if flops_per_token is None and isinstance(getattr(model, "cfg", None), GPTConfig):
        flops_per_token = flops_lib.flops_per_token(model.cfg, t.seq_len)
    peak = float(t.peak_flops) or flops_lib.device_peak_flops()
    with run:
        state = _restore_or_init(run.ckpt, t, setup, mesh=mesh, train_iter=train_iter,
                                 extra_ckpt_items=extra_ckpt_items)
        start_step = int(jax.device_get(state.step))
        summary = run.finished_summary(start_step, int(t.steps))
        if summary is not None:  # a re-run of a finished run: report it, write nothing
            return _finished_result(run, start_step, state, summary)
        if run.primary:
            run.write_run_info(_run_info(cfg, model, mesh, start_step))
        writer = run.open_metrics(start_step)
        reporter = _Reporter(writer, t, flops_per_token=flops_per_token,
                             peak_flops_total=peak * jax.device_count() if peak else None,
                             latest_checkpoint=run.ckpt.latest_step)
        trainer = _Trainer(run, cfg, setup, mesh, loss_fn, state, eval_iter=eval_iter, sample_fn=sample_fn,
                           extra_ckpt_items=extra_ckpt_items, perplexity=loss_is_token_nll)
        step = trainer.train(train_iter, reporter, start_step)
        if run.primary:
            run.write_summary(_summary(run.workdir, model, t, step, setup, flops_per_token, run.elapsed()))
        return TrainResult(step=step, train_metrics=reporter.last, eval_metrics=trainer.eval_result,
                           samples=trainer.sample_texts, workdir=run.workdir, state=trainer.state)


def _finished_result(run: run_lib.RunContext, step: int, state, summary: Mapping[str, Any]) -> TrainResult:
    """The result of a run that had already finished: its last records of ``metrics.jsonl``."""
    logging.info("%s holds a finished run (step %d): nothing to do; its summary: %s", run.workdir, step,
                 json.dumps(summary))
    records = metrics_lib.read_metrics(run.workdir)
    last = {}
    for prefix in ("train/", "eval/"):
        found = [r for r in records if any(k.startswith(prefix) for k in r)]
        last[prefix] = {k: v for k, v in found[-1].items() if k != "step"} if found else {}
    return TrainResult(step=step, train_metrics=last["train/"], eval_metrics=last["eval/"], samples=[],
                       workdir=run.workdir, state=state, summary=dict(summary))


def _summary(workdir: str, model, t, step: int, setup: _Setup, flops_per_token, wall_s: float) -> dict[str, Any]:
    """What a finished run amounts to (sweeps gather these): size, tokens, compute and validation losses."""
    tokens = sum(setup.ramp.microbatches_at(s) for s in range(step)) * setup.micro * int(t.seq_len)
    evals = [r["eval/loss"] for r in metrics_lib.read_metrics(workdir) if r.get("eval/loss") is not None]
    summary: dict[str, Any] = {"steps": step, "tokens": tokens, "wall_time_s": wall_s,
                               "final_val_loss": evals[-1] if evals else None,
                               "best_val_loss": min(evals) if evals else None}
    model_cfg = getattr(model, "cfg", None)
    if isinstance(model_cfg, GPTConfig):
        counts = count_params(model_cfg)
        summary.update(params=counts["total"], non_embedding_params=counts["non_embedding"],
                       flops=flops_per_token * tokens if flops_per_token else None)
    return summary


def _fmt(d: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in d.items())


def _run_info(cfg, model, mesh, start_step: int) -> dict[str, Any]:
    """Facts about this start (not the config): what the config resolved to on this machine."""
    info = run_lib.start_info(mesh, start_step)
    model_cfg = getattr(model, "cfg", None)
    if isinstance(model_cfg, GPTConfig):
        info["model"] = dataclasses.asdict(model_cfg)
        info["params"] = count_params(model_cfg)
        info["flops_per_token"] = flops_lib.flops_per_token(model_cfg, cfg.train.seq_len)
    return info
