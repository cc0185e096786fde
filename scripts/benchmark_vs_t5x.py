"""t5xlike's train-step benchmark beside real t5x: alternating, one process at a time.

    python scripts/benchmark_vs_t5x.py --t5x_bench=DIR/bench.py --t5x_python=VENV/bin/python \\
        [--configs=tiny,small] [--dtypes=float32,bfloat16] [--repeats=1] [--peak_tflops=X]

`--t5x_bench` is a harness that trains real t5x with its own command (`python -m
t5x.train` over t5x's T5.1.1 `tiny.gin` / `small.gin` and `pretrain.gin`, span
corruption, packed) and prints one JSON line (`--config tiny|small --steps N --dtype D`)
with at least `step_time_s`, `tokens_per_second`, `compile_s` (t5x.train's import to the
end of its first step) and `peak_rss_bytes`; `--t5x_python` the interpreter of the venv t5x
is installed in. For every dtype, config and repeat it runs t5x, then
`scripts/benchmark.py` on the same shapes (t5x_tiny / t5_1_1_small: batch 8, 512 / 114
tokens, vocabulary 32,128), prints both JSON lines as they come
(`{"stack": ..., "config": ..., "dtype": ..., "row": {...}}`) and, at the end, one table
of ratios (t5xlike / t5x) per pair:

  tokens/s          both count padding slots (packed rows: ~1-2% padding)
  time to 1st step  ours from the process's start (imports included), t5x's from
                    t5x.train's import (its imports not counted): the ratio favours t5x
  peak memory       ours `peak_memory_bytes`, t5x's `peak_rss_bytes` (the whole process)

The MFU's denominator is measured once per invocation and dtype, before any run
(`measure_peak`: the best of 5 rounds of 40 short [1024, 1024] matmuls, a second apart,
in a process of its own,
printed as `{"peak_tflops": ..., "dtype": ...}`), and passed to every `benchmark.py`
run as `--peak_tflops`, so the runs of one invocation share it; `--peak_tflops` sets it.
The table's last column is our achieved TFLOP/s over it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
OURS = {"tiny": "t5x_tiny", "small": "t5_1_1_small"}  # t5x's gin name -> benchmark.py's config
STEPS = {"tiny": (15, 20), "small": (8, 6)}  # (t5x's, ours): t5x's harness drops 2, ours warms 2


def _json_line(command: Sequence[str], cwd: pathlib.Path) -> dict:
  """The last JSON line `command` prints on stdout; SystemExit naming it when it fails."""
  proc = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise SystemExit(f"benchmark_vs_t5x.py: error: {' '.join(command)} failed "
                     f"(exit {proc.returncode}): {tail}")
  return json.loads(lines[-1])


def measure_peak(dtype: str) -> float:
  """This machine's matmul peak in TFLOP/s for `dtype`: the best of 5 rounds of 40 short
  matmuls a second apart (`flops.measured_matmul_tflops`; one round alone read 0.079
  against 0.178 when the virtual machine's host was busy), in a fresh process of our
  interpreter."""
  code = ("import json, time; from t5xlike import flops; best = 0.0\n"
          "for _ in range(5):\n"
          f"  best = max(best, flops.measured_matmul_tflops(dtype={dtype!r}, repeats=40))\n"
          "  time.sleep(1.0)\n"
          "print(json.dumps({'peak_tflops': best}))")
  return float(_json_line([sys.executable, "-c", code], REPO)["peak_tflops"])


def ratios(ours: dict, t5x: dict) -> dict[str, float]:
  """t5xlike / t5x of one pair of rows: tokens/s (higher is better), time to first step and
  peak memory (lower is better)."""
  return {"tokens_per_second": ours["tokens_per_second"] / t5x["tokens_per_second"],
          "time_to_first_step": ours["time_to_first_step_s"] / t5x["compile_s"],
          "peak_memory": ours["peak_memory_bytes"] / t5x["peak_rss_bytes"]}


def table(pairs: Sequence[tuple[str, str, dict, dict]]) -> str:
  """A Markdown table of (config, dtype, t5xlike row, t5x row) pairs."""
  lines = ["| config | dtype | t5xlike tok/s (s/step, CPU s/step) | t5x tok/s (s/step) | ratio "
           "| time to first step: ours / t5x's | ratio | peak memory GB: ours / t5x's | ratio "
           "| our TFLOP/s / measured peak |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for config, dtype, ours, t5x in pairs:
    r = ratios(ours, t5x)
    lines.append(
        f"| {config} | {dtype} | {ours['tokens_per_second']:,.0f} ({ours['step_time_s']:.3f}, "
        f"{ours.get('cpu_s_per_step', float('nan')):.2f}) | {t5x['tokens_per_second']:,.0f} "
        f"({t5x['step_time_s']:.3f}) | **{r['tokens_per_second']:.2f}x** | "
        f"{ours['time_to_first_step_s']:.1f} / {t5x['compile_s']:.1f} s | "
        f"{r['time_to_first_step']:.2f}x | {ours['peak_memory_bytes'] / 1e9:.2f} / "
        f"{t5x['peak_rss_bytes'] / 1e9:.2f} | {r['peak_memory']:.2f}x | "
        f"{ours.get('tflops_per_device', float('nan')):.3f} / "
        f"{ours.get('peak_tflops_per_device', float('nan')):.3f} = "
        f"{ours.get('mfu', float('nan')):.0%} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--t5x_bench", required=True, help="the t5x harness's bench.py")
  p.add_argument("--t5x_python", required=True, help="the interpreter of t5x's venv")
  p.add_argument("--configs", default="tiny,small")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--peak_tflops", type=float,
                 help="the MFU's peak TFLOP/s (default: measured once per dtype here)")
  args = p.parse_args(argv)
  bench = pathlib.Path(args.t5x_bench).resolve()
  configs = [c for c in args.configs.split(",") if c]
  dtypes = [d for d in args.dtypes.split(",") if d]
  if not bench.is_file() or not pathlib.Path(args.t5x_python).is_file():
    p.error(f"--t5x_bench {args.t5x_bench} or --t5x_python {args.t5x_python} is not a file")
  if not configs or set(configs) - set(OURS) or set(dtypes) - {"float32", "bfloat16"}:
    p.error(f"--configs from {sorted(OURS)}, --dtypes from float32, bfloat16")
  pairs = []
  for dtype in dtypes:
    peak = args.peak_tflops or measure_peak(dtype)
    print(json.dumps({"peak_tflops": peak, "dtype": dtype,
                      "source": "configured" if args.peak_tflops else "measured"}), flush=True)
    for config in configs:
      for _ in range(args.repeats):
        t5x_steps, our_steps = STEPS[config]
        t5x = _json_line([args.t5x_python, str(bench), "--config", config,
                          "--steps", str(t5x_steps), "--dtype", dtype], bench.parent)
        print(json.dumps({"stack": "t5x", "config": config, "dtype": dtype, "row": t5x}),
              flush=True)
        ours = _json_line([sys.executable, str(REPO / "scripts" / "benchmark.py"),
                           f"--config={OURS[config]}", f"--steps={our_steps}",
                           f"--dtype={dtype}", f"--peak_tflops={peak}"], REPO)
        print(json.dumps({"stack": "t5xlike", "config": config, "dtype": dtype, "row": ours}),
              flush=True)
        pairs.append((config, dtype, ours, t5x))
  print("\n" + table(pairs))
  return 0


if __name__ == "__main__":
  sys.exit(main())
