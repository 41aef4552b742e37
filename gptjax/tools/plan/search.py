"""The fastest recipe that fits: a search over mesh shape × remat policy × sequences per device, compiling each.

Like MaxText's estimator: memory grows with the sequences each device holds and shrinks with remat, so for each
mesh the policies are tried from the most memory-saving (``full``) to the least (``none``), and for each the largest
number of sequences per data-parallel rank that fits is found by bisection, never above the previous policy's
(a policy that keeps more cannot fit more). Per mesh and policy the largest fitting microbatch is the fastest (the
fewest accumulation steps, so the fewest weight gathers). Meshes whose parameters and optimizer state alone
(from the shardings, no compile) exceed the memory are skipped, as are tensor sizes that do not divide the heads or
that leave a GPU node. Each compile is cached by its recipe.

On a TPU topology, compiling takes about 100 s a program, so the search runs on as many fake CPU devices standing
in for the chips (same memory, peak and links; the two compilers' memory figures agree within a few percent on the
175B step) and the TPU compiler then confirms the best recipes, in order, until one fits or the budget is spent.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax

from gptjax.errors import ConfigError
from gptjax.model import count_params
from gptjax.stages import common
from gptjax.tools.plan.programs import plan_stage, stage_plan
from gptjax.tools.plan.report import Plan
from gptjax.tools.plan.targets import Target, make_target_mesh

REMATS = ("full", "save_dots_no_batch", "save_dots", "none")  # most memory-saving first (model.REMAT_POLICIES)
CONFIRM_RESERVE_S = 240.0  # seconds kept for the TPU compiler's confirmation (one 175B compile: 90-200 s here)
STATE_BYTES_PER_PARAM = 12  # float32 parameters and two Adam moments (the 175B plans' 11.0 + 21.9 GB per device)


@dataclasses.dataclass
class Candidate:
    mesh: tuple[int, int, int]
    remat: str
    per_rank: int  # sequences per data-parallel rank per microbatch
    plan: Plan | None = None
    error: str = ""


def meshes_for(num_devices: int, num_heads: int, state_bytes: float, memory: float,
               devices_per_node: int | None) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) shapes over ``num_devices`` whose parameter and optimizer state fit in 80% of memory."""
    out = []
    for tensor in (1, 2, 4, 8, 16):
        if num_devices % tensor or num_heads % tensor or (devices_per_node and tensor > devices_per_node):
            continue
        for data in range(1, num_devices // tensor + 1):
            if (num_devices // tensor) % data:
                continue
            fsdp = num_devices // tensor // data
            if state_bytes / (fsdp * tensor) <= 0.8 * memory:
                out.append((data, fsdp, tensor))
    return sorted(out, key=lambda s: (s[0], s[2]))


def recipe_command(cfg_arg: str, candidate: Candidate, accum: int, extra: str = "") -> str:
    d, f, t = candidate.mesh
    return (f"python -m experiments.train --config={cfg_arg} --config.mesh.shape='({d},{f},{t})' "
            f"--config.model.remat={candidate.remat} --config.optim.grad_accum_steps={accum}{extra}")


def search(cfg, target: Target, *, budget_s: float = 600.0, log: Callable[[str], None] = print,
           confirm: Target | None = None, meshes: list | None = None) -> tuple[Candidate | None, list[Candidate]]:
    """The fastest fitting candidate for ``target`` (and every candidate tried). ``confirm``: a target whose
    compiler must accept the winner (a TPU topology searched on its CPU stand-in)."""
    if not budget_s > 0:
        raise ConfigError(f"search budget {budget_s} s: give a positive number of seconds (--search_budget_s)")
    start = time.perf_counter()
    # A TPU confirmation compiles for minutes: the CPU search leaves it the larger part of what remains.
    search_budget = budget_s - (CONFIRM_RESERVE_S if confirm is not None else 0.0)
    batch, heads = int(cfg.train.batch_size), _heads(cfg)
    if meshes is None:
        state = STATE_BYTES_PER_PARAM * _params(cfg)
        meshes = meshes_for(len(target.devices), heads, state, target.device_memory,
                            target.devices_per_node if target.node_bandwidth else None)
    if not meshes:
        raise ConfigError(f"no mesh over {len(target.devices)} devices holds the parameters and optimizer state "
                          f"in {target.device_memory / 1e9:.0f} GB per device")
    probe = stage_plan(cfg, make_target_mesh(target, meshes[0]))
    if probe.unit != "tokens" or len(probe.programs) != 1:
        raise ConfigError(f"--search varies a train step's mesh, remat and microbatch; a {probe.step} is planned "
                          f"with --mesh (and its config's sizes)")
    tried: list[Candidate] = []
    cache: dict[tuple, Candidate] = {}

    def try_(mesh, remat, per_rank) -> bool:
        key = (mesh, remat, per_rank)
        if key not in cache:
            if time.perf_counter() - start > search_budget:
                raise TimeoutError
            cache[key] = _compile(cfg, target, mesh, remat, per_rank, batch)
            tried.append(cache[key])
            c = cache[key]
            log(f"  {mesh} remat={remat:<18} {per_rank:>2}/rank: "
                + (c.error or f"{c.plan.peak_bytes / 1e9:6.1f} GB, {c.plan.step_s:8.2f} s/step, "
                              f"{'fits' if c.plan.fits else 'does not fit'}"))
        c = cache[key]
        return c.plan is not None and c.plan.fits

    try:
        for mesh in meshes:
            dp = mesh[0] * mesh[1]
            if batch % dp:
                continue
            sizes = [r for r in range(1, batch // dp + 1) if (batch // dp) % r == 0 and r <= 16]
            for remat in REMATS:
                best = _largest(sizes, lambda r: try_(mesh, remat, r))
                if best is None:
                    break  # a policy that keeps more cannot fit either
                sizes = [r for r in sizes if r <= best]
    except TimeoutError:
        log(f"  search budget of {search_budget:.0f} s spent; the best so far wins")
    # Fastest first; among equally fast ones the least memory (the likeliest to fit a real compiler too).
    fitting = sorted((c for c in tried if c.plan is not None and c.plan.fits),
                     key=lambda c: (round(c.plan.step_s, 3), c.plan.peak_bytes))
    if confirm is None:
        return (fitting[0] if fitting else None), tried
    return _confirm(cfg, confirm, fitting, start, budget_s, log), tried


def _largest(sizes: list[int], fits: Callable[[int], bool]) -> int | None:
    """The largest size that fits, by bisection (fitting is monotone: fewer sequences never need more memory)."""
    lo, hi, best = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(sizes[mid]):
            best, lo = sizes[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _variant(cfg, remat: str, per_rank: int, dp: int, batch: int):
    variant = cfg.copy_and_resolve_references()
    with variant.unlocked():
        variant.model.remat = remat
        variant.optim.grad_accum_steps = batch // (per_rank * dp)
    return variant


def _compile(cfg, target, mesh, remat, per_rank, batch) -> Candidate:
    candidate = Candidate(mesh, remat, per_rank)
    try:
        candidate.plan = plan_stage(_variant(cfg, remat, per_rank, mesh[0] * mesh[1], batch), target, mesh)
    except (ConfigError, jax.errors.JaxRuntimeError) as e:
        candidate.error = str(e).splitlines()[0][:160]
    except NotImplementedError as e:  # a TPU topology's torus cannot hold this mesh's axis sizes
        candidate.error = f"mesh {mesh} does not map onto the topology: {str(e).splitlines()[0][:120]}"
    jax.clear_caches()
    return candidate


def _confirm(cfg, tpu: Target, fitting: list[Candidate], start: float, budget_s: float, log) -> Candidate | None:
    for i, c in enumerate(fitting):
        if i and time.perf_counter() - start > budget_s - CONFIRM_RESERVE_S / 2:
            log("  no budget left to confirm with the TPU compiler")
            return None
        log(f"  confirming {c.mesh} remat={c.remat} {c.per_rank}/rank with the TPU compiler ...")
        confirmed = _compile(cfg, tpu, c.mesh, c.remat, c.per_rank, int(cfg.train.batch_size))
        if confirmed.plan is not None and confirmed.plan.fits:
            return confirmed
        log(f"    refused or too big: {confirmed.error or confirmed.plan.verdict()}")
    return None


def _model_cfg(cfg):
    return common.planning_model_config(cfg, int(cfg.train.seq_len))[0]


def _heads(cfg) -> int:
    return _model_cfg(cfg).num_heads


def _params(cfg) -> float:
    return float(count_params(_model_cfg(cfg))["total"])
