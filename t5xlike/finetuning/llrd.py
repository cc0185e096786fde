"""Layer-wise learning-rate decay (LLRD; Howard & Ruder 2018's discriminative
fine-tuning, as used for BERT/ELECTRA by Clark et al. 2020).

A parameter at depth d trains at learning rate `lr * decay ** (D - d)`, D the
top depth (`selection.depths`): the output layer, task heads and final norms
at D (factor 1), the top layer of the top stack at D - 1, ..., the
embeddings (token embeddings, relative position biases) at 0. For an
encoder-decoder the stacks are serial by default: the encoder's layers are
depths 1..Le, the decoder's Le+1..Le+Ld (`serial=False`: both stacks count
from 1). Implemented as update scales (`updates.scaled`): the factor
multiplies the optimizer's whole update of that parameter (of that layer,
along a scanned leaf's layer axis), i.e. its effective learning rate,
decoupled weight decay included.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from t5xlike.finetuning import base, selection


@dataclasses.dataclass(frozen=True)
class LayerwiseDecay(base.FineTuning):
  """LLRD with factor `decay` per depth, counted from the top."""
  decay: float = 0.8
  serial: bool = True
  stack_order: Sequence[str] = ("encoder", "decoder")
  embedding_pattern: str = selection.EMBEDDING_PATTERN

  def __post_init__(self):
    if not 0.0 < self.decay <= 1.0:
      raise ValueError(f"decay must be in (0, 1], got {self.decay}")

  def depths(self, params: Any) -> tuple[Any, int]:
    return selection.depths(params, serial=self.serial, stack_order=self.stack_order,
                            embedding_pattern=self.embedding_pattern)

  def update_scales(self, params):
    depth, top = self.depths(params)
    return jax.tree.map(
        lambda d: np.power(np.float64(self.decay), top - np.asarray(d)).astype(np.float32), depth)

  def describe(self, params):
    depth, top = self.depths(params)
    infos = jax.tree.leaves(selection.leaves(params),
                            is_leaf=lambda x: isinstance(x, selection.Leaf))
    by_depth: dict[int, set[str]] = {}
    for info, d in zip(infos, jax.tree.leaves(depth)):
      for (layer, path), value in zip(info.layer_paths, np.atleast_1d(d)):
        module = path.split("/layers_")[0] + (f"/layers_{layer}" if layer is not None else "")
        by_depth.setdefault(int(value), set()).add(
            module if layer is not None else path.rsplit("/", 1)[0])
    lines = [f"{self!r}: depth 0..{top}, learning-rate factor decay ** ({top} - depth)"]
    for d in sorted(by_depth):
      lines.append(f"  depth {d} (x{self.decay ** (top - d):.4g}): "
                   + ", ".join(sorted(by_depth[d])))
    return lines
