"""The ahead-of-time planner (gptjax.tools.plan, experiments.plan) on fake CPU devices, and on a TPU topology when
libtpu is installed.

Checked against independent references: the planner's per-device argument bytes against the bytes a real,
allocated train state (``state.create_sharded_state``) holds on one device, plus the batch; its trip-count
corrected FLOPs against the analytic 6N + 12·L·d·T count (``gptjax.flops``, within 3% without remat; more with
remat, which recomputes the forward); the compiler's raw count against the property that it counts a scanned
loop body once (it stays below the analytic count); compile time of a scanned 96-layer step against at most 2×
that of 12 layers (the property scan exists for); the binary's output and its one-line errors for bad input.
"""

import collections
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.ppo import get_config as ppo_config
from configs.pretrain import get_config
from gptjax import flops as flops_lib
from gptjax import sharding
from gptjax.errors import ConfigError
from gptjax.model import GPT, ScoreModel
from gptjax.sampling import SamplingConfig
from gptjax.stages import common
from gptjax.stages.ppo import loop as ppo_loop
from gptjax.stages.ppo import objective as ppo_lib
from gptjax.tools.plan import cost as cost_lib
from gptjax.tools.plan import search as search_lib
from gptjax.tools import plan as plan_lib
from gptjax.tools.plan import hlo
from gptjax.train import state as state_lib
from gptjax.train.optim import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason=f"needs 8 devices, found {jax.device_count()}: run "
                             f"with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test sets it)")
HAS_LIBTPU = plan_lib.libtpu_library() is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason=f"the TPU compiler is needed for TPU topologies; "
                                  f"{plan_lib.LIBTPU_HINT}")


def _tiny_cfg(**model):
    cfg = get_config("tiny-bytes")  # byte tokenizer: no asset needed
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_lib.plan_stage(_tiny_cfg(), plan_lib.cpu_target(8, 1e9), (1, 2, 4), layer_flops=True)


