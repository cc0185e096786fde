"""What both feeds do alike: the shuffled `pipeline.Pipeline` and the in-order
`feeding.SequentialFeed` (and `task_examples`, for inference).

`prepare_objective` checks a task against the run's objective (or, without
one, against TASK_FEATURE_LENGTHS) and gives the vocabulary and the chunk
lengths; `append_eos` is seqio's `append_eos_after_trim` in NumPy, for
the features a task's post-cache EOS preprocessor names; `TruncationCount`
counts the supervised examples that TASK_FEATURE_LENGTHS cuts.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import seqio

from t5xlike import errors
from t5xlike.data import pairwise
from t5xlike.objectives import base as objectives_base, mode_switching as mode_switching_lib

log = logging.getLogger(__name__)

#: The batches after which a feed reports how many examples were truncated.
TRUNCATION_REPORT_AFTER_BATCHES = 4


def append_eos(example: Mapping[str, np.ndarray], eos_features: Sequence[str],
               feature_lengths: Mapping[str, int], eos_id: int) -> dict[str, np.ndarray]:
  """seqio's `append_eos_after_trim` in NumPy: trim to length - 1, then EOS.

  Args:
    example: {feature: tokens [length]}.
    eos_features: the features that get EOS (`sources.*.eos_features`).
    feature_lengths: TASK_FEATURE_LENGTHS; a feature without a length is left alone.
    eos_id: the vocabulary's EOS id.

  Returns:
    A new dict; the EOS features are int32 [min(length, feature length - 1) + 1].
  """
  out = dict(example)
  for key in eos_features:
    if key in out and key in feature_lengths:
      tokens = np.asarray(out[key], dtype=np.int32)[:feature_lengths[key] - 1]
      out[key] = np.concatenate([tokens, np.array([eos_id], np.int32)])
  return out


def inputs_vocabulary(task: seqio.Task):
  """The vocabulary of a task's `inputs` (else of its first feature)."""
  features = task.output_features
  return features["inputs" if "inputs" in features else next(iter(features))].vocabulary


def checked_mode_switching(mode_switching: mode_switching_lib.ModeSwitching | None,
                           objective: objectives_base.Objective | None,
                           tasks: Sequence[seqio.Task]
                           ) -> mode_switching_lib.ModeSwitching | None:
  """UL2 mode switching for a feed of `tasks`: None when it gives no task a token; a
  ConfigError with a pretraining objective (whose examples are not the task's inputs)
  or when a task's vocabulary lacks its token."""
  if mode_switching is None or not mode_switching.active:
    return None
  if objective is not None:
    raise errors.ConfigError(f"MODE_TOKEN / TASK_MODE_TOKENS are for supervised tasks; the "
                             f"objective {objective.name!r} makes its own inputs")
  for task in tasks:
    mode = mode_switching.mode_of(task.name)
    if mode is not None:
      mode_switching.token_ids(mode, inputs_vocabulary(task))
  mode_switching.warn_unknown_tasks([task.name for task in tasks])
  return mode_switching


def prepare_objective(task: seqio.Task, objective: objectives_base.Objective | None,
                      feature_lengths: Mapping[str, int], feature_converter: str):
  """(vocabulary, the cycle of chunk lengths or None) of a task read with an objective.

  Checks that the task has the objective's source feature, gives the
  objective the vocabulary (`setup`) and asks it for its chunk lengths
  (`Objective.chunk_lengths`, which validates TASK_FEATURE_LENGTHS). Without an
  objective (supervised) the lengths must name `inputs` and `targets`, except for
  the decoder converter (causal LM on `targets`), encoder classification
  (`inputs` only) and the pairwise converters (`inputs`, `chosen`, `rejected`,
  which the task must have). ValueError on bad input.
  """
  feature = objective.source_feature if objective is not None else None
  if objective is not None and feature not in task.output_features:
    raise ValueError(f"objective {objective.name!r} reads the feature {feature!r}, which "
                     f"task {task.name!r} lacks")
  vocabulary = task.output_features[feature or next(iter(task.output_features))].vocabulary
  if objective is not None:
    objective.setup(vocabulary)
    return vocabulary, objective.chunk_lengths(feature_lengths)
  if pairwise.is_pairwise(feature_converter):
    pairwise.check_features(list(task.output_features), f"task {task.name!r}")
  required = {"decoder": (), "encoder_classification": ("inputs",)}.get(
      feature_converter, pairwise.TOKEN_FEATURES if pairwise.is_pairwise(feature_converter)
      else ("inputs", "targets"))
  missing = set(required) - set(feature_lengths)
  if missing:
    raise ValueError(f"TASK_FEATURE_LENGTHS lacks {sorted(missing)}")
  return vocabulary, None


def truncated_features(example: Mapping[str, np.ndarray], eos_features: Sequence[str],
                       feature_lengths: Mapping[str, int]) -> list[str]:
  """The features of a supervised example (before `append_eos`) longer than their
  TASK_FEATURE_LENGTHS entry leaves room for (one token less where EOS is appended)."""
  return [key for key, length in feature_lengths.items() if key in example
          and len(example[key]) + (1 if key in eos_features else 0) > length]


class TruncationCount:
  """Counts the supervised examples TASK_FEATURE_LENGTHS truncates, and logs the count
  once, after the first batches (the feeds' read threads add to it: locked)."""

  def __init__(self, what: str):
    self.what = what  # the task or mixture, for the log line
    self.examined = 0
    self.truncated = 0
    self.per_feature: dict[str, int] = {}
    self._lock = threading.Lock()
    self._reported = False

  def add(self, features: Sequence[str]) -> None:
    """One example, with the features `truncated_features` named."""
    with self._lock:
      self.examined += 1
      if features:
        self.truncated += 1
        for key in features:
          self.per_feature[key] = self.per_feature.get(key, 0) + 1

  def report_once(self) -> None:
    """Logs (once) how many of the examples read so far are truncated, when any is."""
    with self._lock:
      if self._reported or not self.examined:
        return
      self._reported = True
      if not self.truncated:
        return
      share = 100.0 * self.truncated / self.examined
      features = ", ".join(f"{k} {v}" for k, v in sorted(self.per_feature.items()))
      log.warning("%s: %d of the first %d examples (%.1f%%) are longer than "
                  "TASK_FEATURE_LENGTHS and are truncated (%s)", self.what, self.truncated,
                  self.examined, share, features)

