"""Architecture / objective adaptation (Wang et al. 2022 §5): noncausal_mlm.gin ->
lm_adaptation.gin (LM-A) -> noncausal_mlm_adaptation.gin (NC-A), chained through
INITIAL_CHECKPOINT_PATH on the decoder-only tiny model.

The chain runs once per module at tiny lengths (two runs; NC-A's run is a third, ~11 s
on the loaded 2-core box; the first run of a process also pays the imports); the loss
curves of the full-length runs are measured in docs/objectives.md.
"""
import json
import pathlib

import gin
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5xlike import train
from t5xlike.cli import gin_config
from t5xlike.data import feature_converters

TINY = {"noncausal_mlm": "{'inputs': 24, 'targets': 8}",
        "noncausal_mlm_adaptation": "{'inputs': 24, 'targets': 8}",
        "lm_adaptation": "{'targets': 32}", "span_corruption": "{'inputs': 24, 'targets': 8}"}


def args(name, model_dir, *extra):
  return [f"--gin_file=gin_configs/objectives/{name}.gin", f"--gin.MODEL_DIR={model_dir}",
          f"--gin.TASK_FEATURE_LENGTHS={TINY[name]}", "--gin.BATCH_SIZE=4",
          "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=None", "--gin.CHECKPOINT_PERIOD=100", *extra]


def rows(model_dir):
  text = (pathlib.Path(model_dir) / "metrics" / "train.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines()]


def flat_params(step_dir):
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(pathlib.Path(step_dir) / "state")["params"]
  out = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}/")
      else:
        out[f"{prefix}{key}"] = np.asarray(value)
  walk(params, "")
  return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """Stage 1: non-causal MLM, 2 steps. LM-A from its checkpoint to step 3 at learning rate 0
  (the parameters cannot move, so its checkpoint shows what it started from)."""
  root = tmp_path_factory.mktemp("adaptation")
  assert train.main(args("noncausal_mlm", root / "mlm", "--gin.TRAIN_STEPS=2")) == 0
  assert train.main(args("lm_adaptation", root / "lma", "--gin.TRAIN_STEPS=3",
                         f"--gin.INITIAL_CHECKPOINT_PATH={root / 'mlm' / 'checkpoint_2'}",
                         "--gin.optim.rsqrt_with_warmup.base_learning_rate=0.0")) == 0
  return root


def test_adaptation_starts_from_the_pretrained_parameters_bitwise(chain):
  pretrained = flat_params(chain / "mlm" / "checkpoint_2")
  adapted = flat_params(chain / "lma" / "checkpoint_3")
  assert adapted.keys() == pretrained.keys()
  for name, value in pretrained.items():
    assert value.dtype == adapted[name].dtype and np.array_equal(value, adapted[name]), name
  # The step count goes on from the checkpoint (continued pretraining, not a new run).
  assert [r["step"] for r in rows(chain / "lma")] == [3]
  assert rows(chain / "lma")[0]["learning_rate"] == 0.0


def test_reverse_adaptation_continues_and_trains(chain):
  """NC-A from the (causal) LM-A checkpoint to step 5 at the config's learning rate."""
  assert train.main(args("noncausal_mlm_adaptation", chain / "nca", "--gin.TRAIN_STEPS=5",
                         f"--gin.INITIAL_CHECKPOINT_PATH={chain / 'lma' / 'checkpoint_3'}")) == 0
  found = rows(chain / "nca")
  assert [r["step"] for r in found] == [4, 5]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in found)
  assert sorted(p.name for p in (chain / "nca").glob("checkpoint_*")) == ["checkpoint_5"]
  before = flat_params(chain / "lma" / "checkpoint_3")
  after = flat_params(chain / "nca" / "checkpoint_5")
  assert after.keys() == before.keys()
  assert any(not np.array_equal(before[k], after[k]) for k in before)
  # Causal LM scores every position of the 32-token rows; the MLM only the targets.
  assert rows(chain / "lma")[0]["target_tokens"] == 4 * 32
  assert all(r["target_tokens"] <= 4 * 8 for r in found)


def configured(name):
  """(objective, TASK_FEATURE_LENGTHS, TRAIN_STEPS, require_initial_checkpoint) of a gin."""
  gin_config.configure([f"objectives/{name}.gin"])
  try:
    objective = gin.query_parameter("train_run.train.objective").scoped_configurable_fn()
    try:
      required = gin.query_parameter("run_config.CheckpointConfig.require_initial_checkpoint")
    except ValueError:  # (not bound: the dataclass default, False)
      required = False
    return (objective, gin.query_parameter("%TASK_FEATURE_LENGTHS"),
            gin.query_parameter("%TRAIN_STEPS"), required)
  finally:
    gin.clear_config()


VOCAB, EOS = 8192, 1


