"""Test hooks that inject faults into a run (used by tests and `scripts/fault_drill.py`).

Environment variables, read when a run starts; unset, they change nothing
(no code is traced or called for them):

* `T5XLIKE_FAULT_NAN_AT_STEP=N[,M...]`: the train step that completes step N
  multiplies the loss and the gradients by NaN (inside the jitted step), the
  first time that step runs in the process (a transient fault: after a NaN
  rollback the same step number trains normally). A host callback decides,
  so the hook costs a host round trip per step while set.
* `T5XLIKE_FAULT_ENOSPC_AT_STEP=N`: saving the checkpoint of step N raises
  `OSError(ENOSPC, 'No space left on device')` before anything is written,
  as a full disk would.

Not for production use: they exist so that the NaN policy and the disk-full
handling can be tested end to end.
"""
from __future__ import annotations

import errno
import os

NAN_AT_STEP = "T5XLIKE_FAULT_NAN_AT_STEP"
ENOSPC_AT_STEP = "T5XLIKE_FAULT_ENOSPC_AT_STEP"


def _steps(variable: str) -> tuple[int, ...]:
  text = os.environ.get(variable, "").strip()
  return tuple(int(part) for part in text.split(",") if part.strip())


def nan_steps() -> tuple[int, ...]:
  """The steps (1-based, as logged) whose loss and gradients become NaN."""
  return _steps(NAN_AT_STEP)


def poison(loss, grads, completed_step):
  """(loss, grads) times NaN when `completed_step` (traced int) is a NaN step met for the
  first time since this step function was traced; unchanged (nothing traced) when the
  hook is unset."""
  steps = nan_steps()
  if not steps:
    return loss, grads
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  fired: set[int] = set()

  def first_time(step) -> np.ndarray:
    step = int(step)
    hit = step in steps and step not in fired
    fired.add(step)
    return np.asarray(hit)

  hit = jax.experimental.io_callback(first_time, jax.ShapeDtypeStruct((), jnp.bool_),
                                     completed_step)
  factor = jnp.where(hit, jnp.nan, 1.0).astype(jnp.float32)
  return loss * factor, jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)


def check_save(step: int) -> None:
  """Raises the injected disk-full error when `step` is the ENOSPC step."""
  if step in _steps(ENOSPC_AT_STEP):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {ENOSPC_AT_STEP})")