@needs_8
def test_argument_bytes_equal_the_real_state(tiny_plan):
    cfg = _tiny_cfg()
    mesh = plan_lib.make_target_mesh(plan_lib.cpu_target(8, 1e9), (1, 2, 4))
    init = state_lib.default_init_params_fn(GPT(tiny_plan.planned.model), int(cfg.train.seq_len))
    rng = jax.random.key(int(cfg.train.seed))
    boxed = state_lib.abstract_boxed_params(init, rng)
    tx, _ = make_optimizer(cfg.optim, int(cfg.train.steps), nn.unbox(boxed))
    state = state_lib.create_sharded_state(init, tx, state_lib.state_shardings(boxed, tx, mesh), mesh, rng)
    first = mesh.devices.flat[0]

    def on_first(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == first)

    step = tiny_plan.programs[0]
    assert step.group_bytes["parameters"] == on_first(state.params)
    assert step.group_bytes["optimizer state"] == on_first(state.opt_state)
    assert step.argument_bytes == on_first(state) + step.group_bytes["batch"]  # compiler's figure, exactly
    assert step.group_bytes["batch"] == 5 * 4 * (cfg.train.batch_size // 2) * cfg.train.seq_len  # 5 int32/f32 fields
    assert step.temp_bytes > 0 and tiny_plan.fits


def _tiny_ppo_cfg():
    cfg = ppo_config()
    cfg.model.preset, cfg.tokenizer.kind = "tiny", "bytes"
    cfg.ppo.rollout_batch_size, cfg.ppo.minibatch_size, cfg.ppo.ppo_epochs = 16, 8, 2
    cfg.sampling.max_prompt_len, cfg.sampling.max_new_tokens = 12, 6
    return cfg


@needs_8
def test_ppo_plan_argument_bytes_equal_an_allocated_iteration():
    """The PPO plan's programs against an iteration built as run_ppo builds it: parameters placed as the loaders
    place them, the state from ``Iteration.init_state`` (optax's own init on them), the rollout batch from a real
    call of the experience program. Per device: every argument the compiler counts, and the planner's groups."""
    cfg = _tiny_ppo_cfg()
    target = plan_lib.cpu_target(8, 1e9)
    plan = plan_lib.plan_stage(cfg, target, (1, 2, 4))
    experience, update = plan.programs
    mesh = plan_lib.make_target_mesh(target, (1, 2, 4))
    policy_cfg = plan.planned.model
    policy, scorer = GPT(policy_cfg), ScoreModel(policy_cfg)
    pcfg = ppo_lib.PPOConfig.from_dict(cfg.ppo.to_dict())

    def placed(model, seed):
        abstract = common.abstract_params_of(model, mesh)
        return jax.tree.map(lambda a: jax.device_put(jnp.full(a.shape, seed, a.dtype), a.sharding), abstract)

    policy_params, value_params, reward_params = placed(policy, 1), placed(scorer, 2), placed(scorer, 3)
    ref_params = jax.tree.map(jnp.copy, policy_params)
    sampling_cfg = SamplingConfig(max_new_tokens=int(cfg.sampling.max_new_tokens), pad_id=0, eos_id=None)
    iteration = ppo_loop.make_iteration(policy, scorer, scorer, sampling_cfg, pcfg, cfg.optim, 10, policy_params,
                                        value_params)
    state = iteration.init_state(policy_params, value_params, jax.random.key_data(jax.random.key(0)))
    rows = sharding.batch_sharding(mesh)
    prompts = jax.device_put(jnp.ones((16, 12), jnp.int32), rows), jax.device_put(jnp.ones((16, 12), bool), rows)
    first = mesh.devices.flat[0]

    def on_first(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == first)

    with sharding.activate(mesh):
        batch, _ = iteration.experience(state.policy_params, ref_params, state.value_params, reward_params, *prompts,
                                        jax.random.key(1), state.kl.kl_coef)
    key_bytes = on_first(jax.random.key_data(jax.random.key(1)))
    assert experience.argument_bytes == on_first((policy_params, ref_params, value_params, reward_params, prompts,
                                                  state.kl.kl_coef)) + key_bytes
    assert experience.group_bytes["reference parameters"] == on_first(ref_params)
    assert experience.also_live_bytes == on_first((state.policy_opt, state.value_opt))
    assert update.argument_bytes == on_first((state, batch)) + key_bytes
    assert update.group_bytes["rollout batch"] == on_first(batch)
    assert update.group_bytes["policy optimizer state"] == on_first(state.policy_opt)
    assert update.also_live_bytes == on_first((ref_params, reward_params))
    assert plan.fits and plan.peak_bytes == max(experience.peak_bytes, update.peak_bytes)
    assert experience.counts.flops == pytest.approx(experience.model_flops / 8, rel=0.25)
    assert update.counts.flops == pytest.approx(update.model_flops / 8, rel=0.25)


@needs_8
def test_bf16_gathers_move_no_float32_weights():
    """The same train step with model.gather_dtype=bfloat16: no fsdp all-gather moves float32 any more (XLA already
    casts some weights before gathering them on its own; the others it gathers in their float32 storage)."""
    gathered = {}
    for gather in (None, "bfloat16"):
        cfg = _tiny_cfg(dtype="bfloat16", gather_dtype=gather)
        step = plan_lib.plan_stage(cfg, plan_lib.cpu_target(4, 1e9), (1, 4, 1)).programs[0]
        gathered[gather] = collections.Counter()
        for kind, axes, dtype, b, _ in hlo.table(step.counts):
            gathered[gather][kind, axes, dtype] += b
    assert gathered[None]["all-gather", "fsdp", "f32"] > 0 and gathered["bfloat16"]["all-gather", "fsdp", "f32"] == 0
    total = {g: sum(b for (k, a, _), b in c.items() if (k, a) == ("all-gather", "fsdp")) for g, c in gathered.items()}
    assert total["bfloat16"] < total[None]


def test_cost_of_gpt3_175b_matches_the_paper():
    """6·N·D for GPT-3 175B on 300B tokens within 1% of Brown et al.'s 3.14e23; device-days from the step time."""
    cfg = get_config("gpt3-175b")
    model_cfg = common.planning_model_config(cfg, 2048)[0]
    planned = type("Planned", (), {"per_step": 1536 * 2048, "unit": "tokens", "model": model_cfg,
                                   "shape": {"seq_len": 2048}})()
    plan = type("P", (), {"planned": planned, "step_s": 10.0, "devices": 64, "mfu": 0.4, "model_flops": 1e18,
                          "target": plan_lib.cpu_target(1, 80e9)})()
    cost = cost_lib.run_cost(plan, 300e9)
    assert cost.six_n_d == pytest.approx(cost_lib.GPT3_175B_PAPER_FLOPS, rel=0.01)
    assert cost.device_hours == pytest.approx(300e9 / (1536 * 2048) * 10.0 * 64 / 3600)
    assert cost.dollars == pytest.approx(cost.device_hours * 2.99)
    assert cost.kwh == pytest.approx(cost.device_hours * 0.7)
    assert "with attention (6N + 12LdT)" in cost_lib.format_cost(plan, cost)
    with pytest.raises(ConfigError, match="must be positive"):
        cost_lib.run_cost(plan, 0)


def test_search_meshes_hold_the_state_and_respect_the_node():
    # GPT-3 175B on 64 x 80 GB: 2.1 TB of float32 parameters and Adam moments need fsdp x tensor >= 33 devices to
    # stay under 80% of memory (data-parallel copies do not), and tensor parallelism stays inside an 8-GPU node.
    assert search_lib.meshes_for(64, 96, 12 * 174.6e9, 80e9, 8) == [(1, 64, 1), (1, 32, 2), (1, 16, 4), (1, 8, 8)]
    assert (2, 32, 1) in search_lib.meshes_for(64, 96, 12 * 174.6e9, 96e9, None)  # 65.5 GB of 96


ONE_CPU = plan_lib.Target("1 CPU", tuple(jax.devices("cpu")[:1]), 1e9, 1e12, 1e9)


def _hlo_flops(cfg) -> float:
    return plan_lib.plan_stage(cfg, ONE_CPU, (1, 1, 1)).programs[0].counts.flops


@needs_8
def test_flops_counts(tiny_plan):
    # The compiler counts the 2-layer scan's body once: below the analytic count; the HLO walk and the
    # unscanned-variant cross-check count every iteration: close to it.
    step = tiny_plan.programs[0]
    per_device = step.model_flops / step.devices
    assert step.compiler_flops < per_device
    assert step.counts.flops == pytest.approx(per_device, rel=0.15)
    assert tiny_plan.layer_flops == pytest.approx(per_device, rel=0.15)
    # A wider model, where the analytic count's matmuls dominate: within 3%, and the accumulation loop counts.
    cfg = _tiny_cfg(d_model=256, num_layers=4, max_len=128)
    cfg.train.seq_len = 128
    model_cfg = plan_lib.stage_plan(cfg, plan_lib.make_target_mesh(ONE_CPU, (1, 1, 1))).model
    analytic = flops_lib.flops_per_token(model_cfg, 128) * 8 * 128
    none = _hlo_flops(cfg)
    assert none == pytest.approx(analytic, rel=0.03)
    cfg.optim.grad_accum_steps = 2
    assert _hlo_flops(cfg) == pytest.approx(none, rel=0.01)
    cfg.optim.grad_accum_steps, cfg.model.remat = 1, "full"
    assert 1.1 * none < _hlo_flops(cfg) < 4 / 3 * none  # remat recomputes (part of) the forward: at most 8N/6N


def test_compile_time_does_not_grow_with_depth():
    """Lower + compile of the train step (one CPU device) for 12 and 96 scanned layers of width 64."""
    cfg = _tiny_cfg(d_model=64, num_heads=4)
    cfg.train.seq_len, cfg.train.batch_size = 32, 2
    mesh = plan_lib.make_target_mesh(ONE_CPU, (1, 1, 1))
    seconds = {}
    for layers in (12, 96):
        cfg.model.num_layers = layers
        runs = []
        for _ in range(2):  # best of two: the machine may be busy
            jax.clear_caches()
            step = plan_lib.compile_program(plan_lib.stage_plan(cfg, mesh).programs[0])
            runs.append(step.lower_s + step.compile_s)
        seconds[layers] = min(runs)
    print(f"lower+compile: 12 layers {seconds[12]:.2f} s, 96 layers {seconds[96]:.2f} s")
    assert seconds[96] <= 2 * seconds[12], seconds


def test_microbatch_is_fitted_to_the_data_parallel_devices():
    assert plan_lib.resolve_microbatch(1536, 1536, 64) == (64, 24, plan_lib.resolve_microbatch(1536, 1536, 64)[2])
    assert "1536 -> 24" in plan_lib.resolve_microbatch(1536, 1536, 64)[2]
    assert plan_lib.resolve_microbatch(1536, 12, 64) == (128, 12, "")
    with pytest.raises(ConfigError, match=r"train.batch_size=100 .* multiples of the 64 data-parallel devices"):
        plan_lib.resolve_microbatch(100, 1, 64)


def test_bad_input_is_one_clear_error():
    have = len(jax.devices("cpu"))
    with pytest.raises(ConfigError, match=rf"needs 4096 fake CPU devices but this process has {have}"):
        plan_lib.cpu_target(4096, 80e9)
    with pytest.raises(ConfigError, match=r"memory size 'eighty'.*e.g. 80GB"):
        plan_lib.parse_bytes("eighty")
    assert plan_lib.parse_bytes("80GB") == 80e9 and plan_lib.parse_bytes("95GiB") == 95 * 2**30
    with pytest.raises(ConfigError, match=r"search budget 0 s: give a positive number"):
        search_lib.search(_tiny_cfg(), plan_lib.cpu_target(1, 1e9), budget_s=0)
    if jax.device_count("cpu") >= 8:
        with pytest.raises(ConfigError, match=r"--search varies a train step's .* a PPO iteration is planned"):
            search_lib.search(_tiny_ppo_cfg(), plan_lib.cpu_target(8, 1e9), meshes=[(1, 8, 1)])
        with pytest.raises(ConfigError, match=r"frozen mesh \(1, 8, 1\) takes 8 of the 8 devices"):
            plan_lib.plan_stage(_tiny_ppo_cfg(), plan_lib.cpu_target(8, 1e9), (1, -1, 1), frozen_mesh=(1, 8, 1))
        with pytest.raises(ConfigError, match=r"trains one network; it has no frozen networks"):
            plan_lib.plan_stage(_tiny_cfg(), plan_lib.cpu_target(8, 1e9), (1, 4, 1), frozen_mesh=(1, 4, 1))
        with pytest.raises(ConfigError, match=r"mesh axes \('tensor',\) \(size 8\) do not divide"):
            plan_lib.plan_stage(_tiny_cfg(), plan_lib.cpu_target(8, 1e9), (1, 1, 8))
    if jax.device_count("cpu") >= 8:
        with pytest.raises(ConfigError, match=r"uses 3 devices but 8 are available"):
            plan_lib.plan_stage(_tiny_cfg(), plan_lib.cpu_target(8, 1e9), (3, 1, 1))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.plan", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_binary_prints_the_table_and_sets_its_own_device_count():
    # 4 devices while this test process has 8: the binary must set the count itself.
    out = _run("--config=configs/pretrain.py:tiny-bytes", "--num_devices=4", "--mesh=1,2,2", "--device_memory=2MB")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 4 fake CPU devices, mesh data=1 fsdp=2 tensor=2" in out.stdout
    assert "verdict: DOES NOT FIT" in out.stdout and "of 2.00 MB" in out.stdout  # 2 MB cannot hold the step
    bad = _run("--config=configs/pretrain.py:tiny-bytes", "--num_devices=4", "--mesh=3,1,1", "--device_memory=1GB")
    assert bad.returncode == 1 and "uses 3 devices but 4 are available" in bad.stderr.strip().splitlines()[-1]


# --- TPU topologies (the TPU compiler runs on this CPU; no TPU needed) ------------------------------------------

@needs_libtpu
def test_unknown_topology_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"cannot describe TPU topology 'v9q:2x2'.*a name such as v5p:4x4x4"):
        plan_lib.tpu_target("v9q:2x2")


