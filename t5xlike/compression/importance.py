"""Minitron's activation-based importance of heads, MLP units, embedding channels and layers.

Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation" (Minitron), §2 "Importance Analysis": one forward pass of the
trained model over a small calibration set, and for each prunable structure a
score from the activations it produces:

  head i of an attention module   F_head(i) = agg_{B,S} ||Attn(X W_Q,i, X W_K,i, X W_V,i)||_2
      the L2 norm over head_dim of head i's attention output at each token
      (the input of the module's `out` projection);
  MLP unit i                      F_neuron(i) = agg_{B,S} |a_i|
      the magnitude of unit i's activation where it enters `wo` (gated MLPs:
      the product of the gates; the paper's ungated squared-ReLU MLP: the
      activation of X W_1^i);
  embedding channel i             F_emb(i) = sum over the RMSNorms of agg_{B,S} |LN(X)_i|
      every norm's output channel i (each layer's pre-norms and the stacks'
      final norms), aggregated per norm, then summed over the norms;
  layer (depth)                   'block_importance': BI = 1 - E_{X,t} cos(X_t, Y_t)
      Block Importance (Men et al. 2024, ShortGPT), one of Minitron's two
      depth criteria: one minus the mean cosine similarity of a layer's
      input and output at every token (a layer that barely changes the
      residual stream goes first); or 'loss', the other (perplexity): the
      calibration loss with the layer removed (its residual branches zeroed)
      minus the full model's, i.e. the log-perplexity it costs.

agg_{B,S} is Minitron's best aggregation for width ((batch, sequence) =
(L2, mean), their ablation of aggregation functions and best practice 2): the
mean over a row's real tokens (padding excluded), then the L2 norm over the
rows. Magnitudes |.| as NVIDIA's released implementation (Model Optimizer's
Minitron hooks) takes them, so signed activations do not cancel in the mean.

The activations are read with `flax.linen.intercept_methods` (the mechanism
under Flax's `capture_intermediates`) around the model's own `logits`, inside
one jitted function that reduces them to per-structure sums, so no activation
leaves the device. The network must be unscanned and without remat
(`unscanned_model`): an intercepted value inside `nn.scan` or `nn.remat`
would belong to another trace.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike.models import layers

Array = jax.Array
Batch = Mapping[str, Any]

LAYER_CRITERIA = ("block_importance", "loss")
_LAYER_NAME = re.compile(r"layers_\d+")
#: Features whose non-zero ids mark the real tokens of each stack.
_STACK_TOKENS = {"encoder": "encoder_input_tokens", "decoder": "decoder_target_tokens"}


@dataclasses.dataclass
class Importance:
  """Importance scores of every prunable structure (higher: more important).

  Attributes:
    heads: {attention module path, e.g. 'encoder/layers_0/attention': [num_heads]}.
    mlp: {MLP module path, e.g. 'decoder/layers_1/mlp': [mlp_dim]}.
    norms: {norm path, e.g. 'decoder/decoder_norm': [emb_dim]}, each norm's F_emb term.
    layers: {layer path, e.g. 'decoder/layers_1': score} by `layer_criterion`.
    layer_criterion: 'block_importance' (1 - mean cosine of a layer's input and
      output) or 'loss' (the calibration loss without the layer minus with it).
    rows: calibration rows read.
    tokens: {stack: real tokens read}.
  """
  heads: dict[str, np.ndarray]
  mlp: dict[str, np.ndarray]
  norms: dict[str, np.ndarray]
  layers: dict[str, float]
  layer_criterion: str
  rows: int
  tokens: dict[str, int]

  @property
  def embedding(self) -> np.ndarray:
    """F_emb [emb_dim]: the norms' terms summed."""
    return np.sum(np.stack(list(self.norms.values())), axis=0)

  def describe(self) -> dict[str, Any]:
    """The scores as JSON-able lists (prune.json)."""
    listed = lambda d: {k: [float(x) for x in v] for k, v in sorted(d.items())}
    return {"layer_criterion": self.layer_criterion, "rows": self.rows, "tokens": self.tokens,
            "layers": {k: float(v) for k, v in sorted(self.layers.items())},
            "heads": listed(self.heads), "mlp": listed(self.mlp),
            "embedding": [float(x) for x in self.embedding]}


