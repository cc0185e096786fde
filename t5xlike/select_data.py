"""Chooses the data to fine-tune on: `python -m t5xlike.select_data --gin_file=...`.

  python -m t5xlike.select_data --gin_file=gin_configs/models/t5_1_1/tiny.gin \
    --gin_file=gin_configs/runs/select_data.gin --gin.CHECKPOINT_PATH=DIR/checkpoint_N \
    --score=ifd --fraction=0.5 --name=multitask_ifd50 --output_dir=/tmp/selected

scores every example of MIXTURE_OR_TASK_NAME's split (`run_config.DataConfig.split`,
'train' in runs/select_data.gin) with the checkpoint, chooses k of them
(`--fraction` or `--num_examples`) by `--score` (loss, ifd, kcenter, kmeans,
random) and writes them as the cached task `--name` into `--output_dir`, with
`NAME/scores.jsonl` (every example's scores). Train on it with
`--gin.MIXTURE_OR_TASK_NAME="'NAME'" --gin.USE_CACHED_TASKS=True
--gin.TASK_CACHE_DIR=OUT`. See `t5xlike/runs/select_data_run.py` and
docs/data_selection.md. Exit codes as `t5xlike.train`.
"""
from __future__ import annotations

import sys

import gin

from t5xlike.cli import entry


def _flags(parser) -> None:
  parser.add_argument("--score", default="loss",
                      help="loss, ifd, kcenter, kmeans or random (default loss)")
  parser.add_argument("--fraction", type=float, default=None,
                      help="choose this fraction of the examples (floor)")
  parser.add_argument("--num_examples", type=int, default=None, help="choose this many")
  parser.add_argument("--order", default="highest",
                      help="highest or lowest score first (loss, ifd; default highest)")
  parser.add_argument("--name", default=None, help="the task name the selection is written as")
  parser.add_argument("--output_dir", default=None,
                      help="the task cache directory written into (TASK_CACHE_DIR to train)")


def main(argv: list[str] | None = None) -> int:
  def call_root(args):
    # The run imports JAX: `--help` and flag errors stay fast.
    from t5xlike.runs import select_data_run  # noqa: PLC0415
    gin.get_configurable(select_data_run.select_data)(
        score=args.score, fraction=args.fraction, num_examples=args.num_examples,
        order=args.order, name=args.name, output_dir=args.output_dir)
  return entry.run_entry(__doc__.splitlines()[0], call_root, _flags, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
