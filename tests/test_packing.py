"""Packing (`t5xlike.data.packing`) through grain's real first-fit packer.

1. Exact layouts: seqio's packed feature-converter examples (google/seqio,
   seqio/feature_converters_test.py: `test_encoder_decoder_packed`,
   `test_encoder_decoder_packed_long_sequences`, `test_lm_only_packed`,
   `test_lm_pack_long_sequences`, `test_prefix_lm_packed`,
   `test_prefix_lm_pack_long_sequences`), reproduced array for array, plus
   hand-written encoder (MLM) and truncation cases.
2. Every model family gives a packed row the logits of each of its examples
   run alone (the unpacked converter's row, at positions 0..n-1), and the
   same summed loss: T5 (encoder-decoder), the decoder-only model (causal and
   prefix LM), the masked-LM encoder and ELECTRA's generator + discriminator.
   Controls show the comparison has teeth: without segment ids (or, for the
   encoder, positions) the logits of a later segment change, and T5's logits
   depend on relative distances (a gap in the encoder input changes them), so
   T5's equality at a nonzero offset proves that contiguous segments keep
   their relative distances.
3. `packing_efficiency` of known batches.
"""
import dataclasses
import functools

import flax.linen as nn
import grain
import jax
import numpy as np
import pytest
from grain.experimental import FirstFitPackIterDataset

from t5xlike.data import feature_converters, packing
from t5xlike.models import decoder, encoder, encoder_decoder, t5
from t5xlike.objectives import electra

VOCAB = 128
MASK_ID = VOCAB - 1


def pack(converter, examples, feature_lengths, num_packing_bins=2):
  """examples -> prepare_for_packing -> grain FirstFitPackIterDataset -> packed_batch."""
  ds = grain.MapDataset.source(examples).map(
      functools.partial(_prepare, converter, feature_lengths))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  ds = FirstFitPackIterDataset(ds, length_struct=packing.pack_lengths(converter, feature_lengths),
                               num_packing_bins=num_packing_bins, shuffle_bins=False)
  return packing.packed_batch(converter, list(ds), feature_lengths)


def _prepare(converter, feature_lengths, example):
  return packing.prepare_for_packing(converter, example, feature_lengths)


