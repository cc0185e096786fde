"""Optimizers and learning-rate schedules (optax), all gin-configurable.

Schedules are functions of the optimizer step count `count` = completed
steps before this update (0 for the update that makes step 1), as optax
passes it. Optimizer factories take the schedule as `learning_rate` and
return an `optax.GradientTransformation`; run gins bind them un-called
(`optimizer = @optim.adafactor`) and the trainer supplies the schedule.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


# -- schedules -----------------------------------------------------------------
def rsqrt_with_warmup(base_learning_rate: float = 1.0, warmup_steps: int = 10_000,
                      linear_warmup: bool = False) -> Schedule:
  """T5's schedule: base / sqrt(max(step, warmup_steps)), step = count + 1.

  Constant at base / sqrt(warmup_steps) during warmup (T5X's
  `constant * rsqrt_decay`); with `linear_warmup` it ramps linearly from 0 to
  that value instead.
  """
  if warmup_steps <= 0:
    raise ValueError(f"warmup_steps must be positive, got {warmup_steps}")

  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    lr = base_learning_rate / jnp.sqrt(jnp.maximum(step, warmup_steps))
    if linear_warmup:
      lr = lr * jnp.minimum(1.0, step / warmup_steps)
    return lr
  return schedule


def constant(learning_rate: float = 1e-3) -> Schedule:
  return lambda count: jnp.full((), learning_rate, jnp.float32)


def _with_warmup(peak: float, warmup_steps: int, decay: Schedule) -> Schedule:
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def cosine(peak_learning_rate: float = 1e-3, warmup_steps: int = 0, decay_steps: int = 10_000,
           end_learning_rate: float = 0.0) -> Schedule:
  """Linear warmup to the peak, then cosine decay to `end_learning_rate` over `decay_steps`."""
  decay = optax.cosine_decay_schedule(peak_learning_rate, max(decay_steps, 1),
                                      alpha=end_learning_rate / peak_learning_rate
                                      if peak_learning_rate else 0.0)
  return _with_warmup(peak_learning_rate, warmup_steps, decay)


def linear(peak_learning_rate: float = 1e-3, warmup_steps: int = 0, decay_steps: int = 10_000,
           end_learning_rate: float = 0.0) -> Schedule:
  """Linear warmup to the peak, then linear decay to `end_learning_rate` over `decay_steps`."""
  decay = optax.linear_schedule(peak_learning_rate, end_learning_rate, max(decay_steps, 1))
  return _with_warmup(peak_learning_rate, warmup_steps, decay)


# -- optimizers ----------------------------------------------------------------
def adafactor(learning_rate: Schedule | float, decay_rate: float = 0.8,
              clipping_threshold: float | None = 1.0, multiply_by_parameter_scale: bool = True,
              momentum: float | None = None, min_dim_size_to_factor: int = 128,
              epsilon1: float = 1e-30, weight_decay_rate: float | None = None,
              factored: bool = True) -> optax.GradientTransformation:
  """Adafactor (Shazeer & Stern 2018) with T5X's defaults.

  Factored second moments for matrices whose two largest dimensions are both
  >= `min_dim_size_to_factor`, second-moment decay 1 - t^-0.8, update
  clipping at RMS 1.0, updates scaled by the parameter RMS (floored at 1e-3),
  no momentum.

  Args:
    learning_rate: a schedule (step -> rate) or a constant rate.
    decay_rate: c in the second-moment decay 1 - t^-c.
    clipping_threshold: clip each update to this RMS (None: no clipping).
    multiply_by_parameter_scale: scale updates by the parameter's RMS (relative steps).
    momentum: first-moment decay (None: no first moment kept).
    min_dim_size_to_factor: factor the second moment of a matrix whose two
      largest dimensions are both at least this.
    epsilon1: regulariser added to the squared gradients.
    weight_decay_rate: decoupled weight decay per step (None: none).
    factored: False keeps full (unfactored) second moments.
  """
  return optax.adafactor(
      learning_rate=learning_rate, min_dim_size_to_factor=min_dim_size_to_factor,
      decay_rate=decay_rate, multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold, momentum=momentum,
      weight_decay_rate=weight_decay_rate, eps=epsilon1, factored=factored)


def adamw(learning_rate: Schedule | float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, global_clip_norm: float | None = None
          ) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019), optionally after global-norm gradient clipping.

  Args:
    learning_rate: a schedule (step -> rate) or a constant rate.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
    weight_decay: decoupled weight decay, multiplied by the learning rate.
    global_clip_norm: clip the gradients to this global L2 norm first (None or 0: no
      clipping).
  """
  adam = optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                     weight_decay=weight_decay)
  if global_clip_norm:
    return optax.chain(optax.clip_by_global_norm(global_clip_norm), adam)
  return adam


def per_layer(inner: optax.GradientTransformation, stacked: Any) -> optax.GradientTransformation:
  """Applies `inner` to each layer of stacked (scanned) parameters separately.

  `stacked` is a tree matching the parameters: the number of layers where
  the parameter's leading axis is the `layers` axis of a scanned stack, else
  0. Those leaves get `inner` vmapped over that axis (one group per layer
  count, since stacks may differ in depth), so Adafactor's factoring,
  update clipping and parameter scale are computed per layer (as T5X does)
  and a scanned model is updated exactly like its unscanned twin.
  """
  counts = sorted({int(c) for c in jax.tree.leaves(stacked) if c})
  if not counts:
    return inner
  labels = jax.tree.map(lambda c: f"layers_{int(c)}" if c else "plain", stacked)
  vmapped = optax.GradientTransformation(
      init=jax.vmap(inner.init),
      update=lambda updates, state, params=None: jax.vmap(inner.update)(updates, state, params))
  transforms = {f"layers_{c}": vmapped for c in counts}
  transforms["plain"] = inner
  return optax.multi_transform(transforms, labels)
