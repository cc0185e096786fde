"""What a run prints before its first step: a short summary, no third-party noise on stderr,
the full plan in MODEL_DIR/plan.txt (and on stdout with `--verbose`)."""
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest

from t5xlike import checkpoints, train
from t5xlike.cli import startup_noise
from t5xlike.runs import startup_report

REPO = pathlib.Path(__file__).resolve().parents[1]

# Lines TensorFlow 2.21 printed on stderr before the first step of a CPU-only run.
BANNER = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
          "STDERR\n")
ONEDNN = ("I0000 00:00:1796191091.709272   18635 port.cc:153] oneDNN custom operations are on. "
          "You may see slightly different numerical results\n")
NO_DRIVER = ("I0000 00:00:1796191091.710725   18635 cudart_stub.cc:31] Could not find cuda "
             "drivers on your machine, GPU will not be used.\n")
CUINIT = ("E0000 00:00:1796191099.031943   18635 cuda_platform.cc:52] failed call to cuInit: "
          "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
OTHER_ERROR = ("E0000 00:00:1796191099.031943   18635 op_kernel.cc:1840] OP_REQUIRES failed at "
               "example_parsing_ops.cc:98 : INVALID_ARGUMENT: Feature: x\n")
WARNING = "W0000 00:00:1796191099.031943   18635 loader.cc:12] a warning\n"
PYTHON = ["Traceback (most recent call last):\n", "ValueError: broken\n",
          "/x.py:3: DeprecationWarning: old\n"]


def test_noise_is_the_banner_info_lines_and_the_cuinit_failure():
  noise = [BANNER, ONEDNN, NO_DRIVER, CUINIT]
  kept = [OTHER_ERROR, WARNING, *PYTHON]
  assert [startup_noise.is_noise(line, 1) for line in noise + kept] == [True] * 4 + [False] * 5
  assert startup_noise.is_noise(WARNING, 2) and not startup_noise.is_noise(OTHER_ERROR, 2)
  # TF_CPP_MIN_LOG_LEVEL=0 (set by the user): everything is shown.
  assert not any(startup_noise.is_noise(line, 0) for line in noise + kept)


def test_filtered_stderr_writes_back_what_is_not_noise_also_on_an_error(capfd):
  with pytest.raises(ValueError):
    with startup_noise.filtered_stderr(lambda line: not startup_noise.is_noise(line, 1)):
      os.write(2, (BANNER + ONEDNN + OTHER_ERROR + CUINIT + PYTHON[0]).encode())
      raise ValueError
  assert capfd.readouterr().err == OTHER_ERROR + PYTHON[0]


def _clean_env():
  """The environment of a user who set neither TF_CPP_MIN_LOG_LEVEL nor JAX_PLATFORMS
  (tests/conftest.py sets both for the test process)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS")}
  return {**env, "PYTHONPATH": str(REPO)}


def test_accelerators_are_seen_as_jax_looks_for_them(tmp_path):
  pci = tmp_path / "pci"
  for device, vendor in (("0000:00:04.0", "0x8086"), ("0000:00:05.0", "0x1af4")):
    (pci / device).mkdir(parents=True)
    (pci / device / "vendor").write_text(vendor + "\n")
  no_files = [str(tmp_path / "nvidia0")]
  assert not startup_noise.accelerator_visible(no_files, str(pci))
  (tmp_path / "nvidia0").touch()   # an NVIDIA driver's device file
  assert startup_noise.accelerator_visible(no_files, str(pci))
  (pci / "0000:00:06.0").mkdir()
  (pci / "0000:00:06.0" / "vendor").write_text("0x1ae0\n")   # a TPU chip (Google's vendor id)
  assert startup_noise.accelerator_visible([], str(pci))


@pytest.mark.parametrize("user,plugins,visible,expected", [
    (None, True, False, "cpu"),     # the extras on a CPU host: JAX would fail loudly, then CPU
    (None, True, True, None),       # a GPU or TPU: JAX decides
    (None, False, False, None),     # no plugin: JAX prints nothing anyway
    ("tpu", True, False, "tpu"),    # the user's choice stays
])
def test_jax_is_kept_to_the_cpu_only_where_its_plugins_would_fail(monkeypatch, user, plugins,
                                                                   visible, expected):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  if user:
    monkeypatch.setenv("JAX_PLATFORMS", user)
  monkeypatch.setattr(startup_noise, "accelerator_plugins_installed", lambda: plugins)
  monkeypatch.setattr(startup_noise, "accelerator_visible", lambda: visible)
  monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))   # quiet() may add a finder
  startup_noise.quiet()
  assert os.environ.get("JAX_PLATFORMS") == expected


def test_tensorflow_loads_quietly_and_off_gpus():
  code = ("from t5xlike.cli import startup_noise\n"
          "startup_noise.quiet()\n"
          "import seqio, tensorflow as tf\n"
          "assert not tf.config.get_visible_devices('GPU')\n"
          "assert type(tf.__loader__).__name__ == 'SourceFileLoader', tf.__loader__\n"
          "assert tf.__spec__.loader is tf.__loader__\n"
          "print([int(x) for x in tf.data.Dataset.range(3).map(lambda x: x + 1)])\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_clean_env(), cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout == "[1, 2, 3]\n" and result.stderr == ""


FINETUNE = ["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
            "--gin_file=gin_configs/runs/finetune.gin", "--gin.TRAIN_STEPS=3",
            "--gin.BATCH_SIZE=2", "--gin.EVAL_PERIOD=None",
            "--gin.MIXTURE_OR_TASK_NAME='mt_first_word'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """A fine-tune of a step-2 T5.1.1 tiny checkpoint to step 3, as a user runs it:
  (MODEL_DIR, its args, the finished process)."""
  from tests import test_finetuning_selection as selection_tests
  root = tmp_path_factory.mktemp("startup")
  step_dir = checkpoints.save_params(root / "pretrain", 2, selection_tests.tiny_params())
  model_dir = root / "finetune"
  args = FINETUNE + [f"--gin.INITIAL_CHECKPOINT_PATH={step_dir}", f"--gin.MODEL_DIR={model_dir}"]
  result = subprocess.run([sys.executable, "-m", "t5xlike.train", *args], capture_output=True,
                          text=True, env=_clean_env(), cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return model_dir, args, result


def test_finetune_prints_a_short_summary_and_no_error_looking_line(finetuned):
  _, _, result = finetuned
  out = result.stdout.splitlines()
  first_step = next(i for i, line in enumerate(out) if re.search(r" step 3/3 \|", line))
  before = out[:first_step] + result.stderr.splitlines()
  assert len(before) <= 15, "\n".join(before)
  assert not re.search(r"^[EF]\d{4} |ERROR|Traceback|error", result.stderr, re.M | re.I), (
      result.stderr)
  assert "Metadata file does not exist" not in result.stdout + result.stderr
  origin = [line for line in before if "INITIAL_CHECKPOINT_PATH" in line]
  assert len(origin) == 1 and "at step 2" in origin[0], before
  assert sum("fresh optimizer state" in line for line in before) == 1, before
  summary = "\n".join(before)
  for wanted in ("trainable parameters: 1,344,512 of 1,344,512 (100.0%)",
                 "mesh (data=1, fsdp=1, tensor=1)", "task mt_first_word (train)",
                 "global batch 2", "steps 2 -> 3", "plan.txt"):
    assert wanted in summary, wanted
  # The parameter table and the partitioning plan are not printed.
  assert "per-device bytes" not in result.stdout and "token_embedder" not in result.stdout


def _check_plan(text):
  assert "parameters per module:" in text
  assert re.search(r"^  token_embedder +524,288$", text, re.M)
  assert re.search(r"^  total +1,344,512$", text, re.M)
  assert "partitioning plan (parameter, logical axes, mesh axes" in text
  assert re.search(r"^  encoder/layers_0/attention/query/kernel +\('embed', 'joined_kv'\) +"
                   r"\('fsdp', 'tensor'\) +\(64, 64\) -> \(64, 64\)$", text, re.M)
  assert "per-device bytes: params 5,378,048" in text  # 1,344,512 float32 parameters
  assert re.search(r"^FLOPs per step [\d.e+]+ \(model\)", text, re.M)


def test_model_dir_holds_the_full_plan(finetuned):
  model_dir, _, _ = finetuned
  text = (model_dir / startup_report.PLAN_FILE).read_text()
  assert text.startswith(f"training plan of {model_dir}, starting at step 2\n")
  _check_plan(text)


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def test_verbose_prints_the_plan(finetuned):
  """Run again (a resume at the final step: nothing to train) with --verbose."""
  model_dir, args, _ = finetuned
  logger = logging.getLogger("t5xlike")
  lines, level = _Lines(), logger.level
  logger.addHandler(lines)
  try:
    assert train.main([*args, "--verbose"]) == 0
  finally:
    logger.removeHandler(lines)
    logger.setLevel(level)
  text = "\n".join(lines.lines)
  assert f"resuming from {model_dir}/checkpoint_3" in text
  assert "already at step 3" in text
  _check_plan(text)
  assert (model_dir / startup_report.PLAN_FILE).read_text().startswith(
      f"training plan of {model_dir}, starting at step 3\n")
