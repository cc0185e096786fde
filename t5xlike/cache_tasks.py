"""Writes task caches: seqio task splits after their deterministic preprocessors.

    python -m t5xlike.cache_tasks --tasks=T1,T2 --output_dir=DIR
        [--splits=train,validation] [--module=t5xlike.tasks.embedded ...] [--num_shards=N]

A mixture name stands for its tasks; without `--splits` every split of each
task is cached. `--module` (repeatable, also spelled `--module_import` as in
seqio) imports the modules that register the tasks. Training reads the caches
with `--gin.USE_CACHED_TASKS=True` (see `t5xlike.data.sources.open_source`
for where they are looked up). Everything is checked before anything is
written: an unknown task or split, a refused post-cache preprocessor or an
unprepared TFDS dataset exits with status 2 and one line on stderr. Prints one
line per task split: examples, tokens per token feature, seconds.
"""
from __future__ import annotations

import argparse
import sys

from t5xlike import errors
from t5xlike.cli import console_log


def _names(values: list[str]) -> list[str]:
  return [name.strip() for value in values for name in value.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                   exit_on_error=False)
  parser.add_argument("--tasks", action="append", default=[],
                      help="comma-separated task or mixture names (repeatable)")
  parser.add_argument("--output_dir", default=None, help="cache directory")
  parser.add_argument("--splits", action="append", default=[],
                      help="comma-separated splits (default: all splits of each task)")
  parser.add_argument("--module", "--module_import", action="append", default=[], dest="module",
                      help="module that registers tasks (repeatable)")
  parser.add_argument("--num_shards", type=int, default=None,
                      help="ArrayRecord shards per split (default: one per 256 MiB)")
  console_log.configure()  # (t5xlike's INFO lines: the progress of long splits)
  try:
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:
      raise errors.ConfigError(f"unknown flag(s): {' '.join(unknown)}")
    if not _names(args.tasks) or not args.output_dir:
      raise errors.ConfigError("--tasks and --output_dir are required")
    if args.num_shards is not None and args.num_shards < 1:
      raise errors.ConfigError(f"--num_shards must be >= 1, got {args.num_shards}")
    from t5xlike.data import task_examples  # noqa: PLC0415  (seqio + TensorFlow: after the flags)
    from t5xlike.runs import cache_tasks_run  # noqa: PLC0415  (the same)
    for module in _names(args.module):
      task_examples.import_module(module, flag="--module")
    pairs = cache_tasks_run.plan(_names(args.tasks), _names(args.splits))
  except (errors.ConfigError, ValueError, argparse.ArgumentError) as error:
    print(f"error: {errors.one_line(error)}", file=sys.stderr)
    return 2
  except SystemExit as exit_:  # argparse's own usage errors.
    return int(exit_.code or 0)
  cache_tasks_run.write(pairs, args.output_dir, args.num_shards)
  return 0


if __name__ == "__main__":
  sys.exit(main())
