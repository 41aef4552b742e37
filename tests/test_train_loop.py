"""The shared trainer (gptjax.train.loop), in-process on 8 fake CPU devices with a tiny GPT.

Checked against independent references: gradient accumulation against one full-batch step (token-weighted,
so microbatches with different token counts still equal the big batch); evaluation against the loss computed
directly on the concatenated batches; the NaN guard against the invariant "a skipped step changes nothing
but the step counter and the rng"; the batch ramp against its own schedule and the data consumed;
``init_from`` against the source run's parameters; bad input against one clear error.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.pretrain import get_config
from gptjax import sharding
from gptjax.errors import ConfigError
from gptjax.model import GPT, ScoreModel
from gptjax.presets import preset_config
from gptjax.stages.pretrain import lm_loss
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import loop
from gptjax.train import state as state_lib
from gptjax.train.metrics import read_metrics
from gptjax.train.optim import make_optimizer

T = 16
MODEL_CFG = preset_config("tiny", max_len=T, num_layers=1, scan_layers=False)
MODEL = GPT(MODEL_CFG)


class SyntheticLM:
    """Deterministic LM batches (a function of the batch index), with grain-style get_state/set_state.

    ``poison_at``: batch indices whose ``poison`` field is NaN (the loss below turns it into a NaN loss)."""

    def __init__(self, batch, vocab=MODEL_CFG.vocab_size, seed=0, poison_at=(), length=None):
        self.batch, self.vocab, self.seed, self.poison_at, self.length = batch, vocab, seed, set(poison_at), length
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.length is not None and self.pos >= self.length:
            raise StopIteration
        rng = np.random.default_rng([self.seed, self.pos])
        tokens = rng.integers(0, 32, (self.batch, T + 1)).astype(np.int32)  # 32 of 512 ids: learnable
        weights = (rng.random((self.batch, T)) < 0.8).astype(np.float32)
        poison = np.full((self.batch,), np.nan if self.pos in self.poison_at else 0.0, np.float32)
        self.pos += 1
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights, "poison": poison,
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (self.batch, T)).copy(),
                "segment_ids": np.ones((self.batch, T), np.int32)}

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]


def poisonable_loss(params, batch, rng, deterministic=False):
    loss, metrics = lm_loss(params, batch, rng, model=MODEL, deterministic=deterministic)
    return loss * (1.0 + jnp.sum(batch["poison"])), metrics  # NaN poison -> NaN loss and NaN grads


def make_cfg(**train):
    cfg = get_config("tiny-bytes")
    cfg.train.seq_len = T
    cfg.train.batch_size = 8
    cfg.train.steps = 6
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 100
    cfg.train.sample_prompts = ()
    cfg.optim.warmup_steps = 2
    for k, v in train.items():
        if k.startswith("optim_"):
            cfg.optim[k[len("optim_"):]] = v
        else:
            cfg.train[k] = v
    return cfg


def run(cfg, workdir, it, **kw):
    return loop.run_training(cfg, str(workdir), model=MODEL, loss_fn=poisonable_loss, train_iter=it, **kw)


def make_step(tx, schedule):
    """(initial state, run_step(state, [microbatch, ...])) for ``tx`` on an 8-device data-parallel mesh."""
    mesh = sharding.make_mesh((-1, 1, 1))
    init = state_lib.default_init_params_fn(MODEL, T)
    boxed = state_lib.abstract_boxed_params(init, jax.random.key(0))
    shardings = state_lib.state_shardings(boxed, tx, mesh)
    state = state_lib.create_sharded_state(init, tx, shardings, mesh, jax.random.key(0))
    step = jax.jit(loop.make_train_step(poisonable_loss, tx, schedule, shardings.params))

    def run_step(state, microbatches, slots=None):
        """One step on ``microbatches``, stacked into ``slots`` slots (the rest zero padding, as the ramp does)."""
        slots = slots or len(microbatches)
        pad = [{k: np.zeros_like(v) for k, v in microbatches[0].items()}] * (slots - len(microbatches))
        with loop.mesh_context(mesh):
            return step(state, {k: jnp.stack([b[k] for b in microbatches + pad]) for k in microbatches[0]},
                        np.int32(len(microbatches)))

    return state, run_step


def test_grad_accumulation_equals_full_batch():
    # Plain SGD with lr 1 (no clipping): the update is exactly minus the gradient, so comparing parameters
    # compares gradients (Adam's sign-like first step would amplify float noise in tiny gradients).
    state, run_step = make_step(optax.sgd(1.0), lambda count: jnp.float32(1.0))
    big = next(SyntheticLM(32))
    big["weights"][:8] = 0.0  # the first microbatch counts no tokens: plain averaging would be wrong
    big["weights"][8:16, ::2] = 0.0  # and the second half as many as the others
    results = []
    for num_micro, slots in ((1, 1), (4, 4), (4, 6)):  # 6 slots: the ramp's padding must not count
        size = 32 // num_micro
        new_state, metrics = run_step(state, [{k: v[i * size:(i + 1) * size] for k, v in big.items()}
                                              for i in range(num_micro)], slots)
        grads = jax.tree.map(lambda new, old: old - new, jax.device_get(new_state.params),
                             jax.device_get(state.params))
        results.append((grads, jax.device_get(metrics)))
    (g1, m1), (g4, m4), (g6, m6) = results
    for g, m in ((g4, m4), (g6, m6)):
        assert m["num_tokens"] == m1["num_tokens"] == big["weights"].sum()
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(m["accuracy"], m1["accuracy"], rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, g1)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(g1))


def test_skipped_step_changes_nothing_but_counters():
    cfg = make_cfg()
    tx, schedule = make_optimizer(cfg.optim, 10, nn.unbox(state_lib.abstract_boxed_params(
        state_lib.default_init_params_fn(MODEL, T), jax.random.key(0))))
    state, run_step = make_step(tx, schedule)
    it = SyntheticLM(8, poison_at={1})
    good, m0 = run_step(state, [next(it)])
    bad, m1 = run_step(good, [next(it)])
    again, m2 = run_step(bad, [next(it)])
    before, after = jax.device_get(good), jax.device_get(bad)
    assert not np.isfinite(m1["loss"]) and int(m1["skipped"]) == 1 and int(m0["skipped"]) == 0
    jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
    jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
    assert (int(after.step), int(after.consecutive_bad), int(after.total_bad)) == (2, 1, 1)
    assert not np.array_equal(after.rng, before.rng)
    # The next good step resets the run of bad steps and uses the lr of the 2nd update (count 1, not 2).
    assert (int(again.consecutive_bad), int(again.total_bad)) == (0, 1)
    assert float(m2["lr"]) == pytest.approx(float(schedule(1)))


def test_nan_guard_stops_after_n_in_a_row(tmp_path):
    cfg = make_cfg(steps=12, max_consecutive_bad_steps=3)
    with pytest.raises(loop.TrainingStopped, match=r"3 consecutive steps had a non-finite loss"):
        run(cfg, tmp_path, SyntheticLM(8, poison_at={4, 5, 6, 7, 8, 9}))
    records = read_metrics(str(tmp_path))
    skipped = {r["step"]: r["train/skipped_steps"] for r in records}
    assert skipped[4] == 0 and skipped[5] == skipped[6] == skipped[7] == 1
    assert max(skipped) < 12  # it stopped early


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A 6-step run whose 3rd batch is poisoned (NaN); checkpoints at 3 and 6. Also the init_from source."""
    workdir = tmp_path_factory.mktemp("source")
    return run(make_cfg(steps=6, ckpt_every=3), workdir, SyntheticLM(8, poison_at={2})), workdir


