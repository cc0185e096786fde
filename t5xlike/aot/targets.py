"""Named compile targets: TPU slices and GPU nodes, with data-sheet figures per chip.

`parse_target('v4-256')` reads a Cloud TPU accelerator name (`v4-N` and
`v5p-N` count TensorCores, two per chip; `v5litepod-N` / `v5e-N` and
`v6e-N` count chips), libtpu's own form (`v5p:4x4x4`, `v5e:2x2`) or a GPU
node (`h100-8`, `2xh100-8` = two hosts of eight) and returns a `Target`.
`compile_devices(target)` makes its devices without the hardware: libtpu's
compile-only TPU topology (the `tpu` extra) or the CUDA plugin's
compile-only GPU topology described by a `GpuTargetConfigProto` of this
package (`gpu_targets/<chip>.txtpb`, the `gpu` extra). Those devices carry a
mesh and let `jax.jit(...).lower(...).compile()` run the real compiler of
the target; nothing can run on them.

Slice shapes follow Cloud TPU's: a 3D torus for v4 / v5p (4 chips per host,
2x2x1; the smallest dimension is doubled, the last of equals first:
8 chips 2x2x2, 16 2x2x4, 32 2x4x4, 64 4x4x4, 128 4x4x8, 256 4x8x8...), 2D
for v5e / v6e (4 2x2, 8 2x4, 16 4x4, ... 256 16x16), with wrap-around links
on dimensions of a full torus (all of 4x4x4 and larger; 16 on v5e / v6e).
Other shapes: name them in libtpu's form.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import os
import re
from typing import Any

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's data-sheet figures.

  Attributes:
    name: 'v4', 'v5e', 'v5p', 'v6e', 'a100', 'h100', 'h200' or 'b200'.
    platform: 'tpu' or 'gpu'.
    hbm_bytes: memory per chip, bytes.
    peak_bf16_tflops: dense bfloat16 matmul peak, TFLOP/s.
    hbm_bytes_per_s: memory bandwidth, bytes/s.
    link_bytes_per_s: chip-to-chip bandwidth inside a slice / node, per chip and
      direction, bytes/s (TPU ICI; NVLink).
    dcn_bytes_per_s: per-chip bandwidth between slices / hosts, bytes/s (GPUs: one
      400 Gb/s InfiniBand NIC per GPU; TPUs: the host's data-center network
      bandwidth over its chips; 0 where Google publishes none: v4).
    cores_per_chip_in_name: TensorCores per chip counted by the accelerator name
      (v4-8 is 4 chips: 2), else 1.
    torus_dims: dimensions of a TPU slice's torus (3: v4, v5p; 2: v5e, v6e); 0 for GPUs.
  """
  name: str
  platform: str
  hbm_bytes: int
  peak_bf16_tflops: float
  hbm_bytes_per_s: float
  link_bytes_per_s: float
  dcn_bytes_per_s: float = 0.0
  cores_per_chip_in_name: int = 1
  torus_dims: int = 0


# Google Cloud TPU system-architecture pages (bf16 peak, HBM, HBM bandwidth, ICI
# bandwidth per chip: v4 2,400 Gbps, v5e 1,600, v5p 4,800, v6e 3,584 in both
# directions: half each way; data-center network per chip: v5e 2 x 100 Gbps NICs and
# v6e 4 x 200 Gbps per host of 8 chips, v5p 50 Gbps per chip) and NVIDIA's data sheets
# (SXM parts, dense bf16; NVLink 600 / 900 / 900 / 1,800 GB/s total, half each way; HBM
# 80 / 80 / 141 / 180 GB).
CHIPS: dict[str, Chip] = {chip.name: chip for chip in (
    Chip("v4", "tpu", 32 * GIB, 275.0, 1200e9, 2400e9 / 16, cores_per_chip_in_name=2,
         torus_dims=3),
    Chip("v5e", "tpu", 16 * GIB, 197.0, 819e9, 1600e9 / 16, 200e9 / 8 / 8, torus_dims=2),
    Chip("v5p", "tpu", 95 * GIB, 459.0, 2765e9, 4800e9 / 16, 50e9 / 8, cores_per_chip_in_name=2,
         torus_dims=3),
    Chip("v6e", "tpu", 32 * GIB, 918.0, 1640e9, 3584e9 / 16, 800e9 / 8 / 8, torus_dims=2),
    Chip("a100", "gpu", 80 * GIB, 312.0, 2039e9, 300e9, 25e9),
    Chip("h100", "gpu", 80 * GIB, 989.0, 3350e9, 450e9, 50e9),
    Chip("h200", "gpu", 141 * GIB, 989.0, 4800e9, 450e9, 50e9),
    Chip("b200", "gpu", 180 * GIB, 2250.0, 8000e9, 900e9, 50e9),
)}

