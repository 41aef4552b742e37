"""The batch formats, as code: each is a ``Contract`` listing its fields (name, shape, dtype, required or not),
and ``check`` is the one validation an objective runs on what it is given.

Shapes are written one letter per axis: B rows, T positions, K responses to one prompt. Every field of a batch
that shares a letter shares that axis's size. Dtypes are those the data pipelines produce (objectives cast what
they compute with); ``abstract`` builds a batch of ShapeDtypeStructs from them for ahead-of-time compilation.

The trainer stacks ``A`` microbatches on a leading axis and hands the objective one at a time, so an objective
always sees the shapes below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from gptjax.errors import BatchError


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    shape: str  # one letter per axis, e.g. "BT"
    dtype: str  # numpy dtype name of what the pipelines produce
    required: bool = True  # an optional field may be absent (or None); the objective then assumes its default
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Contract:
    name: str
    fields: tuple[Field, ...]
    doc: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


LM_BATCH = Contract("LM", (
    Field("inputs", "BT", "int32", doc="token ids the model reads"),
    Field("targets", "BT", "int32", doc="the next token of each position (inputs shifted by one)"),
    Field("positions", "BT", "int32", required=False,
          doc="position of each token in its segment, restarting at 0 per packed document (default: 0..T-1)"),
    Field("segment_ids", "BT", "int32", required=False,
          doc="1, 2, ... per packed document, 0 on padding; attention stays inside a segment (default: one)"),
    Field("weights", "BT", "float32",
          doc="loss weight of each target: 1 on real tokens (SFT: assistant tokens only), 0 on padding"),
), doc="Pretraining, SFT and PPO-ptx: packed rows of documents or conversations (gptjax/data/packing.py, "
       "post_training.sft_batches).")

RANKING_BATCH = Contract("ranking", (
    Field("tokens", "BKT", "int32", doc="prompt + response k of each prompt, right-padded"),
    Field("valid", "BKT", "bool", doc="real tokens of each row"),
    Field("num_ranked", "B", "int32", doc="responses 0..n-1 are ranked best to worst; slots k >= n are unused"),
    Field("group", "BK", "int32", required=False,
          doc="which ranking of the element each slot holds (post_training.pack_rankings); absent: one ranking"),
), doc="Reward model: K responses to one prompt, ranked (post_training.ranking_batches).")

DEMONSTRATION_ROWS = Contract("demonstration", (
    Field("tokens", "BT", "int32", doc="one whole conversation (prompt + answer + EOS) per row, either padding side"),
    Field("valid", "BT", "bool", doc="real tokens of each row"),
), doc="The reward model's bias fit: the SFT demonstrations its rewards are centred on.")

ROLLOUT_BATCH = Contract("rollout", (
    Field("tokens", "BT", "int32", doc="left-padded prompt, then the sampled response, right-padded"),
    Field("valid", "BT", "bool", doc="real tokens of each row"),
    Field("response_mask", "BT", "bool", doc="response (action) tokens, EOS included"),
    Field("old_logprobs", "BT", "float32", doc="log π of each token under the sampling policy"),
    Field("old_values", "BT", "float32", doc="value of the state before each token at sampling time"),
    Field("advantages", "BT", "float32", doc="GAE advantages (whitened), 0 outside the response"),
    Field("returns", "BT", "float32", doc="value targets: advantages + values, before whitening"),
), doc="PPO: one rollout batch (the experience step's output), and each minibatch sliced from it; a minibatch "
       "may add 'ptx', an LM batch of pretraining data (PPO-ptx).")


SAMPLED_ROLLOUT = Contract("sampled rollout", (
    Field("tokens", "BT", "int32", doc="left-padded prompt, then the sampled response, right-padded"),
    Field("valid", "BT", "bool", doc="real tokens of each row"),
    Field("response_mask", "BT", "bool", doc="response (action) tokens, EOS included"),
    Field("finished", "B", "bool", doc="the response ended with EOS within the length budget"),
    Field("old_logprobs", "BT", "float32", doc="log π of each token under the sampling policy"),
    Field("ref_logprobs", "BT", "float32", doc="log π_ref of each token under the frozen reference"),
    Field("old_values", "BT", "float32", required=False, doc="value before each token (algorithms with a critic)"),
), doc="The shared RL loop's rollout before scoring (stages/online/loop.py): what an algorithm's advantage "
       "function reads, with the reward of each row.")

POLICY_ROLLOUT_BATCH = Contract("policy rollout", (
    Field("tokens", "BT", "int32", doc="left-padded prompt, then the sampled response, right-padded"),
    Field("valid", "BT", "bool", doc="real tokens of each row"),
    Field("response_mask", "BT", "bool", doc="response (action) tokens, EOS included"),
    Field("old_logprobs", "BT", "float32", doc="log π of each token under the sampling policy"),
    Field("ref_logprobs", "BT", "float32", doc="log π_ref of each token (GRPO's KL term)"),
    Field("advantages", "BT", "float32", doc="the row's sequence advantage on each response token, 0 elsewhere"),
), doc="Critic-free RL (GRPO, RLOO): one rollout batch and each minibatch sliced from it; a minibatch may add "
       "'ptx', an LM batch of pretraining data.")

PREFERENCE_BATCH = Contract("preference", (
    Field("tokens", "BKT", "int32", doc="prompt + response k of each prompt, right-padded"),
    Field("valid", "BKT", "bool", doc="real tokens of each row"),
    Field("response_mask", "BKT", "bool", doc="response tokens (EOS included): the tokens whose log-probs count"),
    Field("num_ranked", "B", "int32", doc="responses 0..n-1 are ranked best to worst; slots k >= n are unused"),
    Field("ref_logprobs", "BK", "float32", doc="Σ over response k's tokens of log π_ref (the frozen reference)"),
), doc="DPO / IPO: K ranked responses to one prompt, every ranked pair a preference, with the reference's sequence "
       "log-probs (post_training.preference_examples, stages/dpo.py).")


def check(batch: Mapping[str, Any], contract: Contract, where: str) -> None:
    """Raise one BatchError naming the missing or malformed field when ``batch`` does not hold ``contract``.

    Checks that every required field is present, that each field has one axis per letter of its shape, and that
    axes with the same letter have the same size. Works on numpy arrays, jax arrays and tracers (shapes only).
    """
    missing = [f.name for f in contract.fields if f.required and f.name not in batch]
    if missing:
        raise BatchError(f"{where}: batch is missing field(s) {missing}; it has {sorted(batch)} (the "
                         f"{contract.name} batch of gptjax.data.batches: {list(contract.names)})")
    sizes: dict[str, tuple[int, str]] = {}
    for f in contract.fields:
        if batch.get(f.name) is None:
            continue
        shape = tuple(np.shape(batch[f.name]))
        if len(shape) != len(f.shape):
            raise BatchError(f"{where}: field {f.name!r} has shape {shape}; the {contract.name} batch wants "
                             f"({', '.join(f.shape)})")
        for letter, size in zip(f.shape, shape):
            first_size, first_field = sizes.setdefault(letter, (size, f.name))
            if size != first_size:
                raise BatchError(f"{where}: field {f.name!r} has {letter}={size} but {first_field!r} has "
                                 f"{letter}={first_size} (shape {f.shape} in the {contract.name} batch)")


def abstract(contract: Contract, sizes: Mapping[str, int], *, leading: tuple[int, ...] = (), sharding=None,
             optional: bool = True) -> dict:
    """A batch of ``jax.ShapeDtypeStruct``s: each field's letters take ``sizes``, after ``leading`` axes (e.g. the
    trainer's microbatch slot); ``optional=False`` leaves the optional fields out."""
    import jax  # only for ahead-of-time compilation

    return {f.name: jax.ShapeDtypeStruct(tuple(leading) + tuple(sizes[c] for c in f.shape), np.dtype(f.dtype),
                                         sharding=sharding)
            for f in contract.fields if optional or f.required}
