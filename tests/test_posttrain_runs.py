"""`python -m t5xlike.train` with the post-training gins: SFT -> DPO end to end, the frozen
reference in the written checkpoints, on-policy resume, and the configuration errors.

Runs the entry point in-process on the tiny T5 with batches of 4, so each run costs one
compilation; the SFT checkpoints are shared by the module.
"""
import json
import logging
import pathlib
import re
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5xlike import precompute_reference, progress, train
from t5xlike.data import sources

MODEL = "--gin_file=gin_configs/models/t5_1_1/tiny.gin"
SMALL = ["--gin.BATCH_SIZE=4", "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=None",
         "--gin.CheckpointConfig.async_save=False"]
SFT = [MODEL, "--gin_file=gin_configs/posttrain/sft_continue.gin", *SMALL,
       "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2"]
PAIRS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'chosen': 12, 'rejected': 12}"


def dpo(gin_file, model_dir, *overrides):
  return train.main([MODEL, f"--gin_file=gin_configs/posttrain/{gin_file}", *SMALL, PAIRS,
                     f"--gin.MODEL_DIR={model_dir}", *overrides])


def rows(model_dir, kind="train"):
  path = pathlib.Path(model_dir) / "metrics" / f"{kind}.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def saved_params(step_dir):
  """{path: numpy array} of a checkpoint's parameters."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(pathlib.Path(step_dir) / "state")
  flat = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for key, value in node.items():
        walk(value, f"{prefix}/{key}" if prefix else key)
    else:
      flat[prefix] = np.asarray(node)
  walk(tree["params"], "")
  return flat


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
  """{'tiny': the SFT checkpoint at step 2, 'other': one with a single decoder layer}."""
  out = {}
  for name, extra in (("tiny", []), ("other", ["--gin.t5.T5Config.num_decoder_layers=1"])):
    model_dir = tmp_path_factory.mktemp(f"sft_{name}")
    assert train.main(SFT + [f"--gin.MODEL_DIR={model_dir}", *extra]) == 0
    out[name] = model_dir / "checkpoint_2"
  return out


def test_dpo_run_reports_the_preference_metrics_and_keeps_the_reference(sft, tmp_path):
  assert dpo("dpo.gin", tmp_path, f"--gin.INITIAL_CHECKPOINT_PATH={sft['tiny']}",
             "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_PERIOD=2",
             "--gin.EVAL_STEPS=1", "--gin.LEARNING_RATE=0.01") == 0
  train_rows, eval_rows = rows(tmp_path), rows(tmp_path, "eval")
  assert [r["step"] for r in train_rows] == [3, 4]
  for key in ("loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy",
              "logp_accuracy", "kl_to_reference"):
    assert all(np.isfinite(r[key]) for r in train_rows + eval_rows), key
  # Step 3 starts at the reference: rewards, margin and KL are 0, the loss log 2.
  assert train_rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
  assert train_rows[0]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
  assert eval_rows[-1]["kl_to_reference"] > 0
  start, final = saved_params(sft["tiny"]), saved_params(tmp_path / "checkpoint_4")
  assert set(final) == set(start) | {f"reference/{k}" for k in start}
  assert all(final[f"reference/{k}"].tobytes() == v.tobytes() for k, v in start.items())
  assert any(not np.array_equal(final[k], v) for k, v in start.items())  # the policy trained


@pytest.mark.parametrize("gin_file", [pytest.param("ipo.gin", marks=pytest.mark.slow),
                                      "simpo.gin"])
def test_ipo_and_simpo_train(sft, tmp_path, gin_file):
  assert dpo(gin_file, tmp_path, f"--gin.INITIAL_CHECKPOINT_PATH={sft['tiny']}",
             "--gin.TRAIN_STEPS=3") == 0
  (row,) = rows(tmp_path)
  assert np.isfinite(row["loss"]) and ("kl_to_reference" in row) == (gin_file == "ipo.gin")
  names = saved_params(tmp_path / "checkpoint_3")
  assert any(k.startswith("reference/") for k in names) == (gin_file == "ipo.gin")


@pytest.mark.parametrize("override, culprit", [
    # The SFT task has inputs / targets: no pair.
    ("--gin.MIXTURE_OR_TASK_NAME='pref_continue_sft'",
     "lacks the pairwise field(s) ['chosen', 'rejected']"),
    ("REFERENCE_OTHER", "holds another architecture than the reference model"),
])
def test_bad_posttraining_configuration_fails_in_one_line_and_writes_nothing(
    sft, tmp_path, capsys, override, culprit):
  if override == "REFERENCE_OTHER":
    override = f"--gin.REFERENCE_CHECKPOINT_PATH='{sft['other']}'"
  model_dir = tmp_path / "fresh"
  assert dpo("dpo.gin", model_dir, f"--gin.INITIAL_CHECKPOINT_PATH={sft['tiny']}",
             "--gin.TRAIN_STEPS=3", override) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and culprit in err[-1], err[-1]
  assert not model_dir.exists()


@pytest.mark.slow
def test_on_policy_dpo_resumes_bitwise_mid_round(sft, tmp_path):
  """Rounds of 2 sampled batches from step 3; a checkpoint at step 3 falls inside the first
  round: the resumed run trains on the saved samples, then samples as the uninterrupted one."""
  common = [f"--gin.INITIAL_CHECKPOINT_PATH={sft['tiny']}", "--gin.CHECKPOINT_PERIOD=3",
            "--gin.on_policy.OnPolicySampling.every_steps=2", "--gin.LEARNING_RATE=0.01"]
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  assert dpo("dpo_on_policy.gin", straight, *common, "--gin.TRAIN_STEPS=6") == 0
  assert dpo("dpo_on_policy.gin", resumed, *common, "--gin.TRAIN_STEPS=3") == 0
  assert dpo("dpo_on_policy.gin", resumed, *common, "--gin.TRAIN_STEPS=6") == 0
  keys = ("step", "loss", "accuracy", "on_policy_rejected_reward")
  assert [[r[k] for k in keys] for r in rows(resumed)] == [
      [r[k] for k in keys] for r in rows(straight)]
  a, b = (saved_params(d / "checkpoint_6") for d in (straight, resumed))
  assert all(a[k].tobytes() == b[k].tobytes() for k in a)
  shutil.rmtree(straight)


@pytest.mark.slow
def test_sft_then_dpo_raises_held_out_preference_accuracy(tmp_path):
  """The documented two-stage run, shortened: the preference accuracy on held-out pairs
  (validation) before DPO (a step at learning rate 0: chance, 0.5) and after 60 DPO steps."""
  sft_dir = tmp_path / "sft"
  assert train.main([MODEL, "--gin_file=gin_configs/posttrain/sft_continue.gin",
                     f"--gin.MODEL_DIR={sft_dir}", "--gin.TRAIN_STEPS=150",
                     "--gin.EVAL_PERIOD=None", "--gin.CHECKPOINT_PERIOD=150"]) == 0
  start = f"--gin.INITIAL_CHECKPOINT_PATH={sft_dir / 'checkpoint_150'}"
  held_out = ["--gin.BATCH_SIZE=32", "--gin.EVAL_STEPS=9"]  # 288 of the 300 pairs
  assert train.main([MODEL, "--gin_file=gin_configs/posttrain/dpo.gin", start, *held_out,
                     f"--gin.MODEL_DIR={tmp_path / 'before'}", "--gin.TRAIN_STEPS=151",
                     "--gin.LEARNING_RATE=0.0"]) == 0
  assert train.main([MODEL, "--gin_file=gin_configs/posttrain/dpo.gin", start, *held_out,
                     f"--gin.MODEL_DIR={tmp_path / 'after'}", "--gin.TRAIN_STEPS=210",
                     "--gin.EVAL_PERIOD=60", "--gin.LEARNING_RATE=0.002"]) == 0
  before, after = rows(tmp_path / "before", "eval")[-1], rows(tmp_path / "after", "eval")[-1]
  assert before["accuracy"] == 0.5 and before["reward_margin"] == 0  # policy = reference
  assert after["accuracy"] > 0.55 and after["reward_margin"] > 0, (before, after)


@pytest.mark.slow
def test_decoder_only_sft_then_dpo(tmp_path):
  """The same gins with a decoder-only model (prefix-LM rows: the `pairwise_decoder`
  converter)."""
  decoder = "--gin_file=gin_configs/models/decoder/tiny.gin"
  sft_dir = tmp_path / "sft"
  assert train.main([decoder, "--gin_file=gin_configs/posttrain/sft_continue.gin", *SMALL,
                     f"--gin.MODEL_DIR={sft_dir}", "--gin.TRAIN_STEPS=2",
                     "--gin.CHECKPOINT_PERIOD=2"]) == 0
  assert train.main([decoder, "--gin_file=gin_configs/posttrain/dpo.gin", *SMALL, PAIRS,
                     f"--gin.MODEL_DIR={tmp_path / 'dpo'}", "--gin.TRAIN_STEPS=3",
                     f"--gin.INITIAL_CHECKPOINT_PATH={sft_dir / 'checkpoint_2'}"]) == 0
  (row,) = rows(tmp_path / "dpo")
  # (The policy's and the reference's logits agree to float rounding, not bitwise: the
  # policy's pass is compiled with its gradient.)
  assert row["loss"] == pytest.approx(np.log(2.0), abs=1e-5)
  start, final = saved_params(sft_dir / "checkpoint_2"), saved_params(tmp_path / "dpo" /
                                                                      "checkpoint_3")
  assert all(final[f"reference/{k}"].tobytes() == v.tobytes() for k, v in start.items())


def test_a_teacher_of_another_vocabulary_fails_in_one_line_and_writes_nothing(sft, tmp_path,
                                                                            capsys):
  model_dir = tmp_path / "student"
  assert train.main([MODEL, "--gin_file=gin_configs/posttrain/distill.gin", *SMALL,
                     "--gin.teacher/t5.T5Config.vocab_size=16384",
                     f"--gin.TEACHER_CHECKPOINT_PATH={sft['tiny']}",
                     f"--gin.MODEL_DIR={model_dir}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("error: the teacher model has another vocabulary than the trained model: "
                     "8100 tokens in 16384 embeddings vs 8100 in 8192 (both must read the same "
                     "token ids)"), err[-1]
  assert not model_dir.exists()


def test_a_precomputed_reference_trains_as_the_reference_in_the_run(sft, tmp_path, caplog,
                                                                   monkeypatch):
  """precompute_reference writes every pair with the reference's log-likelihoods (its
  progress shown); DPO on that task with no reference in the run reports what DPO with the
  frozen copy does."""
  out = tmp_path / "reference"
  start = f"--gin.INITIAL_CHECKPOINT_PATH={sft['tiny']}"
  monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
  caplog.set_level(logging.INFO, logger="t5xlike.progress")
  # (Scored 128 pairs per call: a pair's log-likelihoods do not depend on its batch.)
  assert precompute_reference.main([
      MODEL, "--gin_file=gin_configs/posttrain/precompute_reference.gin", *SMALL, PAIRS, start,
      "--gin.BATCH_SIZE=128", "--name=pref_ref", f"--output_dir={out}"]) == 0
  manifest = json.loads((out / "pref_ref" / "selection.json").read_text())
  assert manifest["score"] == "reference_logp" and manifest["step"] == 2
  shown = [re.fullmatch(r"reference: scoring: ([\d,]+) / ([\d,]+) examples .*", r.getMessage())
           for r in caplog.records if r.name == "t5xlike.progress"]
  assert shown and all(shown)
  # Each side of each split counted to its end: the train pairs, the 300 validation pairs.
  assert {m[2] for m in shown if m[1] == m[2]} == {f"{manifest['num_examples']:,}", "300"}
  for split in ("train", "validation"):
    cached = sources.CachedSource(out / "pref_ref" / split)
    example = cached[0]
    assert {"inputs", "chosen", "rejected", "reference_chosen_logp",
            "reference_rejected_logp"} <= set(example)
    assert example["reference_chosen_logp"].dtype == np.float32
    assert example["reference_chosen_logp"] < 0 and example["reference_rejected_logp"] < 0
  run = ["--gin.TRAIN_STEPS=4", "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=1",
         "--gin.LEARNING_RATE=0.01", "--gin.CHECKPOINT_PERIOD=4", start]
  assert dpo("dpo.gin", tmp_path / "in_run", *run) == 0
  assert dpo("dpo.gin", tmp_path / "precomputed", *run,
             "--gin_file=gin_configs/posttrain/precomputed_reference.gin",
             "--gin.MIXTURE_OR_TASK_NAME='pref_ref'", f"--gin.TASK_CACHE_DIR={out}") == 0
  for kind in ("train", "eval"):
    want, got = rows(tmp_path / "in_run", kind), rows(tmp_path / "precomputed", kind)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
      for key in ("loss", "chosen_reward", "rejected_reward", "logp_accuracy"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (kind, key)
      if a["step"] > 3:  # At step 3 the policy is the reference: every reward is a tie (0
        # in the run, float rounding of 0 precomputed), which the accuracy counts as 1/2.
        assert b["accuracy"] == a["accuracy"], kind
      assert "kl_to_reference" not in b
  a, b = (saved_params(tmp_path / name / "checkpoint_4") for name in ("in_run", "precomputed"))
  assert set(b) == {k for k in a if not k.startswith("reference/")}  # one model in the run
  for key, value in b.items():
    np.testing.assert_allclose(value, a[key], atol=1e-5, err_msg=key)


@pytest.mark.parametrize("override, culprit", [
    ("--gin.MIXTURE_OR_TASK_NAME='pref_continue_sft'",
     "lacks the pairwise field(s) ['chosen', 'rejected']"),
    ("--gin.INITIAL_CHECKPOINT_PATH=/nonexistent/checkpoint_3", "INITIAL_CHECKPOINT_PATH: "),
    ("--name=pref continue", "--name='pref continue': use letters"),
])
def test_precompute_reference_errors_are_one_line_and_write_nothing(sft, tmp_path, capsys,
                                                                    override, culprit):
  out = tmp_path / "reference"
  assert precompute_reference.main([
      MODEL, "--gin_file=gin_configs/posttrain/precompute_reference.gin", *SMALL, PAIRS,
      f"--gin.INITIAL_CHECKPOINT_PATH={sft['tiny']}", "--name=pref_ref",
      f"--output_dir={out}", override]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and culprit in err[-1], err[-1]
  assert not out.exists()
