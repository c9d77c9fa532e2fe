"""Checkpoints of a training run: one orbax CheckpointManager per run directory.

Layout of `<workdir>/checkpoints/<step>/`, one orbax item per entry:

  <name>/          one per component the caller passes ("unet", "vae", "opt_state", "ema" ...)
  rng/             the training PRNG key (key data; typed keys come back typed)
  config/          the run's configuration as JSON
  data_iterator/   the grain iterator state, one JSON file per process (grain's orbax handler)
  meta/            which of the above exist, so a checkpoint can be read back without guessing

Saves are asynchronous: `save` returns once the arrays have been copied off the
devices (so the caller may donate or overwrite them), files are written in a
background thread. Orbax's CheckpointManager writes each step into
`<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only when every item is
complete, so a crash mid-save leaves the earlier checkpoints untouched; it deletes
such temporary directories when it next opens the directory (before its first save).
As a second guard against step directories copied only in part, only steps holding
orbax's `commit_success.txt` count as complete. A save that fails (a full disk)
removes its partial files at once, so that the space is free again.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CHECKPOINT_SUBDIR = "checkpoints"
_COMMIT_FILE = "commit_success.txt"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_RESERVED_ITEMS = ("meta", "rng", "config", "data_iterator")
_FORMAT_VERSION = 1


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed; the earlier checkpoints are left as they were."""


class CheckpointMismatchError(ValueError):
  """The checkpoint's items, keys or shapes differ from the requested ones."""


@dataclasses.dataclass
class RestoredCheckpoint:
  """What `Checkpointer.restore` returns."""
  step: int
  items: dict[str, Any]           # item name -> pytree of arrays, sharded as requested
  rng: jax.Array | None = None    # the saved PRNG key (typed if it was saved typed)
  config: dict | None = None      # the saved configuration (plain JSON types)


# ---------------------------------------------------------------------- helpers


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'a/b/0/c' -> shape, for array trees and for orbax metadata trees alike.

  Orbax stores tuples as lists and namedtuples as dicts; joining every key as a
  plain string makes both spellings of a path compare equal.
  """
  is_leaf = lambda x: hasattr(x, "shape") and not isinstance(x, (Mapping, list, tuple))
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {"/".join(_key_str(k) for k in path): tuple(np.shape(x)) for path, x in flat}


def _structure_errors(name: str, saved: Any, wanted: Any) -> list[str]:
  saved_shapes, wanted_shapes = _flat_shapes(saved), _flat_shapes(wanted)
  errors = []
  for key in sorted(wanted_shapes.keys() & saved_shapes.keys()):
    if saved_shapes[key] != wanted_shapes[key]:
      errors.append(f"{name}/{key}: checkpoint shape {saved_shapes[key]} != "
                    f"expected shape {wanted_shapes[key]}")
  for key in sorted(wanted_shapes.keys() - saved_shapes.keys()):
    errors.append(f"{name}/{key}: missing from the checkpoint (expected shape "
                  f"{wanted_shapes[key]})")
  for key in sorted(saved_shapes.keys() - wanted_shapes.keys()):
    errors.append(f"{name}/{key}: in the checkpoint (shape {saved_shapes[key]}) but not "
                  "expected")
  return errors


def _replicated_sharding() -> NamedSharding:
  """A copy on every device (of every process): the default when no sharding is asked."""
  return NamedSharding(Mesh(np.asarray(jax.devices()), ("devices",)), PartitionSpec())


def _with_sharding(x: Any) -> Any:
  """Restore target for one leaf: keeps the caller's sharding, else replicates."""
  sharding = getattr(x, "sharding", None)
  if isinstance(x, np.ndarray) or not hasattr(x, "shape"):
    return x  # numpy leaves restore as numpy; scalars as scalars
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or _replicated_sharding())


def _replicated_like(saved_tree: Any) -> Any:
  """Restore targets for a metadata tree: the saved shapes and dtypes, replicated."""
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_replicated_sharding()),
      saved_tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)  # dtypes, callables, paths: kept for the record, not for round trips


def _config_to_json(config: Any) -> Any:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    config = config.to_dict()
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  return json.loads(json.dumps(config, default=_json_default))


