"""Runs the reliability fault matrix against the quickstart config; prints a table.

  python scripts/fault_drill.py            # every case (~16 min on 2 CPU cores)
  python scripts/fault_drill.py --fast     # the CI subset (~2 min)
  python scripts/fault_drill.py --markdown # the table as docs/reliability.md shows it

Every case runs `python -m t5xlike.train` (or `t5xlike.infer`) in a
subprocess on the quickstart config shrunk to a few seconds per run (batch 4,
lengths 32/8, 12 steps, a checkpoint every 3) and checks the exit code, the
last stderr line, that no traceback is printed, and what MODEL_DIR holds
afterwards. Faults are injected the way they happen (signals, `kill -9`,
truncated files, a file where a directory should be) or, for NaN and
disk-full, through the test hooks of `t5xlike.training.fault_hooks` (loaded by
`tests/gin/fault_hooks.gin`). Exit code 0
when every case passes. See docs/reliability.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
BASE = ["--gin_file=gin_configs/quickstart.gin", "--gin.BATCH_SIZE=4",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.LOG_PERIOD=1",
        "--gin.EVAL_PERIOD=None", "--gin.CHECKPOINT_PERIOD=3", f"--gin.TRAIN_STEPS={STEPS}",
        "--gin.CheckpointConfig.async_save=False"]
#: The fault hooks (none active until FAULT_NAN_AT_STEPS / FAULT_ENOSPC_AT_STEPS are set).
FAULTS = [f"--gin_file={REPO / 'tests' / 'gin' / 'fault_hooks.gin'}"]
INFER = ["--gin_file=gin_configs/models/t5_1_1/tiny.gin", "--gin_file=runs/infer.gin",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=2"]


@dataclasses.dataclass
class Outcome:
  case: str
  expected: str
  observed: str
  ok: bool
  seconds: float = 0.0


@dataclasses.dataclass
class Case:
  name: str
  expected: str
  run: Callable[[Drill], tuple[str, bool]]
  fast: bool = False


def _env(**extra: str) -> dict[str, str]:
  env = dict(os.environ)
  env.pop("T5XLIKE_TRACEBACK", None)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
  return env


def rows(model_dir: pathlib.Path, kind: str = "train") -> list[dict]:
  """The metrics rows of a run (a line being written is skipped)."""
  path = model_dir / "metrics" / f"{kind}.jsonl"
  out = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return out


def steps_saved(model_dir: pathlib.Path) -> list[int]:
  return sorted(int(p.name.split("_")[1]) for p in model_dir.glob("checkpoint_*")
                if p.name.split("_")[1].isdigit())


def listing(path: pathlib.Path) -> list[tuple[str, int]]:
  """(relative path, size) of every file under `path` (what 'nothing written' compares)."""
  if not path.exists():
    return []
  return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*")
                if p.is_file())


def truncate_state(step_dir: pathlib.Path) -> None:
  """Cuts every array data file of a checkpoint's train state to half its size."""
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def saved_params(step_dir: pathlib.Path) -> dict:
  """{path: numpy array} of a checkpoint's parameters (host arrays, no sharding)."""
  import numpy as np
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(step_dir / "state")
  flat = {}
  def walk(node, prefix):
    if isinstance(node, dict):
      for key, value in node.items():
        walk(value, f"{prefix}/{key}" if prefix else key)
    else:
      flat[prefix] = np.asarray(node)
  walk(tree["params"], "")
  return flat


