"""Compiles the train step of each row below for its TPU slice or GPU node and writes the
scale table (docs/scale_table.md): per-chip memory against HBM, fits, the cost model's
estimated MFU, collective bytes per step, compile time.

    python scripts/scale_table.py [--only SUBSTRING ...] [--output docs/scale_table.md]
        [--jsonl FILE] [--timeout SECONDS] [--table_only]

Every row is one `python -m t5xlike.compile --json` process (the command users run), with
the row's gin files and overrides; its JSON line goes to `--jsonl` (default: next to the
table, `docs/scale_table.jsonl`) and into the table. A row that names `fixes` is the
configuration that makes the row it names fit; the table shows both. Needs the `tpu` and
`gpu` extras; hours of CPU on a 2-core host for every row (`--only` for a few).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2 ** 30

T5_LENGTHS = "{'inputs': 512, 'targets': 128}"


@dataclasses.dataclass(frozen=True)
class Row:
  """One compiled configuration.

  Attributes:
    name: the model's name in the table.
    model_gin: the model's gin file (with runs/pretrain.gin: Adafactor, span corruption).
    topology: `--topology`.
    batch: BATCH_SIZE (global).
    lengths: TASK_FEATURE_LENGTHS.
    mesh: MESH_SHAPE (inside one slice).
    rules: LOGICAL_AXIS_RULES preset.
    remat: the network's remat_policy.
    microbatches: OptimizerConfig.num_microbatches.
    num_slices: `--num_slices`.
    extra: more `--gin.NAME=VALUE` overrides.
    fixes: what this row changes to make the row above it (same model and target) fit.
    estimate: `--estimate`: 'probe' (the unrolled step at 2 and 4 layers, extrapolated;
      every row) or 'loops' (the scanned step's loops scaled by their trip counts).
  """
  name: str
  model_gin: str
  topology: str
  batch: int
  lengths: str
  mesh: str
  rules: str
  remat: str = "full"
  microbatches: int = 1
  num_slices: int = 1
  extra: tuple[str, ...] = ()
  fixes: str = ""
  estimate: str = "probe"

  @property
  def network(self) -> str:
    return "decoder.DecoderConfig" if "/decoder/" in self.model_gin else "t5.T5Config"

  @property
  def key(self) -> str:
    slices = f" x{self.num_slices}" if self.num_slices > 1 else ""
    return f"{self.name} @ {self.topology}{slices} [{self.rules} {self.mesh} remat={self.remat}]"

  def flags(self) -> list[str]:
    network = self.network
    return [f"--gin_file={self.model_gin}", "--gin_file=runs/pretrain.gin",
            f"--topology={self.topology}", f"--num_slices={self.num_slices}", "--json",
            f"--estimate={self.estimate}",
            f"--gin.BATCH_SIZE={self.batch}", f"--gin.TASK_FEATURE_LENGTHS={self.lengths}",
            f"--gin.MESH_SHAPE={self.mesh}", f"--gin.LOGICAL_AXIS_RULES='{self.rules}'",
            "--gin.ACTIVATION_DTYPE='bfloat16'", f"--gin.{network}.scan_layers=True",
            f"--gin.{network}.remat_policy='{self.remat}'",
            f"--gin.OptimizerConfig.num_microbatches={self.microbatches}",
            *[f"--gin.{override}" for override in self.extra]]


T5_VOCAB = ("t5.T5Config.vocab_size=32128",)   # T5.1.1's vocabulary size, as released
ROWS = (
    Row("T5.1.1-small", "models/t5_1_1/small.gin", "v5litepod-16", 512, T5_LENGTHS,
        "{'data': 16}", "data_parallel", "none", extra=T5_VOCAB),
    Row("T5.1.1-base", "models/t5_1_1/base.gin", "v5litepod-16", 512, T5_LENGTHS,
        "{'data': 16}", "data_parallel", "none", extra=T5_VOCAB),
    Row("T5.1.1-base", "models/t5_1_1/base.gin", "v5litepod-16", 512, T5_LENGTHS,
        "{'data': 16}", "data_parallel", "full", extra=T5_VOCAB, fixes="remat"),
    Row("T5.1.1-large", "models/t5_1_1/large.gin", "v4-32", 512, T5_LENGTHS,
        "{'fsdp': 16}", "fsdp", "none", extra=T5_VOCAB),
    Row("T5.1.1-large", "models/t5_1_1/large.gin", "v4-32", 512, T5_LENGTHS,
        "{'fsdp': 16}", "fsdp", "full", extra=T5_VOCAB, fixes="remat"),
    Row("T5.1.1-XL", "models/t5_1_1/xl.gin", "v5p-128", 1024, T5_LENGTHS,
        "{'data': 4, 'fsdp': 16}", "fsdp", "none", extra=T5_VOCAB),
    Row("T5.1.1-XXL", "models/t5_1_1/xxl.gin", "v4-256", 1024, T5_LENGTHS,
        "{'data': 128}", "data_parallel", "full", extra=T5_VOCAB),
    Row("T5.1.1-XXL", "models/t5_1_1/xxl.gin", "v4-256", 1024, T5_LENGTHS,
        "{'fsdp': 32, 'tensor': 4}", "data_fsdp_tensor", "full", extra=T5_VOCAB,
        fixes="fsdp + tensor"),
    Row("UL2-20B", "models/ul2/ul2_20b.gin", "v4-512", 1024, T5_LENGTHS,
        "{'fsdp': 64, 'tensor': 4}", "data_fsdp_tensor", "full"),
    Row("decoder-1.1B", "models/decoder/1b.gin", "v5p-32", 256, "{'targets': 2048}",
        "{'fsdp': 16}", "fsdp", "none"),
    Row("decoder-1.1B", "models/decoder/1b.gin", "v5p-32", 256, "{'targets': 2048}",
        "{'fsdp': 16}", "fsdp", "full", fixes="remat"),
    Row("Llama-3-8B-shaped", "models/decoder/llama3_8b.gin", "v5p-128", 256,
        "{'targets': 8192}", "{'fsdp': 64}", "fsdp", "none"),
    Row("Llama-3-8B-shaped", "models/decoder/llama3_8b.gin", "v5p-128", 256,
        "{'targets': 8192}", "{'fsdp': 64}", "fsdp", "full", fixes="remat"),
    Row("Llama-3-8B-shaped", "models/decoder/llama3_8b.gin", "v6e-256", 512,
        "{'targets': 8192}", "{'fsdp': 256}", "fsdp", "full"),
    Row("Llama-3-8B-shaped", "models/decoder/llama3_8b.gin", "v5p-64", 256,
        "{'targets': 8192}", "{'fsdp': 32}", "fsdp", "full", num_slices=2),
    Row("T5.1.1-large", "models/t5_1_1/large.gin", "h100-8", 128, T5_LENGTHS,
        "{'data': 8}", "data_parallel", "none", extra=T5_VOCAB),
    Row("decoder-1.1B", "models/decoder/1b.gin", "h100-8", 64, "{'targets': 2048}",
        "{'fsdp': 8}", "fsdp", "full"),
)


def run_row(row: Row, timeout: float) -> dict:
  """The row's JSON report (or {'error': ...}), from one `python -m t5xlike.compile`."""
  start = time.perf_counter()
  try:
    result = subprocess.run([sys.executable, "-m", "t5xlike.compile", *row.flags()],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  wall = time.perf_counter() - start
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode != 0 or not lines:
    return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1][:300]}
  report = json.loads(lines[-1])
  report["process_s"] = wall
  return report


