"""Sparse deltas: the difference a sparse fine-tuning made, stored per parameter.

On disk (`MODEL_DIR/sparse_delta/`, written by `sparse.SparseFineTuning.export`):

  delta.json   {"format": "t5xlike.sparse_delta.v1", "base_checkpoint": the
               INITIAL_CHECKPOINT_PATH (or null), "step": the run's final step,
               "num_entries": total stored scalars, "values_dtype": "float64",
               "parameters": {"encoder/layers_0/mlp/wi_0/kernel":
                              {"shape": [...], "dtype": "float32", "entries": n}, ...}}
               (every parameter of the model, n = 0 for untouched ones).
  delta.npz    uncompressed NumPy arrays, for each parameter with n > 0:
               "<path>@indices" [n], flat (row-major) indices into the
               parameter, ascending (int32; int64 for parameters of 2**31 or
               more entries); "<path>@values" float64 [n], theta - theta0 there,
               computed in float64.

Size on disk: 12 bytes per stored scalar plus ~0.5 KB per parameter (npz
headers) and the JSON. The stored scalars are exactly the trained subset
(the sparse phase's mask: the k chosen scalars and every entry of the dense
parameters, e.g. the output layer), including any whose difference is 0.0.

Why float64 differences: the difference of two float32 numbers is exact in
float64 whenever their binary exponents differ by at most 29 (|theta| and
|theta0| within a factor ~5e8 of each other, or either 0), so `apply` (float64
theta0 + difference, rounded once to float32) reproduces the fine-tuned theta
bit for bit for every such entry; a float32 difference is exact only within a
factor 2 (Sterbenz) and missed 871 of the 14,746 entries (5.9%, by up to
3.7e-9) of the benchmark run in docs/finetuning.md. `compose(a, b)` adds two
deltas on the union of their indices (float64).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t5xlike import checkpoints, partitioning

FORMAT = "t5xlike.sparse_delta.v1"
DIRECTORY = "sparse_delta"


@dataclasses.dataclass
class SparseDelta:
  """Per parameter path ('a/b/kernel'): (flat indices ascending, float64 differences).

  `shapes` holds every parameter's shape (also those without entries)."""
  entries: dict[str, tuple[np.ndarray, np.ndarray]]
  shapes: dict[str, tuple[int, ...]]
  base_checkpoint: str | None = None
  step: int | None = None
  dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # the parameters' dtypes

  @property
  def num_entries(self) -> int:
    return sum(int(i.size) for i, _ in self.entries.values())


def flatten(tree: Any) -> dict[str, Any]:
  """{'a/b/kernel': leaf} of a nested dict (None leaves dropped)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def from_params(params: Any, theta0: Mapping[str, Any], mask: Mapping[str, Any], *,
                base_checkpoint: str | None = None, step: int | None = None) -> SparseDelta:
  """The delta theta - theta0 on `mask` (flat dicts by path; `params` nested or flat)."""
  flat = params if all(isinstance(k, str) and not isinstance(v, Mapping)
                       for k, v in dict(params).items()) else flatten(params)
  entries, shapes, dtypes = {}, {}, {}
  for name, value in flat.items():
    value = partitioning.host_array(value)
    shapes[name], dtypes[name] = tuple(value.shape), str(value.dtype)
    if name not in mask:
      continue
    where = np.asarray(partitioning.host_array(mask[name]), bool).ravel()
    indices = np.flatnonzero(where).astype(np.int32 if where.size < 2**31 else np.int64)
    if indices.size:
      diff = (value.ravel()[indices].astype(np.float64)
              - partitioning.host_array(theta0[name]).ravel()[indices].astype(np.float64))
      entries[name] = (indices, diff)
  return SparseDelta(entries, shapes, base_checkpoint, step, dtypes)


def save(directory: str | epath.Path, delta: SparseDelta) -> epath.Path:
  """Writes `directory/{delta.json, delta.npz}` (see the module docstring)."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for name, (indices, values) in delta.entries.items():
    arrays[f"{name}@indices"] = np.asarray(indices)
    arrays[f"{name}@values"] = np.asarray(values, np.float64)
  with (directory / "delta.npz").open("wb") as f:
    # numpy's stub types **kwds against `allow_pickle: bool` too; every key here ends
    # in '@indices' / '@values', so none is a keyword of savez.
    np.savez(f, **arrays)  # type: ignore[arg-type]
  meta = {"format": FORMAT, "base_checkpoint": delta.base_checkpoint, "step": delta.step,
          "num_entries": delta.num_entries,
          "values_dtype": "float64",
          "parameters": {
              name: {"shape": list(shape), "dtype": delta.dtypes.get(name, "float32"),
                     "entries": int(delta.entries[name][0].size) if name in delta.entries else 0}
              for name, shape in sorted(delta.shapes.items())}}
  (directory / "delta.json").write_text(json.dumps(meta, indent=1) + "\n")
  return directory


