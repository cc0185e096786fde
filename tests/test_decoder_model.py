"""Llama-style decoder-only network against a NumPy float64 reference; masks, packing,
KV-cache decoding, scan over layers, loss, gin sizes."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5xlike.cli import gin_config
from t5xlike.models import decoder, layers, masks, rope
from tests import decoder_numpy_reference as ref

CONFIG = decoder.DecoderConfig(vocab_size=128, emb_dim=32, num_heads=4, num_kv_heads=2,
                               num_layers=2, head_dim=8, mlp_dim=48)
VARIANTS = {"gqa": {}, "mha": {"num_kv_heads": 4}, "tied": {"tie_embeddings": True},
            "scanned": {"scan_layers": True}}
LENGTH = 8


def _config(variant):
  return decoder.DecoderConfig(**{**CONFIG.__dict__, **VARIANTS[variant]})


@pytest.fixture(scope="module")
def built():
  """variant -> (config, model, params, jitted logits); built once per variant.

  Norm scales are randomised so that every parameter matters."""
  cache = {}

  def get(variant):
    if variant not in cache:
      cfg = _config(variant)
      model = decoder.DecoderOnlyModel(decoder.Transformer(cfg))
      rng = np.random.default_rng(1)
      params = nn.meta.unbox(model.init(jax.random.key(1), causal_batch())["params"])
      params = jax.tree_util.tree_map_with_path(
          lambda path, x: x * (1.0 + 0.5 * rng.standard_normal(x.shape).astype(np.float32))
          if "scale" in str(path) else x, params)
      cache[variant] = (cfg, model, params, jax.jit(model.logits))
    return cache[variant]

  return get


def _shift(targets):
  return np.pad(targets[:, :-1], ((0, 0), (1, 0)))


def causal_batch():
  targets = np.random.default_rng(0).integers(1, 128, (2, LENGTH)).astype(np.int32)
  targets[1, 6:] = 0
  return {"decoder_target_tokens": targets, "decoder_input_tokens": _shift(targets),
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


def prefix_batch():
  """Rows of inputs + targets as the prefix-LM converter makes them (prefix 3 and 2)."""
  batch = causal_batch()
  widths = np.array([[3], [2]])
  pos = np.arange(LENGTH)[None]
  batch["decoder_causal_attention"] = (pos < widths + 1).astype(np.int32)
  batch["decoder_loss_weights"] = ((batch["decoder_target_tokens"] > 0)
                                   & (pos >= widths)).astype(np.float32)
  return batch


def packed_batch():
  """Row 0 packs A (4 tokens) and B (3 tokens); row 1 is one example of 6."""
  targets = causal_batch()["decoder_target_tokens"].copy()
  targets[0, 7] = 0
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
  positions = np.array([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 0, 0]], np.int32)
  inputs = _shift(targets)
  inputs[0, 4] = 0  # B starts with its own BOS
  return {"decoder_target_tokens": targets, "decoder_input_tokens": inputs,
          "decoder_segment_ids": segments, "decoder_positions": positions,
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


BATCHES = {"causal": causal_batch, "prefix": prefix_batch, "packed": packed_batch}


def _reference(cfg, params, batch):
  return ref.forward(jax.device_get(params), cfg.num_heads, cfg.num_kv_heads,
                     batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                     segment_ids=batch.get("decoder_segment_ids"),
                     positions=batch.get("decoder_positions"),
                     causal_attention=batch.get("decoder_causal_attention"),
                     wavelength=cfg.rope_max_wavelength, eps=cfg.norm_epsilon)


def _paths(tree):
  return {"/".join(getattr(k, "key", str(k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameter_tree_is_t5x_decoder_only_layout(built):
  _, model, params, _ = built("gqa")
  shapes = {k: v.shape for k, v in _paths(params).items()}
  assert shapes["token_embedder/embedding"] == (128, 32)
  assert shapes["decoder/layers_0/pre_self_attention_layer_norm/scale"] == (32,)
  assert shapes["decoder/layers_0/self_attention/query/kernel"] == (32, 32)
  assert shapes["decoder/layers_0/self_attention/key/kernel"] == (32, 16)  # 2 kv heads x 8
  assert shapes["decoder/layers_1/self_attention/value/kernel"] == (32, 16)
  assert shapes["decoder/layers_1/self_attention/out/kernel"] == (32, 32)
  assert shapes["decoder/layers_0/pre_mlp_layer_norm/scale"] == (32,)
  assert shapes["decoder/layers_0/mlp/wi_0/kernel"] == (32, 48)
  assert shapes["decoder/layers_0/mlp/wi_1/kernel"] == (32, 48)
  assert shapes["decoder/layers_0/mlp/wo/kernel"] == (48, 32)
  assert shapes["decoder/decoder_norm/scale"] == (32,)
  assert shapes["decoder/logits_dense/kernel"] == (32, 128)
  # embedding + 2 x (2 norms + 4 attention + 3 mlp) + norm + logits.
  assert len(shapes) == 1 + 2 * 9 + 2
  boxed = jax.eval_shape(model.init, jax.random.key(0), causal_batch())["params"]
  flat = jax.tree_util.tree_flatten_with_path(
      nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  specs = {"/".join(getattr(k, "key", str(k)) for k in path): tuple(spec) for path, spec in flat}
  assert specs["decoder/layers_0/self_attention/key/kernel"] == ("embed", "joined_kv")
  assert specs["decoder/layers_0/self_attention/out/kernel"] == ("joined_kv", "embed")
  assert specs["decoder/logits_dense/kernel"] == ("embed", "vocab")


def test_tied_embeddings_have_no_output_layer(built):
  _, _, params, _ = built("tied")
  assert "logits_dense" not in params["decoder"]


@pytest.mark.parametrize("variant, batch_name", [
    ("gqa", "causal"), ("gqa", "prefix"), ("gqa", "packed"), ("mha", "causal"),
    ("tied", "causal")])
def test_logits_match_numpy_float64(built, variant, batch_name):
  cfg, _, params, logits_fn = built(variant)
  batch = BATCHES[batch_name]()
  logits = np.asarray(logits_fn(params, batch))
  expected = _reference(cfg, params, batch)
  valid = batch["decoder_target_tokens"] > 0
  np.testing.assert_allclose(logits[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_prefix_lm_mask_is_t5x_make_decoder_mask():
  # The example of T5X's make_decoder_mask docstring (google-research/t5x,
  # t5x/examples/decoder_only/layers.py): two packed prefix-LM examples.
  targets = jnp.array([[6, 7, 8, 3, 4, 5, 0]])
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 0]])
  causal_attention = jnp.array([[1, 1, 0, 1, 1, 0, 0]])
  mask = masks.decoder_mask(targets > 0, causal_attention, segments)
  expected = np.array([[1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0],
                       [0, 0, 0, 1, 1, 0, 0],
                       [0, 0, 0, 1, 1, 0, 0],
                       [0, 0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 0, 0]], bool)
  assert mask.shape == (1, 1, 7, 7) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(mask)[0, 0], expected)
  # Unpacked, prefix of 3 positions, last position padding.
  mask = masks.decoder_mask(jnp.array([[5, 6, 7, 8, 0]]) > 0, jnp.array([[1, 1, 1, 0, 0]]))
  np.testing.assert_array_equal(np.asarray(mask)[0, 0], np.array(
      [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]],
      bool))


def test_packed_row_equals_each_example_alone(built):
  _, _, params, logits_fn = built("gqa")
  packed = packed_batch()
  out = np.asarray(logits_fn(params, packed))
  for start, stop in ((0, 4), (4, 7)):
    targets = np.zeros((1, LENGTH), np.int32)
    targets[0, :stop - start] = packed["decoder_target_tokens"][0, start:stop]
    alone = np.asarray(logits_fn(params, {
        "decoder_target_tokens": targets, "decoder_input_tokens": _shift(targets),
        "decoder_segment_ids": (targets > 0).astype(np.int32),
        "decoder_positions": np.arange(LENGTH, dtype=np.int32)[None]}))
    np.testing.assert_allclose(out[0, start:stop], alone[0, :stop - start], rtol=1e-5,
                               atol=1e-5)


def _decode_all(model, params, inputs, prefill, causal_attention=None):
  """Prefill `prefill` tokens, then one token per step; logits [b, l, vocab] and the cache."""
  step = jax.jit(model.decode_step)
  cache = model.init_cache(inputs.shape[0], inputs.shape[1])
  logits, cache = step(params, cache, inputs[:, :prefill], None,
                       None if causal_attention is None else causal_attention[:, :prefill])
  outs = [logits]
  for i in range(prefill, inputs.shape[1]):
    logits, cache = step(params, cache, inputs[:, i:i + 1])
    outs.append(logits)
  return np.concatenate([np.asarray(o) for o in outs], axis=1), cache


@pytest.mark.parametrize("variant", ["gqa", "scanned"])
def test_kv_cache_decoding_reproduces_the_forward_pass(built, variant):
  cfg, model, params, logits_fn = built(variant)
  batch = causal_batch()
  batch["decoder_target_tokens"][1, 6:] = [9, 10]  # no padding: every row decodes 8 tokens
  batch["decoder_input_tokens"] = _shift(batch["decoder_target_tokens"])
  full = np.asarray(logits_fn(params, batch))
  decoded, cache = _decode_all(model, params, batch["decoder_input_tokens"], prefill=3)
  np.testing.assert_allclose(decoded, full, rtol=1e-5, atol=1e-5)
  shape = (2, LENGTH, cfg.num_kv_heads, cfg.head_dim)  # [batch, max_length, kv_heads, head_dim]
  if variant == "scanned":
    attn = cache["decoder"]["layers"]["self_attention"]
    assert attn["cached_key"].shape == attn["cached_value"].shape == (cfg.num_layers,) + shape
    np.testing.assert_array_equal(attn["cache_index"], [LENGTH] * cfg.num_layers)
  else:
    assert set(cache["decoder"]) == {"layers_0", "layers_1"}
    attn = cache["decoder"]["layers_1"]["self_attention"]
    assert attn["cached_key"].shape == attn["cached_value"].shape == shape
    assert attn["cached_key"].dtype == jnp.float32 and int(attn["cache_index"]) == LENGTH


def test_kv_cache_prefix_lm_prefill(built):
  """A bidirectional prefill of the prefix, then causal steps, equals the prefix-LM forward."""
  _, model, params, logits_fn = built("gqa")
  batch = causal_batch()
  batch["decoder_target_tokens"][1, 6:] = [9, 10]
  batch["decoder_input_tokens"] = _shift(batch["decoder_target_tokens"])
  batch["decoder_causal_attention"] = np.array([[1] * 4 + [0] * 4] * 2, np.int32)
  full = np.asarray(logits_fn(params, batch))
  decoded, _ = _decode_all(model, params, batch["decoder_input_tokens"], prefill=4,
                           causal_attention=batch["decoder_causal_attention"])
  np.testing.assert_allclose(decoded, full, rtol=1e-5, atol=1e-5)
  causal = np.asarray(logits_fn(params, causal_batch()))
  assert not np.allclose(decoded[0, :3], causal[0, :3], atol=1e-3)  # the prefix mattered


def test_attention_cache_with_an_absolute_mask_hides_slots():
  """Ragged rows: an absolute [.., n, max_length] mask hides a cached slot."""
  kwargs = dict(num_heads=4, head_dim=8, num_kv_heads=2, rope_max_wavelength=10000.0,
                query_scaling="runtime")
  full_attn, cached_attn = layers.MultiHeadAttention(**kwargs), layers.MultiHeadAttention(
      **kwargs, decode=True)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  params = nn.meta.unbox(full_attn.init(jax.random.key(1), x, x))["params"]
  key_valid = jnp.array([[True, False, True, True, True]] * 2)
  mask = masks.decoder_mask(key_valid) | (jnp.eye(5, dtype=bool)[None, None])
  expected = full_attn.apply({"params": params}, x, x, mask)
  step = jax.jit(lambda cache, xs, m: cached_attn.apply({"params": params, "cache": cache}, xs,
                                                        xs, m, mutable=["cache"]))
  cache = cached_attn.init(jax.random.key(1), x, x)["cache"]
  out, new = step(cache, x[:, :3], mask[:, :, :3, :3])  # chunk-relative [.., 3, 3]
  np.testing.assert_allclose(out, expected[:, :3], rtol=1e-5, atol=1e-6)
  for i in (3, 4):  # absolute [.., 1, max_length]
    out, new = step(new["cache"], x[:, i:i + 1], mask[:, :, i:i + 1, :])
    np.testing.assert_allclose(out[:, 0], expected[:, i], rtol=1e-5, atol=1e-6)


def test_scanned_layers_give_the_same_logits(built):
  _, _, params, logits_fn = built("gqa")
  cfg, _, _, scanned_fn = built("scanned")
  stacked = decoder.stack_layers(params, cfg.num_layers)
  assert stacked["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (2, 32, 48)
  for name in ("causal", "packed"):
    batch = BATCHES[name]()
    np.testing.assert_allclose(np.asarray(scanned_fn(stacked, batch)),
                               np.asarray(logits_fn(params, batch)), rtol=1e-6, atol=1e-6)
  unstacked = decoder.unstack_layers(stacked)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(unstacked)):
    np.testing.assert_array_equal(a, b)


def test_rotary_embedding_matches_reference_and_is_relative():
  x = np.random.default_rng(2).standard_normal((2, 5, 3, 8)).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4], [7, 3, 0, 100, 2]], np.int32)
  out = np.asarray(rope.rotary_embedding(jnp.asarray(x), jnp.asarray(positions), 10000.0))
  np.testing.assert_allclose(out, ref.rope(x.astype(np.float64), positions, 10000.0),
                             rtol=1e-5, atol=1e-5)
  q, k = x[:1, :1], x[:1, 1:2]
  dots = [np.sum(np.asarray(rope.rotary_embedding(jnp.asarray(q), jnp.array([[m + 5]]), 1e4))
                 * np.asarray(rope.rotary_embedding(jnp.asarray(k), jnp.array([[m]]), 1e4)))
          for m in (0, 11, 40)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-5)  # depends only on m - n


def test_runtime_query_scaling_equals_folded_scaling():
  x = jax.random.normal(jax.random.key(0), (1, 4, 16))
  runtime = layers.MultiHeadAttention(num_heads=2, head_dim=8, query_scaling="runtime")
  folded = layers.MultiHeadAttention(num_heads=2, head_dim=8)
  params = nn.meta.unbox(runtime.init(jax.random.key(1), x, x))["params"]
  scaled = {**params, "query": {"kernel": params["query"]["kernel"] / np.sqrt(8)}}
  np.testing.assert_allclose(runtime.apply({"params": params}, x, x),
                             folded.apply({"params": scaled}, x, x), rtol=1e-5, atol=1e-6)
  # The run-time variant's query init is not divided by sqrt(head_dim).
  q_std, k_std = float(jnp.std(params["query"]["kernel"])), float(jnp.std(params["key"]["kernel"]))
  assert q_std == pytest.approx(k_std, rel=0.3)


def test_loss_is_per_scored_token(built):
  cfg, model, params, _ = built("gqa")
  batch = prefix_batch()
  loss, stats = jax.jit(model.loss_fn)(params, batch, None)
  logits = _reference(cfg, params, batch)
  log_z = np.log(np.exp(logits).sum(-1))
  target_logit = np.take_along_axis(logits, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  weights = batch["decoder_loss_weights"]
  per_token = log_z - target_logit + 1e-4 * log_z ** 2
  assert float(stats["weight_sum"]) == weights.sum() == 9  # 8 - 3 + 6 - 2 targets
  assert float(loss) == pytest.approx((per_token * weights).sum() / weights.sum(), rel=1e-5)
  assert float(stats["correct"]) == ((logits.argmax(-1) == batch["decoder_target_tokens"])
                                     * weights).sum()
  metrics = model.metrics(stats)
  assert set(metrics) == {"loss", "z_loss", "accuracy"}
  assert model.feature_converter == "decoder"


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    decoder.DecoderConfig(**{**CONFIG.__dict__, "num_kv_heads": 3})
  with pytest.raises(ValueError, match="even"):
    decoder.DecoderConfig(**{**CONFIG.__dict__, "head_dim": 7})
  with pytest.raises(ValueError, match="Unknown activation"):
    decoder.DecoderConfig(**{**CONFIG.__dict__, "mlp_activations": ("swiglu",)})
  with pytest.raises(ValueError, match="unknown remat policy"):
    decoder.DecoderConfig(**{**CONFIG.__dict__, "remat_policy": "some"})


@pytest.mark.parametrize("size, dims", [
    ("tiny", (64, 4, 2, 2, 16, 256)), ("small", (768, 12, 4, 12, 64, 2048)),
    ("base", (1024, 16, 8, 24, 64, 2816))])
def test_gin_sizes(size, dims):
  gin_config.configure([f"models/decoder/{size}.gin"])
  try:
    cfg = gin.get_configurable(decoder.DecoderConfig)()
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert (cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, cfg.head_dim,
          cfg.mlp_dim) == dims
  assert cfg.mlp_activations == ("silu", "linear") and cfg.vocab_size == 8192
  assert isinstance(model, decoder.DecoderOnlyModel)