def _batch(name, seed=0, rows_=8):
  objective, lengths, _, _ = configured(name)
  rng = np.random.default_rng(seed)
  raw_length = objective.raw_length(lengths)
  raws = [rng.integers(2, 8000, raw_length).astype(np.int32) for _ in range(rows_)]
  examples = [objective.transform(raw, np.random.default_rng(seed + i), vocab_size=VOCAB,
                                  eos_id=EOS) for i, raw in enumerate(raws)]
  return raws, examples, feature_converters.decoder_batch(examples, lengths), lengths


def _uncorrupt(inputs, targets):
  """NumPy reference: each sentinel of the inputs replaced by the tokens after the same
  sentinel in the targets (T5's span layout), EOS dropped."""
  spans, current = {}, None
  for token in targets[:-1]:
    if token >= VOCAB - 100:
      current = int(token)
      spans[current] = []
    else:
      spans[current].append(int(token))
  out = []
  for token in inputs[:-1]:
    out.extend(spans[int(token)] if token >= VOCAB - 100 else [int(token)])
  return np.array(out)


def test_noncausal_stage_layout():
  """MLM as a non-causal decoder: the corrupted text (+ EOS) is the bidirectional prefix,
  the spans after their sentinels are the causal, scored targets, as one row."""
  for name in ("noncausal_mlm", "noncausal_mlm_adaptation"):
    raws, examples, batch, lengths = _batch(name)
    assert lengths == {"inputs": 104, "targets": 24}
    length = lengths["inputs"] + lengths["targets"]
    assert batch["decoder_target_tokens"].shape == (len(raws), length) == (8, 128)
    positions = np.arange(length)
    for row, (raw, ex) in enumerate(zip(raws, examples)):
      width, span_tokens = len(ex["inputs"]), len(ex["targets"])
      assert ex["inputs"][-1] == EOS and ex["targets"][-1] == EOS
      assert ex["targets"][0] == VOCAB - 1  # the first sentinel opens the targets
      np.testing.assert_array_equal(_uncorrupt(ex["inputs"], ex["targets"]), raw)
      noise = len(raw) - (width - 1 - int((ex["inputs"] >= VOCAB - 100).sum()))
      assert noise == round(0.15 * len(raw))  # 17 of 114
      expected = np.zeros(length, np.int64)
      expected[:width + span_tokens] = np.concatenate([ex["inputs"], ex["targets"]])
      np.testing.assert_array_equal(batch["decoder_target_tokens"][row], expected)
      np.testing.assert_array_equal(batch["decoder_input_tokens"][row],
                                    np.concatenate([[0], expected[:-1]]))
      np.testing.assert_array_equal(batch["decoder_causal_attention"][row],
                                    (positions <= width).astype(np.int32))
      np.testing.assert_array_equal(
          batch["decoder_loss_weights"][row],
          ((positions >= width) & (positions < width + span_tokens)).astype(np.float32))


def test_causal_stage_layout():
  """Full LM as a causal decoder: every token of the 128-token chunk scored, no
  bidirectional prefix (the model then attends causally everywhere)."""
  for name in ("causal_lm", "lm_adaptation"):
    raws, _, batch, lengths = _batch(name)
    assert lengths == {"targets": 128}
    assert "decoder_causal_attention" not in batch
    np.testing.assert_array_equal(batch["decoder_target_tokens"], np.stack(raws))
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], np.stack(raws)[:, :-1])
    assert (batch["decoder_input_tokens"][:, 0] == 0).all()
    assert (batch["decoder_loss_weights"] == 1.0).all()


def test_adaptation_configs_continue_a_checkpoint():
  for name in ("lm_adaptation", "noncausal_mlm_adaptation"):
    _, _, steps, required = configured(name)
    assert required is True and steps == 450  # 150 steps after _short_run.gin's 300
  for name in ("causal_lm", "noncausal_mlm"):
    assert configured(name)[2:] == (300, False)


@pytest.mark.parametrize("name", ["lm_adaptation", "noncausal_mlm_adaptation"])
def test_adaptation_needs_a_checkpoint(name, tmp_path, capsys):
  assert train.main(args(name, tmp_path / "run")) == 2
  assert "INITIAL_CHECKPOINT_PATH" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # ~27 s; the missing-checkpoint errors stay in the default run
def test_encoder_decoder_checkpoint_is_refused(tmp_path, capsys):
  """A T5 encoder-decoder checkpoint chained into the decoder-only adaptation: one line,
  exit 2, nothing written."""
  assert train.main(args("span_corruption", tmp_path / "t5", "--gin.TRAIN_STEPS=1")) == 0
  capsys.readouterr()
  assert train.main(args("lm_adaptation", tmp_path / "run",
                         f"--gin.INITIAL_CHECKPOINT_PATH={tmp_path / 't5' / 'checkpoint_1'}")) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "does not fit the model" in err, err
  assert not (tmp_path / "run").exists()
