"""`python -m t5xlike.prune`: a checkpoint (a step directory as a training run leaves it,
random weights: no training compile) pruned into OUT/checkpoint + OUT/model.gin whose
weights are the original's slices at the chosen indices, which train and infer load (T5 and
a scanned decoder-only model); bad input is one line, exit 2, nothing written."""
import dataclasses
import json
import math
import pathlib

import gin
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5xlike import checkpoints, infer, partitioning, prune, train
from t5xlike.cli import gin_config
from t5xlike.inference import checkpoint_loading
from t5xlike.interop import network_shapes, output_dir, param_trees
from tests import pruning_numpy_reference as ref

T5_LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"
DECODER_LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'targets': 32}"
SMALL = ["--gin.BATCH_SIZE=4", "--gin.CALIBRATION_BATCHES=2", "--gin.HELD_OUT_BATCHES=1"]


def _model_of(gin_file):
  gin_config.configure([str(gin_file)])
  try:
    return output_dir.configured_model()
  finally:
    gin.clear_config()


def _write_checkpoint(root, config, seed):
  """A step directory `root/checkpoint_2` of random parameters for `config` (scanned
  configs: stacked layers), as a training run would leave; (path, unscanned params)."""
  rng = np.random.default_rng(seed)
  unscanned = network_shapes.param_shapes(dataclasses.replace(config, scan_layers=False))
  flat = {name: (1.0 + 0.2 * rng.standard_normal(shape) if name.endswith("/scale")
                 else rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
          for name, shape in unscanned.items()}
  tree = param_trees.unflatten(param_trees.stack(flat) if config.scan_layers else flat)
  return checkpoints.save_params(root, 2, tree), flat


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory):
  """T5.1.1-tiny (the quickstart's model) at step 2, random weights: (path, params)."""
  config = _model_of("gin_configs/models/t5_1_1/tiny.gin").network.config
  return _write_checkpoint(tmp_path_factory.mktemp("t5"), config, 0)


@pytest.fixture(scope="module")
def decoder_checkpoint(tmp_path_factory):
  """The decoder-only tiny model (GQA: 4 query / 2 kv heads), its layers scanned."""
  config = dataclasses.replace(
      _model_of("gin_configs/models/decoder/tiny.gin").network.config, scan_layers=True)
  return _write_checkpoint(tmp_path_factory.mktemp("decoder"), config, 1)


def _prune(*flags) -> int:
  return prune.main([str(flag) for flag in flags])


@pytest.fixture(scope="module")
def t5_pruned(t5_checkpoint, tmp_path_factory):
  out = tmp_path_factory.mktemp("t5_pruned") / "out"
  assert _prune("--gin_file=gin_configs/quickstart.gin", T5_LENGTHS, *SMALL,
                f"--gin.CHECKPOINT_PATH={t5_checkpoint[0]}", f"--output={out}", "--heads=2",
                "--mlp_dim=50%", "--emb_dim=48", "--num_decoder_layers=1") == 0
  return out


def test_t5_prune_writes_the_originals_slices_at_the_chosen_indices(t5_checkpoint, t5_pruned):
  assert sorted(p.name for p in t5_pruned.iterdir()) == ["checkpoint", "model.gin",
                                                         "prune.json", "spm.model",
                                                         "teacher.gin"]
  assert not list(t5_pruned.parent.glob(".*incomplete"))
  report = json.loads((t5_pruned / "prune.json").read_text())
  assert report["step"] == 0 and report["source_step"] == 2
  assert report["sizes"]["after"] == {"emb_dim": 48, "num_heads": 2, "num_encoder_layers": 2,
                                      "num_decoder_layers": 1, "head_dim": 16, "mlp_dim": 128}
  assert report["parameters"]["after"] < report["parameters"]["before"]
  assert set(report["losses"]) == {"calibration", "held_out"}
  assert all(math.isfinite(v) for losses in report["losses"].values() for v in losses.values())
  # The chosen indices are the importance's top ones.
  scores = report["importance"]
  for path, units in report["kept"]["mlp"].items():
    assert units == sorted(np.argsort(-np.asarray(scores["mlp"][path]), kind="stable")[:128])
  assert report["kept"]["embedding"] == sorted(
      np.argsort(-np.asarray(scores["embedding"]), kind="stable")[:48])
  decoder_layers = [scores["layers"][f"decoder/layers_{i}"] for i in range(2)]
  assert report["kept"]["layers"]["decoder"] == [int(np.argmax(decoder_layers))]

  source = _model_of("gin_configs/models/t5_1_1/tiny.gin").network.config
  model = _model_of(t5_pruned / "model.gin")
  config = model.network.config
  assert (config.emb_dim, config.num_heads, config.mlp_dim, config.num_decoder_layers) == (
      48, 2, 128, 1)
  assert "Written by `python -m t5xlike.prune`" in (t5_pruned / "model.gin").read_text()
  original = t5_checkpoint[1]
  pruned = output_dir.read_params(t5_pruned / "checkpoint", config)
  ref.assert_slices(original, pruned, report["kept"], source.head_dim)


