"""python -m t5xlike.select_data: scores equal `infer --mode=score`, the selection is exactly
the rule's top k, the written task trains by name; the selection rules against reference
computations; pooled states against an unpadded NumPy mean; errors are one line."""
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5xlike import infer, select_data, train
from t5xlike.data import selected_task, sources, subset_selection, task_examples
from t5xlike.models import base, decoder, encoder_decoder, t5
from tests import decoder_numpy_reference, selection_tasks, t5_numpy_reference

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = "--gin_file=gin_configs/models/t5_1_1/tiny.gin"
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}"
POOL = ["--gin.MIXTURE_OR_TASK_NAME='sel_pool'",
        "--gin.MIXTURE_OR_TASK_MODULE='tests.selection_tasks'"]
POOL_SIZE = sum(count for _, count in selection_tasks.SIZES.values())


def rows(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A 2-step quickstart checkpoint (the tiny T5.1.1)."""
  model_dir = tmp_path_factory.mktemp("pretrain")
  assert train.main(["--gin_file=gin_configs/quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
                     "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.EVAL_PERIOD=None",
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"]) == 0
  return model_dir / "checkpoint_2"


def _select(checkpoint, out, *flags, pool=POOL, batch=8):
  return select_data.main([MODEL, "--gin_file=gin_configs/runs/select_data.gin",
                           f"--gin.CHECKPOINT_PATH={checkpoint}", LENGTHS, *pool,
                           f"--gin.BATCH_SIZE={batch}", f"--output_dir={out}", *flags])


@pytest.fixture(scope="module")
def selections(checkpoint, tmp_path_factory):
  """One selection per rule, k = 25 of the 64 pool examples, all in one directory."""
  out = tmp_path_factory.mktemp("selected")
  made = {}
  for name, flags in {"by_loss": ["--score=loss"], "by_low_loss": ["--score=loss",
                                                                    "--order=lowest"],
                      "by_ifd": ["--score=ifd"], "by_kcenter": ["--score=kcenter"],
                      "by_kmeans": ["--score=kmeans", "--gin.select_data_run.select_data."
                                                       "num_clusters=4"],
                      "by_random": ["--score=random"]}.items():
    assert _select(checkpoint, out, f"--name={name}", "--num_examples=25", *flags) == 0
    made[name] = rows(out / name / "scores.jsonl")
  return out, made


def _expected_top(values, k, highest=True):
  """Reference top k: sort by value (NaN last), ties by index."""
  keyed = sorted((-(v if highest else -v) if v is not None else np.inf, i)
                 for i, v in enumerate(values))
  return sorted(i for _, i in keyed[:k])


def _selected(score_rows):
  return sorted(r["index"] for r in score_rows if r["selected"])


def test_loss_equals_infer_score(checkpoint, selections, tmp_path):
  out, made = selections
  assert infer.main([MODEL, "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH={checkpoint}", "--mode=score", LENGTHS, *POOL,
                     "--gin.run_config.DataConfig.split='train'", "--gin.BATCH_SIZE=8",
                     f"--gin.INFER_OUTPUT_DIR={tmp_path}"]) == 0
  scored = [r for name in selection_tasks.SIZES for r in rows(tmp_path / f"{name}-2.jsonl")]
  ours = made["by_loss"]
  assert len(ours) == len(scored) == POOL_SIZE
  for mine, theirs in zip(ours, scored):
    assert (mine["inputs"], mine["targets"]) == (theirs["inputs"], theirs["targets"])
    assert mine["target_tokens"] == len(theirs["token_scores"])
    assert mine["score"] == pytest.approx(theirs["score"], rel=1e-6, abs=1e-6)
    assert mine["loss"] == pytest.approx(-theirs["score"] / len(theirs["token_scores"]),
                                         rel=1e-6)
    assert mine["perplexity"] == pytest.approx(np.exp(mine["loss"]), rel=1e-9)
  # Every rule scored the same pool with the same numbers.
  for other in made.values():
    assert [r["loss"] for r in other] == [r["loss"] for r in ours]


def test_ifd_is_loss_over_loss_without_inputs(checkpoint, selections, tmp_path):
  """loss_alone = infer's score of the targets after the input an empty string becomes
  ([EOS]); ifd = loss / loss_alone (Li et al. 2024)."""
  _, made = selections
  ifd_rows = made["by_ifd"]
  examples = [ex for task in task_examples.leaf_tasks("sel_pool") for ex in
              task_examples.read_split(task, "train", {"inputs": 48, "targets": 16},
                                       use_cached=False, cache_dir=None)]
  source = tmp_path / "alone.jsonl"
  source.write_text("".join(json.dumps({"input_ids": [1], "target_ids": ex["targets"].tolist()})
                            + "\n" for ex in examples[:10]))
  assert infer.main([MODEL, "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH={checkpoint}", "--mode=score", LENGTHS,
                     f"--input={source}", f"--output={tmp_path / 'alone_out.jsonl'}",
                     "--gin.BATCH_SIZE=8"]) == 0
  for mine, alone in zip(ifd_rows, rows(tmp_path / "alone_out.jsonl")):
    assert mine["loss_alone"] == pytest.approx(-alone["score"] / len(alone["token_scores"]),
                                               rel=1e-6)
  for row in ifd_rows:
    assert row["ifd"] == pytest.approx(row["loss"] / row["loss_alone"], rel=1e-12)
    assert row["ifd_eligible"] == (row["ifd"] <= 1.0)


def test_each_selection_is_exactly_the_rules_top_k(selections):
  _, made = selections
  assert _selected(made["by_loss"]) == _expected_top([r["loss"] for r in made["by_loss"]], 25)
  assert _selected(made["by_low_loss"]) == _expected_top(
      [r["loss"] for r in made["by_low_loss"]], 25, highest=False)
  ifd = [r["ifd"] if r["ifd_eligible"] else None for r in made["by_ifd"]]
  assert _selected(made["by_ifd"]) == _expected_top(ifd, min(25, sum(v is not None
                                                                     for v in ifd)))
  distance = [r["kcenter_distance"] if r["kcenter_distance"] is not None else np.inf
              for r in made["by_kcenter"]]
  assert _selected(made["by_kcenter"]) == _expected_top(distance, 25)
  draws = [r["draw"] for r in made["by_random"]]
  assert _selected(made["by_random"]) == _expected_top(draws, 25, highest=False)
  kmeans = made["by_kmeans"]
  assert sum(r["selected"] for r in kmeans) == 25
  sizes = np.bincount([r["cluster"] for r in kmeans])
  quotas = np.bincount([r["cluster"] for r in kmeans if r["selected"]], minlength=len(sizes))
  np.testing.assert_array_less(np.abs(quotas - sizes * 25 / POOL_SIZE), 1.0)
  assert all(r["selected"] == (r["cluster_rank"] < quotas[r["cluster"]]) for r in kmeans)
  for score_rows in made.values():  # rank: the rule's order over the chosen ones
    assert sorted(r["rank"] for r in score_rows if r["selected"]) == list(range(25))


def test_the_cache_holds_the_chosen_examples_in_source_order(selections):
  out, made = selections
  manifest = json.loads((out / "by_ifd" / "selection.json").read_text())
  assert manifest["mixture"] and manifest["source"] == "sel_pool"
  assert manifest["num_examples"] == POOL_SIZE and manifest["k"] == 25
  by_task = {t["source"]: t for t in manifest["tasks"]}
  for name in selection_tasks.SIZES:
    task = task_examples.leaf_tasks(name)[0]
    source, _ = task_examples.read_source_split(task, "train", use_cached=False, cache_dir=None)
    chosen = [r["task_index"] for r in made["by_ifd"] if r["task"] == name and r["selected"]]
    if not chosen:
      assert name not in by_task
      continue
    cache = sources.CachedSource(out / f"by_ifd.{name}" / "train")
    assert len(cache) == by_task[name]["selected"] == len(chosen)
    for position, index in enumerate(chosen):
      for feature in ("inputs", "targets"):
        np.testing.assert_array_equal(cache[position][feature], source[index][feature])
    validation = sources.CachedSource(out / f"by_ifd.{name}" / "validation")
    assert len(validation) == selection_tasks.VALIDATION


def test_the_selection_reads_and_trains_by_name(checkpoint, selections, tmp_path):
  out, made = selections
  lengths = {"inputs": 48, "targets": 16}
  jobs = task_examples.read_tasks("by_loss", "train", lengths, use_cached=True,
                                  cache_dir=str(out))
  chosen = [r for r in made["by_loss"] if r["selected"]]
  assert [(name, len(rows_)) for name, rows_, _ in jobs] == [
      (f"by_loss.{name}", sum(r["task"] == name for r in chosen))
      for name in selection_tasks.SIZES if any(r["task"] == name for r in chosen)]
  assert sorted(row["targets"] for _, rows_, _ in jobs for row in rows_) == sorted(
      r["targets"] for r in chosen)
  model_dir = tmp_path / "finetune"
  assert train.main([MODEL, "--gin_file=gin_configs/runs/finetune.gin",
                     f"--gin.INITIAL_CHECKPOINT_PATH={checkpoint}", f"--gin.MODEL_DIR={model_dir}",
                     "--gin.MIXTURE_OR_TASK_NAME='by_loss'", "--gin.USE_CACHED_TASKS=True",
                     f"--gin.TASK_CACHE_DIR={out}", "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=4",
                     "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=1", "--gin.EVAL_MAX_EXAMPLES=2",
                     "--gin.LOG_PERIOD=1", LENGTHS]) == 0
  assert [r["step"] for r in rows(model_dir / "metrics" / "train.jsonl")] == [3, 4]
  evaluated = {r["task"] for r in rows(model_dir / "metrics" / "eval.jsonl")}
  assert {"by_loss"} | {name for name, _, _ in jobs} <= evaluated


def test_uncached_read_of_a_selection_is_one_line(checkpoint, selections, tmp_path, capsys):
  out, _ = selections
  assert train.main([MODEL, "--gin_file=gin_configs/runs/finetune.gin",
                     f"--gin.INITIAL_CHECKPOINT_PATH={checkpoint}",
                     f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.MIXTURE_OR_TASK_NAME='by_loss'",
                     f"--gin.TASK_CACHE_DIR={out}", "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=4",
                     LENGTHS]) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and "USE_CACHED_TASKS=True" in error[0], error
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # ~12 s
def test_a_rerun_writes_the_same_scores_and_examples(checkpoint, selections, tmp_path):
  out, _ = selections
  assert _select(checkpoint, tmp_path, "--name=by_kmeans", "--num_examples=25",
                 "--score=kmeans", "--gin.select_data_run.select_data.num_clusters=4") == 0
  assert (tmp_path / "by_kmeans" / "scores.jsonl").read_text() == (
      out / "by_kmeans" / "scores.jsonl").read_text()


@pytest.mark.slow  # ~24 s (8 devices)
def test_sharded_selection_equals_unsharded(checkpoint, selections, tmp_path):
  """8 CPU devices, parameters over fsdp=4 x tensor=2: the same losses, pooled-state
  distances and k-center choice as the 1-device run."""
  _, made = selections
  command = [sys.executable, "-m", "t5xlike.select_data", MODEL,
             "--gin_file=gin_configs/runs/select_data.gin", f"--gin.CHECKPOINT_PATH={checkpoint}",
             LENGTHS, *POOL, "--gin.BATCH_SIZE=8", "--gin.MESH_SHAPE={'fsdp': 4, 'tensor': 2}",
             f"--output_dir={tmp_path}", "--name=by_kcenter", "--num_examples=25",
             "--score=kcenter"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  sharded, unsharded = rows(tmp_path / "by_kcenter" / "scores.jsonl"), made["by_kcenter"]
  np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in unsharded],
                             rtol=1e-5)
  finite = lambda values: [v if v is not None else 0.0 for v in values]
  np.testing.assert_allclose(finite(r["kcenter_distance"] for r in sharded),
                             finite(r["kcenter_distance"] for r in unsharded), rtol=1e-4,
                             atol=1e-6)
  assert [r["rank"] for r in sharded] == [r["rank"] for r in unsharded]


@pytest.mark.parametrize("flags,message", [
    (["--score=entropy", "--fraction=0.5"], "--score must be one of"),
    (["--score=loss"], "exactly one of --fraction and --num_examples"),
    (["--fraction=1.5"], "--fraction must be in (0, 1]"),
    (["--num_examples=65"], "holds 64"),
    (["--num_examples=5", "--name=sel_count"], "already a registered task"),
    (["--num_examples=5", "--name=bad/name"], "letters, digits"),
    (["--num_examples=5", "--order=middle"], "--order must be one of"),
    (["--num_examples=5", "--gin.MIXTURE_OR_TASK_NAME='no_such_task'"],
     "unknown task or mixture 'no_such_task'"),
    (["--num_examples=5", "--score=ifd", "--gin.MIXTURE_OR_TASK_NAME='embedded_corpus'"],
     "every task needs an 'inputs' feature"),
])
def test_errors_are_one_line_and_write_nothing(checkpoint, tmp_path, capsys, flags, message):
  out = tmp_path / "out"
  argv = [f for f in flags if f.startswith("--name")] or ["--name=fresh"]
  assert _select(checkpoint, out, *argv, *[f for f in flags if not f.startswith("--name")]) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and message in error[0], error
  assert not out.exists()


def test_checkpoint_of_another_architecture_is_one_line(checkpoint, tmp_path, capsys):
  """A T5 checkpoint read as the decoder-only model: exit 2, one line, nothing written."""
  out = tmp_path / "out"
  assert select_data.main(["--gin_file=gin_configs/models/decoder/tiny.gin",
                           "--gin_file=gin_configs/runs/select_data.gin",
                           f"--gin.CHECKPOINT_PATH={checkpoint}", LENGTHS, *POOL,
                           f"--output_dir={out}", "--name=fresh", "--num_examples=5"]) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and "does not fit the model" in error[0], error
  assert not out.exists()


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
  assert _select(tmp_path / "nowhere" / "checkpoint_9", tmp_path / "out", "--name=x",
                 "--fraction=0.5") == 2
  assert "CHECKPOINT_PATH" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


# -- the rules against reference computations ----------------------------------------------
def _farthest_first_reference(points, k):
  """Farthest-first traversal with explicit float64 distances and loops."""
  points = np.asarray(points, np.float64)
  mean = points.mean(0)
  first = min(range(len(points)), key=lambda i: (np.sum((points[i] - mean) ** 2), i))
  chosen = [first]
  while len(chosen) < k:
    best, best_distance = None, -1.0
    for i in range(len(points)):
      if i in chosen:
        continue
      distance = min(np.sqrt(np.sum((points[i] - points[c]) ** 2)) for c in chosen)
      if distance > best_distance:
        best, best_distance = i, distance
    chosen.append(best)
  return chosen


def test_k_center_greedy_is_farthest_first():
  points = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
  choice = subset_selection.k_center_greedy(points, 12)
  assert choice.indices.tolist() == _farthest_first_reference(points, 12)
  distance = choice.fields["kcenter_distance"]
  picked = distance[choice.indices]
  assert np.isinf(picked[0]) and np.all(np.diff(picked[1:]) <= 0)
  others = np.delete(distance, choice.indices)
  assert others.max() <= picked[-1]
  final = np.sqrt(((points[:, None].astype(np.float64) - points[choice.indices][None]) ** 2)
                  .sum(-1)).min(1)
  np.testing.assert_allclose(np.delete(final, choice.indices), others, rtol=1e-9, atol=1e-9)
  # Nested: the first k of a longer run.
  assert subset_selection.k_center_greedy(points, 20).indices[:12].tolist() == (
      choice.indices.tolist())


def test_top_k_rules_skip_nan_and_break_ties_by_index():
  scores = np.array([0.5, np.nan, 2.0, 2.0, -1.0, 0.5])
  assert subset_selection.top_k(scores, 3).indices.tolist() == [2, 3, 0]
  assert subset_selection.top_k(scores, 3, highest=False).indices.tolist() == [4, 0, 5]
  assert subset_selection.top_k(scores, 9).indices.tolist() == [2, 3, 0, 5, 4]
  ifd = np.array([0.9, 1.2, np.nan, 0.3, 1.0, 0.95])
  assert subset_selection.top_k_ifd(ifd, 3).indices.tolist() == [4, 5, 0]
  assert subset_selection.top_k_ifd(ifd, 9).indices.tolist() == [4, 5, 0, 3]
  draw = np.random.default_rng(7).random(10)
  assert subset_selection.uniform_random(10, 4, seed=7).indices.tolist() == (
      np.argsort(draw, kind="stable")[:4].tolist())


def test_k_means_quotas_are_proportional_and_sum_to_k():
  points = np.concatenate([np.random.default_rng(1).normal(c, 0.1, size=(n, 3))
                           for c, n in ((0, 30), (5, 12), (10, 7))])
  choice = subset_selection.k_means_quota(points, 10, num_clusters=3, seed=0)
  labels = choice.fields["cluster"]
  # Three well-separated blobs: k-means finds them.
  assert sorted(np.bincount(labels).tolist()) == [7, 12, 30]
  chosen = np.bincount(labels[choice.indices], minlength=3)
  sizes = np.bincount(labels)
  assert chosen.sum() == 10
  np.testing.assert_array_less(np.abs(chosen - sizes * 10 / 49), 1.0)
  ranks = choice.fields["cluster_rank"]
  for label in range(3):
    assert sorted(ranks[labels == label].tolist()) == list(range(sizes[label]))


def test_manifest_of_another_format_is_refused(tmp_path):
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "selection.json").write_text(json.dumps({"format": "x"}))
  with pytest.raises(ValueError, match="not a t5xlike selection"):
    selected_task.read_manifest("old", tmp_path)
  assert selected_task.read_manifest("absent", tmp_path) is None


# -- pooled final states against the NumPy float64 references --------------------------------
def _random_params(model, batch, seed):
  """Initialised parameters with randomised norm scales (so that every parameter matters)."""
  rng = np.random.default_rng(seed)
  params = nn.meta.unbox(model.init(jax.random.key(seed), batch)["params"])
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1.0 + 0.5 * rng.standard_normal(x.shape).astype(np.float32))
      if "scale" in str(path) or "rel_embedding" in str(path) else x, params)


def test_t5_pooled_states_are_the_mean_encoder_output():
  config = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=4, num_encoder_layers=2,
                       num_decoder_layers=2, head_dim=8, mlp_dim=48)
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(config))
  rng = np.random.default_rng(0)
  lengths = [11, 4, 7]
  tokens = np.zeros((3, 11), np.int32)
  for row, length in enumerate(lengths):
    tokens[row, :length] = rng.integers(2, 128, size=length)
  targets = np.ones((3, 5), np.int32)
  batch = {"encoder_input_tokens": tokens, "decoder_input_tokens": np.zeros_like(targets),
           "decoder_target_tokens": targets, "decoder_loss_weights": targets.astype(np.float32)}
  params = _random_params(model, batch, seed=1)
  pooled = np.asarray(jax.jit(model.pooled_states)(params, batch))
  assert pooled.shape == (3, 32) and pooled.dtype == np.float32
  for row, length in enumerate(lengths):  # each row alone, unpadded, in float64
    encoded = t5_numpy_reference.forward(params, 4, tokens[row:row + 1, :length],
                                         np.zeros((1, 1), np.int32), np.ones((1, 1), np.int32),
                                         encoded_only=True)
    np.testing.assert_allclose(pooled[row], encoded[0].mean(0), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_pooled_states_are_the_mean_last_layer_states(tied):
  config = decoder.DecoderConfig(vocab_size=128, emb_dim=32, num_heads=4, num_kv_heads=2,
                                 num_layers=2, head_dim=8, mlp_dim=48, tie_embeddings=tied)
  model = decoder.DecoderOnlyModel(decoder.Transformer(config))
  rng = np.random.default_rng(2)
  lengths = [9, 3, 6]
  targets = np.zeros((3, 9), np.int32)
  for row, length in enumerate(lengths):
    targets[row, :length] = rng.integers(2, 128, size=length)
  inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_loss_weights": (targets > 0).astype(np.float32)}
  params = _random_params(model, batch, seed=3)
  pooled = np.asarray(jax.jit(model.pooled_states)(params, batch))
  states = decoder_numpy_reference.forward(params, 4, 2, inputs, targets, states_only=True)
  for row, length in enumerate(lengths):
    np.testing.assert_allclose(pooled[row], states[row, :length].mean(0), rtol=2e-4,
                               atol=2e-5)


def test_a_model_without_pooled_states_says_so():
  with pytest.raises(NotImplementedError, match="no pooled states"):
    base.TokenModel.pooled_states(None, None, {})  # type: ignore[arg-type]
