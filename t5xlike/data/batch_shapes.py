"""The shapes and dtypes of the batches a pipeline will produce, before it exists.

The train step can be compiled while the data pipeline starts (TensorFlow
and seqio imports, opening the sources, the first packed batch): its batch
shapes follow from the feature converter, TASK_FEATURE_LENGTHS, the batch
size and packing alone. `expected_batch_shapes` runs the real converter
(`feature_converters`, or `packing.packed_batch` on packer-shaped rows) on
one placeholder example, so the layouts have one source of truth; callers
compare the prediction with the first real batch (`matches`) and compile
again when it differs (an unpacked decoder task whose examples do or do not
carry `inputs`, the one case the lengths do not decide).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from t5xlike.data import feature_converters, packing, pairwise

#: feature name -> its shape and dtype in a batch (what `Trainer.start_compile` takes).
Shapes = dict[str, jax.ShapeDtypeStruct]


def _placeholder_example(converter: str, feature_lengths: Mapping[str, int]) -> dict:
  """One example of the fields the converter reads (a single token each)."""
  token = np.ones([1], np.int32)
  if pairwise.is_pairwise(converter):
    return {name: token for name in pairwise.TOKEN_FEATURES}
  if converter == "encoder_decoder":
    return {"inputs": token, "targets": token}
  if converter == "decoder":
    return ({"inputs": token, "targets": token} if packing.is_prefix_lm(feature_lengths)
            else {"targets": token})
  if converter == "encoder":
    return {"inputs": token, "targets": token, "mlm_weights": np.ones([1], np.float32)}
  if converter == "encoder_classification":
    return {"inputs": token, "label": np.asarray(0, np.int32)}
  raise ValueError(f"unknown feature converter {converter!r}; known: "
                   f"{', '.join(feature_converters.CONVERTERS)}")


def expected_batch_shapes(converter: str, feature_lengths: Mapping[str, int], batch_size: int,
                          pack: bool) -> Shapes:
  """{feature: ShapeDtypeStruct((batch_size, length), dtype)} of the model features
  (T5X names).

  Args:
    converter: the model's `feature_converter`.
    feature_lengths: TASK_FEATURE_LENGTHS.
    batch_size: rows of the batch (global or per process, as the caller wants).
    pack: the pipeline packs (segment ids and positions are added).
  Raises:
    ValueError: the converter is unknown or lacks a feature length it needs.
  """
  example = _placeholder_example(converter, feature_lengths)
  if not pack:
    one_row = feature_converters.get_converter(converter)([example], feature_lengths)
  else:
    lengths = packing.pack_lengths(converter, feature_lengths)
    sequences = packing.prepare_for_packing(converter, example, feature_lengths)
    row = {}
    for key, length in lengths.items():  # as grain's first-fit packer emits a row
      row[key] = np.zeros([length], sequences[key].dtype)
      row[f"{key}_segment_ids"] = np.zeros([length], np.int32)
      row[f"{key}_positions"] = np.zeros([length], np.int32)
    one_row = packing.packed_batch(converter, [row], feature_lengths)
  return {name: jax.ShapeDtypeStruct((batch_size,) + value.shape[1:], value.dtype)
          for name, value in one_row.items()}


def shapes_of(batch: Mapping[str, np.ndarray]) -> Shapes:
  """The shape and dtype of every feature of a real batch."""
  return {name: jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype)
          for name, value in batch.items()}


def matches(expected: Shapes, batch: Mapping[str, np.ndarray]) -> bool:
  """Whether `batch` has exactly the predicted features, shapes and dtypes."""
  return shapes_of(batch) == expected
