"""Structured pruning of a T5 or decoder-only network: what is kept, and the smaller tree.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and
Knowledge Distillation", §2) prunes depth (whole layers) and width (attention
heads, MLP units, embedding channels), each ranked by an importance score
(`compression.importance`) computed once on a calibration set (single-shot:
their best practice 3). After the scores come three steps, all here:

  `targets_from_flags`  the sizes asked for (a count kept, `2`, or a
                        percentage kept, `50%`), checked against the network;
  `select`              the kept indices: the top-scoring layers, heads,
                        units and channels (ties: the lower index), kept in
                        their original order;
  `prune`               the smaller network config and its parameters: every
                        kept weight is the original's slice at the kept
                        indices (nothing rescaled, nothing re-ordered).

Constraints of the two architectures:
  * T5's relative position biases (`<stack>/relpos_bias/rel_embedding`,
    [heads, buckets]) are shared by the self-attention of every layer of a
    stack, so a stack keeps one set of self-attention heads (ranked by the
    sum of its layers' scores) and those rows of the table; cross-attention
    heads are chosen per layer.
  * Grouped-query attention (decoder family): query head h reads key/value
    head h // g (g = num_heads / num_kv_heads). A key/value head is kept with
    query heads of its own group only: the kv heads kept are the groups with
    the largest L2 norm of their query heads' scores, and each kept group
    keeps its top num_heads' / num_kv_heads' query heads, so kept query head
    j reads kept kv head j // g'. `--heads` alone keeps every kv head (fewer
    query heads per group; without GQA, g = 1, each pruned query head takes
    its own key/value head with it); `--kv_heads` alone drops whole groups.
    A count that does not split evenly over the kv heads is an error.
  * Embedding channels are one set for the whole residual stream: the
    embedding table's columns, every norm scale, the rows of every kernel
    that reads the stream and the columns of every kernel that writes it.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from t5xlike.compression.importance import Importance
from t5xlike.models import decoder, encoder_decoder, t5

Config = t5.T5Config | decoder.DecoderConfig


def network_config(model: Any) -> Config:
  """The network config of a prunable model; ValueError (one line) for another family."""
  if isinstance(model, encoder_decoder.EncoderDecoderModel) and isinstance(
      model.network, t5.Transformer):
    return model.network.config
  if isinstance(model, decoder.DecoderOnlyModel) and isinstance(model.network,
                                                                decoder.Transformer):
    return model.network.config
  raise ValueError(f"MODEL is a {type(model).__name__}: pruning supports the T5 encoder-decoder "
                   f"(encoder_decoder.EncoderDecoderModel of t5.Transformer) and the decoder-only "
                   f"family (decoder.DecoderOnlyModel of decoder.Transformer)")


def stack_depths(config: Config) -> dict[str, int]:
  """{stack name: layers}: T5 {'encoder': n, 'decoder': m}; decoder-only {'decoder': n}."""
  if isinstance(config, t5.T5Config):
    return {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
  return {"decoder": config.num_layers}


def _attention_names(config: Config, stack: str) -> tuple[str, ...]:
  if isinstance(config, decoder.DecoderConfig):
    return ("self_attention",)
  return ("attention",) if stack == "encoder" else ("self_attention", "encoder_decoder_attention")


def _shares_position_biases(config: Config, name: str) -> bool:
  """T5's self-attention reads its stack's shared relative position biases."""
  return isinstance(config, t5.T5Config) and name in ("attention", "self_attention")


def _kv_heads(config: Config) -> int:
  return config.num_kv_heads if isinstance(config, decoder.DecoderConfig) else config.num_heads


# ---- Targets: the sizes asked for. ----

@dataclasses.dataclass(frozen=True)
class Targets:
  """The sizes a pruned network keeps (None / absent: unchanged).

  Attributes:
    layers: {stack: layers kept}, the most important by the layer score.
    drop_layers: {stack: layer indices dropped}, chosen by hand.
    heads: query heads kept per attention module.
    kv_heads: key/value heads kept (decoder family; T5: equals `heads`).
    mlp_dim: MLP units kept per layer.
    emb_dim: embedding (residual stream) channels kept.
  """
  layers: Mapping[str, int] = dataclasses.field(default_factory=dict)
  drop_layers: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  heads: int | None = None
  kv_heads: int | None = None
  mlp_dim: int | None = None
  emb_dim: int | None = None

  def is_empty(self) -> bool:
    return not (self.layers or self.drop_layers or self.heads is not None
                or self.kv_heads is not None or self.mlp_dim is not None
                or self.emb_dim is not None)


def parse_size(flag: str, text: str | None, original: int, what: str) -> int | None:
  """The size kept of a `--flag` value: 'N' (a count) or 'P%' (a percentage of
  `original`, rounded to the nearest integer); None when the flag is not given.
  ValueError (one line) when it leaves nothing or exceeds `original`."""
  if text is None or not str(text).strip():
    return None
  text = str(text).strip()
  percent = text.endswith("%")
  try:
    number = float(text[:-1]) if percent else int(text)
  except ValueError:
    raise ValueError(f"{flag}={text}: expected the {what} kept, a count (e.g. 2) or a "
                     f"percentage (e.g. 50%)") from None
  if percent and not 0.0 <= number <= 100.0:
    raise ValueError(f"{flag}={text}: a percentage kept is between 0% and 100%")
  size = int(round(original * number / 100.0)) if percent else int(number)
  if size < 1:
    raise ValueError(f"{flag}={text} leaves nothing: it keeps {size} of the model's {original} "
                     f"{what} (keep at least 1)")
  if size > original:
    raise ValueError(f"{flag}={text}: the model has {original} {what}; pruning cannot add any")
  return size


def parse_drop_layers(text: str | None, depths: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
  """`--drop_layers` = 'I,J' (a one-stack model) or 'encoder:I,decoder:J' (T5) ->
  {stack: sorted indices}. ValueError (one line) for an unknown stack or index."""
  if text is None or not str(text).strip():
    return {}
  dropped: dict[str, set[int]] = {}
  for entry in str(text).split(","):
    entry = entry.strip()
    stack, _, index = entry.rpartition(":")
    if not stack:
      if len(depths) != 1:
        raise ValueError(f"--drop_layers={text}: name the stack of {entry!r} "
                         f"({' or '.join(f'{s}:{entry}' for s in depths)})")
      stack = next(iter(depths))
    if stack not in depths:
      raise ValueError(f"--drop_layers={text}: no stack {stack!r} (the model has "
                       f"{', '.join(depths)})")
    if not re.fullmatch(r"\d+", index) or int(index) >= depths[stack]:
      raise ValueError(f"--drop_layers={text}: {entry!r} is not a layer of {stack} "
                       f"(0..{depths[stack] - 1})")
    dropped.setdefault(stack, set()).add(int(index))
  return {stack: tuple(sorted(indices)) for stack, indices in dropped.items()}


def targets_from_flags(config: Config, *, num_layers: str | None = None,
                       num_encoder_layers: str | None = None,
                       num_decoder_layers: str | None = None, drop_layers: str | None = None,
                       heads: str | None = None, kv_heads: str | None = None,
                       mlp_dim: str | None = None, emb_dim: str | None = None) -> Targets:
  """The checked `Targets` of the command's flags (each a count or a percentage kept).

  Args:
    config: the network pruned.
    num_layers: layers kept (decoder family).
    num_encoder_layers, num_decoder_layers: layers kept per stack (T5).
    drop_layers: layers dropped by hand ('I,J'; T5: 'encoder:I,decoder:J').
    heads: query heads kept per attention module.
    kv_heads: key/value heads kept (grouped-query attention, decoder family).
    mlp_dim: MLP units kept per layer.
    emb_dim: embedding channels kept.

  Raises:
    ValueError: one line naming the flag: a size that leaves nothing or grows the
      model, a flag of the other family, a head count that breaks the kv grouping.
  """
  depths = stack_depths(config)
  counted = {"decoder": num_layers} if isinstance(config, decoder.DecoderConfig) else {
      "encoder": num_encoder_layers, "decoder": num_decoder_layers}
  other = ({"--num_encoder_layers": num_encoder_layers, "--num_decoder_layers": num_decoder_layers}
           if isinstance(config, decoder.DecoderConfig) else {"--num_layers": num_layers})
  for flag, value in other.items():
    if value is not None and str(value).strip():
      wanted = ("--num_layers" if isinstance(config, decoder.DecoderConfig)
                else "--num_encoder_layers / --num_decoder_layers")
      raise ValueError(f"{flag}: not a depth of this model ({type(config).__name__}); use {wanted}")
  layers = {}
  for stack, value in counted.items():
    flag = "--num_layers" if isinstance(config, decoder.DecoderConfig) else f"--num_{stack}_layers"
    size = parse_size(flag, value, depths[stack], f"{stack} layers")
    if size is not None:
      layers[stack] = size
  dropped = parse_drop_layers(drop_layers, depths)
  for stack, indices in dropped.items():
    if stack in layers:
      raise ValueError(f"--drop_layers and the layer count of {stack} both given: choose one")
    if len(indices) == depths[stack]:
      raise ValueError(f"--drop_layers={drop_layers} leaves nothing: it drops all "
                       f"{depths[stack]} {stack} layers")
  width = dict(
      mlp_dim=parse_size("--mlp_dim", mlp_dim, config.mlp_dim, "MLP units"),
      emb_dim=parse_size("--emb_dim", emb_dim, config.emb_dim, "embedding channels"))
  query, kv = _head_targets(config, heads, kv_heads)
  return Targets(layers=layers, drop_layers=dropped, heads=query, kv_heads=kv, **width)


def _head_targets(config: Config, heads: str | None,
                  kv_heads: str | None) -> tuple[int | None, int | None]:
  """(query heads, kv heads) kept, checked against the kv grouping (module docstring)."""
  query = parse_size("--heads", heads, config.num_heads, "attention heads")
  if isinstance(config, t5.T5Config):
    if kv_heads is not None and str(kv_heads).strip():
      raise ValueError("--kv_heads is for grouped-query attention (the decoder family); T5 "
                       "keeps one key/value head per query head: use --heads")
    return query, query
  kv = parse_size("--kv_heads", kv_heads, config.num_kv_heads, "key/value heads")
  if query is None and kv is None:
    return None, None
  group = config.num_heads // config.num_kv_heads
  if kv is None:  # GQA: every kv head kept; without GQA each query head keeps its own.
    kv = config.num_kv_heads if group > 1 else query
  assert kv is not None
  if query is None:  # whole groups dropped
    query = kv * group
  if query % kv:
    raise ValueError(f"--heads={heads} breaks grouped-query attention: {query} query heads do "
                     f"not split evenly over {kv} key/value heads (keep a multiple of {kv}, or "
                     f"set --kv_heads)")
  if query // kv > group:
    raise ValueError(f"--heads={heads} with {kv} key/value heads needs {query // kv} query heads "
                     f"per key/value head; the model's groups have {group} (a kept key/value "
                     f"head keeps query heads of its own group only)")
  return query, kv


# ---- Selection: the kept indices, from the importance scores. ----

@dataclasses.dataclass(frozen=True)
class Selection:
  """The indices a pruned network keeps, in the original network's terms.

  Attributes:
    layers: {stack: kept layer indices, ascending}; kept layer j of a stack is
      `layers[stack][j]` of the original.
    heads: {attention module path, e.g. 'decoder/layers_3/self_attention':
      kept query heads} in their new order (ascending; GQA: grouped by kv head).
    kv_heads: {attention module path: kept key/value heads, ascending}.
    relpos: {stack: kept rows of its relative position biases} (T5).
    mlp: {MLP module path, e.g. 'encoder/layers_0/mlp': kept units, ascending}.
    embedding: kept embedding channels, ascending.
  """
  layers: dict[str, tuple[int, ...]]
  heads: dict[str, np.ndarray]
  kv_heads: dict[str, np.ndarray]
  relpos: dict[str, np.ndarray]
  mlp: dict[str, np.ndarray]
  embedding: np.ndarray

  def describe(self) -> dict[str, Any]:
    """The selection as JSON-able lists (prune.json)."""
    listed = lambda d: {k: [int(i) for i in v] for k, v in d.items()}
    return {"layers": listed(self.layers), "heads": listed(self.heads),
            "kv_heads": listed(self.kv_heads), "relpos": listed(self.relpos),
            "mlp": listed(self.mlp), "embedding": [int(i) for i in self.embedding]}


def top(scores: np.ndarray, count: int) -> np.ndarray:
  """Indices of the `count` largest scores, ascending (a tie keeps the lower index)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  return np.sort(order[:count])


