"""The train entry point on 8 CPU devices: two processes, restore under another mesh.

Every run is a subprocess (`python -m t5xlike.train`), because the device
count and `jax.distributed` are fixed when JAX starts.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["--gin_file=gin_configs/quickstart.gin", "--gin.BATCH_SIZE=8", "--gin.LOG_PERIOD=1",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.EVAL_PERIOD=None",
          "--gin.CHECKPOINT_PERIOD=2"]


def command(model_dir, mesh, rules, *extra, steps=4):
  return [sys.executable, "-m", "t5xlike.train", *COMMON, f"--gin.MODEL_DIR={model_dir}",
          f"--gin.TRAIN_STEPS={steps}", f"--gin.MESH_SHAPE={mesh}",
          f"--gin.LOGICAL_AXIS_RULES={rules}", *extra]


def env(devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def train(model_dir, mesh, rules, devices=8, steps=4):
  result = subprocess.run(command(model_dir, mesh, rules, steps=steps), env=env(devices),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def losses(model_dir):
  path = pathlib.Path(model_dir) / "metrics" / "train.jsonl"
  return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process, 8 devices, data=8: steps 1-5, checkpoints at 2, 4 and 5."""
  model_dir = tmp_path_factory.mktemp("reference")
  train(model_dir, "{'data': 8}", "data_parallel", steps=5)
  return model_dir


@pytest.mark.slow  # ~190 s with its 8-device reference; test_reliability's two-process
# SIGTERM test keeps jax.distributed in the default run
def test_two_processes_match_one(reference, tmp_path):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen(
      command(tmp_path, "{'data': 2, 'fsdp': 2, 'tensor': 2}", "data_fsdp_tensor",
              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={i}"), env=env(4), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
  assert "step 4/4" in outputs[0][0] and "step 4/4" not in outputs[1][0]  # process 0 reports
  ref, got = losses(reference), losses(tmp_path)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)],
                             rtol=1e-5)
  assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_2",
                                                                   "checkpoint_4"]
  # The 2-process checkpoint resumes in 1 process on another mesh: same step 5.
  train(tmp_path, "{'fsdp': 8}", "fsdp", steps=5)
  assert losses(tmp_path)[5] == pytest.approx(ref[5], rel=1e-5)


@pytest.mark.parametrize("mesh, rules, devices", [
    # The two-process test also resumes its checkpoint in one process on another mesh.
    pytest.param("{'fsdp': 4, 'tensor': 2}", "data_fsdp_tensor", 8, marks=pytest.mark.slow),
    pytest.param("{'data': 1}", "data_parallel", 1, marks=pytest.mark.slow),  # ~45 s
])
def test_restore_under_another_mesh(reference, tmp_path, mesh, rules, devices):
  model_dir = tmp_path / "run"
  shutil.copytree(reference, model_dir)
  for step in (4, 5):
    shutil.rmtree(model_dir / f"checkpoint_{step}")
  shutil.rmtree(model_dir / "metrics")
  train(model_dir, mesh, rules, devices)  # resumes from checkpoint_2 saved on data=8
  ref, got = losses(reference), losses(model_dir)
  assert sorted(got) == [3, 4]
  np.testing.assert_allclose([got[3], got[4]], [ref[3], ref[4]], rtol=1e-5)
