"""Precomputes a DPO / IPO reference: `python -m t5xlike.precompute_reference --gin_file=...`.

  python -m t5xlike.precompute_reference --gin_file=gin_configs/models/t5_1_1/tiny.gin \
    --gin_file=gin_configs/posttrain/precompute_reference.gin \
    --gin.INITIAL_CHECKPOINT_PATH=SFT_DIR/checkpoint_N --name=pref_continue_ref \
    --output_dir=/tmp/reference

scores both completions of every pair of MIXTURE_OR_TASK_NAME (`--splits`, default
train,validation) with the reference (REFERENCE_CHECKPOINT_PATH, else
INITIAL_CHECKPOINT_PATH) and writes the task again as the cached task `--name`,
each example with `reference_chosen_logp` and `reference_rejected_logp`. Then
train with `posttrain/dpo.gin` (or ipo.gin) and `posttrain/precomputed_reference.gin`,
`--gin.MIXTURE_OR_TASK_NAME="'NAME'"` and `--gin.TASK_CACHE_DIR=OUT`: the run
holds one model. See
`t5xlike/runs/precompute_reference_run.py` and docs/posttraining.md. Exit codes as
`t5xlike.train`.
"""
from __future__ import annotations

import sys

import gin

from t5xlike.cli import entry


def _flags(parser) -> None:
  parser.add_argument("--name", default=None, help="the task name the scored pairs are "
                      "written as")
  parser.add_argument("--output_dir", default=None,
                      help="the task cache directory written into (TASK_CACHE_DIR to train)")
  parser.add_argument("--splits", default="train,validation",
                      help="comma-separated splits to score (default train,validation; "
                      "the first is the one training reads)")


def main(argv: list[str] | None = None) -> int:
  def call_root(args):
    # The run imports JAX: `--help` and flag errors stay fast.
    from t5xlike.runs import precompute_reference_run  # noqa: PLC0415
    splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    gin.get_configurable(precompute_reference_run.precompute_reference)(
        name=args.name, output_dir=args.output_dir, splits=splits)
  return entry.run_entry(__doc__.splitlines()[0], call_root, _flags, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
