"""The runs of a replication: public commands in fresh processes, resumable, one log each.

Every experiment under `scripts/replicate/` drives the stack only through its
commands (`python -m t5xlike.train | eval | merge`) and shipped gin files, as
a user would. `Runs(out_dir)` executes them one at a time:

  OUT/<name>/          the run's MODEL_DIR (train) or EVAL_OUTPUT_DIR (eval) or
                       --output (merge)
  OUT/logs/<name>.log  its stdout and stderr
  OUT/<name>/.done     written after the command exited 0, with the command: a
                       re-invocation of the experiment skips the run when its
                       command is the same (a run that failed, was interrupted or
                       was made by another command, e.g. `--fast`, is started
                       again from a clean directory)

and prints one progress line per run (`[3/14] ft_lr3e-4_s0: 41 s`). A failing
command ends the experiment with one line naming the run and its log's last
line (`SystemExit`), after its own partial output is removed.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]


def gin_value(value: Any) -> str:
  """A Python value as a `--gin.NAME=VALUE` literal (strings quoted, None, numbers,
  lists and dicts as their repr)."""
  return repr(value)


class Runs:
  """Resumable public-command runs under `out_dir` (see the module docstring).

  Args:
    out_dir: the experiment's output directory (created).
    total: how many runs the experiment plans (for the progress lines).
  """

  def __init__(self, out_dir: str | os.PathLike, total: int | None = None):
    self.out = pathlib.Path(out_dir).resolve()
    (self.out / "logs").mkdir(parents=True, exist_ok=True)
    self.total, self.count = total, 0

  def path(self, name: str) -> pathlib.Path:
    return self.out / name

  def train(self, name: str, gin_files: Sequence[str], overrides: Mapping[str, Any]
            ) -> pathlib.Path:
    """`python -m t5xlike.train` with MODEL_DIR = OUT/name; returns the model dir."""
    return self._command(name, "t5xlike.train", gin_files, {"MODEL_DIR": None, **overrides},
                         dir_binding="MODEL_DIR")

  def evaluate(self, name: str, gin_files: Sequence[str], checkpoint: str | os.PathLike,
               overrides: Mapping[str, Any] | None = None) -> pathlib.Path:
    """`python -m t5xlike.eval` of `checkpoint` with EVAL_OUTPUT_DIR = OUT/name."""
    bindings = {"CHECKPOINT_PATH": str(checkpoint), **(overrides or {})}
    return self._command(name, "t5xlike.eval", gin_files, bindings,
                         dir_binding="EVAL_OUTPUT_DIR")

  def merge(self, name: str, flags: Sequence[str], gin_files: Sequence[str] = (),
            overrides: Mapping[str, Any] | None = None) -> pathlib.Path:
    """`python -m t5xlike.merge FLAGS --output=OUT/name`; returns the output dir."""
    return self._command(name, "t5xlike.merge", gin_files, overrides or {},
                         extra=[*flags, f"--output={self.path(name)}"])

  def _command(self, name: str, module: str, gin_files: Sequence[str],
               bindings: Mapping[str, Any], dir_binding: str | None = None,
               extra: Sequence[str] = ()) -> pathlib.Path:
    self.count += 1
    where = self.path(name)
    label = f"[{self.count}/{self.total or '?'}] {name}"
    if dir_binding:
      bindings = {**bindings, dir_binding: str(where)}
    command = [sys.executable, "-m", module]
    command += [f"--gin_file={gin}" for gin in gin_files]
    command += [f"--gin.{key}={gin_value(value)}" for key, value in bindings.items()]
    command += list(extra)
    done = where / ".done"
    if done.exists() and json.loads(done.read_text())["command"][1:] == command[1:]:
      print(f"{label}: done before, kept", flush=True)
      return where
    if where.exists():  # unfinished, or made by another command (e.g. --fast): again
      shutil.rmtree(where)
    log = self.out / "logs" / f"{name}.log"
    start = time.perf_counter()
    print(f"{label}: running ({module})", flush=True)
    with open(log, "w") as stream:
      stream.write(" ".join(command) + "\n\n")
      stream.flush()
      proc = subprocess.run(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
                            check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
      if where.exists():
        shutil.rmtree(where)
      lines = [line for line in log.read_text().splitlines() if line.strip()]
      raise SystemExit(f"replicate: run {name} failed (exit {proc.returncode}; log {log}): "
                       f"{lines[-1] if lines else '(no output)'}")
    where.mkdir(parents=True, exist_ok=True)
    (where / ".done").write_text(json.dumps({"command": command,
                                             "seconds": time.perf_counter() - start}) + "\n")
    print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
    return where


def eval_rows(directory: str | os.PathLike, step: int | None = None) -> dict[str, dict]:
  """The rows of `directory/metrics/eval.jsonl` at `step` (default: the last step),
  by task name."""
  path = pathlib.Path(directory) / "metrics" / "eval.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  if not rows:
    raise SystemExit(f"replicate: {path} holds no evaluation")
  step = max(row["step"] for row in rows) if step is None else step
  return {row["task"]: row for row in rows if row["step"] == step}


#: The headline metric of a multitask task, the first of these its eval row has.
HEADLINE = ("accuracy", "sequence_accuracy", "rouge1")


def task_summary(eval_dir: str | os.PathLike, tasks: Sequence[str] | None = None) -> dict:
  """{'loss': mean over the tasks, 'metric': mean of their headline metrics (None when
  none has one), 'tasks': {task: {'loss', 'metric'}}} of an eval run's last rows (every
  task but the mixture's own row, or only `tasks`)."""
  rows = {task: row for task, row in eval_rows(eval_dir).items()
          if (tasks is None or task in tasks) and "loss" in row
          and not task.startswith("multitask_offline")}
  if not rows:
    raise SystemExit(f"replicate: {eval_dir} has no loss for {tasks or 'any task'}")
  per_task = {task: {"loss": row["loss"], "metric": next((row[m] for m in HEADLINE if m in row),
                                                         None)}
              for task, row in sorted(rows.items())}
  metrics = [r["metric"] for r in per_task.values() if r["metric"] is not None]
  return {"loss": statistics.mean(r["loss"] for r in per_task.values()),
          "metric": statistics.mean(metrics) if metrics else None, "tasks": per_task}