def assert_batch(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    want_dtype = np.float32 if "weights" in key else np.int32
    assert actual[key].dtype == want_dtype, key
    np.testing.assert_array_equal(actual[key], np.asarray(value), err_msg=key)


# -- 1. exact layouts ---------------------------------------------------------------------------
SEQIO_PAIRS = [{"inputs": [7, 8, 5, 1], "targets": [3, 9, 1]},
               {"inputs": [8, 4, 9, 3, 1], "targets": [4, 1]}]

LAYOUTS = {
    # seqio test_encoder_decoder_packed.
    "encoder_decoder": ("encoder_decoder", SEQIO_PAIRS, {"inputs": 10, "targets": 7}, {
        "encoder_input_tokens": [[7, 8, 5, 1, 8, 4, 9, 3, 1, 0]],
        "encoder_segment_ids": [[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]],
        "encoder_positions": [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]],
        "decoder_target_tokens": [[3, 9, 1, 4, 1, 0, 0]],
        "decoder_input_tokens": [[0, 3, 9, 0, 4, 0, 0]],
        "decoder_loss_weights": [[1, 1, 1, 1, 1, 0, 0]],
        "decoder_segment_ids": [[1, 1, 1, 2, 2, 0, 0]],
        "decoder_positions": [[0, 1, 2, 0, 1, 0, 0]]}),
    # seqio test_encoder_decoder_packed_long_sequences: nothing fits together.
    "encoder_decoder_long": ("encoder_decoder", [
        {"inputs": [7, 8, 5, 6, 9, 4, 1], "targets": [3, 9, 1]},
        {"inputs": [8, 4, 9, 3, 5, 1], "targets": [4, 1]}], {"inputs": 7, "targets": 3}, {
        "encoder_input_tokens": [[7, 8, 5, 6, 9, 4, 1], [8, 4, 9, 3, 5, 1, 0]],
        "encoder_segment_ids": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]],
        "encoder_positions": [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 0]],
        "decoder_target_tokens": [[3, 9, 1], [4, 1, 0]],
        "decoder_input_tokens": [[0, 3, 9], [0, 4, 0]],
        "decoder_loss_weights": [[1, 1, 1], [1, 1, 0]],
        "decoder_segment_ids": [[1, 1, 1], [1, 1, 0]],
        "decoder_positions": [[0, 1, 2], [0, 1, 0]]}),
    # seqio test_lm_only_packed.
    "causal_lm": ("decoder", [{"targets": [3, 9, 1]}, {"targets": [4, 1]}], {"targets": 6}, {
        "decoder_target_tokens": [[3, 9, 1, 4, 1, 0]],
        "decoder_input_tokens": [[0, 3, 9, 0, 4, 0]],
        "decoder_loss_weights": [[1, 1, 1, 1, 1, 0]],
        "decoder_positions": [[0, 1, 2, 0, 1, 0]],
        "decoder_segment_ids": [[1, 1, 1, 2, 2, 0]]}),
    # seqio test_lm_pack_long_sequences.
    "causal_lm_long": ("decoder", [{"targets": [3, 9, 4, 5, 1]}, {"targets": [4, 3, 2, 1]}],
                       {"targets": 5}, {
        "decoder_target_tokens": [[3, 9, 4, 5, 1], [4, 3, 2, 1, 0]],
        "decoder_input_tokens": [[0, 3, 9, 4, 5], [0, 4, 3, 2, 0]],
        "decoder_loss_weights": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
        "decoder_positions": [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0]],
        "decoder_segment_ids": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]}),
    # seqio test_prefix_lm_packed.
    "prefix_lm": ("decoder", SEQIO_PAIRS, {"inputs": 8, "targets": 7}, {
        "decoder_target_tokens": [[7, 8, 5, 1, 3, 9, 1, 8, 4, 9, 3, 1, 4, 1, 0]],
        "decoder_input_tokens": [[0, 7, 8, 5, 1, 3, 9, 0, 8, 4, 9, 3, 1, 4, 0]],
        "decoder_loss_weights": [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0]],
        "decoder_positions": [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0]],
        "decoder_segment_ids": [[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0]],
        "decoder_causal_attention": [[1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]]}),
    # seqio test_prefix_lm_pack_long_sequences.
    "prefix_lm_long": ("decoder", [{"inputs": [7, 8, 5, 1], "targets": [3, 9, 1]},
                                   {"inputs": [8, 4, 1], "targets": [5, 1]}],
                       {"inputs": 4, "targets": 3}, {
        "decoder_target_tokens": [[7, 8, 5, 1, 3, 9, 1], [8, 4, 1, 5, 1, 0, 0]],
        "decoder_input_tokens": [[0, 7, 8, 5, 1, 3, 9], [0, 8, 4, 1, 5, 0, 0]],
        "decoder_loss_weights": [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]],
        "decoder_positions": [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 0, 0]],
        "decoder_segment_ids": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]],
        "decoder_causal_attention": [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0]]}),
    # Prefix LM, truncation and a causal example: inputs cut to 3 (as the unpacked
    # converter cuts them); the example without inputs has an empty prefix (loss on
    # every token, causal attention on its BOS only).
    "prefix_lm_truncated_and_causal": ("decoder", [
        {"inputs": [7, 8, 5, 6, 1], "targets": [3, 1]}, {"targets": [4, 1]}],
        {"inputs": 3, "targets": 4}, {
        "decoder_target_tokens": [[7, 8, 5, 3, 1, 4, 1]],
        "decoder_input_tokens": [[0, 7, 8, 5, 3, 0, 4]],
        "decoder_loss_weights": [[0, 0, 0, 1, 1, 1, 1]],
        "decoder_positions": [[0, 1, 2, 3, 4, 0, 1]],
        "decoder_segment_ids": [[1, 1, 1, 1, 1, 2, 2]],
        "decoder_causal_attention": [[1, 1, 1, 1, 0, 1, 0]]}),
    # Encoder (MLM / ELECTRA): inputs with [MASK], the originals, the scored positions;
    # the third example is cut to 8 and goes to the second row.
    "encoder": ("encoder", [
        {"inputs": [5, MASK_ID, 7, 1], "targets": [5, 6, 7, 1], "mlm_weights": [0, 1, 0, 0]},
        {"inputs": [MASK_ID, 9, 1], "targets": [8, 9, 1], "mlm_weights": [1, 0, 0]},
        {"inputs": [2, 3, 4, 5, 6, MASK_ID, 8, 9, 10, 1],
         "targets": [2, 3, 4, 5, 6, 7, 8, 9, 10, 1],
         "mlm_weights": [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]}], {"inputs": 8}, {
        "encoder_input_tokens": [[5, MASK_ID, 7, 1, MASK_ID, 9, 1, 0],
                                 [2, 3, 4, 5, 6, MASK_ID, 8, 9]],
        "encoder_target_tokens": [[5, 6, 7, 1, 8, 9, 1, 0], [2, 3, 4, 5, 6, 7, 8, 9]],
        "mlm_weights": [[0, 1, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0]],
        "encoder_segment_ids": [[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]],
        "encoder_positions": [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6, 7]]}),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_exact_packed_layout(case):
  converter, examples, feature_lengths, expected = LAYOUTS[case]
  assert_batch(pack(converter, examples, feature_lengths), expected)


