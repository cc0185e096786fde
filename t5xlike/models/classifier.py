"""Sequence classification with an encoder-only network (GLUE-style fine-tuning).

The model around `encoder.EncoderNetwork(head='classifier')`: the loss is the
mean cross entropy over rows, the label of a row playing the part of a
length-1 target for `t5xlike.losses` (so z-loss and label smoothing work as
for `base.TokenModel`). Typical use: fine-tune the discriminator exported by
ELECTRA pretraining (`gin_configs/finetune/electra_classifier.gin`); the
`classifier/*` parameters are new and initialised fresh (see
`t5xlike.checkpoints.restore_matching_params`).

Batches (feature converter `encoder_classification`):
  encoder_input_tokens   int32 [batch, length] (0 = padding)
  classification_labels  int32 [batch], in [0, num_classes); a negative label
                         (e.g. GLUE's -1 on unlabelled test rows) is not scored.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp

from t5xlike import interfaces, losses
from t5xlike.models import encoder

Array = jax.Array
Batch = Mapping[str, Array]


class ClassifierModel:
  """Cross entropy (+ z-loss) of one class label per sequence.

  Args:
    network: an `encoder.EncoderNetwork` with head='classifier' (logits
      [b, num_classes]).
    vocabulary: the inputs' (seqio) vocabulary; checked against the token table.
    z_loss: coefficient of log(Z)^2 added to each row's loss (0: none).
    label_smoothing: label smoothing of the class targets.

  `loss_fn` statistics, summed over the scored rows (label >= 0): `loss_sum`
  (cross entropy + z-loss, nats), `z_loss_sum`, `correct` (argmax == label)
  and `weight_sum` (the number of scored rows); `metrics` reports per-row
  `loss`, `z_loss` and `accuracy`.
  """

  feature_names = ("encoder_input_tokens", "classification_labels")
  #: The feature converter (`t5xlike.data.feature_converters.CONVERTERS`) that makes its batches.
  feature_converter = "encoder_classification"
  #: The PEFT technique the network carries: `finetuning.peft.wrap_model` sets it on its copy.
  peft_method: interfaces.FineTuningTechnique | None = None

  def __init__(self, network: encoder.EncoderNetwork, vocabulary: Any = None,
               z_loss: float = 0.0, label_smoothing: float = 0.0):
    if network.head != "classifier":
      raise ValueError(f"ClassifierModel needs an EncoderNetwork with head='classifier', got "
                       f"{network.head!r}")
    if int(network.num_classes) < 2 or network.pooling not in encoder.POOLINGS:
      raise ValueError(f"a classifier needs num_classes >= 2 and pooling in "
                       f"{encoder.POOLINGS}, got {network.num_classes}, {network.pooling!r}")
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    encoder.check_vocabulary(vocabulary, network.config)
    self.network = network
    self.vocabulary = vocabulary
    self.z_loss = float(z_loss)
    self.label_smoothing = float(label_smoothing)

  @property
  def num_classes(self) -> int:
    return int(self.network.num_classes)

  @property
  def vocab_size(self) -> int:
    """Rows of the token table (the input ids the model can read)."""
    return self.network.config.vocab_size

  def init(self, rng: Array, batch: Batch) -> Any:
    """The (logically boxed) variables for a batch of these shapes."""
    return self.network.init(rng, batch["encoder_input_tokens"], deterministic=True)

  def logits(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> Array:
    """float32 class logits [b, num_classes]; dropout on when a rng is given."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    # `apply` without `mutable` returns the network's output alone.
    return cast(Array, self.network.apply({"params": params}, batch["encoder_input_tokens"],
                                          deterministic=dropout_rng is None, rngs=rngs))

  def class_log_probs(self, params: Any, batch: Batch) -> Array:
    """Natural-log class probabilities float32 [b, num_classes] (no dropout)."""
    return jax.nn.log_softmax(self.logits(params, batch), axis=-1)

  def predict_classes(self, params: Any, batch: Batch) -> Array:
    """The most probable class of every row: int32 [b] (no dropout)."""
    return jnp.argmax(self.logits(params, batch), axis=-1).astype(jnp.int32)

  def loss_fn(self, params: Any, batch: Batch,
              dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
    """(mean loss over the scored rows, summed statistics); see the class docstring."""
    logits = self.logits(params, batch, dropout_rng)  # [b, c]
    labels = jnp.asarray(batch["classification_labels"]).astype(jnp.int32)  # [b]
    weights = (labels >= 0).astype(jnp.float32)
    # Each row is a length-1 target sequence: logits [b, 1, c], targets / weights [b, 1].
    targets = jnp.clip(labels, 0, self.num_classes - 1)
    stats = losses.token_stats(logits[:, None, :], targets[:, None], weights[:, None],
                               z_loss=self.z_loss, label_smoothing=self.label_smoothing)
    return stats["loss_sum"] / jnp.maximum(stats["weight_sum"], 1.0), stats

  def metrics(self, sums: Mapping[str, Array]) -> dict[str, Array]:
    """Per-row `loss`, `z_loss` and `accuracy` from summed `loss_fn` statistics."""
    return losses.token_metrics(sums)
