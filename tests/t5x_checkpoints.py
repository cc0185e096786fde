"""T5X checkpoints written here in T5X's own layouts, for the conversion tests.

`write_t5x_msgpack`: T5X's msgpack checkpoint (TensorStore arrays beside a msgpack of the
optimizer state, unscanned or scanned); `write_t5x_orbax`: T5X's orbax CheckpointManager
layout (`state` PyTree item + `dataset` item, T5X's default since 2023).
"""
import dataclasses
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5xlike.interop import param_trees


def ts_spec(name: str, value: np.ndarray, dtype: str) -> dict:
  """A T5X TensorStore spec as the `checkpoint` file stores it (path relative)."""
  return {"driver": "zarr", "dtype": dtype,
          "kvstore": {"driver": "file", "path": name.replace("/", ".")},
          "metadata": {"shape": list(value.shape), "chunks": list(value.shape),
                       "dtype": "<f4" if dtype == "float32" else "bfloat16",
                       "compressor": {"id": "gzip", "level": 1}}}


def write_t5x_msgpack(directory: pathlib.Path, flat: dict, scanned: bool,
                      bfloat16: tuple[str, ...] = (), gcs: bool = False) -> dict:
  """A T5X step directory: `checkpoint` msgpack {'version': 3, 'optimizer': {'target',
  'state'}}; 2-D arrays in TensorStore zarr (those in `bfloat16` cast), 1-D ones inline.
  Scanned: `<stack>/layers/...` stacked on axis 1, as T5X's scanned models. `gcs`:
  the specs T5X writes for a gs:// directory (bucket placeholder, top-level path).
  Returns the parameters as saved (unscanned, float32)."""
  import ml_dtypes
  import tensorstore as ts
  from flax import serialization
  directory.mkdir(parents=True)
  saved = {k: (v.astype(ml_dtypes.bfloat16).astype(np.float32) if k.endswith(bfloat16) else v)
           for k, v in flat.items()}
  tree = dict(flat)
  if scanned:
    stacked = param_trees.stack(flat)
    tree = {k: (np.moveaxis(v, 0, 1) if "/layers/" in k else v) for k, v in stacked.items()}
  target = {}
  for name, value in tree.items():
    if value.ndim < 2:
      target[name] = value
      continue
    base = bool(bfloat16) and name.endswith(bfloat16)
    dtype = "bfloat16" if base else "float32"
    spec = ts_spec(f"target/{name}", value, dtype)
    store = ts.open({**spec, "kvstore": {"driver": "file", "path": str(
        directory / spec["kvstore"]["path"])}}, create=True).result()
    store.write(value.astype(ml_dtypes.bfloat16) if base else value).result()
    if gcs:
      spec = {**spec, "path": spec["kvstore"]["path"],
              "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"}}
    target[name] = spec
  contents = {"version": 3, "optimizer": {"target": param_trees.unflatten(target),
                                          "state": {"step": np.asarray(100, np.int32)}}}
  (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
  return saved


class T5XDatasetHandler(ocp.CheckpointHandler):
  """Stands in for T5X's DatasetCheckpointHandler (the `dataset` item: a tf.data
  iterator checkpoint named `train_ds-<shard>-of-<shards>`); the importer must skip it."""

  def save(self, directory, args):
    (directory / "train_ds-000-of-001.index").write_bytes(b"tf.train.Checkpoint stand-in")

  def restore(self, directory, args=None):
    return None


@ocp.args.register_with_handler(T5XDatasetHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class T5XDatasetArgs(ocp.args.CheckpointArgs):
  item: object = None


def write_t5x_orbax(model_dir: pathlib.Path, flat: dict, step: int,
                    save_dtype: str | None = None) -> pathlib.Path:
  """A step directory as T5X writes it by default (`t5x/train.py`, use_orbax=True;
  t5x/checkpoints.py OrbaxCheckpointManagerInterface): an orbax CheckpointManager with
  step prefix `checkpoint` and the items `state` (PyTreeCheckpointHandler, use_ocdbt=True:
  the train state dict `{'target': params, 'state': {'step', 'param_states'}}`, nested by
  module name, Adafactor's `v_row`/`v_col`/`v`/`m` per parameter, `target` cast to
  SaveCheckpointConfig.dtype when given) and `dataset`. Returns checkpoint_<step>/."""
  import jax.numpy as jnp
  rng = np.random.default_rng(step)
  params = param_trees.unflatten(flat)
  param_states = param_trees.unflatten({
      name: {"v_row": np.zeros((1,), np.float32), "v_col": np.zeros((1,), np.float32),
             "v": rng.random(value.shape, np.float32), "m": np.zeros((1,), np.float32)}
      for name, value in flat.items()})
  state = {"target": params, "state": {"step": np.asarray(step, np.int32),
                                       "param_states": param_states}}
  dtype = None if save_dtype is None else jnp.dtype(save_dtype)
  save_args = {"target": jax.tree.map(lambda _: ocp.SaveArgs(dtype=dtype), params),
               "state": jax.tree.map(lambda _: ocp.SaveArgs(), state["state"])}
  options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", cleanup_tmp_directories=True)
  with ocp.CheckpointManager(model_dir, options=options, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(use_ocdbt=True),
      "dataset": T5XDatasetHandler()}) as manager:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state, save_args=save_args), dataset=T5XDatasetArgs()))
    manager.wait_until_finished()
  return model_dir / f"checkpoint_{step}"
