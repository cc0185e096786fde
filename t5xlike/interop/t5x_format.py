"""Reading T5X checkpoints (no t5x install: msgpack + TensorStore, or orbax).

Two layouts of a T5X step directory `checkpoint_<N>/`:
- T5X's own (t5x/checkpoints.py): a msgpack file `checkpoint` holding
  `{'version': 3, 'optimizer': {'target': params, 'state': ...}}` whose
  leaves are NumPy arrays (small, unpartitioned ones) or TensorStore spec
  dicts `{'driver': 'zarr', 'kvstore': {'driver': 'file', 'path':
  'target.encoder.layers_0.mlp.wi_0.kernel'}, 'metadata': ...}` with paths
  relative to the step directory (gcs specs are read from the local directory);
- orbax (newer T5X; OCDBT or per-array zarr): a PyTree checkpoint in the step
  directory (or its `state/`), parameters under `target` (or `params`).
Scanned T5X models (`nn.scan` with `variable_axes={'params': 1}`) have
`<stack>/layers/...` arrays with the layer axis at 1; they are unstacked.

`read` yields the parameters one tensor at a time (TensorStore reads are per
array); `t5_config` derives a `t5.T5Config` from their shapes.
"""
from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any, TypeGuard

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import serialization

from t5xlike.interop import param_trees
from t5xlike.models import t5

MSGPACK = "checkpoint"
SCANNED_LAYER_AXIS = 1
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")


def _is_spec(value: Any) -> TypeGuard[dict[str, Any]]:
  return isinstance(value, dict) and {"driver", "kvstore"} <= set(value)


def _is_orbax(directory: pathlib.Path) -> bool:
  return any((directory / marker).exists() for marker in _ORBAX_MARKERS)


def layout(directory: str | pathlib.Path) -> str:
  """'msgpack' (T5X's `checkpoint` file) or 'orbax'; ValueError when neither."""
  directory = pathlib.Path(directory)
  if (directory / MSGPACK).is_file() and not _is_orbax(directory):
    return "msgpack"
  if _is_orbax(directory) or _is_orbax(directory / "state"):
    return "orbax"
  raise ValueError(f"{directory} is not a T5X checkpoint step directory (no '{MSGPACK}' "
                   "msgpack file and no orbax checkpoint)")


def _read_spec(directory: pathlib.Path, spec: dict) -> np.ndarray:
  spec = dict(spec)
  kvstore = dict(spec["kvstore"])
  relative = kvstore.get("path", spec.pop("path", None))
  spec["kvstore"] = {"driver": "file", "path": str(directory / relative)}
  return np.asarray(ts.open(spec, open=True).result().read().result())


def _msgpack_params(directory: pathlib.Path) -> dict[str, Any]:
  """{path: array or TensorStore spec dict} of the `target` tree of a `checkpoint` file."""
  contents = serialization.msgpack_restore((directory / MSGPACK).read_bytes())
  state = contents.get("optimizer", contents)
  if not isinstance(state, dict) or "target" not in state:
    raise ValueError(f"{directory / MSGPACK} has no 'target' (the parameters)")
  return _join_specs(state["target"])


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
  """{path: array} of the parameters of an orbax PyTree checkpoint (read whole)."""
  if not _is_orbax(directory):
    directory = directory / "state"
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    key = next((k for k in ("target", "params") if k in tree), None)
    item = {key: tree[key]} if key else tree
    restore_args = _numpy_restore_args(ocp.checkpoint_utils.construct_restore_args(item))
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  return param_trees.flatten(restored[key] if key else restored)


def _numpy_restore_args(restore_args: Any) -> Any:
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), restore_args,
                      is_leaf=lambda x: isinstance(x, ocp.RestoreArgs))


def read(directory: str | pathlib.Path) -> tuple[bool, Iterator[tuple[str, np.ndarray]]]:
  """(whether the checkpoint is scanned, (unscanned parameter path, array in its saved
  dtype) pairs, one TensorStore array read at a time) of a T5X step directory."""
  directory = pathlib.Path(directory)
  leaves = (_msgpack_params(directory) if layout(directory) == "msgpack"
            else _orbax_params(directory))
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
  """
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
