"""Orbax checkpoints: `MODEL_DIR/checkpoint_<N>/{state,data}`.

`state` holds the train state (step, params, optimizer state, RNG) through
orbax's StandardCheckpointHandler, restored straight into the target
shardings; `data` holds the data iterator's state as JSON. Orbax writes
each step into a temporary directory and renames it when complete, so a
crash during a save never leaves a step that `latest_step()` would return.

`Checkpointer.restore_latest` falls back from a corrupt or truncated newest
step to the previous complete one (warning with the step number; the broken
directory is moved to `MODEL_DIR/corrupt/`), or raises with `strict=True`.
A save that fails with an OSError (disk full) raises `CheckpointSaveError`
(one line, exit code 1); the steps saved before stay restorable.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from t5xlike import errors

log = logging.getLogger(__name__)

STEP_PREFIX = "checkpoint"
CORRUPT_DIR = "corrupt"


class CheckpointSaveError(errors.RunError):
  """Writing a checkpoint failed (e.g. ENOSPC); earlier checkpoints are intact."""


class CorruptCheckpoint(errors.RunError):
  """The newest checkpoint cannot be read and `strict` restore was asked for."""


def step_dir(model_dir: str | epath.Path, step: int) -> epath.Path:
  return epath.Path(model_dir) / f"{STEP_PREFIX}_{step}"


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for a tree of jax arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:
  """Saves and restores train state plus data state under one MODEL_DIR.

  Args:
    model_dir: the run's directory; step directories are `checkpoint_<N>`.
    keep: number of newest checkpoints kept (None keeps all).
    async_save: write in a background thread while training continues.
    before_save: called with the step before each save (tests inject a full disk
      there: `training.fault_hooks`); None in production.
  """

  def __init__(self, model_dir: str | epath.Path, keep: int | None = 3, async_save: bool = True,
               before_save: Callable[[int], None] | None = None):
    self.directory = epath.Path(model_dir)
    self._before_save = before_save
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, step_prefix=STEP_PREFIX, enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    """Starts saving `step` (returns before an async write completes).

    Raises:
      CheckpointSaveError: the write failed (this step's or, async, the previous one's).
    """
    try:
      if self._before_save is not None:
        self._before_save(step)
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))),
          force=True)
    except OSError as error:
      raise self._save_error(step, error) from error

  def _save_error(self, step: int, error: OSError) -> CheckpointSaveError:
    kept = [s for s in self.all_steps() if s != step]
    return CheckpointSaveError(
        f"saving {step_dir(self.directory, step)} failed: {error.strerror or error} "
        f"(free space or fix {self.directory}, then rerun the same command: it resumes from "
        f"{f'checkpoint_{max(kept)}' if kept else 'the start'})")

  def restore_latest(self, abstract_state: Any, strict: bool = False
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data_state) of the newest readable checkpoint, None when none exists.

    A step that fails to restore (truncated or corrupt files) is logged as
    corrupt by number, moved to `MODEL_DIR/corrupt/checkpoint_<N>` (process 0;
    orbax would otherwise keep reporting it as the latest step and refuse to
    save that step again) and the previous step is tried; with `strict` the
    first failure raises CorruptCheckpoint instead (nothing is moved).
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        with quiet_failed_reads():
          return (step, *self.restore(step, abstract_state))
      except Exception as error:  # noqa: BLE001  (a corrupt step fails in many ways)
        reason = f"{type(error).__name__}: {errors.one_line(error)}"
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        if strict:
          raise CorruptCheckpoint(
              f"{step_dir(self.directory, step)} is corrupt ({reason}); restore_strict=True "
              f"forbids falling back (move it aside to resume from the previous one)") from None
        where = self._move_aside(step)
        log.warning("checkpoint step %d is corrupt (%s): moved to %s; falling back to the "
                    "previous checkpoint", step, reason, where)
    return None

  def _move_aside(self, step: int) -> epath.Path:
    """Moves the corrupt `step` to MODEL_DIR/corrupt/ (process 0); returns where it went."""
    target = self.directory / CORRUPT_DIR / f"{STEP_PREFIX}_{step}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target = target.parent / f"{STEP_PREFIX}_{step}.{time.time_ns()}"
      step_dir(self.directory, step).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"t5xlike_corrupt_checkpoint_{step}")
    self._manager.reload()
    return target

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Returns (state, data_state) of `step`, laid out as `abstract_state` says."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"] or {})

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except OSError as error:  # An async save that failed.
      raise self._save_error(self._manager.latest_step() or 0, error) from error

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


@contextlib.contextmanager
def quiet_failed_reads(drain_s: float = 1.0):
  """Silences file descriptor 2 while a checkpoint is read (a restore, or its metadata
  during validation); when the read fails, also for `drain_s` seconds after it:
  tensorstore's outstanding reads of a corrupt step complete into orbax's closed
  event loop and print 'RuntimeError: Event loop is closed' tracebacks, noise
  around the one line that reports the corrupt step."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  except BaseException:
    time.sleep(drain_s)
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def step_dirs(model_dir: str | epath.Path) -> list[tuple[int, epath.Path]]:
  """(step, directory) of MODEL_DIR's finalised step directories, newest first (read from
  the file system: no CheckpointManager, nothing created)."""
  model_dir = epath.Path(model_dir)
  if not model_dir.is_dir():
    return []
  found = []
  for path in model_dir.glob(f"{STEP_PREFIX}_*"):
    number = path.name[len(STEP_PREFIX) + 1:]
    if number.isdigit() and (path / "state").exists():
      found.append((int(number), path))
  return sorted(found, reverse=True)


