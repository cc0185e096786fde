"""Reading T5X checkpoints (no t5x install: msgpack + TensorStore, or orbax).

A T5X step directory `checkpoint_<N>/` is one of (t5x/checkpoints.py):
- orbax, what `t5x/train.py` writes by default (`OrbaxCheckpointManagerInterface`):
  an orbax CheckpointManager step (a `_CHECKPOINT_METADATA` file) with two
  items, `state/`, an OCDBT PyTree checkpoint of T5X's train state dict
  `{'target': params, 'state': {'step', 'param_states'}}` (nested dicts keyed
  by module name, as `TrainState.state_dict()` returns them), and
  `dataset/`, the input iterator (ignored here). A PyTree checkpoint in the
  step directory itself, or `--checkpoint` naming the `state/` item, is read
  the same way; the parameters are `target` (or `params`);
- msgpack, T5X's `Checkpointer`: a file `checkpoint` holding
  `{'version': 3, 'optimizer': {'target': params, 'state': ...}}` whose
  leaves are NumPy arrays (small, unpartitioned ones) or TensorStore spec
  dicts `{'driver': 'zarr', 'kvstore': {'driver': 'file', 'path':
  'target.encoder.layers_0.mlp.wi_0.kernel'}, 'metadata': ...}` with paths
  relative to the step directory (gcs specs are read from the local directory).
Anything else is a ValueError naming what was expected (one line).

T5X's T5.1.1 / mT5 / Flan-T5 / UL2 networks (t5x/examples/t5) are unscanned:
`<stack>/layers_<i>/...`, one relative position table per stack. A
`<stack>/layers/...` layout with the layer axis at 1 (`nn.scan` with
`variable_axes={'params': 1}`) is unstacked. T5X's scanned network
(t5x/examples/scalable_t5: `encoder/encoder/...`, layer axis 1) has a
relative position table in every layer, which t5xlike's T5 has not:
`t5_config` refuses it.

`read` yields the parameters one tensor at a time (TensorStore reads are per
array); `t5_config` derives a `t5.T5Config` from their shapes.
"""
from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping
from typing import Any, TypeGuard

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import serialization

from t5xlike import errors
from t5xlike.interop import param_trees
from t5xlike.models import t5

MSGPACK = "checkpoint"
#: The item of T5X's orbax step directory that holds the train state (t5x/checkpoints.py).
STATE_ITEM = "state"
#: Top-level keys of a T5X train state dict that hold the parameters, in order of preference.
PARAMS_KEYS = ("target", "params")
SCANNED_LAYER_AXIS = 1
# Files only an orbax PyTree checkpoint directory has (OCDBT or per-array); a
# CheckpointManager step directory has `_CHECKPOINT_METADATA` and items instead.
_PYTREE_MARKERS = ("_METADATA", "manifest.ocdbt")
_EXPECTED = (f"expected T5X's orbax step directory (a '{STATE_ITEM}/' PyTree item holding "
             f"'target'), an orbax PyTree checkpoint, or a '{MSGPACK}' msgpack file")
# What orbax and TensorStore raise on a damaged checkpoint (a missing or corrupt file).
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)


def _reason(error: BaseException) -> str:
  """The error in one line, without the TensorStore spec that TensorStore appends."""
  return errors.one_line(error).split(" [tensorstore_spec=")[0]


def _is_spec(value: Any) -> TypeGuard[dict[str, Any]]:
  return isinstance(value, dict) and {"driver", "kvstore"} <= set(value)


def _is_pytree(directory: pathlib.Path) -> bool:
  return any((directory / marker).is_file() for marker in _PYTREE_MARKERS)


def locate(directory: str | pathlib.Path) -> tuple[str, pathlib.Path]:
  """('orbax', the PyTree checkpoint directory) or ('msgpack', the step directory)
  of a T5X checkpoint; ValueError (one line, naming what was expected) otherwise."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise ValueError(f"{directory}: not a directory ({_EXPECTED})")
  for candidate in (directory / STATE_ITEM, directory):
    if _is_pytree(candidate):
      return "orbax", candidate
  if (directory / MSGPACK).is_file():
    return "msgpack", directory
  raise ValueError(f"{directory} is not a T5X checkpoint step directory: {_EXPECTED}")


def _read_spec(directory: pathlib.Path, spec: dict) -> np.ndarray:
  spec = dict(spec)
  kvstore = dict(spec["kvstore"])
  relative = kvstore.get("path", spec.pop("path", None))
  spec["kvstore"] = {"driver": "file", "path": str(directory / relative)}
  try:
    return np.asarray(ts.open(spec, open=True).result().read().result())
  except _READ_ERRORS as error:
    raise ValueError(f"{directory / str(relative)}: unreadable TensorStore array "
                     f"({_reason(error)})") from None


def _msgpack_params(directory: pathlib.Path) -> dict[str, Any]:
  """{path: array or TensorStore spec dict} of the `target` tree of a `checkpoint` file."""
  file = directory / MSGPACK
  try:
    contents = serialization.msgpack_restore(file.read_bytes())
  except (ValueError, TypeError) as error:
    raise ValueError(f"{file}: not a T5X msgpack checkpoint ({_reason(error)}); "
                     f"{_EXPECTED}") from None
  state = contents.get("optimizer", contents) if isinstance(contents, dict) else None
  if not isinstance(state, dict) or not isinstance(state.get("target"), dict):
    raise ValueError(f"{file} has no 'target' (the parameters) under 'optimizer'")
  leaves = _join_specs(state["target"])
  for name, value in leaves.items():
    if not (_is_spec(value) or isinstance(value, np.ndarray | np.number | float | int)):
      raise ValueError(f"{file}: target/{name} is a {type(value).__name__}, expected an "
                       "array or a TensorStore spec")
  return leaves


def _join_specs(tree: dict, prefix: str = "") -> dict[str, Any]:
  """flatten() that keeps TensorStore spec dicts as leaves."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and not _is_spec(value):
      out.update(_join_specs(value, f"{name}/"))
    else:
      out[name] = value
  return out


