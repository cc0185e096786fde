"""Sequence classification on the encoder: head and loss against NumPy float64,
the `encoder_classification` converter, partial restores
(`restore_matching_params`), the classification tasks, and ELECTRA
pretraining -> discriminator export -> classifier fine-tuning from the CLI."""
import dataclasses
import json
import logging
import pathlib

import flax.linen as nn
import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio
import tensorflow_datasets as tfds
from flax import traverse_util

from t5xlike import checkpoints, library_compat, train
from t5xlike.cli import gin_config
from t5xlike.data import feature_converters, sources
from t5xlike.models import classifier, encoder
from t5xlike.tasks import classification
from tests import encoder_numpy_reference as ref
from tests.t5_numpy_reference import gelu
from tests.test_gin_configs import REQUIRED_MACROS

CFG = encoder.EncoderConfig(vocab_size=128, emb_dim=32, num_heads=4, num_layers=2, head_dim=8,
                            mlp_dim=64, max_length=16, embedding_dim=24)  # projects 24 -> 32
NUM_CLASSES = 3
f64 = ref.f64


def make_model(pooling, **kwargs):
  network = encoder.EncoderNetwork(CFG, head="classifier", num_classes=NUM_CLASSES,
                                   pooling=pooling)
  return classifier.ClassifierModel(network, **kwargs)


def make_batch(length=10):
  """4 rows with 10, 7, 3 and 1 real tokens, 0-padded to `length`; labels 2, 0, 1, 1."""
  rng = np.random.default_rng(0)
  tokens = np.zeros((4, length), np.int32)
  for row, n in enumerate((10, 7, 3, 1)):
    tokens[row, :n] = rng.integers(2, 120, size=n)
  return {"encoder_input_tokens": tokens,
          "classification_labels": np.array([2, 0, 1, 1], np.int32)}


@pytest.fixture(scope="module")
def params():
  """Random parameters (norm scales and the class bias perturbed so that they matter)."""
  rng = np.random.default_rng(1)
  p = nn.meta.unbox(jax.jit(make_model("mean").init)(jax.random.key(3), make_batch())["params"])
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1.0 + 0.5 * rng.standard_normal(x.shape).astype(np.float32))
      if "scale" in str(path) else
      x + rng.standard_normal(x.shape).astype(np.float32) if "bias" in str(path) else x, p)


def reference_logits(p, tokens, pooling):
  """float64 [b, classes]: encoder, pooling, dense, gelu, out (no dropout)."""
  tokens = np.asarray(tokens)
  hidden = ref.encode(p["encoder"], ref.embed(p["embedder"], tokens),
                      ref.attention_mask(tokens), CFG.num_heads)
  valid = (tokens > 0)[..., None]
  pooled = hidden[:, 0] if pooling == "first" else (hidden * valid).sum(1) / valid.sum(1)
  h = gelu(pooled @ f64(p["classifier"]["dense"]["kernel"]))
  return h @ f64(p["classifier"]["out"]["kernel"]) + f64(p["classifier"]["out"]["bias"])


def reference_loss(logits, labels, z_loss=0.0, smoothing=0.0):
  """Per-row (cross entropy with label smoothing - H(q)) + z_loss log(Z)^2, float64 [b]."""
  m = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
  log_p = logits - log_z[:, None]
  c = logits.shape[-1]
  q = np.full(logits.shape, smoothing / (c - 1))
  q[np.arange(len(labels)), labels] = 1.0 - smoothing
  entropy = -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)
  return -(q * log_p).sum(-1) - entropy + z_loss * log_z ** 2