def _is_no_space(err: BaseException) -> bool:
  """ENOSPC anywhere in the exception chain (OSError, or tensorstore's error text)."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
      return True
    text = str(err)
    if "No space left on device" in text or "os_error_code='28'" in text:
      return True
    err = err.__cause__ or err.__context__
  return False


# ------------------------------------------------------------------ checkpointer


class Checkpointer:
  """Saves and restores the components of a training run.

  Example::

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=3,
                        save_interval_steps=1000)
    if ckpt.latest_step() is not None:
      restored = ckpt.restore(abstract_items={"unet": abstract_params, ...},
                              data_iterator=train_iter)
    ...
    ckpt.save(step, {"unet": params, "opt_state": opt_state, "ema": ema},
              rng=rng, data_iterator=train_iter, config=config)
    ...
    ckpt.close()
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    """Opens (creating if needed) the checkpoint directory of one run.

    Args:
      directory: the checkpoint directory, by convention `<workdir>/checkpoints`.
      max_to_keep: newest checkpoints kept; older ones are deleted (None keeps all).
      save_interval_steps: `save` writes only at multiples of this (unless forced).
      async_save: write in a background thread.
    """
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # removes what a killed save left behind
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending_step: int | None = None  # step whose async write is in flight

  @classmethod
  def for_workdir(cls, workdir: str | os.PathLike, **kwargs) -> "Checkpointer":
    """The Checkpointer of the run in `workdir` (checkpoints in `<workdir>/checkpoints`)."""
    return cls(os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR), **kwargs)

  # ------------------------------------------------------------------- steps

  def _is_complete(self, step: int) -> bool:
    return (self.directory / str(step) / _COMMIT_FILE).exists()

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    steps = sorted(self._manager.all_steps())
    complete = [s for s in steps if self._is_complete(s)]
    incomplete = sorted(set(steps) - set(complete) - {self._pending_step})
    if incomplete:  # not the save in flight: something interrupted or copied partly
      logging.warning("ignoring incomplete checkpoint step directories %s in %s",
                      incomplete, self.directory)
    return complete

  def latest_step(self) -> int | None:
    """The newest complete step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # -------------------------------------------------------------------- save

  def save(self, step: int, items: Mapping[str, Any], *, rng: jax.Array | None = None,
           data_iterator: Any = None, config: Any = None, force: bool = False) -> bool:
    """Starts writing checkpoint `step` (if `save_interval_steps` allows it, or `force`).

    Args:
      step: the training step.
      items: item name -> pytree of arrays (params, optimizer state, EMA ...).
      rng: a PRNG key (typed or raw uint32) to restore with the checkpoint.
      data_iterator: a grain DatasetIterator / DataLoaderIterator; its state is
        recorded now, before `save` returns.
      config: the run configuration (ConfigDict, dataclass or dict), stored as JSON.
      force: save even when `step` is not a multiple of `save_interval_steps`.

    Returns:
      True when a save was started.

    Raises:
      CheckpointSaveError: this save, or the previous asynchronous one, failed.
    """
    for name in items:
      if name in _RESERVED_ITEMS or not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid checkpoint item name {name!r} (reserved: {_RESERVED_ITEMS})")
    self.wait()  # report a failure of the previous save before starting another
    if not force and not self._manager.should_save(step):
      return False

    meta = {"format": _FORMAT_VERSION, "items": sorted(items), "rng": None,
            "config": config is not None, "data_iterator": data_iterator is not None}
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    if rng is not None:
      # The key data as a plain array: orbax's JaxRandomKey handler logs an OCDBT warning at every save.
      typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
      meta["rng"] = {"typed": bool(typed), "impl": str(jax.random.key_impl(rng)) if typed else None}
      args["rng"] = ocp.args.StandardSave({"key_data": jax.random.key_data(rng) if typed else rng})
    if config is not None:
      args["config"] = ocp.args.JsonSave(_config_to_json(config))
    if data_iterator is not None:
      import grain  # registers grain's orbax handler

      args["data_iterator"] = grain.checkpoint.CheckpointSave(data_iterator)
    args["meta"] = ocp.args.JsonSave(meta)

    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as err:
      raise self._save_failed(step, err) from err
    if saved:
      self._pending_step = step
    return bool(saved)

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk.

    Raises:
      CheckpointSaveError: the pending save failed (its partial files are removed).
    """
    try:
      self._manager.wait_until_finished()
    except Exception as err:
      step, self._pending_step = self._pending_step, None
      raise self._save_failed(step, err) from err
    self._pending_step = None

  def _remove_unfinished(self, step: int, settle_s: float) -> None:
    """Deletes the temporary directory of the failed save of `step`.

    Writer threads of the other items may still be running and recreate files, so
    the directory is removed again until it has stayed gone for `settle_s` (at most
    ten times as long).
    """
    if jax.process_index() != 0 or not self.directory.exists():
      return
    deadline = time.monotonic() + 10 * settle_s
    gone_since = None
    while True:
      paths = list(self.directory.glob(f"{step}{_TMP_MARKER}*"))
      for path in paths:
        shutil.rmtree(os.fspath(path), ignore_errors=True)
      now = time.monotonic()
      gone_since = (gone_since or now) if not paths else None
      if settle_s <= 0 or now > deadline or (gone_since and now - gone_since >= settle_s):
        return
      time.sleep(settle_s / 4)

  def _save_failed(self, step: int | None, err: BaseException) -> CheckpointSaveError:
    """Removes the failed step's temporary files and builds an error that says what is safe."""
    if step is not None:
      self._remove_unfinished(step, settle_s=0.5)
    self._manager.reload()
    previous = self.latest_step()
    reason = ("no space left on device" if _is_no_space(err)
              else f"{type(err).__name__}: {err}")
    intact = (f"previous checkpoint at step {previous} is intact"
              if previous is not None else "no earlier checkpoint exists")
    return CheckpointSaveError(
        f"checkpoint save failed: {reason} (writing step {step} to {self.directory}); "
        f"{intact}")

  # ----------------------------------------------------------------- restore

  def _saved_tree(self, step: int, name: str) -> Any:
    """The metadata tree (shapes, dtypes) of one saved item, read without loading arrays."""
    metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / name)
    return getattr(metadata, "tree", metadata)

  def _resolve_step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    elif not self._is_complete(step):
      raise FileNotFoundError(
          f"no complete checkpoint for step {step} in {self.directory} "
          f"(complete steps: {self.all_steps()})")
    return step

  def _read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int | None = None, abstract_items: Mapping[str, Any] | None = None,
              *, data_iterator: Any = None) -> RestoredCheckpoint:
    """Reads a checkpoint back, each array placed on the sharding asked for.

    Args:
      step: the step to read; default the newest complete one.
      abstract_items: item name -> pytree of `jax.ShapeDtypeStruct`s (or arrays)
        whose `.sharding` says where each restored array goes; only these items are
        read; an item given as None comes back as saved, replicated on all
        devices. Default: every item, replicated.
      data_iterator: a grain iterator to put back in its saved state (in place).

    Raises:
      FileNotFoundError: no complete checkpoint (for that step).
      CheckpointMismatchError: an item, key or shape differs; the message lists
        every difference with both shapes.
    """
    self.wait()
    step = self._resolve_step(step)
    meta = self._read_meta(step)
    saved_items = meta["items"]
    wanted = dict(abstract_items) if abstract_items is not None else dict.fromkeys(saved_items)
    missing = sorted(set(wanted) - set(saved_items))
    if missing:
      raise CheckpointMismatchError(
          f"checkpoint at step {step} in {self.directory} has no item(s) {missing}; "
          f"it holds {saved_items}")

    saved_trees = {name: self._saved_tree(step, name) for name in wanted}
    errors = []
    for name, abstract in wanted.items():
      if abstract is not None:
        errors += _structure_errors(name, saved_trees[name], abstract)
    if errors:
      raise CheckpointMismatchError(
          f"checkpoint at step {step} in {self.directory} does not match the requested "
          "structure:\n  " + "\n  ".join(errors))

    args = {}
    for name, abstract in wanted.items():
      if abstract is None:
        abstract = _replicated_like(saved_trees[name])
      args[name] = ocp.args.StandardRestore(jax.tree.map(_with_sharding, abstract))
    if meta["rng"] is not None:
      args["rng"] = ocp.args.StandardRestore(_replicated_like(self._saved_tree(step, "rng")))
    if meta["config"]:
      args["config"] = ocp.args.JsonRestore()
    if data_iterator is not None:
      if not meta["data_iterator"]:
        raise CheckpointMismatchError(
            f"checkpoint at step {step} in {self.directory} holds no data iterator state")
      import grain  # registers grain's orbax handler

      args["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)

    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    rng = None
    if meta["rng"] is not None:
      rng = jnp.asarray(restored["rng"]["key_data"])
      if meta["rng"]["typed"]:
        rng = jax.random.wrap_key_data(rng, impl=meta["rng"]["impl"])
    return RestoredCheckpoint(
        step=step, items={name: restored[name] for name in wanted}, rng=rng,
        config=restored["config"] if meta["config"] else None)

  # -------------------------------------------------------------- lifetime

  def close(self) -> None:
    """Waits for the pending save and releases the manager."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
