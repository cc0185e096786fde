"""Parameter selection: groups (path regex + layer indices) -> boolean masks.

One mechanism serves every fine-tuning technique (freezing, layer-wise
learning rates, re-initialisation, HFT, ...), for scanned and unscanned
models alike.

Paths are the '/'-joined dict keys of the parameter tree. A transformer
stack appears in one of two forms (`layers.run_stack`):
  unscanned  'encoder/layers_1/mlp/wi_0/kernel'  one subtree per layer
  scanned    'encoder/layers/mlp/wi_0/kernel'    one leaf per parameter, the
             layer on its leading axis (logical axis `layers`)
The *stack* is the path before the layer component ('encoder', 'decoder');
its layers are numbered 0 (bottom, next to the embeddings) .. L-1 (top).

Regular expressions are matched (`re.search`, anchor with ^/$ as needed)
against the *per-layer path*, which is the unscanned spelling in both forms:
layer 1 of the scanned leaf above is matched as
'encoder/layers_1/mlp/wi_0/kernel'. So a group selects the same parameters
scanned and unscanned, and 'encoder/layers_1/' means layer 1 of the encoder
either way.

Masks: a selection is a tree with the parameters' structure whose leaves are
NumPy bool arrays: shape () for a parameter outside a scanned stack, shape
[L] (one entry per layer) for a scanned leaf. `expand` broadcasts such a
per-leaf array against the parameter (along its leading axes). Boxed
(`nn.LogicallyPartitioned`) or abstract (`jax.ShapeDtypeStruct`) parameters
are accepted everywhere; a scanned leaf is recognised by its `layers` path
component (and, when boxed, its leading `layers` logical axis).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

_LAYER = re.compile(r"^layers_(\d+)$")


@dataclasses.dataclass(frozen=True)
class Group:
  """A parameter group: a path regex and optionally some layer indices.

  Attributes:
    pattern: regular expression searched in the per-layer path (see module
      docstring); '' or '.*' matches everything.
    layers: layer indices within each stack (negative ones count from the
      top: -1 is the top layer); None: no restriction. With `layers` set,
      parameters outside the stacks (embeddings, head, final norms) never
      match.
  """
  pattern: str
  layers: Sequence[int] | None = None

  def matches(self, path: str, layer: int | None, num_layers: int) -> bool:
    if self.layers is not None:
      wanted = {i % num_layers for i in self.layers if -num_layers <= i < num_layers}
      if layer is None or layer not in wanted:
        return False
    return re.search(self.pattern, path) is not None


GroupSpec = Group | str | tuple  # 'REGEX', ('REGEX', None | int | [ints]) or a Group


def as_group(spec: GroupSpec) -> Group:
  """'REGEX' / ('REGEX', layers) / Group -> Group (gin binds strings and tuples)."""
  if isinstance(spec, Group):
    return spec
  if isinstance(spec, str):
    return Group(spec)
  pattern, layers = spec
  if isinstance(layers, int):
    layers = (layers,)
  return Group(pattern, None if layers is None else tuple(layers))


@dataclasses.dataclass(frozen=True)
class Leaf:
  """Where one parameter leaf sits.

  Attributes:
    path: the path in the tree ('encoder/layers/mlp/wi_0/kernel').
    shape: the parameter's shape.
    stack: the stack's path ('encoder') or None outside the stacks.
    num_layers: layers of that stack (0 outside the stacks).
    layer: the layer index of an unscanned layer's parameter, else None.
    scanned: the leading axis is the stack's layers.
  """
  path: str
  shape: tuple[int, ...]
  stack: str | None = None
  num_layers: int = 0
  layer: int | None = None
  scanned: bool = False

  @property
  def layer_paths(self) -> list[tuple[int | None, str]]:
    """(layer index, per-layer path) for each layer this leaf holds (one unless scanned)."""
    if not self.scanned:
      return [(self.layer, self.path)]
    prefix = f"{self.stack}/" if self.stack else ""
    rest = self.path[len(prefix) + len("layers"):]
    return [(i, f"{prefix}layers_{i}{rest}") for i in range(self.num_layers)]

  @property
  def mask_shape(self) -> tuple[int, ...]:
    return (self.num_layers,) if self.scanned else ()


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def _keys(path: Sequence[Any]) -> list[str]:
  """A jax tree path as strings: a DictKey's key, a GetAttrKey's name, else the entry."""
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def leaves(params: Any) -> Any:
  """The `Leaf` of every parameter, as a tree of the (unboxed) parameters' structure."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_boxed)
  keyed = [(_keys(path), leaf) for path, leaf in flat]
  # Layers per unscanned stack: the distinct layers_<i> under each stack path.
  unscanned: dict[str, set[int]] = {}
  for keys, _ in keyed:
    for i, key in enumerate(keys):
      match = _LAYER.match(key)
      if match:
        unscanned.setdefault("/".join(keys[:i]), set()).add(int(match.group(1)))
        break
  out = []
  for keys, leaf in keyed:
    value = leaf.value if _is_boxed(leaf) else leaf
    shape = tuple(np.shape(value))
    path = "/".join(keys)
    info = Leaf(path, shape)
    for i, key in enumerate(keys[:-1]):
      stack = "/".join(keys[:i])
      if key == "layers":
        if _is_boxed(leaf) and tuple(leaf.names[:1]) != ("layers",):
          raise ValueError(f"{path}: under a scanned 'layers' module but its leading "
                           f"logical axis is {leaf.names[:1]}, not 'layers'")
        info = Leaf(path, shape, stack, shape[0], None, True)
        break
      match = _LAYER.match(key)
      if match:
        info = Leaf(path, shape, stack, max(unscanned[stack]) + 1, int(match.group(1)))
        break
    out.append(info)
  return jax.tree_util.tree_unflatten(treedef, out)