def test_parameter_tree_keeps_the_body_names(params):
  names = set(checkpoints.flat_shapes(params))
  assert {"classifier/dense/kernel", "classifier/out/kernel", "classifier/out/bias"} <= names
  body = {n for n in names if not n.startswith("classifier/")}
  binary = jax.eval_shape(encoder.EncoderNetwork(CFG, head="binary").init, jax.random.key(0),
                          make_batch()["encoder_input_tokens"])["params"]
  assert body == {n for n in checkpoints.flat_shapes(binary) if not n.startswith("binary_head")}
  assert checkpoints.flat_shapes(params)["classifier/out/kernel"] == (32, NUM_CLASSES)
  boxed = jax.eval_shape(make_model("mean").init, jax.random.key(0), make_batch())["params"]
  axes = {"/".join(k.key for k in path): leaf.names for path, leaf in
          jax.tree_util.tree_flatten_with_path(
              boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]}
  assert axes["classifier/dense/kernel"] == ("embed", "mlp")
  assert axes["classifier/out/kernel"] == ("mlp", None)


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_loss_and_accuracy_match_numpy_float64(params, pooling):
  batch = make_batch()
  model = make_model(pooling)
  expected = reference_logits(jax.device_get(params), batch["encoder_input_tokens"], pooling)
  np.testing.assert_allclose(model.logits(params, batch), expected, rtol=2e-4, atol=2e-4)
  labels = batch["classification_labels"]
  loss, stats = model.loss_fn(params, batch, None)
  np.testing.assert_allclose(loss, reference_loss(expected, labels).mean(), rtol=1e-4)
  assert float(stats["weight_sum"]) == 4.0
  assert float(stats["correct"]) == float((expected.argmax(-1) == labels).sum())
  assert float(model.metrics(stats)["accuracy"]) == pytest.approx(
      (expected.argmax(-1) == labels).mean())
  np.testing.assert_array_equal(model.predict_classes(params, batch), expected.argmax(-1))
  log_probs = expected - np.log(np.exp(expected).sum(-1, keepdims=True))
  np.testing.assert_allclose(model.class_log_probs(params, batch), log_probs, rtol=2e-4,
                             atol=2e-4)


