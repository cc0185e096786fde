"""A non-editable install works from anywhere (setup.py): the wheel holds `t5xlike/` (with the
GPU target configs of `t5xlike/aot/gpu_targets/`), the repository's `tasks/` as
`t5xlike/tasks/` and `gin_configs/` as `t5xlike/gin_configs/`, and no other top-level name;
installed into a fresh virtual environment, the quickstart trains, evaluates and infers from
a directory outside the repository.

How the fresh environment gets the dependencies: installing them from the registry would
download ~2 GB (TensorFlow, JAX and the rest) on every run, so the wheel is installed with
`pip --no-deps` into a venv made without system site-packages, and one `.pth` line adds the
directory of the dependencies this test runs with (the project venv's site-packages). A
`.pth` line adds a directory to `sys.path` and nothing more: the `.pth` files inside it,
such as the editable install's finder that maps `t5xlike` to this checkout, are not run, so
`t5xlike` can only come from the wheel, and the test checks that it does (and that no
module named `tasks` is importable).
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# What a build reads (a build writes build/ and *.egg-info beside its sources: it runs on a copy).
SOURCES = ("pyproject.toml", "setup.py", "README.md", "t5xlike", "tasks", "gin_configs")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """The wheel built from a copy of the sources, offline, with the installed setuptools."""
  root = tmp_path_factory.mktemp("wheel")
  (root / "src").mkdir()
  for name in SOURCES:
    source = REPO / name
    if source.is_dir():
      shutil.copytree(source, root / "src" / name, ignore=IGNORE)
    else:
      shutil.copy2(source, root / "src" / name)
  result = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
       "--quiet", "--wheel-dir", str(root / "dist"), str(root / "src")],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  (path,) = (root / "dist").glob("t5xlike-*.whl")
  return path


def _shipped(directory: str, under: str) -> set[str]:
  return {f"{under}/{path.relative_to(REPO / directory).as_posix()}"
          for path in (REPO / directory).rglob("*")
          if path.is_file() and "__pycache__" not in path.parts}


def test_wheel_holds_the_package_its_tasks_and_gin_files_and_nothing_else(wheel):
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert archive.read(top_level).decode().split() == ["t5xlike"]
  package = {path.relative_to(REPO).as_posix() for path in (REPO / "t5xlike").rglob("*")
             if path.suffix == ".py" or path.parent.name == "gpu_targets"}
  expected = (package | _shipped("tasks", "t5xlike/tasks")
              | _shipped("gin_configs", "t5xlike/gin_configs"))
  assert "t5xlike/aot/gpu_targets/h100.txtpb" in expected   # the compile targets' devices
  assert "t5xlike/tasks/embedded/spm.model" in expected
  assert "t5xlike/gin_configs/quickstart.gin" in expected
  assert sorted(n for n in names if ".dist-info/" not in n) == sorted(expected)


@pytest.mark.slow
def test_installed_wheel_trains_evaluates_and_infers_from_another_directory(wheel, tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                 timeout=120)
  python = venv / "bin" / "python"
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                  "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
  site = pathlib.Path(subprocess.run(
      [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True, text=True, check=True).stdout.strip())
  (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

  def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=900)

  where = run("-c", "import importlib.util, t5xlike.tasks.embedded as e\n"
                    "from t5xlike.cli import gin_config as g\n"
                    "print(e.__file__, g.GIN_CONFIGS_DIR, importlib.util.find_spec('tasks'))")
  assert where.returncode == 0, where.stderr[-3000:]
  assert where.stdout.split() == [f"{site}/t5xlike/tasks/embedded/__init__.py",
                                  f"{site}/t5xlike/gin_configs", "None"]

  model_dir = tmp_path / "quickstart"
  train = run("-m", "t5xlike.train", "--gin_file=gin_configs/quickstart.gin",
              f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=3", "--gin.EVAL_STEPS=1")
  assert train.returncode == 0, train.stderr[-3000:]
  assert (model_dir / "checkpoint_3").is_dir()
  rows = [json.loads(line) for line in (model_dir / "metrics" / "train.jsonl").open()]
  assert [row["step"] for row in rows] == [1, 3]

  model = ("--gin_file=gin_configs/models/t5_1_1/tiny.gin",)
  checkpoint = f"--gin.CHECKPOINT_PATH={model_dir / 'checkpoint_3'}"
  evaluate = run("-m", "t5xlike.eval", *model, "--gin_file=gin_configs/runs/eval.gin", checkpoint,
                 f"--gin.EVAL_OUTPUT_DIR={tmp_path / 'eval'}", "--gin.EVAL_MAX_EXAMPLES=4")
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  evals = [json.loads(line) for line in (tmp_path / "eval" / "metrics" / "eval.jsonl").open()]
  assert sorted(row["task"] for row in evals) == [
      "mt_continue", "mt_count_words", "mt_fill_blank", "mt_first_word", "mt_last_word",
      "mt_reverse_words"]
  assert {row["step"] for row in evals} == {3}

  (elsewhere / "in.jsonl").write_text('{"inputs": "Count the words: the exact cause of"}\n')
  infer = run("-m", "t5xlike.infer", *model, "--gin_file=gin_configs/runs/infer.gin", checkpoint,
              "--mode=predict", "--input=in.jsonl", "--output=out.jsonl")
  assert infer.returncode == 0, infer.stderr[-3000:]
  (prediction,) = [json.loads(line) for line in (elsewhere / "out.jsonl").open()]
  assert 1 <= len(prediction["prediction_ids"]) <= 32 and isinstance(prediction["prediction"], str)

  # The task modules' old name gets their new one, in one line.
  old = run("-m", "t5xlike.train", "--gin_file=gin_configs/quickstart.gin",
            f"--gin.MODEL_DIR={tmp_path / 'old_name'}",
            "--gin.MIXTURE_OR_TASK_MODULE=tasks.embedded")
  assert old.returncode == 2
  assert old.stderr.strip().splitlines()[-1] == (
      "error: MIXTURE_OR_TASK_MODULE='tasks.embedded' cannot be imported: the shipped task "
      "modules are t5xlike.tasks.*: use 't5xlike.tasks.embedded'")
  assert not (tmp_path / "old_name").exists()