def load(directory: str | epath.Path) -> SparseDelta:
  """Reads a delta written by `save`; a ValueError naming the problem otherwise."""
  directory = epath.Path(directory)
  meta_path = directory / "delta.json"
  if not meta_path.exists() or not (directory / "delta.npz").exists():
    raise ValueError(f"{directory} is not a sparse delta (needs delta.json and delta.npz)")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  with (directory / "delta.npz").open("rb") as f:
    arrays = dict(np.load(f))
  shapes = {name: tuple(info["shape"]) for name, info in meta["parameters"].items()}
  entries = {}
  for name in shapes:
    if f"{name}@indices" in arrays:
      entries[name] = (arrays[f"{name}@indices"], arrays[f"{name}@values"])
  dtypes = {name: info["dtype"] for name, info in meta["parameters"].items()}
  return SparseDelta(entries, shapes, meta.get("base_checkpoint"), meta.get("step"), dtypes)


def check_fits(delta: SparseDelta, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
  """ValueError naming the first parameter whose shape differs or that is missing."""
  for name, shape in sorted(delta.shapes.items()):
    if name not in shapes:
      raise ValueError(f"{what}: parameter {name} of the delta is not in the base")
    if tuple(shapes[name]) != tuple(shape):
      raise ValueError(f"{what}: {name} has shape {tuple(shape)} in the delta, "
                       f"{tuple(shapes[name])} in the base")


def apply(base: Mapping[str, np.ndarray], delta: SparseDelta) -> dict[str, np.ndarray]:
  """base + delta (flat dicts by path): at the stored indices base (as float64) +
  the difference, rounded once to the parameter's dtype."""
  check_fits(delta, {k: np.shape(v) for k, v in base.items()}, "apply")
  out = {}
  for name, value in base.items():
    value = np.array(value, copy=True)
    if name in delta.entries:
      indices, values = delta.entries[name]
      flat = value.reshape(-1)
      flat[indices] = (flat[indices].astype(np.float64) + values).astype(value.dtype)
    out[name] = value
  return out


def compose(a: SparseDelta, b: SparseDelta) -> SparseDelta:
  """a + b: the union of their indices, values added (float64) where both hold one."""
  if a.shapes != b.shapes:
    check_fits(b, a.shapes, "compose")
    check_fits(a, b.shapes, "compose")
  entries = {}
  for name in sorted(set(a.entries) | set(b.entries)):
    if name not in b.entries or name not in a.entries:
      entries[name] = (a.entries.get(name) or b.entries[name])
      continue
    (ia, va), (ib, vb) = a.entries[name], b.entries[name]
    indices = np.union1d(ia, ib).astype(np.result_type(ia, ib))
    values = np.zeros(indices.shape, np.float64)
    values[np.searchsorted(indices, ia)] += va
    values[np.searchsorted(indices, ib)] += vb
    entries[name] = (indices, values)
  return SparseDelta(entries, dict(a.shapes), a.base_checkpoint, None, dict(a.dtypes))


def to_dense(delta: SparseDelta) -> dict[str, np.ndarray]:
  """Every parameter's delta as a dense float64 array (for inspection and tests)."""
  out = {}
  for name, shape in delta.shapes.items():
    dense = np.zeros(int(np.prod(shape)), np.float64)
    if name in delta.entries:
      indices, values = delta.entries[name]
      dense[indices] = values
    out[name] = dense.reshape(shape)
  return out


def read_sparse_state(step_dir: str | epath.Path) -> tuple[dict[str, np.ndarray],
                                                           dict[str, np.ndarray], int]:
  """(theta0, mask, count) of a sparse fine-tuning run's checkpoint step directory,
  read from its optimizer state (`sparse.SparseState`), as host NumPy arrays by path."""
  path = epath.Path(step_dir) / "state"
  opt_state = checkpoints.item_metadata(path)["opt_state"]
  wanted = {field: opt_state[field] for field in ("count", "theta0", "mask")}
  item = jax.tree.map(lambda m: np.zeros(m.shape, np.dtype(m.dtype)), wanted)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={"opt_state": item}, restore_args={"opt_state": restore_args},
        partial_restore=True))["opt_state"]
  return flatten(restored["theta0"]), flatten(restored["mask"]), int(restored["count"])
