"""`loss_impl='chunked'` (losses.chunked_token_stats) against the dense logits path,
and the max-based `correct_count` against NumPy's argmax."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5xlike import losses
from t5xlike.models import decoder, encoder_decoder, t5

T5 = t5.T5Config(vocab_size=256, emb_dim=16, num_heads=2, num_encoder_layers=1,
                 num_decoder_layers=1, head_dim=8, mlp_dim=32)
DECODER = decoder.DecoderConfig(vocab_size=256, emb_dim=16, num_heads=2, num_kv_heads=1,
                                num_layers=1, head_dim=8, mlp_dim=32)


def make_batch(family: str, rng: np.random.Generator) -> dict:
  ids = lambda length: rng.integers(1, 250, (3, length)).astype(np.int32)
  batch = {"decoder_input_tokens": ids(11), "decoder_target_tokens": ids(11),
           "decoder_loss_weights": (rng.random((3, 11)) > 0.3).astype(np.float32)}
  if family == "t5":
    batch["encoder_input_tokens"] = ids(13)
  return batch


def model(family: str, **kwargs):
  if family == "t5":
    return encoder_decoder.EncoderDecoderModel(t5.Transformer(T5), **kwargs)
  return decoder.DecoderOnlyModel(decoder.Transformer(DECODER), **kwargs)


# The decoder case in the default run; T5 (~45 s of compiles) -m slow.
@pytest.mark.parametrize("family,label_smoothing", [
    pytest.param("t5", 0.1, marks=pytest.mark.slow), ("decoder", 0.0)])
def test_chunked_loss_equals_dense_values_and_gradients(family, label_smoothing, monkeypatch):
  # The budget is then twice the [16, 256] kernel's bytes: 3 rows x 10 positions x 256
  # vocabulary per chunk, 2 chunks over 11 positions, 9 padded.
  monkeypatch.setattr(losses, "CHUNK_LOGITS_BYTES", 3 * 4 * 256 * 4)
  batch = make_batch(family, np.random.default_rng(0))
  options = dict(z_loss=1e-2, label_smoothing=label_smoothing)
  dense, chunked = model(family, **options), model(family, loss_impl="chunked", **options)
  params = nn.meta.unbox(dense.init(jax.random.key(0), batch)["params"])
  # Make the argmax hit some targets: targets = the dense argmax on half the positions.
  logits = np.asarray(dense.logits(params, batch))
  batch["decoder_target_tokens"][:, ::2] = logits.argmax(-1)[:, ::2]

  def stats_and_grads(m):
    fn = lambda p: (lambda s: (s["loss_sum"], s))(m.loss_fn(p, batch, None)[1])
    return jax.value_and_grad(fn, has_aux=True)(params)
  (_, want), want_grads = stats_and_grads(dense)
  (_, got), got_grads = stats_and_grads(chunked)
  assert set(got) == set(want)
  assert float(want["correct"]) >= 6
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_chunked_loss_needs_an_untied_output_layer():
  cfg = t5.T5Config(**{**T5.__dict__, "logits_via_embedding": True})
  tied = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg), loss_impl="chunked")
  batch = make_batch("t5", np.random.default_rng(0))
  params = nn.meta.unbox(tied.init(jax.random.key(0), batch)["params"])
  with pytest.raises(ValueError, match="untied output layer `logits_dense`"):
    tied.loss_fn(params, batch, None)
  with pytest.raises(ValueError, match="loss_impl must be"):
    model("t5", loss_impl="fused")


def test_correct_count_matches_numpy_argmax():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 7, 50)).astype(np.float32)
  targets = rng.integers(0, 50, (4, 7))
  targets[:, :3] = logits.argmax(-1)[:, :3]
  weights = rng.random((4, 7)).astype(np.float32)
  want = ((logits.argmax(-1) == targets) * weights).sum()
  got = losses.correct_count(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (1e-2, 0.2)])
def test_fused_gradient_equals_float64_reference(z_loss, label_smoothing):
  """d loss_sum / d (hidden, kernel, weights) of the fused pass against NumPy float64
  (4 chunks of 2 positions over 7, one padded); the other sums carry no gradient."""
  rng = np.random.default_rng(2)
  hidden = rng.normal(size=(3, 7, 5)).astype(np.float32)
  kernel = rng.normal(size=(5, 40)).astype(np.float32)
  targets = rng.integers(0, 40, (3, 7)).astype(np.int32)
  weights = (rng.random((3, 7)) > 0.2).astype(np.float32)

  def fused(h, k, w):
    stats = losses.chunked_token_stats(h, k, jnp.asarray(targets), w, z_loss=z_loss,
                                       label_smoothing=label_smoothing,
                                       chunk_bytes=3 * 2 * 40 * 4)
    return stats["loss_sum"] + stats["z_loss_sum"] + stats["correct"], stats
  (_, stats), grads = jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True)(
      hidden, kernel, weights)

  h64, k64 = hidden.astype(np.float64), kernel.astype(np.float64)
  logits = h64 @ k64
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  probs = np.exp(logits - log_z[..., None])
  q = np.full(logits.shape, label_smoothing / 39)
  np.put_along_axis(q, targets[..., None], 1.0 - label_smoothing, axis=-1)
  entropy = -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)
  per_token = -(q * (logits - log_z[..., None])).sum(-1) - entropy + z_loss * log_z ** 2
  grad_logits = (probs * (1 + 2 * z_loss * log_z)[..., None] - q) * weights[..., None]
  np.testing.assert_allclose(stats["loss_sum"], (per_token * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(stats["z_loss_sum"], (z_loss * log_z ** 2 * weights).sum(),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads[0], grad_logits @ k64.T, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[1], np.einsum("ble,blv->ev", h64, grad_logits),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[2], per_token, rtol=1e-4, atol=1e-6)
