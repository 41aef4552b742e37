"""Checkpoints (orbax CheckpointManager): train state, data-iterator state, config; resume and ``init_from``.

Layout: ``WORKDIR/checkpoints/<step>/{state, data_iter, config, extras}``.
- ``state``: the TrainState (params, optimizer state, step, rng, NaN-guard counters), restored onto the
  shardings of the *current* mesh, so a run may resume on another mesh shape or device count.
- ``data_iter``: each process's data-iterator state (``process_<i>-of-<n>.json``), for exact resume.
- ``config``: the resolved run config (``init_from`` readers use it to rebuild the source model).
- ``extras``: JSON-able state of stage-specific objects (e.g. a KL controller).

Saves are asynchronous: ``save`` returns once arrays are copied off the device; files are written in the
background into ``<step>.orbax-checkpoint-tmp-*`` and renamed to ``<step>`` only when complete (an atomic
rename on local/POSIX filesystems; a ``commit_success.txt`` marker on object stores). A process killed
mid-save leaves only the tmp directory, which step listing ignores and the next start deletes.

What can go wrong, and what the ``Checkpointer`` does then:
- a save fails (disk full, permissions): a ``CheckpointError`` in one line naming the directory, the device and the
  space needed and free; its unfinished directory is removed. Before each save the room is checked (a checkpoint
  needs the size of the previous one, the first the state's size in memory), so a full disk stops the run before it
  writes; a failure of the background write surfaces at the next ``check_for_errors`` (the loops call it once per
  step) or on close.
- the checkpoint to resume from is damaged (a truncated or deleted file, an emptied ``state/``): it is moved aside
  to ``checkpoints/<step>.damaged-<UTC time>/`` (never deleted) with a one-line warning, and the newest older
  intact one is restored instead. A checkpoint that reads fine but does not fit the run's state is no damage: that
  is one error, and nothing is moved.
- the run's wall time: each save records the seconds the run has taken so far (``wall_time``), and a restore hands
  the value back as ``prior_wall_s``, so ``summary.json`` counts every segment of a resumed run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import logging as pylogging
import os
import sys
import traceback
from typing import Any, Callable, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gptjax import paths
from gptjax.errors import CheckpointError, ConfigError, UserError

CKPT_DIR = "checkpoints"
ITEMS = ("state", "data_iter", "config", "extras")
WALL_TIME_KEY = "_wall_time_s"  # in ``extras``: the run's seconds up to this checkpoint, all segments together
TMP_MARK = ".orbax-checkpoint-tmp"


# --- data-iterator state: one JSON file per process (orbax's JsonSave writes on the primary host only) ---

class DataIterStateHandler(ocp.CheckpointHandler):
    """Saves/restores a data iterator's ``get_state()`` (a JSON-able dict, or bytes as grain's DataLoader gives)."""

    def _path(self, directory: epath.Path) -> epath.Path:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "DataIterSave"):
        state = args.state
        if state is None:
            record = {"format": "none"}
        elif isinstance(state, (bytes, bytearray)):
            record = {"format": "bytes", "state": bytes(state).decode("utf-8")}
        else:
            record = {"format": "json", "state": state}
        self._path(directory).write_text(json.dumps(record))

    def restore(self, directory: epath.Path, args: "DataIterRestore | None" = None):
        path = self._path(directory)
        if not path.exists():
            found = sorted(p.name for p in epath.Path(directory).iterdir())
            raise ConfigError(f"{path} is missing: the checkpoint's data-iterator states are {found}; it was "
                              f"written with another number of processes, so the data position cannot be "
                              f"restored exactly")
        record = json.loads(path.read_text())
        if record["format"] == "bytes":
            return record["state"].encode("utf-8")
        return record.get("state")

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataIterStateHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataIterStateHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
    pass


@dataclasses.dataclass
class Restored:
    state: Any
    data_state: Any
    config: dict
    extras: dict
    step: int = -1  # the step restored (older than the one asked for when that one was damaged)


class Checkpointer:
    """``ocp.CheckpointManager`` for ``WORKDIR/checkpoints``, with the checks of the module docstring.

    ``wall_time() -> seconds`` (optional): the run's time so far, recorded with each save."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True,
                 wall_time: Callable[[], float] | None = None):
        self.path = paths.as_path(workdir) / CKPT_DIR
        self.directory = str(self.path)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None, create=True,
            cleanup_tmp_directories=True,  # delete what a killed save left behind
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.path, options=options, item_names=ITEMS)
        self._wall_time = wall_time
        self.prior_wall_s = 0.0  # the run's seconds up to the restored checkpoint
        self._pending: int | None = None  # the step of the last save started
        self._failed = False
        self._sizes: dict[int, int] = {}

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return self.manager.all_steps()

    def save(self, step: int, state, *, data_state, config: Mapping, extras: Mapping | None = None) -> None:
        """Starts writing checkpoint ``step`` (async) once the previous one is finished and the disk has room."""
        try:
            self.manager.wait_until_finished()  # orbax would wait too; a failure of the previous save surfaces here
        except Exception as e:  # noqa: BLE001 — orbax raises what its background writer raised
            raise self._save_failed(self._pending, e) from None
        self._check_room(step, state)
        extras = dict(extras or {})
        if self._wall_time is not None:
            extras[WALL_TIME_KEY] = round(float(self._wall_time()), 3)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data_iter=DataIterSave(data_state),
                                  config=ocp.args.JsonSave(dict(config)), extras=ocp.args.JsonSave(extras))
        self._pending = step
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(step, e) from None

    def check_for_errors(self) -> None:
        """Raises CheckpointError when a background save failed (without waiting for one in flight)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(self._pending, e) from None

    def restore(self, step: int, abstract_state) -> Restored:
        """Checkpoint ``step`` into ``abstract_state`` (ShapeDtypeStructs carrying the target shardings, see
        state.abstract_state). A damaged one is moved aside and the newest older one restored (``Restored.step``)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data_iter=DataIterRestore(),
                                  config=ocp.args.JsonRestore(), extras=ocp.args.JsonRestore())
        while True:
            try:
                with _quiet_abandoned_reads(self.path / str(step)):
                    r = self.manager.restore(step, args=args)
                break
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 — orbax/tensorstore report a damaged file in many ways
                step = self._set_aside_or_raise(step, abstract_state, e)
        extras = dict(r.extras)
        self.prior_wall_s = float(extras.pop(WALL_TIME_KEY, 0.0))
        return Restored(r.state, r.data_iter, dict(r.config), extras, step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            if not self._failed:
                raise self._save_failed(self._pending, e) from None
        finally:
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self.manager.close()

    # --- what goes wrong ---------------------------------------------------------------------------------------

    def _size(self, step: int) -> int:
        if step not in self._sizes:
            self._sizes[step] = sum(os.path.getsize(os.path.join(d, f))
                                    for d, _, files in os.walk(self.path / str(step)) for f in files)
        return self._sizes[step]

    def _need(self, state) -> tuple[int, str]:
        """(bytes, how they were measured) another checkpoint needs: the size of the latest one on disk, or before
        the first the state's size in memory."""
        latest = self.latest_step()
        if latest is not None:
            return self._size(latest), f"the size of checkpoint {latest}"
        return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state)), "the size of the state"

    def _check_room(self, step: int, state) -> None:
        """A CheckpointError, before anything is written, when the disk cannot hold another checkpoint."""
        if not paths.is_local(self.path):
            return
        (need, measure), space = self._need(state), paths.space_on(self.path)
        if space is not None and space.free < need:
            self._failed = True
            latest = self.latest_step()
            resume = f"resume from checkpoint {latest}" if latest is not None else "start it again"
            raise CheckpointError(
                f"no room for checkpoint {step} in {self.directory}: it needs about {paths.fmt_bytes(need)} "
                f"({measure}) and {space.describe()}; the run stopped after step {step} without saving it. Free "
                f"space there (or lower train.keep_ckpts), then run the same command to {resume}")

    def _save_failed(self, step: int | None, error: BaseException) -> CheckpointError:
        """The one-line error of a failed save of ``step``, after removing what it left unfinished."""
        self._failed = True
        for child in (self.path.iterdir() if self.path.exists() and jax.process_index() == 0 else ()):
            if child.name.startswith(f"{step}{TMP_MARK}") or child.name.startswith(f"{step}.tmp"):
                with contextlib.suppress(OSError):
                    child.rmtree()
        space = paths.space_on(self.path)
        if "No space left" in str(error) or getattr(error, "errno", None) == 28:
            latest = self.latest_step()
            need = f"about {paths.fmt_bytes(self._size(latest))} (the size of checkpoint {latest})" \
                if latest is not None else "more room"
            reason = f"the disk is full: it needs {need} and {space.describe() if space else 'no room is left'}"
        else:
            reason = _first_line(error)
        return CheckpointError(f"saving checkpoint {step} in {self.directory} failed ({reason}); the run stopped "
                               f"and its unfinished files were removed. Fix that, then run the same command to "
                               f"resume from checkpoint {self.latest_step()}")

    def _set_aside_or_raise(self, step: int, abstract_state, error: BaseException) -> int:
        """Moves damaged checkpoint ``step`` aside and returns the step to try next; raises when ``step`` is not
        damaged (it does not fit the state) or no older checkpoint is left."""
        reason = _first_line(error)
        if not self._damaged(step, abstract_state):
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not fit this run's state ({reason}); "
                                  f"was the model or optimizer changed with --allow_config_change? Resume with the "
                                  f"config it was written with, or use a new --workdir") from None
        if jax.process_count() > 1:
            raise CheckpointError(f"checkpoint {step} in {self.directory} is damaged ({reason}); move it aside "
                                  f"(mv {self.path / str(step)} {self.path / str(step)}.damaged) and run the same "
                                  f"command to resume from the previous one") from None
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path / f"{step}.damaged-{stamp}"
        (self.path / str(step)).rename(aside)
        self.manager.reload()
        older = [s for s in self.all_steps() if s < step]
        if not older:
            raise CheckpointError(f"checkpoint {step} in {self.directory} is damaged ({reason}) and no older one is "
                                  f"left; it was moved to {aside}. Run the same command again to start the run "
                                  f"from the beginning") from None
        logging.warning("checkpoint %d is damaged (%s): moved it to %s; resuming from checkpoint %d instead",
                        step, reason, aside, max(older))
        return max(older)

    def _damaged(self, step: int, abstract_state) -> bool:
        """True when the checkpoint's state metadata is unreadable or lists the same arrays as the state (so what
        failed was reading them); False when it describes another state (a different model or optimizer)."""
        try:
            meta = ocp.PyTreeCheckpointHandler().metadata(self.path / str(step) / "state")
        except Exception:  # noqa: BLE001
            return True
        tree = meta.tree if hasattr(meta, "tree") else meta
        saved = sorted(tuple(getattr(leaf, "shape", ())) for leaf in jax.tree.leaves(
            tree, is_leaf=lambda x: hasattr(x, "shape")))
        wanted = sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(abstract_state))
        return saved == wanted


