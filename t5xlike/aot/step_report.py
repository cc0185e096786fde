"""The per-chip report of a train step compiled for a target: memory, FLOPs, the cost
model's step time, collectives.

`StepReport.from_compiled(...)` reads an ahead-of-time compiled step
(`jax.stages.Compiled`): `memory_analysis()` (per-chip bytes of arguments,
outputs, aliased donations, temporaries and code), `cost_analysis()` (the
compiler's FLOPs, bytes accessed and, on TPU, libtpu's cost model's
`optimal_seconds`) and the optimised HLO (`hlo_stats`: collectives and
kernels per step). `table()` is the readable form, `json_line()` one JSON
object.

Memory: total = arguments + outputs - aliased + temporaries + code, what one
chip holds at the step's peak; it fits when that is at most the chip's HBM.
Parameters, optimizer state and batch are also given analytically, from the
shapes and shardings (`sharded_bytes`).

Step time is an estimate, never a measurement. TPU: libtpu's cost model
(`optimal_seconds`). That model has no figure for some kernels of their own
(`UNESTIMATED_TARGETS`: `ConcatBitcast`, from memory-space assignment's
prefetches): each such instruction adds -1 to `optimal_seconds` (once, even
inside a loop), so they are taken out again and counted as free
(`unestimated_kernels` says how many).
Both cost analyses (libtpu's, XLA's HLO cost analysis used for GPUs) count
the body of a `while` loop once, whatever its trip count (scan over
layers, micro-batches: checked by compiling scans of 4, 16 and 64 steps).
On TPUs the estimate is therefore scaled by `loop_expansion`, the ratio of
libtpu's own per-kernel cycle estimates (`estimated_cycles` in the backend
config of every kernel) summed with and without the trip counts
(`hlo_stats`); the compiler's FLOPs and bytes are given as counted (loop
bodies once) with that ratio. The ratio holds where `optimal_seconds` follows
the cycles (T5.1.1-XL cut to 4+4 layers on v5p-8: 1.4% from the unrolled
program's figure); where libtpu overlaps much of the work outside the loops
it under-scales them and the estimate comes out too fast (T5.1.1-XL and the
8B decoder on v5p-128: docs/scale_table.md, "Reading the estimates").
GPU: XLA's GPU compiler exposes no cost model, so the estimate is a roofline
of ours: the largest of compute (the analytic FLOPs with rematerialisation at
the chip's peak), HBM traffic (bytes accessed, scaled by the analytic over the
counted FLOPs for the loops, at HBM bandwidth; without the fused cuDNN
kernels' own traffic) and collectives (their bytes at NVLink bandwidth), i.e.
perfect overlap. The same three terms are reported for TPUs (collectives at
ICI bandwidth), to say where the time goes. Tokens per second per chip and MFU
follow from the estimate and the analytic model FLOPs (`t5xlike.flops`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from t5xlike.aot import hlo_stats as hlo_stats_lib
from t5xlike.aot.targets import GIB, Target

#: Custom-call targets of attention kernels: Pallas TPU (Mosaic) and cuDNN's fused attention.
MOSAIC_TARGETS = ("tpu_custom_call",)
#: Kernels (custom calls outside fusions) for which libtpu's cost model adds -1 to
#: `optimal_seconds` instead of a time, once per instruction (inside a loop too), found by
#: compiling: memory-space assignment's `ConcatBitcast`, multi-slice programs' `ZeroCrop`
#: and `SliceId` (a tiny decoder on 2 x v5e:2x2: 12 ZeroCrop and 4 ConcatBitcast, -16 s;
#: under fsdp 9 ZeroCrop and a SliceId, -10 s); `AllocateBuffer` and Mosaic kernels add
#: their own estimates or 0.
UNESTIMATED_TARGETS = ("ConcatBitcast", "ZeroCrop", "SliceId")
CUDNN_ATTENTION_TARGETS = ("__cudnn$fmha",)


def sharded_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of `jax.ShapeDtypeStruct`s with shardings (the
  largest shard: uneven shardings pad)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(tuple(leaf.shape))
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class StepFigures:
  """What the caller knows of the step besides the compiled program.

  Attributes:
    model_name: a short name of the model (the configured network and sizes).
    mesh: mesh axis -> size, over all chips.
    dcn_mesh: mesh axis -> slices (hosts) over the data-center network, a factor of
      `mesh` (empty: one slice).
    rules: the logical axis rules' preset name (or 'custom').
    batch_shapes: feature -> global shape.
    tokens_per_step: tokens of one global batch (encoder + decoder positions).
    num_microbatches: micro-batches per step.
    attention_impl: the configured `attention_impl`.
    params_bytes, opt_state_bytes, batch_bytes: per chip, from shapes and shardings.
    model_flops, hardware_flops: analytic FLOPs of one global step (without / with
      the forward recomputation of rematerialised layers); None if not covered.
  """
  model_name: str
  mesh: Mapping[str, int]
  dcn_mesh: Mapping[str, int]
  rules: str
  batch_shapes: Mapping[str, tuple[int, ...]]
  tokens_per_step: int
  num_microbatches: int
  attention_impl: str
  params_bytes: int
  opt_state_bytes: int
  batch_bytes: int
  model_flops: float | None
  hardware_flops: float | None


@dataclasses.dataclass(frozen=True)
class DepthProbe:
  """The step time extrapolated from the unrolled step at shallow depths
  (`aot.depth_probe`, `--estimate=probe`).

  Attributes:
    depths: the network's depth field(s) -> layers.
    points: the probed depths, each like `depths`.
    seconds: each probe's figure, per `term` (micro-batch loops scaled).
    step_seconds: the extrapolation of `seconds` to `depths`.
    compile_seconds: wall time of the probes' compilations.
    term: what `seconds` are: 'step' (TPU: libtpu's estimate of the step) or 'hbm'
      (GPU: the roofline's HBM term, XLA's bytes accessed of the loop-free probe at
      the chip's HBM bandwidth).
  """
  depths: Mapping[str, int]
  points: tuple[Mapping[str, int], ...]
  seconds: tuple[float, ...]
  step_seconds: float
  compile_seconds: float
  term: str = "step"

  def describe(self) -> str:
    probes = ", ".join(f"{'+'.join(map(str, p.values()))}: {t:.4g} s"
                       for p, t in zip(self.points, self.seconds))
    what = ("libtpu's cost model" if self.term == "step" else
            "the HBM traffic (XLA's bytes accessed at HBM bandwidth)")
    return (f"{what} of the unrolled step at shallow depths ({probes}), "
            f"extrapolated to {'+'.join(map(str, self.depths.values()))} layers")


@dataclasses.dataclass(frozen=True)
class StepReport:
  """The report of one compiled step on one target (see the module docstring).

  Attributes:
    target: the target compiled for.
    device_kind: the compile-only devices' kind.
    figures: what the caller knows of the step.
    memory: per-chip bytes by part: argument, output, alias, temp, code (compiler),
      total, hbm, headroom.
    compiler_flops, bytes_accessed: per chip, from the compiler (None if not given).
    step_seconds: the estimated step time (None: no estimate).
    estimate_source: what the estimate is.
    unestimated_kernels: kernels the TPU cost model has no figure for.
    roofline: compute / hbm / collectives seconds per step (see the module docstring).
    stats: collectives and custom calls of the optimised HLO.
    compile_seconds, compile_cpu_seconds: wall and process CPU time of the compilation.
    out_of_memory: the compiler refused the step for lack of memory (`refused_for_memory`):
      `memory` then holds the analytic arguments and the temporaries the compiler named.
    attention_fallbacks: what the attention kernels logged while the step was traced (a
      requested kernel that could not serve, and what ran instead).
    loop_expansion: how much the loops multiply the work the compiler's cost analysis
      counts (it counts a loop body once): TPU, from libtpu's per-kernel cycle estimates
      (`hlo_stats.HloStats.loop_expansion`); GPU, analytic over compiler FLOPs.
    probe: the depth probe that gave `step_seconds` (`--estimate=probe`), else None.
    loop_scaled_seconds: with a probe, the loop-scaled estimate it replaced.
  """
  target: Target
  device_kind: str
  figures: StepFigures
  memory: Mapping[str, int]
  compiler_flops: float | None
  bytes_accessed: float | None
  step_seconds: float | None
  estimate_source: str
  unestimated_kernels: int
  roofline: Mapping[str, float]
  stats: hlo_stats_lib.HloStats
  compile_seconds: float
  compile_cpu_seconds: float
  out_of_memory: bool = False
  attention_fallbacks: tuple[str, ...] = ()
  loop_expansion: float = 1.0
  probe: DepthProbe | None = None
  loop_scaled_seconds: float | None = None

  def with_probe(self, probe: DepthProbe) -> StepReport:
    """This report with the depth probe's step time (the loop-scaled one kept aside). A
    GPU probe gives the roofline's HBM term; the step is then the roofline's largest."""
    if probe.term == "hbm":
      roofline = {**self.roofline, "hbm_s": probe.step_seconds}
      return dataclasses.replace(
          self, probe=probe, roofline=roofline, step_seconds=max(roofline.values()),
          estimate_source=(f"roofline (ours: max of compute at peak, collectives at NVLink "
                           f"bandwidth and {probe.describe()})"),
          loop_scaled_seconds=self.step_seconds)
    source = probe.describe()
    if "dcn_s" in self.roofline:
      source += ", each probe with its transfers between slices (ours; not overlapped)"
    return dataclasses.replace(self, probe=probe, step_seconds=probe.step_seconds,
                               estimate_source=source, loop_scaled_seconds=self.step_seconds)

  @classmethod
  def from_compiled(cls, compiled: Any, target: Target, figures: StepFigures, *,
                    device_kind: str, compile_seconds: float, compile_cpu_seconds: float,
                    gpu_cost: Mapping[str, float] | None = None) -> StepReport:
    """The report of `compiled` (a `jax.stages.Compiled` for `target`'s devices).

    Args:
      compiled: the compiled step.
      target: the target it was compiled for.
      figures: what the caller knows of the step (shapes, analytic bytes and FLOPs).
      device_kind: the `device_kind` of the devices compiled for.
      compile_seconds: wall time of the compilation.
      compile_cpu_seconds: process CPU time of the compilation.
      gpu_cost: on GPUs (no `cost_analysis()`), the HLO cost analysis of the
        optimised module ('flops', 'bytes accessed'), when it could be made.
    """
    stats = hlo_stats_lib.hlo_stats(compiled.as_text())
    memory = memory_of(compiled.memory_analysis(), target)
    cost = compiled.cost_analysis() if target.chip.platform == "tpu" else gpu_cost
    cost = dict(cost or {})
    flops = float(cost["flops"]) if "flops" in cost else None
    accessed = float(cost["bytes accessed"]) if "bytes accessed" in cost else None
    chip = target.chip
    analytic = (figures.hardware_flops or 0.0) / target.chips
    # The compilers' cost analyses count a loop body once (scan over layers, micro-batches).
    if chip.platform == "tpu":
      expansion = stats.loop_expansion or 1.0
    else:  # no per-kernel estimates: the analytic FLOPs say how much the loops repeat
      expansion = max(1.0, analytic / flops) if flops else 1.0
    roofline = {
        "compute_s": max(analytic, (flops or 0.0) * (expansion if chip.platform == "tpu"
                                                     else 1.0))
        / (chip.peak_bf16_tflops * 1e12),
        "hbm_s": (accessed or 0.0) * expansion / chip.hbm_bytes_per_s,
        "collectives_s": stats.collective_bytes / chip.link_bytes_per_s,
    }
    if stats.dcn_bytes:
      roofline["dcn_s"] = dcn_seconds(stats.dcn_bytes, target)
    unestimated = 0
    if chip.platform == "tpu":
      step, unestimated, source = tpu_estimate(cost, stats)
      step = step * expansion if step else step
      if expansion != 1.0:
        source += (f"; loop bodies, which it counts once, scaled by their trip counts "
                   f"(x{expansion:.3g} in its per-kernel cycle estimates)")
      if step and stats.dcn_bytes:
        step, source = with_dcn(step, source, roofline["dcn_s"], target)
    else:
      step = max(roofline.values()) or None
      source = ("roofline (ours: max of compute at peak, HBM traffic, collectives at "
                "NVLink bandwidth; XLA's GPU cost model is not exposed)")
    return cls(target=target, device_kind=device_kind, figures=figures, memory=memory,
               compiler_flops=flops, bytes_accessed=accessed, step_seconds=step,
               estimate_source=source, unestimated_kernels=unestimated, roofline=roofline,
               stats=stats, compile_seconds=compile_seconds,
               compile_cpu_seconds=compile_cpu_seconds, loop_expansion=expansion)

  @classmethod
  def refused_for_memory(cls, message: str, target: Target, figures: StepFigures, *,
                    device_kind: str, compile_seconds: float,
                    compile_cpu_seconds: float) -> StepReport:
    """The report of a step the compiler refused for lack of memory (its RESOURCE_EXHAUSTED
    `message`): the analytic arguments, the temporaries the message names, no estimate."""
    argument = figures.params_bytes + figures.opt_state_bytes + figures.batch_bytes
    temp = _bytes_named(message, "temporaries")
    total = argument + (temp or 0)
    memory = {"argument": argument, "output": 0, "alias": 0, "temp": temp or 0, "code": 0,
              "total": total, "hbm": int(target.chip.hbm_bytes),
              "headroom": int(target.chip.hbm_bytes) - total}
    stats = hlo_stats_lib.HloStats(collectives={}, custom_calls={}, kernel_custom_calls={},
                                   kernel_custom_call_sites={}, unknown_trip_counts=0)
    return cls(target=target, device_kind=device_kind, figures=figures, memory=memory,
               compiler_flops=None, bytes_accessed=None, step_seconds=None,
               estimate_source=f"not compiled: {message.strip()[:300]}",
               unestimated_kernels=0, roofline={"compute_s": 0.0, "hbm_s": 0.0,
                                                "collectives_s": 0.0},
               stats=stats, compile_seconds=compile_seconds,
               compile_cpu_seconds=compile_cpu_seconds, out_of_memory=True)

  # -- derived figures ----------------------------------------------------------
  @property
  def fits(self) -> bool:
    return not self.out_of_memory and self.memory["total"] <= self.memory["hbm"]

  @property
  def tokens_per_second_per_chip(self) -> float | None:
    if not self.step_seconds:
      return None
    return self.figures.tokens_per_step / self.step_seconds / self.target.chips

  @property
  def mfu(self) -> float | None:
    if not self.step_seconds or self.figures.model_flops is None:
      return None
    peak = self.target.chip.peak_bf16_tflops * 1e12 * self.target.chips
    return self.figures.model_flops / self.step_seconds / peak

  @property
  def mosaic_kernels(self) -> int:
    return hlo_stats_lib.count_matching(self.stats.custom_calls, MOSAIC_TARGETS)

  @property
  def cudnn_attention_kernels(self) -> int:
    return hlo_stats_lib.count_matching(self.stats.custom_calls, CUDNN_ATTENTION_TARGETS)

  def bottleneck(self) -> str:
    """The largest roofline term: 'compute', 'hbm' or 'collectives'."""
    return max(self.roofline, key=lambda k: self.roofline[k]).removesuffix("_s")

  # -- output -------------------------------------------------------------------
  def as_dict(self) -> dict[str, Any]:
    """The JSON object (bytes per chip, FLOPs per step, seconds)."""
    figures, target = self.figures, self.target
    return {
        "topology": target.name, "platform": target.chip.platform,
        "device_kind": self.device_kind, "chips": target.chips,
        "num_slices": target.num_slices,
        "slice_shape": "x".join(map(str, target.shape)),
        "mesh": dict(figures.mesh), "dcn_mesh": dict(figures.dcn_mesh),
        "rules": figures.rules, "model": figures.model_name,
        "batch_shapes": {k: list(v) for k, v in figures.batch_shapes.items()},
        "num_microbatches": figures.num_microbatches,
        "attention_impl": figures.attention_impl,
        "mosaic_kernels": self.mosaic_kernels,
        "cudnn_attention_kernels": self.cudnn_attention_kernels,
        "attention_fallbacks": list(self.attention_fallbacks),
        "bytes_per_chip": {
            "params": figures.params_bytes, "opt_state": figures.opt_state_bytes,
            "batch": figures.batch_bytes, **dict(self.memory)},
        "fits": self.fits, "out_of_memory": self.out_of_memory,
        "model_flops_per_step": figures.model_flops,
        "hardware_flops_per_step": figures.hardware_flops,
        "compiler_flops_per_chip_loops_once": self.compiler_flops,
        "bytes_accessed_per_chip_loops_once": self.bytes_accessed,
        "loop_expansion": self.loop_expansion,
        "estimated_step_s": self.step_seconds,
        "estimate_source": self.estimate_source,
        "loop_scaled_step_s": self.loop_scaled_seconds,
        "depth_probe": None if self.probe is None else {
            "depths": dict(self.probe.depths), "points": [dict(p) for p in self.probe.points],
            "seconds": list(self.probe.seconds), "term": self.probe.term,
            "compile_s": self.probe.compile_seconds},
        "unestimated_kernels": self.unestimated_kernels,
        "estimated_tokens_per_s_per_chip": self.tokens_per_second_per_chip,
        "estimated_mfu": self.mfu,
        "roofline_s": dict(self.roofline),
        "collectives": {kind: {"count": count, "bytes": size}
                        for kind, (count, size) in sorted(self.stats.collectives.items())},
        "collective_bytes_per_step": self.stats.collective_bytes,
        "dcn_bytes_per_step": self.stats.dcn_bytes,
        "unknown_trip_counts": self.stats.unknown_trip_counts,
        "compile_s": self.compile_seconds, "compile_cpu_s": self.compile_cpu_seconds,
    }

  def json_line(self) -> str:
    return json.dumps(self.as_dict(), sort_keys=False)

  def table(self) -> str:
    """The report as aligned lines (GiB per chip)."""
    figures, target, memory = self.figures, self.target, self.memory
    gib = lambda n: f"{n / GIB:8.2f} GiB"
    mesh = " ".join(f"{k}={v}" for k, v in figures.mesh.items())
    dcn = ("; over DCN " + " ".join(f"{k}={v}" for k, v in figures.dcn_mesh.items())
           if figures.dcn_mesh else "")
    lines = [
        f"{figures.model_name} train step "
        f"{'refused' if self.out_of_memory else 'compiled'} for {target.describe()}, "
        f"{target.chips} x {self.device_kind}",
        f"mesh        {mesh}{dcn}; rules {figures.rules}; "
        f"{figures.num_microbatches} micro-batch(es); attention_impl={figures.attention_impl}",
        "batch       " + ", ".join(f"{k} {list(v)}" for k, v in figures.batch_shapes.items()),
        "per chip    (parameters, optimizer state, batch: from shapes and shardings; the "
        "rest: the compiler's memory analysis)",
        f"  parameters       {gib(figures.params_bytes)}",
        f"  optimizer state  {gib(figures.opt_state_bytes)}",
        f"  batch            {gib(figures.batch_bytes)}",
        f"  arguments        {gib(memory['argument'])}  (the three above, as compiled)",
        f"  temporaries      {gib(memory['temp'])}",
        f"  outputs          {gib(memory['output'] - memory['alias'])}  (not aliased to "
        f"donated arguments)",
        f"  code             {gib(memory['code'])}",
        f"  total            {gib(memory['total'])}  of {memory['hbm'] / GIB:.2f} GiB HBM: "
        + (f"fits, {memory['headroom'] / GIB:.2f} GiB headroom" if self.fits else
           f"DOES NOT FIT, {-memory['headroom'] / GIB:.2f} GiB over"),
    ]
    if self.out_of_memory:
      lines.append(f"  the compiler refused the step: "
                   f"{self.estimate_source.removeprefix('not compiled: ')}")
    flops = (f"model {figures.model_flops:.4g}, with remat {figures.hardware_flops:.4g} "
             f"(t5xlike.flops)" if figures.model_flops is not None else "no formula")
    compiler = (f"; compiler {self.compiler_flops:.4g} per chip with loop bodies once "
                f"(x {target.chips} chips x {self.loop_expansion:.3g} loop expansion = "
                f"{self.compiler_flops * target.chips * self.loop_expansion:.4g})"
                if self.compiler_flops is not None else "")
    lines.append(f"FLOPs/step  {flops}{compiler}")
    if self.step_seconds:
      mfu = f", MFU {self.mfu:.1%}" if self.mfu is not None else ""
      lines.append(f"estimate    {self.step_seconds:.4g} s/step -> "
                   f"{self.tokens_per_second_per_chip:,.0f} tokens/s/chip{mfu}  "
                   f"[{self.estimate_source}; an estimate, not a measurement]")
    else:
      lines.append(f"estimate    none ({self.estimate_source})")
    if self.probe is not None and self.loop_scaled_seconds:
      lines.append(f"            (the scanned step's loops scaled by their trip counts gave "
                   f"{self.loop_scaled_seconds:.4g} s; probes compiled in "
                   f"{self.probe.compile_seconds:.0f} s)")
    if self.out_of_memory:
      return "\n".join(lines)
    roof = self.roofline
    dcn = f", between slices {roof['dcn_s']:.4g} s" if "dcn_s" in roof else ""
    lines.append(f"roofline    compute {roof['compute_s']:.4g} s, HBM {roof['hbm_s']:.4g} s, "
                 f"collectives {roof['collectives_s']:.4g} s{dcn}: {self.bottleneck()}-bound")
    kinds = [f"{kind} {count} x {size / GIB:.3g} GiB"
             for kind, (count, size) in sorted(self.stats.collectives.items())]
    lines.append("collectives " + ("; ".join(kinds) or "none") + " per step and chip")
    lines.append(f"kernels     {self.mosaic_kernels} Pallas (Mosaic), "
                 f"{self.cudnn_attention_kernels} cuDNN attention per step")
    lines += [f"  {message}" for message in self.attention_fallbacks]
    lines.append(f"compile     {self.compile_seconds:.1f} s wall, "
                 f"{self.compile_cpu_seconds:.1f} s CPU")
    return "\n".join(lines)


def _bytes_named(message: str, what: str) -> int | None:
  """Bytes of `what` in a compiler message ('... HLO temporaries (136.03G) ...')."""
  match = re.search(rf"{what}\D*?\(([\d.]+)([KMGT]?)i?B?\)", message)
  if not match:
    return None
  scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[match.group(2)]
  return int(float(match.group(1)) * scale)


def memory_of(stats: Any, target: Target) -> dict[str, int]:
  """Per-chip bytes from `memory_analysis()` and the chip's HBM."""
  memory = {"argument": int(stats.argument_size_in_bytes),
            "output": int(stats.output_size_in_bytes),
            "alias": int(stats.alias_size_in_bytes),
            "temp": int(stats.temp_size_in_bytes),
            "code": int(stats.generated_code_size_in_bytes)}
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                     + memory["code"])
  memory["hbm"] = int(target.chip.hbm_bytes)
  memory["headroom"] = memory["hbm"] - memory["total"]
  return memory


def dcn_seconds(dcn_bytes: float, target: Target) -> float:
  """Seconds per step of the transfers between slices: each chip's buffers all-reduced
  over the slices by a ring, 2 (n - 1) / n of their bytes sent (and as many received)
  at the chip's share of its host's data-center network (inf without a figure)."""
  n = max(target.num_slices, 2)
  if not target.chip.dcn_bytes_per_s:
    return math.inf
  return dcn_bytes * 2 * (n - 1) / n / target.chip.dcn_bytes_per_s


def with_dcn(step: float, source: str, dcn_s: float, target: Target
             ) -> tuple[float | None, str]:
  """A multi-slice step's estimate: libtpu's (which prices the host transfers between
  slices as free) plus their time over the data-center network, not overlapped (the
  multi-slice runtime may overlap them with the backward pass: a pessimistic sum)."""
  if not math.isfinite(dcn_s):
    return None, (f"{source}; no estimate: no published data-center network bandwidth "
                  f"for {target.chip.name} to time the transfers between slices")
  return step + dcn_s, (f"{source}, plus {dcn_s:.3g} s of transfers between slices at "
                        f"{target.chip.dcn_bytes_per_s * 8 / 1e9:.0f} Gb/s per chip "
                        f"(ours; not overlapped)")


def tpu_estimate(cost: Mapping[str, float], stats: hlo_stats_lib.HloStats
                  ) -> tuple[float | None, int, str]:
  """(step seconds or None, kernels without an estimate, source) from libtpu's cost model."""
  optimal = cost.get("optimal_seconds")
  unestimated = hlo_stats_lib.count_matching(stats.kernel_custom_call_sites,
                                             UNESTIMATED_TARGETS)
  source = "libtpu's cost model (optimal_seconds)"
  if optimal is None:
    return None, unestimated, "libtpu gave no optimal_seconds"
  step = float(optimal) + unestimated
  if step <= 0 or not math.isfinite(step):
    return None, unestimated, f"libtpu's cost model gave {optimal:.4g} s"
  if unestimated:
    source += f", {unestimated} kernel(s) it cannot estimate counted as free"
  return step, unestimated, source
