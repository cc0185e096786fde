"""Compiles the train step of each row below for its TPU slice or GPU node and writes the
scale table (docs/scale_table.md): per-chip memory against HBM, fits, the cost model's
estimated MFU, collective bytes per step, compile time.

    python scripts/scale_table.py [--only SUBSTRING ...] [--output docs/scale_table.md]
        [--jsonl FILE] [--timeout SECONDS]

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
  return [row.name, _target(row), row.mesh.replace("'", ""), row.rules, row.remat,
          f"{state:.2f}", f"{memory['total'] / GIB:.1f} / {memory['hbm'] / GIB:.0f}", fits,
          f"{mfu:.1%}" if mfu is not None else "-",
          f"{report['estimated_step_s']:.3g}" if report["estimated_step_s"] else "-",
          f"{report['collective_bytes_per_step'] / GIB:.2f} ({bound})", attention,
          f"{report['compile_s']:.0f} / {report['compile_cpu_s']:.0f}"]


def _target(row: Row) -> str:
  return f"2 x {row.topology} (DCN)" if row.num_slices == 2 else row.topology


HEADER = ["model", "target", "mesh (per slice)", "rules", "remat", "params + opt GiB/chip",
          "total GiB / HBM", "fits", "est. MFU", "est. step s", "collectives GiB/step (bound)",
          "attention kernels/step", "compile s wall / CPU"]


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
  args = parser.parse_args(argv)
  output = pathlib.Path(args.output)
  jsonl = pathlib.Path(args.jsonl or output.with_suffix(".jsonl"))
  reports: dict[str, dict] = {}
  if jsonl.exists():  # rows not compiled this time keep their last report
    for line in jsonl.read_text().splitlines():
      entry = json.loads(line)
      reports[entry["row"]] = entry["report"]
  for row in ROWS:
    if args.only and not any(s in row.key for s in args.only):
      continue
    print(f"compiling {row.key} ...", file=sys.stderr, flush=True)
    reports[row.key] = run_row(row, args.timeout)
    print(json.dumps({"row": row.key, "report": reports[row.key]}), flush=True)
    done = [(r, reports.get(r.key, {"error": "not run"})) for r in ROWS]
    jsonl.write_text("".join(json.dumps({"row": r.key, "report": rep}) + "\n"
                             for r, rep in done if r.key in reports))
    write_table(done, output)
  return 0


if __name__ == "__main__":
  sys.exit(main())