class _AbandonedReadsFilter(pylogging.Filter):
    """Drops asyncio's "exception was never retrieved" reports about reads of a checkpoint whose restore already
    failed: orbax reads all arrays concurrently, the first failure ends the restore, and the other reads' failures
    would each print a traceback when their futures are collected, maybe long after (the failure itself is
    reported once, by the caller)."""

    def __init__(self):
        super().__init__()
        self.directories: set[str] = set()

    def filter(self, record: pylogging.LogRecord) -> bool:
        if not self.directories:
            return True
        message = record.getMessage()
        return not ("exception was never retrieved" in message and any(d in message for d in self.directories))


_ABANDONED_READS = _AbandonedReadsFilter()
pylogging.getLogger("asyncio").addFilter(_ABANDONED_READS)


def _is_abandoned_read(unraisable) -> bool:
    """An unraisable report left by a failed restore's other reads: a read coroutine never awaited, or a read that
    finished after orbax closed its event loop (tensorstore's completion callback calls the closed loop's
    ``call_soon_threadsafe`` and reports the RuntimeError as unraisable, with no object)."""
    if "coroutine" in repr(unraisable.object):
        return True
    return (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
            and any(frame.f_code.co_name == "call_soon_threadsafe"
                    for frame, _ in traceback.walk_tb(unraisable.exc_traceback)))


