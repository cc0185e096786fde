"""Re-initialising the top layers (and/or the output layer) before fine-tuning
(Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning": the top layers
of a pretrained network specialise to the pretraining task; fresh ones can
fine-tune better).

At the start of a run from INITIAL_CHECKPOINT_PATH (never on a resume from
MODEL_DIR, whose checkpoint already holds the fine-tuned values) the top
`num_layers` layers of every stack (an encoder-decoder: of the encoder and
of the decoder) and, with `head`, the parameters matching `head_pattern`
outside the stacks (T5's untied output layer `decoder/logits_dense`) take
the values of a fresh initialisation of the model from RANDOM_SEED (the
values a from-scratch run with that seed starts from); everything else keeps
the checkpoint's values bit for bit. Every parameter is trained.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from t5xlike.finetuning import base, selection


@dataclasses.dataclass(frozen=True)
class ReinitTop(base.FineTuning):
  num_layers: int = 1
  head: bool = False
  head_pattern: str = r"(^|/)logits_dense/"

  def __post_init__(self):
    if self.num_layers < 0:
      raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")

  def reinitialised(self, params: Any) -> Any:
    """The mask of re-initialised parameters (per layer for scanned leaves)."""
    mask = selection.layers_of_stacks(params, range(-self.num_layers, 0))
    if self.head:
      mask = selection.union(mask, selection.outside_stacks(params, self.head_pattern))
    return mask

  def initialize(self, params: Any, fresh: Callable[[], Any], restored: frozenset[str]) -> Any:
    del restored  # (re-initialises what it selects, wherever it came from)
    mask = self.reinitialised(params)
    if not any(m.any() for m in jax.tree.leaves(mask)):
      return params
    return base.where(mask, fresh(), params)

  def describe(self, params):
    mask = self.reinitialised(params)
    count, total = selection.count(params, mask)
    return ([f"{self!r}: {count:,} of {total:,} parameters re-initialised from RANDOM_SEED "
             f"when starting from INITIAL_CHECKPOINT_PATH"]
            + ["  re-initialised " + line for line in selection.describe(params, mask)
               if not line.endswith(": none")])