def test_pack_lengths():
  assert packing.pack_lengths("encoder_decoder", {"inputs": 10, "targets": 7}) == {
      "inputs": 10, "targets": 7}
  assert packing.pack_lengths("decoder", {"targets": 6}) == {"targets": 6}
  assert packing.pack_lengths("decoder", {"inputs": 8, "targets": 7}) == {
      "targets": 15, "loss_weights": 15, "causal_attention": 15}
  assert packing.pack_lengths("encoder", {"inputs": 8}) == {
      "inputs": 8, "targets": 8, "mlm_weights": 8}


@pytest.mark.parametrize("converter,example,feature_lengths", [
    ("encoder_decoder", {"inputs": [9, 4, 3, 8, 4, 5, 1], "targets": [3, 9, 4, 7, 8, 1]},
     {"inputs": 5, "targets": 8}),
    ("decoder", {"targets": [3, 9, 4, 5, 6, 1]}, {"targets": 4}),
    ("decoder", {"inputs": [9, 4, 6, 5, 1], "targets": [3, 9, 1]}, {"inputs": 3, "targets": 4}),
    ("encoder", {"inputs": [5, MASK_ID, 7, 6, 1], "targets": [5, 6, 7, 6, 1],
                 "mlm_weights": [0, 1, 0, 0, 0]}, {"inputs": 4}),
])
def test_one_example_row_is_the_unpacked_row(converter, example, feature_lengths):
  """A row holding one (truncated) example is the unpacked converter's row, plus ids and
  positions. (The unpacked decoder input carries the last token into the first padding
  position, as seqio's unpacked converters; the packed one stops at the segment's end.)"""
  packed = pack(converter, [example], feature_lengths)
  unpacked = feature_converters.get_converter(converter)([example], feature_lengths)
  for key, value in unpacked.items():
    got = packed[key]
    if key == "decoder_input_tokens":
      real = packed["decoder_segment_ids"] > 0
      got, value = got[real], value[real]
    elif key == "decoder_causal_attention":  # Unpacked: also 1 on a padding position.
      value = value * (packed["decoder_segment_ids"] > 0)
    np.testing.assert_array_equal(got, value, err_msg=key)
  seg_key = "decoder_segment_ids" if converter == "decoder" else "encoder_segment_ids"
  assert set(np.unique(packed[seg_key])) <= {0, 1}


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="inputs"):
    packing.prepare_for_packing("decoder", {"inputs": [1], "targets": [2]}, {"targets": 4})
  with pytest.raises(ValueError, match="unknown feature converter"):
    packing.pack_lengths("encdec", {"inputs": 4})
  with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS"):
    packing.pack_lengths("encoder_decoder", {"inputs": 4})
  with pytest.raises(ValueError, match="targets_segment_ids"):
    packing.packed_batch("decoder", [{"targets": np.zeros(4, np.int32)}], {"targets": 4})
  row = {k: np.zeros(5, np.int32) for k in ("targets", "targets_segment_ids",
                                            "targets_positions")}
  with pytest.raises(ValueError, match="shape"):
    packing.packed_batch("decoder", [row], {"targets": 4})


