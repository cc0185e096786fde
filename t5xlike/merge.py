"""Merges checkpoints of one architecture into a new one: `python -m t5xlike.merge --method=...`.

  python -m t5xlike.merge --method=uniform --checkpoints=A/checkpoint_600,B/checkpoint_600 \
    --output=/tmp/soup
  python -m t5xlike.merge --method=task_arithmetic --base=PRE/checkpoint_400 \
    --checkpoints=A/checkpoint_600,B/checkpoint_600 --lambdas=0.5,0.5 --output=/tmp/ta
  python -m t5xlike.merge --method=breadcrumbs --base=PRE/checkpoint_400 \
    --checkpoints=A/checkpoint_600,B/checkpoint_600 --beta=0.01 --gamma=0.85 --lam=1.0 \
    --output=/tmp/crumbs
  python -m t5xlike.merge --method=add_deltas --base=PRE/checkpoint_400 \
    --deltas=A/sparse_delta,B/sparse_delta --output=/tmp/sft
  python -m t5xlike.merge --gin_file=gin_configs/models/t5_1_1/tiny.gin \
    --gin_file=gin_configs/runs/greedy_soup.gin --method=greedy \
    --checkpoints=A/checkpoint_600,B/checkpoint_600,C/checkpoint_600 --output=/tmp/greedy

Writes OUTPUT/checkpoint_<step>/state ({step, params}; `python -m t5xlike.eval`
and `infer` load it as CHECKPOINT_PATH with the model gin) and OUTPUT/merge.json
(what was merged; the greedy soup's decisions). Without --gin_file,
gin_configs/runs/merge.gin is loaded. The math: t5xlike/finetuning/merging.py;
the run: t5xlike/finetuning/merge_run.py. Exit codes as `t5xlike.train`
(2: bad input, one line naming the culprit, nothing written).
"""
from __future__ import annotations

import sys

import gin

from t5xlike import errors
from t5xlike.cli import entry


def _list(text: str | None) -> list[str]:
  return [part for part in (text or "").split(",") if part]


def _numbers(flag: str, text: str | None) -> list[float] | None:
  if text is None:
    return None
  try:
    return [float(part) for part in _list(text)]
  except ValueError:
    raise errors.ConfigError(f"{flag}={text}: expected comma-separated numbers") from None


def _flags(parser) -> None:
  parser.add_argument("--method", default=None,
                      help="uniform | greedy | task_arithmetic | breadcrumbs | add_deltas")
  parser.add_argument("--checkpoints", default=None, help="step directories A,B,...")
  parser.add_argument("--base", default=None, help="the pretrained step directory (task "
                      "vectors are theta_i - base; deltas are added to it)")
  parser.add_argument("--deltas", default=None, help="sparse delta directories D1,D2,...")
  parser.add_argument("--output", default=None, help="directory of the merged checkpoint_<N>")
  parser.add_argument("--lambdas", default=None, help="task arithmetic: one or one per checkpoint")
  parser.add_argument("--lam", type=float, default=1.0, help="breadcrumbs: scale of the sum")
  parser.add_argument("--beta", type=float, default=0.01, help="breadcrumbs: top fraction dropped")
  parser.add_argument("--gamma", type=float, default=0.85,
                      help="breadcrumbs: bottom fraction dropped")
  parser.add_argument("--step", type=int, default=None,
                      help="step of the output (default: the inputs' largest)")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a.startswith("--gin_file") for a in argv):
    argv.insert(0, "--gin_file=runs/merge.gin")

  def call_root(args):
    # The run imports JAX and orbax: `--help` and flag errors stay fast.
    from t5xlike.runs import merge_run  # noqa: PLC0415
    if not args.method:
      raise errors.ConfigError("--method is not set (uniform, greedy, task_arithmetic, "
                               "breadcrumbs or add_deltas)")
    gin.get_configurable(merge_run.merge)(
        method=args.method, checkpoint_paths=_list(args.checkpoints), output=args.output,
        base=args.base, deltas=_list(args.deltas),
        lambdas=_numbers("--lambdas", args.lambdas), lam=args.lam, beta=args.beta,
        gamma=args.gamma, step=args.step)
  return entry.run_entry(__doc__.splitlines()[0], call_root, _flags, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
