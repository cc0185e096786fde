"""Benchmarks the fine-tuning techniques of gin_configs/finetune/ from one checkpoint.

  python scripts/benchmark_finetuning.py --checkpoint=/tmp/t5xlike_quickstart/checkpoint_400 \
    --steps=200 --work_dir=/tmp/ft_bench [--methods=full,llrd,sparse_ft] \
    [--override=sparse_ft:SPARSE_DENSE_STEPS=50] [--eval_max_examples=32]

Methods: 'full' (runs/finetune.gin alone) and every gin_configs/finetune/<method>.gin
that includes runs/finetune.gin and no model gin of its own (files starting with
'_' are shared pieces, not methods): new technique files are picked up as they
land. Each runs `python -m t5xlike.train` with the model gin (--model_gin) for
--steps steps after the checkpoint's step, evaluation (runs/finetune.gin's
InferenceEvaluator, --eval_max_examples per task) at the last step only, one
checkpoint at the end. Prints one JSON line per method and a Markdown table:
trainable parameters (from the run's log), size on disk of what the technique
exports (MODEL_DIR/peft/ or MODEL_DIR/sparse_delta/) or else of the final
checkpoint's parameters (float32 bytes), the whole final checkpoint's size,
median step time (log rows after the first, which includes compilation), and
the eval metrics of metrics/eval.jsonl (mean target NLL per token over the
tasks, and the mean of each task's first metric of METRICS).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
FINETUNE = REPO / "gin_configs" / "finetune"
EXPORTS = ("peft", "sparse_delta")  # Techniques' exports beside the checkpoints.
METRICS = ("accuracy", "sequence_accuracy", "rouge1")  # A task's headline metric.


def methods() -> list[str]:
  """'full' and the technique gin files that fine-tune the run's model."""
  found = []
  for path in sorted(FINETUNE.glob("*.gin")):
    text = path.read_text()
    if path.name.startswith("_") or "runs/finetune.gin" not in text:
      continue
    if re.search(r"^include\s+'models/", text, re.M):  # Brings its own model (ELECTRA).
      continue
    found.append(path.stem)
  return ["full"] + found


