"""ALiBi attention biases (Press et al. 2022, "Train Short, Test Long: Attention
with Linear Biases Enables Input Length Extrapolation"), in the symmetric form
MosaicBERT uses for a bidirectional encoder (Portes et al. 2023, "MosaicBERT: A
Bidirectional Encoder Optimized for Fast Pretraining", §2.1 "Attention with
Linear Biases").

Head h of H adds `-m_h * |i - j|` to the logit of query i and key j (no
position embeddings at all). The slopes are a geometric sequence (ALiBi §3):
for H a power of two, m_h = 2^(-8 h / H), h = 1..H (8 heads: 1/2, 1/4, ...,
1/256); otherwise the 2^floor(log2 H) slopes of that power of two followed by
every other slope of the next power of two, the first H - 2^floor(log2 H) of
them (the authors' `get_slopes`, used by MosaicBERT).

Packed rows: the bias depends only on |i - j| within a row, and attention
across segments is masked, so for contiguous segments it equals the bias of
each segment alone (positions restarted): one [1, H, l, l] bias serves padded
and packed (unpadded) rows alike.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def slopes(num_heads: int) -> np.ndarray:
  """The ALiBi slope of each head: float64 [num_heads] (see the module docstring)."""
  if num_heads < 1:
    raise ValueError(f"ALiBi needs at least one head, got {num_heads}")

  def power_of_two(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (h + 1) for h in range(n)]

  closest = 2 ** int(math.floor(math.log2(num_heads)))
  values = power_of_two(closest)
  if closest != num_heads:
    values += power_of_two(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(values, dtype=np.float64)


def bias(num_heads: int, length: int) -> jax.Array:
  """float32 [1, num_heads, length, length]: -slope_h * |i - j|."""
  positions = jnp.arange(length, dtype=jnp.float32)
  distance = jnp.abs(positions[:, None] - positions[None, :])
  per_head = jnp.asarray(slopes(num_heads), dtype=jnp.float32)
  return (-per_head[:, None, None] * distance[None])[None]
