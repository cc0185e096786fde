"""Unpacked feature converters (t5xlike/data/feature_converters.py)."""
import numpy as np

from t5xlike.data import feature_converters


def test_prefix_lm_batch_takes_an_example_without_inputs():
  """A decoder batch mixing prefix-LM and causal-LM examples (a mixture of both kinds of
  task, unpacked) gives the causal example an empty prefix, as packed rows do
  (tests/test_packing.py, `prefix_lm_truncated_and_causal`); it raised KeyError."""
  batch = feature_converters.decoder_batch(
      [{"inputs": np.array([7, 8, 5, 6, 1]), "targets": np.array([3, 1])},
       {"targets": np.array([4, 1])}], {"inputs": 3, "targets": 4})
  expected = {
      "decoder_target_tokens": [[7, 8, 5, 3, 1, 0, 0], [4, 1, 0, 0, 0, 0, 0]],
      "decoder_input_tokens": [[0, 7, 8, 5, 3, 1, 0], [0, 4, 1, 0, 0, 0, 0]],
      "decoder_loss_weights": [[0, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]],
      "decoder_causal_attention": [[1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]],
  }
  assert sorted(batch) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(batch[key], value, err_msg=key)
