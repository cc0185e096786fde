"""Sparse fine-tuning by the magnitude of change (LT-SFT; Ansell et al. 2022,
"Composable Sparse Fine-Tuning for Cross-Lingual Transfer", ACL), following the
reference code (cambridgeltl/composable-sft `src/sft/lt_sft.py`,
`LotteryTicketSparseFineTuner`, and `src/sft/trainer.py`, `SparseFineTuner`).

One run, two phases, counted in optimizer updates from the run's start
(a fresh optimizer state: `runs/finetune.gin`'s `fresh_optimizer_state`):

  steps 1..K (`dense_steps`): every candidate parameter (and every dense one)
    trains.
  at step K: the trainable subset is chosen: the `k` candidate scalars with
    the largest |theta_K - theta_0| over *all* candidate leaves together
    (global, as the reference's `unfreeze_k_most_changed_params`: one
    threshold over every maskable parameter; `lax.top_k` on the concatenation
    in tree order, ties to the lower flat index, so the choice is
    deterministic); every parameter is reset to theta_0 (bit for bit), and the
    inner optimizer's state starts afresh, its learning-rate schedule included
    (the reference sets `self.optimizer = None; self.lr_scheduler = None`
    before each phase).
  steps K+1..: only the chosen scalars and the dense parameters train from
    theta_0; the other candidates stay theta_0 bit for bit (their gradients
    are zeroed before the inner optimizer, their updates are -0.0, and
    `apply_updates` writes theta_0 there).

The reference runs the two phases for the same number of epochs or steps in
its example scripts (`full_ft_max_epochs_per_iteration` =
`sparse_ft_max_epochs_per_iteration`); the phases here are equal when the run
has 2 K updates (`finetune/sparse_ft.gin`: K = 500 of runs/finetune.gin's
1,000; `export` logs a warning when they were not).

Which parameters (reference: `maskable_params` = the base model's parameters,
embeddings included; its scripts pass `--freeze_layer_norm`; the head, not
maskable, trains densely and is stored whole):
  candidates: `groups` (default None: every parameter that is neither frozen
    nor dense: the attention and MLP matrices, token embeddings, relative
    position biases; `(MATRICES,)` gives the attention / MLP matrices only,
    plus with `include_embeddings` the token embeddings and relative position
    biases);
  dense: `dense_groups` (default the output layer / task head, `HEAD`) train in
    both phases (reset to theta_0 at step K with everything else) and their
    whole change goes into the delta;
  frozen: `frozen_groups` (default the norms, `selection.NORM_PATTERN`) and
    anything outside the other two: no gradient, no optimizer state
    (`updates.scaled`).

Per-entry optimizer statistics: the reference trains with Adam, whose moments
are per entry. A factored second moment (Adafactor's row and column means,
for matrices of both dimensions >= 128) mixes the zeroed gradients of the
unchosen entries into the chosen ones' statistics and inflates their updates by
about 1/sqrt(density) (the chosen entries' mean |first sparse update| at 5%
scattered over a 256 x 512 matrix: 4.5x that of all entries training). With
`per_entry_statistics` (default) the inner optimizer sees every candidate leaf
flattened to one axis per layer ([n], or [L, n] for a scanned leaf), which it
never factors: an entry's update does not depend on how many others train.
The flattened statistics are not shaped like their parameter, so FSDP rules
replicate them (4 bytes per candidate per device with Adafactor); where that
does not fit, bind `optim.adafactor.factored = False` (per-entry statistics
shaped and sharded like the parameters) with `per_entry_statistics = False`.

State: `SparseState(count, theta0, mask, inner)` is the optimizer state, so
checkpoints hold it and a resume continues bit for bit (a resume after step K
keeps the chosen subset). Memory: theta0 (a float32 copy of the candidate and
dense parameters: 4 bytes each) and the mask (bool: 1 byte each), i.e. +5
bytes per parameter in device memory and in every checkpoint, on top of the
inner optimizer's state. The selection at step K concatenates the candidates'
changes into one vector (4 bytes per candidate, once, on one device when
sharded).

The trainer applies updates through `apply_updates` (the protocol hook),
which is what makes the reset exact: p + (theta0 - p) is not theta0 in
float32 in general.

After the final step, `export` writes `MODEL_DIR/sparse_delta/`
(`sparse_delta`: per parameter the flat indices of the trained scalars, the
dense parameters' all, and theta - theta0 there in float64, so base + delta is
theta bit for bit) with `base_checkpoint` = INITIAL_CHECKPOINT_PATH;
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
#: The output layer and task heads: T5's / the decoder's untied `logits_dense`, the
#: classifier's `classifier/*`.
HEAD = r"(^|/)(logits_dense|classifier)/"


class SparseState(NamedTuple):
  """Optimizer state of `sparse_phases`.

  Attributes:
    count: int32 (), optimizer updates done in this run.
    theta0: the candidate and dense leaves' values at the run's start (None
      elsewhere).
    mask: bool, shape of each candidate or dense leaf: the scalars that train (all
      of them before step K; after it the chosen k candidates and the dense layers;
      None elsewhere).
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
                  num_trainable: int, dense: Any = None) -> optax.GradientTransformation:
  """`inner` for `dense_steps` updates, then only on the top-`num_trainable` changes.

  Args:
    inner: the optimizer of the candidate parameters (frozen leaves handled by it).
    candidates: tree like the parameters: None for leaves that are no
      candidates, else a NumPy bool array (shape () or [L], per layer of a
      scanned leaf: `selection`) of the candidate layers.
    dense_steps: K >= 1.
    num_trainable: k, at most the number of candidate scalars.
    dense: None, or a tree like `candidates` of the layers trained in both phases
      (never ranked; reset to theta_0 at step K like the candidates).
  """
  if dense is None:
    dense = jax.tree.map(lambda c: None, candidates, is_leaf=_is_none)

  def either(c, d):
    if c is None and d is None:
      return None
    return np.logical_or(False if c is None else c, False if d is None else d)
  tracked = jax.tree.map(either, candidates, dense, is_leaf=_is_none)

  def init(params):
    theta0 = jax.tree.map(lambda t, p: None if t is None else p, tracked, params,
                          is_leaf=_is_none)
    mask = jax.tree.map(
        lambda t, p: None if t is None else jnp.broadcast_to(
            jnp.asarray(selection.expand(t, p.ndim)), p.shape),
        tracked, params, is_leaf=_is_none)
    return SparseState(jnp.zeros((), jnp.int32), theta0, mask, inner.init(params))

  def select(params, updates_, theta0):
    flat_c = jax.tree.leaves(candidates, is_leaf=_is_none)
    flat_d = jax.tree.leaves(dense, is_leaf=_is_none)
    keys = [i for i, c in enumerate(flat_c) if c is not None]
    flat_p, treedef = jax.tree.flatten(params)
    flat_u = jax.tree.leaves(updates_)
    flat_t = jax.tree.leaves(theta0, is_leaf=_is_none)
    scores = []
    for i in keys:
      p, u, t = flat_p[i], flat_u[i], flat_t[i]
      change = jnp.abs(optax.apply_updates(p, u) - t)
      allowed = jnp.asarray(selection.expand(flat_c[i], p.ndim))
      scores.append(jnp.where(allowed, change, -1.0))
    chosen = dict(zip(keys, top_k_masks(scores, num_trainable)))
    masks = []
    for i, p in enumerate(flat_p):
      m = chosen.get(i)
      if flat_d[i] is not None:  # Dense layers stay in the mask.
        d = jnp.broadcast_to(jnp.asarray(selection.expand(flat_d[i], p.ndim)), p.shape)
        m = d if m is None else m | d
      masks.append(m)
    return jax.tree.unflatten(treedef, masks)

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
    # A fresh inner state for the sparse phase: zero moments and a step count of 0,
    # so the learning-rate schedule restarts (only the structure and zeros matter).
    fresh = inner.init(params)
    inner_state = jax.tree.map(lambda a, b: jnp.where(switch, a, b), fresh, inner_state)
    return new_updates, SparseState(count, state.theta0, mask, inner_state)

  return optax.GradientTransformation(init, update)


