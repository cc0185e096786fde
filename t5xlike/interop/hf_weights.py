"""Reading and writing the weight files of a Hugging Face model directory.

Read (in order of preference): `model.safetensors`, a sharded
`model.safetensors.index.json`, `flax_model.msgpack` (HF's Flax weights),
and `pytorch_model.bin` (+ `.index.json`; needs PyTorch, which t5xlike does
not require: only where `torch` is installed). Safetensors are read one
tensor at a time (memory-mapped), so a conversion holds at most one source
tensor beyond its output; Flax and PyTorch files are read whole.
Written: one `model.safetensors` with `{"format": "pt"}` metadata, as
`save_pretrained` writes it. Tensors are NumPy arrays, names are PyTorch
state-dict names (`encoder.block.0.layer.0.SelfAttention.q.weight`).
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping

import numpy as np
from flax import serialization
from safetensors import safe_open
from safetensors.numpy import save_file

from t5xlike.interop import param_trees

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX = "flax_model.msgpack"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"


class WeightReader:
  """The tensors of an HF model directory by state-dict name, read lazily.

  Args:
    directory: holds one of the weight files above.
  Raises:
    ValueError: no weight file found, or a PyTorch file without torch.
  """

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    self._files: dict[str, pathlib.Path] = {}  # name -> safetensors file
    self._loaded: dict[str, np.ndarray] = {}   # name -> array (Flax / PyTorch)
    d = self.directory
    if (d / SAFETENSORS).exists():
      self.source = SAFETENSORS
      self._index_safetensors([d / SAFETENSORS])
    elif (d / SAFETENSORS_INDEX).exists():
      self.source = SAFETENSORS_INDEX
      weight_map = json.loads((d / SAFETENSORS_INDEX).read_text())["weight_map"]
      self._index_safetensors(sorted({d / f for f in weight_map.values()}))
    elif (d / FLAX).exists():
      self.source = FLAX
      self._loaded = _read_flax(d / FLAX)
    elif (d / PYTORCH).exists() or (d / PYTORCH_INDEX).exists():
      self.source = PYTORCH
      self._loaded = _read_torch(d)
    else:
      raise ValueError(f"{d} holds no {SAFETENSORS}, {SAFETENSORS_INDEX}, {FLAX} or {PYTORCH}")

  def _index_safetensors(self, files) -> None:
    for file in files:
      with safe_open(str(file), framework="numpy") as handle:
        for name in handle.keys():
          self._files[name] = file

  def names(self) -> list[str]:
    return sorted(self._files) if self._files else sorted(self._loaded)

  def __contains__(self, name: str) -> bool:
    return name in self._files or name in self._loaded

  def get(self, name: str) -> np.ndarray:
    """The tensor called `name` (KeyError naming it and the directory if absent)."""
    if name in self._loaded:
      return self._loaded[name]
    if name not in self._files:
      raise KeyError(f"{self.directory} ({self.source}) has no tensor {name}")
    with safe_open(str(self._files[name]), framework="numpy") as handle:
      return handle.get_tensor(name)


def _read_flax(path: pathlib.Path) -> dict[str, np.ndarray]:
  """HF Flax weights -> PyTorch names: `a/b/kernel` [in, out] -> `a.b.weight` [out, in];
  `embedding` and norm `weight` / `scale` -> `weight`."""
  tree = serialization.msgpack_restore(path.read_bytes())
  tree = tree.get("params", tree)
  out = {}
  for name, value in param_trees.flatten(tree).items():
    *parents, leaf = name.split("/")
    value = np.asarray(value)
    if leaf == "kernel":
      value = np.ascontiguousarray(value.T)
    leaf = "weight" if leaf in ("kernel", "embedding", "scale") else leaf
    out[".".join(parents + [leaf])] = value
  return out


def _read_torch(directory: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415  (optional, not a t5xlike dependency: PyTorch files only)
  except ImportError:
    raise ValueError(f"{directory} holds PyTorch weights ({PYTORCH}), which need torch "
                     "installed; convert them to safetensors or install torch") from None
  files = [directory / PYTORCH]
  if (directory / PYTORCH_INDEX).exists():
    weight_map = json.loads((directory / PYTORCH_INDEX).read_text())["weight_map"]
    files = sorted({directory / f for f in weight_map.values()})
  out = {}
  for file in files:
    for name, tensor in torch.load(file, map_location="cpu", weights_only=True).items():
      out[name] = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
  return out


def _new_file_mode() -> int:
  """The mode `open()` gives a new file: 0o666 less the umask (0o644 under umask 022)."""
  umask = os.umask(0o022)  # The umask is read only by setting it: put it back at once.
  os.umask(umask)
  return 0o666 & ~umask


def write_safetensors(directory: str | pathlib.Path, tensors: Iterator[tuple[str, np.ndarray]]
                      | Mapping[str, np.ndarray]) -> pathlib.Path:
  """Writes `directory/model.safetensors` (contiguous copies, `{"format": "pt"}`) with
  the usual mode of a new file (umask respected)."""
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  path = pathlib.Path(directory) / SAFETENSORS
  save_file({name: np.ascontiguousarray(value) for name, value in items}, str(path),
            metadata={"format": "pt"})
  # safetensors writes a private temporary file (mode 0600) and renames it over `path`.
  path.chmod(_new_file_mode())
  return path
