"""Tokenise documents and pack them into fixed-length LM rows (GPT-2 style concatenation, no attention leaks).

The token stream is ``EOS d1 EOS d2 EOS d3 ...``: every document is preceded by the tokenizer's EOS, which
separates it from the previous one. GPT-2's ``<|endoftext|>`` plays both roles the same way. The stream is cut
into rows of ``seq_len + 1`` tokens by grain's ``ConcatThenSplitIterDataset`` (checkpointable: its state is the
parent's position plus the slice of the document being split), and each row gives
``inputs = row[:-1]``, ``targets = row[1:]``.

Choices, and why:

- Segments start at the EOS *before* a document, so a segment is ``[EOS, d...]``. The model predicts a
  document's first token from EOS alone (how sampling starts a fresh document) and a document's EOS from its
  own text; no target is predicted from another document's text, and attention never crosses segments.
- A document longer than what is left of a row continues in the next row(s). The continuation is a new
  segment whose positions restart at 0 (positions never exceed ``seq_len - 1``, so learned position tables
  of length ``seq_len`` suffice); it cannot attend to the part in the previous row, as in nanoGPT.
- The row's last target is the next token of the stream. That token starts no row of its own (rows do not
  overlap), so about one token in ``seq_len + 1`` is seen only as a target: grain's splitter keeps state
  small and exact at that price.
- Padding only appears at the end of a finite stream: ``segment_ids`` 0, ``weights`` 0, token ``pad_id``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from gptjax.data import batches

TOKENS = "tokens"  # feature name inside the packer; grain adds tokens_segment_ids / tokens_positions
LM_FIELDS = batches.LM_BATCH.names  # inputs, targets, positions, segment_ids, weights


def tokenize_document(document: Mapping[str, str], tokenizer: Any) -> dict[str, np.ndarray]:
    """``{"tokens": [EOS, *encode(text)]}`` as int32 (the leading EOS separates it from the document before)."""
    ids = tokenizer.encode(document["text"])
    return {TOKENS: np.asarray([tokenizer.eos_id, *ids], dtype=np.int32)}


def tokens_absent_from(texts: Iterable[str], tokenizer: Any) -> tuple[int, ...]:
    """Ids of the tokenizer's vocabulary that pretraining on ``texts`` never sees, as input or as target (documents
    read as ``tokenize_document`` reads them, EOS included): the chat role tokens of a corpus without chats, and
    pieces that only fine-tuning text uses when the tokenizer was trained on both. A model pretrained on ``texts``
    has moved these rows of its token embedding only by the softmax's "not this token" gradient, which pushes them
    all the same way, so they end up one shared vector (optim.trainable_token_ids says why that matters)."""
    seen = np.zeros(tokenizer.vocab_size, bool)
    for text in texts:
        seen[tokenize_document({"text": text}, tokenizer)[TOKENS]] = True
    return tuple(int(i) for i in np.flatnonzero(~seen))


def end_of_stream(tokenizer: Any) -> dict[str, np.ndarray]:
    """A lone EOS that closes a finite stream, so that its last document's EOS is also a target."""
    return {TOKENS: np.asarray([tokenizer.eos_id], dtype=np.int32)}


def pack_rows(token_docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Concatenates token documents and splits them into rows of ``seq_len + 1`` tokens with segment ids
    (1, 2, ... per piece of document in the row; 0 = padding) and positions (restarting per piece)."""
    return grain.experimental.ConcatThenSplitIterDataset(token_docs, length_struct={TOKENS: seq_len + 1})


def row_to_lm_example(row: Mapping[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """One packed row of ``seq_len + 1`` tokens -> the LM batch fields of ``seq_len`` (``batches.LM_BATCH``)."""
    tokens_T1 = row[TOKENS]
    segment_ids_T1 = row[f"{TOKENS}_segment_ids"]
    positions_T1 = row[f"{TOKENS}_positions"]
    real_T1 = segment_ids_T1 > 0
    tokens_T1 = np.where(real_T1, tokens_T1, pad_id).astype(np.int32)
    return {
        "inputs": tokens_T1[:-1],
        "targets": tokens_T1[1:],
        "positions": np.where(real_T1, positions_T1, 0)[:-1].astype(np.int32),
        "segment_ids": segment_ids_T1[:-1].astype(np.int32),
        # Padding only ever follows real tokens, so a real target always has a real input before it.
        "weights": real_T1[1:].astype(np.float32),
    }


def padding_example(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding row (fills the last batch of a finite stream; contributes nothing to the loss)."""
    pad_T = np.full((seq_len,), pad_id, np.int32)
    zeros_T = np.zeros((seq_len,), np.int32)
    return {"inputs": pad_T, "targets": pad_T, "positions": zeros_T, "segment_ids": zeros_T,
            "weights": np.zeros((seq_len,), np.float32)}


def stack_and_pad(rows: Sequence[Mapping[str, np.ndarray]], *, batch_size: int, seq_len: int,
                  pad_id: int) -> dict[str, np.ndarray]:
    """Stacks rows into (B, T) arrays, adding padding rows when a finite stream ends mid-batch."""
    rows = list(rows) + [padding_example(seq_len, pad_id)] * (batch_size - len(rows))
    return {name: np.stack([row[name] for row in rows]) for name in LM_FIELDS}