#: Accelerator-name prefixes (Cloud TPU's and ours) -> chip.
_TPU_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
#: libtpu's generation names in its topology strings.
_LIBTPU_NAMES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}
#: What the device kinds of libtpu's and the CUDA plugin's devices read.
DEVICE_KINDS = {"v4": "TPU v4", "v5p": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}
FORMS = ("v4-N, v5p-N (N TensorCores, 2 per chip), v5litepod-N, v5e-N, v6e-N (N chips), "
         "libtpu's v5p:4x4x4 / v5e:2x2, or a GPU node h100-8, 2xh100-8 (a100, h100, h200, b200)")


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU slice (or several over DCN) or a set of GPU hosts to compile for.

  Attributes:
    name: the name as given (`v4-256`, `v5p:4x4x4`, `2xh100-8`).
    chip: the chip's figures.
    shape: TPU: chips along the slice's torus dimensions; GPU: (hosts, GPUs per host).
    num_slices: TPU slices connected over the data-center network (1: one slice).
  """
  name: str
  chip: Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def chips(self) -> int:
    """Chips (GPUs) of all slices (hosts) together."""
    return self.chips_per_slice * self.num_slices

  @property
  def libtpu_topology(self) -> str:
    """libtpu's name of one slice, e.g. 'v4:4x4x8'."""
    return f"{_LIBTPU_NAMES[self.chip.name]}:{'x'.join(map(str, self.shape))}"

  def describe(self) -> str:
    slices = f" x {self.num_slices} slices over DCN" if self.num_slices > 1 else ""
    if self.chip.platform == "gpu":
      return f"{self.name}: {self.shape[0]} host(s) x {self.shape[1]} {self.chip.name.upper()}"
    return f"{self.name}: {self.libtpu_topology} ({self.chips_per_slice} chips){slices}"


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The Cloud TPU slice shape of `chips` chips (module docstring); ValueError when
  `chips` is not a power of two of at least 1 (2D) or 4 (3D)."""
  if chips < 1 or chips & (chips - 1) or (dims == 3 and chips < 4):
    raise ValueError(f"{chips} chips is not a standard slice (use libtpu's form, e.g. "
                     f"v5p:4x4x12)")
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, size in enumerate(shape) if size == smallest)
    shape[last] *= 2
  return tuple(sorted(shape)) if dims == 2 else tuple(shape)


def parse_target(name: str, num_slices: int = 1) -> Target:
  """The `Target` an accelerator name denotes (`FORMS`); ValueError naming the forms.

  Args:
    name: `v4-256`, `v5litepod-16`, `v5p:4x4x4`, `h100-8`, `2xh100-8`...
    num_slices: TPU slices over DCN (`--num_slices`); GPUs take hosts in the name.
  """
  if num_slices < 1:
    raise ValueError(f"--num_slices must be >= 1, got {num_slices}")
  text = name.strip().lower()
  cloud = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", text)
  libtpu = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", text)
  gpu = re.fullmatch(r"(?:(\d+)x)?(a100|h100|h200|b200)-(\d+)", text)
  if cloud:
    chip = CHIPS[_TPU_PREFIXES[cloud.group(1)]]
    count = int(cloud.group(2))
    if count % chip.cores_per_chip_in_name:
      raise ValueError(f"topology {name!r}: {chip.name} names count "
                       f"{chip.cores_per_chip_in_name} TensorCores per chip")
    shape = torus_shape(count // chip.cores_per_chip_in_name, chip.torus_dims)
    return Target(name, chip, shape, num_slices)
  if libtpu:
    chip = CHIPS[libtpu.group(1)]
    shape = tuple(int(size) for size in libtpu.group(2).split("x"))
    if len(shape) != chip.torus_dims or min(shape) < 1:
      raise ValueError(f"topology {name!r}: {chip.name} slices have {chip.torus_dims} "
                       f"dimensions")
    return Target(name, chip, shape, num_slices)
  if gpu:
    if num_slices != 1:
      raise ValueError(f"topology {name!r}: GPU hosts go in the name ({num_slices}x{text}), "
                       f"not --num_slices")
    hosts, per_host = int(gpu.group(1) or 1), int(gpu.group(3))
    if not (hosts >= 1 and 1 <= per_host <= 8):
      raise ValueError(f"topology {name!r}: 1 to 8 GPUs per host")
    return Target(name, CHIPS[gpu.group(2)], (hosts, per_host))
  raise ValueError(f"unknown topology {name!r}; known forms: {FORMS}")


def _tpu_options(target: Target) -> dict[str, Any]:
  """libtpu's topology options of one slice: megacore chips (v4 and v5p: one device
  per chip, as Cloud TPU runs them), the chips of one host, wrap-around links."""
  shape = target.shape
  options: dict[str, Any] = {}
  if target.chip.cores_per_chip_in_name == 2:
    options["chip_config_name"] = "megacore"
  host = (2, 2, 1) if target.chips_per_slice >= 4 else tuple(shape) + (1,)
  options["chips_per_host_bounds"] = host
  if target.chip.torus_dims == 3:
    options["wrap"] = (min(shape) >= 4,) * 3
  else:
    options["wrap"] = (shape[0] >= 16, shape[1] >= 16, False)
  if target.num_slices > 1:
    options["num_slices"] = target.num_slices
  return options


def gpu_target_config(chip: str) -> str:
  """The `GpuTargetConfigProto` (text format) of a GPU chip, from this package."""
  return importlib.resources.files(__package__).joinpath(
      "gpu_targets", f"{chip}.txtpb").read_text()


def missing_support(target: Target) -> str | None:
  """A one-line reason the target's compiler is not installed, naming the install
  command; None when it is."""
  if target.chip.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
    return (f"compiling for {target.name} needs libtpu (the TPU compiler): "
            f"pip install -e '.[tpu]'")
  if target.chip.platform == "gpu" and importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    return (f"compiling for {target.name} needs JAX's CUDA plugin (the GPU compiler): "
            f"pip install -e '.[gpu]'")
  return None


def compile_devices(target: Target) -> list[Any]:
  """The target's compile-only devices (`jax.Device`s nothing runs on).

  TPU: libtpu reads TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES when it loads
  and prints warnings without them; they are set (when unset) to this target, and
  ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets several processes compile at once.
  GPU: the CUDA plugin registers its topology only when it did not fail to find a
  GPU, i.e. with JAX_PLATFORMS=cpu on a machine without one (as the tests and
  `python -m t5xlike.compile` run).
  Raises:
    ValueError: the compiler is missing (`missing_support`) or refuses the topology.
  """
  reason = missing_support(target)
  if reason:
    raise ValueError(reason)
  from jax.experimental import topologies  # noqa: PLC0415  (loads libtpu / the CUDA plugin)
  if target.chip.platform == "tpu":
    cores = target.chips_per_slice * target.chip.cores_per_chip_in_name
    name = "v5litepod" if target.chip.name == "v5e" else target.chip.name
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{name}-{cores}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes /tmp/libtpu_lockfile to own the host's TPUs; compile-only devices open
    # none, so other processes (another compile, the tests) may hold libtpu meanwhile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      description = topologies.get_topology_desc(
          platform="tpu", topology_name=target.libtpu_topology, **_tpu_options(target))
    except Exception as error:  # noqa: BLE001  (libtpu raises JaxRuntimeError, RuntimeError)
      raise ValueError(f"libtpu refuses topology {target.name}: "
                       f"{str(error).splitlines()[0][:200]}") from None
  else:
    hosts, per_host = target.shape
    try:
      description = topologies.get_topology_desc(
          platform="cuda", target_config=gpu_target_config(target.chip.name),
          topology=f"1x{hosts}x{per_host}")
    except NotImplementedError:
      raise ValueError("the CUDA plugin registered no compile-only topology: run with "
                       "JAX_PLATFORMS=cpu on a machine without a GPU") from None
  devices = list(description.devices)
  if len(devices) != target.chips:
    raise ValueError(f"topology {target.name}: expected {target.chips} devices, libtpu made "
                     f"{len(devices)}")
  return devices
