"""Batched prediction and scoring with a trained model (no TensorFlow).

`Predictor` takes a model and its parameters (`inference.checkpoint_loading`
reads them from a checkpoint), turns examples (`{"inputs": int ids,
"targets": int ids}`, ids exactly as given) into the model's features with
its feature converter, pads the last batch to the fixed batch size (one
compilation), and runs jit-compiled decoding (`inference.decoding`, KV cache)
or scoring (log-likelihood of the targets). With `prepack_prefill` the prompts
of a batch are bin-packed for the prefill (`inference.prepacking`); the decode
batch, and so the greedy output, stays the same. Used by `python -m t5xlike.infer`,
`python -m t5xlike.eval` and evaluation during training.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from t5xlike import progress as progress_lib
from t5xlike.data import feature_converters
from t5xlike.inference import decoding, prepacking

log = logging.getLogger(__name__)
Example = Mapping[str, np.ndarray]
#: With prepacking, the packed row count is rounded up to a multiple of
#: ceil(batch_size / PREPACK_ROW_BUCKETS): at most this many prefill shapes compile.
PREPACK_ROW_BUCKETS = 4


@dataclasses.dataclass
class Prediction:
  """One generated sequence: ids up to and including the first EOS (when
  generated) and its score (summed log-likelihood; beam search: divided by
  the length penalty)."""
  ids: list[int]
  score: float


@dataclasses.dataclass
class Score:
  """Log-likelihood (natural log) of given targets: the sum and per token; with
  `Predictor.score(..., greedy=True)` also whether each target token is the model's
  most likely one there (`greedy`, per token; else None)."""
  total: float
  token_scores: list[float]
  greedy: list[bool] | None = None


def example_features(model: Any, feature_lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """A one-row batch of the model's features at these lengths (shapes for init)."""
  convert = feature_converters.get_converter(model.feature_converter)
  example = {name: np.ones((1,), np.int32) for name in ("inputs", "targets")
             if name in feature_lengths}
  return dict(convert([example], feature_lengths))


def can_prepack(model: Any) -> bool:
  """Whether `model` prefills packed prompts: it has `prepacked_decoding_start` and
  no PEFT method that prepends positions to every input row (prompt tuning's
  prompt would join the packed prompts)."""
  method = getattr(model, "peft_method", None)
  return (hasattr(model, "prepacked_decoding_start")
          and not getattr(method, "prepends_prompt", False))


