"""Prepacked prefill (`inference.prepacking`): the bin packing against a brute-force
reference, exact packed / unpacked token layouts, and greedy decoding from the
unpacked caches equal to the unpacked prefill's (decoder-only, scanned and not;
encoder-decoder; through `Predictor` with a padded last batch); PREPACK_PREFILL
validation on the command line."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5xlike import infer
from t5xlike.finetuning import lora, peft, prompt_tuning
from t5xlike.inference import decoding, prepacking
from t5xlike.inference.predictor import Predictor, can_prepack
from t5xlike.models import decoder, encoder_decoder, t5

EOS = 1
WIDTH = 20  # the padded prompt width P (prefix-LM rows of inputs + targets)


# -- the packing ---------------------------------------------------------------------
def reference_first_fit_decreasing(lengths, capacity):
  """FFD by its definition, written independently: scan the items longest first
  (stable), keeping bin loads; each goes to the lowest-index bin it fits in."""
  loads, assignment = [], {}
  for item in np.argsort(-np.asarray(lengths), kind="stable"):
    fits = [b for b, load in enumerate(loads) if load + lengths[item] <= capacity]
    if fits:
      loads[fits[0]] += lengths[item]
      assignment[int(item)] = fits[0]
    else:
      loads.append(lengths[item])
      assignment[int(item)] = len(loads) - 1
  return assignment


def fewest_bins(lengths, capacity):
  """The optimal bin count, by trying every assignment (small inputs only)."""
  for bins in range(1, len(lengths) + 1):
    for assignment in itertools.product(range(bins), repeat=len(lengths)):
      loads = np.bincount(assignment, weights=lengths, minlength=bins)
      if (loads <= capacity).all():
        return bins
  raise AssertionError


@pytest.mark.parametrize("seed", range(6))
def test_first_fit_decreasing_equals_reference_and_is_near_optimal(seed):
  rng = np.random.default_rng(seed)
  capacity = int(rng.integers(8, 30))
  lengths = [int(n) for n in rng.integers(1, capacity + 1, int(rng.integers(1, 8)))]
  bins = prepacking.first_fit_decreasing(lengths, capacity)
  assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
  expected = reference_first_fit_decreasing(lengths, capacity)
  assert {i: index for index, b in enumerate(bins) for i in b} == expected
  # Within a bin, items are in placement order (longest first).
  assert all([lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in bins)
  # FFD's bound: at most 11/9 OPT + 6/9 bins (Dósa 2007).
  assert len(bins) <= 11 / 9 * fewest_bins(lengths, capacity) + 6 / 9


def test_first_fit_decreasing_refuses_items_that_do_not_fit():
  with pytest.raises(ValueError, match=r"\[1, 5\]"):
    prepacking.first_fit_decreasing([3, 6], 5)
  with pytest.raises(ValueError):
    prepacking.first_fit_decreasing([0], 5)


def test_packed_layout_and_unpacking_are_exact():
  """Requests' tokens -> packed rows (restarted positions, segment ids) -> unpacked
  rows, left- and right-aligned, against layouts built by hand in NumPy."""
  lengths = [3, 17, 1, 5, 2, 9]
  rng = np.random.default_rng(0)
  tokens = np.zeros((8, WIDTH), np.int32)  # two padding rows (copies of request 0)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(2, 64, n)
  tokens[6:] = tokens[0]
  packing = prepacking.pack_prompts(lengths, WIDTH, batch_rows=8, row_multiple=1)
  bins = prepacking.first_fit_decreasing(lengths, WIDTH)
  assert packing.packed_rows == len(bins) == 2
  packed = np.asarray(prepacking.gather_packed(tokens, packing))
  for r, items in enumerate(bins):
    row = np.concatenate([tokens[i, :lengths[i]] for i in items])
    np.testing.assert_array_equal(packed[r], np.pad(row, (0, WIDTH - len(row))))
    positions = np.concatenate([np.arange(lengths[i]) for i in items])
    np.testing.assert_array_equal(packing.positions[r, :len(row)], positions)
    segments = np.concatenate([np.full(lengths[i], s + 1) for s, i in enumerate(items)])
    np.testing.assert_array_equal(packing.segment_ids[r], np.pad(segments, (0, WIDTH - len(row))))
  mask = np.asarray(prepacking.block_diagonal_mask(packing))[:, 0]
  seg = packing.segment_ids
  np.testing.assert_array_equal(mask, (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0))
  # Unpacking per-token values (here the tokens with a trailing feature axis).
  values = jnp.asarray(packed)[..., None] * jnp.asarray([1, -1])
  all_lengths = lengths + [lengths[0]] * 2
  left = np.asarray(prepacking.unpack(values, packing, WIDTH, right_aligned=False))
  right = np.asarray(prepacking.unpack(values, packing, 24, right_aligned=True))
  for i, n in enumerate(all_lengths):
    np.testing.assert_array_equal(left[i, :, 0], np.pad(tokens[i, :n], (0, WIDTH - n)))
    np.testing.assert_array_equal(right[i, :, 1], -np.pad(tokens[i, :n], (24 - n, 0)))
  np.testing.assert_array_equal(np.asarray(prepacking.last_token(values, packing))[:, 0],
                                [tokens[i, n - 1] for i, n in enumerate(all_lengths)])


def test_packed_row_count_rounds_up_within_the_batch():
  assert prepacking.packed_row_count(5, 32, 8) == 8
  assert prepacking.packed_row_count(25, 32, 8) == 32
  assert prepacking.packed_row_count(5, 6, 4) == 6  # capped at the batch
  assert prepacking.pack_prompts([4, 4, 4], 10, batch_rows=3, row_multiple=3).packed_rows == 3


# -- decoding from unpacked caches equals the unpacked prefill -------------------------
DEC_CONFIG = decoder.DecoderConfig(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2,
                                   num_layers=2, head_dim=8, mlp_dim=48)


def _randomise_scales(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1.0 + 0.5 * rng.standard_normal(x.shape).astype(np.float32))
      if "scale" in str(path) or "rel_embedding" in str(path) else x, params)


@functools.cache
def _decoder_model(scanned):
  cfg = decoder.DecoderConfig(**{**DEC_CONFIG.__dict__, "scan_layers": scanned})
  model = decoder.DecoderOnlyModel(decoder.Transformer(cfg), z_loss=0.0)
  batch = {"decoder_input_tokens": np.zeros((2, 8), np.int32),
           "decoder_target_tokens": np.ones((2, 8), np.int32)}
  params = nn.meta.unbox(model.init(jax.random.key(3), batch)["params"])
  return model, _randomise_scales(params, 3)


def prefix_lm_batch(prompts, width):
  """Prefix-LM features of prompts with empty targets (the decoder converter's layout)."""
  targets = np.zeros((len(prompts), width), np.int32)
  causal = np.zeros((len(prompts), width), np.int32)
  for i, prompt in enumerate(prompts):
    targets[i, :len(prompt)] = prompt
    causal[i, :len(prompt) + 1] = 1
  return {"decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_causal_attention": causal}


MAX_LENGTH = 7


@functools.partial(jax.jit, static_argnums=0)
def greedy_from(model, params, state, first_logits):
  """Greedy decoding from a decoding state: compiled once for both prefills (the
  unpacked state of a packed prefill has the unpacked one's shapes)."""
  step = lambda tokens, state: model.decoding_step(params, tokens, state)
  return decoding.sample(step, state, first_logits, MAX_LENGTH, EOS, greedy=True)


def both_starts(model, params, batch, packing):
  plain = jax.jit(model.decoding_start, static_argnums=2)(params, batch, MAX_LENGTH)
  packed = jax.jit(model.prepacked_decoding_start, static_argnums=3)(
      params, batch, packing, MAX_LENGTH)
  return plain, packed


def assert_same_decoder_states(plain, packed):
  """The unpacked cache rows, positions and first logits of the packed prefill equal
  the unpacked prefill's on every slot a request sees (float32 rounding apart)."""
  (plain, plain_logits), (packed, packed_logits) = plain, packed
  np.testing.assert_allclose(packed_logits, plain_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(packed["slot_valid"], plain["slot_valid"])
  np.testing.assert_array_equal(packed["next_position"], plain["next_position"])
  seen = np.asarray(plain["slot_valid"])
  flat = jax.tree_util.tree_flatten_with_path(plain["cache"])[0]
  for (path, a), b in zip(flat, jax.tree.leaves(packed["cache"]), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, path
    if a.ndim <= 1:  # cache_index
      np.testing.assert_array_equal(a, b)
    else:  # [b, slots, kv_heads, head_dim], scanned [layers, b, slots, ...]
      rows = (a, b) if a.ndim == 4 else (np.moveaxis(a, 0, 2), np.moveaxis(b, 0, 2))
      np.testing.assert_allclose(rows[1][seen], rows[0][seen], rtol=1e-5, atol=1e-5)


def assert_same_greedy(model, params, plain, packed):
  plain_tokens, plain_scores = greedy_from(model, params, *plain)
  tokens, scores = greedy_from(model, params, *packed)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(plain_tokens))
  np.testing.assert_allclose(scores, plain_scores, rtol=1e-5)
  return np.asarray(tokens)


def ragged_prompts():
  rng = np.random.default_rng(4)
  return [rng.integers(2, 64, n).tolist() for n in (2, 18, 0, 4, 1, 8, 5, 3)]


def test_prepacked_greedy_equals_unpacked_decoder():
  """Prompts of 1 .. 19 tokens (one far longer than the rest) packed into 3 rows,
  then decoded from the caches unpacked into one row per request: the same tokens."""
  model, params = _decoder_model(False)
  prompts = ragged_prompts()
  batch = prefix_lm_batch(prompts, WIDTH)
  lengths, width = model.prompt_layout(batch)
  np.testing.assert_array_equal(lengths, [len(p) + 1 for p in prompts])  # BOS + inputs
  assert width == WIDTH
  packing = prepacking.pack_prompts([int(n) for n in lengths], width, len(prompts))
  assert packing.packed_rows == 3 < len(prompts)
  plain, packed = both_starts(model, params, batch, packing)
  assert_same_decoder_states(plain, packed)
  tokens = assert_same_greedy(model, params, plain, packed)
  assert len({tuple(row) for row in tokens}) > 4  # the rows decode differently


def test_prepacked_prefill_equals_unpacked_under_scanned_layers():
  """The same with the layers under `nn.scan` (caches with a leading layers axis)."""
  model, params = _decoder_model(True)
  batch = prefix_lm_batch(ragged_prompts(), WIDTH)
  lengths, width = model.prompt_layout(batch)
  packing = prepacking.pack_prompts([int(n) for n in lengths], width, len(lengths))
  assert_same_decoder_states(*both_starts(model, params, batch, packing))


def test_prepacked_greedy_equals_unpacked_for_a_batch_of_one():
  model, params = _decoder_model(False)
  batch = prefix_lm_batch([[5, 9, 13, 2, 40, 41]], WIDTH)
  packing = prepacking.pack_prompts([7], WIDTH, 1)
  assert packing.packed_rows == 1
  plain, packed = both_starts(model, params, batch, packing)
  assert_same_decoder_states(plain, packed)
  assert_same_greedy(model, params, plain, packed)


def test_predictor_prepacked_equals_unpacked_with_a_padded_last_batch():
  """Through `Predictor` and `predict_batch(packing=...)` (batches of 4, the last one
  padded with copies of row 0): the same ids, fewer prefill rows."""
  model, params = _decoder_model(False)
  rng = np.random.default_rng(7)
  examples = [{"inputs": rng.integers(2, 64, n).astype(np.int32)} for n in (12, 1, 3, 2, 12, 5)]
  lengths = {"inputs": 12, "targets": 6}
  plain = Predictor(model, params, lengths, batch_size=4, eos_id=EOS)
  packed = Predictor(model, params, lengths, batch_size=4, eos_id=EOS, prepack_prefill=True)
  expected = plain.predict(examples)
  got = packed.predict(examples)
  assert [p.ids for p in got] == [p.ids for p in expected]
  np.testing.assert_allclose([p.score for p in got], [p.score for p in expected], rtol=1e-5)
  assert plain.last_stats["prefill_rows"] == 8
  # Prompts of 13 + 2 + 4 + 3, then 13 + 6 tokens, in rows of 18: 2 rows per batch.
  assert packed.last_stats["prefill_rows"] == 4
  assert list(packed._compiled_packed) == [2]


@functools.cache
def _t5_model():
  cfg = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=4, num_encoder_layers=2,
                    num_decoder_layers=2, head_dim=8, mlp_dim=48)
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg), z_loss=0.0)
  batch = {"encoder_input_tokens": np.ones((2, 9), np.int32),
           "decoder_input_tokens": np.zeros((2, 6), np.int32),
           "decoder_target_tokens": np.ones((2, 6), np.int32),
           "decoder_loss_weights": np.ones((2, 6), np.float32)}
  params = nn.meta.unbox(model.init(jax.random.key(2), batch)["params"])
  return model, _randomise_scales(params, 2)