def _map_leaves(fn, params: Any) -> Any:
  return jax.tree.map(fn, leaves(params), is_leaf=lambda x: isinstance(x, Leaf))


def select(params: Any, groups: Iterable[GroupSpec], require_match: bool = False) -> Any:
  """The union of `groups`: per leaf a bool array, shape () or [L] when scanned.

  With `require_match` a group that selects no parameter is a ValueError (a
  misspelt regex would otherwise select nothing, silently)."""
  resolved = [as_group(g) for g in groups]
  used: set[int] = set()

  def mask(leaf: Leaf) -> np.ndarray:
    hits = []
    for layer, path in leaf.layer_paths:
      matched = [i for i, g in enumerate(resolved) if g.matches(path, layer, leaf.num_layers)]
      used.update(matched)
      hits.append(bool(matched))
    return np.asarray(hits if leaf.scanned else hits[0], bool)
  out = _map_leaves(mask, params)
  unused = [resolved[i] for i in range(len(resolved)) if i not in used]
  if require_match and unused:
    raise ValueError(f"{', '.join(map(repr, unused))} select(s) no parameter")
  return out


def layers_of_stacks(params: Any, which: Iterable[int]) -> Any:
  """The layers with indices `which` (negative: from the top) of every stack."""
  which = tuple(which)
  return select(params, [Group("", which)] if which else [])


def outside_stacks(params: Any, pattern: str) -> Any:
  """Parameters outside the stacks whose path matches `pattern` (embeddings, heads)."""
  return _map_leaves(lambda leaf: np.asarray(
      leaf.stack is None and re.search(pattern, leaf.path) is not None, bool), params)


def union(*masks: Any) -> Any:
  """Per leaf: selected by any of `masks` (shapes broadcast: () with [L])."""
  return jax.tree.map(lambda *ms: functools.reduce(np.logical_or, map(np.asarray, ms)), *masks)


