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
  # 3 rows x 4 positions x 256 vocabulary per chunk: 3 chunks over 11 positions, 1 padded.
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