def test_pruned_t5_recovers_by_distillation_from_its_source(t5_checkpoint, t5_pruned, tmp_path):
  """OUT/teacher.gin names the source as the teacher (its architecture in scope teacher/,
  its checkpoint): posttrain/distill_pruned.gin trains the pruned model on the logit KL
  alone, the teacher frozen at the source's weights."""
  gin_config.configure(["gin_configs/models/t5_1_1/tiny.gin", str(t5_pruned / "model.gin"),
                        str(t5_pruned / "teacher.gin")])
  try:
    teacher, student = gin.query_parameter("%TEACHER"), gin.query_parameter("%MODEL")
    with gin.config_scope("TEACHER"):
      teacher_config = teacher.scoped_configurable_fn().network.config
    student_config = student.scoped_configurable_fn().network.config
    checkpoint_path = gin.query_parameter("%TEACHER_CHECKPOINT_PATH")
  finally:
    gin.clear_config()
  assert teacher_config == _model_of("gin_configs/models/t5_1_1/tiny.gin").network.config
  assert (student_config.emb_dim, student_config.num_heads) == (48, 2)
  assert pathlib.Path(checkpoint_path) == pathlib.Path(t5_checkpoint[0]).resolve()
  model_dir = tmp_path / "recovered"
  assert train.main(["--gin_file=gin_configs/quickstart.gin",
                     f"--gin_file={t5_pruned / 'model.gin'}",
                     f"--gin_file={t5_pruned / 'teacher.gin'}",
                     "--gin_file=gin_configs/posttrain/distill_pruned.gin",
                     f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=2", "--gin.LOG_PERIOD=1",
                     "--gin.BATCH_SIZE=4", "--gin.EVAL_PERIOD=None", T5_LENGTHS,
                     f"--gin.INITIAL_CHECKPOINT_PATH={t5_pruned / 'checkpoint'}"]) == 0
  rows = [json.loads(line) for line in (model_dir / "metrics" / "train.jsonl").open()]
  assert [row["step"] for row in rows] == [1, 2]
  for row in rows:  # kd_weight 1, temperature 1: the loss is the KL alone
    assert row["loss"] == pytest.approx(row["kd_divergence"], rel=1e-5)
    assert row["kd_divergence"] > 0 and math.isfinite(row["task_loss"])
  with ocp.PyTreeCheckpointer() as checkpointer:
    saved = checkpointer.restore(model_dir / "checkpoint_2" / "state")["params"]
  frozen = param_trees.flatten(saved["teacher"])
  assert set(frozen) == set(t5_checkpoint[1])
  assert all(np.asarray(frozen[k]).tobytes() == v.tobytes() for k, v in t5_checkpoint[1].items())


def test_random_importance_keeps_a_seeded_random_choice_of_the_same_sizes(t5_checkpoint,
                                                                          t5_pruned, tmp_path):
  """--importance=random: the baseline of the activation scores; the structures kept are the
  top of uniform draws seeded by RANDOM_SEED, the sizes those of the same flags."""
  flags = ["--gin_file=gin_configs/quickstart.gin", T5_LENGTHS, *SMALL,
           f"--gin.CHECKPOINT_PATH={t5_checkpoint[0]}", "--heads=2", "--mlp_dim=50%",
           "--emb_dim=48", "--num_decoder_layers=1", "--importance=random"]
  reports = []
  for seed in (0, 0, 1):
    out = tmp_path / f"random_{len(reports)}"
    assert _prune(*flags, f"--gin.RANDOM_SEED={seed}", f"--output={out}") == 0
    reports.append(json.loads((out / "prune.json").read_text()))
  activation = json.loads((t5_pruned / "prune.json").read_text())
  assert reports[0]["sizes"] == activation["sizes"]
  assert reports[0]["importance"]["layer_criterion"] == "random"
  assert reports[0]["kept"] == reports[1]["kept"] != reports[2]["kept"]
  assert reports[0]["kept"] != activation["kept"]
  scores = reports[0]["importance"]
  for path, units in reports[0]["kept"]["mlp"].items():
    assert all(0.0 <= v < 1.0 for v in scores["mlp"][path])
    assert units == sorted(np.argsort(-np.asarray(scores["mlp"][path]), kind="stable")[:128])


@pytest.mark.slow  # ~16 s
def test_pruned_t5_trains_and_infers(t5_pruned, tmp_path):
  """OUT is INITIAL_CHECKPOINT_PATH of a training run (TRAIN_STEPS from its step 0) and
  CHECKPOINT_PATH of `infer` with OUT/model.gin."""
  model_dir = tmp_path / "retrain"
  assert train.main(["--gin_file=gin_configs/quickstart.gin",
                     f"--gin_file={t5_pruned / 'model.gin'}", f"--gin.MODEL_DIR={model_dir}",
                     "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.EVAL_PERIOD=None",
                     T5_LENGTHS,
                     f"--gin.INITIAL_CHECKPOINT_PATH={t5_pruned / 'checkpoint'}"]) == 0
  rows = [json.loads(line) for line in (model_dir / "metrics" / "train.jsonl").open()]
  assert rows and all(math.isfinite(row["loss"]) for row in rows if "loss" in row)
  assert (model_dir / "checkpoint_2").is_dir()
  source = tmp_path / "in.jsonl"
  source.write_text(json.dumps({"inputs": "The quick brown fox", "targets": "jumps"}) + "\n")
  assert infer.main([f"--gin_file={t5_pruned / 'model.gin'}", "--gin_file=runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH={t5_pruned / 'checkpoint'}", "--mode=score",
                     f"--input={source}", f"--output={tmp_path / 'out.jsonl'}"]) == 0
  scored = json.loads((tmp_path / "out.jsonl").read_text())
  assert math.isfinite(scored["score"]) and scored["score"] < 0


