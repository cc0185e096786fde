"""scripts/replicate/: the runner (resume, one-line failures) and each experiment's --fast
pipeline end to end (slow: several public-command runs each; the mechanics, not the
findings, which docs/replications.md reports from the full runs)."""
import importlib.util
import json
import pathlib
import sys

import pytest

REPLICATE = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "replicate"


def load(name: str):
  sys.path.insert(0, str(REPLICATE))
  spec = importlib.util.spec_from_file_location(f"replicate_{name}", REPLICATE / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


protocol = load("protocol")


def test_a_finished_run_is_kept_and_a_failing_one_is_one_line(tmp_path, capsys):
  runs = protocol.Runs(tmp_path, total=2)
  done = tmp_path / "kept"
  done.mkdir()
  command = ["python", "-m", "t5xlike.train", "--gin_file=gin_configs/missing.gin",
             f"--gin.MODEL_DIR='{done}'"]
  (done / ".done").write_text(json.dumps({"command": command}) + "\n")
  assert runs.train("kept", ["gin_configs/missing.gin"], {}) == done  # not run again
  with pytest.raises(SystemExit, match=r"run broken failed \(exit 2; log .*broken.log\): "):
    runs.train("broken", ["gin_configs/missing.gin"], {"TRAIN_STEPS": 3})
  assert not (tmp_path / "broken").exists()  # its partial output is removed
  log = (tmp_path / "logs" / "broken.log").read_text()
  assert "--gin.MODEL_DIR=" in log.splitlines()[0] and "--gin.TRAIN_STEPS=3" in log
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "[1/2] kept: done before, kept" and out[1].startswith("[2/2] broken: running")
  # The same name made by another command (other bindings) is not taken for it.
  with pytest.raises(SystemExit, match="run kept failed"):
    runs.train("kept", ["gin_configs/missing.gin"], {"TRAIN_STEPS": 5})
  assert not done.exists()


def test_eval_rows_and_last_checkpoint(tmp_path):
  (tmp_path / "metrics").mkdir()
  rows = [{"step": 10, "task": "a", "loss": 2.0}, {"step": 20, "task": "a", "loss": 1.0},
          {"step": 20, "task": "b", "loss": 3.0}]
  (tmp_path / "metrics" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert protocol.eval_rows(tmp_path) == {"a": rows[1], "b": rows[2]}
  assert protocol.eval_rows(tmp_path, step=10) == {"a": rows[0]}
  for step in (5, 40, 300):
    (tmp_path / f"checkpoint_{step}").mkdir()
  assert protocol.last_checkpoint(tmp_path).name == "checkpoint_300"
  with pytest.raises(SystemExit, match="no checkpoint"):
    protocol.last_checkpoint(tmp_path / "metrics")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["soups", "forgetting", "electra_vs_mlm", "ul2_vs_sc_vs_clm",
                                        "spdf", "stability"])
def test_fast_pipeline_end_to_end(experiment, tmp_path):
  module = load(experiment)
  results = module.run(str(tmp_path), fast=True)
  assert (tmp_path / "rows.md").read_text().startswith("| ")
  assert (tmp_path / f"{experiment}.png").stat().st_size > 10_000
  assert json.loads((tmp_path / "results.json").read_text())["findings"] == results["findings"]
  # A second invocation reuses every finished run and reproduces the results.
  again = module.run(str(tmp_path), fast=True)
  assert again["findings"] == results["findings"]