def test_single_bad_step_is_skipped_and_training_goes_on(source_run):
    result, workdir = source_run
    assert result.step == 6
    records = {r["step"]: r for r in read_metrics(str(workdir))}
    assert records[3]["train/skipped_steps"] == 1 and records[3]["train/loss"] is None
    assert sum(r["train/skipped_steps"] for r in records.values()) == 1
    assert int(result.state.total_bad) == 1 and int(result.state.consecutive_bad) == 0
    losses = [records[s]["train/loss"] for s in (1, 2, 4, 5, 6)]
    assert losses[-1] < losses[0]  # it learns the 32-token distribution


def test_eval_equals_direct_loss(tmp_path):
    batches = [next(SyntheticLM(8, seed=7)), next(SyntheticLM(8, seed=8))]
    batches[1]["weights"][:, ::2] = 0.0  # different token counts per batch
    eval_step = jax.jit(loop.make_eval_step(poisonable_loss))
    direct_loss = jax.jit(functools.partial(lm_loss, model=MODEL, deterministic=True))
    params = nn.unbox(state_lib.default_init_params_fn(MODEL, T)(jax.random.key(0)))
    sums = [eval_step(params, b) for b in batches]
    loss = float(sum(s[0] for s in sums) / sum(s[1] for s in sums))
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    direct, _ = direct_loss(params, joined, None)
    assert loss == pytest.approx(float(direct), rel=1e-6)


