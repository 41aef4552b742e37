"""Build a local corpus once: parallel shard writers, an atomic publish, reuse of identical builds, multi-host safe.

A build lives in ``<data_dir>/<dataset>/<fingerprint>/1.0.0/`` — the TFDS layout, so TFDS reads it as its own
(``tfds.builder_from_directory``, or ``data.source=tfds`` by name) — where the fingerprint covers the file list,
their sizes and modification times, and every setting that changes the documents. Steps:

1. The corpus files are cut into *units* of consecutive files (about ``unit_bytes`` each); worker processes
   (``gptjax/data/shards.py``) stream each unit's documents into one array_record shard per split.
2. The shards are renamed to TFDS's shard names, ``dataset_info.json``/``features.json`` are written, and the
   temporary directory is renamed into place: a build is either complete or absent, never half there.
3. An identical build that exists is reused (and said so); a new build notes older builds of the same corpus.

In a multi-process run only process 0 builds; the others wait until the build appears (or until process 0
leaves a ``.failed`` note with its error, which they raise too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from absl import logging

from gptjax.data import shards
from gptjax.errors import DataError

VERSION = "1.0.0"
BUILD_RECORD = "gptjax_build.json"
INFO_FILE = "dataset_info.json"
IN_PROCESS_BYTES = 32 << 20  # smaller corpora are written in this process: starting workers costs more
MIN_UNIT_BYTES, MAX_UNIT_BYTES = 8 << 20, 256 << 20
WAIT_LOG_SECONDS = 60.0
STALE_NOTE_SECONDS = 600.0


@dataclasses.dataclass
class Corpus:
    """What to build: ``settings`` (mode, val_fraction, ...) are passed to the shard writers as they are."""

    dataset: str  # TFDS dataset name, e.g. "gptjax_text_files"
    config_name: str  # the fingerprint
    description: str
    files: list[Path]
    root: Path  # document ids are relative to it
    settings: dict[str, Any]
    data_dir: Path

    @property
    def build_dir(self) -> Path:
        return self.data_dir / self.dataset / self.config_name / VERSION

    @property
    def failed_note(self) -> Path:
        return self.build_dir.parent / f"{VERSION}.failed"


_SAID: set[str] = set()


def say_once(message: str) -> None:
    """An INFO line logged once per process (the train and validation iterators both prepare the corpus)."""
    if message not in _SAID:
        _SAID.add(message)
        logging.info("%s", message)


def is_built(build_dir: Path) -> bool:
    return (build_dir / INFO_FILE).is_file()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_units(corpus: Corpus, out_dir: Path, workers: int) -> list[dict]:
    """Consecutive files grouped into units of about ``total / (4 * workers)`` bytes (clamped)."""
    sizes = [f.stat().st_size for f in corpus.files]
    target = min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, sum(sizes) // max(1, 4 * workers)))
    groups: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(sizes):
        if groups[-1] and size + n > target:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    root = corpus.root
    return [{"index": k, "out_dir": str(out_dir), "settings": corpus.settings,
             "input_bytes": sum(sizes[i] for i in group),
             "files": [(str(corpus.files[i]), corpus.files[i].relative_to(root).as_posix()) for i in group]}
            for k, group in enumerate(groups)]


class _Progress:
    """One log line at most every ``every`` seconds: units done, bytes read, rate."""

    def __init__(self, total_bytes: int, units: int, every: float = 10.0):
        self.total, self.units, self.every = total_bytes, units, every
        self.done_bytes = self.done_units = 0
        self.start = self.last = time.monotonic()

    def __call__(self, result: dict) -> None:
        self.done_bytes += result["input_bytes"]
        self.done_units += 1
        now = time.monotonic()
        if now - self.last >= self.every and self.done_units < self.units:
            self.last = now
            logging.info("data: %d/%d file groups, %s of %s (%.0f MB/s)", self.done_units, self.units,
                         _size(self.done_bytes), _size(self.total), self.done_bytes / 1e6 / (now - self.start))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} GB"


def _write_metadata(corpus: Corpus, tmp: Path, results: list[dict]) -> dict[str, int]:
    """Renames the unit shards to TFDS shard names and writes the TFDS metadata; returns documents per split."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_info, naming, splits as splits_lib

    split_infos, counts = [], {}
    for split in shards.SPLITS:
        parts = [r["splits"][split] for r in results if split in r["splits"]]
        if not parts:
            continue
        template = naming.ShardedFileTemplate(data_dir=tmp, dataset_name=corpus.dataset, split=split,
                                              filetype_suffix="array_record")
        for k, part in enumerate(parts):
            os.replace(part["path"], template.sharded_filepath(shard_index=k, num_shards=len(parts)))
        split_infos.append(splits_lib.SplitInfo(name=split, shard_lengths=[p["count"] for p in parts],
                                                num_bytes=sum(p["bytes"] for p in parts), filename_template=template))
        counts[split] = sum(p["count"] for p in parts)
    identity = dataset_info.DatasetIdentity(
        name=corpus.dataset, version=tfds.core.Version(VERSION), data_dir=str(corpus.build_dir),
        module_name="gptjax.data.builders", config_name=corpus.config_name, config_description=corpus.description)
    features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "source": tfds.features.Text()})
    info = tfds.core.DatasetInfo(builder=identity, description=corpus.description, features=features)
    info.set_file_format("array_record")
    info.set_splits(splits_lib.SplitDict(split_infos))
    info.write_to_directory(tmp)
    return counts


