"""A damaged checkpoint, restored in-process: set aside, the older one restored, and no stray tracebacks.

The subprocess version (tests/test_run_control.py) damages a real run's checkpoint; this one checks what is logged
afterwards deterministically: orbax's abandoned concurrent reads surface as asyncio "exception was never retrieved"
reports whenever their futures are collected, which may be long after the restore returned, and reads still in
flight complete onto orbax's closed event loop (reported through ``sys.unraisablehook``).
"""

import asyncio
import gc
import logging
import sys
import types

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


def _unraisable_from_closed_loop(message: str) -> types.SimpleNamespace:
    """What tensorstore reports when a read completes after its event loop closed: the RuntimeError raised by the
    closed loop's ``call_soon_threadsafe``, with no object."""
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        error = e
    return types.SimpleNamespace(exc_type=RuntimeError, exc_value=error, exc_traceback=error.__traceback__,
                                 err_msg=message, object=None)


def test_a_damaged_checkpoint_restores_the_older_one_and_logs_nothing_stray(tmp_path, caplog, monkeypatch):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=0, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), data_state={"pos": step}, config={"step": step})
    ckpt.close()
    data = sorted((tmp_path / "checkpoints" / "2" / "state").glob("ocdbt.process_0/d/*"),
                  key=lambda p: p.stat().st_size)
    with open(data[-1], "r+b") as f:
        f.truncate(data[-1].stat().st_size // 2)

    reported = []  # what reaches the hook in place before the restore (Python's default one prints it)
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(str(unraisable.exc_value)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
    reader = ckpt_lib.Checkpointer(str(tmp_path), keep=0, async_save=False)
    with caplog.at_level(logging.WARNING):
        restored = reader.restore(2, abstract)
        reader.close()
        damaged_dir = str(tmp_path / "checkpoints" / "2")
        _collect_failed_future(f'Error reading "w3/0.0" at local file "{damaged_dir}/state/": out of range')
        _collect_failed_future(f'Error reading "w3/0.0" at local file "{tmp_path}/elsewhere/state/": out of range')
        sys.unraisablehook(_unraisable_from_closed_loop("late read"))
        other = ValueError("an unrelated failure")
        sys.unraisablehook(types.SimpleNamespace(exc_type=ValueError, exc_value=other, exc_traceback=None,
                                                 err_msg="elsewhere", object=None))

    assert restored.step == 1 and restored.data_state == {"pos": 1}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), jax.device_get(_state(1)))
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("2.damaged-")
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint 1 instead" in warnings[0]
    never_retrieved = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    # The damaged checkpoint's abandoned reads are dropped; a failure anywhere else is still reported.
    assert len(never_retrieved) == 1 and "elsewhere" in never_retrieved[0], never_retrieved
    # Reads completing after the restore failed are dropped too; any other unraisable error is still printed.
    assert reported == ["an unrelated failure"], reported
