"""Parameter trees in NumPy: flat `{'a/b/kernel': array}` <-> nested dicts, and
scanned <-> unscanned layer layouts, without JAX (host memory only)."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

_LAYER = re.compile(r"^(?P<stack>.*?)/layers_(?P<index>\d+)/(?P<rest>.*)$")
_SCANNED = re.compile(r"^(?P<stack>.*?)/layers/(?P<rest>.*)$")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x} (leaves are anything but mappings)."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{name}/"))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def is_scanned(names: Iterable[str]) -> bool:
  """Whether parameter paths use the scanned layout (`<stack>/layers/...`)."""
  return any(_SCANNED.match(name) for name in names)


def unstack(flat: Mapping[str, np.ndarray], layer_axis: int = 0) -> dict[str, np.ndarray]:
  """Scanned (`<stack>/layers/<rest>`, layer axis `layer_axis`) -> unscanned
  (`<stack>/layers_<i>/<rest>`). Views, no copy. T5X's scanned checkpoints
  (`nn.scan(..., variable_axes={'params': 1})`) have the layer axis at 1,
  t5xlike's at 0."""
  out: dict[str, np.ndarray] = {}
  for name, value in flat.items():
    match = _SCANNED.match(name)
    if not match:
      out[name] = value
      continue
    value = np.moveaxis(np.asarray(value), layer_axis, 0)
    for i in range(value.shape[0]):
      out[f"{match['stack']}/layers_{i}/{match['rest']}"] = value[i]
  return out


def unstacked_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """`unstack`'s paths and shapes, from scanned {path: shape} (layer axis 0; no arrays)."""
  out: dict[str, tuple[int, ...]] = {}
  for name, shape in shapes.items():
    match = _SCANNED.match(name)
    if not match:
      out[name] = tuple(shape)
      continue
    for i in range(shape[0]):
      out[f"{match['stack']}/layers_{i}/{match['rest']}"] = tuple(shape[1:])
  return out


def stack(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Unscanned (`<stack>/layers_<i>/<rest>`) -> t5xlike's scanned layout
  (`<stack>/layers/<rest>`, layer axis 0)."""
  groups: dict[tuple[str, str], dict[int, np.ndarray]] = {}
  out: dict[str, np.ndarray] = {}
  for name, value in flat.items():
    match = _LAYER.match(name)
    if match:
      groups.setdefault((match["stack"], match["rest"]), {})[int(match["index"])] = value
    else:
      out[name] = value
  for (stack_name, rest), layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"{stack_name}/layers_<i>/{rest}: layers {sorted(layers)} are not "
                       f"0..{len(layers) - 1}")
    out[f"{stack_name}/layers/{rest}"] = np.stack([layers[i] for i in range(len(layers))])
  return out


def count_layers(names: Iterable[str], stack_name: str) -> int:
  """Number of `stack_name/layers_<i>` subtrees among unscanned parameter paths."""
  indices = {int(m["index"]) for m in map(_LAYER.match, names)
             if m and m["stack"] == stack_name}
  return max(indices) + 1 if indices else 0


def shape_mismatches(flat: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
  """'path: got S, model wants T' / 'path: missing' / 'path: not in the model' lines."""
  lines = [f"{name}: got {tuple(np.shape(flat[name]))}, the model wants {shape}"
           for name, shape in expected.items()
           if name in flat and tuple(np.shape(flat[name])) != tuple(shape)]
  lines += [f"{name}: missing" for name in expected if name not in flat]
  lines += [f"{name}: not in the model" for name in flat if name not in expected]
  return sorted(lines)


def check_shapes(flat: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                 source: str) -> None:
  """Raises ValueError naming every mismatched parameter path (first five, then a count)."""
  lines = shape_mismatches(flat, expected)
  if lines:
    more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
    raise ValueError(f"{source} does not fit the model: {'; '.join(lines[:5])}{more}")
