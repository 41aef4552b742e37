"""Post-training data: the JSONL formats, their readers, SFT packing, ranking batches, PPO prompts, a TFDS builder.

Formats, one JSON object per line (blank lines are skipped; keys other than these, e.g. "meta", are ignored):

  SFT        {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
             at least one assistant turn; the loss covers every assistant turn (see gptjax/data/chat.py).
  Rankings   {"prompt": "question" | [messages ending with a user turn], "responses": [best, ..., worst]}
             2 <= K <= 9 distinct, non-empty responses ordered best -> worst (InstructGPT's K-wise comparisons).
  Prompts    {"prompt": "question" | [messages ending with a user turn]}         (PPO rollouts, evaluation)
  Answers    {"prompt": ..., "response": "..."} or {"prompt": ..., "responses": [...]}  (scored by a reward model)

Every reader takes a *source*: a JSONL path, a sequence of already-parsed records (dicts), or a split of the TFDS
dataset built by `build_tfds` (which keeps each record's original "file:line"). Any bad record raises one
DataFormatError naming its file:line (or "record i") and what to fix.

Batches follow gptjax/data/batches.py: SFT gives LM batches (B, T) with several conversations packed per row (greedy
first-fit; segment ids and positions restart per conversation, so attention never crosses conversations) and loss
weights on assistant tokens only; rankings give (B, K, T) token/valid arrays plus `num_ranked` (B,), and for a
preference objective (DPO) also the response tokens' mask (`preference_examples`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.data import chat, hosts
from gptjax.errors import DataError, DataFormatError

MAX_RANKED = 9  # InstructGPT ranks K = 4..9 outputs per prompt; 2 is the pairwise minimum
MIN_RANKED = 2

Source = Any  # str | os.PathLike (JSONL file) | Sequence[Mapping] (records) | a TFDS data source from build_tfds


# ----------------------------------------------------------------------------------------------------------------
# Reading records


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def _is_tfds_record(item: Any) -> bool:
    return isinstance(item, Mapping) and set(item) == {"json", "source"} and isinstance(item["json"], bytes)


def iter_records(source: Source) -> Iterator[tuple[str, Mapping]]:
    """Yields (where, record) from a JSONL path, a sequence of dicts, or a TFDS split built by `build_tfds`."""
    if isinstance(source, (str, os.PathLike)):
        items: Any = _read_jsonl(Path(source))
    else:
        def _numbered():
            for i, item in enumerate(source):
                if _is_tfds_record(item):
                    yield item["source"].decode("utf-8"), json.loads(item["json"].decode("utf-8"))
                else:
                    yield f"record {i}", item
        items = _numbered()
    for where, record in items:
        if not isinstance(record, Mapping):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _field(record: Mapping, key: str, where: str, fmt: str) -> Any:
    if key not in record:
        raise DataFormatError(f"{where}: missing field {key!r}; expected {fmt} (present: {sorted(record)})")
    return record[key]


_SFT_FORMAT = '{"messages": [{"role": ..., "content": ...}, ...]}'
_RANKING_FORMAT = '{"prompt": str | [messages], "responses": [best, ..., worst]}'
_PROMPT_FORMAT = '{"prompt": str | [messages]}'


def _prompt_conversation(record: Mapping, where: str, fmt: str) -> list[Mapping]:
    prompt = _field(record, "prompt", where, fmt)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataFormatError(f"{where}: field 'prompt' is empty")
        return chat.user_turn(prompt)
    chat.validate(prompt, where=f"{where}: field 'prompt'", require_assistant=False)
    if prompt[-1]["role"] != "user":
        raise DataFormatError(f"{where}: field 'prompt' must end with a user turn, got a final "
                              f"{prompt[-1]['role']} turn")
    return list(prompt)


def parse_sft(where: str, record: Mapping) -> list[Mapping]:
    """The conversation of one SFT record (validated)."""
    messages = _field(record, "messages", where, _SFT_FORMAT)
    chat.validate(messages, where=f"{where}: field 'messages'", require_assistant=True)
    return list(messages)


def parse_ranking(where: str, record: Mapping) -> tuple[list[Mapping], list[str]]:
    """(prompt conversation, responses best -> worst) of one ranking record (validated)."""
    prompt = _prompt_conversation(record, where, _RANKING_FORMAT)
    responses = _field(record, "responses", where, _RANKING_FORMAT)
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataFormatError(f"{where}: field 'responses' must be a list of strings ordered best -> worst")
    if not MIN_RANKED <= len(responses) <= MAX_RANKED:
        raise DataFormatError(f"{where}: field 'responses' has {len(responses)} responses; a ranking needs "
                              f"{MIN_RANKED}..{MAX_RANKED}")
    first_index: dict[str, int] = {}
    for k, response in enumerate(responses):
        if not response.strip():
            raise DataFormatError(f"{where}: response {k} is empty")
        if response in first_index:
            raise DataFormatError(f"{where}: responses {first_index[response]} and {k} are identical; a ranking "
                                  "needs distinct responses (drop the duplicate)")
        first_index[response] = k
    return prompt, list(responses)


def parse_prompt(where: str, record: Mapping) -> list[Mapping]:
    """The prompt conversation (ending with a user turn) of one prompt record (validated)."""
    return _prompt_conversation(record, where, _PROMPT_FORMAT)


_PARSERS: dict[str, Callable[[str, Mapping], Any]] = {
    "sft": parse_sft, "rankings": parse_ranking, "prompts": parse_prompt}


# ----------------------------------------------------------------------------------------------------------------
# SFT: render, pack, batch


def render_sft(source: Source, tokenizer, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens_L, assistant_mask_L) per SFT conversation; raises if one needs more than seq_len positions."""
    rendered = []
    for where, record in iter_records(source):
        tokens, mask = chat.render(parse_sft(where, record), tokenizer, where=where)
        # Teacher forcing feeds L-1 tokens to predict the next L-1: the conversation needs L-1 positions.
        if len(tokens) - 1 > seq_len:
            raise DataFormatError(f"{where}: conversation is {len(tokens)} tokens, needing {len(tokens) - 1} "
                                  f"positions > seq_len {seq_len}; shorten it or raise seq_len")
        rendered.append((tokens, mask))
    if not rendered:
        raise DataFormatError(f"{source}: no SFT conversations found")
    return rendered