def test_z_loss_label_smoothing_and_unlabelled_rows(params):
  batch = make_batch()
  model = make_model("mean", z_loss=1e-2, label_smoothing=0.2)
  logits = reference_logits(jax.device_get(params), batch["encoder_input_tokens"], "mean")
  per_row = reference_loss(logits, batch["classification_labels"], z_loss=1e-2, smoothing=0.2)
  loss, _ = model.loss_fn(params, batch, None)
  np.testing.assert_allclose(loss, per_row.mean(), rtol=1e-4)
  # A row labelled -1 (GLUE's unlabelled test rows) is not scored.
  unlabelled = {**batch, "classification_labels": np.array([2, -1, 1, 1], np.int32)}
  loss, stats = model.loss_fn(params, unlabelled, None)
  assert float(stats["weight_sum"]) == 3.0
  np.testing.assert_allclose(loss, per_row[[0, 2, 3]].mean(), rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_padding_is_ignored(params, pooling):
  model = make_model(pooling)
  short, long = make_batch(10), make_batch(16)
  np.testing.assert_allclose(model.logits(params, short), model.logits(params, long),
                             rtol=1e-5, atol=1e-5)


def test_dropout_changes_training_logits_only(params):
  network = encoder.EncoderNetwork(dataclasses.replace(CFG, dropout_rate=0.5), head="classifier",
                                   num_classes=NUM_CLASSES)
  model = classifier.ClassifierModel(network)
  batch = make_batch()
  loss_fn = jax.jit(model.loss_fn)
  train_loss, _ = loss_fn(params, batch, jax.random.key(0))
  eval_loss, _ = loss_fn(params, batch, None)
  np.testing.assert_allclose(eval_loss, make_model("mean").loss_fn(params, batch, None)[0],
                             rtol=1e-5)
  assert np.isfinite(train_loss) and float(train_loss) != float(eval_loss)


def test_model_refuses_other_heads():
  with pytest.raises(ValueError, match="head='classifier'"):
    classifier.ClassifierModel(encoder.EncoderNetwork(CFG, head="binary"))


def test_converter_layout():
  examples = [{"inputs": np.array([9, 4, 1], np.int32), "label": np.array(1, np.int32)},
              {"inputs": np.array([5, 1], np.int32), "label": np.int32(0)},
              {"inputs": np.array([7, 8, 6, 3, 2, 1], np.int32), "label": np.array(1)}]
  batch = feature_converters.get_converter("encoder_classification")(examples, {"inputs": 4})
  assert set(batch) == {"encoder_input_tokens", "classification_labels"}
  np.testing.assert_array_equal(batch["encoder_input_tokens"],
                                [[9, 4, 1, 0], [5, 1, 0, 0], [7, 8, 6, 3]])
  np.testing.assert_array_equal(batch["classification_labels"], [1, 0, 1])
  assert batch["encoder_input_tokens"].dtype == np.int32
  assert batch["classification_labels"].dtype == np.int32
  assert feature_converters.tokens_per_batch(batch) == 12
  with pytest.raises(ValueError, match="'label'"):
    feature_converters.encoder_classification_batch([{"inputs": np.array([1])}], {"inputs": 4})
  with pytest.raises(ValueError, match="scalar integer"):
    feature_converters.encoder_classification_batch(
        [{"inputs": np.array([1]), "label": np.array([1, 0])}], {"inputs": 4})
  with pytest.raises(ValueError, match="inputs"):
    feature_converters.encoder_classification_batch(examples, {"targets": 4})


# -- restore_matching_params -------------------------------------------------
def test_restore_matching_params(tmp_path):
  saved = {"body": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
           "old_head": {"k": np.ones([4], np.float32)}}
  where = checkpoints.save_params(tmp_path, 7, saved)
  assert checkpoints.saved_param_shapes(where) == {"body/w": (2, 3), "old_head/k": (4,)}
  abstract = {"body": {"w": jax.ShapeDtypeStruct((2, 3), np.float32)},
              "new_head": {"k": jax.ShapeDtypeStruct((3,), np.float32),
                           "b": jax.ShapeDtypeStruct((1,), np.float32)}}
  restored, missing = checkpoints.restore_matching_params(where, abstract)
  assert missing == ["new_head/b", "new_head/k"]
  assert set(restored) == {"body"}
  np.testing.assert_array_equal(restored["body"]["w"], saved["body"]["w"])
  assert int(checkpoints.restore_step(where)) == 7
  wrong = {"body": {"w": jax.ShapeDtypeStruct((3, 2), np.float32)}}
  with pytest.raises(ValueError, match=r"body/w: checkpoint \(2, 3\) vs model \(3, 2\)"):
    checkpoints.restore_matching_params(where, wrong)
  with pytest.raises(ValueError, match="shares no parameter"):
    checkpoints.restore_matching_params(where, {"x": jax.ShapeDtypeStruct((1,), np.float32)})


# -- tasks ---------------------------------------------------------------------
def test_word_order_task_flows_through_the_sources():
  source = sources.load_in_memory("cls_word_order", "validation")
  assert len(source) == classification.NUM_EXAMPLES["validation"]
  assert source.eos_features == ("inputs",)
  labels = np.array([int(source[i]["label"]) for i in range(len(source))])
  assert source[0]["label"].shape == () and source[0]["label"].dtype == np.int32
  assert 0.4 < labels.mean() < 0.6
  pairs = classification.word_order_examples("validation")
  assert [l for _, l in pairs] == labels.tolist()
  originals = set(classification.sentences("validation"))
  for text, label in pairs[:50]:  # label 0: a corpus sentence; 1: its words reordered.
    assert (text in originals) == (label == 0)
  assert all(len(source[i]["inputs"]) <= classification.MAX_TOKENS for i in range(len(source)))


def test_small_word_order_task_is_the_first_300_training_sentences():
  small = sources.load_in_memory("cls_word_order_300", "train")
  full = sources.load_in_memory("cls_word_order", "train")
  assert len(small) == classification.SMALL_TRAIN_EXAMPLES == 300
  for i in (0, 1, 150, 299):
    np.testing.assert_array_equal(small[i]["inputs"], full[i]["inputs"])
    assert int(small[i]["label"]) == int(full[i]["label"])
  assert len(sources.load_in_memory("cls_word_order_300", "validation")) == 512


def test_sst2_task_offline_with_mock_data():
  """The task's examples are TFDS's rows (read directly under the same mock): `sentence`
  tokenized (EOS added at batching), `label` as int32; the batch pads / truncates them."""
  with tfds.testing.mock_data(num_examples=4):
    source = sources.load_in_memory("glue_sst2_cls", "validation")
    raw = list(tfds.as_numpy(tfds.load(classification.SST2_TFDS_NAME, split="validation",
                                       shuffle_files=False)))
  assert len(source) == 4 and source.eos_features == ("inputs",)
  for i in range(4):
    assert source[i]["label"].shape == () and source[i]["label"].dtype == np.int32
    assert source[i]["inputs"].dtype == np.int32
  vocabulary = seqio.get_mixture_or_task("glue_sst2_cls").output_features["inputs"].vocabulary
  expected = sorted((tuple(vocabulary.encode(r["sentence"].decode())), int(r["label"]))
                    for r in raw)
  got = [(tuple(int(t) for t in source[i]["inputs"]), int(source[i]["label"])) for i in range(4)]
  assert sorted(got) == expected and all(len(tokens) > 0 for tokens, _ in got)
  examples = [{**source[i], "inputs": np.append(source[i]["inputs"], 1)} for i in range(4)]
  batch = feature_converters.encoder_classification_batch(examples, {"inputs": 16})
  np.testing.assert_array_equal(batch["classification_labels"], [label for _, label in got])
  for row, (tokens, _) in zip(batch["encoder_input_tokens"], got):
    kept = list(tokens + (1,))[:16]
    assert row.tolist() == kept + [0] * (16 - len(kept))


# -- from the command line ----------------------------------------------------
def electra_args(model_dir, *extra):
  return ["--gin_file=gin_configs/objectives/electra.gin", f"--gin.MODEL_DIR={model_dir}",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32}", "--gin.BATCH_SIZE=4",
          "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=None", *extra]


