"""What the token-level models share: the vocabulary check, the loss and metrics.

A *model* (T5X's split) is a Flax network plus its loss. `TokenModel`
subclasses (encoder-decoder, decoder-only, masked LM) differ only in how
they call the network (`init`, `logits`) and in which batch features hold
the targets and the loss weights.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5xlike import interfaces, losses
from t5xlike.inference import decoding
from t5xlike.models import layers

Array = jax.Array
Batch = Mapping[str, Array]


def mean_over_tokens(states: Array, real: Array) -> Array:
  """float32 [b, embed]: the mean of `states` [b, l, embed] over the positions where
  `real` [b, l] is true (zeros for a row without any)."""
  weights = jnp.asarray(real, jnp.float32)
  total = jnp.einsum("ble,bl->be", states.astype(jnp.float32), weights)
  return total / jnp.maximum(weights.sum(axis=1), 1.0)[:, None]


def check_vocabulary(vocabulary: Any, table_rows: int) -> None:
  """Raises ValueError when the vocabulary has more ids than the embedding table rows."""
  vocab_size = getattr(vocabulary, "vocab_size", None)
  if vocab_size is not None and vocab_size > table_rows:
    raise ValueError(f"the vocabulary has {vocab_size} tokens but the network only "
                     f"{table_rows} embeddings")


class TokenModel:
  """Cross entropy (+ z-loss) over the weighted positions of `target_feature`.

  Args:
    network: a Flax module with `network.config.vocab_size`.
    vocabulary: the model's (seqio) vocabulary: decoding, and the check that
      the network covers every token id.
    z_loss: coefficient of log(Z)^2 added to the loss (T5X default 1e-4).
    label_smoothing: label smoothing of the targets.
    loss_impl: 'dense' (the [b, l, vocab] logits, then the loss) or
      'chunked' (`losses.chunked_token_stats`: the output layer and the loss
      over chunks of the length axis, for large vocabularies; needs an
      untied output layer `logits_dense`).
  """

  #: The batch features with the target ids and the loss weights, [batch, length].
  target_feature = "decoder_target_tokens"
  weight_feature = "decoder_loss_weights"
  #: The PEFT technique the network carries: `finetuning.peft.wrap_model` sets it on its copy.
  peft_method: interfaces.FineTuningTechnique | None = None

  # The decoding protocol of `t5xlike.inference.decoding` that `predict_batch` calls:
  # methods of the models that decode (declared here, not defined, so a model
  # without them, such as `MLMModel`, still has none).
  decoding_start: Callable[[Any, Batch, int], tuple[Any, Array]]
  decoding_step: Callable[[Any, Array, Any], tuple[Array, Any]]
  gather_decoding_rows: Callable[[Any, Array], Any]
  # Prepacked prefill (`t5xlike.inference.prepacking`), in the models that have it:
  # `prompt_layout(numpy batch) -> (prompt lengths [b], padded prompt width)` and
  # `prepacked_decoding_start(params, batch, packing, max_length)`, `decoding_start`'s
  # result with the prompts prefilled packed.
  prepacked_decoding_start: Callable[[Any, Batch, Any, int], tuple[Any, Array]]

  def __init__(self, network: nn.Module, vocabulary: Any = None, z_loss: float = 1e-4,
               label_smoothing: float = 0.0, loss_impl: str = "dense"):
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if loss_impl not in ("dense", "chunked"):
      raise ValueError(f"loss_impl must be 'dense' or 'chunked', got {loss_impl!r}")
    self.loss_impl = loss_impl
    self.network = network
    self.vocabulary = vocabulary
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    check_vocabulary(vocabulary, network.config.vocab_size)

  @property
  def vocab_size(self) -> int:
    """Rows of the embedding table (the ids the model can read and predict)."""
    return self.network.config.vocab_size

  def logits(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> Array:
    raise NotImplementedError

  def loss_fn(self, params: Any, batch: Batch,
              dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
    """Loss per scored token (cross entropy + z-loss) and summed statistics.

    Returns `(loss, stats)` where stats holds weighted sums: `loss_sum`,
    `z_loss_sum`, `correct`, `weight_sum` (the number of scored tokens).
    """
    if self.loss_impl == "chunked":
      hidden, kernel, dtype = self.output_layer_inputs(params, batch, dropout_rng)
      stats = losses.chunked_token_stats(
          hidden, kernel, jnp.asarray(batch[self.target_feature]),
          jnp.asarray(batch[self.weight_feature]), dtype=dtype, z_loss=self.z_loss,
          label_smoothing=self.label_smoothing)
      return stats["loss_sum"] / jnp.maximum(stats["weight_sum"], 1.0), stats
    logits = self.logits(params, batch, dropout_rng)
    stats = losses.token_stats(logits, batch[self.target_feature], batch[self.weight_feature],
                               z_loss=self.z_loss, label_smoothing=self.label_smoothing)
    return stats["loss_sum"] / jnp.maximum(stats["weight_sum"], 1.0), stats

  def output_layer_inputs(self, params: Any, batch: Batch,
                          dropout_rng: Array | None = None) -> tuple[Array, Array, Any]:
    """(hidden [b, l, embed], kernel [embed, vocab], matmul dtype) of the output layer.

    Runs `logits` with the `logits_dense` layer intercepted: its input and
    kernel are captured and it returns zeros, which nothing reads (XLA drops
    them), so the [b, l, vocab] logits are never computed.
    """
    captured: list[tuple[Array, Array, Any]] = []

    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if (isinstance(module, layers.Dense) and module.name == "logits_dense"
          and context.method_name == "__call__"):
        kernel: Array = module.get_variable("params", "kernel")
        captured.append((args[0], kernel, module.dtype))
        return jnp.zeros(args[0].shape[:-1] + (module.features,), module.dtype)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
      self.logits(params, batch, dropout_rng)
    if len(captured) != 1:
      raise ValueError("loss_impl='chunked' needs one untied output layer `logits_dense` "
                       f"(found {len(captured)})")
    return captured[0]

  def metrics(self, sums: Mapping[str, Array]) -> dict[str, Array]:
    """Reported metrics (`loss`, `z_loss`, `accuracy`) from summed `loss_fn` statistics."""
    return losses.token_metrics(sums)

  def pooled_states(self, params: Any, batch: Batch) -> Array:
    """float32 [b, embed]: one vector per row of an unpacked batch, the mean of the
    network's final hidden states over the row's tokens (data selection's diversity
    embeddings). Models that have one override it."""
    raise NotImplementedError(f"{type(self).__name__} has no pooled states")

  def score_batch(self, params: Any, batch: Batch) -> Array:
    """Log-likelihood (natural log) of each target token, float32 [b, length];
    0 where `weight_feature` is 0. A row's score is the sum over its length,
    minus its summed token cross entropy (without z-loss and smoothing)."""
    return self.greedy_scores(params, batch)[0]

  def greedy_scores(self, params: Any, batch: Batch) -> tuple[Array, Array]:
    """(`score_batch`'s float32 [b, length], bool [b, length]: whether each target token
    is the model's most likely token there, the argmax of its logits; False where
    `weight_feature` is 0). One forward pass (lm-evaluation-harness's `is_greedy`)."""
    logits = self.logits(params, batch).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = jnp.asarray(batch[self.target_feature])
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weighted = jnp.asarray(batch[self.weight_feature]) > 0
    greedy = weighted & (jnp.argmax(logits, axis=-1) == targets)
    return jnp.where(weighted, picked, 0.0), greedy

  def predict_batch(self, params: Any, batch: Batch, config: decoding.DecodingConfig,
                    max_length: int, eos_id: int, rng: Array | None = None,
                    packing: Any = None) -> tuple[Array, Array]:
    """Generates up to `max_length` tokens per row (jit it with the config,
    lengths and eos static). Needs the model's `decoding_start` (or, with
    `packing`, `prepacked_decoding_start`), `decoding_step` and `gather_decoding_rows`.

    Args:
      params: the model's (unboxed) parameters.
      batch: the rows' features, [b, ...] (the prompts / encoder inputs).
      config: how each next token is chosen (greedy, sampling, beam search).
      max_length: tokens generated at most per row.
      eos_id: the token that ends a row.
      rng: the key of method 'sample' (greedy and beam search draw nothing: None).
      packing: a `prepacking.PackedPrompts` of the rows' prompts (`prompt_layout`):
        the prefill runs packed; None: one padded row per prompt.

    Returns:
      tokens int32 [b, max_length] (EOS kept, 0 after it) and scores float32
      [b] (see `t5xlike.inference.decoding`).
    """
    if packing is None:
      state, first_logits = self.decoding_start(params, batch, max_length)
    else:
      state, first_logits = self.prepacked_decoding_start(params, batch, packing, max_length)
    step = lambda tokens, state: self.decoding_step(params, tokens, state)
    return decoding.decode(config, step, state, first_logits, max_length, eos_id,
                           self.gather_decoding_rows, rng=rng)