def pack_conversations(rendered: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
                       pad_id: int) -> dict[str, np.ndarray]:
    """Packs rendered conversations into LM rows (R, seq_len), greedy first-fit in the given order.

    Each conversation of L tokens takes L-1 consecutive slots of the first row with room: inputs = tokens[:-1],
    targets = tokens[1:], weights = mask[1:], positions 0..L-2, and the row's next segment id (1, 2, ...).
    Unused slots have segment id 0, weight 0 and pad_id inputs/targets.
    """
    free = np.full(len(rendered), seq_len, np.int64)  # at most one row per conversation
    num_rows = 0
    placement = []  # (row, offset, segment id) per conversation
    segments_in_row = np.zeros(len(rendered), np.int32)
    for tokens, _ in rendered:
        n = len(tokens) - 1
        fits = free[:num_rows] >= n
        row = int(np.argmax(fits)) if fits.any() else num_rows
        num_rows = max(num_rows, row + 1)
        segments_in_row[row] += 1
        placement.append((row, seq_len - free[row], segments_in_row[row]))
        free[row] -= n
    batch = {
        "inputs": np.full((num_rows, seq_len), pad_id, np.int32),
        "targets": np.full((num_rows, seq_len), pad_id, np.int32),
        "positions": np.zeros((num_rows, seq_len), np.int32),
        "segment_ids": np.zeros((num_rows, seq_len), np.int32),
        "weights": np.zeros((num_rows, seq_len), np.float32),
    }
    for (tokens, mask), (row, offset, segment) in zip(rendered, placement):
        span = slice(offset, offset + len(tokens) - 1)
        batch["inputs"][row, span] = tokens[:-1]
        batch["targets"][row, span] = tokens[1:]
        batch["weights"][row, span] = mask[1:]
        batch["positions"][row, span] = np.arange(len(tokens) - 1)
        batch["segment_ids"][row, span] = segment
    return batch


