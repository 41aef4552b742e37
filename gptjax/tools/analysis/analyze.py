"""Looking inside checkpoints: parameter counts per module, weight and update norms per layer, loss on a split,
samples, and the sections a stage adds (reward-model scores of given answers, KL(policy ‖ reference)) or the
difference between two checkpoints.

Works on runs of every registered stage: the stage is read from the checkpoint's stored config (``stage``) and
asked (``gptjax.stages.registry``) for the networks its checkpoints hold (``components``), its loss on a split
(``split_loss``) and its own report sections (``report``). A network whose role is "policy" is sampled from.

``analyze`` returns a JSON-able dict; ``write_report`` (gptjax/tools/analysis/report.py) turns it into
``report.md`` and PNG plots.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from gptjax.data import post_training
from gptjax.errors import ConfigError
from gptjax.stages import common, registry, rollouts
from gptjax.tools.analysis.params import difference, layer_leaves, module_norms, param_counts
from gptjax.tools.analysis.runs import Run, open_run
from gptjax.train import checkpoint as ckpt_lib
from gptjax.train import metrics as metrics_lib

SPLITS = ("train", "eval")  # "eval" is the held-out split: pretraining's "validation", the post-training eval_path
DEFAULT_CHAT_PROMPTS = ("27 是不是質數？", "Is 27 a prime number?")


@dataclasses.dataclass
class Options:
    """What to compute beyond the parameter statistics (the binary's flags)."""

    step: int | None = None  # checkpoint step to analyse (default: the latest)
    compare: str = ""  # another run / checkpoint to compare with
    split: str = "eval"  # split for the loss: "eval" (held out) or "train"
    eval_batches: int | None = None  # LM batches to score (default: the run's train.eval_batches)
    prompts: Sequence[str] | None = None  # sample prompts; None: the run's train.sample_prompts or DEFAULT_CHAT_PROMPTS
    temperature: float = 0.0  # sampling temperature for the samples (0 = greedy)
    max_new_tokens: int = 64
    answers_file: str = ""  # JSONL answers for reward-model scores (reward runs)
    kl_prompts: str = ""  # JSONL prompts for the KL; "" = the PPO run's data.prompts_path
    kl_num_prompts: int = 64
    seed: int = 0


def _component_stats(component: Component, params, previous, prev_step) -> dict:
    leaves = layer_leaves(params)
    stats = {"counts": param_counts(leaves), "expected_counts": common.expected_counts(component.model),
             "weight_norms": module_norms(leaves)}
    if previous is not None:
        stats["update"] = {"from_step": prev_step, **difference(leaves, layer_leaves(previous))}
    return stats


def _samples(run: Run, stage: registry.Stage, params: Mapping, opts: Options) -> list[dict] | None:
    """One continuation per prompt from the run's policy, if it has one: ``opts.prompts``, else (a raw-text
    policy) the run's own sample prompts, else ``DEFAULT_CHAT_PROMPTS``."""
    policy = next((c for c in run.components if c.role == "policy"), None)
    if policy is None:
        return None
    prompts = list(opts.prompts) if opts.prompts else (
        [p for p in run.config.train.get("sample_prompts", ()) if p] if not stage.chat_format else [])
    prompts = prompts or list(DEFAULT_CHAT_PROMPTS)
    return rollouts.samples(policy.model, params[policy.name], run.tokenizer, prompts, chat_format=stage.chat_format,
                            temperature=opts.temperature, max_new_tokens=opts.max_new_tokens, seed=opts.seed)


def analyze(workdir: str, opts: Options = Options()) -> dict:
    """Every statistic of the run's checkpoint at ``opts.step``; JSON-able (see write_report for the layout)."""
    if opts.split not in SPLITS:
        raise ConfigError(f"--split={opts.split!r} is unknown; choose one of {list(SPLITS)} ('eval' = the held-out "
                          f"split)")
    run = open_run(workdir)
    stage = registry.get(run.stage)
    step = run.steps[-1] if opts.step is None else opts.step
    run.step_dir(step)  # validates the step
    if opts.answers_file:
        post_training.read_answers(opts.answers_file)  # a bad file fails before any model work
    if opts.compare:
        ckpt_lib.resolve_checkpoint_dir(opts.compare, "--compare")  # so does a --compare that is no checkpoint
    earlier = [s for s in run.steps if s < step]
    result: dict[str, Any] = {"workdir": run.workdir, "stage": run.stage, "step": step, "steps": run.steps,
                              "model": {c.name: {"class": type(c.model).__name__,
                                                 **{k: getattr(c.model.cfg, k) for k in (
                                                     "num_layers", "d_model", "num_heads", "vocab_size", "max_len")}}
                                        for c in run.components},
                              "components": {}}
    params = {}
    for c in run.components:
        params[c.name] = run.load(c, step)
        previous = run.load(c, earlier[-1]) if earlier else None
        result["components"][c.name] = _component_stats(c, params[c.name], previous, earlier[-1] if earlier else None)
    main = run.components[0]
    if stage.split_loss is not None:
        result["loss"] = stage.split_loss(run.config, main.model, run.tokenizer, params[main.name], opts.split,
                                          opts.eval_batches)
    samples = _samples(run, stage, params, opts)
    if samples is not None:
        result["samples"] = samples
    if stage.report is not None:
        result.update(stage.report(run, params, step, opts))
    if opts.compare:
        result["compare"] = compare_with(run, params, opts.compare)
    result["last_metrics"] = last_metrics(run.workdir)
    return result


def compare_with(run: Run, params: Mapping[str, Any], other: str) -> dict:
    """Per-module relative difference between this checkpoint and ``other`` (a run, its checkpoints/ or a step
    dir). A PPO run is compared through its policy; the other side's matching network is found by its stage."""
    step_dir = str(ckpt_lib.resolve_checkpoint_dir(other, "--compare"))
    other_run = open_run(os.path.dirname(os.path.dirname(step_dir)), mesh=run.mesh)
    other_step = int(os.path.basename(step_dir))
    mine = run.components[0]
    theirs = other_run.components[0]
    diff = difference(layer_leaves(params[mine.name]), layer_leaves(other_run.load(theirs, other_step)))
    return {"other": other_run.workdir, "other_stage": other_run.stage, "other_step": other_step,
            "component": mine.name, **diff}


def last_metrics(workdir: str) -> dict:
    """The last training record and the last evaluation record of metrics.jsonl (empty if none)."""
    records = metrics_lib.read_metrics(workdir)
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    train = [r for r in records if any(k.startswith(("train/", "rollout/", "ppo/")) for k in r)]
    return {"train": train[-1] if train else {}, "eval": evals[-1] if evals else {}}
