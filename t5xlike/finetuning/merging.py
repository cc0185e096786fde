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
  Belilovsky 2023): per layer of each task vector, the top `beta` fraction by
  |tau| and the bottom `gamma` fraction are dropped, then base + lam * sum of
  the masked tau_i. A "layer" is a parameter tensor, or one slice along the
  leading axis of a scanned (stacked) leaf (`layered=True`).
- `greedy_soup(names, score, evaluate_soup)`: Wortsman et al.'s greedy soup
  order and acceptance rule.
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


def layer_counts(size: int, beta: float, gamma: float) -> tuple[int, int]:
  """(dropped at the top, dropped at the bottom) of a layer of `size` scalars:
  round(beta * size) and round(gamma * size) (Python's round: half to even)."""
  top, bottom = int(round(beta * size)), int(round(gamma * size))
  if top + bottom > size:
    raise ValueError(f"beta={beta} + gamma={gamma} drop more than a layer's {size} entries")
  return top, bottom


def breadcrumbs_mask(tau: np.ndarray, beta: float, gamma: float,
                     layered: bool = False) -> np.ndarray:
  """Bool mask of `tau`'s kept entries: per layer, all but the top `beta` and the
  bottom `gamma` fractions by |tau|.

  Ranks by |tau| with a stable sort of the flattened layer: among equal
  magnitudes the lower flat index ranks lower (is dropped first at the bottom,
  last at the top), so exactly round(beta * n) and round(gamma * n) entries of
  each layer of n entries are dropped. `layered`: axis 0 indexes layers (a
  scanned leaf); otherwise the whole tensor is one layer.
  """
  if not (0.0 <= beta <= 1.0 and 0.0 <= gamma <= 1.0):
    raise ValueError(f"beta and gamma must be in [0, 1], got beta={beta}, gamma={gamma}")
  tau = np.asarray(tau)
  layers = tau.reshape(tau.shape[0], -1) if layered and tau.ndim >= 1 else tau.reshape(1, -1)
  keep = np.zeros(layers.shape, bool)
  for row, values in enumerate(layers):
    top, bottom = layer_counts(values.size, beta, gamma)
    order = np.argsort(np.abs(values), kind="stable")
    keep[row, order[bottom:values.size - top]] = True
  return keep.reshape(tau.shape)


def breadcrumbs(base: np.ndarray, thetas: Sequence[np.ndarray], beta: float, gamma: float,
                lam: float = 1.0, layered: bool = False) -> np.ndarray:
  """base + lam * sum_i mask_i * tau_i (masks from `breadcrumbs_mask` of each tau_i).

  Args:
    base: the base checkpoint's parameter (any shape).
    thetas: the fine-tuned checkpoints' parameter, each shaped as `base`.
    beta: fraction of each layer's entries dropped at the top (largest |tau|).
    gamma: fraction dropped at the bottom (smallest |tau|).
    lam: the scale of the summed masked task vectors.
    layered: axis 0 indexes layers (a scanned leaf), masked one slice at a time.

  Returns:
    The merged parameter, shaped and typed as `base` (float64 arithmetic, one rounding).
  """
  base64 = np.asarray(base, np.float64)
  total = np.zeros(base64.shape, np.float64)
  for theta in thetas:
    tau = np.asarray(theta, np.float64) - base64
    total += np.where(breadcrumbs_mask(tau, beta, gamma, layered), tau, 0.0)
  return (base64 + float(lam) * total).astype(np.asarray(base).dtype)


def greedy_soup(names: Sequence[str], score: Callable[[str], float],
                evaluate_soup: Callable[[Sequence[str]], float],
                higher_is_better: bool = True) -> tuple[list[str], list[dict]]:
  """Wortsman et al. 2022's greedy soup (their Algorithm 1).

  Ingredients are ranked by their own held-out `score` (best first, ties in
  the given order); the soup starts with the best one; each next ingredient
  is added when the uniform soup with it scores no worse than the soup
  without it (`evaluate_soup(members)`), else skipped, and the next is tried.

  Returns:
    (the soup's members in the order added, a log: one dict per decision
    {"name", "alone", "soup_with", "added"}).
  """
  if not names:
    raise ValueError("a greedy soup needs at least one checkpoint")
  better = (lambda a, b: a >= b) if higher_is_better else (lambda a, b: a <= b)
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