def _cell(report: dict, row: Row) -> list[str]:
  if "error" in report:
    return [row.name, _target(row), row.mesh, row.rules, row.remat, "", "", "", "",
            f"error: {report['error']}", "", "", ""]
  memory = report["bytes_per_chip"]
  state = (memory["params"] + memory["opt_state"]) / GIB
  fits = "yes" if report["fits"] else "**no**"
  mfu = report["estimated_mfu"]
  roof = report["roofline_s"]
  bound = max(roof, key=roof.get).removesuffix("_s") if any(roof.values()) else ""
  attention = (f"{report['mosaic_kernels']} Pallas" if report["platform"] == "tpu"
               else f"{report['cudnn_attention_kernels']} cuDNN")
  if report["attention_fallbacks"]:
    attention += " (+ einsum fallback)"
  mfu_cell = f"{mfu:.1%}" if mfu is not None else "-"
  if mfu is not None and report.get("depth_probe"):
    mfu_cell += " (probe)"
  elif _faster_than_matmuls(report):
    mfu_cell += " (loops: see below)"
  return [row.name, _target(row), row.mesh.replace("'", ""), row.rules, row.remat,
          f"{state:.2f}", f"{memory['total'] / GIB:.1f} / {memory['hbm'] / GIB:.0f}", fits,
          mfu_cell,
          f"{report['estimated_step_s']:.3g}" if report["estimated_step_s"] else "-",
          _collectives(report) + f" ({bound})", attention,
          f"{report['compile_s']:.0f} / {report['compile_cpu_s']:.0f}"]


