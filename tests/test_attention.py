"""Attention kernels (`attention_impl`) against the einsum reference, and their fallbacks."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from t5xlike.models import attention, layers, masks

BATCH, Q_LEN, K_LEN, EMBED, HEADS, HEAD_DIM = 2, 8, 8, 32, 4, 8


def inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, Q_LEN, EMBED)), jnp.float32)
  valid = jnp.asarray(np.arange(Q_LEN)[None] < np.array([[Q_LEN], [5]]))  # row 1 padded
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 2, 2, 2, 0, 0, 0]])
  mask = (masks.attention_mask(valid, valid) & masks.causal_mask(Q_LEN)
          & masks.segment_mask(segments, segments))
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
  attention._said.clear()
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
    assert attention.resolve("auto", jnp.bfloat16, dropout=False) == "blocked"
    assert attention.resolve("auto", jnp.float32, dropout=True) == "einsum"
    assert attention.resolve("auto", jnp.float32, dropout=False, decode=True) == "einsum"
  with pltpu.force_tpu_interpret_mode():
    assert attention.resolve("pallas", jnp.bfloat16, dropout=False) == "pallas"
    assert attention.resolve("pallas", jnp.float16, dropout=False) == "einsum"
    assert attention.resolve("pallas", jnp.float32, dropout=True) == "einsum"
    assert attention.resolve("pallas", jnp.float32, dropout=False, decode=True) == "einsum"
    if jax.default_backend() == "cpu":
      assert attention.resolve("auto", jnp.float32, dropout=False) == "blocked"
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    attention.resolve("flash", jnp.float32, dropout=False)
  from t5xlike.models import t5
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


# The Pallas TPU flash kernel, run on the CPU in TPU interpret mode (the real kernel; no
# TPU in this project). Lengths are its block size, 128; interpret mode takes ~2 s a call.
P_LEN = attention.PALLAS_BLOCK


def pallas_inputs():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(BATCH, P_LEN, EMBED)), jnp.float32)
  valid = jnp.asarray(np.arange(P_LEN)[None] < np.array([[P_LEN], [90]]))  # row 1 padded
  segments = np.ones((BATCH, P_LEN), np.int32)
  segments[0, 50:] = 2  # row 0: two packed examples; row 1: one, then padding (segment 0)
  segments[1, 90:] = 0
  return x, valid, jnp.asarray(segments)


def run_pallas_case(impl, mask, bias=None, kv_heads=None, scaling="init", valid=None):
  """Outputs at valid positions and gradients (params, inputs, bias) of one attention."""
  x, default_valid, _ = pallas_inputs()
  valid = default_valid if valid is None else valid
  module = layers.MultiHeadAttention(num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=kv_heads,
                                     query_scaling=scaling, attention_impl=impl)
  # Everything jitted: eager ops between interpret-mode kernels can deadlock with the
  # kernels' host callbacks on the CPU (seen once: a test hung in an eager reduction).
  params = jax.jit(module.init)(jax.random.key(0), x, x, mask, bias)

  def loss(p, x, b):
    out = module.apply(p, x, x, mask, b)
    return jnp.sum(jnp.where(valid[..., None], out, 0.0) ** 2), out

  argnums = (0, 1) if bias is None else (0, 1, 2)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(
      params, x, bias)
  return np.asarray(out)[np.asarray(valid)], jax.tree.map(np.asarray, grads)


def no_fallback(caplog):
  assert not [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]


def assert_pallas_matches(caplog, case, **kwargs):
  ref_out, ref_grads = case("einsum", **kwargs)
  with pltpu.force_tpu_interpret_mode(), caplog.at_level(logging.WARNING):
    assert attention.resolve("pallas", jnp.float32, dropout=False) == "pallas"
    out, grads = case("pallas", **kwargs)
  no_fallback(caplog)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def t5_encoder_case(impl):
  x, valid, _ = pallas_inputs()
  buckets = layers.RelativePositionBiases(num_buckets=8, max_distance=16, num_heads=HEADS)
  bias = buckets.apply(buckets.init(jax.random.key(1), P_LEN, P_LEN), P_LEN, P_LEN) * 3.0
  return run_pallas_case(impl, masks.attention_mask(valid, valid), bias)


@pytest.mark.slow  # ~22 s; the T5 model's Pallas loss test covers padding and the bias
def test_pallas_t5_encoder_bidirectional_padding_relative_bias(caplog):
  """(a) dense padding mask folded into the kernel's bias with T5's relative bias."""
  assert_pallas_matches(caplog, t5_encoder_case)


def packed_case(impl, kv_heads=None, structured=True, causal=True):
  _, valid, segments = pallas_inputs()
  structure = masks.StructuredMask(valid, segments, causal=causal)
  return run_pallas_case(impl, structure if structured else structure.dense(),
                         kv_heads=kv_heads, scaling="runtime")


@pytest.mark.parametrize("kv_heads,structured,causal",
                         [pytest.param(None, True, True, marks=pytest.mark.slow),
                          (2, True, True),
                          pytest.param(2, False, True, marks=pytest.mark.slow),
                          (None, True, False)],
                         ids=["mha_structured", "gqa_structured", "gqa_dense_mask",
                              "bidirectional_structured"])
def test_pallas_causal_packed_segments_and_gqa(caplog, kv_heads, structured, causal):
  """(b, c) decoder-only: causal flag + segment ids in the kernel (no bias, no dense mask),
  or the same mask dense; grouped kv heads repeated to the query heads; the encoder-only
  model's bidirectional packed mask."""
  assert_pallas_matches(caplog, packed_case, kv_heads=kv_heads, structured=structured,
                        causal=causal)


