"""Fine-tunes on data selections against a random selection of the same size, same steps.

  python scripts/selection_experiment.py --checkpoint=/tmp/t5xlike_quickstart/checkpoint_400 \
    --work_dir=/tmp/selection [--scorer_steps=100] [--steps=300] [--fraction=0.5] \
    [--arms=random,loss,ifd,kcenter,kmeans,full]

1. The scorer: with --scorer_steps > 0, a short fine-tune of --checkpoint on the
   whole offline multitask mixture (Cherry LLM's "brief experience", Li et al.
   2024 §2.2, here a plain short fine-tune); otherwise --checkpoint itself.
2. The held-out set: the validation splits of `multitask_offline` cached into
   WORK_DIR/cache (`python -m t5xlike.cache_tasks`).
3. One selection per arm (`python -m t5xlike.select_data --score=ARM
   --fraction=F` with the scorer) into WORK_DIR/cache, timed.
4. One fine-tune per arm from --checkpoint (runs/finetune.gin, --steps steps,
   the same seed): on the selection `sel_<arm>` (USE_CACHED_TASKS=True), or on the
   whole mixture for 'full'; evaluated once at the end on `multitask_offline`'s
   validation (all 300 examples of each task, greedy decoding).

Prints one JSON line per arm and a Markdown table: the examples chosen per task,
selection seconds, fine-tune seconds (wall), and the held-out loss (mean over
the five tasks of each task's NLL per target token) and metric (mean of each
task's first metric of METRICS) at the last step.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL_GIN = "--gin_file=gin_configs/models/t5_1_1/tiny.gin"
METRICS = ("accuracy", "sequence_accuracy", "rouge1")  # A task's headline metric.
TASKS = ("mt_reverse_words", "mt_count_words", "mt_first_word", "mt_fill_blank", "mt_continue")


def call(command: list[str], log_path: pathlib.Path) -> tuple[int, float]:
  """(exit code, wall seconds) of a command run from the repository, its output in a log."""
  began = time.perf_counter()
  with open(log_path, "w") as log:
    code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
  return code, round(time.perf_counter() - began, 1)


def start_step(checkpoint: str) -> int:
  return int(pathlib.Path(checkpoint).name.rsplit("_", 1)[1])


def finetune(name: str, checkpoint: str, steps: int, work: pathlib.Path, extra: list[str],
             evaluate: bool = True) -> tuple[int, float, pathlib.Path, int]:
  """(exit code, wall seconds, MODEL_DIR, final step) of a fine-tune from `checkpoint`,
  evaluated at its last step (or never)."""
  model_dir = work / "runs" / name
  total = start_step(checkpoint) + steps
  command = [sys.executable, "-m", "t5xlike.train", MODEL_GIN,
             "--gin_file=gin_configs/runs/finetune.gin",
             f"--gin.INITIAL_CHECKPOINT_PATH={checkpoint}", f"--gin.MODEL_DIR={model_dir}",
             f"--gin.TRAIN_STEPS={total}", f"--gin.EVAL_PERIOD={total if evaluate else None}",
             f"--gin.CHECKPOINT_PERIOD={total}", "--gin.EVAL_MAX_EXAMPLES=300", *extra]
  code, seconds = call(command, work / f"{name}.log")
  return code, seconds, model_dir, total


def held_out(model_dir: pathlib.Path, step: int) -> dict:
  """The last evaluation's per-task loss and headline metric, and their means."""
  rows = [json.loads(line) for line in (model_dir / "metrics" / "eval.jsonl").read_text()
          .splitlines()]
  tasks = {r["task"]: r for r in rows if r["step"] == step and r["task"] in TASKS}
  metric = {t: next(r[m] for m in METRICS if m in r) for t, r in tasks.items()}
  return {"loss": statistics.mean(r["loss"] for r in tasks.values()),
          "metric": statistics.mean(metric.values()),
          "tasks": {t: {"loss": r["loss"], "metric": metric[t]} for t, r in tasks.items()}}


