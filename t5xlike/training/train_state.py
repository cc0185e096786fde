"""The train state: everything a checkpoint restores, and a summary of its parameters."""
from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint restores.

  Attributes:
    step: int32 scalar, completed optimizer steps.
    params: the model parameters (float32 tree).
    opt_state: the optax optimizer state.
    rng: uint32 [2] raw key; dropout at step s uses fold_in(rng, s).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def parameter_summary(params: Any) -> list[tuple[str, int]]:
  """(module path, parameter count) per top-level module and layer, plus the total."""
  counts: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    module = "/".join(keys[:2]) if len(keys) > 2 else keys[0]
    counts[module] = counts.get(module, 0) + int(np.prod(leaf.shape))
  rows = sorted(counts.items())
  rows.append(("total", sum(counts.values())))
  return rows
