"""The interfaces the trainer, the runs and the benchmarks rely on, as `typing.Protocol`s.

Plug-ins implement these; nothing in the package probes them with `getattr` /
`hasattr`:

* `Model` (T5X's split of a network and its loss): every model family
  (`models.encoder_decoder.EncoderDecoderModel`, `models.decoder.DecoderOnlyModel`,
  `models.encoder.MLMModel`, `models.classifier.ClassifierModel`,
  `objectives.electra.ElectraModel`) and the wrappers (`objectives.spdf.SparseModel`,
  `finetuning.peft.wrap_model`).
* `DecodingModel`: a `Model` that also scores and generates (the token models).
* `TokenLogitsModel`: a `Model` whose logits over the vocabulary at target
  positions others read (the token models: preference tuning, distillation).
* `EmbeddingModel`: a `DecodingModel` that also pools its final hidden states into
  one vector per example (the T5 and decoder-only models; data selection's diversity).
* `ExportingModel`: a `Model` that writes more than its checkpoints when a run
  ends (ELECTRA's discriminator); `isinstance(model, ExportingModel)` says which.
* `HoldsFrozenModel`: a `Model` whose parameter tree also holds a frozen second
  model (a DPO reference, a distillation teacher: `posttrain.frozen`).
* `PolicySampledFeed`: a `DataFeed` that samples from the policy being trained
  (on-policy preference tuning: `posttrain.on_policy`).
* `FineTuningTechnique`: what `train_run.train(finetuning=...)` and the trainer call
  (`finetuning.base.FineTuning` is the base class with every default).
* `Objective`: the pretraining data transforms (`objectives.base.Objective`, an ABC).
* `DataFeed`: what the training loop reads batches from (`data.pipeline.Pipeline`,
  `data.feeding.SequentialFeed`).

This module imports no JAX, TensorFlow or seqio: it is a leaf of the import graph.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # Types only: no import at run time (this module stays a leaf).
  import jax
  import numpy as np
  import optax
  from etils import epath

  from t5xlike.inference.decoding import DecodingConfig
  from t5xlike.objectives.base import Objective as Objective

Batch = Mapping[str, Any]  # feature name -> [batch, ...] array (NumPy or jax)


class Model(Protocol):
  """A network plus its loss: what the trainer compiles.

  Read-only members, so that a class attribute, an instance attribute or a
  property (a wrapper's delegation) all satisfy them.

  Attributes:
    feature_converter: the name of the converter in
      `data.feature_converters.CONVERTERS` that makes its batches.
    vocab_size: rows of the embedding table (the token ids it can read).
    vocabulary: the (seqio) vocabulary that encodes its text (None: ids only).
    network: the Flax module it applies (`finetuning.peft.wrap_model` replaces it
      by one that runs under the technique's interceptor).
    peft_method: the PEFT technique its network carries (set by
      `finetuning.peft.wrap_model`); None for every model it did not wrap.
  """

  @property
  def feature_converter(self) -> str: ...

  @property
  def vocabulary(self) -> Any: ...

  @property
  def vocab_size(self) -> int: ...

  @property
  def network(self) -> Any: ...

  @property
  def peft_method(self) -> FineTuningTechnique | None: ...

  def init(self, rng: jax.Array, batch: Batch) -> Any:
    """The variables (logically boxed parameters under 'params') for batches of these shapes."""
    ...

  def loss_fn(self, params: Any, batch: Batch,
              dropout_rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, statistics summed over the batch): at least `loss_sum` and `weight_sum`,
    the loss being `loss_sum / weight_sum`. No dropout when `dropout_rng` is None."""
    ...

  def metrics(self, sums: Mapping[str, Any]) -> dict[str, Any]:
    """Reported metrics (e.g. accuracy) from `loss_fn` statistics summed over batches."""
    ...


class DecodingModel(Model, Protocol):
  """A model that scores given targets and generates (inference, evaluation).

  Attributes:
    weight_feature: the batch feature whose positions `score_batch` scores.
  """

  @property
  def weight_feature(self) -> str: ...

  def score_batch(self, params: Any, batch: Batch) -> jax.Array:
    """Log-likelihood of each target token, float32 [batch, length] (0 off `weight_feature`)."""
    ...

  def predict_batch(self, params: Any, batch: Batch, config: DecodingConfig, max_length: int,
                    eos_id: int, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(tokens int32 [batch, max_length], scores float32 [batch]) generated for each row.

    Args:
      params: the model's (unboxed) parameters.
      batch: the rows' features (inputs; targets only as far as the converter needs them).
      config: how each next token is chosen (greedy, sampling, beam search).
      max_length: tokens generated at most per row.
      eos_id: the token that ends a row (kept; 0 after it).
      rng: the key of method 'sample' (greedy and beam search draw nothing: None).
    """
    ...


class TokenLogitsModel(Model, Protocol):
  """A model with per-position logits over its vocabulary (`models.base.TokenModel`).

  Attributes:
    target_feature: the batch feature with the target ids, int [batch, length].
    weight_feature: the batch feature that is > 0 on scored positions, [batch, length].
  """

  @property
  def target_feature(self) -> str: ...

  @property
  def weight_feature(self) -> str: ...

  def logits(self, params: Any, batch: Batch, dropout_rng: jax.Array | None = None) -> jax.Array:
    """float32 logits [batch, length, vocab_size] (dropout on when a rng is given)."""


class EmbeddingModel(DecodingModel, Protocol):
  """A decoding model with one vector per example (`python -m t5xlike.select_data`)."""

  def pooled_states(self, params: Any, batch: Batch) -> jax.Array:
    """float32 [batch, embed]: the final hidden states averaged over each row's tokens
    (NotImplementedError where the model has none)."""
    ...


@runtime_checkable
class ExportingModel(Protocol):
  """A model with parameters to write beside the run's checkpoints when training ends."""

  def exports(self, params: Any) -> Mapping[str, Any]:
    """{name: parameter tree}, written to `MODEL_DIR/<name>/checkpoint_<TRAIN_STEPS>`."""
    ...


@runtime_checkable
class HoldsFrozenModel(Protocol):
  """A model whose parameters hold a second, frozen model under one top-level name.

  The trained model's parameters keep their plain paths at the top of the tree
  (so eval / infer / convert read a run's checkpoints with the plain model's gin);
  the frozen model's sit under `frozen_name` (e.g. `reference/...`). The run keeps
  them bit-identical and without optimizer state, fills them once when it starts
  (not on a resume) from `frozen_checkpoint_path` or, when that is None,
  INITIAL_CHECKPOINT_PATH (a copy of the starting model), and validates that
  checkpoint before anything is written (`posttrain.frozen`).
  """

  @property
  def frozen_name(self) -> str:
    """The top-level key of the frozen model's parameters."""
    ...

  @property
  def frozen(self) -> Model | None:
    """The frozen model (None: this configuration holds none, e.g. DPO on precomputed
    reference log-probabilities)."""
    ...

  @property
  def frozen_checkpoint_path(self) -> str | None:
    """Where its parameters come from (None: INITIAL_CHECKPOINT_PATH)."""
    ...


class FineTuningTechnique(Protocol):
  """How a fine-tuning run changes what trains and how (see `finetuning.base`)."""

  def wrap_optimizer(self, optimizer: optax.GradientTransformation,
                     params: Any) -> optax.GradientTransformation:
    """The run's (per-layer) optimizer, wrapped; `params`: boxed abstract parameters."""
    ...

  def trainable(self, params: Any) -> Any:
    """Bool masks per leaf (shape () or per layer [L]): which parameters get gradients."""
    ...

  def apply_updates(self, params: Any, updates: Any, opt_state: Any) -> Any:
    """How a train step applies the optimizer's updates (default `optax.apply_updates`)."""
    ...

  def initialize(self, params: Any, fresh: Callable[[], Any], restored: frozenset[str]) -> Any:
    """Parameters to start from INITIAL_CHECKPOINT_PATH's (`fresh()`: a new initialisation;
    `restored`: the '/'-joined paths of the parameters that came from the checkpoint)."""
    ...

  def describe(self, params: Any) -> list[str]:
    """Lines for the start-up log."""
    ...

  def export(self, params: Any, model_dir: epath.Path, step: int,
             base_checkpoint: str | None) -> list[Any]:
    """Writes what the technique leaves beside the checkpoints; returns the paths written."""
    ...


class DataFeed(Protocol):
  """This process's rows of successive global batches, resumable from a saved state.

  Attributes:
    batch_size: the global batch size (all processes).
    feature_lengths: TASK_FEATURE_LENGTHS.
    task: the seqio task or mixture read.
    vocabulary: the task's output vocabulary.
  """
  batch_size: int
  feature_lengths: Mapping[str, int]
  task: Any
  vocabulary: Any

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict[str, Any]:
    """The position, saved with every checkpoint (JSON-able)."""
    ...

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a position `get_state` returned."""
    ...

  def metrics(self) -> dict[str, float]:
    """Loader figures logged with each train row (throughput, packing efficiency)."""
    ...

  def close(self) -> None: ...


@runtime_checkable
class PolicySampledFeed(DataFeed, Protocol):
  """A feed whose batches hold samples of the policy being trained (on-policy data).

  The training loop calls `observe_policy(step, params)` before reading the batch
  of step `step + 1`, with the parameters after `step` updates (valid during the
  call only: the next train step donates them). What the feed samples goes into
  its `get_state()`, so a resume reads exactly the batches an uninterrupted run reads.
  """

  def observe_policy(self, step: int, params: Any) -> None: ...
