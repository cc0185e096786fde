"""Faults injected into a run on purpose: for the tests and `scripts/fault_drill.py` only.

A `FaultHooks` object is passed to the trainer and the checkpointer (gin:
`train_run.train.fault_hooks`, bound by `tests/gin/fault_hooks.gin`); a
production run has none, and nothing is traced or called for it.

* `nan_at_steps`: the train step that completes step N multiplies the loss and
  the gradients by NaN (inside the jitted step), the first time that step runs
  in the process (a transient fault: after a NaN rollback the same step number
  trains normally). A host callback decides, so the hook costs a host round
  trip per step while set.
* `enospc_at_steps`: saving the checkpoint of step N raises
  `OSError(ENOSPC, 'No space left on device')` before anything is written, as
  a full disk would.
"""
from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FaultHooks:
  """The faults of one run.

  Attributes:
    nan_at_steps: steps (1-based, as logged) whose loss and gradients become NaN.
    enospc_at_steps: steps whose checkpoint save fails as on a full disk.
  """
  nan_at_steps: Sequence[int] = ()
  enospc_at_steps: Sequence[int] = ()

  def poison(self, loss: jax.Array, grads: Any,
             completed_step: jax.Array) -> tuple[jax.Array, Any]:
    """(loss, grads) times NaN when `completed_step` (traced int) is a NaN step met for
    the first time since this step function was traced; unchanged (nothing traced)
    without NaN steps."""
    steps = tuple(int(s) for s in self.nan_at_steps)
    if not steps:
      return loss, grads
    fired: set[int] = set()

    def first_time(step: np.ndarray) -> np.ndarray:
      hit = int(step) in steps and int(step) not in fired
      fired.add(int(step))
      return np.asarray(hit)

    hit = jax.experimental.io_callback(first_time, jax.ShapeDtypeStruct((), jnp.bool_),
                                       completed_step)
    factor = jnp.where(hit, jnp.nan, 1.0).astype(jnp.float32)
    return loss * factor, jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)

  def before_save(self, step: int) -> None:
    """Raises the injected disk-full error when `step` is an ENOSPC step."""
    if step in tuple(int(s) for s in self.enospc_at_steps):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected by FaultHooks)")