class Drill:
  """Holds the scratch directory and the uninterrupted baseline run."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self._baseline: pathlib.Path | None = None
    self._count = 0

  def fresh(self, name: str) -> pathlib.Path:
    self._count += 1
    return self.root / f"{self._count:02d}_{name}"

  def command(self, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *args]

  def train(self, model_dir: pathlib.Path | None, *extra: str, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    args = BASE + ([f"--gin.MODEL_DIR={model_dir}"] if model_dir else []) + list(extra)
    return subprocess.run(self.command("t5xlike.train", args), cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)

  def popen(self, model_dir: pathlib.Path, *extra: str) -> subprocess.Popen:
    args = BASE + [f"--gin.MODEL_DIR={model_dir}", *extra]
    return subprocess.Popen(self.command("t5xlike.train", args), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  @property
  def baseline(self) -> pathlib.Path:
    """An uninterrupted 12-step run (checkpoints 3, 6, 9, 12), made once."""
    if self._baseline is None:
      path = self.root / "baseline"
      result = self.train(path, "--gin.CheckpointConfig.keep=None")
      if result.returncode != 0:
        raise RuntimeError(f"the baseline run failed:\n{result.stderr[-3000:]}")
      self._baseline = path
    return self._baseline

  def copy_of_baseline(self, name: str, up_to: int) -> pathlib.Path:
    """The baseline's directory as a run stopped at checkpoint `up_to` left it."""
    target = self.fresh(name)
    shutil.copytree(self.baseline, target)
    for step in steps_saved(target):
      if step > up_to:
        shutil.rmtree(target / f"checkpoint_{step}")
    return target


def last_line(result: subprocess.CompletedProcess) -> str:
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def bad_input(culprits: tuple[str, ...], *extra: str, code: int = 2, module: str = "train",
              setup: Callable[[Drill, pathlib.Path], list[str]] | None = None,
              env: dict | None = None) -> Callable[[Drill], tuple[str, bool]]:
  """A case: exit `code`, a one-line 'error: ...' naming every culprit, no traceback,
  MODEL_DIR's files unchanged (`setup` may fill it and return more flags)."""
  def run(drill: Drill) -> tuple[str, bool]:
    model_dir = drill.fresh("bad")
    model_dir.mkdir(parents=True)
    (model_dir / "keep.txt").write_text("untouched")
    flags = list(extra) + (setup(drill, model_dir) if setup else [])
    before = listing(model_dir)
    if module == "train":
      result = drill.train(model_dir, *flags, env=env)
    else:
      result = subprocess.run(drill.command("t5xlike.infer", INFER + flags), cwd=REPO,
                              env=env or _env(), capture_output=True, text=True, timeout=600)
    line = last_line(result)
    ok = (result.returncode == code and line.startswith("error: ")
          and all(c.lower() in line.lower() for c in culprits)
          and "Traceback" not in result.stderr and listing(model_dir) == before)
    return f"exit {result.returncode}: {line[:220]}", ok
  return run


# -- setups -----------------------------------------------------------------------
def _parent_is_a_file(drill: Drill, model_dir: pathlib.Path) -> list[str]:
  (model_dir / "plain_file").write_text("not a directory")
  return [f"--gin.MODEL_DIR={model_dir / 'plain_file' / 'run'}"]


def _other_architecture(drill: Drill, model_dir: pathlib.Path) -> list[str]:
  shutil.copytree(drill.baseline / "checkpoint_3", model_dir / "checkpoint_3")
  return ["--gin.t5.T5Config.mlp_dim=128"]


def _input_file(content: bytes) -> Callable[[Drill, pathlib.Path], list[str]]:
  def setup(drill: Drill, model_dir: pathlib.Path) -> list[str]:
    (model_dir / "input.jsonl").write_bytes(content)
    return [f"--gin.CHECKPOINT_PATH={drill.baseline / 'checkpoint_3'}",
            f"--input={model_dir / 'input.jsonl'}", f"--output={model_dir / 'out.jsonl'}"]
  return setup


# -- fault cases ------------------------------------------------------------------
def _signal_case(signum: int, code: int) -> Callable[[Drill], tuple[str, bool]]:
  def run(drill: Drill) -> tuple[str, bool]:
    model_dir = drill.fresh(signal.Signals(signum).name)
    process = drill.popen(model_dir, "--gin.TRAIN_STEPS=100000", "--gin.CHECKPOINT_PERIOD=100000",
                          "--gin.LOG_PERIOD=20")
    deadline = time.time() + 300
    while time.time() < deadline and len(rows(model_dir)) < 2:  # steps 1 and 20 logged
      time.sleep(0.1)
    process.send_signal(signum)
    try:
      _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      process.kill()
      return "did not exit within 120 s", False
    logged = rows(model_dir)[-1]["step"] if rows(model_dir) else None
    saved = steps_saved(model_dir)
    ok = (process.returncode == code and saved == [logged] and logged >= 20
          and "Traceback" not in err)
    return f"exit {process.returncode}, checkpoint_{saved}, last row step {logged}", ok
  return run


