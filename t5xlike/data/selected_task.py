"""A data selection as a cached task that MIXTURE_OR_TASK_NAME names.

(`python -m t5xlike.precompute_reference` writes its scored copy of a preference
task in the same format: every example selected, score 'reference_logp', each
example with the reference's two log-likelihoods added.)

`python -m t5xlike.select_data` writes a selection NAME into a task cache
directory OUT (train on it with USE_CACHED_TASKS=True, TASK_CACHE_DIR=OUT):

  OUT/NAME/selection.json  the manifest, written last: without it there is no
                           selection. Fields: format, format_version, id, name,
                           source (the task or mixture selected from), module
                           (its MIXTURE_OR_TASK_MODULE), split, score, order, k,
                           num_examples, num_selected, checkpoint, step, seed,
                           feature_lengths, tasks ([{name, source, examples,
                           selected, splits}]), mixture (bool), seconds.
  OUT/NAME/scores.jsonl    one row per example of the source split, in source
                           order (`runs/select_data_run.py` says its fields).
  OUT/<task>/<split>/      a task cache (`task_cache`) per selected task: the
                           selected split holds the chosen examples in source
                           order, the other splits (validation) are copies.

A task source gives one task NAME. A mixture gives the mixture NAME of the
tasks `NAME.<source task>` that kept at least one example, at rates equal to
their selected counts (every selected example as likely as any other, as in
a pool).

Registered on read: `register(NAME, OUT)` (called by
`task_examples.leaf_tasks` with TASK_CACHE_DIR, i.e. by training, evaluation
and inference before they look a name up) imports the source's module and
registers each selected task as its source task (`seqio.Task.replace`: output
features, metric functions, postprocessing, post-cache EOS) without
preprocessors before the cache (the cache holds the source's preprocessed
examples) and with a source that refuses to be read: a selection is its cache,
so USE_CACHED_TASKS=False names the fix.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seqio
from etils import epath

from t5xlike import errors
from t5xlike.data import seqio_tasks, task_cache

FORMAT = "t5xlike.selection"
FORMAT_VERSION = 1
MANIFEST = "selection.json"
SCORES = "scores.jsonl"
_NAME = re.compile(r"^[\w.:]+$")  # seqio's task names, less '#'.

log = logging.getLogger(__name__)
# name -> (manifest path, manifest id) of the selections this process registered.
_REGISTERED: dict[str, tuple[str, str]] = {}


@dataclasses.dataclass
class SelectedTask:
  """One task of a selection, as written.

  Attributes:
    source: the source task's name.
    splits: {split: examples in the `sources` format (before EOS)}: the selected
      split's chosen examples, and copies of other splits.
    examples: the number of examples of the selected split in the source.
    eos_features: the features that get EOS after trimming.
  """
  source: str
  splits: dict[str, list[dict[str, np.ndarray]]]
  examples: int
  eos_features: tuple[str, ...]


def task_name(name: str, source: str, mixture: bool) -> str:
  """The name of the selected task from `source`: NAME, or NAME.<source> in a mixture."""
  return f"{name}.{source}" if mixture else name


def is_registered(name: str) -> bool:
  """Whether seqio knows a task or mixture of this name."""
  return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


def check_name(name: str | None, sources: Sequence[str]) -> str:
  """The selection's name, or a ConfigError: a seqio name that no task or mixture of
  this process owns (a selection registered earlier may be rewritten)."""
  if not name:
    raise errors.ConfigError("--name is required: the task name the selection is written as")
  if not _NAME.match(name):
    raise errors.ConfigError(f"--name={name!r}: use letters, digits, '_', '.' and ':' only "
                             f"(a seqio task name)")
  for taken in [name, *(f"{name}.{source}" for source in sources)]:
    if is_registered(taken) and taken not in _registered_tasks():
      raise errors.ConfigError(f"--name={name!r}: {taken!r} is already a registered task or "
                               f"mixture; choose another name")
  return name


def _registered_tasks() -> set[str]:
  names = set(_REGISTERED)
  for name in _REGISTERED:
    if name in seqio.MixtureRegistry.names():
      names |= {task.name for task in seqio.MixtureRegistry.get(name).tasks}
  return names


def _features(example: Mapping[str, np.ndarray]) -> dict[str, bool]:
  """{feature: is a token feature}: integer rank-1 arrays are tokens (`sources`' format)."""
  return {key: value.ndim == 1 and np.issubdtype(value.dtype, np.integer)
          for key, value in example.items()}


def write(name: str, output_dir: str | epath.PathLike, tasks: Sequence[SelectedTask], *,
          split: str, mixture: bool, manifest: Mapping[str, Any]) -> dict[str, Any]:
  """Writes the caches of a selection's tasks, then its manifest; returns the manifest.

  Args:
    name: the selection's name (`check_name`).
    output_dir: the task cache directory written into.
    tasks: the selected tasks in source order (a task without a selected example is
      left out).
    split: the selected split (the other splits of `tasks` are copies).
    mixture: whether the source is a mixture (task names NAME.<source task>).
    manifest: the manifest's other fields (source, module, score, k, ...).
  """
  root = epath.Path(output_dir)
  written = []
  for task in tasks:
    selected = task.splits[split]
    if not selected:
      log.info("selection %s: no example of %s chosen: left out", name, task.source)
      continue
    leaf = task_name(name, task.source, mixture)
    for each, examples in task.splits.items():
      task_cache.write_examples(leaf, each, examples, root, features=_features(examples[0]),
                                eos_features=task.eos_features, precache_preprocessors=[],
                                progress=False)
    written.append({"name": leaf, "source": task.source, "examples": task.examples,
                    "selected": len(selected), "splits": sorted(task.splits)})
  if not written:
    raise ValueError(f"selection {name}: no example chosen")
  record = {"format": FORMAT, "format_version": FORMAT_VERSION, "id": uuid.uuid4().hex[:12],
            "name": name, "split": split, **manifest, "mixture": mixture, "tasks": written}
  path = root / name / MANIFEST
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / f".{path.name}.incomplete"
  temporary.write_text(json.dumps(record, indent=2) + "\n")
  temporary.replace(path)  # Last: a reader sees the whole selection or none.
  return record


def read_manifest(name: str, cache_dir: str | epath.PathLike) -> dict[str, Any] | None:
  """The manifest of selection `name` in `cache_dir`, None when there is none; ValueError
  for another format."""
  path = epath.Path(cache_dir) / name / MANIFEST
  try:
    record = json.loads(path.read_text())
  except (FileNotFoundError, NotADirectoryError):
    return None
  if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} is not a t5xlike selection of format {FORMAT} version "
                     f"{FORMAT_VERSION}: rewrite it with python -m t5xlike.select_data")
  return record


