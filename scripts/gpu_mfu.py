"""Measured MFU on a real H100 / H200: the ~1B decoder and T5.1.1-large in bfloat16 with
cuDNN attention (scripts/benchmark.py), written into docs/performance.md.

    python scripts/gpu_mfu.py [--steps=10] [--dry_run]

Run it whenever a machine with NVIDIA H100 or H200 GPUs (the `gpu` extra installed) is
at hand: about 5 minutes (two benchmark processes: compilation, 2 warm-up and 10 timed
steps each, synthetic batches). It replaces the section between the markers
`<!-- gpu-mfu:begin -->` and `<!-- gpu-mfu:end -->` of docs/performance.md with the
measured step time, tokens/s, TFLOP/s per GPU and MFU (against the data sheet's dense
bf16 peak) next to what `python -m t5xlike.compile` estimated for the same step
(docs/scale_table.md). On a machine without a GPU it exits 2 with one line.
`--dry_run` prints the section instead of writing it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PERFORMANCE = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- gpu-mfu:begin -->", "<!-- gpu-mfu:end -->"

#: (benchmark config, flags): bfloat16, cuDNN attention, data parallel over the node.
RUNS = (
    ("decoder_1b", ["--batch_size=64", "--targets_length=2048"]),
    ("t5_1_1_large", ["--batch_size=128", "--inputs_length=512", "--targets_length=128"]),
)
COMMON = ["--dtype=bfloat16", "--attention=cudnn", "--mesh_shape=data:-1", "--scan",
          "--data=synthetic"]


def gpu_kind() -> str | None:
  """The device kind of this machine's first GPU, or None (no GPU)."""
  code = ("import jax; d = jax.devices(); "
          "print(d[0].device_kind if d[0].platform == 'gpu' else '')")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
  kind = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
  return kind or None


def measure(config: str, flags: list[str], steps: int) -> dict:
  """The JSON line of one scripts/benchmark.py run."""
  result = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "benchmark.py"), f"--config={config}",
       f"--steps={steps}", "--warmup=2", *COMMON, *flags],
      capture_output=True, text=True, cwd=REPO, check=False, timeout=600)
  if result.returncode != 0:
    raise RuntimeError(f"{config}: {(result.stderr.strip().splitlines() or ['failed'])[-1]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def section(kind: str, rows: list[dict]) -> str:
  lines = [BEGIN, "", f"Measured by `python scripts/gpu_mfu.py` on {kind} (bfloat16, cuDNN "
           "attention, data parallel over the node, synthetic batches):", "",
           "| config | batch | step s | tokens/s | TFLOP/s per GPU | MFU |",
           "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['config']} | {row['batch_size']} | {row['step_time_s']:.4g} | "
                 f"{row['tokens_per_second']:,.0f} | {row['tflops_per_device']:.1f} | "
                 f"{row['mfu']:.1%} |")
  return "\n".join(lines + ["", END])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dry_run", action="store_true")
  args = parser.parse_args(argv)
  kind = gpu_kind()
  if kind is None or not re.search(r"H100|H200", kind):
    print(f"gpu_mfu.py: error: needs an NVIDIA H100 or H200 (this machine: {kind or 'no GPU'})",
          file=sys.stderr)
    return 2
  rows = [measure(config, flags, args.steps) for config, flags in RUNS]
  text = section(kind, rows)
  if args.dry_run:
    print(text)
    return 0
  doc = PERFORMANCE.read_text()
  if BEGIN in doc and END in doc:
    doc = doc[:doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
  else:
    doc = doc.rstrip("\n") + "\n\n## Measured on GPUs\n\n" + text + "\n"
  PERFORMANCE.write_text(doc)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
