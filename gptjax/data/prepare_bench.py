"""The corpus-preparation benchmark: ``python -m experiments.prepare --benchmark_gb=1``.

Writes (once; reused from ``--benchmark_dir``) a synthetic ``.jsonl.gz`` corpus of the given compressed size —
documents of 200-900 words drawn from a Zipf-distributed vocabulary, which gzip compresses about 2.6x like
English text — then prepares it from scratch and reports the time, the throughput (compressed input MB/s and
uncompressed text MB/s) and the peak resident memory of this process and its shard writers together.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import shutil
import threading
import time
import zlib
from pathlib import Path

FILE_BYTES = 64 << 20  # compressed bytes per corpus file
_WORDS = 20_000


def _word_pool(seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(_WORDS)]
    return rng.choices(vocab, [1 / (i + 1) for i in range(_WORDS)], k=1_000_000)


def _write_file(args: tuple[str, int, int]) -> int:
    """One gzip file of about ``target`` compressed bytes; returns its uncompressed size."""
    path, target, seed = args
    pool, rng = _word_pool(seed % 7), random.Random(seed)
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    written = raw = 0
    with open(path + ".tmp", "wb") as f:
        while written < target:
            lines = []
            for _ in range(256):
                n = rng.randint(200, 900)
                start = rng.randint(0, len(pool) - n)
                lines.append(json.dumps({"text": " ".join(pool[start:start + n]), "id": rng.getrandbits(32)}))
            block = ("\n".join(lines) + "\n").encode()
            raw += len(block)
            out = compressor.compress(block)
            written += len(out)
            f.write(out)
        f.write(compressor.flush())
    os.replace(path + ".tmp", path)
    return raw


def make_corpus(directory: Path, gigabytes: float) -> tuple[list[Path], int]:
    """The benchmark's files (made if missing) and their compressed size in bytes."""
    total = int(gigabytes * 1e9)
    count = max(1, -(-total // FILE_BYTES))
    directory = directory / f"jsonl_gz_{total}"
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"part-{k:04d}.jsonl.gz" for k in range(count)]
    missing = [(str(p), total // count, k) for k, p in enumerate(paths) if not p.exists()]
    if missing:
        print(f"writing the benchmark corpus: {count} files, {total / 1e9:.2f} GB of .jsonl.gz in {directory} "
              f"(once; not timed)", flush=True)
        with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
            pool.map(_write_file, missing)
    return paths, sum(p.stat().st_size for p in paths)


def _rss_of_tree(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


class PeakMemory:
    """Samples the resident memory of this process tree every ``every`` seconds while active."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_of_tree(os.getpid()))
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the shard writers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(benchmark_dir: Path, gigabytes: float, workers: int | None) -> dict:
    """Builds the benchmark corpus from scratch; returns the measured figures (also printed)."""
    from gptjax.data import builders
    from gptjax.data.pipeline import default_data_config

    paths, compressed = make_corpus(benchmark_dir, gigabytes)
    cfg = default_data_config()
    cfg.update(source="text_files", paths=",".join(map(str, paths)), data_dir=str(benchmark_dir / "data"))
    shutil.rmtree(benchmark_dir / "data", ignore_errors=True)
    cpu_before = _cpu_seconds()
    with PeakMemory() as memory:
        start = time.perf_counter()
        build_dir = builders.prepare_local(cfg, workers=workers)
        seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_before
    record = json.loads((build_dir / "gptjax_build.json").read_text())
    text_bytes = sum(f.stat().st_size for f in build_dir.iterdir() if ".array_record-" in f.name)
    result = {"files": len(paths), "input_gb": compressed / 1e9, "seconds": seconds,
              "input_mb_per_s": compressed / 1e6 / seconds, "documents": record["documents"],
              "output_gb": text_bytes / 1e9, "peak_rss_mb": memory.peak / 2**20, "cpu_seconds": cpu}
    print(f"prepared {result['input_gb']:.2f} GB of .jsonl.gz ({len(paths)} files) in {seconds:.1f} s: "
          f"{result['input_mb_per_s']:.1f} MB/s of compressed input; peak memory {result['peak_rss_mb']:.0f} MiB "
          f"(this process and its shard writers); {sum(record['documents'].values()):,} documents, "
          f"{result['output_gb']:.2f} GB of shards; {cpu:.0f} CPU-seconds ({compressed / 1e6 / cpu:.1f} MB per "
          f"CPU-second)")
    return result
