"""MosaicBERT's encoder recipe (Portes et al. 2023 §2.1): ALiBi slopes and biases,
the ALiBi + GeGLU encoder against the NumPy float64 reference, unpadded (packed)
rows equal to each example alone, whole-example 30% masking through the real
pipeline, objectives/mosaicbert.gin from the command line and its errors."""
import dataclasses
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5xlike.data import pipeline, task_examples
from t5xlike.models import alibi, encoder
from t5xlike.objectives import electra, mlm
from tests import encoder_numpy_reference as ref

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = encoder.EncoderConfig(vocab_size=128, emb_dim=24, num_heads=3, num_layers=2, head_dim=8,
                            mlp_dim=48, mlp_activations=("gelu", "linear"), max_length=16,
                            position_encoding="alibi")


def test_slopes_are_the_papers_geometric_sequences():
  """Press et al. 2022 §3: 8 heads 1/2 .. 1/256; 12 heads: those 8, then every other
  slope of 16 heads (2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5)."""
  np.testing.assert_array_equal(alibi.slopes(8), [2.0 ** -k for k in range(1, 9)])
  np.testing.assert_allclose(alibi.slopes(16), [2.0 ** (-k / 2) for k in range(1, 17)],
                             rtol=1e-14)
  np.testing.assert_allclose(alibi.slopes(12), [2.0 ** -k for k in range(1, 9)]
                             + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5], rtol=1e-14)
  for heads in (1, 3, 5, 6, 12, 20):
    np.testing.assert_allclose(alibi.slopes(heads), ref.alibi_slopes(heads), rtol=1e-14)
  np.testing.assert_allclose(np.asarray(alibi.bias(3, 5)), ref.alibi_bias(3, 5), rtol=1e-7)
  with pytest.raises(ValueError, match="at least one head"):
    alibi.slopes(0)


@pytest.fixture(scope="module")
def model_and_params():
  model = encoder.MLMModel(encoder.EncoderNetwork(CFG))
  tokens = np.ones((1, 12), np.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), {"encoder_input_tokens": tokens})["params"])
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map_with_path(  # random norms: every parameter matters
      lambda path, x: x * (1.0 + 0.5 * rng.standard_normal(x.shape).astype(np.float32))
      if "scale" in str(path) else x, params)
  return model, params


def test_alibi_geglu_encoder_matches_numpy_float64(model_and_params):
  model, params = model_and_params
  assert "position_embedding" not in params["embedder"]  # no position table under ALiBi
  layer = params["encoder"]["layers_0"]["mlp"]
  assert set(layer) == {"wi_0", "wi_1", "wo"}  # GeGLU
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 120, (2, 12)).astype(np.int32)
  tokens[1, 8:] = 0  # a padded row
  logits = np.asarray(jax.jit(model.logits)(params, {"encoder_input_tokens": tokens}))
  expected = ref.forward(jax.device_get(params["embedder"]), jax.device_get(params), "mlm",
                         tokens, CFG.num_heads)
  valid = tokens > 0
  np.testing.assert_allclose(logits[valid], expected[valid], rtol=2e-4, atol=2e-4)
  # The bias matters: the same network without it gives other logits.
  no_bias = ref.encode(jax.device_get(params["encoder"]), ref.embed(
      jax.device_get(params["embedder"]), tokens), ref.attention_mask(tokens), CFG.num_heads)
  with_bias = ref.encode(jax.device_get(params["encoder"]), ref.embed(
      jax.device_get(params["embedder"]), tokens), ref.attention_mask(tokens), CFG.num_heads,
      ref.alibi_bias(CFG.num_heads, 12))
  assert np.max(np.abs(no_bias - with_bias)[valid]) > 1e-2


def test_unpadded_rows_give_each_example_its_own_logits(model_and_params):
  """Unpadding = packing: a row holding examples of 5, 4 and 3 tokens gives each the
  logits it has alone in a padded row (ALiBi's |i - j| is per segment)."""
  model, params = model_and_params
  rng = np.random.default_rng(1)
  pieces = [rng.integers(2, 120, n).astype(np.int32) for n in (5, 4, 3)]
  packed = {"encoder_input_tokens": np.concatenate(pieces)[None],
            "encoder_segment_ids": np.repeat([1, 2, 3], [5, 4, 3])[None].astype(np.int32),
            "encoder_positions": np.concatenate([np.arange(n) for n in (5, 4, 3)])[None]
            .astype(np.int32)}
  out = np.asarray(jax.jit(model.logits)(params, packed))[0]
  padded = np.zeros((3, 12), np.int32)
  for row, piece in enumerate(pieces):
    padded[row, :len(piece)] = piece
  alone = np.asarray(jax.jit(model.logits)(params, {"encoder_input_tokens": padded}))
  start = 0
  for row, piece in enumerate(pieces):
    np.testing.assert_allclose(out[start:start + len(piece)], alone[row, :len(piece)],
                               rtol=1e-5, atol=1e-5)
    start += len(piece)