def test_segment_aware_shift_with_nonconsecutive_ids():
  targets = np.array([[3, 9, 1, 4, 1, 5, 0, 0]])
  segments = np.array([[1, 1, 1, 3, 3, 4, 0, 0]])  # grain skips the id of an empty example
  np.testing.assert_array_equal(packing.autoregressive_inputs(targets, segments),
                                [[0, 3, 9, 0, 4, 0, 0, 0]])


# -- 3. efficiency ------------------------------------------------------------------------------
def test_packing_efficiency():
  _, examples, lengths, _ = LAYOUTS["encoder_decoder"]
  packed = pack("encoder_decoder", examples, lengths)
  assert packing.packing_efficiency(packed) == pytest.approx((9 + 5) / (10 + 7))
  # The same examples unpacked: one row each, padding counted from the token ids.
  unpacked = feature_converters.encoder_decoder_batch(examples, lengths)
  assert packing.packing_efficiency(unpacked) == pytest.approx((4 + 5 + 3 + 2) / (2 * 17))
  _, examples, lengths, _ = LAYOUTS["prefix_lm"]
  assert packing.packing_efficiency(pack("decoder", examples, lengths)) == pytest.approx(14 / 15)
  _, examples, lengths, _ = LAYOUTS["encoder"]
  assert packing.packing_efficiency(pack("encoder", examples, lengths)) == pytest.approx(15 / 16)