@needs_libtpu
def test_tpu_topology_plan():
    target = plan_lib.tpu_target("v5p:2x2x1")
    assert len(target.devices) == 4 and target.device_memory == 95.74 * 2**30 and target.peak_flops == 459e12
    plan = plan_lib.plan_stage(_tiny_cfg(), target, (1, -1, 1))
    assert plan.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    step = plan.programs[0]
    assert step.argument_bytes >= sum(step.group_bytes.values()) and plan.fits
    assert step.counts.bytes_by_axes()["fsdp"] > 0  # the TPU program's collectives are read too


@pytest.mark.slow
@needs_libtpu
def test_gpt3_175b_compiles_for_v5p_64_chips_within_3_minutes():
    cfg = get_config("gpt3-175b")
    cfg.model.remat = "full"
    start = time.perf_counter()
    plan = plan_lib.plan_stage(cfg, plan_lib.tpu_target("v5p:4x4x4"), (1, 64, 1))
    elapsed = time.perf_counter() - start
    print(plan_lib.format_plan(plan))
    assert elapsed <= 180, f"planning took {elapsed:.0f} s"
    # 175B x 12 bytes (fp32 params + Adam moments) / 64 chips, from the TPU compiler's own argument bytes.
    assert plan.programs[0].argument_bytes == pytest.approx(174.6e9 * 12 / 64, rel=0.01)


