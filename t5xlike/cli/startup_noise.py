"""Third-party start-up noise kept off a healthy run's stderr; `cli.entry` calls `quiet()`
before anything has imported TensorFlow or JAX.

What a CPU-only machine printed before the first step, and what is done about it:

- TensorFlow's and XLA's C++ INFO lines: TF_CPP_MIN_LOG_LEVEL=1 unless the user set it,
  JAX's own default (`jax/__init__.py`), whoever loads first: WARNING and ERROR lines stay.
- absl's C++ banner `WARNING: All log messages before absl::InitializeLog() is called are
  written to STDERR` and the INFO lines that follow it (oneDNN, "Could not find cuda
  drivers"), twice: TensorFlow's shared libraries write them while they load, before
  TF_CPP_MIN_LOG_LEVEL is read. TensorFlow's import (by seqio or a task module, whoever
  comes first) runs with file descriptor 2 captured; every captured line but those is
  written back (a Python warning, an ERROR line, a traceback).
- `E0000 ... cuda_platform.cc ... failed call to cuInit: ... (303)`: TensorFlow scanning for
  GPUs on a machine without a CUDA driver. TensorFlow only reads data here and is kept off
  GPUs, as T5X does (`tf.config.set_visible_devices([], "GPU")`; a GPU it initialised would
  take memory JAX needs); the scan runs under the same capture and drops that line.
- JAX prints nothing: it skips its CUDA plugin when no NVIDIA GPU is visible
  (`jax._src.xla_bridge.backends`), so JAX_PLATFORMS is left to the user (setting it
  would turn GPUs and TPUs off). With the `tpu` or `gpu` extra installed (the compilers of
  `python -m t5xlike.compile`; `.ci/run` installs both) on a machine with neither a TPU
  chip nor an NVIDIA GPU, JAX would print 15 lines (the CUDA plugin's failed cuInit with
  its traceback, libtpu's warnings about a TPU it cannot find) before falling back to the
  CPU: there, and only there, JAX_PLATFORMS=cpu is set (unless the user set it), which
  changes nothing but the noise (`accelerator_visible`).

TF_CPP_MIN_LOG_LEVEL=0 set by the user filters nothing.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import pathlib
import re
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: TensorFlow's and XLA's C++ log level for the commands: 1 drops INFO only.
TF_LOG_LEVEL = "1"

_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called"
# absl / glog line prefix: severity letter, MMDD, time ('00:00:1796191091.709272' before
# absl is initialised), thread id, file:line].
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
_SEVERITIES = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3 drops the letters before its index.
_NO_CUDA_DRIVER = re.compile(r"cuda_platform\.cc:\d+\] failed call to cuInit: ")


#: Device files of an NVIDIA GPU (JAX's list: driver, Docker / Kubernetes, WSL2) and the PCI
#: vendor id of Google's TPU chips, as JAX looks for them (`jax/_src/hardware_utils.py`).
_NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
_GOOGLE_PCI_VENDOR = "0x1ae0"


def quiet() -> None:
  """Sets TF_CPP_MIN_LOG_LEVEL (unless set), JAX_PLATFORMS=cpu where JAX's accelerator
  plugins would only fail loudly (unless set; see the module docstring) and arranges for
  TensorFlow's first import to be filtered (`_TensorFlowImport`); does nothing for what is
  already imported."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
  if "JAX_PLATFORMS" not in os.environ and accelerator_plugins_installed() and not (
      accelerator_visible()):
    os.environ["JAX_PLATFORMS"] = "cpu"
  if "tensorflow" in sys.modules or any(isinstance(finder, _TensorFlowImport)
                                        for finder in sys.meta_path):
    return
  sys.meta_path.insert(0, _TensorFlowImport())


def accelerator_plugins_installed() -> bool:
  """Whether libtpu or JAX's CUDA plugin is installed (found without importing JAX)."""
  return any(importlib.util.find_spec(name) is not None
             for name in ("libtpu", "jax_cuda12_plugin"))


def accelerator_visible(device_files: Sequence[str] = _NVIDIA_DEVICE_FILES,
                        pci_devices: str = "/sys/bus/pci/devices") -> bool:
  """Whether this machine shows an NVIDIA GPU (one of `device_files`) or a TPU chip (a PCI
  device of Google's vendor id under `pci_devices`), as JAX decides whether to try them."""
  if any(os.path.exists(path) for path in device_files):
    return True
  for vendor in pathlib.Path(pci_devices).glob("*/vendor"):
    try:
      if vendor.read_text().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return False


def is_noise(line: str, min_log_level: int) -> bool:
  """Whether a stderr line TensorFlow printed while loading or scanning for GPUs is noise
  at this TF_CPP_MIN_LOG_LEVEL (0: nothing is)."""
  if min_log_level <= 0:
    return False
  if line.startswith(_ABSL_BANNER):
    return True
  match = _ABSL_LINE.match(line)
  if match is None:
    return False
  return (_SEVERITIES.index(match.group(1)) < min_log_level
          or bool(_NO_CUDA_DRIVER.search(line)))


@contextlib.contextmanager
def filtered_stderr(keep: Callable[[str], bool]) -> Iterator[None]:
  """Captures file descriptor 2 (C++ writes and Python's sys.stderr alike) and writes back
  the lines `keep` accepts when the block ends, also when it raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      kept = "".join(line for line in lines if keep(line))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def _min_log_level() -> int:
  value = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
  return int(value) if value.isdigit() else 0


class _TensorFlowImport(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` once, for the import machinery, with a loader that runs its import
  and its GPU scan under `filtered_stderr`; then steps aside."""

  def __init__(self) -> None:
    self._done = False

  def find_spec(self, fullname: str, path: Sequence[str] | None,
                target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
    if fullname != "tensorflow" or self._done:
      return None
    self._done = True  # (before the search below, which asks this finder again)
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return None
    spec.loader = _QuietLoader(spec.loader)
    return spec


class _QuietLoader(importlib.abc.Loader):
  """Delegates to TensorFlow's own loader; see `_TensorFlowImport`."""

  def __init__(self, loader: importlib.abc.Loader) -> None:
    self._loader = loader

  def __getattr__(self, name: str) -> Any:
    # What else the import machinery or TensorFlow's own import asks of its loader
    # (is_package, get_resource_reader, ...).
    return getattr(self._loader, name)

  def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
    return self._loader.create_module(spec)

  def exec_module(self, module: types.ModuleType) -> None:
    level = _min_log_level()
    with filtered_stderr(lambda line: not is_noise(line, level)):
      self._loader.exec_module(module)
      # Whoever asks about the module later sees TensorFlow's own loader.
      module.__loader__ = self._loader
      if module.__spec__ is not None:
        module.__spec__.loader = self._loader
      _keep_off_gpus(module)


def _keep_off_gpus(tensorflow: types.ModuleType) -> None:
  """Hides GPUs from TensorFlow (it reads data on the CPU; JAX owns the accelerators)."""
  try:
    tensorflow.config.set_visible_devices([], "GPU")
  except (AttributeError, RuntimeError, ValueError):
    # A TensorFlow without tf.config, or one whose devices were already initialised
    # during its import: it keeps its default devices.
    pass
