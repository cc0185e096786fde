"""Warmup-stable-decay and the Power scheduler against their papers' formulas (float64),
their errors, and a WSD decay branched off a stable run's checkpoint."""
import json
import math
import pathlib

import numpy as np
import pytest

from t5xlike import errors, optim, train

SHAPES = {  # f(x) on the decay fraction x, end factor r
    "exponential": lambda x, r: r ** x,
    "linear": lambda x, r: 1 - (1 - r) * x,
    "cosine": lambda x, r: r + (1 - r) * (1 + math.cos(math.pi * x)) / 2,
    "1-sqrt": lambda x, r: 1 - (1 - r) * math.sqrt(x),
}


def wsd_reference(s, eta, warmup, decay, total, shape, r):
  """MiniCPM section 4.2: s/W eta, eta, f(s - T) eta with T = total - decay (step s >= 1)."""
  stable_end = total - decay
  if decay and s > stable_end:
    return eta * SHAPES[shape](min(1.0, (s - stable_end) / decay), r)
  if warmup and s <= warmup:
    return eta * s / warmup
  return eta


def power_reference(s, batch, row, a, b, eta_max, warmup, decay, total, shape, r):
  """Power scheduler section 4 over tokens n = s * batch * row."""
  law = lambda step: min(eta_max, batch * a * (step * batch * row) ** b)
  stable_end = total - decay
  if decay and s > stable_end:
    return law(stable_end) * SHAPES[shape](min(1.0, (s - stable_end) / decay), r)
  if warmup and s <= warmup:
    return law(warmup) * s / warmup
  return law(s)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_wsd_rate_is_minicpm_formula(shape):
  schedule = optim.warmup_stable_decay(peak_learning_rate=0.03, warmup_steps=10,
                                       decay_steps=20, train_steps=100, decay_shape=shape,
                                       end_factor=0.1)
  steps = np.array([1, 5, 9, 10, 11, 50, 79, 80, 81, 85, 90, 99, 100, 101, 130])
  got = np.asarray([float(schedule(s - 1)) for s in steps])  # optax's count = step - 1
  want = np.array([wsd_reference(s, 0.03, 10, 20, 100, shape, 0.1) for s in steps])
  np.testing.assert_allclose(got, want, rtol=2e-6)
  assert got[steps == 80][0] == pytest.approx(0.03) and got[-2] == pytest.approx(0.003)