def randomized(scores: Importance, seed: int) -> Importance:
  """The baseline of the activation scores: the same structures, each scored uniformly at
  random in [0, 1) (NumPy's PCG64 seeded with `seed`, drawn in sorted path order), so
  that the kept heads, units, channels and layers are a seeded random choice."""
  rng = np.random.default_rng(seed)
  draw = lambda table: {k: rng.random(np.shape(v)) for k, v in sorted(table.items())}
  heads, mlp, norms = draw(scores.heads), draw(scores.mlp), draw(scores.norms)
  layers = {k: float(rng.random()) for k in sorted(scores.layers)}
  return dataclasses.replace(scores, heads=heads, mlp=mlp, norms=norms, layers=layers,
                             layer_criterion="random")


def with_network_config(model: Any, config: Any) -> Any:
  """A token model like `model` (same class, vocabulary and loss settings) whose
  network is built from another config of its family."""
  return type(model)(model.network.clone(config=config), model.vocabulary, z_loss=model.z_loss,
                     label_smoothing=model.label_smoothing, loss_impl=model.loss_impl)


def unscanned_model(model: Any) -> Any:
  """`model` with its network unscanned (`layers_<i>`) and without remat, for `calibrate`."""
  return with_network_config(model, dataclasses.replace(model.network.config, scan_layers=False,
                                                        remat_policy="none"))


def _captured(model: Any, params: Any, batch: Batch) -> dict[tuple[str, str], Any]:
  """{(kind, module path): activation} of one forward pass (see the module docstring):
  ('heads', attention path) [b, l, heads * head_dim], ('mlp', mlp path) [b, l, mlp],
  ('norm', norm path) [b, l, embed], ('layer', layer path) (input, output) [b, l, embed]."""
  captured: dict[tuple[str, str], Any] = {}

  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or module.name is None:
      return out
    path = "/".join(module.path)
    parent = path.rpartition("/")[0]
    if isinstance(module, layers.Dense) and module.name == "out":
      captured[("heads", parent)] = args[0]
    elif isinstance(module, layers.Dense) and module.name == "wo":
      captured[("mlp", parent)] = args[0]
    elif isinstance(module, layers.RMSNorm):
      captured[("norm", path)] = out
    elif _LAYER_NAME.fullmatch(module.name):
      captured[("layer", path)] = (args[0], out)
    return out

  with nn.intercept_methods(intercept):
    model.logits(params, batch)
  return captured


def _aggregate(values: Array, mask: Array) -> Array:
  """sum over rows of (mean over a row's real tokens of values)^2: values [b, l, n],
  mask [b, l] -> [n] (the square of agg_{B,S}, summed over batches before the root)."""
  counts = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  means = jnp.sum(values * mask[..., None], axis=1) / counts[:, None]
  return jnp.sum(jnp.square(means), axis=0)


def batch_sums(model: Any, params: Any, batch: Batch, head_dim: int) -> dict[str, Any]:
  """The per-structure sums of one calibration batch (jit it; `model` unscanned).

  Returns {'heads'|'mlp'|'norm': {path: float32 [n]} (squares of the per-row
  sequence means, summed over rows), 'cosine': {layer path: sum of cos over
  real tokens}, 'tokens': {stack: real tokens}, 'rows': rows}.
  """
  masks = {stack: (jnp.asarray(batch[feature]) > 0).astype(jnp.float32)
           for stack, feature in _STACK_TOKENS.items() if feature in batch}
  sums: dict[str, Any] = {"heads": {}, "mlp": {}, "norm": {}, "cosine": {},
                          "tokens": {stack: jnp.sum(mask) for stack, mask in masks.items()},
                          "rows": jnp.asarray(next(iter(masks.values())).shape[0], jnp.float32)}
  for (kind, path), value in _captured(model, params, batch).items():
    mask = masks[path.split("/")[0]]
    if kind == "layer":
      x, y = (v.astype(jnp.float32) for v in value)
      cosine = jnp.sum(x * y, axis=-1) / jnp.maximum(
          jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1), 1e-12)
      sums["cosine"][path] = jnp.sum(cosine * mask)
      continue
    value = value.astype(jnp.float32)
    if kind == "heads":
      value = jnp.linalg.norm(value.reshape(value.shape[:2] + (-1, head_dim)), axis=-1)
    sums[kind][path] = _aggregate(jnp.abs(value), mask)
  return sums


