"""What each of a pipeline workdir's artifacts was built from, so a re-run never reuses one built from other inputs.

The pipeline reuses what its workdir holds: the world's tokenizer (``world/tokenizer.model``), every finished stage
run and the labelers' rankings (``labels/``). A stage run checks its own settings (its ``config.json``,
gptjax/train/workdir.py), but its config names the world's files, the tokenizer and the rankings only by path: a
re-run with another ``world.*``, ``tokenizer.*`` or ``labels.*`` setting rewrites those files under the same names,
and a finished stage would be kept as it was. So each artifact's inputs — the digests of the files it reads, the
pipeline settings it is made with, and the keys of the artifacts it builds on — are recorded in
``WORKDIR/inputs.json``; a re-run whose inputs differ for an artifact the workdir still holds is refused before
anything is written, with one error naming each such artifact, what changed, and the fix (a fresh ``--workdir``,
or deleting the listed paths to rebuild them). An artifact the workdir does not hold is built from the new inputs.

Digests are of the world's files as the pipeline writes them (``world.world_files``), so a setting changes an
artifact's key only when it changes what that artifact reads: more PPO prompts leave the tokenizer, pretraining, SFT,
the rankings and the reward model as they are. A workdir written before this record existed is taken as it is (there
is nothing to check it against) and recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

from absl import logging

from gptjax import paths
from gptjax.errors import ConfigError
from gptjax.train import workdir as workdir_lib

RECORD_FILE = "inputs.json"

# Each artifact: the path (in the workdir) whose presence means the pipeline will reuse it, and the artifacts it
# builds on (their keys are among its inputs, so a change upstream reaches every artifact below it).
ARTIFACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tokenizer": (("world/tokenizer.model",), ()),
    "pretrain": (("pretrain",), ("tokenizer",)),
    "sft": (("sft",), ("pretrain",)),
    "labels": (("labels/rankings_train.jsonl", "labels/rankings_eval.jsonl"), ("sft",)),
    "reward": (("reward",), ("labels",)),
    "ppo": (("ppo",), ("reward",)),
}


def text_digest(text: str) -> str:
    """sha256 (first 16 hex digits) of a world file's text (world.world_files)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _own_inputs(cfg, digests: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per artifact, its own inputs: ``file:<world file>`` digests and the pipeline settings it is made with."""
    world, tok, lab = cfg.world, cfg.tokenizer, cfg.labels
    return {
        # The tokenizer reads the corpus; the world's range decides which numbers are pieces of their own.
        "tokenizer": {"file:pretrain": digests["pretrain"], "tokenizer.pieces": int(tok.pieces),
                      "tokenizer.dummy_prefix": bool(tok.dummy_prefix), "world.max_number": int(world.max_number),
                      "world.number_tokens": str(world.number_tokens)},
        "pretrain": {"file:pretrain": digests["pretrain"]},
        "sft": {"file:sft_train": digests["sft_train"], "file:sft_eval": digests["sft_eval"]},
        # The labeler samples the SFT policy on the RM prompts (seeded, eval.max_new_tokens long) and ranks the
        # answers with the world's oracle, which knows the held-out numbers it must not write about.
        "labels": {"file:rm_prompts": digests["rm_prompts"], "file:heldout": digests["heldout"],
                   "seed": int(cfg.seed), "eval.max_new_tokens": int(cfg.eval.max_new_tokens),
                   **{f"labels.{k}": v for k, v in sorted(lab.to_dict().items())}},
        "reward": {"file:sft_eval": digests["sft_eval"]},  # the demonstrations that centre its scores
        "ppo": {"file:ppo_prompts": digests["ppo_prompts"], "file:pretrain": digests["pretrain"]},  # + ptx batches
    }


def artifact_inputs(cfg, digests: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{artifact: {input: value}} for the pipeline config ``cfg`` and the world files' ``digests``
    ({name: text_digest}); an upstream artifact's key is the input ``built_on:<name>``."""
    own = _own_inputs(cfg, digests)
    out: dict[str, dict[str, Any]] = {}
    for name, (_, upstream) in ARTIFACTS.items():  # upstream before downstream
        out[name] = {**own[name], **{f"built_on:{u}": _key(out[u]) for u in upstream}}
    return out


def _key(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _present(workdir: str, name: str) -> bool:
    return all(os.path.exists(os.path.join(workdir, p)) for p in ARTIFACTS[name][0])


def _changes(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    return workdir_lib.config_diff(stored, new, ignore=())


def _why(stored: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    reasons = []
    for field, old, now in _changes(stored, new):
        if field.startswith("built_on:"):
            reasons.append(f"the {field.split(':', 1)[1]} artifact it builds on changes")
        elif field.startswith("file:"):
            reasons.append(f"world/{field.split(':', 1)[1]}.jsonl would be written with other content "
                           f"(a world.* or seed setting)")
        else:
            reasons.append(f"{field}: {old!r} -> {now!r}")
    return "; ".join(reasons)


def check_and_record(workdir: str, inputs: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuses (ConfigError, nothing written) a workdir holding an artifact built from other ``inputs``
    (artifact_inputs); otherwise records them in WORKDIR/inputs.json."""
    path = os.path.join(workdir, RECORD_FILE)
    stored: dict = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)["artifacts"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path} is unreadable ({e}); it was not written by this pipeline. Use a fresh "
                              f"--workdir, or delete {path} to accept what the workdir holds as it is.") from None
    elif any(_present(workdir, name) for name in ARTIFACTS):
        logging.info("%s holds runs but no %s (written before it existed): recording this config's inputs "
                     "without checking them.", workdir, RECORD_FILE)
    stale = [name for name in ARTIFACTS
             if name in stored and _present(workdir, name) and _changes(stored[name], inputs[name])]
    if stale:
        lines = "\n".join(f"  {name} ({', '.join(ARTIFACTS[name][0])}): {_why(stored[name], inputs[name])}"
                          for name in stale)
        delete = " ".join(os.path.join(workdir, ARTIFACTS[name][0][0]) if name != "labels"
                          else os.path.join(workdir, "labels") for name in stale)
        raise ConfigError(
            f"workdir {workdir} holds artifacts built from other inputs than this config gives them:\n{lines}\n"
            f"Nothing was changed. Use a fresh --workdir, or delete what is listed to rebuild it with this config:\n"
            f"  rm -r {delete}")
    os.makedirs(workdir, exist_ok=True)
    paths.write_text_atomic(paths.as_path(path), json.dumps({"artifacts": inputs}, indent=1, sort_keys=True) + "\n")
