"""Corpus preparation (gptjax/data/prepare.py, shards.py, readers.py) and ``experiments.prepare``.

References: the documents written to the corpus files by the test itself (every format: .txt, .jsonl, gzip
with two members, Zstandard, parquet), the in-process build (a build by worker processes must hold the same
documents in the same order), and the build directory's identity (a reused build is not rewritten).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import configs
from gptjax import cli
from gptjax.data import builders, prepare as prepare_lib
from gptjax.errors import DataError
from gptjax.data.pipeline import default_data_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the quick brown fox jumps over a lazy dog while seven cats sat on warm mats".split()


def cfg_for(tmp_path, paths, **overrides):
    cfg = default_data_config()
    cfg.update(source="text_files", paths=str(paths), data_dir=str(tmp_path / "data"), **overrides)
    return cfg


def documents(cfg) -> list[tuple[str, str]]:
    out = []
    for split in builders.SPLITS:
        try:
            source = builders.load_source(cfg, split)
        except DataError:
            continue
        out += [(source[i]["source"], source[i]["text"]) for i in range(len(source))]
    return out


def paragraph_text(seed: int, n: int) -> list[str]:
    return [" ".join(WORDS[(seed + i + k) % len(WORDS)] for k in range(5 + i % 7)) for i in range(n)]


def mixed_corpus(root):
    """Files of every supported format; returns {document id: text} written independently of the readers."""
    root.mkdir(parents=True)
    expected = {}
    for k in range(3):
        text = "\n\n".join(paragraph_text(k, 4)) + "\n"
        (root / f"book{k}.txt").write_text(text)
        expected[f"book{k}.txt"] = text
    records = [{"text": t} for t in paragraph_text(7, 30)]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expected.update({f"a.jsonl:{i + 1}": r["text"] for i, r in enumerate(records)})
    with open(root / "b.jsonl.gz", "wb") as f:  # two gzip members, as `cat x.gz y.gz` makes
        f.write(gzip.compress("".join(json.dumps(r) + "\n" for r in records[:10]).encode()))
        f.write(gzip.compress("".join(json.dumps(r) + "\n" for r in records[10:]).encode()))
    expected.update({f"b.jsonl.gz:{i + 1}": r["text"] for i, r in enumerate(records)})
    zstandard = pytest.importorskip("zstandard")
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in records[:7]).encode()))
    expected.update({f"c.jsonl.zst:{i + 1}": r["text"] for i, r in enumerate(records[:7])})
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": [r["text"] for r in records[:5]], "n": list(range(5))}), root / "d.parquet")
    expected.update({f"d.parquet:{i + 1}": r["text"] for i, r in enumerate(records[:5])})
    return expected


def test_every_format_and_parallel_writers_equal_one_process(tmp_path, monkeypatch):
    expected = mixed_corpus(tmp_path / "corpus")
    one = cfg_for(tmp_path, tmp_path / "corpus", val_fraction=0.2)
    in_process = documents(one)
    assert dict(in_process) == expected
    monkeypatch.setattr(prepare_lib, "IN_PROCESS_BYTES", 0)
    monkeypatch.setattr(prepare_lib, "MIN_UNIT_BYTES", 1)  # one unit per file: 7 units over 2 worker processes
    two = cfg_for(tmp_path / "two", tmp_path / "corpus", val_fraction=0.2)
    build_dir = builders.prepare_local(two, workers=2)
    assert json.loads((build_dir / prepare_lib.BUILD_RECORD).read_text())["files"] == 7
    assert documents(two) == in_process  # same documents, same order


def test_identical_prepare_is_reused_and_a_changed_one_rebuilt(tmp_path, monkeypatch, caplog):
    (tmp_path / "corpus").mkdir()
    for k in range(3):
        (tmp_path / "corpus" / f"{k}.txt").write_text("\n\n".join(paragraph_text(k, 20)))
    cfg = cfg_for(tmp_path, tmp_path / "corpus", split_paragraphs=True)
    first = builders.prepare(cfg)
    stamp = (first / prepare_lib.INFO_FILE).stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("an identical corpus was built again")

    monkeypatch.setattr(prepare_lib, "build", no_build)
    with caplog.at_level("INFO"):
        assert builders.prepare(cfg) == first
    assert f"reusing the prepared corpus in {first}" in caplog.text
    assert (first / prepare_lib.INFO_FILE).stat().st_mtime_ns == stamp
    monkeypatch.undo()
    (tmp_path / "corpus" / "3.txt").write_text("one more file")
    caplog.clear()
    with caplog.at_level("INFO"):
        second = builders.prepare(cfg)
    assert second != first and first.is_dir()
    assert "1 older build(s) of this corpus" in caplog.text and str(first.parent) in caplog.text


def test_other_processes_wait_for_process_0(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n".join(paragraph_text(1, 50)))
    corpus = builders._local_corpus(cfg_for(tmp_path, tmp_path / "c.txt"))
    builder = threading.Timer(0.5, lambda: prepare_lib.ensure_built(corpus, process_index=0))
    builder.start()
    start = time.monotonic()
    assert prepare_lib.ensure_built(corpus, process_index=1, poll_seconds=0.05) == corpus.build_dir
    assert time.monotonic() - start >= 0.4
    builder.join()
    # Process 0's error reaches the waiting processes instead of leaving them waiting.
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    bad = builders._local_corpus(cfg_for(tmp_path, tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="field 'text' is int"):
        prepare_lib.ensure_built(bad, process_index=0)
    with pytest.raises(DataError, match="field 'text' is int"):
        prepare_lib.ensure_built(bad, process_index=1, poll_seconds=0.05)


def test_one_file_is_split_by_paragraphs_or_one_error_names_the_fix(tmp_path):
    (tmp_path / "input.txt").write_text("\n\n".join(paragraph_text(3, 200)))
    docs = documents(cfg_for(tmp_path, tmp_path / "input.txt"))
    assert len(docs) == 200 and all("#" in doc_id for doc_id, _ in docs)
    (tmp_path / "one.txt").write_text("a single paragraph and nothing else")
    with pytest.raises(DataError, match=r"validation split .* data.split_paragraphs=True .* data.val_fraction"):
        builders.load_source(cfg_for(tmp_path, tmp_path / "one.txt"), "validation")


def test_broken_compressed_files_are_named(tmp_path):
    data = gzip.compress(b'{"text": "x"}\n' * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: the gzip stream is truncated"):
        builders.prepare(cfg_for(tmp_path, tmp_path / "cut.jsonl.gz"))
    (tmp_path / "junk.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"junk\.txt\.gz: not a valid gzip file"):
        builders.prepare(cfg_for(tmp_path, tmp_path / "junk.txt.gz"))


def test_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    installed = os.path.join(os.path.dirname(configs.__file__), "pretrain.py")  # the repository's or pip's copy
    assert cli.resolve_config_path("configs/pretrain.py:tiny") == installed + ":tiny"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pretrain.py").write_text("")
    assert cli.resolve_config_path("configs/pretrain.py:tiny") == "configs/pretrain.py:tiny"  # a local file wins
    assert cli.resolve_config_path("mine.py:x") == "mine.py:x"


@pytest.mark.parametrize("layout", ["one_file", "many_files"])
def test_txt_corpora_train_quietly_through_the_binary(tmp_path, layout):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if layout == "one_file":
        (corpus / "input.txt").write_text("\n\n".join(paragraph_text(0, 300)))
    else:
        for k in range(25):
            (corpus / f"file_with_a_long_name_{k}.txt").write_text(" ".join(paragraph_text(k, 10)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/pretrain.py:tiny-bytes",
                          f"--workdir={tmp_path / 'run'}", f"--config.data.paths={corpus}",
                          f"--config.data.data_dir={tmp_path / 'data'}", "--config.train.steps=3",
                          "--config.optim.warmup_steps=1", "--config.train.sample_prompts=()"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "validation loss" in out.stdout
    for noise in ("Generating", "Shuffling", "Using custom data configuration", "examples/s", "TPU"):
        assert noise not in log, f"{noise!r} in the log:\n{log[-3000:]}"
    assert max(map(len, log.splitlines())) < 400