@pytest.mark.slow  # ~22 s; the T5 prune command stays
def test_scanned_decoder_prunes_by_loss_and_loads(decoder_checkpoint, tmp_path):
  """A scanned GQA decoder: whole kv groups dropped (--kv_heads), layers ranked by the loss
  without them; OUT keeps the scanned layout and loads as CHECKPOINT_PATH."""
  out = tmp_path / "out"
  assert _prune("--gin_file=gin_configs/objectives/causal_lm.gin", DECODER_LENGTHS, *SMALL,
                "--gin.DecoderConfig.scan_layers=True",
                f"--gin.CHECKPOINT_PATH={decoder_checkpoint[0]}", f"--output={out}",
                "--num_layers=1", "--kv_heads=1", "--layer_importance=loss") == 0
  report = json.loads((out / "prune.json").read_text())
  assert report["layer_importance"] == "loss"
  assert report["kept"]["layers"]["decoder"] == [int(np.argmax(
      [report["importance"]["layers"][f"decoder/layers_{i}"] for i in range(2)]))]
  model = _model_of(out / "model.gin")
  config = model.network.config
  assert config.scan_layers and (config.num_layers, config.num_heads, config.num_kv_heads) == (
      1, 2, 1)
  assert {name.split("/")[1] for name in checkpoints.saved_param_shapes(out / "checkpoint")
          if name.startswith("decoder/layers")} == {"layers"}
  source = _model_of("gin_configs/models/decoder/tiny.gin").network.config
  original = decoder_checkpoint[1]  # unstacked
  ref.assert_slices(original, output_dir.read_params(out / "checkpoint", config),
                    report["kept"], source.head_dim)
  params, step = checkpoint_loading.load_checkpoint(model, str(out / "checkpoint"),
                                                    {"targets": 32}, partitioning.Partitioner())
  assert step == 0 and "layers" in params["decoder"]
  model_dir = tmp_path / "retrain"
  assert train.main(["--gin_file=gin_configs/objectives/causal_lm.gin",
                     f"--gin_file={out / 'model.gin'}", f"--gin.MODEL_DIR={model_dir}",
                     "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=4", "--gin.EVAL_PERIOD=None",
                     DECODER_LENGTHS, f"--gin.INITIAL_CHECKPOINT_PATH={out / 'checkpoint'}"]) == 0
  assert (model_dir / "checkpoint_1").is_dir()


@pytest.mark.parametrize("gin_file, flags, message", [
    ("gin_configs/quickstart.gin", ["--mlp_dim=0%"],
     "--mlp_dim=0% leaves nothing: it keeps 0 of the model's 256 MLP units"),
    ("gin_configs/quickstart.gin", ["--heads=10%"], "--heads=10% leaves nothing"),
    ("gin_configs/quickstart.gin", [], "nothing to prune"),
    ("gin_configs/quickstart.gin", ["--heads=2", "--layer_importance=random"],
     "--layer_importance=random: expected one of block_importance, loss"),
    ("gin_configs/quickstart.gin", ["--heads=2", "--importance=magnitude"],
     "--importance=magnitude: expected one of activation, random"),
    ("gin_configs/objectives/causal_lm.gin", ["--heads=3"],
     "--heads=3 breaks grouped-query attention"),
    ("gin_configs/objectives/mlm.gin", ["--heads=1"], "MODEL: MODEL is a MLMModel"),
    ("gin_configs/models/t5_1_1/tiny.gin", ["--heads=2"], "MIXTURE_OR_TASK_NAME is not set"),
])
def test_bad_input_is_one_line_and_writes_nothing(t5_checkpoint, tmp_path, capsys, gin_file,
                                                  flags, message):
  out = tmp_path / "out"
  rc = _prune(f"--gin_file={gin_file}", *SMALL, f"--gin.CHECKPOINT_PATH={t5_checkpoint[0]}",
              f"--output={out}", *flags)
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and message in err[0], err
  assert list(tmp_path.iterdir()) == []


def test_an_output_that_is_not_empty_is_refused(t5_checkpoint, tmp_path, capsys):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  assert _prune("--gin_file=gin_configs/quickstart.gin", *SMALL,
                f"--gin.CHECKPOINT_PATH={t5_checkpoint[0]}", f"--output={tmp_path / 'out'}",
                "--heads=2") == 2
  assert "exists and is not empty" in capsys.readouterr().err
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
  assert sorted(p.name for p in pathlib.Path(tmp_path).iterdir()) == ["out"]