def _kill_9(drill: Drill) -> tuple[str, bool]:
  model_dir = drill.fresh("kill9")
  kill_after = sorted(random.Random(11).sample(range(2, STEPS), 2))  # rows seen before kill -9
  restored = []
  for rows_seen in kill_after:
    process = drill.popen(model_dir)
    deadline = time.time() + 300
    while time.time() < deadline and len(rows(model_dir)) < rows_seen:
      time.sleep(0.02)
    process.kill()
    process.communicate()
    restored.append(max(steps_saved(model_dir), default=0))
  result = drill.train(model_dir)
  baseline = {r["step"]: r["loss"] for r in rows(drill.baseline)}
  got = rows(model_dir)
  same_losses = [r["step"] for r in got] == list(range(1, STEPS + 1)) and all(
      r["loss"] == baseline[r["step"]] for r in got)
  a, b = saved_params(drill.baseline / f"checkpoint_{STEPS}"), saved_params(
      model_dir / f"checkpoint_{STEPS}")
  same_params = a.keys() == b.keys() and all(
      a[k].tobytes() == b[k].tobytes() for k in a)
  ok = result.returncode == 0 and same_losses and same_params
  return (f"killed after {kill_after} rows, resumed from {restored}: rows 1..{STEPS} once each "
          f"{'and' if same_losses else 'NOT'} bitwise equal, final params "
          f"{'bitwise equal' if same_params else 'DIFFER'}"), ok


#: On-policy DPO from the baseline's checkpoint_12 (posttrain/dpo_on_policy.gin): 12 steps,
#: rejected completions sampled every 2 steps, so checkpoints (every 3) fall inside rounds.
PREFERENCE = ["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
              "--gin_file=gin_configs/posttrain/dpo_on_policy.gin", "--gin.BATCH_SIZE=4",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'chosen': 8, 'rejected': 8}",
              "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=None", "--gin.CHECKPOINT_PERIOD=3",
              f"--gin.TRAIN_STEPS={2 * STEPS}", "--gin.CheckpointConfig.async_save=False",
              "--gin.on_policy.OnPolicySampling.every_steps=2", "--gin.LEARNING_RATE=0.001"]


