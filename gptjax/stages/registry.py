"""The stage registry: one ``Stage`` record per stage, and the one place every caller looks a stage up.

A stage is what turns a config into a trained run (``run``), what its checkpoints hold (``components``) and how
the tools exercise it. Each stage module builds its record and calls ``register`` when imported; a built-in stage
(pretrain, sft, reward, ppo) is imported when it is first asked for, all of them when the list is. A new stage is
one module (its objective, data and runner) ending in ``register(Stage(...))``; no caller changes.

Who asks what:

    experiments.train     run_stage(cfg, workdir): the stage's stored_config guards the workdir, run trains
    seed_world.pipeline   get(name).run for each stage of its recipe; load_policy for its evaluator
    tools.analysis        components (the networks to load), title, chat_format, split_loss, report
    tools.bench           bench: each stage's train step or iteration (stage names are workload names)
    tools.plan            plan: the programs of one step (train step; PPO experience + update) to compile ahead of time
    experiments.chat      load_policy: the network of a run whose role is "policy"

Stages to come fit the same record: an offline preference stage (DPO) is a policy and a frozen reference trained
by the shared loop (``objective`` and ``batch`` as here, ``report`` for its KL to the reference); critic-free RL
(GRPO, RLOO) runs its own loop like PPO with a policy component and no value component; an iterative stage
(rejection sampling) is a ``run`` that samples, picks and fine-tunes through the shared loop; an ahead-of-time
planner of any stage compiles the programs its ``plan`` names (the shared train step from ``objective`` and
``batch``; a stage with its own loop names its own), on abstract inputs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from gptjax import sharding
from gptjax.data import batches
from gptjax.errors import ConfigError
from gptjax.stages import common
from gptjax.tokenizers import Tokenizer
from gptjax.train import workdir as workdir_lib

ROLES = ("policy", "reward", "value", "model")
# Built-in stages, in the order they run in the InstructGPT recipe: name -> the module that registers it.
BUILTIN = {"pretrain": "gptjax.stages.pretrain", "sft": "gptjax.stages.sft", "reward": "gptjax.stages.reward",
           "ppo": "gptjax.stages.ppo.stage", "grpo": "gptjax.stages.grpo", "rloo": "gptjax.stages.rloo",
           "dpo": "gptjax.stages.dpo", "rs": "gptjax.stages.rejection_sampling"}


@dataclasses.dataclass(frozen=True)
class Component:
    """One network a stage's checkpoint holds."""

    name: str  # "model" for a run's only network, else its role ("policy", "value"); names report sections
    model: nn.Module  # GPT or ScoreModel, dropout off
    item_key: str  # the checkpoint state's field that holds its parameters ("params" in a TrainState)
    role: str  # "policy": a GPT that answers prompts; "reward": scores answers; "value"; "model": anything else

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"component {self.name!r}: role={self.role!r} is unknown; valid roles: {list(ROLES)}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a stage is, field by field. Only ``name``, ``title``, ``run`` and ``components`` are required."""

    name: str  # config.stage, as stored in every workdir's config.json
    title: str  # how messages name a run of it: "a {title} run" ("pretraining", "reward-model", ...)
    # (cfg, workdir) -> result: build tokenizer, model, objective and data from cfg and train (or resume) in
    # workdir. The result has ``step`` and ``train_metrics`` or ``metrics`` (experiments.train prints them).
    run: Callable[[ml_collections.ConfigDict, str], Any]
    # (stored config, tokenizer) -> the networks one of its checkpoints holds, the main one first, built as the
    # run built them (dropout off; PPO checks its policy against the prompt length, the others train.seq_len).
    components: Callable[[ml_collections.ConfigDict, Tokenizer], list[Component]]
    # True: model.preset / tokenizer.kind may say "from_init" and come from train.init_from's run; the workdir
    # stores the config with them filled in. False: the config names its model (pretraining).
    inherits_model: bool = True
    # True: its policy answers chat turns (prompts rendered as a user turn); False: it continues raw text.
    chat_format: bool = True
    # (cfg, model) -> loss_fn(params, batch, rng, deterministic): what the shared trainer differentiates; None for
    # a stage with its own loop. ``batch`` is the contract of the batches that loss reads.
    objective: Callable[[ml_collections.ConfigDict, nn.Module], Callable] | None = None
    batch: batches.Contract | None = None
    # (stored config, main network, tokenizer, its params, split "train" | "eval", max batches) -> the loss on
    # that split, {"split", "source", ...}: what experiments.analyze reports. None: no loss section.
    split_loss: Callable[..., dict] | None = None
    # (analysis run, {component name: params}, step, options) -> extra report sections, e.g. {"kl": {...}}.
    report: Callable[..., dict] | None = None
    # (bench context) -> result rows: how experiments.bench exercises the stage (its train step or iteration).
    bench: Callable[[Any], list] | None = None
    # (cfg, mesh, frozen_mesh=None) -> gptjax.train.aot.StagePlan: the jitted programs one step runs (the train step;
    # PPO's experience and update), on abstract sharded arguments, for the ahead-of-time planner (tools.plan).
    # ``frozen_mesh``: other devices for frozen networks (PPO's reference and reward model), where a stage has any.
    plan: Callable[..., Any] | None = None
    # Config sections of its own that it reads (PPO: "ppo_init", "ppo"): a config without one (another stage's,
    # with config.stage changed) is refused in one line naming the config file that has them.
    sections: tuple[str, ...] = ()

    def stored_config(self, cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The config a run of this stage records in its workdir (and checks on resume)."""
        return common.resolved_config(cfg) if self.inherits_model else cfg


_STAGES: dict[str, Stage] = {}
_UNAVAILABLE: dict[str, ImportError] = {}  # built-ins whose dependencies are missing here (e.g. rlax for ppo)
_loaded = False


def register(stage: Stage) -> Stage:
    """Makes ``stage`` known by its name; a second stage of the same name is an error. Returns ``stage``."""
    existing = _STAGES.get(stage.name)
    if existing is not None and existing is not stage:
        raise ConfigError(f"a stage named {stage.name!r} is already registered (by {existing.run.__module__})")
    _STAGES[stage.name] = stage
    return stage


def _load_builtin(name: str) -> None:
    """Imports built-in stage ``name`` once; an ImportError is kept and raised when the stage is asked for."""
    if name in _STAGES or name in _UNAVAILABLE:
        return
    try:
        importlib.import_module(BUILTIN[name])
    except ImportError as e:
        _UNAVAILABLE[name] = e


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        _load_builtin(name)


def names() -> list[str]:
    """Every stage name: the built-ins in recipe order, then the others in the order they registered."""
    _load_builtins()
    return [n for n in BUILTIN if n in _STAGES or n in _UNAVAILABLE] + [n for n in _STAGES if n not in BUILTIN]


def stages() -> list[Stage]:
    """The registered stages, in ``names()`` order (built-ins that cannot be imported here are left out)."""
    return [_STAGES[n] for n in names() if n in _STAGES]


def get(name: str) -> Stage:
    """The stage called ``name``; one ConfigError listing the valid names when there is none. A built-in stage is
    imported alone (a pretraining run does not import the RL libraries)."""
    if name in BUILTIN:
        _load_builtin(name)
    else:
        _load_builtins()
    if name in _UNAVAILABLE:
        raise _UNAVAILABLE[name]
    if name not in _STAGES:
        raise ConfigError(f"config.stage={name!r} is unknown; valid stages: {sorted(names())}")
    return _STAGES[name]


def stage_name(stored: ml_collections.ConfigDict) -> str:
    """The stage a stored run config names (configs written before the field existed are pretraining runs)."""
    return stored.get("stage", "pretrain")


def stage_of(stored: ml_collections.ConfigDict) -> Stage:
    """The stage of a stored run config."""
    return get(stage_name(stored))


def run_stage(cfg: ml_collections.ConfigDict, workdir: str):
    """Train (or resume) ``cfg.stage`` in ``workdir``: what ``experiments.train`` does."""
    stage = get(cfg.stage)
    missing = [name for name in stage.sections if name not in cfg]
    if missing:
        raise ConfigError(f"config.stage={stage.name!r} reads the config section(s) {', '.join(missing)}, which this "
                          f"config lacks; start from configs/{stage.name}.py (--config=configs/{stage.name}.py)")
    # Refuse a workdir of another config before spending time on data; the run checks again and writes.
    # Later stages store their config with the inherited (from_init) model and tokenizer filled in.
    workdir_lib.check_or_write_config(workdir, stage.stored_config(cfg),
                                      allow_change=bool(cfg.train.allow_config_change), write=False)
    return stage.run(cfg, workdir)


def policy_component(stored: ml_collections.ConfigDict, tokenizer: Tokenizer, where: str) -> Component:
    """The network of a run's checkpoints whose role is "policy"; one ConfigError when the stage has none."""
    stage = stage_of(stored)
    components = stage.components(stored, tokenizer)
    policy = next((c for c in components if c.role == "policy"), None)
    if policy is None:
        raise ConfigError(f"{where} is a {stage.title} run, which holds no policy (its networks: "
                          f"{', '.join(c.role for c in components)}); give a run of a stage that trains one")
    return policy


def load_policy(workdir: str, mesh=None) -> tuple[nn.Module, dict, Tokenizer, str]:
    """(model, params, tokenizer, stage name) of the policy a run ended with (dropout off)."""
    stored = common.stored_config(workdir, "--workdir")
    tokenizer = common.build_tokenizer(stored.tokenizer)
    policy = policy_component(stored, tokenizer, workdir)
    mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
    params = common.load_full_params(workdir, common.abstract_params_of(policy.model, mesh), "--workdir",
                                     policy.item_key)
    return policy.model, params, tokenizer, stage_of(stored).name