def calibrate(model: Any, params: Any, batches: Iterable[Batch], head_dim: int,
              layer_criterion: str = "block_importance") -> Importance:
  """The `Importance` of every structure of `model` (unscanned: `unscanned_model`)
  with parameters `params` (unscanned tree), over the calibration batches.

  Args:
    model: an unscanned token model (T5 or decoder-only).
    params: its parameters (device arrays, laid out as the caller wants).
    batches: calibration batches of the model's features (a list: 'loss' reads
      them once per layer).
    head_dim: the attention heads' size.
    layer_criterion: 'block_importance' or 'loss' (module docstring).
  """
  if layer_criterion not in LAYER_CRITERIA:
    raise ValueError(f"layer criterion {layer_criterion!r}: expected one of {LAYER_CRITERIA}")
  batches = list(batches)
  step = jax.jit(lambda p, b: batch_sums(model, p, b, head_dim))
  total: dict[str, Any] | None = None
  for batch in batches:
    sums = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(step(params, batch)))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  if total is None:
    raise ValueError("no calibration batch")
  tokens = {stack: int(count) for stack, count in total["tokens"].items()}
  stack_of = lambda path: path.split("/")[0]
  if layer_criterion == "block_importance":
    scores = {path: 1.0 - float(value) / max(tokens[stack_of(path)], 1)
              for path, value in total["cosine"].items()}
  else:
    scores = layer_removal_losses(model, params, batches, sorted(total["cosine"]))
  return Importance(heads={k: np.sqrt(v) for k, v in total["heads"].items()},
                    mlp={k: np.sqrt(v) for k, v in total["mlp"].items()},
                    norms={k: np.sqrt(v) for k, v in total["norm"].items()},
                    layers=scores, layer_criterion=layer_criterion, rows=int(total["rows"]),
                    tokens=tokens)


def mean_loss(model: Any, params: Any, batches: Iterable[Batch],
              loss_fn: Callable[[Any, Batch], Any] | None = None) -> float:
  """The model's per-token loss over the batches (its `metrics(sums)['loss']`, as
  training's eval.jsonl reports it; sums in float64 on the host)."""
  loss_fn = loss_fn or jax.jit(lambda p, b: model.loss_fn(p, b, None)[1])
  total: dict[str, float] = {}
  for batch in batches:
    for key, value in jax.device_get(loss_fn(params, batch)).items():
      total[key] = total.get(key, 0.0) + float(value)
  if not total:
    raise ValueError("no batch to compute a loss on")
  return float(model.metrics(total)["loss"])


def without_layer(params: Any, layer_path: str) -> Any:
  """`params` with the residual branches of one layer zeroed (every attention `out`
  and the MLP `wo` kernel under `layer_path`): the layer then passes its input
  through unchanged, exactly as if removed."""
  def zeroed(path, value):
    name = "/".join(str(getattr(key, "key", key)) for key in path)
    inside = name.startswith(layer_path + "/")
    return jnp.zeros_like(value) if inside and name.endswith(("/out/kernel", "/wo/kernel")) \
        else value
  return jax.tree_util.tree_map_with_path(zeroed, params)


def layer_removal_losses(model: Any, params: Any, batches: list[Batch],
                         layer_paths: list[str]) -> dict[str, float]:
  """{layer path: calibration loss without the layer - loss of the full model}."""
  loss_fn = jax.jit(lambda p, b: model.loss_fn(p, b, None)[1])
  full = mean_loss(model, params, batches, loss_fn)
  return {path: mean_loss(model, without_layer(params, path), batches, loss_fn) - full
          for path in layer_paths}
