"""Sparse fine-tuning by the magnitude of change (LT-SFT; Ansell et al. 2022,
"Composable Sparse Fine-Tuning for Cross-Lingual Transfer", ACL).

One run, two phases, counted in optimizer updates from the run's start
(a fresh optimizer state: `runs/finetune.gin`'s `fresh_optimizer_state`):

  steps 1..K (`dense_steps`): every candidate parameter trains (dense).
  at step K: the trainable subset is chosen: the `k` candidate scalars with
    the largest |theta_K - theta_0| over *all* candidate leaves together
    (global, as the paper ranks; `lax.top_k` on the concatenation in tree
    order, ties to the lower flat index, so the choice is deterministic);
    every candidate is reset to theta_0 (bit for bit) and the inner
    optimizer's state starts afresh.
  steps K+1..: only the chosen scalars train from theta_0; the others stay
    theta_0 bit for bit (their gradients are zeroed before the inner
    optimizer, their updates are -0.0, and `apply_updates` writes theta_0
    there).

Candidates: the parameters selected by `groups` (`selection.GroupSpec`s;
default the attention and MLP matrices, plus with `include_embeddings` the
token embeddings and relative position biases); the other parameters are
frozen for the whole run (no gradient, no optimizer state: `updates.scaled`).

State: `SparseState(count, theta0, mask, inner)` is the optimizer state, so
checkpoints hold it and a resume continues bit for bit (a resume after step K
keeps the chosen subset). Memory: theta0 (a float32 copy of the candidate
parameters: 4 bytes per candidate) and the mask (bool: 1 byte per candidate),
i.e. +5 bytes per candidate parameter in device memory and in every
checkpoint, on top of the inner optimizer's state. The selection at step K
concatenates the candidates' changes into one vector (4 bytes per candidate,
once, on one device when sharded).

The trainer applies updates through `apply_updates` (the protocol hook),
which is what makes the reset exact: p + (theta0 - p) is not theta0 in
float32 in general.

After the final step, `export` writes `MODEL_DIR/sparse_delta/`
(`sparse_delta`: per parameter the flat indices of the chosen scalars and
theta - theta0 there in float64, so base + delta is theta bit for bit) with
`base_checkpoint` = INITIAL_CHECKPOINT_PATH;
`python -m t5xlike.merge --method=add_deltas` adds deltas to a base. Use on
its own (not inside `base.Combine`, which does not call techniques'
`wrap_optimizer`).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from t5xlike.finetuning import base, selection, sparse_delta, updates

log = logging.getLogger(__name__)

#: Attention and MLP weight matrices (the kernels of `attention/*` and `mlp/*`).
MATRICES = r"(attention|mlp)/[^/]+/kernel$"


class SparseState(NamedTuple):
  """Optimizer state of `sparse_phases`.

  Attributes:
    count: int32 (), optimizer updates done in this run.
    theta0: the candidate leaves' values at the run's start (None elsewhere).
    mask: bool, shape of each candidate leaf: the scalars that train (all
      candidates before step K, the chosen k after it; None elsewhere).
    inner: the inner optimizer's state.
  """
  # Shadows tuple.count, which typeshed types as a method; the name is kept because
  # checkpoints hold it ('opt_state/count', read by `sparse_delta.read_sparse_state`).
  count: jax.Array  # type: ignore[assignment]
  theta0: Any
  mask: Any
  inner: Any


def _is_none(x):
  return x is None


def top_k_masks(scores: Sequence[jax.Array], k: int) -> list[jax.Array]:
  """Bool masks, shaped as `scores`, of the k largest entries over all arrays together.

  Ties go to the lower index of the concatenation of the flattened arrays
  (in the given order). Entries that must never be chosen should score -1
  (changes are >= 0).
  """
  flat = jnp.concatenate([jnp.ravel(s).astype(jnp.float32) for s in scores])
  _, chosen = jax.lax.top_k(flat, k)
  hit = jnp.zeros(flat.shape, jnp.bool_).at[chosen].set(True)
  out, start = [], 0
  for s in scores:
    out.append(hit[start:start + s.size].reshape(s.shape))
    start += s.size
  return out


def sparse_phases(inner: optax.GradientTransformation, candidates: Any, dense_steps: int,
                  num_trainable: int) -> optax.GradientTransformation:
  """`inner` for `dense_steps` updates, then only on the top-`num_trainable` changes.

  Args:
    inner: the optimizer of the candidate parameters (frozen leaves handled by it).
    candidates: tree like the parameters: None for leaves that are no
      candidates, else a NumPy bool array (shape () or [L], per layer of a
      scanned leaf: `selection`) of the candidate layers.
    dense_steps: K >= 1.
    num_trainable: k, at most the number of candidate scalars.
  """
  def init(params):
    theta0 = jax.tree.map(lambda c, p: None if c is None else p, candidates, params,
                          is_leaf=_is_none)
    mask = jax.tree.map(
        lambda c, p: None if c is None else jnp.broadcast_to(
            jnp.asarray(selection.expand(c, p.ndim)), p.shape),
        candidates, params, is_leaf=_is_none)
    return SparseState(jnp.zeros((), jnp.int32), theta0, mask, inner.init(params))

  def select(params, updates_, theta0):
    keys = [i for i, c in enumerate(jax.tree.leaves(candidates, is_leaf=_is_none))
            if c is not None]
    flat_c = jax.tree.leaves(candidates, is_leaf=_is_none)
    flat_p, treedef = jax.tree.flatten(params)
    flat_u = jax.tree.leaves(updates_)
    flat_t = jax.tree.leaves(theta0, is_leaf=_is_none)
    scores = []
    for i in keys:
      p, u, t = flat_p[i], flat_u[i], flat_t[i]
      change = jnp.abs(optax.apply_updates(p, u) - t)
      allowed = jnp.asarray(selection.expand(flat_c[i], p.ndim))
      scores.append(jnp.where(allowed, change, -1.0))
    masks = dict(zip(keys, top_k_masks(scores, num_trainable)))
    return jax.tree.unflatten(treedef, [masks.get(i) for i in range(len(flat_p))])

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("sparse_phases needs the parameters in update()")
    zero_off = lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros_like(g))
    grads = jax.tree.map(zero_off, state.mask, grads, is_leaf=_is_none)
    new_updates, inner_state = inner.update(grads, state.inner, params)
    new_updates = jax.tree.map(
        lambda m, u: u if m is None else jnp.where(m, u, jnp.full_like(u, -0.0)),
        state.mask, new_updates, is_leaf=_is_none)
    count = state.count + 1
    switch = count == dense_steps
    mask = jax.lax.cond(switch, lambda: select(params, new_updates, state.theta0),
                        lambda: state.mask)
    fresh = inner.init(params)  # Only the structure and zeros matter.
    inner_state = jax.tree.map(lambda a, b: jnp.where(switch, a, b), fresh, inner_state)
    return new_updates, SparseState(count, state.theta0, mask, inner_state)

  return optax.GradientTransformation(init, update)


def apply_sparse_updates(params: Any, updates_: Any, state: SparseState,
                         dense_steps: int) -> Any:
  """params + updates, with theta0 on every candidate at step K and outside the
  mask after it (exactly theta0's bits)."""
  new = optax.apply_updates(params, updates_)
  reset = state.count == dense_steps
  sparse = state.count > dense_steps

  def pick(t, m, n):
    if t is None:
      return n
    return jnp.where(reset | (sparse & ~m), t, n)
  return jax.tree.map(pick, state.theta0, state.mask, new, is_leaf=_is_none)


@dataclasses.dataclass(frozen=True)
class SparseFineTuning(base.FineTuning):
  """LT-SFT in one run (see the module docstring).

  Attributes:
    dense_steps: K, updates of the dense phase (>= 1).
    num_trainable: k, scalars trained after it; or
    fraction: k as a fraction of the candidate scalars (exactly one of the two).
    groups: candidate parameter groups (default the attention/MLP matrices).
    include_embeddings: also the token embeddings and relative position biases.
    export_delta: write MODEL_DIR/sparse_delta after the final step.
  """
  dense_steps: int = 100
  num_trainable: int | None = None
  fraction: float | None = None
  groups: Sequence[selection.GroupSpec] = (MATRICES,)
  include_embeddings: bool = False
  export_delta: bool = True

  def __post_init__(self):
    if self.dense_steps < 1:
      raise ValueError(f"dense_steps must be >= 1, got {self.dense_steps}")
    if (self.num_trainable is None) == (self.fraction is None):
      raise ValueError("set exactly one of num_trainable and fraction, got "
                       f"num_trainable={self.num_trainable}, fraction={self.fraction}")
    if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
      raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

  def candidates_mask(self, params: Any) -> Any:
    """Per leaf (per layer): the candidate parameters (bool, `selection` masks)."""
    mask = selection.select(params, self.groups, require_match=True)
    if self.include_embeddings:
      mask = selection.union(mask, selection.outside_stacks(params,
                                                            selection.EMBEDDING_PATTERN))
    return mask

  def num_chosen(self, params: Any) -> int:
    """k: the number of scalars trained after the dense phase."""
    candidates = selection.count(params, self.candidates_mask(params))[0]
    if self.fraction is not None:
      k = int(round(self.fraction * candidates))
    else:
      assert self.num_trainable is not None  # __post_init__: exactly one of the two is set.
      k = self.num_trainable
    if not 1 <= k <= candidates:
      raise ValueError(f"the sparse phase trains {k} parameters but the groups hold "
                       f"{candidates:,} candidates (need 1 <= k <= candidates)")
    return k

  def update_scales(self, params):
    return jax.tree.map(lambda m: np.asarray(m, np.float32), self.candidates_mask(params))

  def wrap_optimizer(self, optimizer, params):
    candidates = jax.tree.map(lambda m: m if np.asarray(m).any() else None,
                              self.candidates_mask(params))
    return sparse_phases(updates.scaled(optimizer, self.update_scales(params)), candidates,
                         self.dense_steps, self.num_chosen(params))

  def apply_updates(self, params, updates_, opt_state):
    return apply_sparse_updates(params, updates_, opt_state, self.dense_steps)

  def describe(self, params):
    candidates, total = selection.count(params, self.candidates_mask(params))
    k = self.num_chosen(params)
    return [f"{self!r}: {self.dense_steps} dense step(s) over {candidates:,} candidate "
            f"parameters (of {total:,}), then the sparse phase trains {k:,} parameters "
            f"({100.0 * k / candidates:.2f}% of the candidates) from the initial values",
            f"  optimizer state adds theta0 + mask: {5 * candidates:,} bytes"]

  def export(self, params, model_dir, step, base_checkpoint):
    if not self.export_delta:
      return []
    step_dir = epath.Path(model_dir) / f"checkpoint_{step}"
    theta0, mask, count = sparse_delta.read_sparse_state(step_dir)
    if count < self.dense_steps:
      log.warning("the run ended after %d of %d dense steps: the sparse delta holds every "
                  "candidate", count, self.dense_steps)
    delta = sparse_delta.from_params(params, theta0, mask, base_checkpoint=base_checkpoint,
                                     step=step)
    where = epath.Path(model_dir) / sparse_delta.DIRECTORY
    if jax.process_index() == 0:
      sparse_delta.save(where, delta)
    return [where]