# -- 2. packed rows equal the examples run alone ------------------------------------------------
def _randomise(params, rng, keys=("scale", "rel_embedding", "output_bias")):
  """Norm scales, relative biases and output biases away from their inits: every parameter
  matters (T5's rel_embedding then differs between every pair of buckets)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1.0 + 0.5 * rng.standard_normal(x.shape).astype(np.float32))
      + (rng.standard_normal(x.shape).astype(np.float32) if "output_bias" in str(path) else 0)
      if any(k in str(path) for k in keys) else x, params)


def _tokens(rng, n):
  """n tokens: n - 1 random ids in [2, MASK_ID) then EOS (1)."""
  return np.concatenate([rng.integers(2, MASK_ID, n - 1), [1]]).astype(np.int32)


def _examples(converter, shapes, seed):
  """Random examples; `shapes` are (len(inputs), len(targets)) (0: no such feature)."""
  rng = np.random.default_rng(seed)
  out = []
  for n_in, n_t in shapes:
    if converter == "encoder":
      targets = _tokens(rng, n_in)
      weights = (rng.random(n_in) < 0.3).astype(np.float32)
      weights[0] = 1.0
      out.append({"inputs": np.where(weights > 0, MASK_ID, targets).astype(np.int32),
                  "targets": targets, "mlm_weights": weights})
    else:
      ex = {"targets": _tokens(rng, n_t)}
      if n_in:
        ex["inputs"] = _tokens(rng, n_in)
      out.append(ex)
  return out


# (converter, example shapes, feature lengths): 4 examples -> 2 rows of 2 segments each
# with grain's first fit over 2 bins (checked in `_compare`).
FAMILIES = {
    "t5": ("encoder_decoder", [(5, 3), (6, 4), (9, 6), (3, 2)], {"inputs": 12, "targets": 8}),
    "causal_lm": ("decoder", [(0, 5), (0, 6), (0, 8), (0, 4)], {"targets": 12}),
    "prefix_lm": ("decoder", [(3, 2), (4, 3), (5, 3), (2, 2)], {"inputs": 6, "targets": 6}),
    "mlm": ("encoder", [(5, 0), (6, 0), (8, 0), (4, 0)], {"inputs": 12}),
    "electra": ("encoder", [(5, 0), (6, 0), (8, 0), (4, 0)], {"inputs": 12}),
}

T5_CONFIG = t5.T5Config(vocab_size=VOCAB, emb_dim=32, num_heads=4, num_encoder_layers=2,
                        num_decoder_layers=2, head_dim=8, mlp_dim=48)
DECODER_CONFIG = decoder.DecoderConfig(vocab_size=VOCAB, emb_dim=32, num_heads=4, num_kv_heads=2,
                                       num_layers=2, head_dim=8, mlp_dim=48)
ENCODER_CONFIG = encoder.EncoderConfig(vocab_size=VOCAB, emb_dim=32, num_heads=4, num_layers=2,
                                       head_dim=8, mlp_dim=64, max_length=16)
ELECTRA_DISCRIMINATOR = dataclasses.replace(ENCODER_CONFIG, embedding_dim=32)
ELECTRA_GENERATOR = dataclasses.replace(ELECTRA_DISCRIMINATOR, emb_dim=16, num_heads=2,
                                        mlp_dim=32)  # projects the shared 32 -> 16


@pytest.fixture(scope="module")
def models():
  """family -> (model, params, jitted logits); each built once, on first use.

  ELECTRA's "logits" are the generator's [b, l, vocab] and the discriminator's [b, l]
  (on the same tokens), concatenated to [b, l, vocab + 1]."""
  cache = {}

  def get(family):
    if family not in cache:
      converter, shapes, lengths = FAMILIES[family]
      if family == "t5":
        model = encoder_decoder.EncoderDecoderModel(t5.Transformer(T5_CONFIG))
      elif family == "mlm":
        model = encoder.MLMModel(encoder.EncoderNetwork(ENCODER_CONFIG, head="mlm"))
      elif family == "electra":
        model = electra.ElectraModel(ELECTRA_GENERATOR, ELECTRA_DISCRIMINATOR)
      else:
        model = decoder.DecoderOnlyModel(decoder.Transformer(DECODER_CONFIG))
      batch = feature_converters.get_converter(converter)(_examples(converter, shapes, 0),
                                                          lengths)
      params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch)["params"])
      params = _randomise(params, np.random.default_rng(2))
      logits = model.logits if family != "electra" else functools.partial(_electra_logits, model)
      cache[family] = (model, params, jax.jit(logits))
    return cache[family]

  return get


def _electra_logits(model, params, batch):
  tokens = batch["encoder_input_tokens"]
  generated = model._apply(params, "generate", tokens, batch, None)
  discriminated = model._apply(params, "discriminate", tokens, batch, None)
  return jax.numpy.concatenate([generated, discriminated[..., None]], axis=-1)


def _log_likelihood(logits, targets, weights):
  """sum(weights * log softmax(logits)[targets]) in float64."""
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, targets[..., None].astype(np.int64), -1)[..., 0]
  return float(np.sum((picked - logz) * weights))


def _compare(family, models):
  """Packs the family's examples with grain, checks each segment's logits against the
  example alone. Returns (params, logits_fn, packed batch, packed logits, the unpacked
  batch of the examples alone, its logits)."""
  converter, shapes, lengths = FAMILIES[family]
  model, params, logits_fn = models(family)
  examples = _examples(converter, shapes, seed=3)
  packed = pack(converter, examples, lengths)
  alone = feature_converters.get_converter(converter)(examples, lengths)
  out_packed = np.asarray(logits_fn(params, packed))
  out_alone = np.asarray(logits_fn(params, alone))
  side = "encoder" if converter == "encoder" else "decoder"
  tokens_key = f"{side}_input_tokens" if side == "encoder" else "decoder_target_tokens"
  segments = packed[f"{side}_segment_ids"]
  assert segments.shape[0] == 2 and all(len(set(row) - {0}) == 2 for row in segments)
  seen = []
  for row in range(segments.shape[0]):
    for seg in sorted(set(segments[row]) - {0}):
      where = np.flatnonzero(segments[row] == seg)
      assert np.array_equal(where, where[0] + np.arange(len(where)))  # contiguous
      n = len(where)
      # Which example is it? Exactly one alone row has these tokens.
      matches = [i for i in range(len(examples))
                 if np.array_equal(alone[tokens_key][i, :n], packed[tokens_key][row, where])
                 and np.count_nonzero(alone[tokens_key][i]) == n]
      assert len(matches) == 1
      seen.append(matches[0])
      if converter == "encoder_decoder":  # Its encoder segment is that example's inputs.
        enc = packed["encoder_input_tokens"][row, packed["encoder_segment_ids"][row] == seg]
        np.testing.assert_array_equal(enc, examples[matches[0]]["inputs"])
      np.testing.assert_allclose(out_packed[row, where], out_alone[matches[0], :n],
                                 rtol=1e-5, atol=1e-5)
  assert sorted(seen) == list(range(len(examples)))
  # The summed loss over the packed rows is that of the examples alone.
  target_key = getattr(model, "target_feature", "encoder_target_tokens")
  weight_key = getattr(model, "weight_feature", "mlm_weights")
  vocab = slice(0, VOCAB)  # (ELECTRA: the generator's logits)
  assert _log_likelihood(out_packed[..., vocab], packed[target_key],
                         packed[weight_key]) == pytest.approx(
      _log_likelihood(out_alone[..., vocab], alone[target_key], alone[weight_key]), rel=1e-5)
  assert packed[weight_key].sum() == alone[weight_key].sum() > 0
  return params, logits_fn, packed, out_packed, alone, out_alone


def _second_segment(packed, side):
  """(row 0, positions of its second segment)."""
  segments = packed[f"{side}_segment_ids"][0]
  return np.flatnonzero(segments == sorted(set(segments) - {0})[1])


def _one_segment(batch):
  """The batch with every row's segments merged into one (same shapes: no recompiling)."""
  return {k: (v > 0).astype(np.int32) if k.endswith("segment_ids") else v
          for k, v in batch.items()}