def test_wsd_without_decay_stays_at_the_peak_after_warmup():
  schedule = optim.warmup_stable_decay(peak_learning_rate=0.5, warmup_steps=4)
  assert [float(schedule(c)) for c in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
  assert float(schedule(10**7)) == 0.5


@pytest.mark.parametrize("warmup, decay, shape", [(0, 0, "exponential"), (1000, 0, "linear"),
                                                  (1000, 3000, "exponential"),
                                                  (50, 500, "1-sqrt")])
def test_power_rate_is_the_papers_law(warmup, decay, shape):
  args = dict(batch_size=32, tokens_per_example=157, a=4.6, b=-0.51, max_learning_rate=0.02,
              warmup_steps=warmup, decay_steps=decay, decay_shape=shape, end_factor=0.1)
  schedule = optim.power(train_steps=10_000, **args)
  steps = np.array([1, 2, 10, 49, 50, 51, 999, 1000, 1001, 5000, 7000, 7001, 8500, 10_000])
  got = np.asarray([float(schedule(s - 1)) for s in steps])
  want = np.array([power_reference(s, 32, 157, 4.6, -0.51, 0.02, warmup, decay, 10_000, shape,
                                   0.1) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if not warmup:
    assert got[0] == pytest.approx(0.02)  # 32 * 4.6 * 5024^-0.51 = 1.9 > eta_max: capped
  assert np.all(np.diff(got[steps > max(warmup, 1)]) <= 0)  # falls with tokens seen


def test_power_takes_the_feature_lengths_as_the_row():
  by_map = optim.power(batch_size=8, tokens_per_example={"inputs": 100, "targets": 28})
  by_int = optim.power(batch_size=8, tokens_per_example=128)
  assert [float(by_map(c)) for c in (0, 99, 9999)] == [float(by_int(c)) for c in (0, 99, 9999)]


@pytest.mark.parametrize("factory, kwargs, match", [
    (optim.warmup_stable_decay, dict(warmup_steps=60, decay_steps=50, train_steps=100),
     r"warmup \(60 steps\) and decay \(50 steps\) do not fit TRAIN_STEPS=100"),
    (optim.warmup_stable_decay, dict(decay_steps=5), r"needs train_steps"),
    (optim.warmup_stable_decay, dict(decay_shape="step"), r"decay_shape='step'"),
    (optim.warmup_stable_decay, dict(end_factor=0.0), r"end_factor=0.0"),
    (optim.power, dict(batch_size=8, tokens_per_example=0), r"tokens_per_example=0"),
])
def test_bad_phases_are_config_errors(factory, kwargs, match):
  with pytest.raises(errors.ConfigError, match=match):
    factory(**kwargs)


def _rows(model_dir):
  path = pathlib.Path(model_dir) / "metrics" / "train.jsonl"
  return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


TINY = ["--gin_file=gin_configs/quickstart.gin", "--gin_file=gin_configs/schedules/wsd.gin",
        "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
        "--gin.EVAL_PERIOD=None", "--gin.LOG_PERIOD=1", "--gin.WSD_WARMUP_STEPS=2",
        "--gin.WSD_PEAK_LEARNING_RATE=0.05"]


def test_decay_branched_off_a_stable_checkpoint_continues_its_state_and_data(tmp_path, caplog):
  """A stable run to step 6 (checkpoints 4 and 6) and a decay branched off its step 4:
  step 5 sees the same state and batch in both (bitwise-equal loss), the optimizer state
  goes on (Adafactor's factored moments: step 5's update of the stable run is repeated
  exactly when the rate is), then the rates part."""
  stable, branch = tmp_path / "stable", tmp_path / "decay"
  assert train.main([*TINY, f"--gin.MODEL_DIR={stable}", "--gin.TRAIN_STEPS=6",
                     "--gin.CHECKPOINT_PERIOD=4"]) == 0
  assert train.main([*TINY, "--gin_file=gin_configs/schedules/wsd_decay.gin",
                     f"--gin.MODEL_DIR={branch}", "--gin.TRAIN_STEPS=6",
                     "--gin.WSD_DECAY_STEPS=2",
                     f"--gin.INITIAL_CHECKPOINT_PATH={stable}/checkpoint_4"]) == 0
  assert any("its parameters and optimizer state" in m and "data goes on" in m
             for m in caplog.messages), caplog.messages
  a, b = _rows(stable), _rows(branch)
  assert sorted(b) == [5, 6]
  assert b[5]["loss"] == a[5]["loss"]  # parameters, optimizer state and data position go on
  assert [a[s]["learning_rate"] for s in (5, 6)] == pytest.approx([0.05, 0.05])
  assert [b[s]["learning_rate"] for s in (5, 6)] == pytest.approx(
      [0.05 * 0.1 ** 0.5, 0.05 * 0.1])
  assert b[6]["loss"] != a[6]["loss"]  # the decayed step-5 update differs
  # A branch with no decay is the stable run itself, to the bit: nothing was reset.
  same = tmp_path / "same"
  assert train.main([*TINY, "--gin_file=gin_configs/schedules/wsd_decay.gin",
                     f"--gin.MODEL_DIR={same}", "--gin.TRAIN_STEPS=6", "--gin.WSD_DECAY_STEPS=0",
                     f"--gin.INITIAL_CHECKPOINT_PATH={stable}/checkpoint_4"]) == 0
  assert [_rows(same)[s]["loss"] for s in (5, 6)] == [a[5]["loss"], a[6]["loss"]]


def test_a_decay_that_does_not_fit_train_steps_is_one_line_exit_2(tmp_path, capsys):
  code = train.main([*TINY, f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.TRAIN_STEPS=10",
                     "--gin.WSD_DECAY_STEPS=12"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "do not fit TRAIN_STEPS=10" in err[0], err
  assert not (tmp_path / "run").exists()
