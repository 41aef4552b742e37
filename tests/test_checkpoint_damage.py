"""A damaged checkpoint, restored in-process: set aside, the older one restored, and no stray tracebacks.

The subprocess version (tests/test_run_control.py) damages a real run's checkpoint; this one checks what is logged
afterwards deterministically: orbax's abandoned concurrent reads surface as asyncio "exception was never retrieved"
reports whenever their futures are collected, which may be long after the restore returned.
"""

import asyncio
import gc
import logging

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.train import checkpoint as ckpt_lib


def _state(seed: int) -> dict:
    # Many random (incompressible) arrays, so orbax reads several concurrently from a file big enough to truncate.
    keys = jax.random.split(jax.random.key(seed), 16)
    return {f"w{i}": jax.random.normal(key, (64, 64), jnp.float32) for i, key in enumerate(keys)}


def _collect_failed_future(message: str) -> None:
    """What asyncio does when a future that failed is collected without anyone asking for its exception."""
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(ValueError(message))
    del future
    gc.collect()
    loop.close()


def test_a_damaged_checkpoint_restores_the_older_one_and_logs_nothing_stray(tmp_path, caplog):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=0, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), data_state={"pos": step}, config={"step": step})
    ckpt.close()
    data = sorted((tmp_path / "checkpoints" / "2" / "state").glob("ocdbt.process_0/d/*"),
                  key=lambda p: p.stat().st_size)
    with open(data[-1], "r+b") as f:
        f.truncate(data[-1].stat().st_size // 2)

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
    reader = ckpt_lib.Checkpointer(str(tmp_path), keep=0, async_save=False)
    with caplog.at_level(logging.WARNING):
        restored = reader.restore(2, abstract)
        reader.close()
        damaged_dir = str(tmp_path / "checkpoints" / "2")
        _collect_failed_future(f'Error reading "w3/0.0" at local file "{damaged_dir}/state/": out of range')
        _collect_failed_future(f'Error reading "w3/0.0" at local file "{tmp_path}/elsewhere/state/": out of range')

    assert restored.step == 1 and restored.data_state == {"pos": 1}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), jax.device_get(_state(1)))
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("2.damaged-")
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint 1 instead" in warnings[0]
    never_retrieved = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    # The damaged checkpoint's abandoned reads are dropped; a failure anywhere else is still reported.
    assert len(never_retrieved) == 1 and "elsewhere" in never_retrieved[0], never_retrieved