def test_prepacked_encoder_inputs_give_the_same_greedy_output():
  """Encoder-decoder: the encoder inputs packed with segment ids, the encoder output
  unpacked per request; same tokens as encoding one padded row per request."""
  model, params = _t5_model()
  rng = np.random.default_rng(8)
  inputs = np.zeros((5, 16), np.int32)
  for i, n in enumerate((16, 2, 5, 0, 9)):
    inputs[i, :n] = rng.integers(2, 64, n)
  inputs[2, 1] = 0  # padding inside an input stays hidden
  batch = {"encoder_input_tokens": inputs}
  lengths, width = model.prompt_layout(batch)
  np.testing.assert_array_equal(lengths, [16, 2, 5, 16, 9])  # all padding: a row of its own
  packing = prepacking.pack_prompts([int(n) for n in lengths], width, 5)
  assert packing.packed_rows == 3
  plain, packed = both_starts(model, params, batch, packing)
  np.testing.assert_allclose(packed[1], plain[1], rtol=1e-5, atol=1e-5)
  real = inputs > 0  # (a padding position's output is hidden from the decoder)
  np.testing.assert_allclose(np.asarray(packed[0]["encoded"])[real],
                             np.asarray(plain[0]["encoded"])[real], rtol=1e-5, atol=1e-5)
  assert_same_greedy(model, params, plain, packed)


def test_infer_refuses_a_non_boolean_prepack_prefill(tmp_path, capsys):
  out = tmp_path / "out.jsonl"
  source = tmp_path / "in.jsonl"
  source.write_text('{"input_ids": [5, 6]}\n')
  assert infer.main(["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
                     "--gin_file=gin_configs/runs/infer.gin", "--gin.PREPACK_PREFILL='yes'",
                     f"--gin.CHECKPOINT_PATH={tmp_path}/checkpoint_1", f"--input={source}",
                     f"--output={out}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "PREPACK_PREFILL must be True or False, got 'yes'" in err[0]
  assert not out.exists()


def test_prompt_tuned_models_prefill_unpacked():
  """Prompt tuning prepends its prompt to every input row, so a packed row would share
  it between prompts: such a model is never prepacked (LoRA's per-token updates are)."""
  model = _decoder_model(False)[0]
  assert can_prepack(model)
  assert can_prepack(peft.wrap_model(model, lora.LoRA()))
  assert not can_prepack(peft.wrap_model(model, prompt_tuning.PromptTuning(length=2)))
  assert not can_prepack(object())
