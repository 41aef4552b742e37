"""Parallel shard writers: corpus files -> array_record shards of TFDS-encoded documents, one unit at a time.

A *unit* is a run of consecutive corpus files; it becomes one shard per split (``unit-<k>-<split>.array_record``)
holding its documents in file order, so the dataset (the units' shards in order) has the same documents in the
same order however many workers wrote it. Each record is the ``tf.train.Example`` TFDS writes for the features
``{"source": Text, "text": Text}`` (encoded here directly: TFDS then reads the shards as its own).

Workers are plain subprocesses (``python -m gptjax.data.shards``) that import only this module and the readers,
not the parent's main module (multiprocessing's spawn would re-import a binary with all of JAX): the parent
sends one JSON unit per line on stdin and reads one JSON result per line from stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from gptjax.data import readers
from gptjax.errors import DataError

SPLITS = ("train", "validation")
# One record per compressed group, as grain's random access wants (it logs an error for larger groups); snappy
# writes ~1.4x faster than zstd here and the shards still take less room than the uncompressed text.
WRITER_OPTIONS = "group_size:1,snappy"


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _feature_parts(key: bytes, value: bytes) -> tuple[list[bytes], int]:
    """Wire-format pieces (the value last, uncopied) of a Features map entry {key: Feature{bytes_list{value}}}
    and their total length. Field tags: 0x0A = field 1, 0x12 = field 2, both length-delimited."""
    bytes_list = 1 + len(_varint(len(value))) + len(value)  # BytesList{value: value}
    feature = 1 + len(_varint(bytes_list)) + bytes_list  # Feature{bytes_list}
    entry = 2 + len(key) + 1 + len(_varint(feature)) + feature  # {key, value: Feature} (len(key) < 128)
    parts = [b"\x0a", _varint(entry), b"\x0a", bytes((len(key),)), key, b"\x12", _varint(feature),
             b"\x0a", _varint(bytes_list), b"\x0a", _varint(len(value)), value]
    return parts, 1 + len(parts[1]) + entry


def encode_example(text: str, source: str) -> bytes:
    """The serialized tf.train.Example of {"source", "text"} exactly as TFDS writes it (keys sorted)."""
    source_parts, source_len = _feature_parts(b"source", source.encode("utf-8"))
    text_parts, text_len = _feature_parts(b"text", text.encode("utf-8"))
    return b"".join([b"\x0a", _varint(source_len + text_len), *source_parts, *text_parts])


def split_of(doc_id: str, val_fraction: float) -> str:
    """'validation' for a stable pseudo-random ``val_fraction`` of ids, else 'train' (sha256, not hash())."""
    import hashlib

    u = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "validation" if u < val_fraction else "train"


def unit_documents(files: Sequence[tuple[str, str]], settings: dict) -> Iterator[tuple[str, str]]:
    """(id, text) of a unit's files: ``settings`` holds ``mode`` ("text_files" | "shakespeare") and its fields."""
    for path, rel in files:
        if settings["mode"] == "shakespeare":
            from gptjax.data import builders  # small corpus, built in-process: TFDS is loaded there anyway

            yield from builders.iter_shakespeare_documents([Path(path)], Path(settings["root"]),
                                                           settings["chunk_chars"])
        else:
            yield from readers.file_documents(Path(path), rel, text_field=settings["text_field"],
                                              split_paragraphs=settings["split_paragraphs"])


def build_unit(unit: dict) -> dict:
    """Writes one unit's shards into ``unit["out_dir"]``; returns per split {path, count, bytes}."""
    from array_record.python import array_record_module

    settings, out_dir = unit["settings"], Path(unit["out_dir"])
    writers: dict[str, Any] = {}
    stats = {split: {"path": str(out_dir / f"unit-{unit['index']:05d}-{split}.array_record"), "count": 0,
                     "bytes": 0} for split in SPLITS}
    try:
        for doc_id, text in unit_documents(unit["files"], settings):
            split = split_of(doc_id, settings["val_fraction"])
            record = encode_example(text, doc_id)
            if split not in writers:
                writers[split] = array_record_module.ArrayRecordWriter(stats[split]["path"], WRITER_OPTIONS)
            writers[split].write(record)
            stats[split]["count"] += 1
            stats[split]["bytes"] += len(record)
    finally:
        for writer in writers.values():
            writer.close()
    return {"index": unit["index"], "splits": {s: v for s, v in stats.items() if v["count"]},
            "input_bytes": unit["input_bytes"]}


# --------------------------------------------------------------------------------------------- workers

def _worker_main() -> None:
    """Reads units (JSON lines) from stdin, answers each with its result or {"error": ...} on stdout."""
    for line in sys.stdin:
        try:
            answer = build_unit(json.loads(line))
        except DataError as e:
            answer = {"error": str(e), "data_error": True}
        except Exception:  # an unexpected failure: the parent shows the worker's traceback
            answer = {"error": traceback.format_exc(), "data_error": False}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def _serve(worker: subprocess.Popen, queue: list, lock: threading.Lock, results: dict, errors: list,
           on_done: Callable[[dict], None]) -> None:
    while True:
        with lock:
            if errors or not queue:
                return
            unit = queue.pop(0)
        worker.stdin.write(json.dumps(unit) + "\n")
        worker.stdin.flush()
        line = worker.stdout.readline()
        answer = json.loads(line) if line else {"error": f"worker exited ({worker.wait()})", "data_error": False}
        with lock:
            if "error" in answer:
                errors.append(answer)
                return
            results[answer["index"]] = answer
            on_done(answer)


def run_units(units: list[dict], workers: int, on_done: Callable[[dict], None] = lambda r: None) -> list[dict]:
    """Builds every unit with ``workers`` processes (0/1: in this process); results in unit order."""
    if workers <= 1 or len(units) <= 1:
        results = []
        for unit in units:
            results.append(build_unit(unit))
            on_done(results[-1])
        return results
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "gptjax.data.shards"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(min(workers, len(units)))]
    queue, lock, results, errors = list(units), threading.Lock(), {}, []
    threads = [threading.Thread(target=_serve, args=(p, queue, lock, results, errors, on_done)) for p in procs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    if errors:
        first = errors[0]
        raise DataError(first["error"]) if first["data_error"] else RuntimeError(
            f"a shard writer failed:\n{first['error']}")
    return [results[u["index"]] for u in units]


if __name__ == "__main__":
    _worker_main()
