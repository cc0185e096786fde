"""Reliability (issue #11): signals, kill -9, corrupt checkpoints, NaN policies, disk full,
bad input.

Default tests run `python -m t5xlike.train` in-process on the quickstart config
shrunk to batch 4 and lengths 32/8 (one compilation per run; one baseline run
per module); fast variants of the drill's subprocess cases (a real kill -9 then a
bitwise-equal resume, NaN skip with rollback, SIGTERM to one of two gloo
processes) on the same 6-step run. `slow` tests run every case of
`scripts/fault_drill.py` in subprocesses, including kill -9 at seeded random steps.
"""
import errno
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from t5xlike import checkpoints, errors, metrics, train
from t5xlike.training import nan_policy, preemption
from t5xlike.training.fault_hooks import FaultHooks

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--gin_file=gin_configs/quickstart.gin", "--gin.BATCH_SIZE=4",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.LOG_PERIOD=1",
         "--gin.EVAL_PERIOD=None", "--gin.CHECKPOINT_PERIOD=3", "--gin.TRAIN_STEPS=6",
         "--gin.CheckpointConfig.async_save=False"]


def _load_drill():
  spec = importlib.util.spec_from_file_location("fault_drill", REPO / "scripts" / "fault_drill.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["fault_drill"] = module  # (dataclasses look their module up)
  spec.loader.exec_module(module)
  return module


drill = _load_drill()


#: Loads the fault hooks (no fault until FAULT_NAN_AT_STEPS / FAULT_ENOSPC_AT_STEPS are set).
FAULTS = [f"--gin_file={REPO / 'tests' / 'gin' / 'fault_hooks.gin'}"]


def run(model_dir, *overrides):
  return train.main(SMALL + [f"--gin.MODEL_DIR={model_dir}", *overrides])


def losses(model_dir):
  return [(r["step"], r["loss"]) for r in drill.rows(pathlib.Path(model_dir))]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("baseline")
  assert run(model_dir) == 0
  return model_dir


# -- units (no compilation) ----------------------------------------------------------
def test_rewind_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
  writer = metrics.MetricsWriter(tmp_path)
  for step in range(1, 7):
    writer.write_train(step, {"loss": float(step)})
  writer.write_eval(3, "task", {"loss": 0.5})
  writer.write_eval(6, "task", {"loss": 0.25})
  with (tmp_path / "metrics" / "train.jsonl").open("a") as f:
    f.write('{"step": 7, "lo')  # What kill -9 in the middle of an append leaves.
  writer.rewind(3)
  writer.close()
  train_rows = [json.loads(l) for l in (tmp_path / "metrics" / "train.jsonl").read_text()
                .splitlines()]
  assert train_rows == [{"step": s, "loss": float(s)} for s in (1, 2, 3)]
  eval_rows = (tmp_path / "metrics" / "eval.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in eval_rows] == [3]


def test_guard_turns_sigterm_and_sigint_into_a_stop_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not guard.signum and time.time() < deadline:
      time.sleep(0.01)
    assert guard.should_stop(2) and guard.stopped(2).exit_code == 0
  assert signal.getsignal(signal.SIGTERM) is before
  with preemption.PreemptionGuard() as guard:
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.time() + 5
    while not guard.signum and time.time() < deadline:
      time.sleep(0.01)
    stopped = guard.stopped(9)
  assert (stopped.exit_code, stopped.step, stopped.signum) == (130, 9, signal.SIGINT)


@pytest.mark.parametrize("action, rollback, culprit", [
    ("ignore", None, "nan_policy"), ("stop", 3, "nan_rollback_after"),
    ("skip", 0, "nan_rollback_after")])
def test_nan_policy_refuses_bad_settings(action, rollback, culprit):
  with pytest.raises(errors.ConfigError, match=culprit):
    nan_policy.NanPolicy(action, rollback)


def _window(flags, losses_):
  return [(i + 1, {"nonfinite": np.int32(f), "loss": np.float32(l), "grad_norm": np.float32(1)})
          for i, (f, l) in enumerate(zip(flags, losses_))]


def test_watch_stop_names_and_writes_the_first_bad_step():
  written = []
  watch = nan_policy.NonFiniteWatch(nan_policy.NanPolicy("stop"), lambda s, v: written.append(s))
  for step, m in _window([0, 0, 1, 1], [2.0, 1.5, np.nan, np.nan]):
    watch.add(step, m)
  with pytest.raises(nan_policy.NonFiniteLoss, match="loss is nan at step 3"):
    watch.check(logged_step=4)
  assert written == [3]


def test_watch_skip_counts_and_rolls_back_after_k_consecutive():
  written = []
  watch = nan_policy.NonFiniteWatch(nan_policy.NanPolicy("skip", 2),
                                    lambda s, v: written.append((s, v["skipped_steps"])))
  for step, m in _window([1, 0, 1], [np.nan, 1.0, np.inf]):
    watch.add(step, m)
  watch.check(logged_step=3)  # 1 and 3 are bad but not consecutive: no rollback.
  assert watch.skipped == 2 and written == [(1, 1)]  # The loop writes row 3 itself.
  watch.add(4, _window([1], [np.nan])[0][1])
  with pytest.raises(nan_policy.RollBack) as rollback:
    watch.check()
  assert rollback.value.step == 4 and written[-1] == (4, 3)


def _tiny_state(value):
  import jax.numpy as jnp
  return {"step": jnp.asarray(value, jnp.int32), "w": jnp.full((64, 64), float(value))}


def test_truncated_latest_checkpoint_falls_back_and_is_moved_aside(tmp_path, caplog):
  saver = checkpoints.Checkpointer(tmp_path, keep=None, async_save=False)
  for step in (1, 2):
    saver.save(step, _tiny_state(step), {"position": step})
  saver.close()
  drill.truncate_state(tmp_path / "checkpoint_2")
  with pytest.raises(checkpoints.CorruptCheckpoint, match="checkpoint_2 is corrupt"):
    checkpoints.Checkpointer(tmp_path, async_save=False).restore_latest(
        checkpoints.abstract(_tiny_state(0)), strict=True)
  assert (tmp_path / "checkpoint_2").is_dir()  # strict moves nothing
  restorer = checkpoints.Checkpointer(tmp_path, keep=None, async_save=False)
  with caplog.at_level("WARNING"):
    step, state, data = restorer.restore_latest(checkpoints.abstract(_tiny_state(0)))
  assert (step, int(state["step"]), data) == (1, 1, {"position": 1})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((64, 64), 1.0))
  assert "checkpoint step 2 is corrupt" in caplog.text
  assert (tmp_path / "corrupt" / "checkpoint_2").is_dir()
  assert restorer.all_steps() == [1]
  restorer.save(2, _tiny_state(22), {"position": 22})  # The step can be saved again.
  restorer.close()
  assert int(checkpoints.Checkpointer(tmp_path).restore(2, checkpoints.abstract(
      _tiny_state(0)))[0]["step"]) == 22


def test_disk_full_on_save_is_one_error_and_keeps_earlier_steps(tmp_path):
  saver = checkpoints.Checkpointer(tmp_path, keep=None, async_save=False,
                                  before_save=FaultHooks(enospc_at_steps=[2]).before_save)
  saver.save(1, _tiny_state(1), {"position": 1})
  with pytest.raises(checkpoints.CheckpointSaveError, match="No space left") as error:
    saver.save(2, _tiny_state(2), {"position": 2})
  assert isinstance(error.value.__cause__, OSError)
  assert error.value.__cause__.errno == errno.ENOSPC and "checkpoint_1" in str(error.value)
  saver.close()
  assert checkpoints.Checkpointer(tmp_path).restore_latest(
      checkpoints.abstract(_tiny_state(0)))[0] == 1


# -- runs ---------------------------------------------------------------------------
@pytest.mark.parametrize("signum, code", [
    (signal.SIGTERM, 0), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_signal_mid_run_checkpoints_the_step_reached(tmp_path, signum, code):
  train_rows = tmp_path / "metrics" / "train.jsonl"

  def send_when_training():
    deadline = time.time() + 300
    while time.time() < deadline:
      if train_rows.exists() and len(train_rows.read_text().splitlines()) >= 2:
        break
      time.sleep(0.02)
    os.kill(os.getpid(), signum)

  sender = threading.Thread(target=send_when_training, daemon=True)
  sender.start()
  assert run(tmp_path, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000",
             "--gin.LOG_PERIOD=5") == code
  sender.join()
  last = drill.rows(tmp_path)[-1]["step"]
  assert last >= 5 and drill.steps_saved(tmp_path) == [last]
  data = json.loads((tmp_path / f"checkpoint_{last}" / "data" / "metadata").read_text())
  assert data["batches"] == last  # the data iterator's position is in the checkpoint


@pytest.mark.slow  # ~45 s; also a fault-drill case
def test_truncated_newest_checkpoint_falls_back_and_reruns_the_same_steps(
    baseline, tmp_path, capsys, caplog):
  model_dir = tmp_path / "run"
  shutil.copytree(baseline, model_dir)
  drill.truncate_state(model_dir / "checkpoint_6")
  assert run(model_dir, "--gin.RESTORE_STRICT=True") == 1
  assert "checkpoint_6 is corrupt" in capsys.readouterr().err.strip().splitlines()[-1]
  with caplog.at_level("WARNING"):
    assert run(model_dir, "--gin.TRAIN_STEPS=6") == 0
  assert "checkpoint step 6 is corrupt" in caplog.text
  assert (model_dir / "corrupt" / "checkpoint_6").is_dir()
  assert losses(model_dir) == losses(baseline)  # steps 4-6 re-run once, bitwise equal
  assert drill.steps_saved(model_dir) == [3, 6]


def test_nan_stop_names_the_step_and_writes_no_later_checkpoint(tmp_path, capsys):
  assert run(tmp_path, *FAULTS, "--gin.FAULT_NAN_AT_STEPS=[5]", "--gin.LOG_PERIOD=100") == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: loss is nan at step 5") and "Traceback" not in "\n".join(err)
  rows = {r["step"]: r for r in drill.rows(tmp_path)}
  assert sorted(rows) == [1, 5] and rows[5]["loss"] == "nan"  # the bad step's row is written
  assert drill.steps_saved(tmp_path) == [3]


def test_nan_skip_leaves_the_state_bitwise_unchanged(tmp_path):
  assert run(tmp_path, *FAULTS, "--gin.FAULT_NAN_AT_STEPS=[2]", "--gin.NAN_POLICY=skip",
             "--gin.CHECKPOINT_PERIOD=1",
             "--gin.TRAIN_STEPS=3", "--gin.CheckpointConfig.keep=None") == 0
  rows = {r["step"]: r for r in drill.rows(tmp_path)}
  assert rows[2]["loss"] == "nan" and rows[2]["grad_norm"] == "nan"
  assert [rows[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
  one, two, three = (drill.saved_params(tmp_path / f"checkpoint_{s}") for s in (1, 2, 3))
  assert all(one[k].tobytes() == two[k].tobytes() for k in one)  # the update was skipped
  assert any(two[k].tobytes() != three[k].tobytes() for k in two)  # step 3 trained
  assert all(np.isfinite(v).all() for v in three.values())


@pytest.mark.slow  # ~27 s
def test_disk_full_run_exits_in_one_line_and_resumes(baseline, tmp_path, capsys):
  assert run(tmp_path, *FAULTS, "--gin.FAULT_ENOSPC_AT_STEPS=[6]") == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: saving ") and "No space left on device" in err[-1]
  assert "checkpoint_3" in err[-1] and drill.steps_saved(tmp_path) == [3]
  assert run(tmp_path) == 0
  assert losses(tmp_path) == losses(baseline)


def _bad(tmp_path, capsys, *overrides, model_dir=None):
  model_dir = model_dir or tmp_path / "existing"
  model_dir.mkdir(exist_ok=True)
  before = drill.listing(model_dir)
  code = run(model_dir, *overrides)
  err = capsys.readouterr().err.strip().splitlines()
  assert drill.listing(model_dir) == before
  assert "Traceback" not in "\n".join(err)
  return code, err[-1]


def test_checkpoint_of_another_architecture_names_the_parameter(baseline, tmp_path, capsys):
  model_dir = tmp_path / "existing"
  shutil.copytree(baseline / "checkpoint_3", model_dir / "checkpoint_3")
  code, line = _bad(tmp_path, capsys, "--gin.t5.T5Config.mlp_dim=128", model_dir=model_dir)
  assert code == 2 and "checkpoint_3 of another architecture" in line
  assert "mlp/wi_0/kernel: checkpoint (64, 256) vs model (64, 128)" in line


@pytest.mark.parametrize("overrides, culprits", [
    (("--gin.MIXTURE_OR_TASK_NAME='embedded_corpuss'",), ("did you mean 'embedded_corpus'",)),
    (("--gin.MIXTURE_OR_TASK_MODULE='tests.fault_broken_module'",),
     ("tests.fault_broken_module", "t5xlike_no_such_dependency")),
    (("--gin.MIXTURE_OR_TASK_MODULE='tests.fault_tasks'",
      "--gin.MIXTURE_OR_TASK_NAME='fault_empty_train'"),
     ("'fault_empty_train' split 'train' holds no example",)),
    (("--gin.t5.T5Config.vocab_size=1000",), ("1000 embeddings",)),
    (("--gin.NAN_POLICY='sometimes'",), ("NAN_POLICY='sometimes'", "'stop', 'skip'")),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, overrides, culprits):
  code, line = _bad(tmp_path, capsys, *overrides)
  assert code == 2 and line.startswith("error: ")
  for culprit in culprits:
    assert culprit in line, line


def test_model_dir_under_a_file_is_refused(tmp_path, capsys):
  (tmp_path / "plain").write_text("a file")
  assert run(tmp_path / "plain" / "run") == 2
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert f"{tmp_path / 'plain'} is a file, not a directory" in line
  assert (tmp_path / "plain").read_text() == "a file"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_verbose_shows_the_traceback(tmp_path, capsys):
  assert run(tmp_path / "x", "--gin.BATCH_SIZE=0", "--verbose") == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: BATCH_SIZE")


# -- fast variants of the slow drill cases (kill -9, rollback, two processes) -------------
def _env(**extra):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)


def _wait_for_rows(model_dir, count, processes, timeout=600):
  """Until metrics/train.jsonl holds `count` rows (or a process ended, or the timeout);
  whether it does."""
  deadline = time.time() + timeout
  while (time.time() < deadline and len(drill.rows(model_dir)) < count
         and all(p.poll() is None for p in processes)):
    time.sleep(0.02)
  return len(drill.rows(model_dir)) >= count


def test_kill_9_then_the_same_command_resumes_bitwise(baseline, tmp_path):
  """A real SIGKILL of `python -m t5xlike.train` once step 4 is logged, then the run again:
  the rows of steps 1-6 once each with the uninterrupted run's losses, and its final
  parameters, bit for bit. (The drill kills twice at seeded steps: `-m slow`.)"""
  model_dir = tmp_path / "killed"
  # TRAIN_STEPS does not enter the rsqrt schedule: the killed process is still training
  # when the signal arrives however fast it runs.
  process = subprocess.Popen(
      [sys.executable, "-m", "t5xlike.train", *SMALL, f"--gin.MODEL_DIR={model_dir}",
       "--gin.TRAIN_STEPS=100000"], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  training = _wait_for_rows(model_dir, 4, [process])
  process.kill()
  _, err = process.communicate()
  assert training and process.returncode == -signal.SIGKILL, err[-3000:]
  restored = max(drill.steps_saved(model_dir))
  assert restored in (3, 6)  # (6 only when the save of step 6 outran the kill)
  assert run(model_dir) == 0
  assert losses(model_dir) == losses(baseline)  # JSON floats round-trip exactly
  a, b = (drill.saved_params(d / "checkpoint_6") for d in (baseline, model_dir))
  assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.slow  # ~20 s; NaN stop and skip stay
def test_nan_rollback_restores_the_checkpoint_and_rewinds_the_rows(baseline, tmp_path, caplog):
  """NaN at steps 4 and 5 with NAN_POLICY=skip, NAN_ROLLBACK_AFTER=2: back to checkpoint_3
  (the bad rows rewound), steps 4-6 trained again on the batches after the bad ones."""
  with caplog.at_level("WARNING"):
    assert run(tmp_path, *FAULTS, "--gin.FAULT_NAN_AT_STEPS=[4, 5]", "--gin.NAN_POLICY=skip",
               "--gin.NAN_ROLLBACK_AFTER=2") == 0
  assert f"rolling back to {tmp_path / 'checkpoint_3'} (the data continues after step 5)" in (
      caplog.text)
  got = losses(tmp_path)
  assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]  # once each: the NaN rows were rewound
  assert all(isinstance(loss, float) and np.isfinite(loss) for _, loss in got)
  assert got[:3] == losses(baseline)[:3]
  a, b = (drill.saved_params(d / "checkpoint_3") for d in (baseline, tmp_path))
  assert all(a[k].tobytes() == b[k].tobytes() for k in a)
  # Steps 4-6 trained from checkpoint_3 on batches 6-8 (the two bad batches are not re-read).
  data = json.loads((tmp_path / "checkpoint_6" / "data" / "metadata").read_text())
  assert data["batches"] == 8
  assert all(loss != losses(baseline)[step - 1][1] for step, loss in got[3:])


# The default run's multi-process test (jax.distributed, gloo): ~68 s; the loss-for-loss
# comparison with one process is test_multidevice_runs' (-m slow, ~190 s).
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_fast(tmp_path):
  """Two processes (jax.distributed on 127.0.0.1, gloo CPU collectives, one device each):
  only process 1 is signalled; both stop after the same step, which is the one
  checkpoint they save together. (Two devices per process: `-m slow`.)"""
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  args = SMALL + [f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=100000",
                  "--gin.CHECKPOINT_PERIOD=100000", "--gin.LOG_PERIOD=1",
                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "-m", "t5xlike.train", *args, f"--process_id={i}"],
                            env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    # (A signal before the loop starts has its default effect: wait for step 2.)
    assert _wait_for_rows(tmp_path, 2, procs), [p.poll() for p in procs]
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  train_rows = drill.rows(tmp_path)
  last = train_rows[-1]["step"]
  assert [r["step"] for r in train_rows] == list(range(1, last + 1)) and last >= 2
  assert drill.steps_saved(tmp_path) == [last]
  assert json.loads((tmp_path / f"checkpoint_{last}" / "data" / "metadata").read_text())[
      "batches"] == last
  assert "SIGTERM received" in outputs[1] and "SIGTERM received" not in outputs[0]
  for out in outputs:  # process 0 learns of the signal from the collective check
    assert re.search(rf"stopped by SIGTERM after step {last}\b", out), out[-3000:]


# -- the drill (subprocesses) ----------------------------------------------------------
@pytest.fixture(scope="module")
def drill_run(tmp_path_factory):
  return drill.Drill(tmp_path_factory.mktemp("drill"))


@pytest.mark.slow
@pytest.mark.parametrize("case", drill.CASES, ids=[c.name for c in drill.CASES])
def test_fault_drill_case(drill_run, case):
  """Every case of the drill: bad inputs (exit code, message, nothing written), signals,
  kill -9 at seeded random steps (losses and final parameters bitwise equal), corrupt
  checkpoints, NaN policies, disk full."""
  observed, ok = case.run(drill_run)
  assert ok, observed


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """Two processes (gloo on 127.0.0.1, 2 CPU devices each): only process 1 is signalled;
  both stop after the same step and save one checkpoint of it together."""
  import socket
  import subprocess
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  args = SMALL + [f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=100000",
                  "--gin.CHECKPOINT_PERIOD=100000", "--gin.LOG_PERIOD=5",
                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "-m", "t5xlike.train", *args, f"--process_id={i}"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  deadline = time.time() + 600
  while time.time() < deadline and len(drill.rows(tmp_path)) < 2:
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in procs]
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
  last = drill.rows(tmp_path)[-1]["step"]
  assert drill.steps_saved(tmp_path) == [last] and last >= 5