def _collectives(report: dict) -> str:
  """GiB per step and chip over the chips' links, plus those sent between slices."""
  dcn = report.get("dcn_bytes_per_step") or 0
  cell = f"{report['collective_bytes_per_step'] / GIB:.2f}"
  return cell + (f" + {dcn / GIB:.2f} DCN" if dcn else "")


#: libtpu's cost model prices a lone large bf16 matmul on v5p at 86% of peak at best
#: ([8192, 8192] x [8192, 8192]; the rows' shapes at 76-86%).
BEST_MATMUL_FRACTION = 0.86


def _faster_than_matmuls(report: dict) -> bool:
  """Whether a TPU estimate is faster than its FLOPs (with remat) at the best fraction of
  peak the cost model gives a matmul: then the loop scaling under-scaled it."""
  compute, step = report["roofline_s"]["compute_s"], report["estimated_step_s"]
  return bool(report["platform"] == "tpu" and step and compute
              and step < compute / BEST_MATMUL_FRACTION)


def _target(row: Row) -> str:
  return f"2 x {row.topology} (DCN)" if row.num_slices == 2 else row.topology


HEADER = ["model", "target", "mesh (per slice)", "rules", "remat", "params + opt GiB/chip",
          "total GiB / HBM", "fits", "est. MFU", "est. step s", "collectives GiB/step (bound)",
          "attention kernels/step", "compile s wall / CPU"]