def du(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def params_bytes(step_dir: pathlib.Path) -> int:
  sys.path.insert(0, str(REPO))
  from t5xlike import checkpoints
  total = 0
  for shape in checkpoints.saved_param_shapes(step_dir).values():
    size = 4
    for dim in shape:
      size *= dim
    total += size
  return total


def run(method: str, args, start_step: int) -> dict:
  model_dir = pathlib.Path(args.work_dir) / method
  total = start_step + args.steps
  gin = "runs/finetune.gin" if method == "full" else f"finetune/{method}.gin"
  command = [sys.executable, "-m", "t5xlike.train", f"--gin_file={args.model_gin}",
             f"--gin_file=gin_configs/{gin}", f"--gin.INITIAL_CHECKPOINT_PATH={args.checkpoint}",
             f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={total}",
             f"--gin.EVAL_PERIOD={total}", f"--gin.CHECKPOINT_PERIOD={total}",
             f"--gin.LOG_PERIOD={args.log_period}",
             f"--gin.EVAL_MAX_EXAMPLES={args.eval_max_examples}",
             # The training tasks and the held-out ones (zero-shot), as docs/finetuning.md shows.
             "--gin.EVAL_MIXTURE_OR_TASK_NAME='multitask_offline_all'"]
  command += [f"--gin.{o.split(':', 1)[1]}" for o in args.override
              if o.split(":", 1)[0] == method]
  log_path = pathlib.Path(args.work_dir) / f"{method}.log"
  began = time.perf_counter()
  with open(log_path, "w") as log:
    code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
  row = {"method": method, "exit_code": code, "wall_s": round(time.perf_counter() - began, 1),
         "log": str(log_path)}
  if code != 0:
    return row
  text = log_path.read_text()
  match = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", text)
  if match:
    row["trainable"] = int(match.group(1).replace(",", ""))
    row["total"] = int(match.group(2).replace(",", ""))
  match = re.search(r"sparse phase trains ([\d,]+) parameters", text)
  if match:  # Sparse fine-tuning: the candidates train densely first, then k of them.
    row["trainable_sparse_phase"] = int(match.group(1).replace(",", ""))
  train_rows = [json.loads(line) for line in (model_dir / "metrics" / "train.jsonl").read_text()
                .splitlines()]
  times = [r["step_time_s"] for r in train_rows[1:] if "step_time_s" in r]
  row["median_step_time_s"] = statistics.median(times) if times else None
  step_dir = model_dir / f"checkpoint_{total}"
  export = next((model_dir / e for e in EXPORTS if (model_dir / e).exists()), None)
  row["export"] = export.name if export else "params"
  row["size_bytes"] = du(export) if export else params_bytes(step_dir)
  row["checkpoint_bytes"] = du(step_dir)
  evals = [json.loads(line) for line in (model_dir / "metrics" / "eval.jsonl").read_text()
           .splitlines()]
  tasks = {r["task"]: r for r in evals if r["step"] == total and "examples" in r}
  row["eval"] = {task: {k: v for k, v in r.items() if k in METRICS + ("loss",)}
                 for task, r in tasks.items()}
  losses = [r["loss"] for r in tasks.values() if "loss" in r]
  headline = [next(r[m] for m in METRICS if m in r) for r in tasks.values()
              if any(m in r for m in METRICS)]
  row["eval_loss"] = statistics.mean(losses) if losses else None
  row["eval_metric"] = statistics.mean(headline) if headline else None
  return row


def table(rows: list[dict]) -> str:
  lines = ["| method | trainable parameters | size on disk (what) | full checkpoint | "
           "median step time | eval loss (mean NLL/token) | eval metric (mean %) |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("exit_code"):
      lines.append(f"| {r['method']} | failed (exit {r['exit_code']}, {r['log']}) | | | | | |")
      continue
    share = f" ({100.0 * r['trainable'] / r['total']:.1f}%)" if "trainable" in r else ""
    if "trainable_sparse_phase" in r:
      share += (f", then {r['trainable_sparse_phase']:,} "
                f"({100.0 * r['trainable_sparse_phase'] / r['total']:.2f}%)")
    lines.append(
        f"| {r['method']} | {r.get('trainable', 0):,}{share} | "
        f"{r['size_bytes'] / 1e6:.2f} MB ({r['export']}) | {r['checkpoint_bytes'] / 1e6:.2f} MB | "
        f"{r['median_step_time_s']:.3f} s | {r['eval_loss']:.3f} | {r['eval_metric']:.1f} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="pretrained step directory")
  parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per method")
  parser.add_argument("--work_dir", required=True)
  parser.add_argument("--methods", default=None, help="comma-separated (default: all found)")
  parser.add_argument("--model_gin", default="gin_configs/models/t5_1_1/tiny.gin")
  parser.add_argument("--eval_max_examples", type=int, default=32)
  parser.add_argument("--log_period", type=int, default=10)
  parser.add_argument("--override", action="append", default=[],
                      help="METHOD:NAME=VALUE, a gin macro for one method (repeatable)")
  args = parser.parse_args()
  checkpoint = pathlib.Path(args.checkpoint)
  match = re.fullmatch(r"checkpoint_(\d+)", checkpoint.name)
  if not (checkpoint / "state").exists() or not match:
    print(f"error: --checkpoint={checkpoint} is not a step directory MODEL_DIR/checkpoint_<N>",
          file=sys.stderr)
    return 2
  available = methods()
  chosen = available if not args.methods else args.methods.split(",")
  unknown = [m for m in chosen if m not in available]
  if unknown:
    print(f"error: --methods: unknown {unknown} (found: {available})", file=sys.stderr)
    return 2
  pathlib.Path(args.work_dir).mkdir(parents=True, exist_ok=True)
  rows = []
  for method in chosen:
    row = run(method, args, int(match.group(1)))
    print(json.dumps(row), flush=True)
    rows.append(row)
  print(table(rows))
  return 0 if all(not r.get("exit_code") for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