def stacks(params: Any) -> dict[str, int]:
  """{stack path: number of layers}, in the order they first appear in the tree."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(leaves(params), is_leaf=lambda x: isinstance(x, Leaf)):
    if leaf.stack is not None:
      out.setdefault(leaf.stack, leaf.num_layers)
  return out


#: Parameters outside the stacks that count as embeddings (LLRD depth 0, frozen with
#: the lowest layers): token / position embeddings, T5's relative position biases,
#: ELECTRA's embedding projection.
EMBEDDING_PATTERN = r"embed|relpos"

#: Normalisation parameters (T5's RMSNorm scales `pre_*_layer_norm`, `encoder_norm`,
#: `decoder_norm`; the MLM head's `layer_norm`).
NORM_PATTERN = r"norm/(scale|bias)$"


def depths(params: Any, *, serial: bool = False,
           stack_order: Sequence[str] = ("encoder", "decoder"),
           embedding_pattern: str = EMBEDDING_PATTERN, head_offset: int = 2
           ) -> tuple[Any, int]:
  """Each parameter's depth for layer-wise learning rates: (tree, top depth D).

  Depth 0: parameters outside the stacks matching `embedding_pattern`. Layers:
  - `serial=False` (default): every stack is counted from its own top, the stacks
    side by side: with L = the deepest stack's layer count, layer i of a stack of
    L_s layers is at depth i + 1 + (L - L_s), so every stack's top layer is at L
    (an encoder-decoder's encoder and decoder each decay from their top).
  - `serial=True`: the stacks one above the other, in `stack_order` then in order
    of appearance: an encoder-decoder's encoder layers at 1..Le and its decoder
    layers at Le+1..Le+Ld (the decoder reads the encoder's output), L = Le + Ld.
  D = L + `head_offset`: every other parameter outside the stacks (final norms,
  output layer, task heads) sits at D. The default offset 2 is ELECTRA's
  (google-research/electra `model/optimization.py`, `_get_layer_lrs`: embeddings at
  0, layer i at i + 1, `task_specific/` at n_layers + 2, so the top layer trains at
  decay^2, not decay); 1 puts the head right above the top layer. Depth arrays
  are int, shape () or [L_s] as masks.
  """
  if head_offset < 1:
    raise ValueError(f"head_offset must be >= 1, got {head_offset}")
  found = stacks(params)
  ordered = [s for s in stack_order if s in found] + [s for s in found if s not in stack_order]
  deepest = max(found.values(), default=0)
  offset, start = 0, {}
  for stack in ordered:
    start[stack] = offset + 1 if serial else 1 + deepest - found[stack]
    offset += found[stack] if serial else 0
  top = (offset if serial else deepest) + head_offset

  def depth(leaf: Leaf) -> np.ndarray:
    if leaf.stack is None:
      return np.asarray(0 if re.search(embedding_pattern, leaf.path) else top, np.int32)
    if leaf.scanned:
      return start[leaf.stack] + np.arange(leaf.num_layers, dtype=np.int32)
    assert leaf.layer is not None  # `leaves`: an unscanned leaf of a stack has its layer.
    return np.asarray(start[leaf.stack] + leaf.layer, np.int32)
  return _map_leaves(depth, params), top


def expand(mask: Any, ndim: int) -> Any:
  """A per-leaf array (shape () / [L] / the leaf's leading axes) shaped to broadcast
  against a parameter of rank `ndim`."""
  mask = np.asarray(mask) if not isinstance(mask, jax.Array) else mask
  return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def count(params: Any, mask: Any = None) -> tuple[int, int]:
  """(selected, total) scalar parameter counts; `mask` None selects everything.

  A scanned leaf contributes size / L per selected layer."""
  selected = total = 0
  infos = jax.tree.leaves(leaves(params), is_leaf=lambda x: isinstance(x, Leaf))
  masks = [None] * len(infos) if mask is None else jax.tree.leaves(mask)
  if len(masks) != len(infos):
    raise ValueError(f"mask has {len(masks)} leaves, the parameters {len(infos)}")
  for info, m in zip(infos, masks):
    size = int(np.prod(info.shape))
    total += size
    if m is None:
      selected += size
    else:
      m = np.asarray(m, bool)
      selected += int(m.sum()) * size // max(m.size, 1)
  return selected, total


def describe(params: Any, mask: Any) -> list[str]:
  """One line per parameter leaf: its path and which layers `mask` selects."""
  lines = []
  infos = jax.tree.leaves(leaves(params), is_leaf=lambda x: isinstance(x, Leaf))
  for info, m in zip(infos, jax.tree.leaves(mask)):
    m = np.asarray(m, bool)
    what = ("all" if m.all() else "none" if not m.any()
            else "layers " + ",".join(str(i) for i in np.flatnonzero(m)))
    lines.append(f"{info.path}: {what}")
  return lines