def _differs(a, b):
  return float(np.max(np.abs(a - b))) > 1e-3


def test_t5_packed_rows_equal_examples_alone(models):
  params, logits_fn, packed, out, alone, out_alone = _compare("t5", models)
  where = _second_segment(packed, "decoder")
  assert packed["encoder_positions"][0, packed["encoder_segment_ids"][0] == 2].tolist() == [
      0, 1, 2, 3, 4, 5]
  # Control: the segment masks matter.
  assert _differs(np.asarray(logits_fn(params, _one_segment(packed)))[0, where], out[0, where])
  # Control: T5 depends on relative distances (a masked gap in the encoder input shifts
  # the distances after it and changes the logits), so the equality above, for segments
  # that start at nonzero offsets, shows that packing keeps every relative distance.
  rel = np.asarray(params["encoder"]["relpos_bias"]["rel_embedding"])
  assert len(np.unique(rel.round(6))) == rel.size
  tokens = alone["encoder_input_tokens"][0]
  n_in, n_t = np.count_nonzero(tokens), np.count_nonzero(alone["decoder_target_tokens"][0])
  gapped = {k: v.copy() for k, v in alone.items()}
  gapped["encoder_input_tokens"][0, :n_in + 1] = np.insert(tokens[:n_in], 2, 0)
  assert _differs(np.asarray(logits_fn(params, gapped))[0, :n_t], out_alone[0, :n_t])


@pytest.mark.parametrize("family", ["causal_lm", "prefix_lm"])
def test_decoder_packed_rows_equal_examples_alone(models, family):
  params, logits_fn, packed, out, _, _ = _compare(family, models)
  where = _second_segment(packed, "decoder")
  assert _differs(np.asarray(logits_fn(params, _one_segment(packed)))[0, where], out[0, where])
  if family == "prefix_lm":  # Control: the per-segment prefix attention matters.
    assert packed["decoder_causal_attention"][0, where].sum() > 1
    causal = dict(packed, decoder_causal_attention=np.zeros_like(packed["decoder_segment_ids"]))
    assert _differs(np.asarray(logits_fn(params, causal))[0, where], out[0, where])


@pytest.mark.parametrize("family", ["mlm", pytest.param("electra", marks=pytest.mark.slow)])
def test_encoder_packed_rows_equal_examples_alone(models, family):
  params, logits_fn, packed, out, _, _ = _compare(family, models)
  where = _second_segment(packed, "encoder")
  assert _differs(np.asarray(logits_fn(params, _one_segment(packed)))[0, where], out[0, where])
  # Control: absolute position embeddings, so the restarted positions matter.
  arange = np.broadcast_to(np.arange(packed["encoder_positions"].shape[1], dtype=np.int32),
                           packed["encoder_positions"].shape)
  unpositioned = dict(packed, encoder_positions=np.ascontiguousarray(arange))
  assert _differs(np.asarray(logits_fn(params, unpositioned))[0, where], out[0, where])