#: What the estimates are and are not (checked by hand against the rows above; see the
#: commit that last changed them for the probes).
NOTES = [
    "## Reading the estimates",
    "",
    "- **est. MFU** is the model FLOPs of a step (`t5xlike.flops`: no recomputation)",
    "  over (estimated step seconds x chips x the chip's bf16 peak). It is the cost",
    "  model's view of a perfect run: libtpu's `optimal_seconds` sums the compiler's",
    "  per-kernel estimates as scheduled, with no host, input pipeline, launch or",
    "  straggler time and no slow step. It prices big matmuls close to peak (probed on",
    "  v5p: a lone bf16 [8192, 8192] x [8192, 8192] at 86% of peak, the XL row's",
    "  [8192, 2048] x [2048, 5120] at 76%). Measured MFU on the hardware will be",
    "  lower; the estimate ranks configurations, it does not predict a throughput.",
    "- **Loops**: libtpu's and XLA's cost analyses count a loop body once (scan over",
    "  layers, micro-batches); the TPU estimate is scaled by the loops' trip counts",
    "  in libtpu's per-kernel cycle estimates (`t5xlike/aot/step_report.py`).",
    "  Checked on T5.1.1-XL cut to 4+4 layers on v5p-8 (`fsdp: 4`, 16 rows per chip,",
    "  as in the XL row): scanned and scaled 0.0628 s per step, unrolled (no loop,",
    "  libtpu's figure as it is) 0.0620 s: 1.4% apart (53% est. MFU).",
    "- **Depth probe** (`--estimate=probe`, `t5xlike/aot/depth_probe.py`; every row,",
    "  marked '(probe)'): the loop scaling above can be far off, so the rows take the",
    "  step time from the step compiled unrolled at 2 and 4 layers (no loop for libtpu",
    "  to count once) and extrapolated linearly to the full depth. Checked on tiny",
    "  decoders on v5e:2x2: 6 layers 0.386 ms probed against 0.378 ms for the 6-layer",
    "  step unrolled (the loop scaling: 0.774 ms), 8 layers with Pallas 0.531 against",
    "  0.521 ms (loop scaling 1.15 ms): 2% apart (`tests/test_depth_probe.py`).",
    "  T5.1.1-XL on v5p-128: 2+2 layers 0.0317 s, 4+4 0.0586 s, so 24+24 0.327 s,",
    "  **58% est. MFU**; the loop scaling had said 0.211 s (90%: under-scaled, most",
    "  likely because the kernels outside the loops carry cycles `optimal_seconds`",
    "  overlaps). Llama-3-8B-shaped, full remat: 2 layers 0.627 s, 4 layers 0.970 s,",
    "  so 32 layers 5.77 s, **72%** (loop scaling 5.49 s, 75%: close). The 8B's",
    "  figure is the cost model's pricing, not a loop artefact: its step's matmuls",
    "  (per chip [32768, 4096] x [4096, 14336] and alike) at ~94% of peak (hardware",
    "  FLOPs 1.60e17 over 5.77 s x 64 chips x 459 TFLOP/s), and its MFU bounded by",
    "  full remat (model / hardware FLOPs 0.76). So both exceed 50% in the cost",
    "  model's terms: compute-bound (collectives 0.06 s and 0.16 s at ICI bandwidth,",
    "  HBM traffic below compute); the 8B would gain most from a remat policy that",
    "  keeps some matmul outputs (42 of 95 GiB used). Measured MFU on the hardware",
    "  will be lower. The 8B on v6e-256: 2 layers 0.169 s, 4 layers 0.258 s, so 32",
    "  layers 1.51 s, **68%**. The other rows against their loop scaling (the JSON's",
    "  `loop_scaled_step_s`): T5.1.1-small 0.081 s vs 0.088, base 0.244 vs 0.237,",
    "  large (v4-32) 1.23 vs 1.55, XXL 2.70 vs 3.44, UL2-20B 1.07 vs 1.26,",
    "  decoder-1.1B 1.21 vs 1.43, the 8B on v6e-256 1.51 vs 1.37: 3-27% apart, the",
    "  loop scaling mostly too slow for these. Probes cost compile time (XL's two",
    "  1,200 s wall and the 8B's 1,580 s on a loaded host; 150-290 s for the others",
    "  on a quiet one).",
    "- **The T5 rows below XL** come out far slower than their FLOPs at peak",
    "  (T5.1.1-large on v4-32: 1.23 s probed against 0.23 s; XXL 2.70 s against",
    "  0.83 s). Where libtpu puts that time was not traced: the table's bound and",
    "  roofline terms are loop-scaled (as coarse as the loop scaling), and T5's",
    "  relative-position bias, which the Pallas kernel takes as a dense float32",
    "  [rows, heads, q, k] array, accounts for under 0.1 s of HBM traffic per step on",
    "  the large row by hand (32 rows x 16 heads x 512 x 512 x 4 bytes, written and",
    "  read ~7 times in each of 24 encoder layers, forward, recomputed, backward).",
    "  UL2-20B (4x the width per head) reaches **51%**.",
    "- **(loops: see below)** would mark a loop-scaled estimate faster than its FLOPs",
    "  (with remat) at the 86% of peak the cost model gives a lone big matmul, where",
    "  the loop scaling may be under-scaled as it was for XL; no row is marked now,",
    "  every row being probed.",
    "- **2 x v5p-64 over DCN**: libtpu's cost model prices the multi-slice program's",
    "  transfers between slices (host transfers of the multi-slice runtime, `dcn-*` in",
    "  the JSON's collectives) as free and adds -1 s for each of its `ZeroCrop` and",
    "  `SliceId` kernels (taken out again, as `ConcatBitcast`'s). The estimate is",
    "  therefore libtpu's figure for the slices' own work plus the transfers' time at",
    "  v5p's 50 Gb/s of data-center network per chip (a ring all-reduce over the",
    "  slices: 2 (n - 1) / n of the bytes), not overlapped with the backward pass: a",
    "  pessimistic sum. Checked on the tiny decoder (fsdp 4 in each of 2 x v5e:2x2,",
    "  `tests/test_compile_tpu.py`): what is left after the transfers is within 25%",
    "  of one slice's step with as many rows per chip (measured 6%). The 8B: 0.50 GiB",
    "  per chip per step between slices (its gradient shard, reduced in bfloat16),",
    "  0.09 s; probed 2 layers 0.668 s, 4 layers 1.020 s, so 5.95 s, **70%** (one",
    "  slice of 64 chips, same batch: 5.77 s, 72%).",
    "- **GPU rows** (`h100-8`): XLA's GPU compiler exposes no cost model, so the step",
    "  is our roofline: the largest of compute at peak, HBM traffic and collectives",
    "  at NVLink bandwidth, perfectly overlapped. XLA's HLO cost analysis counts a",
    "  loop body once, so the HBM term is taken from the step unrolled at 2 and 4",
    "  layers (`--estimate=probe`, bytes accessed at HBM bandwidth) and extrapolated;",
    "  the loop scaling it replaces multiplied the work outside the loops too",
    "  (T5.1.1-large: 0.35 s, 6.9%). T5.1.1-large: 2+2 layers 5.0 ms, 4+4 7.9 ms of",
    "  HBM traffic, so 36.7 ms at 24+24 against 24.3 ms of FLOPs at peak: HBM-bound,",
    "  **66%**. decoder-1.1B (full remat): HBM 78 ms, FLOPs 159 ms: compute-bound,",
    "  **76%**, the model over the hardware FLOPs (remat's recompute), an upper",
    "  bound. Per-GPU memory and the cuDNN fused-attention kernels taken (no",
    "  fallback) are the compiler's figures; `scripts/gpu_mfu.py` measures MFU on a",
    "  real H100 / H200.",
    "- **Pallas block sizes**: 128 on every generation, the cost model's choice",
    "  (`scripts/pallas_blocks.py`, docs/pallas_blocks.md).",
    "- **Compile times** are wall / CPU seconds on a shared 2-core host: several",
    "  rows compiled while other jobs held the cores (wall well above CPU).",
]


