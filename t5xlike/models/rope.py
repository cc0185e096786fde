"""Rotary position embeddings (RoPE, Su et al. 2021): the frequencies and the rotation.

Plain RoPE rotates feature pair i (of head_dim / 2) by `position * inv_freq[i]`,
inv_freq[i] = max_wavelength ** (-2 i / head_dim) radians per position. Llama 3.x
rescales the frequencies once ('llama3' scaling, `Llama3Scaling`): wavelengths
2 pi / inv_freq shorter than original_max_positions / high_freq_factor are kept,
those longer than original_max_positions / low_freq_factor are divided by
`factor`, and the band between is interpolated smoothly, as HF's
`_compute_llama3_parameters` does (no attention rescaling).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
  """Llama 3.x frequency scaling (HF `rope_type: 'llama3'`; Llama 3.1: 8, 1, 4, 8192).

  Attributes:
    factor: how much the low frequencies are slowed down (> 0).
    low_freq_factor: wavelengths above original_max_positions / low_freq_factor
      (in positions) are divided by `factor`.
    high_freq_factor: wavelengths below original_max_positions / high_freq_factor
      are kept (> low_freq_factor).
    original_max_positions: the pretraining context length (positions).
  """
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_positions: int

  def __post_init__(self):
    if self.factor <= 0 or self.low_freq_factor <= 0 or self.original_max_positions <= 0:
      raise ValueError(f"llama3 RoPE scaling needs positive factor, low_freq_factor and "
                       f"original_max_positions, got {self}")
    if self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(f"llama3 RoPE scaling needs high_freq_factor ({self.high_freq_factor}) "
                       f"> low_freq_factor ({self.low_freq_factor})")


def inverse_frequencies(head_dim: int, max_wavelength: float,
                        llama3: Llama3Scaling | None = None) -> np.ndarray:
  """float64 [head_dim / 2]: radians per position of each feature pair.

  Args:
    head_dim: the (even) size of a head.
    max_wavelength: the RoPE base (Llama 2: 10,000; Llama 3: 500,000).
    llama3: Llama 3.x scaling, or None for plain RoPE.
  """
  inv_freq = np.asarray(max_wavelength, np.float64) ** (
      -np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if llama3 is None:
    return inv_freq
  wavelength = 2 * np.pi / inv_freq  # positions per turn
  old = float(llama3.original_max_positions)
  low, high = llama3.low_freq_factor, llama3.high_freq_factor
  # 0 where the wavelength is long (scaled by 1/factor), 1 where short (kept).
  smooth = np.clip((old / wavelength - low) / (high - low), 0.0, 1.0)
  smooth = np.where(wavelength > old / low, 0.0, np.where(wavelength < old / high, 1.0, smooth))
  return (1.0 - smooth) * inv_freq / llama3.factor + smooth * inv_freq


def rotary_embedding(x: Array, positions: Array, max_wavelength: float,
                     llama3: Llama3Scaling | None = None) -> Array:
  """RoPE in HF Llama's `rotate_half` layout.

  Feature i < head_dim / 2 is paired with feature i + head_dim / 2 (not with
  its neighbour, as in the RoFormer paper) and the pair is rotated by the
  angle `position * inv_freq[i]` (`inverse_frequencies`):
    out = x * cos + rotate_half(x) * sin,  rotate_half([x1, x2]) = [-x2, x1].
  Computed in float32.

  Args:
    x: [batch, length, heads, head_dim] queries or keys, head_dim even.
    positions: int [batch, length] (or [1, length]) position of each token.
    max_wavelength: the base of the frequencies (Llama: 10,000).
    llama3: Llama 3.x frequency scaling, or None.
  Returns:
    [batch, length, heads, head_dim] in x.dtype.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  inv_freq = inverse_frequencies(head_dim, max_wavelength, llama3)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, l, 1, head_dim]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