def test_per_device_bytes_counts_shards_and_typed_keys():
    """A refused program's arguments are counted from their shardings: an fsdp-sharded array by its shard, a
    replicated typed PRNG key (PPO's update key) by its key data (2 x uint32)."""
    from gptjax.tools.plan import programs

    mesh = sharding.make_mesh((1, -1, 1))
    n = mesh.devices.size
    weights = jax.ShapeDtypeStruct((8 * n, 4), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))
    assert programs.per_device_bytes({"w": weights, "key": key}) == 8 * 4 * 4 + 8


def test_a_mesh_the_topology_cannot_hold_is_a_refused_candidate(monkeypatch):
    """Confirming the search's winner on a TPU torus: a mesh whose axes the torus cannot hold (8 on a 4x4x4) is a
    candidate with an error, so the next fitting one is tried, not a traceback."""
    def no_assignment(*args, **kwargs):
        raise NotImplementedError("Failed to find assignment for logical_axis_index 2 of size 8\nmore")

    monkeypatch.setattr(search_lib, "plan_stage", no_assignment)
    cfg = get_config("tiny")
    candidate = search_lib._compile(cfg, None, (1, 8, 8), "full", 1, int(cfg.train.batch_size))
    assert candidate.plan is None
    assert candidate.error.startswith("mesh (1, 8, 8) does not map onto the topology: Failed to find assignment")
