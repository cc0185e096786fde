"""Half Fine-Tuning (HFT; Hui et al. 2024, arXiv:2404.18466).

HFT trains half of the parameters and freezes the other half, chosen at
random per fine-tuning stage (a new choice for each stage of a sequence of
fine-tunings), to limit forgetting of what earlier stages learnt. The paper
chooses at the level of parameter categories inside each layer; here the
unit is a *parameter group*:

  granularity='module' (default): per layer of every stack, each sub-module
    with the norm in front of it: T5 encoder layers {attention, mlp},
    decoder layers {self_attention, encoder_decoder_attention, mlp}
    (`pre_<x>_layer_norm` joins `<x>`; the cross-attention's norm joins
    `encoder_decoder_attention`); outside the stacks two groups:
    'embeddings' (parameters matching `embedding_pattern`: token
    embeddings, relative position biases) and 'head' (everything else:
    final norms, output layer).
  granularity='matrix': every parameter of every layer alone (query, key,
    value, out, wi_0, wi_1, wo, each norm), and every module outside the
    stacks alone.

Of the n groups exactly n // 2 are frozen (n odd: one more group trains
than is frozen), the first n // 2 of a permutation of the group names
(sorted) drawn by `np.random.default_rng([seed, stage])`: the same seed and
stage give the same groups, scanned or unscanned, on every process; stage
s of a multi-stage fine-tuning passes `stage=s` for a fresh draw. Frozen
groups are ordinary selections (`selection.Group`), frozen like
`freezing.Freeze` (per layer inside scanned leaves, which then keep a
whole-leaf optimizer state).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from t5xlike.finetuning import base, freezing, selection

#: Pre-norms whose sub-module is not named `<x>` in `pre_<x>_layer_norm`.
NORM_OWNERS = {"pre_cross_attention_layer_norm": "encoder_decoder_attention"}


def _layer_prefix(leaf: selection.Leaf, layer: int) -> str:
  return f"{leaf.stack}/layers_{layer}/" if leaf.stack else f"layers_{layer}/"


def _owner(module: str, siblings: set[str]) -> str:
  """The sub-module a layer's parameter module belongs to (a pre-norm joins its module)."""
  owner = NORM_OWNERS.get(module)
  match = re.fullmatch(r"pre_(.+)_layer_norm", module)
  if owner is None and match:
    owner = match.group(1)
  return owner if owner in siblings else module


@dataclasses.dataclass(frozen=True)
class HalfFineTuning(base.FineTuning):
  seed: int = 0
  stage: int = 0
  granularity: str = "module"
  embedding_pattern: str = selection.EMBEDDING_PATTERN

  def __post_init__(self):
    if self.granularity not in ("module", "matrix"):
      raise ValueError(f"granularity must be 'module' or 'matrix', got {self.granularity!r}")

  def groups(self, params: Any) -> dict[str, selection.Group]:
    """{group name: the Group selecting exactly its parameters}, names sorted."""
    infos = jax.tree.leaves(selection.leaves(params),
                            is_leaf=lambda x: isinstance(x, selection.Leaf))
    per_layer = [(info, layer, path) for info in infos for layer, path in info.layer_paths]
    siblings: dict[str, set[str]] = {}  # layer prefix -> the layer's module names
    for info, layer, path in per_layer:
      if layer is not None:
        prefix = _layer_prefix(info, layer)
        siblings.setdefault(prefix, set()).add(path[len(prefix):].split("/")[0])
    members: dict[str, list[str]] = {}
    for info, layer, path in per_layer:
      if self.granularity == "matrix":
        name = path.rsplit("/", 1)[0]
      elif layer is None:
        name = "embeddings" if re.search(self.embedding_pattern, path) else "head"
      else:
        prefix = _layer_prefix(info, layer)
        name = prefix + _owner(path[len(prefix):].split("/")[0], siblings[prefix])
      members.setdefault(name, []).append(path)
    return {name: selection.Group("^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$")
            for name, paths in sorted(members.items())}

  def frozen_groups(self, params: Any) -> list[str]:
    names = list(self.groups(params))
    order = np.random.default_rng([self.seed, self.stage]).permutation(len(names))
    return sorted(names[i] for i in order[:len(names) // 2])

  def frozen(self, params: Any) -> Any:
    groups = self.groups(params)
    return selection.select(params, [groups[name] for name in self.frozen_groups(params)])

  def update_scales(self, params):
    return freezing.scales_from_frozen(self.frozen(params))

  def describe(self, params):
    names, frozen = list(self.groups(params)), self.frozen_groups(params)
    count, total = selection.count(params, self.frozen(params))
    return [f"{self!r}: {len(frozen)} of {len(names)} groups frozen "
            f"({count:,} of {total:,} parameters)", "  frozen: " + ", ".join(frozen),
            "  trained: " + ", ".join(n for n in names if n not in frozen)]


def group_sizes(params: Any, technique: HalfFineTuning) -> Mapping[str, int]:
  """Parameter count of each group (for inspection and tests)."""
  return {name: selection.count(params, selection.select(params, [group]))[0]
          for name, group in technique.groups(params).items()}