def table(rows: list[dict]) -> str:
  lines = ["| arm | examples (reverse / count / first / blank / continue) | selection | "
           "fine-tune | held-out loss | held-out metric (mean %) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("error"):
      lines.append(f"| {r['arm']} | failed: {r['error']} | | | | |")
      continue
    chosen = " / ".join(f"{r['selected'].get(t, 0):,}" for t in TASKS)
    selection = f"{r['selection_s']:.0f} s" if r.get("selection_s") is not None else "-"
    lines.append(f"| {r['arm']} | {chosen} | {selection} | {r['finetune_s']:.0f} s | "
                 f"{r['held_out']['loss']:.3f} | {r['held_out']['metric']:.1f} |")
  return "\n".join(lines)


def run_arm(arm: str, args, scorer: str, work: pathlib.Path, cache: pathlib.Path) -> dict:
  row: dict = {"arm": arm}
  if arm == "full":
    counts = {"mt_reverse_words": 10_000, "mt_count_words": 5_000, "mt_first_word": 4_000,
              "mt_fill_blank": 10_000, "mt_continue": 7_000}
    row["selected"], row["selection_s"] = counts, None
    extra = ["--gin.EVAL_MIXTURE_OR_TASK_NAME='multitask_offline'"]
  else:
    name = f"sel_{arm}"
    code, seconds = call([sys.executable, "-m", "t5xlike.select_data", MODEL_GIN,
                          "--gin_file=gin_configs/runs/select_data.gin",
                          f"--gin.CHECKPOINT_PATH={scorer}", f"--score={arm}",
                          f"--fraction={args.fraction}", f"--name={name}",
                          f"--output_dir={cache}"], work / f"select_{arm}.log")
    if code:
      return {**row, "error": f"select_data exit {code}, {work / f'select_{arm}.log'}"}
    manifest = json.loads((cache / name / "selection.json").read_text())
    row["selected"] = {t["source"]: t["selected"] for t in manifest["tasks"]}
    row["selection_s"], row["selection_detail_s"] = seconds, manifest["seconds"]
    extra = [f"--gin.MIXTURE_OR_TASK_NAME='{name}'", "--gin.USE_CACHED_TASKS=True",
             f"--gin.TASK_CACHE_DIR={cache}",
             "--gin.EVAL_MIXTURE_OR_TASK_NAME='multitask_offline'"]
  code, seconds, model_dir, total = finetune(arm, args.checkpoint, args.steps, work, extra)
  if code:
    return {**row, "error": f"train exit {code}, {work / f'{arm}.log'}"}
  row["finetune_s"] = seconds
  row["held_out"] = held_out(model_dir, total)
  return row


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="the quickstart's checkpoint_400")
  parser.add_argument("--work_dir", required=True)
  parser.add_argument("--scorer_steps", type=int, default=100)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--fraction", type=float, default=0.5)
  parser.add_argument("--arms", default="random,loss,ifd,kcenter,kmeans,full")
  args = parser.parse_args()
  work = pathlib.Path(args.work_dir)
  cache = work / "cache"
  work.mkdir(parents=True, exist_ok=True)
  scorer = args.checkpoint
  if args.scorer_steps:
    code, seconds, model_dir, total = finetune("scorer", args.checkpoint, args.scorer_steps,
                                               work, [], evaluate=False)
    if code:
      print(f"scorer fine-tune failed: see {work / 'scorer.log'}", file=sys.stderr)
      return 1
    scorer = str(model_dir / f"checkpoint_{total}")
    print(json.dumps({"scorer": scorer, "seconds": seconds}), flush=True)
  code, _ = call([sys.executable, "-m", "t5xlike.cache_tasks", "--tasks=multitask_offline",
                  "--splits=validation", "--module=t5xlike.tasks.multitask",
                  f"--output_dir={cache}"],
                 work / "cache_tasks.log")
  if code:
    print(f"cache_tasks failed: see {work / 'cache_tasks.log'}", file=sys.stderr)
    return 1
  rows = []
  for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
    rows.append(run_arm(arm, args, scorer, work, cache))
    print(json.dumps(rows[-1]), flush=True)
  print(table(rows))
  return 0 if not any(r.get("error") for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
