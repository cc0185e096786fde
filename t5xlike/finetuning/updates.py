"""Per-parameter and per-layer update scales around any optax optimizer.

`scaled(inner, scales)` is the one optax mechanism behind freezing and
layer-wise learning rates. `scales` has the parameters' tree structure with
float arrays of shape () or [L] (per layer of a scanned leaf, see
`selection`): the update of a parameter (of each layer) is `inner`'s update
times its scale, so a scale is a learning-rate multiplier, decoupled weight
decay included (it is part of the update); 0 freezes.

- A leaf whose scales are all 0 is *frozen*: `optax.multi_transform` routes
  it to a stateless transformation that returns -0.0 updates, so `inner`
  never sees it and allocates no state for it (no Adafactor factors, no Adam
  moments), and `p + (-0.0) == p` bit for bit for every float p (-0.0
  included, unlike +0.0), weight decay never touches it.
- A scanned leaf with only some layers at 0 (a *partially frozen stack*)
  stays with `inner`, so its state is allocated for the whole stacked leaf;
  its gradient is zeroed on the frozen layers before `inner` (global-norm
  clipping then sees the trainable layers only) and its update replaced by
  -0.0 there after `inner` (weight decay, Adafactor's parameter scaling):
  the frozen layers stay bit-identical too.
- Other scales multiply `inner`'s update (per layer along the leading axis).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5xlike.finetuning import selection

FROZEN, TRAINED = "frozen", "trained"


def _stateless(fn: Callable[[jax.Array, np.ndarray], jax.Array],
               scales: Any) -> optax.GradientTransformation:
  """Applies fn(update, scale) per leaf; leaves another transformation owns
  (`optax.MaskedNode` inside `multi_transform`) pass through."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda s, u: u if isinstance(u, optax.MaskedNode) else fn(u, s),
                        scales, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def frozen() -> optax.GradientTransformation:
  """Updates of -0.0 everywhere and no state: `p + update` is `p`, bit for bit."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (
          jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state))


def _zero_frozen_grads(g: jax.Array, s: np.ndarray) -> jax.Array:
  return g if s.all() else jnp.where(selection.expand(s != 0, g.ndim), g, jnp.zeros_like(g))


def _scale(u: jax.Array, s: np.ndarray) -> jax.Array:
  if (s == 1).all():
    return u
  scaled = (u * selection.expand(s, u.ndim)).astype(u.dtype)
  return jnp.where(selection.expand(s != 0, u.ndim), scaled, jnp.full_like(u, -0.0))


def scaled(inner: optax.GradientTransformation, scales: Any) -> optax.GradientTransformation:
  """`inner` with each parameter's (each layer's) update multiplied by its scale.

  Args:
    inner: any optax transformation (e.g. `optim.per_layer(adafactor, ...)`).
    scales: tree like the parameters; float arrays of shape () or [L].
  Returns:
    The transformation; frozen leaves have no state in it (see module doc).
  """
  scales = jax.tree.map(lambda s: np.asarray(s, np.float32), scales)
  leaves = jax.tree.leaves(scales)
  if not any(s.any() for s in leaves):
    raise ValueError("every parameter is frozen: nothing to fine-tune")
  steps = []
  if any(s.any() and not s.all() for s in leaves):
    steps.append(_stateless(_zero_frozen_grads, scales))
  steps.append(inner)
  if any(s.any() and not (s == 1).all() for s in leaves):
    steps.append(_stateless(_scale, scales))
  trained = steps[0] if len(steps) == 1 else optax.chain(*steps)
  if all(s.any() for s in leaves):
    return trained
  labels = jax.tree.map(lambda s: TRAINED if s.any() else FROZEN, scales)
  return optax.multi_transform({TRAINED: trained, FROZEN: frozen()}, labels)
