"""Train-step benchmark: one JSON line per named config (t5xlike.benchmarking).

    python scripts/benchmark.py --config=t5_1_1_small [--batch_size=8]
        [--inputs_length=512] [--targets_length=114] [--dtype=float32|bfloat16]
        [--steps=10] [--warmup=2] [--mesh_shape=data:-1] [--attention=auto]
        [--remat=none] [--scan] [--data=pipeline|synthetic] [--compile_only]
    python scripts/benchmark.py --config=t5x_tiny --compare dtype=float32 dtype=bfloat16

Several configs: `--config=t5x_tiny,t5_1_1_small` (one line each, each in
its own process so that peak RSS and time to first step are its own).
`--compare A B` runs the command twice, in fresh processes, with the extra
flags A, then B (flags without their leading `--`, several separated by
spaces: "dtype=bfloat16 attention=xla"; they override the others), prints
both JSON lines and a side-by-side table with the ratio B / A. Time to first
step counts from the start of the process (imports, data pipeline,
initialisation, compilation, first step).
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

TABLE_KEYS = ("compile_s", "compiled_memory_bytes", "time_to_first_step_s", "step_time_s",
              "step_time_p90_s", "cpu_s_per_step",
              "tokens_per_second", "padded_tokens_per_second", "tflops_per_device", "mfu",
              "peak_memory_bytes", "final_loss")


class OneLineParser(argparse.ArgumentParser):
  def error(self, message):
    self.exit(2, f"benchmark.py: error: {message}\n")


def parse_mesh(text: str) -> dict[str, int]:
  """'data:2,fsdp:-1' -> {'data': 2, 'fsdp': -1}."""
  mesh = {}
  for part in filter(None, text.split(",")):
    name, sep, size = part.partition(":")
    if not sep or name not in ("data", "fsdp", "tensor"):
      raise argparse.ArgumentTypeError(f"bad mesh axis {part!r} (want data|fsdp|tensor:SIZE)")
    try:
      mesh[name] = int(size)
    except ValueError:
      raise argparse.ArgumentTypeError(f"bad mesh size in {part!r}") from None
  return mesh


def positive(text: str) -> int:
  value = int(text) if text.lstrip("-").isdigit() else None
  if value is None or value < 1:
    raise argparse.ArgumentTypeError(f"want a positive integer, got {text!r}")
  return value


def parser() -> argparse.ArgumentParser:
  from t5xlike import benchmarking
  from t5xlike.models import attention
  p = OneLineParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="t5_1_1_small",
                 help=f"comma-separated names from {sorted(benchmarking.CONFIGS)}")
  p.add_argument("--batch_size", type=positive)
  p.add_argument("--inputs_length", type=positive)
  p.add_argument("--targets_length", type=positive)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--steps", type=positive, default=10)
  p.add_argument("--warmup", type=positive, default=2)
  p.add_argument("--mesh_shape", type=parse_mesh, default={"data": -1})
  p.add_argument("--attention", default="auto", choices=attention.IMPLEMENTATIONS)
  p.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable"))
  p.add_argument("--num_layers", type=positive, help="override the depth (per T5 stack)")
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False)
  p.add_argument("--loss", default="chunked", choices=("dense", "chunked"),
                 help="cross-entropy: full logits, or chunked over the sequence")
  p.add_argument("--data", default="pipeline", choices=("pipeline", "synthetic"))
  p.add_argument("--compile_only", action="store_true",
                 help="AOT-compile and count FLOPs / memory without running a step")
  p.add_argument("--profile", action="store_true",
                 help="after timing, trace 2 steps and add the top XLA ops (top_ops)")
  p.add_argument("--peak_tflops", type=float, help="peak TFLOP/s per device for the MFU")
  p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                 help="two sets of extra flags to run and compare side by side")
  return p


def run_child(argv: list[str]) -> dict:
  """Runs this script with `argv` in a fresh process; its JSON line."""
  proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                        check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise SystemExit(f"benchmark.py: error: run {' '.join(argv)} failed: {tail}")
  return json.loads(lines[-1])


def compare(base: list[str], variants: list[str]) -> None:
  rows = []
  for extra in variants:
    row = run_child(base + ["--" + flag.lstrip("-") for flag in extra.split()])
    print(json.dumps(row), flush=True)
    rows.append(row)
  a, b = rows
  print(f"\n{'':26s} {'A: ' + variants[0]:>28s} {'B: ' + variants[1]:>28s} {'B / A':>8s}")
  for key in TABLE_KEYS:
    if key in a and key in b:
      ratio = b[key] / a[key] if a[key] else float("nan")
      print(f"{key:26s} {a[key]:28.4g} {b[key]:28.4g} {ratio:8.3f}")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  from t5xlike import benchmarking
  names = [n for n in args.config.split(",") if n]
  unknown = [n for n in names if n not in benchmarking.CONFIGS]
  if unknown or not names:
    print(f"benchmark.py: error: unknown --config {unknown or args.config!r}; known: "
          f"{', '.join(sorted(benchmarking.CONFIGS))}", file=sys.stderr)
    return 2
  if args.compare:
    base = [a for i, a in enumerate(argv) if not _is_compare(argv, i)]
    compare(base, list(args.compare))
    return 0
  if len(names) > 1:
    for name in names:
      rest = [a for a in argv if not a.startswith("--config")]
      print(json.dumps(run_child([f"--config={name}", *rest])), flush=True)
    return 0
  bench = benchmarking.CONFIGS[names[0]]
  row = benchmarking.run(benchmarking.BenchmarkSettings(
      names[0], batch_size=args.batch_size or bench.batch_size,
      inputs_length=args.inputs_length or bench.inputs_length,
      targets_length=args.targets_length or bench.targets_length, dtype=args.dtype,
      steps=args.steps, warmup=args.warmup, mesh_shape=args.mesh_shape,
      attention=args.attention, remat=args.remat, scan=args.scan, data=args.data,
      compile_only=args.compile_only, peak_tflops=args.peak_tflops, loss_impl=args.loss,
      num_layers=args.num_layers, profile=args.profile), process_start=PROCESS_START)
  print(json.dumps(row), flush=True)
  return 0


def _is_compare(argv: list[str], index: int) -> bool:
  """argv[index] is `--compare`, `--compare=...` or one of its two values."""
  for i in range(max(0, index - 2), index + 1):
    if argv[i] == "--compare" and index - i <= 2:
      return True
  return argv[index].startswith("--compare=")


if __name__ == "__main__":
  sys.exit(main())