class _AbandonedReadsHook:
    """``sys.unraisablehook`` while a checkpoint is read, and for the rest of the process once a read failed: the
    failed restore's other reads keep completing on tensorstore's threads after the restore returned."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        if not _is_abandoned_read(unraisable):
            self.previous(unraisable)


@contextlib.contextmanager
def _quiet_abandoned_reads(directory):
    """Reads of checkpoint ``directory``: when they fail, the other reads are abandoned: their coroutines are left
    unawaited, their futures unretrieved (asyncio would log each, maybe long after) and the ones still in flight
    complete onto a closed event loop. Those reports are dropped; the failure itself is raised once."""
    previous = sys.unraisablehook
    installed = isinstance(previous, _AbandonedReadsHook)
    if not installed:
        sys.unraisablehook = _AbandonedReadsHook(previous)
    failed = False
    try:
        yield
    except Exception:
        failed = True
        _ABANDONED_READS.directories.add(str(directory))
        raise
    finally:
        gc.collect()
        if not installed and not failed:
            sys.unraisablehook = previous


def finished_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints under WORKDIR/checkpoints (an interrupted save has no plain <step> dir)."""
    directory = paths.as_path(workdir) / CKPT_DIR
    if not directory.is_dir():
        return []
    return sorted(int(child.name) for child in directory.iterdir()
                  if child.name.isdigit() and (child / "state").is_dir())


