"""A new stage is one registration: this file defines a toy stage (its objective, batches, runner and hooks) and
registers it in one line, then drives it through the same code paths as the built-in stages, changing no other file:

- ``registry.run_stage`` (what ``experiments.train`` calls) trains it with the shared loop and writes checkpoints;
  a run that crashes mid-way (its data iterator raises) and is restarted ends bitwise where an uninterrupted run
  ends (losses at every step and final parameters);
- under a (2, 2, 2) mesh its losses equal those of one device (to 1e-5);
- ``tools.analysis.analyze`` and ``write_report`` (what ``experiments.analyze`` calls) report on it (parameter
  statistics and its loss on a split);
- ``tools.bench.run`` (what ``experiments.bench`` calls) measures its train step.

The toy objective, a regression no built-in stage has: the mean next-token logit of each position should equal a
target derived from the token there.
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common as cfg_common
from configs.bench import get_config as bench_config
from gptjax import flops, sharding
from gptjax.data import batches
from gptjax.errors import ConfigError
from gptjax.model import GPT
from gptjax.stages import common, registry
from gptjax.tools import analysis, bench
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import loop
from gptjax.train.metrics import read_metrics

TOY = "toy-regression"
TOY_BATCH = batches.Contract("toy", (batches.Field("tokens", "BT", "int32"),
                                     batches.Field("target", "BT", "float32")))
CRASH = {"after": None}  # the toy data raises after this many batches (a simulated crash), when set


def toy_loss(params, batch, rng, *, model: GPT, deterministic: bool = False):
    batches.check(batch, TOY_BATCH, "toy_loss")
    rngs = None if deterministic or rng is None else {"dropout": rng}
    logits_BTV, _ = model.apply({"params": params}, batch["tokens"], None, None, deterministic=deterministic,
                                rngs=rngs)
    loss = jnp.mean(jnp.square(jnp.mean(logits_BTV, axis=-1) - batch["target"]))
    return loss, {"loss": loss}


class ToyBatches:
    """Deterministic synthetic batches; batch i depends only on (seed, i), so the state is the index."""

    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int):
        self.rows, self.seq_len, self.vocab, self.seed, self.index = rows, seq_len, vocab, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        if CRASH["after"] is not None and self.index >= CRASH["after"]:
            raise RuntimeError("simulated crash")
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        tokens = rng.integers(0, self.vocab, (self.rows, self.seq_len), dtype=np.int32)
        return {"tokens": tokens, "target": (tokens % 7).astype(np.float32) / 7.0}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def _mesh(cfg):
    shape = tuple(cfg.mesh.shape)
    return sharding.make_mesh(shape, devices=jax.devices()[:math.prod(shape)])


def toy_model(cfg, tokenizer) -> GPT:
    return GPT(common.no_dropout(common.build_model_config(cfg.model, tokenizer, int(cfg.train.seq_len))))


def toy_run(cfg, workdir):
    tokenizer = common.build_tokenizer(cfg.tokenizer)
    model = toy_model(cfg, tokenizer)
    t = cfg.train
    data = ToyBatches(int(t.batch_size), int(t.seq_len), tokenizer.vocab_size, int(t.seed))
    return loop.run_training(cfg, workdir, model=model, loss_fn=functools.partial(toy_loss, model=model),
                             train_iter=data, mesh=_mesh(cfg), loss_is_token_nll=False)


def toy_split_loss(stored, model, tokenizer, params, split, max_batches):
    t = stored.train
    data = ToyBatches(int(t.batch_size), int(t.seq_len), tokenizer.vocab_size, int(t.seed) + (split == "eval"))
    step = jax.jit(lambda p, b: toy_loss(p, b, None, model=model, deterministic=True)[0])
    losses = [float(step(params, next(data))) for _ in range(int(max_batches or t.eval_batches))]
    return {"split": split, "source": "synthetic toy batches", "loss": float(np.mean(losses)),
            "num_batches": len(losses)}


def toy_bench(ctx):
    T = int(ctx.c.seq_len)

    def make_batch(cfg, rows, rng):
        tokens = rng.integers(0, cfg.vocab_size, (rows, T), dtype=np.int32)
        return {"tokens": tokens, "target": (tokens % 7).astype(np.float32) / 7.0}

    return [ctx.train_step(TOY, make_model=GPT, make_loss=lambda model: functools.partial(toy_loss, model=model),
                           make_batch=make_batch, tokens_per_row=T,
                           flops_per_token=lambda cfg: flops.flops_per_token(cfg, T), segments=0)]


TOY_STAGE = registry.Stage(
    name=TOY, title="toy", run=toy_run, inherits_model=False,
    components=lambda stored, tok: [registry.Component("model", toy_model(stored, tok), "params", "model")],
    objective=lambda cfg, model: functools.partial(toy_loss, model=model), batch=TOY_BATCH,
    split_loss=toy_split_loss, bench=toy_bench)

registry.register(TOY_STAGE)  # the one line that makes the stage known to every caller


def toy_config(mesh=(2, 2, 2), steps=8) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = TOY
    c.model = cfg_common.model_config("tiny")
    c.tokenizer = cfg_common.tokenizer_config("bytes")
    c.train = cfg_common.train_config()
    c.train.update(batch_size=8, seq_len=16, steps=steps, log_every=1, ckpt_every=4, keep_ckpts=0, eval_batches=2)
    c.optim = cfg_common.optim_config()
    c.optim.lr = 1e-3
    c.mesh = cfg_common.mesh_config(mesh)
    return c


def _losses(workdir):
    return [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]


def _params(workdir):
    """The latest checkpoint's parameters, by '/'-joined name."""
    stored = common.stored_config(workdir)
    model = toy_model(stored, common.build_tokenizer(stored.tokenizer))
    abstract = common.abstract_params_of(model, sharding.make_mesh((-1, 1, 1)))
    return {"/".join(k): np.asarray(v) for k, v in ckpt_lib.load_params(workdir, abstract, field="test").items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    dirs = {name: str(root / name) for name in ("reference", "resumed", "one_device")}
    registry.run_stage(toy_config(), dirs["reference"])
    CRASH["after"] = 6
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            registry.run_stage(toy_config(), dirs["resumed"])
    finally:
        CRASH["after"] = None
    assert ckpt_lib.finished_steps(dirs["resumed"]) == [4]  # the crash came between checkpoints
    registry.run_stage(toy_config(), dirs["resumed"])
    registry.run_stage(toy_config(mesh=(1, 1, 1)), dirs["one_device"])
    return dirs


def test_toy_stage_trains_checkpoints_and_resumes_exactly(runs):
    reference, resumed = runs["reference"], runs["resumed"]
    assert ckpt_lib.finished_steps(reference) == [4, 8] and ckpt_lib.finished_steps(resumed) == [4, 8]
    assert _losses(reference) == _losses(resumed) and len(_losses(reference)) == 8
    with open(os.path.join(resumed, "config.json")) as f:
        assert json.load(f)["stage"] == TOY
    a, b = _params(reference), _params(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert _losses(reference)[-1][1] < _losses(reference)[0][1]  # it learns


def test_toy_stage_loss_is_the_same_on_a_mesh_and_one_device(runs):
    mesh, one = _losses(runs["reference"]), _losses(runs["one_device"])
    assert [s for s, _ in mesh] == [s for s, _ in one]
    np.testing.assert_allclose([x for _, x in mesh], [x for _, x in one], rtol=1e-5, atol=1e-5)


def test_toy_stage_is_analysed_like_any_stage(runs, tmp_path):
    result = analysis.analyze(runs["reference"], analysis.Options(split="eval"))
    analysis.write_report(result, str(tmp_path / "analysis"))
    assert result["stage"] == TOY and set(result["components"]) == {"model"}
    assert result["loss"]["split"] == "eval" and np.isfinite(result["loss"]["loss"])
    assert "samples" not in result  # its network is no policy
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert "Stage **toy-regression**" in report and "## Loss on the eval split" in report


def test_toy_stage_is_benchmarked_like_any_stage():
    c = bench_config("cpu-tiny")
    c.model.scan_layers, c.model.num_layers, c.fast_compile, c.warmup, c.repeats = False, 1, True, 0, 2
    assert TOY in bench.workloads()
    (row,) = bench.run(c, TOY)
    assert row.workload == TOY and row.status == "ok" and row.tokens_per_s > 0
    assert row.tokens_per_call == c.batch_size * c.seq_len


def test_unknown_stage_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"config.stage='nope' is unknown; valid stages: \[.*'ppo'.*'pretrain'.*"
                                          r"'reward'.*'sft'.*'toy-regression'"):
        registry.get("nope")
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(registry.Stage(name=TOY, title="toy", run=toy_run, components=TOY_STAGE.components))
