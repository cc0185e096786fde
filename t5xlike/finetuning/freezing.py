"""Freezing: by parameter groups (`Freeze`) and the lower k layers (`FreezeLower`).

Frozen parameters keep their checkpoint values bit for bit, get no gradient
and no optimizer state (`updates.scaled`); a scanned leaf frozen on some of
its layers only keeps a (whole-leaf) optimizer state.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from t5xlike.finetuning import base, selection


def scales_from_frozen(frozen: Any) -> Any:
  return jax.tree.map(lambda m: np.where(np.asarray(m, bool), 0.0, 1.0).astype(np.float32),
                      frozen)


def _summary(params: Any, frozen: Any, what: str) -> list[str]:
  count, total = selection.count(params, frozen)
  lines = [f"{what}: {count:,} of {total:,} parameters frozen"]
  lines += ["  frozen " + line for line in selection.describe(params, frozen)
            if not line.endswith(": none")]
  return lines


@dataclasses.dataclass(frozen=True)
class Freeze(base.FineTuning):
  """Freezes the parameters of `groups`, or everything but `train_only`.

  Groups are `selection.GroupSpec`s: 'REGEX' or ('REGEX', layer indices),
  e.g. `groups = ['^token_embedder/', ('mlp/', [0, 1])]`,
  `train_only = ['logits_dense']`; a group that selects nothing is an error.
  """
  groups: Sequence[selection.GroupSpec] = ()
  train_only: Sequence[selection.GroupSpec] | None = None

  def frozen(self, params: Any) -> Any:
    if self.train_only is not None:
      return jax.tree.map(np.logical_not,
                          selection.select(params, self.train_only, require_match=True))
    return selection.select(params, self.groups, require_match=True)

  def update_scales(self, params):
    return scales_from_frozen(self.frozen(params))

  def describe(self, params):
    return _summary(params, self.frozen(params), repr(self))


@dataclasses.dataclass(frozen=True)
class FreezeLower(base.FineTuning):
  """Freezes layers 0..num_layers-1 of every stack (an encoder-decoder: the
  lower k of the encoder and the lower k of the decoder) and, with
  `include_embeddings` (default), the embeddings below them (parameters
  outside the stacks matching `embedding_pattern`: token embeddings, T5's
  relative position biases). A model with tied input/output embeddings
  (T5 v1.0, `logits_via_embedding`) then has a frozen output layer too.
  """
  num_layers: int = 1
  include_embeddings: bool = True
  embedding_pattern: str = selection.EMBEDDING_PATTERN

  def __post_init__(self):
    if self.num_layers < 0:
      raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")

  def frozen(self, params: Any) -> Any:
    mask = selection.layers_of_stacks(params, range(self.num_layers))
    if self.include_embeddings:
      mask = selection.union(mask, selection.outside_stacks(params, self.embedding_pattern))
    return mask

  def update_scales(self, params):
    return scales_from_frozen(self.frozen(params))

  def describe(self, params):
    return _summary(params, self.frozen(params), repr(self))