def select(config: Config, targets: Targets, scores: Importance) -> Selection:
  """The kept indices of every prunable axis (all kept where `targets` says nothing).

  Scores are read for the layers kept only: T5's shared self-attention heads
  are ranked by the sum over a stack's kept layers.
  """
  kept_layers = {}
  for stack, depth in stack_depths(config).items():
    if stack in targets.layers:
      ranked = [scores.layers[f"{stack}/layers_{i}"] for i in range(depth)]
      kept_layers[stack] = tuple(int(i) for i in top(np.asarray(ranked), targets.layers[stack]))
    else:
      dropped = set(targets.drop_layers.get(stack, ()))
      kept_layers[stack] = tuple(i for i in range(depth) if i not in dropped)
  heads: dict[str, np.ndarray] = {}
  kv_heads: dict[str, np.ndarray] = {}
  relpos: dict[str, np.ndarray] = {}
  mlp: dict[str, np.ndarray] = {}
  for stack, kept in kept_layers.items():
    for name in _attention_names(config, stack):
      paths = [f"{stack}/layers_{i}/{name}" for i in kept]
      if _shares_position_biases(config, name):
        summed = np.sum([scores.heads[p] for p in paths], axis=0)
        shared = _query_heads(config, targets, summed)
        relpos[stack] = shared[0]
        for path in paths:
          heads[path], kv_heads[path] = shared
      else:
        for path in paths:
          heads[path], kv_heads[path] = _query_heads(config, targets, scores.heads[path])
    for i in kept:
      path = f"{stack}/layers_{i}/mlp"
      mlp[path] = (top(scores.mlp[path], targets.mlp_dim) if targets.mlp_dim is not None
                   else np.arange(config.mlp_dim))
  embedding = (top(scores.embedding, targets.emb_dim) if targets.emb_dim is not None
               else np.arange(config.emb_dim))
  return Selection(layers=kept_layers, heads=heads, kv_heads=kv_heads, relpos=relpos, mlp=mlp,
                   embedding=embedding)