class Predictor:
  """Predicts and scores lists of examples with one model and its parameters.

  Args:
    model: a token model with `feature_converter`, `predict_batch`, `score_batch`.
    params: its parameters (e.g. from `checkpoint_loading.restore_params`).
    feature_lengths: TASK_FEATURE_LENGTHS ('inputs', 'targets'): the padded
      lengths of the features; longer examples are truncated (logged).
    batch_size: rows per compiled call.
    decoding_config: how predictions choose tokens.
    max_decode_length: most tokens generated per example (default: the
      'targets' length; never the example's own targets).
    eos_id: the vocabulary's EOS id (generation stops there, and it is kept).
    seed: sampling seed (batch i uses fold_in(seed, i)).
    prepack_prefill: pack the prompts of each batch into shared rows for the
      prefill (Zhao et al. 2024; `inference.prepacking`), then decode from the
      unpacked caches; for models with `prepacked_decoding_start` (decoder-only:
      the prompts; encoder-decoder: the encoder inputs), others run unpacked (logged).
    progress: a name to show the progress of each call under (`t5xlike.progress`: a bar
      on a terminal, a log line every 30 s otherwise); None: silent.
  """

  def __init__(self, model: Any, params: Any, feature_lengths: Mapping[str, int],
               batch_size: int, decoding_config: decoding.DecodingConfig | None = None,
               max_decode_length: int | None = None, eos_id: int = 1, seed: int = 0,
               prepack_prefill: bool = False, progress: str | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model, self.params = model, params
    self.feature_lengths = dict(feature_lengths)
    self.batch_size = batch_size
    self.decoding_config = decoding_config or decoding.DecodingConfig()
    self.max_decode_length = int(max_decode_length or self.feature_lengths["targets"])
    if self.max_decode_length < 1:
      raise ValueError(f"max_decode_length must be >= 1, got {self.max_decode_length}")
    self.eos_id = eos_id
    self.seed = seed
    #: Shows the progress of predict / score / pooled_states under this name (commands: eval,
    #: infer, select_data, ...; `t5xlike.progress`); None: silent (evaluation in training).
    self.progress = progress
    self.convert = feature_converters.get_converter(model.feature_converter)
    self._predict = jax.jit(functools.partial(
        model.predict_batch, config=self.decoding_config, max_length=self.max_decode_length,
        eos_id=eos_id))
    self._compiled_predict: Any = None  # compiled at the first predict() call
    self.prepack_prefill = prepack_prefill and can_prepack(model)
    if prepack_prefill and not self.prepack_prefill:
      log.warning("%s cannot prepack its prefill: prompts are prefilled unpacked",
                  type(model).__name__)
    self._compiled_packed: dict[int, Any] = {}  # packed row count -> compiled predict
    self._score = jax.jit(model.score_batch)
    self._greedy_score: Any = None  # jit of model.greedy_scores, made at the first use
    self._pool: Any = None  # jit of model.pooled_states, made at the first pooled_states() call
    self.last_stats: dict[str, float] = {}

  def _batches(self, examples: Sequence[Example], drop_targets: bool,
               doing: str) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(features of a full batch, number of real rows), padded with copies of row 0; the
    rows count as `doing` ('predicting', 'scoring') in the progress once consumed."""
    with progress_lib.Progress(f"{self.progress}: {doing}", len(examples),
                               enabled=self.progress is not None) as shown:
      for start in range(0, len(examples), self.batch_size):
        chunk = [dict(ex) for ex in examples[start:start + self.batch_size]]
        real = len(chunk)
        if drop_targets:
          for ex in chunk:
            ex["targets"] = np.zeros((0,), np.int32)
        chunk += [chunk[0]] * (self.batch_size - real)
        yield self.convert(chunk, self.feature_lengths), real
        shown.update(real)

  def _warn_truncated(self, examples: Sequence[Example], features: Sequence[str]) -> None:
    for name in features:
      limit = self.feature_lengths.get(name)
      long = sum(1 for ex in examples if name in ex and len(ex[name]) > (limit or 0))
      if limit is not None and long:
        log.warning("%d of %d examples have %s longer than %d tokens: truncated", long,
                    len(examples), name, limit)

  def predict(self, examples: Sequence[Example]) -> list[Prediction]:
    """Generated ids and scores of each example (its `targets`, if any, unused).

    `last_stats` also counts the prefill rows run (`prefill_rows`: packed rows with
    `prepack_prefill`, else the batch rows)."""
    self._warn_truncated(examples, ["inputs"])
    out: list[Prediction] = []
    generated, compile_seconds, prefill_rows = 0, 0.0, 0
    start = time.perf_counter()
    batches = self._batches(examples, drop_targets=True, doing="predicting")
    for index, (batch, real) in enumerate(batches):
      rng = jax.random.fold_in(jax.random.key(self.seed), index)
      compile_start = time.perf_counter()
      predict, packing = self._compiled_for(batch, real, rng)  # Compiled outside the timing.
      compile_seconds += time.perf_counter() - compile_start
      prefill_rows += self.batch_size if packing is None else packing.packed_rows
      kwargs = {} if packing is None else {"packing": packing}
      tokens, scores = jax.device_get(predict(self.params, batch, rng=rng, **kwargs))
      for ids, score in zip(decoding.trim_after_eos(tokens[:real], self.eos_id), scores[:real]):
        out.append(Prediction(ids=[int(i) for i in ids], score=float(score)))
        generated += len(ids)
    seconds = time.perf_counter() - start - compile_seconds
    self.last_stats = {"examples": len(examples), "generated_tokens": generated,
                       "seconds": seconds, "compile_seconds": compile_seconds,
                       "decode_tokens_per_second": generated / seconds if seconds else 0.0,
                       "prefill_rows": prefill_rows}
    return out

  def pack(self, batch: Mapping[str, np.ndarray], real: int) -> prepacking.PackedPrompts:
    """The packing of the prompts of a batch's first `real` rows (`prepack_prefill`)."""
    lengths, width = self.model.prompt_layout(batch)
    row_multiple = -(-self.batch_size // PREPACK_ROW_BUCKETS)
    return prepacking.pack_prompts([int(n) for n in lengths[:real]], width, self.batch_size,
                                   row_multiple)

  def _compiled_for(self, batch: Mapping[str, np.ndarray], real: int,
                    rng: Any) -> tuple[Any, prepacking.PackedPrompts | None]:
    """(the compiled predict for this batch, its packing or None); compiles once per
    shape (unpacked: one; packed: one per packed row count)."""
    if not self.prepack_prefill:
      if self._compiled_predict is None:
        self._compiled_predict = self._predict.lower(self.params, batch, rng=rng).compile()
      return self._compiled_predict, None
    packing = self.pack(batch, real)
    rows = packing.packed_rows
    if rows not in self._compiled_packed:
      self._compiled_packed[rows] = self._predict.lower(self.params, batch, rng=rng,
                                                        packing=packing).compile()
    return self._compiled_packed[rows], packing

  def score(self, examples: Sequence[Example], greedy: bool = False) -> list[Score]:
    """Log-likelihood of each example's `targets` given its `inputs`; with `greedy`,
    also whether each target token is the argmax of the model's logits
    (`model.greedy_scores`, same forward pass)."""
    self._warn_truncated(examples, ["inputs", "targets"])
    out: list[Score] = []
    start = time.perf_counter()
    weight_name = self.model.weight_feature
    if greedy and self._greedy_score is None:
      self._greedy_score = jax.jit(self.model.greedy_scores)
    for batch, real in self._batches(examples, drop_targets=False, doing="scoring"):
      if greedy:
        token_scores, is_greedy = map(np.asarray, jax.device_get(
            self._greedy_score(self.params, batch)))
      else:
        token_scores = np.asarray(jax.device_get(self._score(self.params, batch)))
      weights = np.asarray(batch[weight_name]) > 0
      for row in range(real):
        values = token_scores[row][weights[row]]
        out.append(Score(total=float(values.sum(dtype=np.float64)),
                         token_scores=[float(v) for v in values],
                         greedy=[bool(g) for g in is_greedy[row][weights[row]]] if greedy
                         else None))
    seconds = time.perf_counter() - start
    self.last_stats = {"examples": len(examples), "seconds": seconds,
                       "scored_tokens": sum(len(s.token_scores) for s in out)}
    return out

  def pooled_states(self, examples: Sequence[Example]) -> np.ndarray:
    """float32 [len(examples), embed]: each example's `model.pooled_states` (its
    final hidden states averaged over its tokens), batched as `score`."""
    self._warn_truncated(examples, ["inputs", "targets"])
    if self._pool is None:
      self._pool = jax.jit(self.model.pooled_states)
    rows: list[np.ndarray] = []
    start = time.perf_counter()
    for batch, real in self._batches(examples, drop_targets=False, doing="pooled states"):
      rows.append(np.asarray(jax.device_get(self._pool(self.params, batch)))[:real])
    self.last_stats = {"examples": len(examples), "seconds": time.perf_counter() - start}
    return np.concatenate(rows).astype(np.float32, copy=False)