def _kill_9_preference(drill: Drill) -> tuple[str, bool]:
  start = [f"--gin.INITIAL_CHECKPOINT_PATH={drill.baseline / f'checkpoint_{STEPS}'}"]
  args = lambda model_dir: drill.command("t5xlike.train", PREFERENCE + start + [
      f"--gin.MODEL_DIR={model_dir}"])
  straight = drill.fresh("preference_baseline")
  result = subprocess.run(args(straight), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=900)
  if result.returncode != 0:
    return f"uninterrupted run: exit {result.returncode}: {last_line(result)[:160]}", False
  model_dir = drill.fresh("preference_kill9")
  kill_after = sorted(random.Random(12).sample(range(2, STEPS), 2))
  restored = []
  for rows_seen in kill_after:
    process = subprocess.Popen(args(model_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(rows(model_dir)) < rows_seen:
      time.sleep(0.02)
    process.kill()
    process.communicate()
    restored.append(max(steps_saved(model_dir), default=0))
  result = subprocess.run(args(model_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=900)
  keys = ("loss", "accuracy", "on_policy_rejected_reward")
  baseline = {r["step"]: [r.get(k) for k in keys] for r in rows(straight)}
  got = rows(model_dir)
  same_rows = [r["step"] for r in got] == list(range(STEPS + 1, 2 * STEPS + 1)) and all(
      [r.get(k) for k in keys] == baseline[r["step"]] for r in got)
  a, b = (saved_params(d / f"checkpoint_{2 * STEPS}") for d in (straight, model_dir))
  same_params = a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
  reference = saved_params(drill.baseline / f"checkpoint_{STEPS}")
  frozen = all(b[f"reference/{k}"].tobytes() == v.tobytes() for k, v in reference.items())
  ok = result.returncode == 0 and same_rows and same_params and frozen
  return (f"killed after {kill_after} rows, resumed from {restored}: rows "
          f"{STEPS + 1}..{2 * STEPS} once each {'and' if same_rows else 'NOT'} bitwise equal "
          f"(loss, accuracy, sampled rewards), final params "
          f"{'bitwise equal' if same_params else 'DIFFER'}, reference "
          f"{'= checkpoint_12' if frozen else 'CHANGED'}"), ok


def _half_written(drill: Drill) -> tuple[str, bool]:
  model_dir = drill.copy_of_baseline("half_written", up_to=6)
  shutil.copytree(model_dir / "checkpoint_6",
                  model_dir / "checkpoint_9.orbax-checkpoint-tmp-1795000000000000")
  result = drill.train(model_dir, "--gin.TRAIN_STEPS=7")
  ok = result.returncode == 0 and "resuming from" in result.stdout and "checkpoint_6" in (
      [line for line in result.stdout.splitlines() if "resuming from" in line] or [""])[0]
  return f"exit {result.returncode}, resumed from checkpoint_6, step 7 trained", ok


def _corrupt(strict: bool) -> Callable[[Drill], tuple[str, bool]]:
  def run(drill: Drill) -> tuple[str, bool]:
    model_dir = drill.copy_of_baseline("corrupt", up_to=9)
    truncate_state(model_dir / "checkpoint_9")
    if strict:
      result = drill.train(model_dir, "--gin.RESTORE_STRICT=True")
      line = last_line(result)
      ok = (result.returncode == 1 and "checkpoint_9" in line and "corrupt" in line
            and "Traceback" not in result.stderr and steps_saved(model_dir) == [3, 6, 9])
      return f"exit {result.returncode}: {line[:160]}", ok
    result = drill.train(model_dir)
    warning = [line for line in result.stdout.splitlines() if "is corrupt" in line]
    baseline = {r["step"]: r["loss"] for r in rows(drill.baseline)}
    got = rows(model_dir)
    ok = (result.returncode == 0 and bool(warning) and "step 9" in warning[0]
          and (model_dir / "corrupt" / "checkpoint_9").is_dir()
          and [r["step"] for r in got] == list(range(1, STEPS + 1))
          and all(r["loss"] == baseline[r["step"]] for r in got))
    shown = warning[0].split(" ", 1)[-1][:110] if warning else "no warning"
    return f"exit {result.returncode}; '{shown}...'; steps 7-12 re-run, losses equal", ok
  return run


def _nan(policy: str, steps: str, *extra: str) -> Callable[[Drill], tuple[str, bool]]:
  def run(drill: Drill) -> tuple[str, bool]:
    model_dir = drill.fresh(f"nan_{policy}")
    result = drill.train(model_dir, *FAULTS, f"--gin.FAULT_NAN_AT_STEPS=[{steps}]",
                         f"--gin.NAN_POLICY={policy}", *extra)
    got = {r["step"]: r for r in rows(model_dir)}
    bad = int(steps.split(",")[0])
    if policy == "stop":
      line = last_line(result)
      ok = (result.returncode == 1 and f"nan at step {bad}" in line
            and got.get(bad, {}).get("loss") == "nan" and steps_saved(model_dir) == [3]
            and "Traceback" not in result.stderr)
      return f"exit {result.returncode}: {line[:120]}; row {bad} loss NaN; checkpoints [3]", ok
    skipped = got.get(STEPS, {}).get("skipped_steps")
    if extra:  # Rolled back: the bad rows were logged, then rewound and re-run.
      rolled = [line for line in result.stdout.splitlines() if "rolling back to" in line]
      ok = (result.returncode == 0 and f"step {bad}: non-finite loss" in result.stdout
            and bool(rolled) and "checkpoint_3" in rolled[0]
            and sorted(got) == list(range(1, STEPS + 1))
            and all(isinstance(r["loss"], float) for r in got.values()))
      return (f"exit {result.returncode}; steps 4, 5 logged as non-finite, rolled back to "
              f"checkpoint_3, steps 4-12 re-run finite"), ok
    ok = (result.returncode == 0 and got.get(bad, {}).get("loss") == "nan"
          and skipped == len(steps.split(",")))
    return (f"exit {result.returncode}; row {bad} loss NaN logged; skipped_steps {skipped} "
            f"at the end"), ok
  return run


def _enospc(drill: Drill) -> tuple[str, bool]:
  model_dir = drill.fresh("enospc")
  result = drill.train(model_dir, *FAULTS, "--gin.FAULT_ENOSPC_AT_STEPS=[6]")
  line = last_line(result)
  first_ok = (result.returncode == 1 and "No space left" in line and "checkpoint_6" in line
              and "Traceback" not in result.stderr and steps_saved(model_dir) == [3])
  again = drill.train(model_dir)  # The disk has room again: resumes from checkpoint_3.
  baseline = {r["step"]: r["loss"] for r in rows(drill.baseline)}
  ok = first_ok and again.returncode == 0 and all(
      r["loss"] == baseline[r["step"]] for r in rows(model_dir))
  return (f"exit {result.returncode}: {line[:110]}...; rerun resumed from checkpoint_3, exit "
          f"{again.returncode}"), ok


CASES = [
    Case("unknown gin file", "exit 2, names the file",
         bad_input(("no/such/file.gin",), "--gin_file=no/such/file.gin"), fast=True),
    Case("misspelled binding", "exit 2, names emb_dimm",
         bad_input(("emb_dimm",), "--gin.t5.T5Config.emb_dimm=3"), fast=True),
    Case("misspelled macro", "exit 2, suggests TRAIN_STEPS",
         bad_input(("TRAIN_STEP", "did you mean TRAIN_STEPS"), "--gin.TRAIN_STEP=5"), fast=True),
    Case("missing required macro", "exit 2, names MODEL_DIR",
         bad_input(("MODEL_DIR",), "--gin.MODEL_DIR=None"), fast=True),
    Case("unknown task", "exit 2, suggests embedded_corpus",
         bad_input(("embedded_corpuss", "did you mean 'embedded_corpus'"),
                   "--gin.MIXTURE_OR_TASK_NAME='embedded_corpuss'"), fast=True),
    Case("task module fails to import", "exit 2, names the module and the missing import",
         bad_input(("tests.fault_broken_module", "t5xlike_no_such_dependency"),
                   "--gin.MIXTURE_OR_TASK_MODULE='tests.fault_broken_module'"), fast=True),
    Case("feature lengths too short", "exit 2, names targets",
         bad_input(("targets",), "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 2}")),
    Case("vocabulary larger than the model's", "exit 2, names the embeddings",
         bad_input(("embeddings",), "--gin.t5.T5Config.vocab_size=1000")),
    Case("BATCH_SIZE not positive", "exit 2, names BATCH_SIZE",
         bad_input(("BATCH_SIZE",), "--gin.BATCH_SIZE=0"), fast=True),
    Case("BATCH_SIZE not divisible by data parallelism", "exit 2, names BATCH_SIZE (2 devices)",
         bad_input(("BATCH_SIZE=3", "divisible"), "--gin.BATCH_SIZE=3",
                   env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))),
    Case("MESH_SHAPE vs device count", "exit 2, names MESH_SHAPE",
         bad_input(("MESH_SHAPE",), "--gin.MESH_SHAPE={'data': 3}"), fast=True),
    Case("checkpoint of another architecture", "exit 2, names the parameter path and shapes",
         bad_input(("another architecture", "mlp", "(64, 256)"), setup=_other_architecture)),
    Case("MODEL_DIR not writable", "exit 2, names the file in the way",
         bad_input(("is a file",), setup=_parent_is_a_file), fast=True),
    Case("empty dataset split", "exit 2, names task and split",
         bad_input(("fault_empty_train", "'train'", "no example"),
                   "--gin.MIXTURE_OR_TASK_MODULE='tests.fault_tasks'",
                   "--gin.MIXTURE_OR_TASK_NAME='fault_empty_train'"), fast=True),
    Case("infer: empty input file", "exit 2, 'holds no example'",
         bad_input(("input.jsonl", "no example"), module="infer", setup=_input_file(b""))),
    Case("infer: non-UTF-8 input file", "exit 2, 'not UTF-8'",
         bad_input(("input.jsonl", "not UTF-8"), module="infer",
                   setup=_input_file(b'{"inputs": "caf\xe9"}\n'))),
    Case("SIGTERM mid-run", "exit 0, checkpoint at the step reached",
         _signal_case(signal.SIGTERM, 0), fast=True),
    Case("SIGINT mid-run", "exit 130, checkpoint at the step reached",
         _signal_case(signal.SIGINT, 130)),
    Case("kill -9 twice (seeded), restart", "rows once each, losses + params bitwise equal",
         _kill_9),
    Case("kill -9 on-policy DPO (seeded), restart",
         "rows once each, losses + samples + params bitwise equal, reference frozen",
         _kill_9_preference),
    Case("half-written checkpoint dir", "ignored, resumes from the last complete one",
         _half_written),
    Case("truncated newest checkpoint", "warns 'step 9 is corrupt', falls back to 6",
         _corrupt(strict=False), fast=True),
    Case("truncated newest, RESTORE_STRICT=True", "exit 1, names checkpoint_9 as corrupt",
         _corrupt(strict=True)),
    Case("NaN at step 4, NAN_POLICY=stop", "exit 1, step 4 named and logged, no checkpoint after",
         _nan("stop", "4"), fast=True),
    Case("NaN at steps 4,5, NAN_POLICY=skip", "exit 0, rows logged, skipped_steps 2",
         _nan("skip", "4,5")),
    Case("NaN at 4,5, skip + rollback after 2", "exit 0, rolled back to checkpoint_3",
         _nan("skip", "4,5", "--gin.NAN_ROLLBACK_AFTER=2")),
    Case("disk full saving checkpoint_6", "exit 1, one line; checkpoint_3 restorable",
         _enospc),
]


def run_cases(cases: list[Case], root: pathlib.Path, log=print) -> list[Outcome]:
  drill = Drill(root)
  outcomes = []
  for case in cases:
    start = time.perf_counter()
    try:
      observed, ok = case.run(drill)
    except Exception as error:  # A bug in the drill fails its case.
      observed, ok = f"drill error: {type(error).__name__}: {error}"[:240], False
    outcomes.append(Outcome(case.name, case.expected, observed, ok, time.perf_counter() - start))
    log(f"{'PASS' if ok else 'FAIL'} {case.name} ({outcomes[-1].seconds:.0f} s): {observed}")
  return outcomes


def table(outcomes: list[Outcome]) -> str:
  lines = ["| case | expected | observed | result |", "|---|---|---|---|"]
  for o in outcomes:
    observed = o.observed.replace("|", "\\|")
    lines.append(f"| {o.case} | {o.expected} | {observed} | {'pass' if o.ok else 'FAIL'} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="the CI subset")
  parser.add_argument("--only", default=None,
                      help="comma-separated: run the cases whose name contains one of these")
  parser.add_argument("--keep", default=None, help="scratch directory kept afterwards")
  parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
  args = parser.parse_args(argv)
  cases = [c for c in CASES if (c.fast or not args.fast)
           and (args.only is None or any(part in c.name for part in args.only.split(",")))]
  root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="t5xlike_fault_drill_"))
  root.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  try:
    outcomes = run_cases(cases, root.resolve())
  finally:
    if args.keep is None:
      shutil.rmtree(root, ignore_errors=True)
  print()
  if args.markdown:
    print(table(outcomes))
  else:
    width = max(len(o.case) for o in outcomes)
    for o in outcomes:
      print(f"{o.case:<{width}}  {'pass' if o.ok else 'FAIL'}  expected: {o.expected}\n"
            f"{'':<{width}}        observed: {o.observed}")
  passed = sum(o.ok for o in outcomes)
  print(f"\n{passed}/{len(outcomes)} cases pass in {time.perf_counter() - start:.0f} s")
  return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
  sys.exit(main())
