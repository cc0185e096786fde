"""Attention kernels (`attention_impl`) against the einsum reference, and their fallbacks."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5xlike.models import attention, layers

BATCH, Q_LEN, K_LEN, EMBED, HEADS, HEAD_DIM = 2, 8, 8, 32, 4, 8


def inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, Q_LEN, EMBED)), jnp.float32)
  valid = jnp.asarray(np.arange(Q_LEN)[None] < np.array([[Q_LEN], [5]]))  # row 1 padded
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 2, 2, 2, 0, 0, 0]])
  mask = (layers.attention_mask(valid, valid) & layers.causal_mask(Q_LEN)
          & layers.segment_mask(segments, segments))
  buckets = layers.RelativePositionBiases(num_buckets=8, max_distance=16, num_heads=HEADS)
  bias = buckets.apply(buckets.init(jax.random.key(1), Q_LEN, K_LEN, False), Q_LEN, K_LEN, False)
  return x, mask, bias * 3.0, valid


def implementations():
  names = ["xla"]
  if jax.default_backend() == "gpu":
    names.append("cudnn")
  return names


def run(impl: str, num_kv_heads=None, query_scaling="init", dtype=jnp.float32):
  x, mask, bias, valid = inputs()
  module = layers.MultiHeadAttention(num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=num_kv_heads,
                                     query_scaling=query_scaling, dtype=dtype,
                                     attention_impl=impl)
  params = module.init(jax.random.key(0), x, x, mask, bias)
  def loss(p, x):
    out = module.apply(p, x, x, mask, bias)
    return jnp.sum(jnp.where(valid[..., None], out, 0.0).astype(jnp.float32) ** 2), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  keep = np.asarray(valid)
  return np.asarray(out, np.float32)[keep], jax.tree.map(lambda g: np.asarray(g, np.float32),
                                                         grads)


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("kv_heads,scaling", [(None, "init"), (2, "runtime")],
                         ids=["t5", "gqa_runtime_scaling"])
def test_kernel_matches_einsum_reference(impl, kv_heads, scaling):
  dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
  tol = 2e-2 if impl == "cudnn" else 1e-5
  ref_out, ref_grads = run("einsum", kv_heads, scaling, dtype)
  out, grads = run(impl, kv_heads, scaling, dtype)
  np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN serves on GPUs")
def test_unservable_kernel_logs_one_line_and_falls_back_to_einsum(caplog):
  attention._said.clear()  # pylint: disable=protected-access
  ref_out, _ = run("einsum")
  with caplog.at_level(logging.WARNING, logger="t5xlike.models.attention"):
    out, _ = run("cudnn")
    run("cudnn")
  np.testing.assert_array_equal(out, ref_out)
  lines = [r.getMessage() for r in caplog.records]
  assert lines == [f"attention_impl='cudnn' cannot serve this attention (cuDNN needs an NVIDIA "
                   f"GPU, this is {jax.default_backend()}): using 'einsum'"]


def test_resolution_rules_and_bad_names():
  assert attention.resolve("einsum", jnp.float32, dropout=False) == "einsum"
  assert attention.resolve("xla", jnp.float32, dropout=False) == "xla"
  assert attention.resolve("xla", jnp.float32, dropout=True) == "einsum"  # dropout: einsum only
  assert attention.resolve("pallas", jnp.bfloat16, dropout=False) == "einsum"
  if jax.default_backend() == "cpu":
    assert attention.resolve("auto", jnp.bfloat16, dropout=False) == "einsum"
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    attention.resolve("flash", jnp.float32, dropout=False)
  from t5xlike.models import t5  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    t5.T5Config(vocab_size=128, emb_dim=8, num_heads=2, num_encoder_layers=1,
                num_decoder_layers=1, head_dim=4, mlp_dim=16, attention_impl="flash")


@pytest.mark.parametrize("bias_shape", [(1, 3, 5, 6), (2, 3, 5, 6), (3, 1, 6), (1, 1, 5, 1)])
def test_add_bias_gradient_equals_broadcast_sum(bias_shape):
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 3, 5, 6)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, 3, 5, 6)), jnp.float32)
  value, pullback = jax.vjp(attention.add_bias, logits, bias)
  np.testing.assert_array_equal(value, logits + bias)
  grad_logits, grad_bias = pullback(cotangent)
  np.testing.assert_array_equal(grad_logits, cotangent)
  want = np.asarray(cotangent, np.float64)
  full = (1,) * (4 - len(bias_shape)) + bias_shape
  want = want.sum(axis=tuple(i for i in range(4) if full[i] == 1), keepdims=True)
  np.testing.assert_allclose(grad_bias, want.reshape(bias_shape), rtol=1e-5, atol=1e-6)
