"""Feature conversion: objective/task examples -> model features (NumPy).

The equivalents of seqio's feature converters, with T5X's feature names, one
per model family (a model names its converter in `model.feature_converter`):

- `encoder_decoder` (seqio `EncDecFeatureConverter`): `inputs` -> encoder,
  `targets` -> decoder, each padded to its task feature length.
- `decoder` (seqio `DecoderFeatureConverter`): examples with `targets` only
  are causal LM rows of length `targets`; examples that also have `inputs`
  are prefix-LM rows (seqio `PrefixLMFeatureConverter`): `inputs + targets`
  concatenated into one row of length `inputs + targets`, loss on the targets
  only, and `decoder_causal_attention` = 1 on the first `len(inputs) + 1`
  positions (the prefix as seen through the shifted decoder input).
- `encoder` (MLM, ELECTRA): `inputs` (the corrupted sequence), `targets`
  (the original one) and `mlm_weights` (1 where a prediction is scored),
  each of length `inputs`.
- `encoder_classification` (sequence classification, `ClassifierModel`):
  `inputs` -> `encoder_input_tokens` [b, inputs], the scalar integer `label`
  -> `classification_labels` [b]. Needs TASK_FEATURE_LENGTHS['inputs'] only.
  Never packed: one sequence per row (`UNPACKED_CONVERTERS`).
- `pairwise_encoder_decoder`, `pairwise_decoder` (preference tuning): a
  prompt and two completions -> the rows of `encoder_decoder` / `decoder`
  for each completion, prefixed `chosen_` / `rejected_` (`data.pairwise`).

Without packing each example fills one row, 0-padded or truncated; the
decoder input is the target shifted right with 0 as BOS. An example may carry
`DECODER_INPUT_TARGETS`, the targets as the decoder reads them (Masked
Thought, `data.masked_thought`): that feature is shifted into
`decoder_input_tokens` instead of `targets` (the prefix of a prefix-LM row
is read as it is); the targets, weights and masks do not change.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from t5xlike.data import pairwise

Example = Mapping[str, np.ndarray]
Batch = dict[str, np.ndarray]

#: An example's targets as the decoder reads them (teacher forcing), when they differ
#: from `targets` (Masked Thought); same length as the kept targets.
DECODER_INPUT_TARGETS = "decoder_input_targets"


def read_targets(example: Example) -> np.ndarray:
  """The target tokens the decoder reads: `DECODER_INPUT_TARGETS`, else `targets`."""
  return example.get(DECODER_INPUT_TARGETS, example["targets"])


def pad_or_truncate(sequences: Sequence[np.ndarray], length: int,
                    dtype: npt.DTypeLike = np.int32) -> np.ndarray:
  """Stacks sequences into `dtype` [len(sequences), length], 0-padded / truncated."""
  out = np.zeros((len(sequences), length), dtype=dtype)
  for row, seq in enumerate(sequences):
    seq = np.asarray(seq)[:length]
    out[row, :len(seq)] = seq
  return out


def shift_right(targets: np.ndarray) -> np.ndarray:
  """[b, l] -> [b, l]: 0 (BOS) then targets[:, :-1]; padding stays 0."""
  shifted = np.zeros_like(targets)
  shifted[:, 1:] = targets[:, :-1]
  return shifted


def _require(feature_lengths: Mapping[str, int], keys: Sequence[str], converter: str) -> None:
  missing = [k for k in keys if k not in feature_lengths]
  if missing:
    raise ValueError(f"the {converter} feature converter needs TASK_FEATURE_LENGTHS "
                     f"{missing} (got {dict(feature_lengths)})")


def encoder_decoder_batch(examples: Sequence[Example],
                          feature_lengths: Mapping[str, int]) -> Batch:
  """Examples with `inputs`/`targets` -> T5X encoder-decoder features, each [b, length].

  Returns encoder_input_tokens [b, L_in], decoder_target_tokens,
  decoder_input_tokens and decoder_loss_weights [b, L_t] (1.0 on real target
  tokens, float32).
  """
  _require(feature_lengths, ("inputs", "targets"), "encoder_decoder")
  inputs = pad_or_truncate([ex["inputs"] for ex in examples], feature_lengths["inputs"])
  targets = pad_or_truncate([ex["targets"] for ex in examples], feature_lengths["targets"])
  read = pad_or_truncate([read_targets(ex) for ex in examples], feature_lengths["targets"])
  return {
      "encoder_input_tokens": inputs,
      "decoder_target_tokens": targets,
      "decoder_input_tokens": shift_right(read),
      "decoder_loss_weights": (targets > 0).astype(np.float32),
  }


def decoder_batch(examples: Sequence[Example], feature_lengths: Mapping[str, int]) -> Batch:
  """Decoder-only features, each [b, L] with L = targets (causal) or inputs + targets (prefix LM).

  Causal LM (examples without `inputs`): decoder_target_tokens = targets,
  decoder_input_tokens = shifted right, decoder_loss_weights on real tokens.
  Prefix LM (examples with `inputs`), as seqio's PrefixLMFeatureConverter:

    inputs [9 4 6 1], targets [3 9 1], L = 9:
    decoder_target_tokens    9 4 6 1 3 9 1 0 0
    decoder_input_tokens     0 9 4 6 1 3 9 1 0
    decoder_loss_weights     0 0 0 0 1 1 1 0 0
    decoder_causal_attention 1 1 1 1 1 0 0 0 0

  An example without `inputs` in a prefix-LM batch (a mixture of both kinds of
  task) has an empty prefix, as in packed rows: loss on every target token,
  causal attention on its first position only.
  """
  _require(feature_lengths, ("targets",), "decoder")
  prefix_lm = any("inputs" in ex for ex in examples)
  if not prefix_lm:
    targets = pad_or_truncate([ex["targets"] for ex in examples], feature_lengths["targets"])
    read = pad_or_truncate([read_targets(ex) for ex in examples], feature_lengths["targets"])
    return {"decoder_target_tokens": targets, "decoder_input_tokens": shift_right(read),
            "decoder_loss_weights": (targets > 0).astype(np.float32)}
  _require(feature_lengths, ("inputs",), "prefix-LM decoder")
  length = feature_lengths["inputs"] + feature_lengths["targets"]
  prefixes = [np.asarray(ex["inputs"])[:feature_lengths["inputs"]] if "inputs" in ex
              else np.zeros([0], np.int32) for ex in examples]
  suffixes = [np.asarray(ex["targets"])[:feature_lengths["targets"]] for ex in examples]
  targets = pad_or_truncate([np.concatenate([p, s]) for p, s in zip(prefixes, suffixes)], length)
  read = pad_or_truncate([np.concatenate([p, np.asarray(read_targets(ex))[:feature_lengths[
      "targets"]]]) for p, ex in zip(prefixes, examples)], length)
  positions = np.arange(length)[None, :]
  widths = np.array([len(p) for p in prefixes])[:, None]
  real = targets > 0
  return {
      "decoder_target_tokens": targets,
      "decoder_input_tokens": shift_right(read),
      "decoder_loss_weights": (real & (positions >= widths)).astype(np.float32),
      "decoder_causal_attention": (positions < widths + 1).astype(np.int32),
  }


def encoder_batch(examples: Sequence[Example], feature_lengths: Mapping[str, int]) -> Batch:
  """Encoder-only (MLM / ELECTRA) features, each [b, L_in].

  encoder_input_tokens: the corrupted sequence; encoder_target_tokens: the
  original tokens at every position; mlm_weights (float32): 1.0 where the
  masked-LM prediction is scored.
  """
  _require(feature_lengths, ("inputs",), "encoder")
  length = feature_lengths["inputs"]
  return {
      "encoder_input_tokens": pad_or_truncate([ex["inputs"] for ex in examples], length),
      "encoder_target_tokens": pad_or_truncate([ex["targets"] for ex in examples], length),
      "mlm_weights": pad_or_truncate([ex["mlm_weights"] for ex in examples], length,
                                     dtype=np.float32),
  }


def encoder_classification_batch(examples: Sequence[Example],
                                 feature_lengths: Mapping[str, int]) -> Batch:
  """Sequence-classification features: one example per row, never packed.

  Examples hold `inputs` (token ids, EOS already appended by the pipeline)
  and `label` (a scalar integer, e.g. a seqio feature with rank 0). Returns
  encoder_input_tokens int32 [b, L_in] (0-padded / truncated) and
  classification_labels int32 [b]:

    inputs [9 4 1] label 1, inputs [5 1] label 0, L_in 4:
    encoder_input_tokens   9 4 1 0
                           5 1 0 0
    classification_labels  1 0
  """
  _require(feature_lengths, ("inputs",), "encoder_classification")
  labels = []
  for ex in examples:
    if "label" not in ex:
      raise ValueError(f"the encoder_classification feature converter needs a 'label' feature; "
                       f"the example has {sorted(ex)}")
    label = np.asarray(ex["label"])
    if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
      raise ValueError(f"'label' must be a scalar integer, got {label.dtype} {label.shape}")
    labels.append(int(label))
  return {
      "encoder_input_tokens": pad_or_truncate([ex["inputs"] for ex in examples],
                                              feature_lengths["inputs"]),
      "classification_labels": np.asarray(labels, np.int32).reshape(len(labels)),
  }


CONVERTERS: dict[str, Callable[[Sequence[Example], Mapping[str, int]], Batch]] = {
    "encoder_decoder": encoder_decoder_batch,
    "decoder": decoder_batch,
    "encoder": encoder_batch,
    "encoder_classification": encoder_classification_batch,
    "pairwise_encoder_decoder": pairwise.converter_of(encoder_decoder_batch),
    "pairwise_decoder": pairwise.converter_of(decoder_batch),
}

#: Converters with one example per row that the packed pipeline must refuse.
UNPACKED_CONVERTERS = ("encoder_classification",)


def get_converter(name: str) -> Callable[[Sequence[Example], Mapping[str, int]], Batch]:
  """The converter called `name` (a model's `feature_converter`)."""
  if name not in CONVERTERS:
    raise ValueError(f"unknown feature converter {name!r}; known: {', '.join(CONVERTERS)}")
  return CONVERTERS[name]


#: The features whose positions count as the tokens a batch feeds the model.
TOKEN_FEATURES = ("encoder_input_tokens", "decoder_target_tokens") + tuple(
    f"{side}_{name}" for side in pairwise.SIDES
    for name in ("encoder_input_tokens", "decoder_target_tokens"))


def tokens_per_batch(batch: Mapping[str, np.ndarray]) -> int:
  """Token positions (padding included) of a batch: encoder plus decoder lengths x rows."""
  return int(sum(np.asarray(batch[k]).size for k in TOKEN_FEATURES if k in batch))
