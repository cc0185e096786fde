"""The encoder-decoder *model*: a network plus its loss (T5X's split).

Batches use T5X's feature names, all `[batch, length]`:
  encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
  decoder_loss_weights, and optionally encoder_segment_ids,
  decoder_segment_ids (packing).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from t5xlike.inference import prepacking
from t5xlike.models import base, layers

Array = jax.Array
Batch = Mapping[str, Array]

INPUT_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                  "decoder_loss_weights")


class EncoderDecoderModel(base.TokenModel):
  """Loss and metrics of an encoder-decoder network such as `t5.Transformer`.

  Args:
    network: a Flax module called as
      `network(encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
      encoder_segment_ids=None, decoder_segment_ids=None, deterministic=...)`
      that returns logits `[batch, length, vocab]`, with `network.config.vocab_size`.
    vocabulary, z_loss, label_smoothing: see `base.TokenModel`.
  """

  feature_names = INPUT_FEATURES
  #: The feature converter (`t5xlike.data.feature_converters.CONVERTERS`) that makes its batches.
  feature_converter = "encoder_decoder"

  def init(self, rng: Array, batch: Batch) -> Any:
    """Returns the (logically boxed) variables for a batch of these shapes."""
    return self.network.init(rng, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                             batch["decoder_target_tokens"], deterministic=True)

  def logits(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> Array:
    """float32 logits [batch, target_length, vocab]; dropout on when a rng is given."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    # `apply` without `mutable` returns the network's output alone.
    return cast(Array, self.network.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        deterministic=dropout_rng is None, rngs=rngs))

  def pooled_states(self, params: Any, batch: Batch) -> Array:
    """float32 [b, embed]: the encoder's output (after its final norm) averaged over
    the row's input tokens (`encoder_input_tokens > 0`); the decoder is not run."""
    tokens = jnp.asarray(batch["encoder_input_tokens"])
    encoded = cast(Array, self.network.apply({"params": params}, tokens, method="encode"))
    return base.mean_over_tokens(encoded, tokens > 0)

  # -- decoding protocol of `t5xlike.inference.decoding` (see base.TokenModel.predict_batch) --
  def decoding_start(self, params: Any, batch: Batch, max_length: int) -> tuple[Any, Array]:
    """Encodes `encoder_input_tokens` once, feeds the decoder its BOS (id 0)
    and returns (state, logits [b, vocab] of the first target token).

    State: the decoder's KV cache (max_length + 1 slots), the encoder output
    [b, le, embed] and the encoder tokens [b, le] (for the cross-attention mask).
    """
    encoder_tokens = jnp.asarray(batch["encoder_input_tokens"], jnp.int32)
    encoded = cast(Array, self.network.apply({"params": params}, encoder_tokens, method="encode"))
    return self._start_from_encoded(params, encoder_tokens, encoded, max_length)

  def prompt_layout(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """(int [b] each row's encoder input length up to its last non-padding token; L_in
    the padded width) of a host (NumPy) batch, for prepacking. An all-padding row
    counts L_in: packed alone, it is encoded as unpacked (its decoder reads the mean
    of the encoder's outputs at padding, every slot being hidden)."""
    tokens = np.asarray(batch["encoder_input_tokens"])
    real = tokens > 0
    width = tokens.shape[1]
    lengths = np.where(real.any(axis=1), width - np.argmax(real[:, ::-1], axis=1), width)
    return lengths.astype(np.int32), width

  def prepacked_decoding_start(self, params: Any, batch: Batch,
                               packing: prepacking.PackedPrompts,
                               max_length: int) -> tuple[Any, Array]:
    """`decoding_start` with the encoder inputs packed (`inference.prepacking`):
    the inputs are laid into packing's R rows of C = L_in tokens and encoded
    once with their segment ids (the encoder's packed-training mask: each input
    sees only itself; T5's relative positions within an input are unchanged by
    its offset), then the encoder output is unpacked into one row per request
    (left-aligned, zeros on padding, which the cross-attention mask hides) and
    decoding starts from it as in `decoding_start`."""
    encoder_tokens = jnp.asarray(batch["encoder_input_tokens"], jnp.int32)
    packed = prepacking.gather_packed(encoder_tokens, packing)
    encoded = cast(Array, self.network.apply({"params": params}, packed,
                                             jnp.asarray(packing.segment_ids), method="encode"))
    encoded = prepacking.unpack(encoded, packing, encoder_tokens.shape[1], right_aligned=False)
    return self._start_from_encoded(params, encoder_tokens, encoded, max_length)

  def _start_from_encoded(self, params: Any, encoder_tokens: Array, encoded: Array,
                          max_length: int) -> tuple[Any, Array]:
    """The decoding state and first logits from the encoder output [b, le, embed]."""
    rows, slots = encoder_tokens.shape[0], max_length + 1
    decoder_tokens = jnp.zeros((rows, slots), jnp.int32)
    shapes = jax.eval_shape(lambda: self.network.init(
        jax.random.key(0), encoded, encoder_tokens, decoder_tokens, None, decode=True,
        max_decode_length=slots, method="decode"))["cache"]
    state = {"cache": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
             "encoded": encoded, "encoder_input_tokens": encoder_tokens}
    return self.decoding_step(params, jnp.zeros((rows, 1), jnp.int32), state)[::-1]

  def decoding_step(self, params: Any, tokens: Array, state: Any) -> tuple[Array, Any]:
    """Feeds tokens int [b, 1]; returns (logits [b, vocab], state)."""
    logits, variables = self.network.apply(
        {"params": params, "cache": state["cache"]}, state["encoded"],
        state["encoder_input_tokens"], tokens, None, decode=True,
        max_decode_length=layers.cache_length(state["cache"]), method="decode",
        mutable=["cache"])
    return logits[:, 0], {**state, "cache": variables["cache"]}

  def gather_decoding_rows(self, state: Any, rows: Array) -> Any:
    """The decoding state of rows `rows` (int [m])."""
    take = lambda x: jnp.take(x, rows, axis=0)
    cache = layers.gather_cache_rows(state["cache"], rows, self.network.config.scan_layers)
    return {"cache": cache,
            "encoded": take(state["encoded"]),
            "encoder_input_tokens": take(state["encoder_input_tokens"])}
