"""Merging checkpoints of one architecture: the math, one parameter tensor at a time.

Every function takes NumPy arrays of one parameter (same path, same shape in
every checkpoint) and returns the merged array in the inputs' dtype;
arithmetic is float64, rounded once at the end, so a uniform soup of N copies
of one checkpoint *is* that checkpoint, bit for bit.

- `uniform_soup(thetas)`: the mean (Wortsman et al. 2022, "Model soups").
- `task_arithmetic(base, thetas, lambdas)`: base + sum_i lambda_i tau_i with
  task vectors tau_i = theta_i - base (Ilharco et al. 2023, "Editing models
  with task arithmetic").
- `breadcrumbs(base, thetas, beta, gamma, lam)`: Model Breadcrumbs (Davari &
  Belilovsky 2023): each task vector is masked, per row (default) or per
  tensor, to drop its `beta` fraction of largest and `gamma` fraction of
  smallest |tau| entries, then base + lam * sum of the masked tau_i.
- `greedy_soup(names, score, evaluate_soup)`: Wortsman et al.'s greedy soup
  order and acceptance rule (a strict improvement).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def uniform_soup(thetas: Sequence[np.ndarray]) -> np.ndarray:
  """The mean of the arrays (float64 sum, one rounding)."""
  if not thetas:
    raise ValueError("a soup needs at least one checkpoint")
  total = np.zeros(np.shape(thetas[0]), np.float64)
  for theta in thetas:
    total += np.asarray(theta, np.float64)
  return (total / len(thetas)).astype(np.asarray(thetas[0]).dtype)


def task_arithmetic(base: np.ndarray, thetas: Sequence[np.ndarray],
                    lambdas: Sequence[float]) -> np.ndarray:
  """base + sum_i lambdas[i] * (thetas[i] - base), in float64, rounded once."""
  if len(thetas) != len(lambdas):
    raise ValueError(f"{len(thetas)} checkpoints but {len(lambdas)} lambdas")
  base64 = np.asarray(base, np.float64)
  out = base64.copy()
  for theta, lam in zip(thetas, lambdas):
    out += float(lam) * (np.asarray(theta, np.float64) - base64)
  return out.astype(np.asarray(base).dtype)


#: Where Breadcrumbs ranks |tau|: 'row' (along the last axis, the official code's
#: `TaskVectorMiddleKeep`) or 'tensor' (mergekit's `magnitude_outliers`).
GRANULARITIES = ("row", "tensor")


def _floor(fraction: float, size: int) -> int:
  """floor(fraction * size), with a product within 1e-9 of an integer taken as that
  integer (0.15 * 100 is 15.000000000000002 and 0.29 * 100 is 28.999999999999996 in
  binary floating point: either would otherwise floor to a count nobody asked for)."""
  product = float(fraction) * size
  return int(np.floor(product + 1e-9))


def layer_counts(size: int, beta: float, gamma: float) -> tuple[int, int]:
  """(dropped at the top, dropped at the bottom) of a unit of `size` entries, counted as
  the official code counts (`TaskVectorMiddleKeep.mask_remove_top` / `mask_keep_top`:
  `int(n * fraction)`, a floor): top = floor(beta * n), kept = floor((1 - beta -
  gamma) * n), bottom = the rest. mergekit's `magnitude_outliers` floors the same two
  counts (its `gamma` and `density`)."""
  if not (0.0 <= beta <= 1.0 and 0.0 <= gamma <= 1.0):
    raise ValueError(f"beta and gamma must be in [0, 1], got beta={beta}, gamma={gamma}")
  if beta + gamma > 1.0 + 1e-12:
    raise ValueError(f"beta={beta} + gamma={gamma} drop more than a layer's {size} entries")
  top = _floor(beta, size)
  kept = min(_floor(max(1.0 - beta - gamma, 0.0), size), size - top)
  return top, size - top - kept


def breadcrumbs_mask(tau: np.ndarray, beta: float, gamma: float, granularity: str = "row",
                     layered: bool = False) -> np.ndarray:
  """Bool mask of `tau`'s kept entries: per unit, all but the top `beta` and the bottom
  `gamma` fractions by |tau| (counts as `layer_counts`).

  Units (`granularity`):
    'row' (default, the official code: `src/task_vectors.py`,
      `TaskVectorMiddleKeep`, which runs `torch.topk` along the last axis): each
      slice along the last axis, i.e. each row of a [in, out] kernel (out entries)
      and each layer's rows of a scanned leaf alike; a 1-D tensor is one row.
    'tensor' (mergekit's `breadcrumbs`): the whole tensor, or with `layered` one
      slice along axis 0 (a layer of a scanned leaf).
  A scalar (0-d) is kept, as the official code keeps it. The paper describes the mask
  per layer; the official code, which produced its results, masks per row, and the
  default follows the code.

  Ranks by |tau| with a stable sort of each unit: among equal magnitudes the lower
  index ranks lower (is dropped first at the bottom, last at the top), so exactly the
  counts of `layer_counts` are dropped (the official code's `torch.topk` breaks ties
  in an unspecified order).
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
  tau = np.asarray(tau)
  if tau.ndim == 0:
    layer_counts(1, beta, gamma)  # Validates beta and gamma.
    return np.ones((), bool)
  if granularity == "row":
    units = tau.reshape(-1, tau.shape[-1])
  else:
    units = tau.reshape(tau.shape[0], -1) if layered else tau.reshape(1, -1)
  keep = np.zeros(units.shape, bool)
  top, bottom = layer_counts(units.shape[1], beta, gamma)
  for row, values in enumerate(units):
    order = np.argsort(np.abs(values), kind="stable")
    keep[row, order[bottom:values.size - top]] = True
  return keep.reshape(tau.shape)


def breadcrumbs(base: np.ndarray, thetas: Sequence[np.ndarray], beta: float, gamma: float,
                lam: float = 1.0, granularity: str = "row", layered: bool = False
                ) -> np.ndarray:
  """base + lam * sum_i mask_i * tau_i (masks from `breadcrumbs_mask` of each tau_i).

  The official code (`TaskVectorMiddleKeep(top_k_keep, top_k_remove)`, whose scripts
  pass them as `--beta` and `--gamma`) parameterises the same mask by the fraction
  *kept* and the fraction of largest entries removed; here `beta` is that removed
  top fraction and `gamma` the removed bottom fraction, so its
  (top_k_keep, top_k_remove) = (1 - beta - gamma, beta). mergekit's `breadcrumbs`
  takes (density, gamma) = (1 - beta - gamma, beta). The paper's beta and gamma are
  percentiles of |tau|: entries below the beta-th and above the gamma-th are dropped
  (its setting 85% and 99.3%), i.e. its beta is `gamma` here and its 1 - gamma is
  `beta` (`beta=0.007, gamma=0.85`).

  Args:
    base: the base checkpoint's parameter (any shape).
    thetas: the fine-tuned checkpoints' parameter, each shaped as `base`.
    beta: fraction of each unit's entries dropped at the top (largest |tau|).
    gamma: fraction dropped at the bottom (smallest |tau|).
    lam: the scale of the summed masked task vectors.
    granularity: 'row' (along the last axis, the official code) or 'tensor'.
    layered: with 'tensor', axis 0 indexes layers (a scanned leaf), masked one slice at
      a time ('row' units never cross layers).

  Returns:
    The merged parameter, shaped and typed as `base` (float64 arithmetic, one rounding).
  """
  base64 = np.asarray(base, np.float64)
  total = np.zeros(base64.shape, np.float64)
  for theta in thetas:
    tau = np.asarray(theta, np.float64) - base64
    total += np.where(breadcrumbs_mask(tau, beta, gamma, granularity, layered), tau, 0.0)
  return (base64 + float(lam) * total).astype(np.asarray(base).dtype)


def greedy_soup(names: Sequence[str], score: Callable[[str], float],
                evaluate_soup: Callable[[Sequence[str]], float],
                higher_is_better: bool = True) -> tuple[list[str], list[dict]]:
  """Wortsman et al. 2022's greedy soup (their Algorithm 1; the reference code,
  mlfoundations/model-soups `main.py`, adds an ingredient only when the held-out
  accuracy rises: `held_out_val_accuracy > best_val_acc_so_far`).

  Ingredients are ranked by their own held-out `score` (best first, ties in the given
  order); the soup starts with the best one; each next ingredient is added when the
  uniform soup with it scores strictly better than the soup without it
  (`evaluate_soup(members)`), else skipped, and the next is tried. A tie is skipped:
  an ingredient that changes nothing measurable stays out.

  Args:
    names: the ingredients (checkpoint paths).
    score: an ingredient's held-out score alone.
    evaluate_soup: the held-out score of the uniform soup of the given members.
    higher_is_better: False for losses.

  Returns:
    (the soup's members in the order added, a log: one dict per decision
    {"name", "alone", "soup_with", "added"}).
  """
  if not names:
    raise ValueError("a greedy soup needs at least one checkpoint")
  better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
  alone = {name: float(score(name)) for name in names}
  ranked = sorted(names, key=lambda n: -alone[n] if higher_is_better else alone[n])
  soup, best = [ranked[0]], alone[ranked[0]]
  log = [{"name": ranked[0], "alone": best, "soup_with": best, "added": True}]
  for name in ranked[1:]:
    value = float(evaluate_soup(soup + [name]))
    added = better(value, best)
    log.append({"name": name, "alone": alone[name], "soup_with": value, "added": added})
    if added:
      soup.append(name)
      best = value
  return soup, log