def test_structured_mask_dense_is_the_models_mask():
  _, valid, segments = pallas_inputs()
  np.testing.assert_array_equal(masks.StructuredMask(valid, segments).dense(),
                                masks.decoder_mask(valid, None, segments))
  np.testing.assert_array_equal(
      masks.StructuredMask(valid, segments, causal=False).dense(),
      masks.attention_mask(valid, valid) & masks.segment_mask(segments, segments))
  ids = masks.StructuredMask(valid, None).kernel_segments()
  np.testing.assert_array_equal(ids, np.asarray(valid, np.int32))


def test_pallas_unservable_logs_one_line_and_matches_einsum(caplog):
  """(d) off a TPU without interpret mode, and lengths not multiples of 128 in it."""
  attention._said.clear()
  ref_out, ref_grads = run("einsum")
  with caplog.at_level(logging.WARNING, logger="t5xlike.models.attention"):
    if jax.default_backend() != "tpu":
      out, _ = run("pallas")
      run("pallas")
      np.testing.assert_array_equal(out, ref_out)
    with pltpu.force_tpu_interpret_mode():
      out, grads = run("pallas")
      run("pallas")
  np.testing.assert_array_equal(out, ref_out)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_array_equal(got, want)
  lines = [r.getMessage() for r in caplog.records]
  want = [f"attention_impl='pallas' cannot serve this attention (query/key lengths {Q_LEN}/"
          f"{K_LEN} are not multiples of 128): using 'einsum'"]
  if jax.default_backend() != "tpu":
    want.insert(0, f"attention_impl='pallas' cannot serve this attention (the Pallas flash "
                f"kernel needs a TPU or TPU interpret mode, this is {jax.default_backend()}): "
                f"using 'einsum'")
  assert lines == want


def test_pallas_t5_model_loss_matches_einsum(caplog):
  """End to end: a tiny T5 (relative biases, padding, causal decoder, cross-attention)."""
  import flax.linen as nn

  from t5xlike.models import encoder_decoder, t5
  rng = np.random.default_rng(4)
  enc = rng.integers(1, 64, size=(1, P_LEN)).astype(np.int32)
  enc[0, 100:] = 0
  targets = rng.integers(1, 64, size=(1, P_LEN)).astype(np.int32)
  targets[0, 70:] = 0
  batch = {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
           "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": (targets > 0).astype(np.float32)}
  losses = {}
  for impl in ("einsum", "pallas"):
    cfg = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=2, num_encoder_layers=1,
                      num_decoder_layers=1, head_dim=8, mlp_dim=32, attention_impl=impl)
    model = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg))
    with pltpu.force_tpu_interpret_mode(), caplog.at_level(logging.WARNING):
      params = jax.jit(lambda key: nn.meta.unbox(model.init(key, batch)["params"]))(
          jax.random.key(1))
      losses[impl] = float(jax.jit(lambda p: model.loss_fn(p, batch, None)[0])(params))
  no_fallback(caplog)
  np.testing.assert_allclose(losses["pallas"], losses["einsum"], rtol=1e-6)


def test_pallas_structured_mask_builds_no_length_squared_array():
  """Causal + segments in the kernel: the compiled gradient holds no [.., l, l] mask or bias
  (l = 256, two kernel blocks, so the kernel's own [.., 128, 128] tiles are told apart)."""
  length = 2 * P_LEN
  x = jnp.ones((BATCH, length, EMBED))
  structure = masks.StructuredMask(jnp.ones((BATCH, length), jnp.bool_),
                                    jnp.ones((BATCH, length), jnp.int32))
  module = layers.MultiHeadAttention(num_heads=HEADS, head_dim=HEAD_DIM, attention_impl="pallas")
  params = module.init(jax.random.key(0), x, x, structure)
  with pltpu.force_tpu_interpret_mode():
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x, x, structure) ** 2)))
    hlo = grad.lower(params, x).compile().as_text()
  assert "pallas" in hlo.lower() or "callback" in hlo.lower()
  assert f"{length},{length}]" not in hlo


