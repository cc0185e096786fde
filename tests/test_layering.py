"""The core imports no TensorFlow, seqio or grain (docs/architecture.md)."""
import subprocess
import sys

CORE = ["t5xlike.models.t5", "t5xlike.models.layers", "t5xlike.models.encoder_decoder",
        "t5xlike.training.trainer", "t5xlike.partitioning", "t5xlike.optim",
        "t5xlike.checkpoints", "t5xlike.metrics", "t5xlike.losses",
        "t5xlike.objectives.span_corruption", "t5xlike.data.feature_converters",
        "t5xlike.data.batch_shapes", "t5xlike.inference.decoding",
        "t5xlike.inference.predictor", "t5xlike.inference.checkpoint_loading",
        "t5xlike.inference.jsonl_io", "t5xlike.inference.task_evaluator",
        "t5xlike.runs.infer_run", "t5xlike.runs.eval_run", "t5xlike.text_metrics"]


def test_core_imports_no_tensorflow_seqio_or_grain():
  code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE) +
          "bad = [m for m in ('tensorflow', 'seqio', 'grain', 'tensorflow_datasets') "
          "if m in sys.modules]\nprint(bad)\nsys.exit(1 if bad else 0)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