def _orbax_params(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """{path: array in its saved dtype} of the parameters (`target` or `params`) of an
  orbax PyTree checkpoint; the rest of the train state (optimizer state) is not read."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    try:
      tree = handler.metadata(directory).tree
    except _READ_ERRORS as error:
      raise ValueError(f"{directory}: unreadable orbax PyTree metadata "
                       f"({_reason(error)})") from None
    key = next((k for k in PARAMS_KEYS if isinstance(tree, Mapping) and k in tree), None)
    if key is None or not isinstance(tree[key], Mapping):
      found = ", ".join(map(str, tree)) if isinstance(tree, Mapping) else type(tree).__name__
      raise ValueError(f"{directory} holds no 'target' (T5X's parameters; found: "
                       f"{found or 'nothing'})")
    item = {key: tree[key]}
    restore_args = _numpy_restore_args(ocp.checkpoint_utils.construct_restore_args(item))
    try:
      restored = handler.restore(directory, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    except _READ_ERRORS as error:
      raise ValueError(f"{directory}: unreadable orbax checkpoint "
                       f"({_reason(error)})") from None
  finally:
    handler.close()
  return param_trees.flatten(restored[key])


def _numpy_restore_args(restore_args: Any) -> Any:
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), restore_args,
                      is_leaf=lambda x: isinstance(x, ocp.RestoreArgs))


def read(directory: str | pathlib.Path) -> tuple[bool, Iterator[tuple[str, np.ndarray]]]:
  """(whether the checkpoint is scanned, (unscanned parameter path, array in its saved
  dtype) pairs, one TensorStore array read at a time) of a T5X step directory.

  ValueError (one line) for anything that is not a readable T5X checkpoint."""
  kind, directory = locate(directory)
  leaves = _msgpack_params(directory) if kind == "msgpack" else _orbax_params(directory)
  scanned = param_trees.is_scanned(leaves)

  def arrays() -> Iterator[tuple[str, np.ndarray]]:
    for name in list(leaves):
      value = leaves.pop(name)
      value = _read_spec(directory, value) if _is_spec(value) else np.asarray(value)
      if param_trees.is_scanned([name]):
        yield from param_trees.unstack({name: value}, SCANNED_LAYER_AXIS).items()
      else:
        yield name, value
  return scanned, arrays()


def t5_config(shapes: dict[str, tuple[int, ...]], mlp_activation: str = "gelu",
              relative_attention_max_distance: int = 128,
              scan_layers: bool = False) -> t5.T5Config:
  """A `t5.T5Config` from the parameter shapes of a T5X encoder-decoder.

  Derived: vocab and d_model (embedding), heads and buckets (relative
  position table), head_dim (query kernel / heads), d_ff, depths, gated
  (wi_0/wi_1) or not (wi), tied (no `decoder/logits_dense`). Not in the
  arrays, so given: the MLP activation ('gelu' for T5.1.1, mT5, Flan-T5;
  'silu' for UL2; 'relu' for T5 v1.0) and the relative position max distance.
  ValueError for what is not T5X's T5 network (a per-layer relative position
  table: scalable_t5).
  """
  per_layer = sorted(name for name in shapes if name.endswith("relpos_bias/rel_embedding")
                     and name not in ("encoder/relpos_bias/rel_embedding",
                                      "decoder/relpos_bias/rel_embedding"))
  if per_layer:
    raise ValueError(f"{per_layer[0]}: a relative position table per layer (T5X's "
                     "scalable_t5 network) is not supported; t5xlike's T5 has one per stack "
                     "(encoder/relpos_bias, decoder/relpos_bias)")

  def need(name: str) -> tuple[int, ...]:
    if name not in shapes:
      raise ValueError(f"not a T5 encoder-decoder checkpoint: no {name} (found e.g. "
                       f"{', '.join(sorted(shapes)[:4])})")
    return shapes[name]
  vocab_size, emb_dim = need("token_embedder/embedding")
  num_heads, buckets = need("encoder/relpos_bias/rel_embedding")
  query = need("encoder/layers_0/attention/query/kernel")
  gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
  mlp_dim = need("encoder/layers_0/mlp/wo/kernel")[0]
  return t5.T5Config(
      vocab_size=vocab_size, emb_dim=emb_dim, num_heads=num_heads,
      num_encoder_layers=param_trees.count_layers(shapes, "encoder"),
      num_decoder_layers=param_trees.count_layers(shapes, "decoder"),
      head_dim=query[1] // num_heads, mlp_dim=mlp_dim,
      mlp_activations=(mlp_activation, "linear") if gated else (mlp_activation,),
      logits_via_embedding="decoder/logits_dense/kernel" not in shapes,
      relative_attention_num_buckets=buckets,
      relative_attention_max_distance=relative_attention_max_distance,
      scan_layers=scan_layers)