def _query_heads(config: Config, targets: Targets,
                 head_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(kept query heads in their new order, kept kv heads) of one attention module."""
  num_heads, num_kv = config.num_heads, _kv_heads(config)
  if targets.heads is None:
    return np.arange(num_heads), np.arange(num_kv)
  kv_kept = targets.kv_heads if targets.kv_heads is not None else num_kv
  group = num_heads // num_kv
  per_group = np.asarray(head_scores, np.float64).reshape(num_kv, group)
  # A group's score: the L2 norm of its query heads' scores (as NVIDIA's Minitron
  # implementation ranks query groups).
  groups = top(np.linalg.norm(per_group, axis=1), kv_kept)
  per_kept = targets.heads // kv_kept
  query = [k * group + j for k in groups for j in top(per_group[k], per_kept)]
  return np.asarray(query, np.int64), groups


# ---- Pruning: the smaller parameter tree. ----

_LAYER = re.compile(r"^(?P<stack>[^/]+)/layers_(?P<index>\d+)/(?P<rest>.+)$")
#: (pattern on an unscanned parameter path, what each axis indexes). 'heads' / 'kv' /
#: 'mlp' select within the module named by the pattern's `module` group; 'relpos'
#: within the stack's shared table; 'emb' the residual stream's channels.
_RULES: tuple[tuple[re.Pattern[str], tuple[str | None, ...]], ...] = (
    (re.compile(r"^(?P<module>.+)/query/kernel$"), ("emb", "heads")),
    (re.compile(r"^(?P<module>.+)/(key|value)/kernel$"), ("emb", "kv")),
    (re.compile(r"^(?P<module>.+)/out/kernel$"), ("heads", "emb")),
    (re.compile(r"^(?P<module>.+/mlp)/wi(_\d+)?/kernel$"), ("emb", "mlp")),
    (re.compile(r"^(?P<module>.+/mlp)/wo/kernel$"), ("mlp", "emb")),
    (re.compile(r"^(?P<module>.+)/scale$"), ("emb",)),
    (re.compile(r"^(?P<module>token_embedder)/embedding$"), (None, "emb")),
    (re.compile(r"^(?P<module>.+)/logits_dense/kernel$"), ("emb", None)),
    (re.compile(r"^(?P<module>[^/]+)/relpos_bias/rel_embedding$"), ("relpos", None)),
)


def _head_columns(heads: np.ndarray, head_dim: int) -> np.ndarray:
  """The kernel columns (or rows) of heads [k]: head h holds h*head_dim .. +head_dim-1."""
  return (np.asarray(heads)[:, None] * head_dim + np.arange(head_dim)[None]).reshape(-1)


def _axis_indices(role: str, module: str, config: Config, selection: Selection) -> np.ndarray:
  if role == "emb":
    return selection.embedding
  if role == "heads":
    return _head_columns(selection.heads[module], config.head_dim)
  if role == "kv":
    return _head_columns(selection.kv_heads[module], config.head_dim)
  if role == "mlp":
    return selection.mlp[module]
  return selection.relpos[module]


def prune(config: Config, flat: Mapping[str, np.ndarray],
          selection: Selection) -> tuple[Config, dict[str, np.ndarray]]:
  """(the smaller config, its unscanned parameters) of the original's unscanned `flat`
  ({'decoder/layers_3/mlp/wo/kernel': array}): kept layers renumbered 0.. in order,
  every array the original's slice at the kept indices (a copy).

  Raises ValueError for a parameter no rule covers (a family this does not know).
  """
  out: dict[str, np.ndarray] = {}
  for name, value in flat.items():
    new_name = name
    layer = _LAYER.match(name)
    if layer is not None:
      kept = selection.layers[layer["stack"]]
      if int(layer["index"]) not in kept:
        continue
      new_name = f"{layer['stack']}/layers_{kept.index(int(layer['index']))}/{layer['rest']}"
    out[new_name] = _sliced(name, np.asarray(value), config, selection)
  return _pruned_config(config, selection), out


def _sliced(name: str, value: np.ndarray, config: Config, selection: Selection) -> np.ndarray:
  for pattern, roles in _RULES:
    match = pattern.match(name)
    if match is None:
      continue
    if len(roles) != value.ndim:
      raise ValueError(f"{name}: shape {value.shape}, expected {len(roles)} axes")
    for axis, role in enumerate(roles):
      if role is not None:
        value = np.take(value, _axis_indices(role, match["module"], config, selection), axis=axis)
    return value
  raise ValueError(f"{name}: no pruning rule for this parameter")


def _pruned_config(config: Config, selection: Selection) -> Config:
  first = lambda d, default: len(next(iter(d.values()))) if d else default
  emb_dim, mlp_dim = len(selection.embedding), first(selection.mlp, config.mlp_dim)
  num_heads = first(selection.heads, config.num_heads)
  if isinstance(config, t5.T5Config):
    return dataclasses.replace(config, num_encoder_layers=len(selection.layers["encoder"]),
                               num_decoder_layers=len(selection.layers["decoder"]),
                               emb_dim=emb_dim, mlp_dim=mlp_dim, num_heads=num_heads)
  return dataclasses.replace(config, num_layers=len(selection.layers["decoder"]),
                             num_kv_heads=first(selection.kv_heads, config.num_kv_heads),
                             emb_dim=emb_dim, mlp_dim=mlp_dim, num_heads=num_heads)