def test_whole_example_masking_truncates_then_masks_30_percent():
  objective = mlm.MaskedLanguageModeling(mask_rate=0.3, whole_examples=True)
  assert objective.chunk_lengths({"inputs": 16}) is None  # whole examples, not chunks
  tokens = np.arange(2, 42, dtype=np.int32)
  out = objective.transform(tokens, np.random.default_rng(0), vocab_size=8100, eos_id=1)
  np.testing.assert_array_equal(out["targets"], tokens[:16])
  assert out["mlm_weights"].sum() == round(0.3 * 16)
  short = objective.transform(tokens[:7], np.random.default_rng(0), vocab_size=8100, eos_id=1)
  assert len(short["inputs"]) == 7 and short["mlm_weights"].sum() == 2  # round(2.1)
  assert mlm.MaskedLanguageModeling().chunk_lengths({"inputs": 16}) == (16,)


def test_pipeline_rows_are_paragraphs_padded_or_packed():
  """The real pipeline on embedded_paragraphs: unpacked rows hold one paragraph each
  (its tokens, truncated to the length, then padding); packed rows hold the same
  paragraphs in order with segment ids and restarted positions."""
  task_examples.import_module("t5xlike.tasks.embedded")
  lengths = {"inputs": 128}

  def first_batch(pack):
    objective = mlm.MaskedLanguageModeling(mask_rate=0.3, whole_examples=True)
    feed = pipeline.make_feed("embedded_paragraphs", "train", lengths, 8, objective, seed=0,
                              pack=pack, feature_converter="encoder", num_threads=0,
                              shuffle=False)
    try:
      return next(feed)
    finally:
      feed.close()

  padded, packed = first_batch(False), first_batch(True)
  targets = padded["encoder_target_tokens"]
  lengths_per_row = (targets > 0).sum(1)
  assert (lengths_per_row < 64).any() and (lengths_per_row >= 1).all()  # real padding
  for row in range(8):
    n = lengths_per_row[row]
    assert (targets[row, n:] == 0).all()
    assert padded["mlm_weights"][row].sum() == max(1, round(0.3 * n))
  assert packed["encoder_segment_ids"].max() > 1
  real = lambda batch: (batch["encoder_target_tokens"] > 0).sum()
  assert real(packed) > real(padded)  # fewer padded positions for the same rows
  seg, pos = packed["encoder_segment_ids"][0], packed["encoder_positions"][0]
  starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
  assert (pos[starts[seg[starts] > 0]] == 0).all()


def run_train(tmp_path, *bindings):
  return subprocess.run(
      [sys.executable, "-m", "t5xlike.train", "--gin_file=gin_configs/objectives/mosaicbert.gin",
       f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32}",
       "--gin.BATCH_SIZE=4", "--gin.TRAIN_STEPS=2", "--gin.LOG_PERIOD=1",
       "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=1", "--gin.CHECKPOINT_PERIOD=2", *bindings],
      cwd=REPO, capture_output=True, text=True, timeout=600)


def test_mosaicbert_gin_trains_unpadded_from_the_command_line(tmp_path):
  result = run_train(tmp_path / "run")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in
          (tmp_path / "run" / "metrics" / "train.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == [1, 2]
  assert all(np.isfinite(row["loss"]) for row in rows)
  config = (tmp_path / "run" / "config.gin").read_text()
  for line in ("POSITION_ENCODING = 'alibi'", "UNPAD = True", "pack = %UNPAD",
               "MLM_MASK_RATE = 0.3", "whole_examples = True"):
    assert line in config, line
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(tmp_path / "run" / "checkpoint_2" / "state")["params"]
  assert "position_embedding" not in params["embedder"]
  assert set(params["encoder"]["layers_0"]["mlp"]) == {"wi_0", "wi_1", "wo"}


@pytest.mark.parametrize("binding,message", [
    ("--gin.MLM_MASK_RATE=1.0", "mask_rate must be in (0, 1)"),
    pytest.param("--gin.POSITION_ENCODING='rope'", "position_encoding must be one of",
                 marks=pytest.mark.slow),  # also refused in process (the last test)
])
def test_bad_switches_are_one_line_exit_2(tmp_path, binding, message):
  result = run_train(tmp_path / "bad", binding)
  assert result.returncode == 2, result.stderr[-3000:]
  assert message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not (tmp_path / "bad").exists()


def test_electra_refuses_generator_and_discriminator_with_different_positions():
  learned = dataclasses.replace(CFG, position_encoding="learned")
  with pytest.raises(ValueError, match="position_encoding must agree"):
    electra.ElectraModel(learned, CFG)
  with pytest.raises(ValueError, match="position_encoding must be one of"):
    dataclasses.replace(CFG, position_encoding="rope")