def write_table(rows: list[tuple[Row, dict]], path: pathlib.Path) -> None:
  lines = [
      "# Scale table: the real train step compiled for TPU slices and GPU nodes",
      "",
      "Made by `python scripts/scale_table.py` on a 2-core CPU host (no accelerator):",
      "every row is `python -m t5xlike.compile --json` with the row's gin files and",
      "overrides (bfloat16 activations, float32 parameters, Adafactor, scan over layers,",
      "the batch of the row; the raw JSON lines are in `docs/scale_table.jsonl`).",
      "**MFU and step times are the compiler cost model's estimates (TPU: libtpu's",
      "`optimal_seconds`; GPU: our roofline), not measurements.** Memory is the",
      "compiler's per-chip peak (arguments + outputs - donated + temporaries + code)",
      "against the chip's HBM. `docs/partitioning.md` says how to read it to choose a",
      "mesh.",
      "",
      "| " + " | ".join(HEADER) + " |",
      "|" + "---|" * len(HEADER),
  ]
  for row, report in rows:
    cells = _cell(report, row)
    if row.fixes:
      cells[0] += f" ({row.fixes}: fits the row above)"
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", *NOTES]
  lines += ["", "Rows: " + "; ".join(
      f"`{row.key}`: {row.batch} x {row.lengths}, {row.microbatches} micro-batch(es)"
      for row, _ in rows), ""]
  path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", action="append", default=[],
                      help="rows whose key contains this (repeatable)")
  parser.add_argument("--output", default=str(REPO / "docs" / "scale_table.md"))
  parser.add_argument("--jsonl", default=None)
  parser.add_argument("--timeout", type=float, default=3600.0)
  parser.add_argument("--table_only", action="store_true",
                      help="compile nothing: rewrite the table from the JSON lines")
  args = parser.parse_args(argv)
  output = pathlib.Path(args.output)
  jsonl = pathlib.Path(args.jsonl or output.with_suffix(".jsonl"))
  reports: dict[str, dict] = {}
  if jsonl.exists():  # rows not compiled this time keep their last report
    for line in jsonl.read_text().splitlines():
      entry = json.loads(line)
      reports[entry["row"]] = entry["report"]
  for row in ROWS:
    if args.table_only or (args.only and not any(s in row.key for s in args.only)):
      continue
    print(f"compiling {row.key} ...", file=sys.stderr, flush=True)
    reports[row.key] = run_row(row, args.timeout)
    print(json.dumps({"row": row.key, "report": reports[row.key]}), flush=True)
    done = [(r, reports.get(r.key, {"error": "not run"})) for r in ROWS]
    jsonl.write_text("".join(json.dumps({"row": r.key, "report": rep}) + "\n"
                             for r, rep in done if r.key in reports))
    write_table(done, output)
  if args.table_only:
    write_table([(r, reports.get(r.key, {"error": "not run"})) for r in ROWS], output)
  return 0


if __name__ == "__main__":
  sys.exit(main())
