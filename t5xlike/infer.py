"""Predicts or scores with a trained model: `python -m t5xlike.infer --gin_file=...`.

  python -m t5xlike.infer --gin_file=gin_configs/models/t5_1_1/tiny.gin \
    --gin_file=gin_configs/runs/infer.gin --gin.CHECKPOINT_PATH=DIR/checkpoint_N \
    --mode=predict --input=in.jsonl --output=out.jsonl

Without --input, the examples of MIXTURE_OR_TASK_NAME (split
`run_config.DataConfig.split`) are written to INFER_OUTPUT_DIR. See
`t5xlike/inference/jsonl_io.py` for the JSONL format. Exit codes as `t5xlike.train`.
"""
from __future__ import annotations

import sys

import gin

from t5xlike.cli import entry


def _flags(parser) -> None:
  parser.add_argument("--mode", default="predict", help="predict or score")
  parser.add_argument("--input", default=None, help="JSONL file of examples")
  parser.add_argument("--output", default=None, help="JSONL file written")
  parser.add_argument("--max_decode_length", type=int, default=None,
                      help="most tokens generated (default TASK_FEATURE_LENGTHS['targets'])")


def main(argv: list[str] | None = None) -> int:
  def call_root(args):
    # The run imports JAX: `--help` and flag errors stay fast.
    from t5xlike.runs import infer_run  # noqa: PLC0415
    overrides = {"mode": args.mode, "input_path": args.input, "output_path": args.output}
    if args.max_decode_length is not None:
      overrides["max_decode_length"] = args.max_decode_length
    gin.get_configurable(infer_run.infer)(**overrides)
  return entry.run_entry(__doc__.splitlines()[0], call_root, _flags, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
