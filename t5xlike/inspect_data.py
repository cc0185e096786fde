"""Shows a task's examples exactly as the model will see them, with statistics.

    python -m t5xlike.inspect_data --gin_file=gin_configs/quickstart.gin [--num_examples=N]
        [--split=train] [--json] [--gin.NAME=VALUE ...]

Reads the same gin files as `t5xlike.train` (the task, TASK_FEATURE_LENGTHS,
RANDOM_SEED and the objective bound to `train_run.train`). Without `--json`
it prints N examples (default 3): inputs and targets decoded with sentinels
visible, their lengths after padding/truncation and the number of target
positions that carry loss, then the statistics. With `--json` it prints one
JSON object per objective, or per denoiser of a mixture (default N = 1,000):
`name`, `examples`, `noise_density` (noised or masked / original tokens),
`mean_noise_span_length` (null where there are no spans), `mean_inputs_length`,
`mean_targets_length` (before padding), and `mask_rate` for masking objectives
(MLM, ELECTRA).
"""
from __future__ import annotations

import sys

from t5xlike import errors
from t5xlike.cli import flags, gin_config


def main(argv: list[str] | None = None) -> int:
  parser = flags.build_parser(__doc__.splitlines()[0])
  parser.add_argument("--num_examples", type=int, default=None)
  parser.add_argument("--split", default="train")
  parser.add_argument("--json", action="store_true")
  try:
    args = flags.parse_args(parser, sys.argv[1:] if argv is None else argv)
    gin_config.quiet_gin_search_logs()
    gin_config.configure(args.gin_file, args.gin_overrides, args.gin_bindings,
                         args.gin_search_paths)
    num = args.num_examples or (1000 if args.json else 3)
    # The data pipeline (TensorFlow, seqio) is imported once the flags are known good.
    from t5xlike.runs import inspect_data_run  # noqa: PLC0415
    inspect_data_run.inspect(num, args.split, args.json)
  except (errors.ConfigError, ValueError) as error:
    print(f"error: {errors.one_line(error)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