def grouped(rows: Sequence[Mapping[str, Any]], by: str,
            value: str | Callable[[Mapping[str, Any]], Any]) -> dict[Any, list]:
  """{group: [value of each row]} of result rows by their `by` field, groups in the order
  they first appear; `value` is a field name or a function of the row."""
  read = value if callable(value) else (lambda row: row[value])
  out: dict[Any, list] = {}
  for row in rows:
    out.setdefault(row[by], []).append(read(row))
  return out


def last_checkpoint(model_dir: str | os.PathLike) -> pathlib.Path:
  """The highest `checkpoint_<step>` directory of a run."""
  found = sorted(pathlib.Path(model_dir).glob("checkpoint_*"),
                 key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit()
                 else -1)
  if not found:
    raise SystemExit(f"replicate: no checkpoint in {model_dir}")
  return found[-1]


def write_json(path: str | os.PathLike, value: Any) -> None:
  pathlib.Path(path).write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(pathlib.Path(path).read_text())


def quickstart_base(runs: Runs, steps: int, checkpoint: str | None = None) -> pathlib.Path:
  """The pretrained base of the fine-tuning experiments: the quickstart
  (`gin_configs/quickstart.gin`) trained for `steps` steps in OUT/base, or the given
  quickstart checkpoint, whose step must be `steps` (the protocol's)."""
  if checkpoint is None:
    return last_checkpoint(runs.train("base", ["gin_configs/quickstart.gin"],
                                      {"TRAIN_STEPS": steps, "EVAL_PERIOD": None}))
  path = pathlib.Path(checkpoint).resolve()
  if not path.is_dir() or path.name != f"checkpoint_{steps}":
    raise SystemExit(f"replicate: --base_checkpoint {checkpoint} is not a checkpoint_{steps} "
                     "directory of the quickstart")
  return path


def pyplot():
  """`matplotlib.pyplot` on the file-only Agg backend (imported when a plot is drawn)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def finish(out_dir: str | os.PathLike, name: str, results: dict, figure, row: str) -> None:
  """Writes OUT/results.json, the matplotlib `figure` as OUT/<name>.png and the table row(s)
  as OUT/rows.md, and prints the row(s)."""
  out = pathlib.Path(out_dir)
  write_json(out / "results.json", results)
  figure.tight_layout()
  figure.savefig(out / f"{name}.png", dpi=110)
  pyplot().close(figure)
  (out / "rows.md").write_text(row + "\n")
  print(row)


def main(argv: Sequence[str] | None, doc: str, run, shares_base: bool = False) -> int:
  """The command line of an experiment: --output_dir, --fast and, for the fine-tuning
  experiments (`shares_base`), --base_checkpoint; calls `run(output_dir, fast[, base])`."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--output_dir", required=True)
  p.add_argument("--fast", action="store_true", help="a toy size: the mechanics only")
  if shares_base:
    p.add_argument("--base_checkpoint", help="the pretrained checkpoint to start from, as "
                   "the script's docstring says (its step must be the protocol's; default: "
                   "train one in OUTPUT_DIR/base)")
  args = p.parse_args(argv)
  if shares_base:
    run(args.output_dir, args.fast, args.base_checkpoint)
  else:
    run(args.output_dir, args.fast)
  return 0