def _shape_or_none(x: Any) -> bool:
  return x is None or isinstance(x, tuple)


def per_entry(inner: optax.GradientTransformation, shapes: Any) -> optax.GradientTransformation:
  """`inner` on leaves reshaped to `shapes` (None: as they are), updates reshaped back.

  Args:
    inner: any optax transformation that takes the parameters in `update`.
    shapes: tree like the parameters: None, or the shape (a tuple) the leaf takes for
      `inner`. With [n] (or [L, n] for a scanned leaf, one row per layer:
      `optim.per_layer` still vmaps axis 0) Adafactor keeps per-entry second moments
      (it factors matrices only); its RMS clipping and parameter scaling see the same
      entries in any shape.
  """
  def reshape(tree):
    return jax.tree.map(lambda s, x: x if s is None else x.reshape(s), shapes, tree,
                        is_leaf=_shape_or_none)

  def update(updates_, state, params=None):
    if params is None:
      raise ValueError("per_entry needs the parameters in update()")
    new, state = inner.update(reshape(updates_), state, reshape(params))
    return jax.tree.map(lambda u, p: u.reshape(p.shape), new, params), state

  return optax.GradientTransformation(lambda params: inner.init(reshape(params)), update)


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
    groups: candidate parameter groups; None (default): every parameter outside
      `frozen_groups` and `dense_groups` (the reference's base-model parameters).
    include_embeddings: with `groups` set, also the token embeddings and relative
      position biases.
    export_delta: write MODEL_DIR/sparse_delta after the final step.
    dense_groups: trained in both phases, whole (default the output layer / head).
    frozen_groups: never trained (default the norms).
    per_entry_statistics: the inner optimizer sees the candidates flattened (no
      factored statistics; module docstring).
  """
  dense_steps: int = 100
  num_trainable: int | None = None
  fraction: float | None = None
  groups: Sequence[selection.GroupSpec] | None = None
  include_embeddings: bool = False
  export_delta: bool = True
  dense_groups: Sequence[selection.GroupSpec] = (HEAD,)
  frozen_groups: Sequence[selection.GroupSpec] = (selection.NORM_PATTERN,)
  per_entry_statistics: bool = True

  def __post_init__(self):
    if self.dense_steps < 1:
      raise ValueError(f"dense_steps must be >= 1, got {self.dense_steps}")
    if (self.num_trainable is None) == (self.fraction is None):
      raise ValueError("set exactly one of num_trainable and fraction, got "
                       f"num_trainable={self.num_trainable}, fraction={self.fraction}")
    if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
      raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

  def _frozen_and_dense(self, params: Any) -> tuple[Any, Any]:
    """(frozen, dense) masks; frozen wins over dense."""
    frozen = selection.select(params, self.frozen_groups)
    dense = selection.select(params, self.dense_groups)
    return frozen, jax.tree.map(lambda d, f: np.asarray(d) & ~np.asarray(f), dense, frozen)

  def candidates_mask(self, params: Any) -> Any:
    """Per leaf (per layer): the candidate parameters (bool, `selection` masks)."""
    frozen, dense = self._frozen_and_dense(params)
    if self.groups is None:
      mask = jax.tree.map(lambda f: np.ones(np.shape(f), bool), frozen)
    else:
      mask = selection.select(params, self.groups, require_match=True)
      if self.include_embeddings:
        mask = selection.union(mask, selection.outside_stacks(params,
                                                              selection.EMBEDDING_PATTERN))
    return jax.tree.map(lambda m, f, d: np.asarray(m) & ~np.asarray(f) & ~np.asarray(d),
                        mask, frozen, dense)

  def dense_mask(self, params: Any) -> Any:
    """Per leaf (per layer): the parameters trained whole in both phases."""
    return self._frozen_and_dense(params)[1]

  def num_chosen(self, params: Any) -> int:
    """k: the number of candidate scalars trained after the dense phase."""
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
    return jax.tree.map(lambda c, d: (np.asarray(c) | np.asarray(d)).astype(np.float32),
                        self.candidates_mask(params), self.dense_mask(params))

  def wrap_optimizer(self, optimizer, params):
    candidates = jax.tree.map(lambda m: m if np.asarray(m).any() else None,
                              self.candidates_mask(params))
    dense = jax.tree.map(lambda m: m if np.asarray(m).any() else None, self.dense_mask(params))
    inner = updates.scaled(optimizer, self.update_scales(params))
    if self.per_entry_statistics:
      def flat(leaf: selection.Leaf, c: Any) -> tuple[int, ...] | None:
        if c is None:
          return None
        size = int(np.prod(leaf.shape))
        return (leaf.num_layers, size // leaf.num_layers) if leaf.scanned else (size,)
      shapes = jax.tree.map(flat, selection.leaves(params), candidates,
                            is_leaf=lambda x: isinstance(x, selection.Leaf) or x is None)
      inner = per_entry(inner, shapes)
    return sparse_phases(inner, candidates, self.dense_steps, self.num_chosen(params), dense)

  def apply_updates(self, params, updates_, opt_state):
    return apply_sparse_updates(params, updates_, opt_state, self.dense_steps)

  def describe(self, params):
    candidates, total = selection.count(params, self.candidates_mask(params))
    dense = selection.count(params, self.dense_mask(params))[0]
    k = self.num_chosen(params)
    return [f"{self!r}: {self.dense_steps} dense step(s) over {candidates:,} candidate "
            f"parameters (of {total:,}), then the sparse phase trains {k:,} parameters "
            f"({100.0 * k / candidates:.2f}% of the candidates) from the initial values",
            f"  trained whole in both phases (dense groups): {dense:,} parameters; frozen: "
            f"{total - candidates - dense:,}",
            f"  optimizer state adds theta0 + mask: {5 * (candidates + dense):,} bytes"]

  def export(self, params, model_dir, step, base_checkpoint):
    if not self.export_delta:
      return []
    step_dir = epath.Path(model_dir) / f"checkpoint_{step}"
    theta0, mask, count = sparse_delta.read_sparse_state(step_dir)
    if count < self.dense_steps:
      log.warning("the run ended after %d of %d dense steps: the sparse delta holds every "
                  "candidate", count, self.dense_steps)
    elif count != 2 * self.dense_steps:
      log.warning("the sparse phase ran %d updates, the dense phase %d (the reference runs "
                  "phases of equal length: TRAIN_STEPS = the checkpoint's step + 2 x "
                  "SPARSE_DENSE_STEPS)", count - self.dense_steps, self.dense_steps)
    delta = sparse_delta.from_params(params, theta0, mask, base_checkpoint=base_checkpoint,
                                     step=step)
    where = epath.Path(model_dir) / sparse_delta.DIRECTORY
    if jax.process_index() == 0:
      sparse_delta.save(where, delta)
    return [where]