def classifier_args(model_dir, initial, steps, *extra):
  return ["--gin_file=gin_configs/finetune/electra_classifier.gin", f"--gin.MODEL_DIR={model_dir}",
          f"--gin.INITIAL_CHECKPOINT_PATH={initial}",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32}", "--gin.BATCH_SIZE=8",
          f"--gin.TRAIN_STEPS={steps}", "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=2",
          "--gin.EVAL_STEPS=2", *extra]


def _rows(model_dir, kind):
  path = pathlib.Path(model_dir) / "metrics" / f"{kind}.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def _flat_params(step_dir):
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(pathlib.Path(step_dir) / "state")["params"]
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


LEARNING_RATE = 1e-3  # electra_classifier.gin's constant rate


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """ELECTRA 2 steps -> discriminator export -> classifier 2 steps from it (log kept)."""
  root = tmp_path_factory.mktemp("classifier_runs")
  assert train.main(electra_args(root / "electra")) == 0
  export = root / "electra" / "discriminator" / "checkpoint_2"
  records = _Records()
  logging.getLogger("t5xlike").addHandler(records)
  try:
    assert train.main(classifier_args(root / "classifier", export, 4)) == 0
  finally:
    logging.getLogger("t5xlike").removeHandler(records)
  return root, export, records.lines


def test_finetuning_starts_from_the_discriminator(runs):
  root, export, log_lines = runs
  assert any("not in the checkpoint" in line and "classifier/dense/kernel" in line
             and "classifier/out/kernel" in line for line in log_lines)
  assert any("not restored" in line and "binary_head/logit/kernel" in line for line in log_lines)
  discriminator = _flat_params(export)
  tuned = _flat_params(root / "classifier" / "checkpoint_4")
  shared = [k for k in tuned if not k.startswith("classifier/")]
  assert set(shared) == {k for k in discriminator if not k.startswith("binary_head")}
  assert {"classifier/dense/kernel", "classifier/out/kernel", "classifier/out/bias"} <= set(tuned)
  # Two AdamW steps move a parameter by at most ~2 x the learning rate (each step
  # by lr x |m / sqrt(v)| <= ~lr, plus a weight decay of lr x 0.01 x |p|): every
  # shared parameter started at the discriminator's value and was trained.
  for name in shared:
    delta = np.abs(tuned[name] - discriminator[name])
    assert delta.max() <= 3 * LEARNING_RATE * (1 + 0.01 * np.abs(discriminator[name]).max()), name
    assert delta.max() > 0, name


def test_classifier_trains(runs):
  root, _, _ = runs
  rows = _rows(root / "classifier", "train")
  assert [r["step"] for r in rows] == [3, 4]  # TRAIN_STEPS counts from the export's step 2.
  assert all(np.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
  assert all(r["learning_rate"] == pytest.approx(LEARNING_RATE) for r in rows)
  (eval_row,) = _rows(root / "classifier", "eval")
  assert eval_row["step"] == 4 and eval_row["task"] == "cls_word_order"
  assert eval_row["target_tokens"] == 16 and np.isfinite(eval_row["loss"])  # 2 batches x 8 rows


def test_wrong_shape_checkpoint_is_a_one_line_error(runs, tmp_path, capsys):
  _, export, _ = runs
  code = train.main(classifier_args(tmp_path / "run", export, 3,
                                    "--gin.discriminator/encoder.EncoderConfig.mlp_dim=128"))
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1
  assert "encoder/layers_0/mlp/wi/kernel: checkpoint (64, 256) vs model (64, 128)" in err


def test_classifier_config_needs_a_checkpoint(tmp_path, capsys):
  args = [a for a in classifier_args(tmp_path / "run", "x", 3)
          if not a.startswith("--gin.INITIAL")]
  assert train.main(args) == 2
  assert "INITIAL_CHECKPOINT_PATH" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_config_binds_every_macro():
  gin_config.configure(["finetune/electra_classifier.gin"])
  try:
    defined = library_compat.gin_defined_macros()
    model = gin.query_parameter("%MODEL")
  finally:
    gin.clear_config()
  assert set(REQUIRED_MACROS) <= defined and "NUM_CLASSES" in defined
  assert "ClassifierModel" in str(model)
