"""A training run as the analysis sees it: its workdir, finished checkpoints, stored config and networks (the
stage's ``components``, from the stage registry)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from gptjax import sharding
from gptjax.errors import ConfigError
from gptjax.stages import common, registry
from gptjax.tokenizers import Tokenizer
from gptjax.train import checkpoint as ckpt_lib


@dataclasses.dataclass
class Run:
    """A training run's workdir: its finished checkpoints, stored config and networks."""

    workdir: str
    stage: str
    config: ml_collections.ConfigDict  # the config stored with the latest checkpoint
    tokenizer: Tokenizer
    steps: list[int]  # finished checkpoint steps, ascending
    components: list[registry.Component]  # the main network first
    mesh: Any

    def step_dir(self, step: int | None = None) -> str:
        step = self.steps[-1] if step is None else step
        if step not in self.steps:
            raise ConfigError(f"--step={step}: {self.workdir} has checkpoints at steps {self.steps}")
        return os.path.join(self.workdir, ckpt_lib.CKPT_DIR, str(step))

    def component(self, name: str) -> registry.Component:
        return next(c for c in self.components if c.name == name)

    def load(self, component: registry.Component, step: int | None = None) -> dict:
        """The component's parameters at ``step`` (default: the latest), on this run's mesh."""
        abstract = common.abstract_params_of(component.model, self.mesh)
        return common.load_full_params(self.step_dir(step), abstract, "--workdir", component.item_key)


def _stage_list() -> str:
    names = registry.names()
    return ", ".join(names[:-1]) + " or " + names[-1]


def open_run(workdir: str, mesh=None) -> Run:
    """The run in ``workdir``; one clear error when it holds no finished checkpoint or an unknown stage."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir!r} does not exist; give the workdir of a training run "
                          f"({_stage_list()})")
    steps = ckpt_lib.finished_steps(workdir)
    if not steps:
        raise ConfigError(f"--workdir={workdir!r} holds no finished checkpoint (expected "
                          f"{os.path.join(workdir, ckpt_lib.CKPT_DIR)}/<step>/state); give the workdir of a training "
                          f"run that saved at least one checkpoint")
    stored = common.stored_config(os.path.join(workdir, ckpt_lib.CKPT_DIR, str(steps[-1])), "--workdir")
    name = registry.stage_name(stored)
    if name not in registry.names():
        raise ConfigError(f"{workdir}: the stored config's stage={name!r} is unknown; valid stages: "
                          f"{registry.names()}")
    stage = registry.get(name)
    tokenizer = common.build_tokenizer(common.resolve_from_init(stored)[1])
    mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
    return Run(workdir, stage.name, stored, tokenizer, steps, stage.components(stored, tokenizer), mesh)