def test_batch_ramp_uses_its_schedule_and_consumes_exactly_that_data(tmp_path):
    # Microbatch 8; the ramp starts at 8 sequences and reaches 16 once 8 sequences are seen (half of ramp_tokens
    # rounds the 12-sequence target up to 2 microbatches). Both sizes run the same compiled step.
    cfg = make_cfg(steps=4, batch_size=16, optim_grad_accum_steps=2, optim_ramp_start_tokens=8 * T,
                   optim_ramp_tokens=16 * T)
    it = SyntheticLM(8)
    run(cfg, tmp_path, it)
    sizes = [r["perf/batch_size"] for r in read_metrics(str(tmp_path)) if "perf/batch_size" in r]
    ramp = loop.BatchRamp(16, 8, T, 8 * T, 16 * T)
    assert sizes == [ramp.microbatches_at(s) * 8 for s in range(4)] == [8, 16, 16, 16]
    assert it.pos == sum(sizes) // 8  # microbatches drawn = microbatches used


def test_batch_not_divisible_by_data_parallel_devices(tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size=12 is not divisible by the 8 data-parallel devices"):
        run(make_cfg(batch_size=12), tmp_path / "a", SyntheticLM(12))
    with pytest.raises(ConfigError, match=r"microbatch.*=4 is not divisible by the 8 data-parallel"):
        run(make_cfg(batch_size=16, optim_grad_accum_steps=4), tmp_path / "b", SyntheticLM(4))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written for a bad config


def test_init_from_loads_params_and_rejects_bad_paths(source_run, tmp_path):
    source, src = source_run
    src_params = jax.device_get(source.state.params)
    # A new run starting from it (its data is empty, so its state is exactly the loaded one).
    target = run(make_cfg(steps=3, init_from=str(src), seed=5), tmp_path / "dst", SyntheticLM(8, length=0))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(target.state.params), src_params)
    assert int(target.state.step) == 0

    # A reward model on the pretrained decoder: the decoder is loaded, the new score head keeps its init.
    mesh = sharding.make_mesh((-1, 1, 1))
    rm_boxed = state_lib.abstract_boxed_params(state_lib.default_init_params_fn(ScoreModel(MODEL_CFG), T),
                                               jax.random.key(0))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            nn.unbox(rm_boxed), sharding.logical_to_sharding(rm_boxed, mesh))
    loaded = ckpt_lib.load_params(str(src / "checkpoints" / "3"), abstract, keep_fresh=("score",))
    assert ("score", "kernel") not in loaded and len(loaded) == len(jax.tree.leaves(src_params))
    assert loaded[("decoder", "wte", "embedding")].sharding == abstract["decoder"]["wte"]["embedding"].sharding

    with pytest.raises(ConfigError, match="does not exist"):
        ckpt_lib.load_params(str(tmp_path / "nowhere"), abstract)
    with pytest.raises(ConfigError, match="holds no finished checkpoint"):
        ckpt_lib.load_params(str(tmp_path), abstract)
    with pytest.raises(ConfigError, match=r"missing in checkpoint: score/bias"):
        ckpt_lib.load_params(str(src), abstract)  # an LM checkpoint has no score head
    wide = preset_config("tiny", max_len=T, num_layers=1, scan_layers=False, d_model=32)
    wide_abstract = nn.unbox(state_lib.abstract_boxed_params(
        state_lib.default_init_params_fn(GPT(wide), T), jax.random.key(0)))
    with pytest.raises(ConfigError, match=r"shape differs: decoder/groups_0/block_0/attn/out/bias: "
                                          r"checkpoint \(64,\) vs this model \(32,\)"):
        ckpt_lib.load_params(str(src), wide_abstract)
    with pytest.raises(ConfigError, match=r"train.init_from=.*does not exist"):
        run(make_cfg(steps=3, init_from=str(tmp_path / "nowhere")), tmp_path / "dst2", SyntheticLM(8))


def test_checkpoint_restores_onto_other_meshes(source_run):
    """Written on an 8-way data-parallel mesh; restored onto (2, 2, 2) and onto one device, equal everywhere."""
    result, workdir = source_run
    want = jax.device_get(result.state)
    ckpt = ckpt_lib.Checkpointer(str(workdir), keep=2)
    try:
        for shape, devices in (((2, 2, 2), None), ((1, 1, 1), jax.devices()[:1])):
            mesh = sharding.make_mesh(shape, devices=devices)
            init = state_lib.default_init_params_fn(MODEL, T)
            boxed = state_lib.abstract_boxed_params(init, jax.random.key(0))
            tx, _ = make_optimizer(make_cfg().optim, 6, nn.unbox(boxed))
            shardings = state_lib.state_shardings(boxed, tx, mesh)
            restored = ckpt.restore(6, state_lib.abstract_state(boxed, tx, shardings, jax.random.key(0)))
            kernel = restored.state.params["decoder"]["groups_0"]["block_0"]["mlp"]["fc"]["kernel"]
            assert kernel.sharding == shardings.params["decoder"]["groups_0"]["block_0"]["mlp"]["fc"]["kernel"]
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), want)
            assert restored.data_state == {"pos": 6} and restored.config["train"]["steps"] == 6
    finally:
        ckpt.close()


