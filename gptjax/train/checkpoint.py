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
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gptjax.errors import ConfigError

CKPT_DIR = "checkpoints"
ITEMS = ("state", "data_iter", "config", "extras")


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


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for ``WORKDIR/checkpoints``."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None, create=True,
            cleanup_tmp_directories=True,  # delete what a killed save left behind
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return self.manager.all_steps()

    def save(self, step: int, state, *, data_state, config: Mapping, extras: Mapping | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data_iter=DataIterSave(data_state),
                                  config=ocp.args.JsonSave(dict(config)), extras=ocp.args.JsonSave(dict(extras or {})))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state) -> Restored:
        """``abstract_state``: ShapeDtypeStructs carrying the target shardings (see state.abstract_state)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data_iter=DataIterRestore(),
                                  config=ocp.args.JsonRestore(), extras=ocp.args.JsonRestore())
        r = self.manager.restore(step, args=args)
        return Restored(r.state, r.data_iter, dict(r.config), dict(r.extras))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def finished_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints under WORKDIR/checkpoints (an interrupted save has no plain <step> dir)."""
    directory = os.path.join(workdir, CKPT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state")))


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


def checkpoint_config(path: str) -> dict:
    """The run config stored with the checkpoint at ``path`` (any form accepted by resolve_checkpoint_dir)."""
    step_dir = resolve_checkpoint_dir(path)
    return json.loads((step_dir / "config" / "metadata").read_text())


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


def load_params(path: str, abstract_params, *, keep_fresh: Sequence[str] = (), field: str = "train.init_from",
                item_key: str = "params"):
    """Parameters of the checkpoint at ``path`` for the leaves of ``abstract_params`` (ShapeDtypeStructs
    with shardings; restored directly into those shardings and dtypes).

    Leaves under a '/'-joined prefix in ``keep_fresh`` (e.g. ``"score"`` for a reward head on a pretrained
    decoder) are not loaded and are absent from the result. Every other leaf must exist in the source with
    the same shape; source leaves the target does not have are ignored (logged).
    Returns a flat dict {path tuple: array}.
    """
    step_dir = resolve_checkpoint_dir(path, field)
    meta = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state")
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
    item = {item_key: unflatten(wanted)}
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir / "state", args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    logging.info("init_from: loaded %d parameter arrays from %s", len(wanted), step_dir)
    return flatten(restored[item_key])
