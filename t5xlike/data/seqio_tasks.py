"""seqio tasks and their preprocessors: lookup, names, and the deterministic / post-cache split.

A task's *deterministic preprocessors* are everything before
`seqio.CacheDatasetPlaceholder()` in `task.preprocessors`; a task without a
placeholder is split at its first preprocessor that takes a `seed`/`seeds`
argument or appends EOS (`split_preprocessors`). After the split t5xlike
accepts only `seqio.preprocessors.append_eos` / `append_eos_after_trim`,
whose work (EOS on `[k for k, f in task.output_features.items() if
f.add_eos]`) its pipeline does itself after trimming
(`check_postcache_preprocessors`). No TensorFlow is run here: reading a split
is `t5xlike.data.task_datasets`.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any

import seqio

OBJECTIVE_HINT = ("t5xlike draws per-example randomness in objectives (train_run.train.objective, "
                  "e.g. span_corruption.SpanCorruption / ul2.UL2)")
EOS_PREPROCESSORS = (seqio.preprocessors.append_eos, seqio.preprocessors.append_eos_after_trim)


# -- tasks ----------------------------------------------------------------------
def get_task(name: str) -> seqio.Task | seqio.Mixture:
  """The registered seqio task or mixture, or a ValueError naming the known ones."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(f"unknown task or mixture {name!r}; {hint}registered: "
                     f"{', '.join(known) or 'none (is MIXTURE_OR_TASK_MODULE right?)'}") from None


def resolve_task(task_or_name: seqio.Task | str) -> seqio.Task:
  """A seqio task from itself or its name; a mixture is refused (open its tasks)."""
  task = get_task(task_or_name) if isinstance(task_or_name, str) else task_or_name
  if isinstance(task, seqio.Mixture):
    raise ValueError(f"{task.name!r} is a mixture; open each of its tasks "
                     f"({', '.join(t.name for t in task.tasks)})")
  return task


# -- preprocessors --------------------------------------------------------------
def preprocessor_name(preprocessor: Any) -> str:
  """seqio's name of a preprocessor (the function's, through functools.partial)."""
  return seqio.utils.function_name(preprocessor)


def unwrap_partial(preprocessor: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
  """(the function inside nested functools.partials, their positional args, keywords)."""
  args: tuple[Any, ...] = ()
  keywords: dict[str, Any] = {}
  while isinstance(preprocessor, functools.partial):
    args, keywords = preprocessor.args + args, {**preprocessor.keywords, **keywords}
    preprocessor = preprocessor.func
  return preprocessor, args, keywords


def seed_argument(preprocessor: Any) -> str | None:
  """'seed' or 'seeds' when the preprocessor takes one (seqio's random convention)."""
  try:
    parameters = inspect.signature(preprocessor).parameters
  except (TypeError, ValueError):
    return None
  return next((arg for arg in ("seeds", "seed") if arg in parameters), None)


def is_eos(preprocessor: Any) -> bool:
  """Whether the preprocessor is seqio's `append_eos` or `append_eos_after_trim`."""
  return unwrap_partial(preprocessor)[0] in EOS_PREPROCESSORS


def split_preprocessors(task: seqio.Task) -> tuple[list[Any], list[Any]]:
  """(deterministic part, the rest) of `task.preprocessors`.

  With a `CacheDatasetPlaceholder` the split is at the placeholder (seqio's
  pre-cache/post-cache); without one, at the first preprocessor that takes
  `seed`/`seeds` or appends EOS.
  """
  preprocessors = list(task.preprocessors)
  for i, preprocessor in enumerate(preprocessors):
    if isinstance(preprocessor, seqio.CacheDatasetPlaceholder):
      return preprocessors[:i], preprocessors[i + 1:]
  for i, preprocessor in enumerate(preprocessors):
    if seed_argument(preprocessor) or is_eos(preprocessor):
      return preprocessors[:i], preprocessors[i:]
  return preprocessors, []


def precache_names(task: seqio.Task) -> list[str]:
  """Names of the deterministic preprocessors (recorded in a cache's stats)."""
  return [preprocessor_name(p) for p in split_preprocessors(task)[0]]


def check_postcache_preprocessors(task: seqio.Task) -> list[str]:
  """The features that get EOS after trimming; ValueError for any other post-cache step.

  Allowed after the placeholder: `seqio.preprocessors.append_eos` and
  `append_eos_after_trim` only ("EOS handled by t5xlike's pipeline"); the
  returned list is then `[k for k, f in task.output_features.items() if
  f.add_eos]`, else empty. A preprocessor taking `seed`/`seeds` is refused
  with a pointer to objectives (t5xlike cannot replay seqio's seeds per
  example). Any other, deterministic, preprocessor is refused too: t5xlike
  does not run TensorFlow per example after the cache, so it belongs before
  the placeholder (or, when it needs `sequence_length`, is t5xlike's own
  trimming/packing).
  """
  eos = False
  for preprocessor in split_preprocessors(task)[1]:
    name = preprocessor_name(preprocessor)
    if seed_argument(preprocessor):
      raise ValueError(f"task {task.name!r}: post-cache preprocessor {name} takes random seeds "
                       f"({seed_argument(preprocessor)}); {OBJECTIVE_HINT}: remove {name} from "
                       f"task {task.name} and bind the objective instead")
    if is_eos(preprocessor):
      eos = True
      continue
    raise ValueError(f"task {task.name!r}: post-cache preprocessor {name} is not supported: "
                     f"t5xlike runs no TensorFlow per example after seqio.CacheDatasetPlaceholder "
                     f"(only append_eos/append_eos_after_trim, done by its own pipeline); move "
                     f"{name} before the placeholder, or leave trimming and packing to t5xlike")
  return [k for k, f in task.output_features.items() if f.add_eos] if eos else []
