"""Half Fine-Tuning (HFT; Hui et al. 2024, arXiv:2404.18466).

HFT trains half of the parameters and freezes the other half, chosen at
random per fine-tuning stage (a new choice for each stage of a sequence of
fine-tunings), to limit forgetting of what earlier stages learnt. What the
paper halves is the parameter count, and it chooses "at the category level"
(its Figure 2: parameter tensors such as a layer's attention and feed-forward
matrices, not single scalars). Here the unit is a *parameter group*:

  granularity='matrix' (default, the paper's category level): every parameter
    of every layer alone (query, key, value, out, wi_0, wi_1, wo, each norm),
    and every module outside the stacks alone (token embeddings, each relative
    position bias, each final norm, the output layer).
  granularity='module': per layer of every stack, each sub-module with the norm
    in front of it: T5 encoder layers {attention, mlp}, decoder layers
    {self_attention, encoder_decoder_attention, mlp} (`pre_<x>_layer_norm`
    joins `<x>`; the cross-attention's norm joins `encoder_decoder_attention`);
    outside the stacks two groups: 'embeddings' (parameters matching
    `embedding_pattern`: token embeddings, relative position biases) and
    'head' (everything else: final norms, output layer).

The frozen set (`half_of='parameters'`, default; `nearest_half`): a random set
of groups whose parameter count is half of the total, as near as the group
sizes allow (within half of the smallest group when a combination does it;
T5.1.1 tiny with 'matrix' groups: exactly 672,256 of its 1,344,512 for seeds
0-9, although its embeddings and output layer hold 39% of the parameters
each), drawn by `np.random.default_rng([seed, stage])`: first how many groups
of each size, then which ones. `half_of='groups'` freezes the first n // 2 of
a permutation of the n groups instead (the earlier rule: on T5.1.1 tiny
12-92% of the parameters for seeds 0-9). The same seed and stage give the same groups, scanned
or unscanned, on every process; stage s of a multi-stage fine-tuning passes
`stage=s` for a fresh draw. Frozen groups are ordinary selections
(`selection.Group`), frozen like `freezing.Freeze` (per layer inside scanned
leaves, which then keep a whole-leaf optimizer state).
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
GRANULARITIES = ("matrix", "module")
HALF_OF = ("parameters", "groups")


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
  """Freezes a seeded half of the parameters, chosen by groups (module docstring).

  Attributes:
    seed: seeds the choice (with `stage`).
    stage: the fine-tuning stage (a fresh choice per stage).
    granularity: 'matrix' (every parameter tensor of a layer, the paper's
      categories) or 'module' (sub-modules with their norms).
    half_of: 'parameters' (frozen count nearest half of the parameters) or
      'groups' (half of the groups, whatever their size).
    embedding_pattern: the 'embeddings' group of `granularity='module'`.
  """
  seed: int = 0
  stage: int = 0
  granularity: str = "matrix"
  half_of: str = "parameters"
  embedding_pattern: str = selection.EMBEDDING_PATTERN

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
    if self.half_of not in HALF_OF:
      raise ValueError(f"half_of must be one of {HALF_OF}, got {self.half_of!r}")

  def _members(self, params: Any) -> dict[str, dict[str, int]]:
    """{group name: {per-layer parameter path: its size}}, names sorted."""
    infos = jax.tree.leaves(selection.leaves(params),
                            is_leaf=lambda x: isinstance(x, selection.Leaf))
    per_layer = [(info, layer, path) for info in infos for layer, path in info.layer_paths]
    siblings: dict[str, set[str]] = {}  # layer prefix -> the layer's module names
    for info, layer, path in per_layer:
      if layer is not None:
        prefix = _layer_prefix(info, layer)
        siblings.setdefault(prefix, set()).add(path[len(prefix):].split("/")[0])
    members: dict[str, dict[str, int]] = {}
    for info, layer, path in per_layer:
      if self.granularity == "matrix":
        name = path.rsplit("/", 1)[0]
      elif layer is None:
        name = "embeddings" if re.search(self.embedding_pattern, path) else "head"
      else:
        prefix = _layer_prefix(info, layer)
        name = prefix + _owner(path[len(prefix):].split("/")[0], siblings[prefix])
      size = int(np.prod(info.shape)) // (info.num_layers if info.scanned else 1)
      members.setdefault(name, {})[path] = size
    return dict(sorted(members.items()))

  def groups(self, params: Any) -> dict[str, selection.Group]:
    """{group name: the Group selecting exactly its parameters}, names sorted."""
    return {name: selection.Group("^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$")
            for name, paths in self._members(params).items()}

  def group_sizes(self, params: Any) -> dict[str, int]:
    """{group name: its parameter count}, names sorted."""
    return {name: sum(paths.values()) for name, paths in self._members(params).items()}

  def frozen_groups(self, params: Any) -> list[str]:
    """The names of the frozen groups, sorted."""
    sizes = self.group_sizes(params)
    names, rng = list(sizes), np.random.default_rng([self.seed, self.stage])
    if self.half_of == "groups":
      return sorted(names[i] for i in rng.permutation(len(names))[:len(names) // 2])
    return sorted(nearest_half(sizes, rng))

  def frozen(self, params: Any) -> Any:
    groups = self.groups(params)
    return selection.select(params, [groups[name] for name in self.frozen_groups(params)])

  def update_scales(self, params):
    return freezing.scales_from_frozen(self.frozen(params))

  def describe(self, params):
    names, frozen = list(self.groups(params)), self.frozen_groups(params)
    count, total = selection.count(params, self.frozen(params))
    return [f"{self!r}: {len(frozen)} of {len(names)} groups frozen "
            f"({count:,} of {total:,} parameters, {100.0 * count / max(total, 1):.2f}%)",
            "  frozen: " + ", ".join(frozen),
            "  trained: " + ", ".join(n for n in names if n not in frozen)]


def nearest_half(sizes: Mapping[str, int], rng: np.random.Generator,
                 max_nodes: int = 100_000) -> list[str]:
  """A random set of the named groups whose total size is (about) half of all of them.

  Groups of equal size are interchangeable for the count, so the choice is made in
  two steps: how many groups of each size (a depth-first search over the sizes,
  largest first, trying the feasible counts of each in a random order and stopping
  at the first combination within `band` of half: |2 x frozen - total| <= band),
  then which ones (a random subset of that many). `band` starts at the smallest
  group's size (within half of it) and doubles while no combination is found (or
  the search visited `max_nodes` nodes), so the result is as near half as that
  band allows.

  Args:
    sizes: {group name: parameter count}.
    rng: the random source (seeded by the caller: the same seed, the same groups).
    max_nodes: search nodes per band before it widens.
  """
  by_size: dict[int, list[str]] = {}
  for name in sorted(sizes):
    by_size.setdefault(int(sizes[name]), []).append(name)
  classes = sorted(by_size.items(), reverse=True)  # [(size, names)], largest first
  total = sum(size * len(names) for size, names in classes)
  below = [sum(size * len(names) for size, names in classes[k:]) for k in range(len(classes))]
  below.append(0)  # below[k]: the most classes k.. can add
  nodes = 0

  def search(k: int, frozen: int, band: int, counts: list[int]) -> bool:
    """Appends to `counts` the count of each class k.. that ends within `band`."""
    nonlocal nodes
    nodes += 1
    if k == len(classes):
      return abs(2 * frozen - total) <= band
    size = classes[k][0]
    # Counts after which half (within the band) is still reachable by the classes below.
    lo = max(0, -(-(total - band - 2 * frozen - 2 * below[k + 1]) // (2 * size)))
    hi = min(len(classes[k][1]), (total + band - 2 * frozen) // (2 * size))
    for count in (rng.permutation(np.arange(lo, hi + 1)) if hi >= lo else ()):
      counts.append(int(count))
      if search(k + 1, frozen + int(count) * size, band, counts):
        return True
      counts.pop()
      if nodes > max_nodes:
        return False
    return False

  band, counts = max(min(by_size, default=1), 1), list[int]()
  while True:
    nodes = 0
    if search(0, 0, band, counts):
      break
    band *= 2
  return [name for (_, names), count in zip(classes, counts)
          for name in (names[i] for i in rng.permutation(len(names))[:count])]


def group_sizes(params: Any, technique: HalfFineTuning) -> Mapping[str, int]:
  """Parameter count of each group (for inspection and tests)."""
  return technique.group_sizes(params)
