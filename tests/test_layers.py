"""Relative position buckets against hand-computed values; RMS norm; masks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5xlike.models import layers, masks


# Bidirectional, 32 buckets, max distance 128: 16 buckets per sign, 8 exact.
# rel = key - query; n = -rel; for n >= 8: 8 + floor(log(n / 8) / log(16) * 8).
@pytest.mark.parametrize("rel, bucket", [
    (0, 0), (-1, 1), (-7, 7), (-8, 8), (-12, 9), (-16, 10), (-32, 12), (-64, 14),
    (-127, 15), (-128, 15), (-1000, 15),
    (1, 17), (7, 23), (8, 24), (20, 26), (128, 31), (5000, 31),
])
def test_bidirectional_buckets(rel, bucket):
  assert layers.relative_position_bucket(np.array([rel]), bidirectional=True)[0] == bucket


# Causal: future keys all map to 0; 16 exact; then 16 + floor(log(n/16)/log(8)*16).
@pytest.mark.parametrize("rel, bucket", [
    (5, 0), (0, 0), (-3, 3), (-15, 15), (-16, 16), (-32, 21), (-100, 30), (-128, 31),
    (-4000, 31),
])
def test_causal_buckets(rel, bucket):
  assert layers.relative_position_bucket(np.array([rel]), bidirectional=False)[0] == bucket


def test_relative_position_biases_gather_table():
  module = layers.RelativePositionBiases(num_buckets=32, max_distance=128, num_heads=3)
  variables = nn.meta.unbox(module.init(jax.random.key(0), 5, 7, True))
  table = np.asarray(variables["params"]["rel_embedding"])
  out = np.asarray(module.apply(variables, 5, 7, True))
  assert out.shape == (1, 3, 5, 7)
  for q in range(5):
    for k in range(7):
      bucket = layers.relative_position_bucket(np.array([k - q]))[0]
      np.testing.assert_array_equal(out[0, :, q, k], table[:, bucket])


def test_rms_norm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  norm = layers.RMSNorm()
  variables = norm.init(jax.random.key(0), x)
  scale = np.linspace(0.5, 2.0, 8)
  y = norm.apply({"params": {"scale": jnp.asarray(scale, jnp.float32)}}, x)
  x64 = x.astype(np.float64)
  ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
  assert variables["params"]["scale"].value.shape == (8,)


def test_masks():
  valid = jnp.array([[True, True, False]])
  mask = masks.attention_mask(valid, valid) & masks.causal_mask(3)
  expected = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)
  np.testing.assert_array_equal(np.asarray(mask)[0, 0], expected)
  seg = jnp.array([[1, 1, 2]])
  np.testing.assert_array_equal(np.asarray(masks.segment_mask(seg, seg))[0, 0],
                                np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool))