# --- init_from: parameters of another run --------------------------------------------------------------------

def resolve_checkpoint_dir(path: str, field: str = "train.init_from") -> epath.Path:
    """A finalised step directory from a workdir, its ``checkpoints/`` directory or a step directory; a local path
    may be relative (orbax reads absolute paths only, so it is made absolute here)."""
    local = "://" not in str(path)
    p = epath.Path(os.path.abspath(os.path.expanduser(path)) if local else path)
    if not p.exists():
        raise ConfigError(f"{field}={path!r} does not exist; give a workdir of a previous run, its "
                          f"checkpoints/ directory or one step directory (checkpoints/<step>)")
    if (p / "state").is_dir():
        if ".orbax-checkpoint-tmp" in p.name:
            raise ConfigError(f"{field}={path!r} is an unfinished (interrupted) checkpoint; use a finished step")
        return p
    for parent in (p / CKPT_DIR, p):
        if parent.is_dir():
            steps = [int(c.name) for c in parent.iterdir() if c.name.isdigit() and (c / "state").is_dir()]
            if steps:
                return parent / str(max(steps))
    raise ConfigError(f"{field}={path!r} holds no finished checkpoint (expected a workdir with "
                      f"{CKPT_DIR}/<step>/state, a {CKPT_DIR}/ directory, or a <step> directory holding state/)")


def checkpoint_config(path: str, field: str = "train.init_from") -> dict:
    """The run config stored with the checkpoint at ``path`` (any form accepted by resolve_checkpoint_dir);
    ``field`` is how messages name ``path``."""
    step_dir = resolve_checkpoint_dir(path, field)
    try:
        return json.loads((step_dir / "config" / "metadata").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{field}={path!r}: the checkpoint {step_dir} has no readable config "
                              f"({_first_line(e)}); give another checkpoint of that run") from None


def flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    """Nested mappings -> {path tuple: leaf} (the inverse of ``unflatten``)."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def fitting_params(path: str, abstract_params, *, keep_fresh: Sequence[str] = (), field: str = "train.init_from",
                   item_key: str = "params") -> tuple[epath.Path, dict]:
    """(step directory, {path tuple: ShapeDtypeStruct} to load) of the checkpoint at ``path`` for the leaves of
    ``abstract_params``; one ConfigError when they do not fit. Reads metadata only: a run checks its ``init_from``
    with it before it writes anything."""
    step_dir = resolve_checkpoint_dir(path, field)
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{field}={path!r}: the checkpoint {step_dir} cannot be read ({_first_line(e)}); "
                              f"give another checkpoint of that run (a step directory under checkpoints/)") from None
    tree = meta.tree if hasattr(meta, "tree") else meta
    if item_key not in tree:
        raise ConfigError(f"{field}: {step_dir}/state has no {item_key!r} (top-level keys {sorted(tree)})")
    source = {k: v.shape for k, v in flatten(tree[item_key]).items()}
    target = flatten(abstract_params if isinstance(abstract_params, Mapping) else dict(abstract_params))
    fresh = [tuple(p.strip("/").split("/")) for p in keep_fresh]
    wanted = {k: v for k, v in target.items() if not any(k[:len(f)] == f for f in fresh)}
    name = "/".join
    missing = [name(k) for k in wanted if k not in source]
    mismatched = [f"{name(k)}: checkpoint {tuple(source[k])} vs this model {tuple(v.shape)}"
                  for k, v in wanted.items() if k in source and tuple(source[k]) != tuple(v.shape)]
    if missing or mismatched:
        lines = [f"  missing in checkpoint: {m}" for m in missing[:10]]
        lines += [f"  ... and {len(missing) - 10} more missing"] if len(missing) > 10 else []
        lines += [f"  shape differs: {m}" for m in mismatched[:10]]
        lines += [f"  ... and {len(mismatched) - 10} more shape differences"] if len(mismatched) > 10 else []
        raise ConfigError(
            f"{field}={path!r}: the parameters in {step_dir} do not fit this model:\n" + "\n".join(lines) +
            f"\nCompare the model sections of the two configs (the source's is in {step_dir}/config/metadata; "
            f"e.g. model preset, vocab_size, scan_layers), or list new leaves in train.init_from_fresh.")
    extra = sorted(name(k) for k in source if k not in target)
    if extra:
        logging.info("init_from: ignoring %d checkpoint params this model does not have: %s", len(extra), extra[:5])
    return step_dir, wanted


def load_params(path: str, abstract_params, *, keep_fresh: Sequence[str] = (), field: str = "train.init_from",
                item_key: str = "params"):
    """Parameters of the checkpoint at ``path`` for the leaves of ``abstract_params`` (ShapeDtypeStructs
    with shardings; restored directly into those shardings and dtypes).

    Leaves under a '/'-joined prefix in ``keep_fresh`` (e.g. ``"score"`` for a reward head on a pretrained
    decoder) are not loaded and are absent from the result. Every other leaf must exist in the source with
    the same shape (``fitting_params``); source leaves the target does not have are ignored (logged).
    Returns a flat dict {path tuple: array}.
    """
    step_dir, wanted = fitting_params(path, abstract_params, keep_fresh=keep_fresh, field=field, item_key=item_key)
    item = {item_key: unflatten(wanted)}
    try:
        with _quiet_abandoned_reads(step_dir):
            restored = ocp.PyTreeCheckpointer().restore(
                step_dir / "state", args=ocp.args.PyTreeRestore(
                    item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    except Exception as e:  # noqa: BLE001 — a truncated or deleted file
        raise CheckpointError(f"{field}={path!r}: the checkpoint {step_dir} is damaged ({_first_line(e)}); give "
                              f"another checkpoint of that run (a step directory under checkpoints/)") from None
    logging.info("init_from: loaded %d parameter arrays from %s", len(wanted), step_dir)
    return flatten(restored[item_key])


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
