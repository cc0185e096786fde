"""Optimizers and learning-rate schedules (optax), all gin-configurable.

Schedules are functions of the optimizer step count `count` = completed
steps before this update (0 for the update that makes step 1), as optax
passes it. Optimizer factories take the schedule as `learning_rate` and
return an `optax.GradientTransformation`; run gins bind them un-called
(`optimizer = @optim.adafactor`) and the trainer supplies the schedule.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from t5xlike import errors

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


DECAY_SHAPES = ("exponential", "linear", "cosine", "1-sqrt")


def _decay_factor(shape: str, fraction: jnp.ndarray, end_factor: float) -> jnp.ndarray:
  """f(x) for x = fraction of the decay phase done, in [0, 1]: 1 at 0, `end_factor` at 1.

  exponential: r^x (MiniCPM's f(s - T) = 0.5^((s - T) / T_half) with the half-life
  T_half = D ln 2 / ln(1 / r), D the decay steps, r = end_factor); linear: 1 - (1 - r) x;
  cosine: r + (1 - r)(1 + cos(pi x)) / 2; 1-sqrt: 1 - (1 - r) sqrt(x) (Hagele et al.
  2024's cooldown).
  """
  x = jnp.clip(fraction, 0.0, 1.0)
  if shape == "exponential":
    return jnp.power(jnp.float32(end_factor), x)
  if shape == "linear":
    return 1.0 - (1.0 - end_factor) * x
  if shape == "cosine":
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + jnp.cos(jnp.pi * x))
  return 1.0 - (1.0 - end_factor) * jnp.sqrt(x)


def _decay_start(name: str, warmup_steps: int, decay_steps: int, train_steps: int | None,
                 decay_shape: str, end_factor: float) -> int | None:
  """T = train_steps - decay_steps, the last stable step (None: no decay); ConfigError
  naming the binding when the phases cannot be laid out in TRAIN_STEPS."""
  if decay_shape not in DECAY_SHAPES:
    raise errors.ConfigError(f"optim.{name}.decay_shape={decay_shape!r}: expected one of "
                             f"{', '.join(map(repr, DECAY_SHAPES))}")
  if warmup_steps < 0 or decay_steps < 0:
    raise errors.ConfigError(f"optim.{name}: warmup_steps={warmup_steps} and decay_steps="
                             f"{decay_steps} must be >= 0")
  if not 0.0 <= end_factor <= 1.0 or (decay_shape == "exponential" and end_factor <= 0.0):
    raise errors.ConfigError(f"optim.{name}.end_factor={end_factor}: expected a fraction of "
                             f"the rate in {'(0' if decay_shape == 'exponential' else '[0'}, 1] "
                             f"for decay_shape={decay_shape!r}")
  if decay_steps and train_steps is None:
    raise errors.ConfigError(f"optim.{name}.decay_steps={decay_steps} needs train_steps "
                             f"(bind optim.{name}.train_steps = %TRAIN_STEPS)")
  if train_steps is not None and warmup_steps + decay_steps > train_steps:
    raise errors.ConfigError(
        f"optim.{name}: warmup ({warmup_steps} steps) and decay ({decay_steps} steps) do not fit "
        f"TRAIN_STEPS={train_steps}: raise TRAIN_STEPS to at least {warmup_steps + decay_steps} "
        f"or shorten the phases")
  return None if not decay_steps or train_steps is None else train_steps - decay_steps


def _phased(rate: Schedule, warmup_steps: int, decay_start: int | None, decay_steps: int,
            decay_shape: str, end_factor: float) -> Schedule:
  """The three phases around a stable rate r(s) (s = count + 1, float32):

      s / W * r(W)                       s <= W
      r(s)                               W < s <= T
      f((s - T) / D) * r(T)              T < s       (T = decay_start, D = decay_steps)
  """
  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    held = step if decay_start is None else jnp.minimum(step, decay_start)
    lr = rate(jnp.maximum(held, warmup_steps) if warmup_steps else held)
    if warmup_steps:
      lr = lr * jnp.minimum(1.0, step / warmup_steps)
    if decay_start is not None:
      decayed = _decay_factor(decay_shape, (step - decay_start) / decay_steps, end_factor)
      lr = jnp.where(step > decay_start, lr * decayed, lr)
    return lr
  return schedule


def warmup_stable_decay(peak_learning_rate: float = 1e-2, warmup_steps: int = 0,
                        decay_steps: int = 0, train_steps: int | None = None,
                        decay_shape: str = "exponential", end_factor: float = 0.1) -> Schedule:
  """MiniCPM's warmup-stable-decay (Hu et al. 2024, section 4.2), with step s = count + 1:

      s / W * eta                    s <= W             (warmup)
      eta                            W < s <= T         (stable)
      f((s - T) / D) * eta           T < s              (decay; f from `decay_shape`)

  T = train_steps - D: the decay takes the last D = `decay_steps` steps of the run.
  With decay_steps=0 the run stays stable to its end, and a decay is branched off
  any of its checkpoints by a new run from it (INITIAL_CHECKPOINT_PATH, the same
  optimizer: its state and step continue) with TRAIN_STEPS = that step + D and
  decay_steps = D (`gin_configs/schedules/wsd_decay.gin`).

  Args:
    peak_learning_rate: eta.
    warmup_steps: W (0: no warmup).
    decay_steps: D (0: no decay).
    train_steps: TRAIN_STEPS (needed when D > 0).
    decay_shape: 'exponential' (MiniCPM's), 'linear', 'cosine' or '1-sqrt'.
    end_factor: f(1): the rate at the end of the decay as a fraction of eta.

  Raises:
    ConfigError: phases that do not fit TRAIN_STEPS, an unknown shape, a bad end_factor.
  """
  decay_start = _decay_start("warmup_stable_decay", warmup_steps, decay_steps, train_steps,
                             decay_shape, end_factor)

  return _phased(lambda step: jnp.full_like(step, peak_learning_rate), warmup_steps,
                 decay_start, decay_steps, decay_shape, end_factor)


def power(batch_size: int, tokens_per_example: int | Mapping[str, int], a: float = 4.6,
          b: float = -0.51, max_learning_rate: float = 0.02, warmup_steps: int = 0,
          decay_steps: int = 0, train_steps: int | None = None, decay_shape: str = "exponential",
          end_factor: float = 0.1) -> Schedule:
  """The Power scheduler (Shen et al. 2024, section 4): the rate a power law of tokens seen.

      eta_power(n) = min(eta_max, beta * a * n^b),   n = s * beta * tokens_per_example

  with beta the batch size (sequences), s = count + 1 the step, and

      s / W * eta_power(n(W))              s <= W            (warmup)
      eta_power(n(s))                      W < s <= T
      f((s - T) / D) * eta_power(n(T))     T < s             (decay; T = train_steps - D)

  a = 4.6, b = -0.51 and eta_max = 0.02 are the paper's values (fitted with muP on its
  data); the rate does not depend on the planned number of tokens until the decay.

  Args:
    batch_size: beta, examples per global batch (BATCH_SIZE).
    tokens_per_example: tokens in one example row, or TASK_FEATURE_LENGTHS (its sum).
    a, b: the power law's coefficient and exponent.
    max_learning_rate: eta_max.
    warmup_steps: W (0: no warmup).
    decay_steps: D (0: no decay).
    train_steps: TRAIN_STEPS (needed when D > 0).
    decay_shape: 'exponential', 'linear', 'cosine' or '1-sqrt'.
    end_factor: f(1): the rate at the end of the decay as a fraction of eta_power(n(T)).

  Raises:
    ConfigError: phases that do not fit TRAIN_STEPS, a non-positive batch or row size.
  """
  decay_start = _decay_start("power", warmup_steps, decay_steps, train_steps, decay_shape,
                             end_factor)
  if isinstance(tokens_per_example, Mapping):
    tokens_per_example = sum(tokens_per_example.values())
  if batch_size <= 0 or tokens_per_example <= 0:
    raise errors.ConfigError(f"optim.power: batch_size={batch_size} and tokens_per_example="
                             f"{tokens_per_example} must be positive")
  tokens_per_step = float(batch_size) * float(tokens_per_example)

  def law(step):
    return jnp.minimum(max_learning_rate, batch_size * a * jnp.power(step * tokens_per_step, b))

  return _phased(law, warmup_steps, decay_start, decay_steps, decay_shape, end_factor)


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
