"""The per-chip report of `python -m t5xlike.infer`'s decoding compiled for a target:
memory of the whole generation, and the cost model's prefill and per-token times.

Three programs are compiled (`runs.compile_decode_run`): the whole generation
(`predict_batch`: prefill, then a `while` loop of decode steps: memory,
collectives, kernels), the prefill alone (`decoding_start`: its estimate and
the KV cache it returns) and one decode step (`decoding_step`: its estimate).
The generation's own estimate would count the decode loop once (its trip
count depends on the data), so the time of a request is given as prefill +
tokens x step. TPU: libtpu's cost model (`optimal_seconds`), the scanned
layers' loop scaled as in `step_report`; GPU: no cost model, only the HBM
floor. The HBM floor of a decode step is the time to read one chip's share of
the parameters and of the KV cache at the chip's HBM bandwidth: what decoding
at small batches is bound by.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from t5xlike.aot import hlo_stats as hlo_stats_lib
from t5xlike.aot.step_report import CUDNN_ATTENTION_TARGETS, MOSAIC_TARGETS, tpu_estimate
from t5xlike.aot.targets import GIB, Target


@dataclasses.dataclass(frozen=True)
class ProgramEstimate:
  """One compiled program's cost-model estimate (seconds; None: no cost model) and source."""
  seconds: float | None
  source: str
  compile_seconds: float

  @classmethod
  def of(cls, compiled: Any, target: Target, compile_seconds: float) -> ProgramEstimate:
    """libtpu's estimate of `compiled` with its loops scaled by their trip counts (TPU)."""
    if target.chip.platform != "tpu":
      return cls(None, "no cost model for GPUs", compile_seconds)
    stats = hlo_stats_lib.hlo_stats(compiled.as_text())
    seconds, _, source = tpu_estimate(compiled.cost_analysis(), stats)
    expansion = stats.loop_expansion or 1.0
    if seconds and expansion != 1.0:
      seconds *= expansion
      source += f"; loops scaled x{expansion:.3g}"
    return cls(seconds, source, compile_seconds)