def _cache_only(split: str, shuffle_files: bool, seed: int | None = None, *, name: str,
                cache_dir: str) -> Any:
  """The dataset_fn of a selected task: a selection exists only as its cache."""
  del split, shuffle_files, seed
  raise ValueError(f"task {name!r} is a data selection (python -m t5xlike.select_data) "
                   f"and is read from its task cache only: set USE_CACHED_TASKS=True and "
                   f"TASK_CACHE_DIR={cache_dir}")


def register(name: str, cache_dir: str | epath.PathLike) -> bool:
  """Registers the selection `name` written in `cache_dir`, if there is one and seqio
  does not already know the name as something else; whether it is registered now.

  Registering again after the selection was rewritten replaces the registration.
  ValueError (one line) when its source module or tasks are missing.
  """
  record = read_manifest(name, cache_dir)
  if record is None:
    return False
  key = (str(epath.Path(cache_dir) / name / MANIFEST), record["id"])
  if _REGISTERED.get(name) == key:
    return True
  if is_registered(name) and name not in _REGISTERED:
    log.warning("%s in %s is a selection, but a task or mixture of that name is registered: "
                "using the registered one", name, cache_dir)
    return False
  _unregister(name)
  if record.get("module"):
    try:
      importlib.import_module(record["module"])
    except ImportError as error:
      raise ValueError(f"selection {name}: its source module {record['module']!r} cannot be "
                       f"imported: {errors.one_line(error)}") from None
  tasks = []
  for entry in record["tasks"]:
    source = seqio_tasks.resolve_task(entry["source"])
    dataset_fn = functools.partial(_cache_only, name=entry["name"], cache_dir=str(cache_dir))
    task = source.replace(
        name=entry["name"],
        source=seqio.FunctionDataSource(dataset_fn, splits=entry["splits"]),
        preprocessors=[seqio.CacheDatasetPlaceholder(),
                       *seqio_tasks.split_preprocessors(source)[1]])
    seqio.TaskRegistry.add_provider(entry["name"], task)
    tasks.append((entry["name"], entry["selected"]))
  if record["mixture"]:
    seqio.MixtureRegistry.add(name, tasks)
  _REGISTERED[name] = key
  log.debug("registered the selection %s from %s: %s", name, cache_dir,
            ", ".join(f"{task} ({count})" for task, count in tasks))
  return True


def _unregister(name: str) -> None:
  """Removes an earlier registration of the selection `name` (and its tasks)."""
  if name not in _REGISTERED:
    return
  if name in seqio.MixtureRegistry.names():
    for task in seqio.MixtureRegistry.get(name).tasks:
      seqio.TaskRegistry.remove(task.name)
    seqio.MixtureRegistry.remove(name)
  elif name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  del _REGISTERED[name]