def validate_step_dir(path: str | epath.Path) -> epath.Path:
  """Checks that `path` is a complete t5xlike step directory (`.../checkpoint_<N>`, or
  any directory holding `state`, such as a converted model's `OUT/checkpoint`)."""
  path = epath.Path(path)
  if not path.exists():
    raise ValueError(f"{path} does not exist")
  if not (path / "state").exists():
    raise ValueError(f"{path} is not a t5xlike checkpoint step directory (no 'state' inside); "
                     f"name a directory like MODEL_DIR/{STEP_PREFIX}_<N>")
  return path


def restore_state_from_path(path: str | epath.Path, abstract_state: Any) -> Any:
  """Restores the train state of a step directory such as INITIAL_CHECKPOINT_PATH."""
  path = validate_step_dir(path)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path / "state", abstract_state)


def restore_data_state_from_path(path: str | epath.Path) -> dict[str, Any]:
  """The data position saved beside a step directory's train state (its `data` item:
  the feed's JSON state, e.g. {'iterator': {'next_index': 400}, ...})."""
  path = validate_step_dir(path)
  if not (path / "data").exists():
    raise ValueError(f"{path} holds no data position (no 'data' inside)")
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    return dict(checkpointer.restore(path / "data") or {})


LeafShapes = dict[str, tuple[tuple[int, ...], str]]