def test_pallas_decoder_only_packed_scanned_loss_and_grads_match_einsum(caplog):
  """End to end: a tiny Llama-style decoder (GQA, RoPE, packed rows, scanned layers), the
  StructuredMask broadcast through nn.scan to the kernel. No remat: interpret mode's
  callbacks are effects, which `jax.checkpoint` refuses (the TPU kernel has none)."""
  import flax.linen as nn

  from t5xlike.models import decoder
  rng = np.random.default_rng(5)
  targets = rng.integers(1, 64, size=(1, P_LEN)).astype(np.int32)
  segments = np.ones((1, P_LEN), np.int32)
  segments[0, 60:] = 2
  segments[0, 110:] = 0
  targets[0, 110:] = 0
  positions = np.where(segments == 2, np.arange(P_LEN) - 60, np.arange(P_LEN)).astype(np.int32)
  inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  inputs[0, 60] = 0  # each packed example starts from BOS
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_segment_ids": segments, "decoder_positions": positions,
           "decoder_loss_weights": (targets > 0).astype(np.float32)}
  results = {}
  for impl in ("einsum", "pallas"):
    cfg = decoder.DecoderConfig(vocab_size=64, emb_dim=16, num_heads=4, num_kv_heads=2,
                                num_layers=1, head_dim=8, mlp_dim=32, scan_layers=True,
                                attention_impl=impl)
    model = decoder.DecoderOnlyModel(decoder.Transformer(cfg))
    with pltpu.force_tpu_interpret_mode(), caplog.at_level(logging.WARNING):
      params = jax.jit(lambda key: nn.meta.unbox(model.init(key, batch)["params"]))(
          jax.random.key(1))
      results[impl] = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0]))(
          params)
  no_fallback(caplog)
  (loss, grads), (ref_loss, ref_grads) = results["pallas"], results["einsum"]
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_pallas_shard_map_wrapping_on_a_four_device_mesh():
  """Multi-device meshes: the kernel (here the flash module's pure-JAX reference, since
  interpret mode hangs under shard_map on the CPU) runs per batch x heads shard, same
  values; in interpret mode 'pallas' falls back there."""
  import json
  import os
  import pathlib
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(repo / "tests" / "pallas_shard_worker.py")],
                          capture_output=True, text=True, env=env, timeout=120, check=True)
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["max_error"] < 1e-5 and out["manual"] and out["mesh_size"] == 4
  assert out["interpret_resolves_to"] == "einsum"


@pytest.mark.parametrize("per_row_bias", [False, True])
def test_blocked_equals_einsum_over_row_groups(per_row_bias, monkeypatch):
  """'blocked' with a budget of one row (2 groups of 1 row) equals einsum: values and
  gradients, a shared [1, heads, q, k] or a per-row [b, heads, q, k] bias, GQA."""
  monkeypatch.setattr(attention, "BLOCK_LOGITS_BYTES", HEADS * Q_LEN * K_LEN * 4)
  x, mask, bias, valid = inputs()
  if per_row_bias:
    bias = jnp.concatenate([bias, bias[:, ::-1] * 0.5])
  calls = []
  original = attention.batch_blocked
  monkeypatch.setattr(attention, "batch_blocked",
                      lambda *a, **k: calls.append(1) or original(*a, **k))

  def run_impl(impl, kv_heads):
    module = layers.MultiHeadAttention(num_heads=HEADS, head_dim=HEAD_DIM,
                                       num_kv_heads=kv_heads, attention_impl=impl)
    params = module.init(jax.random.key(0), x, x, mask, bias)
    def loss(p, x, b):
      out = module.apply(p, x, x, mask, b)
      return jnp.sum(jnp.where(valid[..., None], out, 0.0) ** 2), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, bias)
  for kv_heads in (None, 2):
    (_, want), want_grads = run_impl("einsum", kv_heads)
    (_, got), got_grads = run_impl("blocked", kv_heads)
    keep = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], rtol=1e-5,
                               atol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
  assert calls  # the blocked path ran (2 groups: the budget holds one row)


def test_batch_blocked_group_count():
  """Groups are the smallest divisor count of the batch whose logits fit the budget."""
  seen = []
  core = lambda q, k, v, m, b: seen.append(q.shape[0]) or q
  q = jnp.zeros((12, 4, 2, 3))
  row = 2 * 4 * 4 * 4
  for budget, rows in [(12 * row, 12), (5 * row, 4), (row, 1), (row - 1, 1)]:
    seen.clear()
    out = attention.batch_blocked(core, q + jnp.arange(12.0)[:, None, None, None], q, q, None,
                                  None, budget_bytes=budget)
    assert seen == [rows]
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.arange(12.0))  # rows back in order