@dataclasses.dataclass(frozen=True)
class DecodeReport:
  """The report of one compiled generation on one target (module docstring).

  Attributes:
    target, device_kind: what it was compiled for.
    model_name: the configured network (`compile_run.model_name`).
    mesh: mesh axis -> size; rules: the logical axis rules' preset name.
    batch_shapes: feature -> global shape of one batch of prompts.
    max_length: tokens generated at most per row; method: the decoding method.
    params_bytes: one chip's parameters (shapes and shardings).
    cache_bytes: one chip's share of the prefill's output (KV cache, positions, logits).
    memory: the generation's per-chip bytes (`step_report.memory_of`).
    prefill, step: the prefill's and one decode step's estimates.
    stats: collectives and custom calls of the generation (the decode loop once).
    compile_seconds: wall time of the generation's compilation.
  """
  target: Target
  device_kind: str
  model_name: str
  mesh: Mapping[str, int]
  rules: str
  batch_shapes: Mapping[str, tuple[int, ...]]
  max_length: int
  method: str
  params_bytes: int
  cache_bytes: int
  memory: Mapping[str, int]
  prefill: ProgramEstimate
  step: ProgramEstimate
  stats: hlo_stats_lib.HloStats
  compile_seconds: float

  @property
  def rows(self) -> int:
    return next(iter(self.batch_shapes.values()))[0]

  @property
  def fits(self) -> bool:
    return self.memory["total"] <= self.memory["hbm"]

  @property
  def hbm_floor_seconds(self) -> float:
    """One decode step's HBM floor: parameters and cache read once at HBM bandwidth."""
    return (self.params_bytes + self.cache_bytes) / self.target.chip.hbm_bytes_per_s

  @property
  def request_seconds(self) -> float | None:
    """Prefill + max_length decode steps (the estimate of one batch of requests)."""
    if self.prefill.seconds is None or self.step.seconds is None:
      return None
    return self.prefill.seconds + self.max_length * self.step.seconds

  @property
  def tokens_per_second_per_chip(self) -> float | None:
    """Generated tokens per second and chip in the decode loop (the step's estimate)."""
    if not self.step.seconds:
      return None
    return self.rows / self.step.seconds / self.target.chips

  def as_dict(self) -> dict[str, Any]:
    return {
        "step": "decode", "topology": self.target.name,
        "platform": self.target.chip.platform, "device_kind": self.device_kind,
        "chips": self.target.chips, "mesh": dict(self.mesh), "rules": self.rules,
        "model": self.model_name,
        "batch_shapes": {k: list(v) for k, v in self.batch_shapes.items()},
        "max_decode_length": self.max_length, "method": self.method,
        "bytes_per_chip": {"params": self.params_bytes, "prefill_output": self.cache_bytes,
                           **dict(self.memory)},
        "fits": self.fits,
        "estimated_prefill_s": self.prefill.seconds,
        "estimated_decode_step_s": self.step.seconds,
        "estimated_request_s": self.request_seconds,
        "estimated_tokens_per_s_per_chip": self.tokens_per_second_per_chip,
        "estimate_source": self.step.source,
        "hbm_floor_decode_step_s": self.hbm_floor_seconds,
        "collectives_loop_once": {kind: {"count": count, "bytes": size} for kind, (count, size)
                                  in sorted(self.stats.collectives.items())},
        "mosaic_kernels": hlo_stats_lib.count_matching(self.stats.custom_calls,
                                                       MOSAIC_TARGETS),
        "cudnn_attention_kernels": hlo_stats_lib.count_matching(self.stats.custom_calls,
                                                                CUDNN_ATTENTION_TARGETS),
        "compile_s": self.compile_seconds,
        "compile_s_prefill_and_step": self.prefill.compile_seconds + self.step.compile_seconds,
    }

  def json_line(self) -> str:
    return json.dumps(self.as_dict())

  def table(self) -> str:
    memory, gib = self.memory, lambda n: f"{n / GIB:8.2f} GiB"
    seconds = lambda s: "none" if s is None else f"{s:.4g} s"
    lines = [
        f"{self.model_name} decoding compiled for {self.target.describe()}, "
        f"{self.target.chips} x {self.device_kind}",
        f"mesh        {' '.join(f'{k}={v}' for k, v in self.mesh.items())}; rules "
        f"{self.rules}; {self.method}, up to {self.max_length} tokens per row",
        "batch       " + ", ".join(f"{k} {list(v)}" for k, v in self.batch_shapes.items()),
        "per chip    (parameters: from shapes and shardings; the rest: the compiler's)",
        f"  parameters       {gib(self.params_bytes)}",
        f"  KV cache etc.    {gib(self.cache_bytes)}  (the prefill's output)",
        f"  temporaries      {gib(memory['temp'])}",
        f"  total            {gib(memory['total'])}  of {memory['hbm'] / GIB:.2f} GiB HBM: "
        + (f"fits, {memory['headroom'] / GIB:.2f} GiB headroom" if self.fits else
           f"DOES NOT FIT, {-memory['headroom'] / GIB:.2f} GiB over"),
        f"estimate    prefill {seconds(self.prefill.seconds)}, decode step "
        f"{seconds(self.step.seconds)}, request (prefill + {self.max_length} steps) "
        f"{seconds(self.request_seconds)}"
        + (f" -> {self.tokens_per_second_per_chip:,.0f} generated tokens/s/chip"
           if self.tokens_per_second_per_chip else "")
        + f"  [{self.step.source}; an estimate, not a measurement]",
        f"HBM floor   {self.hbm_floor_seconds:.4g} s per decode step (parameters + cache "
        f"read once at {self.target.chip.hbm_bytes_per_s / 1e12:.3g} TB/s)",
        "collectives " + ("; ".join(f"{kind} {count} x {size / GIB:.3g} GiB" for kind,
                                    (count, size) in sorted(self.stats.collectives.items()))
                          or "none") + " (the decode loop's body once)",
        f"compile     {self.compile_seconds:.1f} s (generation), "
        f"{self.prefill.compile_seconds + self.step.compile_seconds:.1f} s (prefill, step)",
    ]
    return "\n".join(lines)

