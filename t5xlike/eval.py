"""Evaluates a checkpoint with the tasks' metric functions: `python -m t5xlike.eval --gin_file=...`.

  python -m t5xlike.eval --gin_file=gin_configs/models/t5_1_1/tiny.gin \
    --gin_file=gin_configs/runs/eval.gin --gin.CHECKPOINT_PATH=DIR/checkpoint_N \
    --gin.EVAL_OUTPUT_DIR=OUT

Writes OUT/metrics/eval.jsonl (one row per task) and
OUT/inference_eval/<task>-<step>.jsonl. Exit codes as `t5xlike.train`.
"""
from __future__ import annotations

import sys

import gin

from t5xlike.cli import entry


def main(argv: list[str] | None = None) -> int:
  def call_root(args):
    del args
    # The run imports JAX and TensorFlow: `--help` and flag errors stay fast.
    from t5xlike.runs import eval_run  # noqa: PLC0415
    gin.get_configurable(eval_run.evaluate)()
  return entry.run_entry(__doc__.splitlines()[0], call_root, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