def sft_examples(source: Source, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """The whole SFT set as packed LM arrays (R, seq_len), conversations in source order (for eval / inspection)."""
    return pack_conversations(render_sft(source, tokenizer, seq_len), seq_len, tokenizer.pad_id)


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])  # stream 0: row order, 1: SFT packing order


class BatchIterator:
    """Fixed-size numpy batches over epochs, a pure function of (seed, epoch, batch index).

    `make_epoch(epoch)` returns the epoch's examples (dict of arrays sharing a leading axis); when `shuffle`, rows
    are permuted by a generator seeded with (seed, epoch). `num_epochs=None` repeats forever. With
    `drop_remainder=False` the last batch is filled with `empty_row` rows (zero loss weight). `get_state` /
    `set_state` give exact resume (checkpoint the small dict next to the model).

    Multi-host: `batch_size` is the global batch; every process builds the same global batch (the datasets of
    SFT and the RM are small enough to hold on each host) and yields only its rows, `batch_size //
    process_count` of them, as `jax.make_array_from_process_local_data` expects. `process_index` /
    `process_count` default to JAX's; tests pass them to simulate several hosts.
    """

    def __init__(self, make_epoch: Callable[[int], dict[str, np.ndarray]], empty_row: dict[str, np.ndarray],
                 batch_size: int, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, process_index: int | None = None, process_count: int | None = None,
                 source: Source = None):
        if batch_size < 1:
            raise DataError(f"the batch size must be >= 1, got {batch_size} (train.batch_size)")
        self._source = source
        process_index, _, local = hosts.local_rows(batch_size, process_index, process_count)
        self._rows = slice(process_index * local, (process_index + 1) * local)
        self._make_epoch, self._empty_row = make_epoch, empty_row
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
        self._epoch, self._batch_index = 0, 0
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None

    def _epoch_examples(self, epoch: int) -> dict[str, np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            examples = self._make_epoch(epoch)
            if self.shuffle:
                n = len(next(iter(examples.values())))
                order = _epoch_rng(self.seed, epoch, 0).permutation(n)
                examples = {k: v[order] for k, v in examples.items()}
            self._cache = (epoch, examples)
        return self._cache[1]

    def validate(self) -> None:
        """Builds the current epoch now, so data too small for one batch is an error before training starts."""
        examples = self._epoch_examples(self._epoch)
        n = len(next(iter(examples.values())))
        if n < self.batch_size and self.drop_remainder:
            self._too_small(n)

    def _too_small(self, n: int) -> None:
        where = self._source if isinstance(self._source, (str, os.PathLike)) else "the data"
        raise DataError(f"{where}: an epoch makes {n} rows (examples, or packed conversations), fewer than one "
                        f"batch of {self.batch_size}; lower train.batch_size (a batch here is train.batch_size / "
                        f"optim.grad_accum_steps rows) or give more data")

    def batches_per_epoch(self) -> int:
        """Batches in the current epoch (SFT repacks each epoch, so this may vary by a batch or so)."""
        n = len(next(iter(self._epoch_examples(self._epoch).values())))
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch_index": self._batch_index}

    def set_state(self, state: Mapping[str, int]) -> None:
        self._epoch, self._batch_index = int(state["epoch"]), int(state["batch_index"])

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                raise StopIteration
            examples = self._epoch_examples(self._epoch)
            n = len(next(iter(examples.values())))
            start = self._batch_index * self.batch_size
            if start + (self.batch_size if self.drop_remainder else 1) <= n:
                break
            if n < self.batch_size and self.drop_remainder:
                self._too_small(n)
            self._epoch, self._batch_index = self._epoch + 1, 0
        batch = {k: v[start:start + self.batch_size] for k, v in examples.items()}
        short = self.batch_size - len(next(iter(batch.values())))
        if short:
            batch = {k: np.concatenate([v, np.repeat(self._empty_row[k][None], short, axis=0)])
                     for k, v in batch.items()}
        self._batch_index += 1
        return {k: v[self._rows] for k, v in batch.items()}


def sft_batches(source: Source, tokenizer, seq_len: int, batch_size: int, *, seed: int = 0,
                shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
    """LM batches (batch_size, seq_len) of packed SFT conversations.

    Conversations are tokenised once; each epoch shuffles them (seed, epoch), packs first-fit and shuffles the rows,
    so packing partners differ between epochs. Without `shuffle` every epoch packs in source order.
    """
    rendered = render_sft(source, tokenizer, seq_len)

    def make_epoch(epoch: int) -> dict[str, np.ndarray]:
        order = _epoch_rng(seed, epoch, 1).permutation(len(rendered)) if shuffle else range(len(rendered))
        return pack_conversations([rendered[i] for i in order], seq_len, tokenizer.pad_id)

    empty = {"inputs": np.full(seq_len, tokenizer.pad_id, np.int32),
             "targets": np.full(seq_len, tokenizer.pad_id, np.int32),
             "positions": np.zeros(seq_len, np.int32), "segment_ids": np.zeros(seq_len, np.int32),
             "weights": np.zeros(seq_len, np.float32)}
    return BatchIterator(make_epoch, empty, batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                         drop_remainder=drop_remainder, process_index=process_index, process_count=process_count,
                         source=source)


# ----------------------------------------------------------------------------------------------------------------
# Rankings (reward model)


def _rendered_rankings(source: Source, tokenizer, seq_len: int) -> list[tuple[str, int, list[np.ndarray]]]:
    """(where, prompt tokens, [prompt + response k + EOS for each ranked response]) of every ranking."""
    items = []
    for where, record in iter_records(source):
        prompt, responses = parse_ranking(where, record)
        prompt_tokens = chat.render_prompt(prompt, tokenizer, where=where)
        sequences = []
        for k, response in enumerate(responses):
            tokens = np.concatenate([prompt_tokens, chat.render_response(response, tokenizer, where=where)])
            if len(tokens) > seq_len:
                raise DataFormatError(f"{where}: prompt + response {k} is {len(tokens)} tokens > seq_len "
                                      f"{seq_len}; shorten it or raise seq_len")
            sequences.append(tokens)
        items.append((where, len(prompt_tokens), sequences))
    if not items:
        raise DataFormatError(f"{source}: no rankings found")
    return items


def _ranking_arrays(items, tokenizer, seq_len: int, num_slots: int | None) -> dict[str, np.ndarray]:
    """tokens, valid, response_mask (N, K, T) and num_ranked (N,) of rendered rankings, K = num_slots."""
    most = max(len(s) for _, _, s in items)
    num_slots = most if num_slots is None else num_slots
    if num_slots < most:
        where = next(w for w, _, s in items if len(s) == most)
        raise DataFormatError(f"{where}: ranks {most} responses but num_slots is {num_slots}; raise num_slots "
                              f"(<= {MAX_RANKED})")
    tokens_NKT = np.full((len(items), num_slots, seq_len), tokenizer.pad_id, np.int32)
    valid_NKT = np.zeros((len(items), num_slots, seq_len), bool)
    response_NKT = np.zeros((len(items), num_slots, seq_len), bool)
    for i, (_, prompt_len, sequences) in enumerate(items):
        for k, seq in enumerate(sequences):
            tokens_NKT[i, k, :len(seq)] = seq
            valid_NKT[i, k, :len(seq)] = True
            response_NKT[i, k, prompt_len:len(seq)] = True
    num_ranked_N = np.array([len(s) for _, _, s in items], np.int32)
    return {"tokens": tokens_NKT, "valid": valid_NKT, "response_mask": response_NKT, "num_ranked": num_ranked_N}


def ranking_examples(source: Source, tokenizer, seq_len: int, *,
                     num_slots: int | None = None) -> dict[str, np.ndarray]:
    """All rankings as arrays: tokens (N, K, T) int32, valid (N, K, T) bool, num_ranked (N,) int32.

    Slot k holds render_prompt(prompt) + response k + EOS, right-padded with pad_id to T = seq_len; slots past
    num_ranked are all padding. K = num_slots, by default the largest K in the data.
    """
    arrays = _ranking_arrays(_rendered_rankings(source, tokenizer, seq_len), tokenizer, seq_len, num_slots)
    del arrays["response_mask"]
    return arrays


def preference_examples(source: Source, tokenizer, seq_len: int, *,
                        num_slots: int | None = None) -> dict[str, np.ndarray]:
    """The rankings as ``ranking_examples`` gives them plus ``response_mask`` (N, K, T): the response's tokens (its
    EOS included) in each slot, the tokens whose log-probs a preference objective (DPO) sums."""
    return _ranking_arrays(_rendered_rankings(source, tokenizer, seq_len), tokenizer, seq_len, num_slots)


def pack_rankings(examples: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Several rankings in one element of K slots, largest first, each into the fullest element it fits (best-fit
    decreasing), keeping its responses' order; adds ``group`` (N', K): which ranking of its element each slot holds
    (-1: unused). Every (N, K, ...) array is packed slot by slot; ``num_ranked`` becomes the slots used.

    Rankings of two answers in elements of K slots compute K rows for two: the demo's rankings are mostly pairs (a
    written flaw against the expert's answer), and packing halves the rows an epoch computes. The ranking loss
    weighs every ranking the same however they are packed (stages/reward.ranking_loss)."""
    num_N = examples["num_ranked"]
    N, K = examples["tokens"].shape[:2]
    order = sorted(range(N), key=lambda i: -int(num_N[i]))  # stable: equal sizes stay in file order
    elements: list[list[int]] = []
    open_by_room: dict[int, list[int]] = {}  # free slots -> elements with that many, oldest first
    for i in order:
        n = int(num_N[i])
        room = next((r for r in range(n, K) if open_by_room.get(r)), None)  # K free: only a new element
        if room is None:
            e, room = len(elements), K
            elements.append([])
        else:
            e = open_by_room[room].pop(0)
        elements[e].append(i)
        open_by_room.setdefault(room - n, []).append(e)
    packed = {k: np.zeros((len(elements), *v.shape[1:]), v.dtype) for k, v in examples.items() if v.ndim >= 2}
    packed["tokens"][:] = pad_id
    group_MK = np.full((len(elements), K), -1, np.int32)
    used_M = np.zeros(len(elements), np.int32)
    for e, members in enumerate(elements):
        for g, i in enumerate(members):
            n, start = int(num_N[i]), int(used_M[e])
            for k in packed:
                packed[k][e, start:start + n] = examples[k][i, :n]
            group_MK[e, start:start + n] = g
            used_M[e] += n
    return {**packed, "num_ranked": used_M, "group": group_MK}


def ranking_batches(source: Source, tokenizer, seq_len: int, batch_size: int, *, seed: int = 0,
                    shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                    num_slots: int | None = None, pack: bool = False, process_index: int | None = None,
                    process_count: int | None = None) -> BatchIterator:
    """Ranking batches (B, K, T) + num_ranked (B,), all K responses of a prompt in one batch element; with
    ``pack``, several rankings per element (``pack_rankings``; the batch gains ``group`` (B, K)).

    With drop_remainder=False the last batch is filled with empty elements: num_ranked 0 and no valid token, which
    the reward-model loss must weigh 0.
    """
    examples = ranking_examples(source, tokenizer, seq_len, num_slots=num_slots)
    _, k, t = examples["tokens"].shape
    empty = {"tokens": np.full((k, t), tokenizer.pad_id, np.int32), "valid": np.zeros((k, t), bool),
             "num_ranked": np.zeros((), np.int32)}
    if pack:
        examples = pack_rankings(examples, tokenizer.pad_id)
        empty["group"] = np.full(k, -1, np.int32)
    return BatchIterator(lambda epoch: examples, empty, batch_size, seed=seed, shuffle=shuffle,
                         num_epochs=num_epochs, drop_remainder=drop_remainder, process_index=process_index,
                         process_count=process_count, source=source)


# ----------------------------------------------------------------------------------------------------------------
# Prompts (PPO rollouts, evaluation)


def prompt_examples(source: Source, tokenizer, max_prompt_len: int) -> list[np.ndarray]:
    """Token ids (int32) of each prompt, ending with <|assistant|>, in source order; ``gptjax.sampling.left_pad``
    makes a batch of them."""
    prompts = []
    for where, record in iter_records(source):
        tokens = chat.render_prompt(parse_prompt(where, record), tokenizer, where=where)
        if len(tokens) > max_prompt_len:
            raise DataFormatError(f"{where}: prompt is {len(tokens)} tokens > max_prompt_len {max_prompt_len}; "
                                  "shorten it or raise max_prompt_len")
        prompts.append(tokens)
    if not prompts:
        raise DataFormatError(f"{source}: no prompts found")
    return prompts


def read_answers(source: Source) -> list[tuple[str, list[Mapping], str]]:
    """(where, prompt conversation, response) of each answer to score: records {"prompt", "response"} or
    {"prompt", "responses": [...]} (one entry per response)."""
    out = []
    for where, record in iter_records(source):
        conversation = parse_prompt(where, record)
        if "response" in record:
            responses = [record["response"]]
        elif "responses" in record and isinstance(record["responses"], list):
            responses = record["responses"]
        else:
            raise DataFormatError(
                f"{where}: expected {{\"prompt\": ..., \"response\": str}} or {{\"prompt\": ..., \"responses\": "
                f"[str, ...]}} (present: {sorted(record)})")
        out += [(where, conversation, r) for r in responses]
    if not out:
        raise DataFormatError(f"{source}: no answers found")
    return out


# ----------------------------------------------------------------------------------------------------------------
# TFDS: the JSONL files as an array_record dataset, read back with tfds data sources (no TensorFlow needed)


@functools.cache
def _builder_class():
    import tensorflow_datasets as tfds  # heavy import, only when a TFDS dataset is built

    class PostTrainingJsonl(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """One split per JSONL file; each example keeps the record as JSON text and its "file:line"."""

        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=kind, description=f"{kind} JSONL records")
                           for kind in _PARSERS]

        def __init__(self, *, split_files: Mapping[str, str], **kwargs):
            self._split_files = {split: Path(path) for split, path in split_files.items()}
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({"json": tfds.features.Text(), "source": tfds.features.Text()}),
                disable_shuffling=True)  # keep file order: readable errors, reproducible eval order

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(path) for split, path in self._split_files.items()}

        def _generate_examples(self, path):
            parse = _PARSERS[self.builder_config.name]
            for i, (where, record) in enumerate(iter_records(path)):
                parse(where, record)  # fail at build time, naming the line, rather than mid-training
                yield i, {"json": json.dumps(record, ensure_ascii=False), "source": where}

    return PostTrainingJsonl


def build_tfds(kind: str, split_files: Mapping[str, str | os.PathLike], data_dir: str | os.PathLike) -> dict:
    """Builds (once) the TFDS array_record dataset of JSONL files and returns {split: random-access data source}.

    kind: "sft", "rankings" or "prompts"; split_files: e.g. {"train": "sft.jsonl", "eval": "sft_eval.jsonl"}.
    The dataset lives under data_dir/<kind>-<hash of the files' contents>, so edited files are rebuilt. Pass a
    returned split to sft_batches / ranking_batches / prompt_examples like a path.
    """
    if kind not in _PARSERS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(_PARSERS)}")
    digest = hashlib.sha256(kind.encode())
    for split in sorted(split_files):
        digest.update(split.encode())
        path = Path(split_files[split])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such JSONL file (split {split!r})")
        digest.update(path.read_bytes())
    builder = _builder_class()(split_files={s: str(p) for s, p in split_files.items()},
                                    data_dir=str(Path(data_dir) / f"{kind}-{digest.hexdigest()[:16]}"),
                                    config=kind, file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source()
