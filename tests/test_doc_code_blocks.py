"""Every code block of README.md and docs/*.md that a user would copy runs as written.

Which blocks run: every fenced `bash` or `python` block, in document order, each document
in its own sandbox. An HTML comment on the line just before a fence says otherwise:
`<!-- doc-test: skip: REASON -->` (not run, and the reason says why: another machine, a
download, an hour's measurement) or `<!-- doc-test: fast -->` (also run by
the default suite; every other block runs under `-m slow`). Fences without a language
(diagrams, log excerpts) are not code.

How a block runs: a `python` block whose first line is `# NAME.py` is written to NAME.py in
the working directory (the commands after it import it, as a user's would); a `bash` block
runs one command at a time (`\\` continuations joined, comment lines dropped) in that
directory with this interpreter first on PATH as `python`. Three rewrites keep the runs
small and inside the sandbox, and change nothing else:
- `/tmp/` becomes the sandbox's `tmp/` (every block of the document, code and commands);
- `DIR/checkpoint_N` naming a directory that exists becomes its newest `checkpoint_M` (what
  the earlier, shorter run wrote);
- a `python -m t5xlike.train|eval|infer|lm_eval|merge|inspect_data|prune|precompute_reference`
  command with gin files
  gets `--gin.MACRO=VALUE` appended for the macros of `SMALL` that its gin files (and the
  command's own, `COMMAND_GIN_FILES`) define, and a
  train command `--gin.TRAIN_STEPS=` its initial checkpoint's step + 2 (a later flag
  overrides an earlier one).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import shlex
import subprocess
import sys

import gin
import pytest

from t5xlike import library_compat
from t5xlike.cli import gin_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!-- doc-test: (fast|skip: (?P<reason>\S.*\S)) -->$")
MODULE_FILE = re.compile(r"^# (?P<name>\w+\.py)\b")
CHECKPOINT = re.compile(r"(?P<dir>/[^\s'\"=,]*)/checkpoint_(?P<step>\d+)\b")
GIN_COMMANDS = {"t5xlike.train", "t5xlike.eval", "t5xlike.infer", "t5xlike.lm_eval",
                "t5xlike.merge", "t5xlike.inspect_data", "t5xlike.prune",
                "t5xlike.precompute_reference"}
# Gin files a command loads before the ones it is given.
COMMAND_GIN_FILES = {"t5xlike.prune": ("runs/prune.gin",)}
# Small-run values of the macros that bound a run's cost, where a command's gin files
# define them (overriding a macro that no loaded file defines is an error).
SMALL = {"BATCH_SIZE": "8", "EVAL_STEPS": "1", "EVAL_MAX_EXAMPLES": "4",
         "SPARSE_DENSE_STEPS": "1", "CALIBRATION_BATCHES": "2", "HELD_OUT_BATCHES": "1"}


@dataclasses.dataclass(frozen=True)
class Block:
  doc: str
  line: int  # Of the opening fence, 1-based.
  language: str
  code: str
  marker: str | None  # "fast", "skip" or None.

  @property
  def runs(self) -> bool:
    return self.language in ("bash", "python") and self.marker != "skip"

  def __str__(self) -> str:
    return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
  """The fenced blocks of `doc`; a marker line that precedes no fence is an error."""
  lines = (REPO / doc).read_text().splitlines()
  for number, (line, after) in enumerate(zip(lines, lines[1:] + [""]), start=1):
    if line.startswith("<!-- doc-test") and not (MARKER.match(line) and FENCE.match(after)):
      raise AssertionError(f"{doc}:{number}: a malformed doc-test marker or one before no fence")
  found, index = [], 0
  while index < len(lines):
    opening = FENCE.match(lines[index])
    if not opening:
      index += 1
      continue
    end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
    marker = MARKER.match(lines[index - 1]) if index else None
    found.append(Block(doc, index + 1, opening.group(1), "\n".join(lines[index + 1:end]),
                       None if marker is None else marker.group(1).split(":")[0]))
    index = end + 1
  return found


def commands(code: str) -> list[str]:
  """The shell commands of a bash block: continuations joined, comments and blanks dropped."""
  result, pending = [], ""
  for line in code.splitlines():
    if not pending and (not line.strip() or line.lstrip().startswith("#")):
      continue
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1].rstrip() + " "
    else:
      result.append(pending + line.strip())
      pending = ""
  assert not pending, f"a continuation runs off the end of the block: {pending!r}"
  return result


def newest_checkpoints(command: str) -> str:
  def newest(match: re.Match) -> str:
    directory = pathlib.Path(match["dir"])
    steps = [int(p.name.split("_")[1]) for p in directory.glob("checkpoint_*")
             if re.fullmatch(r"checkpoint_\d+", p.name)] if directory.is_dir() else []
    return f"{directory}/checkpoint_{max(steps)}" if steps else match[0]
  return CHECKPOINT.sub(newest, command)


@functools.cache
def defined_macros(gin_files: tuple[str, ...]) -> frozenset[str]:
  gin_config.configure(list(gin_files))
  try:
    return frozenset(library_compat.gin_defined_macros())
  finally:
    gin.clear_config()


def small_run_flags(command: str) -> list[str]:
  args = shlex.split(command)
  if args[:2] != ["python", "-m"] or args[2] not in GIN_COMMANDS:
    return []
  gin_files = tuple(a.split("=", 1)[1] for a in args if a.startswith("--gin_file="))
  if not gin_files:
    return []
  gin_files = COMMAND_GIN_FILES.get(args[2], ()) + gin_files
  macros = defined_macros(gin_files)
  flags = [f"--gin.{name}={value}" for name, value in SMALL.items() if name in macros]
  if args[2] == "t5xlike.train":
    initial = [a for a in args if a.startswith("--gin.INITIAL_CHECKPOINT_PATH=")]
    step = re.search(r"checkpoint_(\d+)$", initial[-1]) if initial else None
    flags.append(f"--gin.TRAIN_STEPS={(int(step[1]) if step else 0) + 2}")
  return flags


def run_blocks(selected: list[Block], sandbox: pathlib.Path) -> None:
  """Runs the blocks in order in `sandbox/work`, `/tmp/` moved to `sandbox/tmp/`."""
  work = sandbox / "work"
  work.mkdir()
  (sandbox / "tmp").mkdir()
  env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}"
                               f"{os.environ['PATH']}"}
  for number, block in enumerate(selected):
    code = block.code.replace("/tmp/", f"{sandbox}/tmp/")
    if block.language == "python":
      name = MODULE_FILE.match(code)
      if name:
        (work / name["name"]).write_text(code + "\n")
        used_later = any(name["name"][:-3] in later.code for later in selected[number + 1:])
        if used_later:
          continue
        to_run = [f"python {name['name']}"]
      else:
        (work / "block.py").write_text(code + "\n")
        to_run = ["python block.py"]
    else:
      to_run = commands(code)
    for command in to_run:
      command = newest_checkpoints(command)
      command = " ".join([command, *map(shlex.quote, small_run_flags(command))])
      result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                              text=True, timeout=1800)
      assert result.returncode == 0, (f"{block}: {command}\n" + result.stdout[-2000:]
                                      + result.stderr[-4000:])


def _docs_with(predicate) -> list[str]:
  return [doc for doc in DOCS if any(predicate(b) for b in blocks(doc))]


def test_every_code_block_runs_or_says_why_not():
  """Markers sit on code blocks only; the own-data snippet is in the default suite."""
  every = [block for doc in DOCS for block in blocks(doc)]
  assert [str(b) for b in every if b.marker and b.language not in ("bash", "python")] == []
  fast = [b for b in every if b.marker == "fast"]
  assert [b.language for b in fast if b.doc == "README.md"] == ["python", "bash"]
  assert any("TaskRegistry.add" in b.code for b in fast)
  assert sum(b.runs for b in every) >= 15
  # The rewrites find what they rewrite.
  assert commands("a \\\n  b\n# c\n\nd") == ["a b", "d"]


@pytest.mark.parametrize("doc", _docs_with(lambda b: b.runs and b.marker == "fast"))
def test_fast_code_blocks_run_as_written(doc, tmp_path):
  run_blocks([b for b in blocks(doc) if b.runs and b.marker == "fast"], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("doc", _docs_with(lambda b: b.runs))
def test_code_blocks_run_as_written(doc, tmp_path):
  run_blocks([b for b in blocks(doc) if b.runs], tmp_path)
