"""Device mesh and logical-axis partitioning (SPMD over `jax.sharding.Mesh`).

Models name the axes of every parameter and main activation with logical
names; one rules list maps those names to the mesh axes `data`, `fsdp` and
`tensor`. The mesh comes from the gin macro `MESH_SHAPE`, a dict from axis
name to size where unnamed axes are 1 and `-1` means "the remaining devices".

Flax resolves a logical name to the first rule whose mesh axis is not used
yet by the same array, so activations `[batch, length, embed]` under the
FSDP rules shard `batch` over data x fsdp and leave `embed` whole.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_REPLICATED_PARAMS = (("vocab", None), ("embed", None), ("mlp", None), ("heads", None),
                      ("kv", None), ("joined_kv", None), ("relpos_buckets", None),
                      ("layers", None), ("length", None))

#: Pure data parallelism: batch over data x fsdp, every parameter replicated.
DATA_PARALLEL_RULES: LogicalRules = (("batch", ("data", "fsdp")),) + _REPLICATED_PARAMS

#: ZeRO-3 style: parameters (and optimizer state) sharded along `embed` over fsdp.
FSDP_RULES: LogicalRules = (("batch", ("data", "fsdp")), ("embed", "fsdp")) + _REPLICATED_PARAMS

#: data x fsdp x tensor: Megatron-style heads / mlp / vocab over tensor, embed over fsdp.
DATA_FSDP_TENSOR_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("joined_kv", "tensor"),
    ("mlp", "tensor"), ("vocab", "tensor")) + _REPLICATED_PARAMS


RULE_PRESETS: dict[str, LogicalRules] = {
    "data_parallel": DATA_PARALLEL_RULES,
    "fsdp": FSDP_RULES,
    "data_fsdp_tensor": DATA_FSDP_TENSOR_RULES,
}


def logical_axis_rules(preset: str = "data_parallel",
                       overrides: LogicalRules = ()) -> LogicalRules:
  """A rules preset by name (`data_parallel`, `fsdp`, `data_fsdp_tensor`).

  `overrides` are placed first, so they win over the preset's rule for the
  same logical name.
  """
  if preset not in RULE_PRESETS:
    raise ValueError(f"unknown logical axis rules preset {preset!r}; known: "
                     f"{', '.join(RULE_PRESETS)}")
  return tuple(overrides) + tuple(RULE_PRESETS[preset])


def resolve_mesh_shape(mesh_shape: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """Validates MESH_SHAPE and fills in -1; returns sizes for all of MESH_AXES."""
  shape = dict(mesh_shape or {"data": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"MESH_SHAPE has unknown axes {sorted(unknown)}; known axes: {MESH_AXES}")
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"MESH_SHAPE={shape}: sizes must be positive, with at most one -1")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"MESH_SHAPE={shape}: {num_devices} devices are not divisible by {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"MESH_SHAPE={shape} needs {math.prod(sizes.values())} devices, "
                     f"but {num_devices} are available")
  return sizes


def make_mesh(mesh_shape: Mapping[str, int] | None,
              devices: Sequence[jax.Device] | None = None,
              dcn_mesh_shape: Mapping[str, int] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor); `tensor` varies fastest (kept within a host).

  `dcn_mesh_shape`: the per-axis number of slices connected by the
  data-center network (multi-slice TPU; GPU hosts); `mesh_shape` is then the
  shape inside one slice (host), and the mesh is their product (a hybrid mesh
  from `mesh_utils.create_hybrid_device_mesh`). The granules are the
  devices' TPU slices, or their processes (GPU hosts) when they all share one
  slice index. Checked on compile-only multi-slice TPU and multi-host GPU
  devices (`t5xlike.aot.targets`), not on real ones.
  """
  devices = list(devices if devices is not None else jax.devices())
  if dcn_mesh_shape:
    dcn = resolve_mesh_shape(dcn_mesh_shape, math.prod(v for v in dcn_mesh_shape.values()
                                                       if v > 0))
    num_slices = math.prod(dcn.values())
    slices = {getattr(d, "slice_index", None) for d in devices}
    by_process = len(slices) == 1
    granules = {d.process_index for d in devices} if by_process else slices
    if len(granules) != num_slices or len(devices) % num_slices:
      raise ValueError(f"DCN_MESH_SHAPE={dict(dcn_mesh_shape)} needs {num_slices} slices "
                       f"(hosts) of devices; these devices form {len(granules)}")
    ici = resolve_mesh_shape(mesh_shape, len(devices) // num_slices)
    device_array = mesh_utils.create_hybrid_device_mesh(
        tuple(ici[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES), devices,
        process_is_granule=by_process)
    return Mesh(device_array, MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  sizes = resolve_mesh_shape(mesh_shape, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def host_array(value: Any) -> np.ndarray:
  """A whole host NumPy copy of an array: a multi-process sharded `jax.Array` is gathered
  from every process first (`process_allgather`, tiled: every process must call this)."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(jax.device_get(value))


#: (key path, logical axis names or None, shape) of a parameter: see `boxed_leaves`.
BoxedLeaf = tuple[jax.tree_util.KeyPath, tuple[str | None, ...] | None, tuple[int, ...]]


def boxed_leaves(boxed_params: Any) -> list[BoxedLeaf]:
  """(path, logical axis names or None, shape) of each leaf of a tree of
  `nn.LogicallyPartitioned` (or plain) parameters."""
  out: list[BoxedLeaf] = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
    if isinstance(leaf, nn.LogicallyPartitioned):
      out.append((path, tuple(leaf.names), tuple(leaf.value.shape)))
    else:
      out.append((path, None, tuple(leaf.shape)))
  return out


class Partitioner:
  """Maps logically-named arrays onto a mesh.

  Args:
    mesh_shape: MESH_SHAPE; None or {} means all devices on `data`.
    logical_axis_rules: a rules list such as DATA_PARALLEL_RULES.
    devices: the devices of the mesh (default: all).
    dcn_mesh_shape: DCN_MESH_SHAPE for multi-slice TPU runs (see `make_mesh`).
  """

  def __init__(self, mesh_shape: Mapping[str, int] | None = None,
               logical_axis_rules: LogicalRules = DATA_PARALLEL_RULES,
               devices: Sequence[jax.Device] | None = None,
               dcn_mesh_shape: Mapping[str, int] | None = None):
    self.mesh = make_mesh(mesh_shape, devices, dcn_mesh_shape)
    self.rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                       for name, axes in logical_axis_rules)

  @contextlib.contextmanager
  def activate(self):
    """Context in which `nn.with_logical_constraint` uses this mesh and these rules."""
    with jax.set_mesh(self.mesh) if hasattr(jax, "set_mesh") else self.mesh, \
        nn.logical_axis_rules(self.rules):
      yield

  def _mesh_axes(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
    """The mesh axes of an array with these logical axes, under this partitioner's rules."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), self.rules)
    assert spec is not None  # None only for logical axes None.
    return spec

  def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(self.mesh, self._mesh_axes(logical_axes))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def batch_sharding(self) -> NamedSharding:
    """Sharding of `[batch, ...]` input arrays."""
    return self.sharding(("batch",))

  def variable_shardings(self, boxed_variables: Any) -> Any:
    """Shardings for a tree of `nn.LogicallyPartitioned` (or plain, replicated) leaves."""
    specs = nn.get_partition_spec(boxed_variables)
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, self._mesh_axes(spec)), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))

  def optimizer_state_shardings(self, abstract_opt_state: Any, boxed_params: Any) -> Any:
    """Shardings for optimizer state that follow the parameters they belong to.

    A state leaf belongs to the parameter whose path (its dict keys) ends the
    leaf's path. A leaf of the parameter's shape takes the parameter's
    logical axes (Adam moments, unfactored Adafactor); a leaf with one
    dimension fewer (Adafactor's factored row / column moments) takes the
    axes of the dimensions it kept; anything else (counts, placeholders) is
    replicated. So FSDP rules shard optimizer state the way they shard
    parameters (ZeRO-3).
    """
    dict_keys = lambda path: tuple(str(k.key) for k in path
                                   if isinstance(k, jax.tree_util.DictKey))
    params = {dict_keys(path): (shape, names)
              for path, names, shape in boxed_leaves(boxed_params)}

    def leaf_sharding(path, leaf):
      keys = dict_keys(path)
      for start in range(len(keys)):
        if keys[start:] in params:
          shape, names = params[keys[start:]]
          break
      else:
        return self.replicated()
      if names is None:
        return self.replicated()
      if tuple(leaf.shape) == shape:
        return self.sharding(names)
      if len(leaf.shape) == len(shape) - 1:
        for dropped in range(len(shape)):
          if shape[:dropped] + shape[dropped + 1:] == tuple(leaf.shape):
            return self.sharding(names[:dropped] + names[dropped + 1:])
      return self.replicated()

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)

  def plan(self, boxed_params: Any, abstract_state: Any = None) -> list[str]:
    """Lines describing each parameter's partitioning and the per-device bytes.

    Per parameter: path, logical axes, mesh axes, global and per-device
    shape; then the bytes of parameters and optimizer state held by one
    device, from `abstract_state` (ShapeDtypeStructs with shardings).
    """
    lines = []
    for path, names, shape in boxed_leaves(boxed_params):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      sharding = self.sharding(names) if names else self.replicated()
      lines.append(f"{name:56s} {str(names or ()):28s} {str(tuple(sharding.spec)):28s} "
                   f"{shape} -> {sharding.shard_shape(shape)}")
    if abstract_state is not None:
      per_device = {part: sum(int(np.prod(leaf.sharding.shard_shape(tuple(leaf.shape))))
                              * np.dtype(leaf.dtype).itemsize
                              for leaf in jax.tree.leaves(getattr(abstract_state, part)))
                    for part in ("params", "opt_state")}
      lines.append(f"per-device bytes: params {per_device['params']:,}, "
                   f"optimizer state {per_device['opt_state']:,}")
    return lines

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def describe(self) -> str:
    axes = ", ".join(f"{name}={size}" for name, size in self.mesh.shape.items())
    platform = self.mesh.devices.flat[0].platform
    return f"mesh ({axes}) over {self.mesh.devices.size} {platform} device(s)"