# --- progress reports: tokens/s from completion times ----------------------------------------------------------

class SimulatedDevice:
    """A device timeline against a host clock: step s finishes at ``done[s]``; waiting for it moves the clock."""

    def __init__(self):
        self.now, self.done = 0.0, {}

    def clock(self):
        return self.now


class SimulatedScalar:
    """A step's metric as the reporter sees a device array: ready once the step finished; reading it waits."""

    def __init__(self, device, step, value):
        self.device, self.step, self.value = device, step, value

    def is_ready(self):
        return self.device.now >= self.device.done[self.step]

    def block_until_ready(self):
        self.device.now = max(self.device.now, self.device.done[self.step])
        return self

    def copy_to_host_async(self):
        pass

    def __array__(self, dtype=None, copy=None):
        self.block_until_ready()
        return np.asarray(self.value, dtype)


class RecordingWriter:
    def __init__(self):
        self.records = []

    def write_scalars(self, step, scalars):
        self.records.append({"step": step, **scalars})


@pytest.mark.parametrize("host", ["runs-ahead", "3-in-flight", "lock-step"])
@pytest.mark.parametrize("steps,log_every", [(40, 10), (37, 10), (10, 1), (10, 10)])
@pytest.mark.parametrize("checkpoints", [False, True])
@pytest.mark.parametrize("data_runs_out", [False, True])
def test_reported_tokens_per_s_is_the_device_rate_in_every_interval(host, steps, log_every, checkpoints,
                                                                     data_runs_out):
    # The device takes 1 s per step after a 5 s compile. The host dispatches ahead of it (0.01 s per step) and
    # only waits when the reporter reads; or it may have only 3 steps in flight (XLA:CPU's PjRt client bounds
    # them: its run-ahead is shorter than a log interval); or each call returns when its step is done. With
    # checkpoints, the host also waits for every 7th and the last step (a save), settling the reporter first as
    # run_training does. When the data runs out, the run ends 5 steps short of train.steps, mid-interval.
    # Every interval's reported rate must be the device's 1,000 tok/s in each case — the
    # first (compilation excluded) and the last included — and the first step's time must be reported on its own.
    compile_s, step_s, dispatch_s, tokens = 5.0, 1.0, 0.01, 1000
    device = SimulatedDevice()
    cfg = type("T", (), dict(log_every=log_every, steps=steps + 5 * data_runs_out, seq_len=10,
                             max_consecutive_bad_steps=3))
    writer = RecordingWriter()
    reporter = loop._Reporter(writer, cfg, flops_per_token=None, peak_flops_total=None,
                              latest_checkpoint=lambda: None, clock=device.clock)
    for step in range(1, steps + 1):
        if host == "3-in-flight" and step > 3:
            device.now = max(device.now, device.done[step - 3])
        device.now += compile_s if step == 1 else dispatch_s
        device.done[step] = max(device.now, device.done.get(step - 1, 0.0)) + step_s
        if host == "lock-step":
            device.now = device.done[step]
        metrics = {k: SimulatedScalar(device, step, v) for k, v in
                   dict(loss=1.0, grad_norm=1.0, lr=1e-3, skipped=0, consecutive_bad=0).items()}
        reporter.add(step, metrics, tokens)
        if checkpoints and (step % 7 == 0 or step == steps):
            reporter.settle()
            device.now = max(device.now, device.done[step])
    reporter.finish()

    records = writer.records
    logged = sorted({*range(log_every, steps + 1, log_every), steps})
    if data_runs_out and steps % log_every:
        logged.pop(-2)  # the last full interval and the partial one after it are reported together
    assert [r["step"] for r in records] == logged
    assert records[0]["perf/first_step_s"] == pytest.approx(compile_s + step_s, abs=0.05)
    assert all("perf/first_step_s" not in r for r in records[1:])
    rates = [r.get("perf/tokens_per_s") for r in records]
    if log_every == 1:
        assert rates[0] is None  # only the first step, whose time is compilation: no rate yet
        rates = rates[1:]
    assert rates == pytest.approx([tokens / step_s] * len(rates), rel=0.02)
