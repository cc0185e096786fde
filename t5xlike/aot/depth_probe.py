"""The step time of a deep model from its cost at two shallow depths, without loops.

libtpu's cost model counts a `while` loop's body once (`step_report`), so the
estimate of a step that scans its layers must scale the loop by its trip
count, and that scaling is only as good as the per-kernel cycles it is taken
from (T5.1.1-XL and the 8B decoder on v5p-128 came out faster than their
FLOPs at the cost model's own matmul rate). The probe avoids the loop: the
same step, with the layers unrolled (`scan_layers=False`), is compiled at two
shallow depths, where the cost model's figure is the program's own; a step is
linear in its depth (every layer the same program), so

    t(L) = t(a) + (t(b) - t(a)) * (L - a) / (b - a)

per stack. An encoder-decoder with as many encoder as decoder layers is probed
at (a, a) and (b, b) (both stacks grow together); with unequal stacks a third
probe (b, a) separates the two slopes:

    t(E, D) = t(a, a) + s_enc * (E - a) + s_dec * (D - a),
    s_enc = (t(b, a) - t(a, a)) / (b - a),  s_dec = (t(b, b) - t(b, a)) / (b - a).

Micro-batches stay a loop in the probes: their trip count scales the probes'
figures as in `step_report`. Everything else (optimizer, rules, remat, batch,
attention kernel) is the configured step's.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from t5xlike import flops

#: The shallow depths (layers per stack) the probes compile.
PROBE_DEPTHS = (2, 4)


def stack_depths(model: Any) -> dict[str, int]:
  """The depth field(s) of the model's network config -> layers: {'num_layers': L} or
  {'num_encoder_layers': E, 'num_decoder_layers': D}. Raises ValueError for a model
  without one network (ELECTRA)."""
  cfg = flops.network_config(model)
  if cfg is None:
    raise ValueError(f"{type(model).__name__} has no single network to probe")
  names = [f.name for f in dataclasses.fields(cfg)]
  fields: list[str] = [n for n in ("num_encoder_layers", "num_decoder_layers") if n in names]
  if not fields:
    fields = ["num_layers"]
  return {name: int(getattr(cfg, name)) for name in fields}


def probe_points(depths: Mapping[str, int],
                 probe: Sequence[int] = PROBE_DEPTHS) -> list[dict[str, int]]:
  """The depths to compile: 2 points for one stack or equal stacks, 3 for unequal ones."""
  a, b = probe
  names = list(depths)
  if len(names) == 1 or len(set(depths.values())) == 1:
    return [dict.fromkeys(names, a), dict.fromkeys(names, b)]
  first, second = names
  return [{first: a, second: a}, {first: b, second: a}, {first: b, second: b}]


def extrapolate(depths: Mapping[str, int], points: Sequence[Mapping[str, int]],
                seconds: Sequence[float]) -> float:
  """The step seconds at `depths` from the probes' seconds (module docstring)."""
  names = list(depths)
  a, b = points[0][names[0]], points[-1][names[0]]
  if len(points) == 2:  # one stack, or stacks of equal depth growing together
    return seconds[0] + (seconds[1] - seconds[0]) * (depths[names[0]] - a) / (b - a)
  first, second = names
  slope_first = (seconds[1] - seconds[0]) / (b - a)
  slope_second = (seconds[2] - seconds[1]) / (b - a)
  return seconds[0] + slope_first * (depths[first] - a) + slope_second * (depths[second] - a)


def _network_holder(model: Any) -> Any:
  """The token model whose `network` to replace (an SPDF `SparseModel` wraps one)."""
  return model.model if hasattr(model, "model") and hasattr(model.model, "network") else model


def with_depth(model: Any, depths: Mapping[str, int]) -> Any:
  """A copy of `model` whose network has `depths` layers, unrolled (`scan_layers=False`);
  the model and its network are otherwise unchanged. A PEFT-wrapped network
  (`finetuning.peft.InterceptedNetwork`) keeps its interceptor around the new network."""
  outer = holder = copy.copy(model)
  if _network_holder(model) is not model:  # SPDF: the wrapped model holds the network
    holder = outer.model = copy.copy(model.model)
  network = holder.network
  inner = getattr(network, "network", None)
  target = inner if inner is not None and hasattr(inner, "config") else network
  cfg = dataclasses.replace(target.config, scan_layers=False, **dict(depths))
  rebuilt = target.clone(config=cfg)
  if target is not network:  # the wrapper (not a flax module) around the new network
    wrapper = copy.copy(network)
    wrapper.network = rebuilt
    rebuilt = wrapper
  holder.network = rebuilt
  return outer
