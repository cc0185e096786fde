"""Predicted batch shapes (`batch_shapes.expected_batch_shapes`) against the pipeline's batches."""
import numpy as np
import pytest

import t5xlike.tasks.embedded  # noqa: F401  (registers the embedded tasks)
from t5xlike.data import batch_shapes, pipeline
from t5xlike.objectives import lm, mlm, span_corruption

CASES = [  # (converter, objective, lengths)
    ("encoder_decoder", span_corruption.SpanCorruption, {"inputs": 32, "targets": 8}),
    ("decoder", lm.CausalLM, {"targets": 24}),
    ("decoder", lm.PrefixLM, {"inputs": 16, "targets": 16}),
    ("encoder", mlm.MaskedLanguageModeling, {"inputs": 24}),
]


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("converter,objective,lengths", CASES,
                         ids=[f"{c}-{o.__name__}" for c, o, _ in CASES])
def test_prediction_equals_the_pipelines_first_batch(converter, objective, lengths, pack):
  feed = pipeline.Pipeline("embedded_corpus", "validation", lengths, 4, objective(), seed=0,
                           num_threads=0, feature_converter=converter, pack=pack)
  batch = next(feed)
  feed.close()
  expected = batch_shapes.expected_batch_shapes(converter, lengths, 4, pack)
  assert batch_shapes.matches(expected, batch), (expected, batch_shapes.shapes_of(batch))
  assert not batch_shapes.matches(batch_shapes.expected_batch_shapes(converter, lengths, 8, pack),
                                  batch)


def test_classification_rows_and_errors():
  expected = batch_shapes.expected_batch_shapes("encoder_classification", {"inputs": 12}, 3,
                                                pack=False)
  assert {k: (v.shape, v.dtype) for k, v in expected.items()} == {
      "encoder_input_tokens": ((3, 12), np.dtype(np.int32)),
      "classification_labels": ((3,), np.dtype(np.int32))}
  with pytest.raises(ValueError, match="does not pack"):
    batch_shapes.expected_batch_shapes("encoder_classification", {"inputs": 12}, 3, pack=True)
  with pytest.raises(ValueError, match="unknown feature converter"):
    batch_shapes.expected_batch_shapes("seq2seq", {"inputs": 12}, 3, pack=False)
  with pytest.raises(ValueError, match="targets"):
    batch_shapes.expected_batch_shapes("encoder_decoder", {"inputs": 12}, 3, pack=True)