def leaf_shapes(tree: Any) -> LeafShapes:
  """{path: (shape, dtype)} of a tree's leaves, the path spelled by key names only
  ('1/v_row/encoder/...'): the same for a live optimizer state (tuples, namedtuples) and
  its orbax metadata (lists, dicts), whose flattening orders differ (orbax stores a
  namedtuple as a dict with sorted keys)."""
  def name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {"/".join(name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_leaf_shapes(path: str | epath.Path, subtree: str, item: str = "state") -> LeafShapes:
  """`leaf_shapes` of one subtree (e.g. 'opt_state') of a saved item, read from orbax
  metadata (no array is loaded)."""
  return leaf_shapes(item_metadata(validate_step_dir(path) / item).get(subtree, {}))


def item_metadata(directory: str | epath.Path) -> dict[str, Any]:
  """The metadata tree (shapes and dtypes, no array loaded) of one saved item, such as
  `checkpoint_<N>/state`. Read through the item's handler: `StandardCheckpointer.metadata`
  would also look for step metadata inside the item directory and warn 'Metadata file
  does not exist' (it lives one level up)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return dict(handler.metadata(epath.Path(directory)).tree)
  finally:
    handler.close()


def restore_params_from_path(path: str | epath.Path, abstract_params: Any,
                             abstract_step: Any) -> tuple[Any, Any]:
  """(params, step) of a step directory, leaving the rest of its state unread.

  Used when the checkpoint's optimizer state belongs to another optimizer
  (e.g. a sparse run's masks when dense fine-tuning starts from it).
  """
  path = validate_step_dir(path)
  item = {"params": abstract_params, "step": abstract_step}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  return restored["params"], restored["step"]


def save_params(path: str | epath.Path, step: int, params: Any) -> epath.Path:
  """Writes `{step, params}` as a step directory `path/checkpoint_<step>/state`.

  For parameters exported from a run (e.g. ELECTRA's discriminator): a run
  given it as INITIAL_CHECKPOINT_PATH restores the parameters and the step
  and starts a fresh optimizer state.
  """
  return save_params_at(step_dir(path, step), step, params)


def save_params_at(directory: str | epath.Path, step: int, params: Any) -> epath.Path:
  """Writes `{step, params}` as the step directory `directory` (`directory/state`),
  whatever its name (e.g. a converted model's `OUT/checkpoint`)."""
  directory = epath.Path(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "state", {"step": jax.numpy.asarray(step, jax.numpy.int32),
                                            "params": params})
    checkpointer.wait_until_finished()
  return directory


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} of the leaves of a nested-dict tree (arrays, ShapeDtypeStructs,
  orbax metadata; `nn.LogicallyPartitioned` boxes are leaves with their value's shape)."""
  boxed = lambda x: hasattr(x, "unbox") and hasattr(x, "names")
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=boxed)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path):
          tuple(getattr(leaf, "value", leaf).shape) for path, leaf in leaves}


#: In a PEFT step directory (`finetuning.peft_checkpoint`): its base checkpoint and method.
PEFT_FILE = "peft.json"


def peft_info(path: str | epath.Path) -> dict[str, Any] | None:
  """The parsed `peft.json` of a step directory; None for an ordinary checkpoint."""
  file = epath.Path(path) / PEFT_FILE
  return json.loads(file.read_text()) if file.exists() else None


def checkpoint_chain(path: str | epath.Path) -> list[epath.Path]:
  """[path, its base, the base's base, ...]: a PEFT checkpoint holds only its trained
  parameters and names its base (`peft.json`); an ordinary one ends the chain."""
  chain = [validate_step_dir(path)]
  while (info := peft_info(chain[-1])) is not None and info.get("base_checkpoint"):
    chain.append(validate_step_dir(info["base_checkpoint"]))
    if len(chain) > 16:
      raise ValueError(f"{path}: PEFT checkpoints name each other in a loop")
  return chain


def own_param_shapes(path: str | epath.Path) -> dict[str, tuple[int, ...]]:
  """`flat_shapes` of the parameters saved in this step directory itself (a PEFT
  checkpoint: its trained parameters only), from orbax metadata."""
  return flat_shapes(item_metadata(validate_step_dir(path) / "state").get("params", {}))


def saved_param_shapes(path: str | epath.Path) -> dict[str, tuple[int, ...]]:
  """`flat_shapes` of the parameters of a step directory, from orbax metadata
  (no array is loaded); for a PEFT checkpoint those of its base chain too."""
  shapes: dict[str, tuple[int, ...]] = {}
  for source in reversed(checkpoint_chain(path)):
    shapes.update(own_param_shapes(source))
  return shapes


def check_param_shapes(path: str | epath.Path,
                       wanted: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """The saved parameter shapes of a step directory (`saved_param_shapes`), checked
  against a model's `{path: shape}` (`flat_shapes`).

  Raises:
    ValueError: a shared parameter path with another shape (naming the path and
      both shapes), or no parameter path in common.
  """
  saved = saved_param_shapes(path)
  mismatched = [f"{name}: checkpoint {saved[name]} vs model {shape}"
                for name, shape in wanted.items() if name in saved and saved[name] != shape]
  if mismatched:
    raise ValueError(f"{path} does not fit the model: {'; '.join(mismatched[:3])}"
                     f"{f' (and {len(mismatched) - 3} more)' if len(mismatched) > 3 else ''}")
  if not set(saved) & set(wanted):
    raise ValueError(f"{path} shares no parameter with the model (checkpoint: "
                     f"{', '.join(sorted(saved)[:4])}, ...; model: "
                     f"{', '.join(sorted(wanted)[:4])}, ...; scanned and unscanned layers "
                     f"differ in their paths)")
  return saved


def restore_matching_params(path: str | epath.Path,
                            abstract_params: Any) -> tuple[dict[str, Any], list[str]]:
  """Restores the parameters of `abstract_params` that a step directory holds.

  For a run whose parameter tree extends the checkpoint's: a task head on a
  pretrained body (ELECTRA's discriminator {embedder, encoder, binary_head}
  -> a classifier {embedder, encoder, classifier}), adapters or LoRA on a
  pretrained model. Parameters are matched by path ('encoder/layers_0/mlp/
  wi/kernel'); the checkpoint's other parameters (here `binary_head`) are
  left unread (orbax partial restore) and logged.

  Args:
    path: a step directory (`.../checkpoint_<N>`, with `state/` holding `params`).
    abstract_params: the run's parameters: a nested dict of ShapeDtypeStructs
      (with shardings, as in the abstract train state) or arrays.
  Returns:
    (the restored parameters: the subtree of `abstract_params` present in the
    checkpoint (a PEFT checkpoint: its base chain's parameters with its own laid
    over them, `checkpoint_chain`), laid out and sharded as `abstract_params` says; the sorted
    paths of `abstract_params` absent from the checkpoint).
  Raises:
    ValueError: a shared path with another shape (naming the path and both
      shapes), or no parameter in common.
  """
  path = validate_step_dir(path)
  saved = check_param_shapes(path, flat_shapes(abstract_params))
  wanted = {"/".join(str(getattr(k, "key", k)) for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  unused = sorted(set(saved) - set(wanted))
  if unused:
    log.info("%d checkpoint parameter(s) not in the model, not restored: %s", len(unused),
             ", ".join(unused))
  restored: dict[str, Any] = {}
  for source in reversed(checkpoint_chain(path)):  # A PEFT checkpoint's base first.
    own = own_param_shapes(source)
    shared = {name: checkpoint_abstract(leaf) for name, leaf in wanted.items() if name in own}
    if not shared:
      continue
    item = {"params": traverse_util.unflatten_dict(shared, sep="/")}
    with ocp.PyTreeCheckpointer() as checkpointer:
      out = checkpointer.restore(source / "state", args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
    flat = jax.tree_util.tree_flatten_with_path(out["params"])[0]
    restored.update({"/".join(str(getattr(k, "key", k)) for k in p): leaf for p, leaf in flat})
  return traverse_util.unflatten_dict(restored, sep="/"), sorted(set(wanted) - set(saved))


def checkpoint_abstract(leaf: Any) -> jax.ShapeDtypeStruct:
  """A ShapeDtypeStruct (with the sharding, where the leaf has one) to restore `leaf` into."""
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))


def restore_step(path: str | epath.Path) -> jax.Array:
  """The int32 step saved in a step directory (nothing else is read)."""
  path = validate_step_dir(path)
  item = {"step": jax.ShapeDtypeStruct((), jax.numpy.int32)}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  return restored["step"]
