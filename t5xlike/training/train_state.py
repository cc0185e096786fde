"""The train state: everything a checkpoint restores, and a summary of its parameters."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct


class TrainState(struct.PyTreeNode):
  """Everything a checkpoint restores.

  The same tree also holds the train state's `jax.ShapeDtypeStruct`s (an abstract
  state) or its shardings (`state_plan.StatePlan.shardings`): hence the `Any` leaves.

  Attributes:
    step: int32 scalar, completed optimizer steps.
    params: the model parameters (float32 tree).
    opt_state: the optax optimizer state.
    rng: uint32 [2] raw key; dropout at step s uses fold_in(rng, s).
  """
  step: Any
  params: Any
  opt_state: Any
  rng: Any


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