def build(corpus: Corpus, workers: int | None = None) -> Path:
    """Writes the corpus into ``corpus.build_dir`` (replacing nothing: a finished build is kept as it is)."""
    workers = default_workers() if workers is None else workers
    total = sum(f.stat().st_size for f in corpus.files)
    workers = workers if total >= IN_PROCESS_BYTES else 1
    corpus.build_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = corpus.build_dir.parent / f"incomplete.{os.getpid()}.{VERSION}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start = time.monotonic()
    try:
        units = make_units(corpus, tmp, workers)
        logging.info("data: preparing %d file(s) (%s) with %d process(es) into %s", len(corpus.files), _size(total),
                     min(workers, len(units)), corpus.build_dir)
        results = shards.run_units(units, workers, _Progress(total, len(units)))
        counts = _write_metadata(corpus, tmp, results)
        seconds = time.monotonic() - start
        record = {"files": len(corpus.files), "input_bytes": total, "root": str(corpus.root),
                  "settings": corpus.settings, "documents": counts, "seconds": round(seconds, 3)}
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(tmp, corpus.build_dir)
        except OSError:  # another process published the same build first: theirs is identical
            if not is_built(corpus.build_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("data: prepared %s documents (%s) from %s in %.1f s (%.0f MB/s) into %s",
                 f"{sum(counts.values()):,}", ", ".join(f"{s} {n:,}" for s, n in counts.items()), _size(total),
                 seconds, total / 1e6 / max(seconds, 1e-9), corpus.build_dir)
    _note_older_builds(corpus)
    return corpus.build_dir


def _note_older_builds(corpus: Corpus) -> None:
    older = []
    for record in (corpus.data_dir / corpus.dataset).glob(f"*/{VERSION}/{BUILD_RECORD}"):
        build_dir = record.parent
        if build_dir == corpus.build_dir:
            continue
        try:
            if json.loads(record.read_text()).get("root") == str(corpus.root):
                older.append(build_dir.parent)
        except (OSError, ValueError):
            continue
    if older:
        size = sum(f.stat().st_size for d in older for f in d.rglob("*") if f.is_file())
        logging.info("data: %d older build(s) of this corpus (%s) are in %s; delete them when no run uses them: "
                     "rm -r %s", len(older), _size(size), corpus.data_dir / corpus.dataset,
                     " ".join(str(d) for d in sorted(older)))


def ensure_built(corpus: Corpus, *, workers: int | None = None, process_index: int = 0,
                 poll_seconds: float = 1.0) -> Path:
    """The corpus's build directory: reused if complete, built by process 0, awaited by the others."""
    if is_built(corpus.build_dir):
        say_once(f"data: reusing the prepared corpus in {corpus.build_dir}")
        return corpus.build_dir
    if process_index == 0:
        corpus.failed_note.unlink(missing_ok=True)
        try:
            return build(corpus, workers)
        except DataError as e:
            corpus.failed_note.parent.mkdir(parents=True, exist_ok=True)
            corpus.failed_note.write_text(str(e))
            raise
    logging.info("data: process %d waits for process 0 to prepare %s", process_index, corpus.build_dir)
    start = last = time.monotonic()
    started_at = time.time()
    while not is_built(corpus.build_dir):
        note = corpus.failed_note
        # A note from an earlier failed attempt (long before this run started) is not this run's error.
        if note.exists() and note.stat().st_mtime > started_at - STALE_NOTE_SECONDS:
            raise DataError(note.read_text())
        if time.monotonic() - last >= WAIT_LOG_SECONDS:
            last = time.monotonic()
            logging.info("data: still waiting for %s (%.0f s)", corpus.build_dir, last - start)
        time.sleep(poll_seconds)
    return corpus.build_dir
