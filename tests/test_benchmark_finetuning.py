"""scripts/benchmark_finetuning.py: which gin files count as methods, and the table."""
import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark_finetuning.py"
spec = importlib.util.spec_from_file_location("benchmark_finetuning", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_methods_are_the_technique_gins_on_the_run_model():
  found = bench.methods()
  on_disk = {p.stem for p in bench.FINETUNE.glob("*.gin")}
  assert found[0] == "full"
  assert {"llrd", "freeze_lower", "reinit_top", "hft", "sparse_ft"} <= set(found)
  assert "electra_classifier" in on_disk and "electra_classifier" not in found  # own model
  assert not any(m.startswith("_") for m in found) and set(found[1:]) <= on_disk


def test_table_rows():
  rows = [{"method": "sparse_ft", "exit_code": 0, "trainable": 300, "total": 1000,
           "trainable_sparse_phase": 15, "size_bytes": 190_000, "export": "sparse_delta",
           "checkpoint_bytes": 6_470_000, "median_step_time_s": 0.4, "eval_loss": 6.3,
           "eval_metric": 0.56},
          {"method": "lora", "exit_code": 1, "log": "/tmp/lora.log"}]
  lines = bench.table(rows).splitlines()
  assert lines[2] == ("| sparse_ft | 300 (30.0%), then 15 (1.50%) | 0.19 MB (sparse_delta) | "
                      "6.47 MB | 0.400 s | 6.300 | 0.6 |")
  assert lines[3].startswith("| lora | failed (exit 1, /tmp/lora.log)")
