"""Prepare a pretraining corpus once: ``python -m experiments.prepare --config=configs/pretrain.py:<preset>``.

Builds the config's ``data`` section (``--config.data.paths=corpus/ --config.data.source=text_files`` ...) into
``data.data_dir`` (default ``./data``) with one shard writer per CPU core, streaming ``.txt``/``.jsonl`` files
(plain, ``.gz`` or ``.zst``) and ``.parquet``; ``experiments.train`` then finds the build and reuses it (it would
build the same on first use). Re-running reuses an identical build and says where it is. In a multi-host run
(``--coordinator_address ...`` or a cluster environment) process 0 builds and the others wait for it.

    python -m experiments.prepare --config=configs/pretrain.py:tiny-bytes --config.data.paths=corpus/
    python -m experiments.prepare --benchmark_gb=1     # throughput and peak memory on 1 GB of .jsonl.gz

Bad input ends in one error line and exit status 1.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from gptjax import cli, distributed
from gptjax.errors import DataError

_CONFIG = cli.define_config_file("config", None, "Config whose data section to prepare, e.g. "
                                 "configs/pretrain.py:tiny-bytes.", lock_config=True)
_WORKERS = flags.DEFINE_integer("workers", None, "Shard-writer processes (default: one per CPU core).")
_BENCHMARK_GB = flags.DEFINE_float("benchmark_gb", 0.0, "Instead: benchmark preparing this many GB of .jsonl.gz.")
_BENCHMARK_DIR = flags.DEFINE_string("benchmark_dir", "/tmp/gptjax-prepare-bench",
                                     "Where the benchmark corpus (made once) and its build go.")
distributed.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from gptjax.data import builders, prepare_bench
    from gptjax.train import metrics as metrics_lib

    metrics_lib.quiet_library_logs()
    if _BENCHMARK_GB.value > 0:
        prepare_bench.run(Path(_BENCHMARK_DIR.value), _BENCHMARK_GB.value, _WORKERS.value)
        return
    if _CONFIG.value is None:
        raise app.UsageError("pass --config=configs/pretrain.py:<preset> (its data section is prepared)")
    try:
        distributed.initialize_from_flags()
        data = _CONFIG.value.data
        if builders.source_of(data) == "tfds":
            print(f"ready: {builders.prepare(data)}")
            return
        build_dir = builders.prepare_local(data, fetch=True, workers=_WORKERS.value)
    except ValueError as e:  # DataError, and a bad value the data builders reject
        if isinstance(e, DataError):
            raise
        raise DataError(str(e)) from None
    import tensorflow_datasets as tfds

    splits = tfds.builder_from_directory(build_dir).info.splits
    print(f"ready: {build_dir} (" + ", ".join(f"{s} {splits[s].num_examples:,}" for s in splits) + " documents)")


def run():
    """Console-script entry point (``gptjax-prepare``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
