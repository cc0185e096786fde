"""Draws the train and eval curves of one or more runs into a PNG.

    python -m t5xlike.plot MODEL_DIR [MODEL_DIR ...] --output=runs.png
        [--metrics=loss,accuracy,learning_rate,tokens_per_second] [--x=step|tokens]
        [--labels=NAME,NAME,...]

Reads each run's `MODEL_DIR/metrics/train.jsonl` and `eval.jsonl`. One panel
per metric (any numeric key of the rows: `loss`, `accuracy`, `learning_rate`,
`tokens_per_second`, `grad_norm`, `z_loss`, `mfu`, ...; the default is the
four named, those any run logged); train solid, eval dashed with markers, one
colour per run, labelled by `--labels` (default: each directory's name). `--x=tokens`
plots against the tokens seen: step x the run's token positions per step
(`t5xlike.run_metrics`). Needs matplotlib (`pip install 't5xlike[plot]'`).
Everything is checked before anything is written: a MODEL_DIR without metrics,
an unknown metric or x axis, a label count that is not the run count, or a
missing matplotlib exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import sys

from t5xlike import errors
from t5xlike.runs import plot_run


def _names(value: str | None) -> list[str] | None:
  if value is None:
    return None
  return [name.strip() for name in value.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                   exit_on_error=False)
  parser.add_argument("model_dirs", nargs="*", metavar="MODEL_DIR", help="run directories")
  parser.add_argument("--output", default=None, help="the PNG to write")
  parser.add_argument("--metrics", default=None,
                      help=f"comma-separated row keys, one panel each (default: "
                           f"{','.join(plot_run.DEFAULT_METRICS)})")
  parser.add_argument("--x", default="step", help="step (default) or tokens")
  parser.add_argument("--labels", default=None,
                      help="comma-separated names, one per MODEL_DIR (default: directory names)")
  try:
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:
      raise errors.ConfigError(f"unknown flag(s): {' '.join(unknown)}")
    if not args.output:
      raise errors.ConfigError("--output=FILE.png is required")
    p = plot_run.plan(args.model_dirs, args.output, _names(args.metrics), args.x,
                      _names(args.labels))
    plot_run.write(p, args.output)
  except (errors.ConfigError, argparse.ArgumentError) as error:
    print(f"error: {errors.one_line(error)}", file=sys.stderr)
    return 2
  except SystemExit as exit_:  # argparse's own usage errors, --help.
    return int(exit_.code or 0)
  width, height = p.size_px
  print(f"wrote {args.output} ({width} x {height} px: {', '.join(p.metrics)} by {p.x}, "
        f"{len(p.runs)} run(s))")
  return 0


if __name__ == "__main__":
  sys.exit(main())
