"""The Fastfood transform: a structured random projection R^d -> R^D regenerated from a seed.

Le, Sarlós & Smola 2013 ("Fastfood: Approximating kernel expansions in loglinear
time"), as Li et al. 2018 ("Measuring the Intrinsic Dimension of Objective
Landscapes", Section 2 and its Fastfood appendix) and Aghajanyan et al. 2021
(Section 3: θ_D = θ_0 + P θ_d, "we use the Fastfood transform") use it for
intrinsic-dimension training:

  P x = (H G Π H B [x; 0])[:D] / sqrt(D * sum(G**2))

with L = the next power of two >= max(d, D), x zero-padded to L, B [L] random ±1
signs (diagonal), H the L x L Walsh-Hadamard matrix (Sylvester order, entries ±1,
unnormalised: H H^T = L I; applied in O(L log L) by `fwht`), Π a random permutation
(`(Π y)[i] = y[perm[i]]`), G [L] i.i.d. N(0, 1) (diagonal), and the first D rows
kept. The scale makes the columns unit vectors in expectation (exactly when D = L:
||H G Π H B e_j||^2 = L sum(G**2)) and P^T P = I in expectation; the columns are
nearly, not exactly, orthogonal (the normalisation of Li et al.'s code and its
PyTorch ports, e.g. jgamper/intrinsic-dimensionality `fastfood_vars` /
`fastfood_torched`).

Nothing of P is stored: `fastfood_vars(d, D, seed)` draws B, Π, G with
`np.random.default_rng(seed)`, the same on every host and in every run.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def next_power_of_two(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True, eq=False)
class FastfoodVars:
  """The random parts of one Fastfood projection R^d -> R^D (length L, a power of two).

  Attributes:
    signs: B, float32 [L] of ±1.
    perm: Π, int32 [L]: (Π y)[i] = y[perm[i]].
    gauss: G, float32 [L] ~ N(0, 1).
    norm: sqrt(D * sum(G**2)) (of the float32 G, summed in float64).
    in_dim, out_dim: d and D.
  """
  signs: np.ndarray
  perm: np.ndarray
  gauss: np.ndarray
  norm: float
  in_dim: int
  out_dim: int

  @property
  def length(self) -> int:
    return int(self.signs.shape[0])


@functools.lru_cache(maxsize=64)
def _cached_vars(in_dim: int, out_dim: int, seed: tuple[int, ...]) -> FastfoodVars:
  length = next_power_of_two(max(in_dim, out_dim))
  rng = np.random.default_rng(list(seed))
  signs = (rng.integers(0, 2, length) * 2 - 1).astype(np.float32)
  perm = rng.permutation(length).astype(np.int32)
  gauss = rng.standard_normal(length).astype(np.float32)
  norm = float(np.sqrt(out_dim * np.sum(gauss.astype(np.float64) ** 2)))
  return FastfoodVars(signs, perm, gauss, norm, in_dim, out_dim)


def fastfood_vars(in_dim: int, out_dim: int, seed: int | Sequence[int]) -> FastfoodVars:
  """B, Π, G of the projection R^in_dim -> R^out_dim drawn from `seed` (cached)."""
  if in_dim <= 0 or out_dim <= 0:
    raise ValueError(f"Fastfood needs positive dimensions, got d={in_dim}, D={out_dim}")
  key = (int(seed),) if isinstance(seed, (int, np.integer)) else tuple(int(s) for s in seed)
  return _cached_vars(int(in_dim), int(out_dim), key)


def fwht(x: jax.Array) -> jax.Array:
  """H x along the last axis (length a power of two): the unnormalised Walsh-Hadamard
  transform in Sylvester order (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]])."""
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f"fwht needs a power-of-two length, got {n}")
  lead = x.shape[:-1]
  half = 1
  while half < n:
    pairs = x.reshape(lead + (n // (2 * half), 2, half))
    top, bottom = pairs[..., 0, :], pairs[..., 1, :]
    x = jnp.stack([top + bottom, top - bottom], axis=-2).reshape(lead + (n,))
    half *= 2
  return x


def project(theta: jax.Array, ff: FastfoodVars) -> jax.Array:
  """P theta: float [d] -> [D] (float32 arithmetic)."""
  if theta.shape != (ff.in_dim,):
    raise ValueError(f"Fastfood: theta of shape {theta.shape}, expected ({ff.in_dim},)")
  x = jnp.pad(theta.astype(jnp.float32), (0, ff.length - ff.in_dim))
  x = fwht(x * jnp.asarray(ff.signs))
  x = jnp.take(x, jnp.asarray(ff.perm)) * jnp.asarray(ff.gauss)
  x = fwht(x)
  return x[:ff.out_dim] / jnp.float32(ff.norm)
