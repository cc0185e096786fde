"""Layer-wise learning-rate decay (LLRD; Howard & Ruder 2018's discriminative
fine-tuning, as used for BERT/ELECTRA by Clark et al. 2020).

A parameter at depth d trains at learning rate `lr * decay ** (D - d)`, D the
top depth (`selection.depths`). The depths follow ELECTRA's `_get_layer_lrs`
(google-research/electra `model/optimization.py`): embeddings (token embeddings,
relative position biases, the embedding projection) at 0, layer i of a stack of
n layers at i + 1, the head (`task_specific/` there; here every other parameter
outside the stacks: output layer, task heads, final norms) at n + 2, so the top
layer trains at decay^2 and the embeddings at decay^(n + 2). ELECTRA has one
stack; an encoder-decoder's two stacks each decay from their own top by default
(`serial=False`: the encoder's and the decoder's top layers both at decay^2), or
one above the other with `serial=True` (the encoder's layers below the
decoder's: T5-Base's bottom encoder layer would train at 0.8^25 = 0.004x).
`head_offset=1` puts the head right above the top layer (the top layer at
decay^1). Implemented as update scales (`updates.scaled`): the factor
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
  """LLRD with factor `decay` per depth, counted from the top.

  Attributes:
    decay: the factor per depth, in (0, 1].
    serial: False (default): each stack decays from its own top; True: the stacks
      one above the other (`selection.depths`).
    stack_order: the order of serial stacks, bottom first.
    embedding_pattern: parameters outside the stacks at depth 0.
    head_offset: the head's depth above the deepest layer (2: ELECTRA's).
  """
  decay: float = 0.8
  serial: bool = False
  stack_order: Sequence[str] = ("encoder", "decoder")
  embedding_pattern: str = selection.EMBEDDING_PATTERN
  head_offset: int = 2

  def __post_init__(self):
    if not 0.0 < self.decay <= 1.0:
      raise ValueError(f"decay must be in (0, 1], got {self.decay}")
    if self.head_offset < 1:
      raise ValueError(f"head_offset must be >= 1, got {self.head_offset}")

  def depths(self, params: Any) -> tuple[Any, int]:
    return selection.depths(params, serial=self.serial, stack_order=self.stack_order,
                            embedding_pattern=self.embedding_pattern,
                            head_offset=self.head_offset)

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
