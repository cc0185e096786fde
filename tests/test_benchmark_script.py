"""scripts/benchmark.py: one-line errors for bad flags; the JSON line (slow: a real run)."""
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"


def run(*flags):
  return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True,
                        cwd=REPO, check=False, timeout=900)


@pytest.mark.parametrize("flag,culprit", [("--config=t5_9000", "t5_9000"),
                                          ("--mesh_shape=model:2", "model:2")])
def test_bad_flags_give_one_line_errors(flag, culprit):
  proc = run(flag)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("benchmark.py: error:") and culprit in lines[0]
  assert proc.stdout == ""


@pytest.mark.slow
def test_json_line_of_a_short_run():
  proc = run("--config=t5x_tiny", "--steps=2", "--warmup=1", "--batch_size=2",
             "--inputs_length=64", "--targets_length=16")
  assert proc.returncode == 0, proc.stderr[-2000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ("config", "batch_size", "inputs_length", "targets_length", "dtype", "compile_s",
              "step_time_s", "step_time_p90_s", "tokens_per_second", "tflops_per_device",
              "mfu", "peak_memory_bytes", "device", "versions"):
    assert key in row, key
  assert row["config"] == "t5x_tiny" and row["steps"] == 2
  # Packed span corruption: real tokens below the padded positions.
  assert 0 < row["tokens_per_second"] <= row["padded_tokens_per_second"]
  assert row["tflops_per_device"] == pytest.approx(
      row["model_flops_per_step"] / row["step_time_s"] / 1e12)
