"""Evaluates a checkpoint with lm-evaluation-harness: `python -m t5xlike.lm_eval --gin_file=...`.

  python -m t5xlike.lm_eval --gin_file=gin_configs/models/t5_1_1/tiny.gin \
    --gin_file=gin_configs/runs/lm_eval.gin --gin.CHECKPOINT_PATH=DIR/checkpoint_N \
    --gin.EVAL_OUTPUT_DIR=OUT --tasks=my_task --include_path=my_tasks/

runs the harness tasks `--tasks` (lm_eval's own, or YAML files under
`--include_path`) on the model of the gin files (encoder-decoder or decoder-only)
and writes OUT/lm_eval/results-<step>.json (the harness's results) and a row per
task to OUT/metrics/eval.jsonl. Needs the optional extra `lm_eval`
(`pip install -e '.[lm_eval]'`). See `t5xlike/runs/lm_eval_run.py`,
`t5xlike/inference/lm_eval_model.py` and docs/finetuning.md. Exit codes as
`t5xlike.train`.
"""
from __future__ import annotations

import sys

import gin

from t5xlike import errors
from t5xlike.cli import entry


def _flags(parser) -> None:
  parser.add_argument("--tasks", default="",
                      help="comma-separated harness task, group or tag names (or YAML files)")
  parser.add_argument("--include_path", default="",
                      help="comma-separated directories of task YAML files")
  parser.add_argument("--num_fewshot", type=int, default=None,
                      help="few-shot examples per prompt (default: each task's own)")
  parser.add_argument("--limit", type=float, default=None,
                      help="examples per task (a fraction of each task below 1; default all)")
  parser.add_argument("--bootstrap_iters", type=int, default=100000,
                      help="bootstrap iterations of the stderrs that need them (0: none)")
  parser.add_argument("--log_samples", action="store_true",
                      help="also write every request and response, "
                      "EVAL_OUTPUT_DIR/lm_eval/samples-<task>-<step>.jsonl")


def _split(value: str) -> list[str]:
  return [part.strip() for part in value.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
  def call_root(args):
    # The run imports JAX and lm_eval: `--help` and flag errors stay fast.
    try:
      from t5xlike.runs import lm_eval_run  # noqa: PLC0415
    except ImportError as error:
      raise errors.ConfigError(f"python -m t5xlike.lm_eval needs lm-evaluation-harness "
                               f"(pip install -e '.[lm_eval]'): {error}") from None
    gin.get_configurable(lm_eval_run.evaluate_harness)(
        tasks=_split(args.tasks), include_path=_split(args.include_path),
        num_fewshot=args.num_fewshot, limit=args.limit, bootstrap_iters=args.bootstrap_iters,
        log_samples=args.log_samples)
  return entry.run_entry(__doc__.splitlines()[0], call_root, _flags, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
