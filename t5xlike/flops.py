"""Analytic training FLOPs per step, peak FLOP/s per device kind, and MFU.

Counting convention (as MaxText and PaLM App. B): only matrix multiplies
count, a multiply-add is 2 FLOPs, elementwise work (norms, softmax, GELU,
the optimizer) is left out. A weight `[m, n]` applied to T token positions
costs 2 m n T in the forward pass; the backward pass costs twice that (one
matmul for the input gradient, one for the weight gradient), so training
costs 6 m n T. A frozen weight (LoRA's base, a frozen layer) needs no weight
gradient: 4 m n T. Attention's quadratic part has no weights: per layer and
head, Q K^T and P V cost 2 q k d_h each forward (d_h = head_dim), and the
backward needs two matmuls for each (dQ, dK; dP, dV), so training costs
3 x 4 b H q k d_h; the full q x k matrix is counted (XLA computes it even
where a causal mask zeroes half of it). Padding positions count: they are
computed. The embedding lookup is a gather (0 FLOPs); a tied output layer
is a matmul like an untied one. Rematerialisation recomputes the forward
pass of the layers; `model` FLOPs (what MFU divides) leave it out,
`hardware` FLOPs include it.

Per family, with b rows, d = emb_dim, H heads (H_kv key/value heads), d_h,
f = mlp_dim, a = number of MLP input matrices (2 for gated GELU / SwiGLU, 1
otherwise), V = vocab_size, forward matmul FLOPs:
  encoder layer, per encoder token:  2 d H d_h (q) + 2 * 2 d H_kv d_h (k, v)
                                     + 2 H d_h d (out) + 2 (a + 1) d f (MLP)
                 per layer:          4 b H l_e^2 d_h (attention)
  decoder layer (T5, cross-attention): the self-attention and MLP terms per
                 decoder token, plus cross-attention q and out per decoder
                 token and k, v per *encoder* token; attention
                 4 b H (l_d^2 + l_d l_e) d_h
  decoder-only layer: the encoder layer's terms over the l decoder tokens
                 (H_kv < H with grouped-query attention)
  output layer:  2 d V per scored-stack token (decoder tokens; the MLM head
                 adds 2 d e per token for its dense layer, e = embedding size)
Adjustments: `lora_rank` r adds, for every adapted projection `[m, n]` (those
whose module path, e.g. 'encoder/layers/attention/query', matches
`lora_targets`; all of them when it is None), the adapters `[m, r]` and
`[r, n]` (6 (m + n) r T for training) and makes the base weight frozen
(4 m n T); `frozen` (a PEFT run: LoRA, adapters, prompt tuning train only
their own parameters; not intrinsic-dimension tuning, whose projected weights
all get gradients) makes every other weight frozen too, the output layer
included (adapters' own small matmuls and prompt slots are not counted);
`sparsity` s (SPDF: a fraction s of the attention/MLP kernels that
`sparse_targets` selects, all of them when it is None, is zero) scales those
kernels' matmul FLOPs by 1 - s; attention's Q K^T and P V, the embedding
projection and the output layer (tied or not) stay dense. The dense
computation is what runs on GPUs/TPUs; the count is what a sparse kernel
would need, as SPDF reports it: on GPT-3 XL shapes (24 layers, d 2,048,
16 heads, f 8,192, GELU, tied embeddings, 2,048 tokens) 75% sparsity gives
2.49x fewer training FLOPs, the paper's "~2.5x" (abstract).
`Accounting` logs both counts of an SPDF run (`dense_train_flops`,
`sparse_train_flops`).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Mapping
from typing import Any, TypedDict

import jax
import numpy as np

from t5xlike import interfaces
from t5xlike.models import base, classifier, decoder, encoder, t5
from t5xlike.objectives import spdf

#: Dense peak TFLOP/s per chip by `device_kind` substring (lower case), for
#: bfloat16 and float32 matmuls. TPUs run float32 matmuls at default precision
#: as bfloat16 passes (the bf16 figure); NVIDIA GPUs as TF32 (JAX's default
#: matmul precision there), half the bf16 figure. Sources: Google Cloud TPU
#: system-architecture pages (v4 275, v5e 197, v5p 459, v6e 918 bf16) and
#: NVIDIA's A100 / H100 SXM / H200 data sheets (dense, without sparsity).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "tpu v4": {"bfloat16": 275.0, "float32": 275.0},
    "tpu v5 lite": {"bfloat16": 197.0, "float32": 197.0},   # v5e
    "tpu v5e": {"bfloat16": 197.0, "float32": 197.0},
    "tpu v5p": {"bfloat16": 459.0, "float32": 459.0},
    "tpu v5": {"bfloat16": 459.0, "float32": 459.0},        # v5p reports "TPU v5"
    "tpu v6 lite": {"bfloat16": 918.0, "float32": 918.0},   # v6e (Trillium)
    "tpu v6e": {"bfloat16": 918.0, "float32": 918.0},
    "a100": {"bfloat16": 312.0, "float32": 156.0},
    "h100": {"bfloat16": 989.0, "float32": 494.5},
    "h200": {"bfloat16": 989.0, "float32": 494.5},
}


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one training step (whole global batch, all devices together).

  Attributes:
    model: matmul FLOPs of forward + backward (what MFU divides).
    hardware: `model` plus the forward recomputation of rematerialised layers.
    forward: the forward pass's matmul FLOPs alone.
  """
  model: float
  hardware: float
  forward: float


class _TrainedWeights(TypedDict):
  """Which weights a step trains: the keyword arguments of the `*_step_flops` functions
  that describe SPDF sparsity and PEFT (frozen base, LoRA) rather than the network."""
  sparsity: float
  sparse_targets: str | None
  frozen: bool
  lora_rank: int
  lora_targets: str | None


def _matmul(rows: float, m: int, n: int, trained: bool = True) -> tuple[float, float]:
  """(forward, train) FLOPs of a [m, n] weight applied to `rows` positions."""
  forward = 2.0 * m * n * rows
  return forward, forward * (3.0 if trained else 2.0)


class _Tally:
  """Sums (forward, train) FLOPs of layer and non-layer matmuls."""

  def __init__(self, lora_rank: int = 0, sparsity: float = 0.0,
               lora_targets: str | None = None, frozen: bool = False,
               sparse_targets: str | None = None):
    if lora_rank < 0 or not 0.0 <= sparsity < 1.0:
      raise ValueError(f"lora_rank must be >= 0 and sparsity in [0, 1), got {lora_rank}, "
                       f"{sparsity}")
    self.lora_rank, self.density = int(lora_rank), 1.0 - float(sparsity)
    self.lora_targets = None if lora_targets is None else re.compile(lora_targets)
    self.sparse_targets = None if sparse_targets is None else re.compile(sparse_targets)
    self.frozen = bool(frozen)
    self.layer_forward = self.layer_train = 0.0
    self.other_forward = self.other_train = 0.0

  def projection(self, rows: float, m: int, n: int, name: str = "") -> None:
    """A layer kernel (attention or MLP projection) at module path `name`
    ('decoder/layers/self_attention/query'): LoRA / sparsity apply."""
    adapted = bool(self.lora_rank) and (self.lora_targets is None
                                        or self.lora_targets.search(name) is not None)
    forward, train = _matmul(rows, m, n, trained=not (adapted or self.frozen))
    # SPDF's regex selects parameter paths, so it is matched against the kernel's.
    if self.sparse_targets is None or self.sparse_targets.search(f"{name}/kernel"):
      forward, train = forward * self.density, train * self.density
    if adapted:
      for shape in ((m, self.lora_rank), (self.lora_rank, n)):
        f, t = _matmul(rows, *shape)
        forward, train = forward + f, train + t
    self.layer_forward += forward
    self.layer_train += train

  def attention_core(self, batch: int, heads: int, q_len: int, k_len: int,
                     head_dim: int) -> None:
    """Q K^T and P V of one attention layer (no weights: the same cost trained or frozen).

    Args:
      batch: rows.
      heads: query heads (grouped key/value heads are repeated to them).
      q_len: query positions per row.
      k_len: key / value positions per row.
      head_dim: d_h.
    """
    forward = 4.0 * batch * heads * q_len * k_len * head_dim
    self.layer_forward += forward
    self.layer_train += 3.0 * forward

  def other(self, rows: float, m: int, n: int) -> None:
    forward, train = _matmul(rows, m, n, trained=not self.frozen)
    self.other_forward += forward
    self.other_train += train

  def result(self, remat: bool) -> StepFlops:
    model = self.layer_train + self.other_train
    return StepFlops(model=model, hardware=model + (self.layer_forward if remat else 0.0),
                     forward=self.layer_forward + self.other_forward)


def _attention_block(tally: _Tally, d: int, heads: int, kv_heads: int, head_dim: int,
                     q_rows: float, kv_rows: float, path: str) -> None:
  tally.projection(q_rows, d, heads * head_dim, f"{path}/query")
  tally.projection(kv_rows, d, kv_heads * head_dim, f"{path}/key")
  tally.projection(kv_rows, d, kv_heads * head_dim, f"{path}/value")
  tally.projection(q_rows, heads * head_dim, d, f"{path}/out")


def _mlp_block(tally: _Tally, d: int, mlp: int, activations: Any, rows: float,
               path: str) -> None:
  names = ["wi"] if len(activations) == 1 else [f"wi_{i}" for i in range(len(activations))]
  for name in names:
    tally.projection(rows, d, mlp, f"{path}/{name}")
  tally.projection(rows, mlp, d, f"{path}/wo")


def t5_step_flops(cfg: t5.T5Config, batch: int, inputs_length: int, targets_length: int,
                  lora_rank: int = 0, sparsity: float = 0.0, lora_targets: str | None = None,
                  frozen: bool = False, sparse_targets: str | None = None) -> StepFlops:
  """T5 encoder-decoder training step on [batch, inputs_length] encoder and
  [batch, targets_length] decoder tokens.

  Args:
    cfg: the network's config.
    batch: rows of the global batch.
    inputs_length: encoder positions per row (padding included).
    targets_length: decoder positions per row (padding included).
    lora_rank: LoRA's rank r (0: no LoRA).
    sparsity: SPDF's fraction of the weights of the selected layer kernels that are zero.
    lora_targets: regex over module paths selecting the LoRA-adapted projections
      (None: all of them).
    frozen: a PEFT run: only the technique's own parameters train.
    sparse_targets: regex over kernel paths ('decoder/layers/mlp/wo/kernel', every layer
      named `layers`) selecting the sparse kernels (None: every attention / MLP kernel).

  Returns:
    The step's FLOPs (see the module docstring).
  """
  tally = _Tally(lora_rank, sparsity, lora_targets, frozen, sparse_targets)
  d, h, dh = cfg.emb_dim, cfg.num_heads, cfg.head_dim
  enc, dec = batch * inputs_length, batch * targets_length
  for _ in range(cfg.num_encoder_layers):
    _attention_block(tally, d, h, h, dh, enc, enc, "encoder/layers/attention")
    tally.attention_core(batch, h, inputs_length, inputs_length, dh)
    _mlp_block(tally, d, cfg.mlp_dim, cfg.mlp_activations, enc, "encoder/layers/mlp")
  for _ in range(cfg.num_decoder_layers):
    _attention_block(tally, d, h, h, dh, dec, dec, "decoder/layers/self_attention")
    tally.attention_core(batch, h, targets_length, targets_length, dh)
    _attention_block(tally, d, h, h, dh, dec, enc, "decoder/layers/encoder_decoder_attention")
    tally.attention_core(batch, h, targets_length, inputs_length, dh)
    _mlp_block(tally, d, cfg.mlp_dim, cfg.mlp_activations, dec, "decoder/layers/mlp")
  tally.other(dec, d, cfg.vocab_size)
  return tally.result(remat=cfg.remat_policy != "none")


def decoder_step_flops(cfg: decoder.DecoderConfig, batch: int, length: int, lora_rank: int = 0,
                       sparsity: float = 0.0, lora_targets: str | None = None,
                       frozen: bool = False, sparse_targets: str | None = None) -> StepFlops:
  """Decoder-only training step on [batch, length] tokens.

  Args:
    cfg: the network's config.
    batch: rows of the global batch.
    length: positions per row (padding included).
    lora_rank: LoRA's rank r (0: no LoRA).
    sparsity: SPDF's fraction of the weights of the selected layer kernels that are zero.
    lora_targets: regex over module paths selecting the LoRA-adapted projections
      (None: all of them).
    frozen: a PEFT run: only the technique's own parameters train.
    sparse_targets: regex over kernel paths ('decoder/layers/mlp/wo/kernel', every layer
      named `layers`) selecting the sparse kernels (None: every attention / MLP kernel).

  Returns:
    The step's FLOPs (see the module docstring).
  """
  tally = _Tally(lora_rank, sparsity, lora_targets, frozen, sparse_targets)
  d, h, dh = cfg.emb_dim, cfg.num_heads, cfg.head_dim
  rows = batch * length
  for _ in range(cfg.num_layers):
    _attention_block(tally, d, h, cfg.num_kv_heads, dh, rows, rows,
                     "decoder/layers/self_attention")
    tally.attention_core(batch, h, length, length, dh)
    _mlp_block(tally, d, cfg.mlp_dim, cfg.mlp_activations, rows, "decoder/layers/mlp")
  tally.other(rows, d, cfg.vocab_size)
  return tally.result(remat=cfg.remat_policy != "none")


def encoder_step_flops(cfg: encoder.EncoderConfig, batch: int, length: int, head: str = "mlm",
                       lora_rank: int = 0, sparsity: float = 0.0, lora_targets: str | None = None,
                       frozen: bool = False, sparse_targets: str | None = None) -> StepFlops:
  """Encoder-only training step on [batch, length] tokens.

  Args:
    cfg: the network's config.
    batch: rows of the global batch.
    length: positions per row (padding included).
    head: 'mlm' adds the MLM head (dense + tied vocabulary logits), 'binary'
      ELECTRA's per-token dense, others (pooled classifiers) nothing.
    lora_rank: LoRA's rank r (0: no LoRA).
    sparsity: SPDF's fraction of the weights of the selected layer kernels that are zero.
    lora_targets: regex over module paths selecting the LoRA-adapted projections
      (None: all of them).
    frozen: a PEFT run: only the technique's own parameters train.
    sparse_targets: regex over kernel paths ('decoder/layers/mlp/wo/kernel', every layer
      named `layers`) selecting the sparse kernels (None: every attention / MLP kernel).

  Returns:
    The step's FLOPs (see the module docstring).
  """
  tally = _Tally(lora_rank, sparsity, lora_targets, frozen, sparse_targets)
  d, h, dh = cfg.emb_dim, cfg.num_heads, cfg.head_dim
  rows = batch * length
  e = cfg.embedding_size
  if e != d:
    tally.other(rows, e, d)  # embedding_projection
  for _ in range(cfg.num_layers):
    _attention_block(tally, d, h, h, dh, rows, rows, "encoder/layers/attention")
    tally.attention_core(batch, h, length, length, dh)
    _mlp_block(tally, d, cfg.mlp_dim, cfg.mlp_activations, rows, "encoder/layers/mlp")
  if head == "mlm":
    tally.other(rows, d, e)
    tally.other(rows, e, cfg.vocab_size)
  elif head == "binary":
    tally.other(rows, d, d)
  return tally.result(remat=cfg.remat_policy != "none")


def _single_network(model: interfaces.Model
                    ) -> base.TokenModel | classifier.ClassifierModel | None:
  """The model with one configured network that `model` is or wraps (SPDF's `SparseModel`),
  None for ELECTRA (a generator and a discriminator: `model_step_flops` sums the two)."""
  inner = model.model if isinstance(model, spdf.SparseModel) else model
  # Token models and classifiers hold one network with a `config` (TokenModel's
  # constructor reads it); a PEFT-wrapped copy is still an instance of its class.
  if isinstance(inner, (base.TokenModel, classifier.ClassifierModel)):
    return inner
  return None


def network_config(model: interfaces.Model) -> Any | None:
  """The network config (`T5Config`, `DecoderConfig`, `EncoderConfig`) of a model or of
  the model an SPDF `SparseModel` wraps; None when it has no single network (ELECTRA's
  generator and discriminator)."""
  inner = _single_network(model)
  return None if inner is None else inner.network.config


def _trained_weights(model: interfaces.Model) -> _TrainedWeights:
  """SPDF's sparsity (`objectives.spdf.SparseModel`) and the PEFT technique's frozen base
  and LoRA adapters (`finetuning.peft.wrap_model`) of a model."""
  method = model.peft_method
  # Intrinsic-dimension tuning differentiates every weight (theta_D = theta_0 + P theta):
  # its backward pass is full fine-tuning's.
  frozen = method is not None and not getattr(method, "differentiates_all_weights", False)
  lora_rank, lora_targets = 0, None
  if method is not None:
    from t5xlike.finetuning import lora  # noqa: PLC0415  (0.3 s; loaded with any technique)
    if isinstance(method, lora.LoRA):
      lora_rank, lora_targets = method.rank, method.targets
  sparsity, sparse_targets = 0.0, None
  if isinstance(model, spdf.SparseModel):
    sparsity, sparse_targets = model.sparsity, model.include
  return _TrainedWeights(sparsity=sparsity, sparse_targets=sparse_targets,
                         frozen=frozen, lora_rank=lora_rank,
                         lora_targets=lora_targets)


def model_step_flops(model: interfaces.Model,
                     batch_shapes: Mapping[str, Any]) -> StepFlops | None:
  """Training FLOPs of one step of `model` on global batches of these shapes (arrays
  or ShapeDtypeStructs with the model's features); None for a family not covered.

  SPDF models (`objectives.spdf.SparseModel`) and PEFT-wrapped models
  (`finetuning.peft.wrap_model`: a frozen base; LoRA's rank and targets) are
  accounted for; ELECTRA (`objectives.electra.ElectraModel`, its `generator_config`
  and `discriminator_config`) is the sum of its two networks.
  """
  generator = getattr(model, "generator_config", None)
  discriminator = getattr(model, "discriminator_config", None)
  if generator is not None and discriminator is not None and (
      "encoder_input_tokens" in batch_shapes):
    # ELECTRA (`objectives.electra.ElectraModel`): the generator's masked LM over every
    # position (its logits are [b, l, vocab]) plus the discriminator with its binary head.
    batch, length = batch_shapes["encoder_input_tokens"].shape
    parts = (encoder_step_flops(generator, batch, length, head="mlm"),
             encoder_step_flops(discriminator, batch, length, head="binary"))
    return StepFlops(*(sum(getattr(p, f.name) for p in parts)
                       for f in dataclasses.fields(StepFlops)))
  inner = _single_network(model)
  if inner is None:
    return None
  cfg = inner.network.config
  extra = _trained_weights(model)
  if isinstance(cfg, t5.T5Config) and "encoder_input_tokens" in batch_shapes:
    batch, inputs = batch_shapes["encoder_input_tokens"].shape
    return t5_step_flops(cfg, batch, inputs, batch_shapes["decoder_target_tokens"].shape[1],
                         **extra)
  if isinstance(cfg, decoder.DecoderConfig):
    batch, length = batch_shapes["decoder_target_tokens"].shape
    return decoder_step_flops(cfg, batch, length, **extra)
  if isinstance(cfg, encoder.EncoderConfig) and "encoder_input_tokens" in batch_shapes:
    batch, length = batch_shapes["encoder_input_tokens"].shape
    return encoder_step_flops(cfg, batch, length, head=inner.network.head, **extra)
  return None


@functools.cache
def measured_matmul_tflops(size: int = 1024, dtype: str = "float32", repeats: int = 5) -> float:
  """Best observed TFLOP/s of a jitted [size, size] @ [size, size] matmul on device 0
  (the CPU's practical peak: there is no data sheet figure for it)."""
  x = jax.device_put(np.ones((size, size), dtype))
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best / 1e12


def peak_tflops_per_device(dtype: str = "float32", device: Any = None,
                           configured: float | None = None,
                           repeats: int = 5) -> tuple[float, str]:
  """(peak TFLOP/s of one device for `dtype` matmuls, where the figure comes from).

  `configured` wins; else the data-sheet table `PEAK_TFLOPS` by device kind;
  else (CPU, unknown accelerators) the best of `repeats` measured matmuls
  (`measured_matmul_tflops`).
  """
  if configured:
    return float(configured), "configured"
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  dtype = "bfloat16" if "bfloat16" in str(dtype) else "float32"
  for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
    if name in kind:
      return PEAK_TFLOPS[name][dtype], f"table ({name})"
  return (measured_matmul_tflops(dtype=dtype, repeats=repeats),
          f"measured {dtype} matmul on {device.platform} (best of {repeats})")


class Accounting:
  """Per-step fields of train.jsonl: `tflops_per_device`, `mfu`; for an SPDF run also
  `dense_train_flops` and `sparse_train_flops` (the step's training FLOPs without and
  with the sparsity, as the paper compares them).

  Args:
    step_flops: FLOPs of one global step.
    num_devices: devices the step runs on.
    peak_tflops: peak TFLOP/s of one device.
    peak_source: where the peak comes from (`peak_tflops_per_device`).
    dense_step_flops: for an SPDF model, the FLOPs of the same step with dense kernels
      (`step_flops` being the sparse count); None otherwise.
  """

  def __init__(self, step_flops: StepFlops, num_devices: int, peak_tflops: float,
               peak_source: str = "", dense_step_flops: StepFlops | None = None):
    self.step_flops, self.num_devices, self.peak_tflops = step_flops, num_devices, peak_tflops
    self.peak_source = peak_source
    self.dense_step_flops = dense_step_flops

  def fields(self, step_time_s: float) -> dict[str, float]:
    """`tflops_per_device` (model FLOPs / step time / devices, in TFLOP/s) and
    `mfu` (that over the peak) for a step of `step_time_s` seconds (none for a
    time <= 0), and the SPDF counts where there are some."""
    out: dict[str, float] = {}
    if self.dense_step_flops is not None:
      out.update(dense_train_flops=self.dense_step_flops.model,
                 sparse_train_flops=self.step_flops.model)
    if step_time_s > 0:
      achieved = self.step_flops.model / step_time_s / self.num_devices / 1e12
      out.update(tflops_per_device=achieved, mfu=achieved / self.peak_tflops)
    return out

  def describe(self) -> str:
    """One line: FLOPs per global step (model, with remat) and the peak per device."""
    return (f"FLOPs per step {self.step_flops.model:.4g} (model), "
            f"{self.step_flops.hardware:.4g} (with remat); peak {self.peak_tflops:.4g} "
            f"TFLOP/s per device ({self.peak_source or 'given'})")


def accounting(model: Any, batch_shapes: Mapping[str, Any], dtype: str = "float32",
               configured_peak_tflops: float | None = None) -> Accounting | None:
  """The `Accounting` of a training run (None where the family has no FLOP formula:
  train.jsonl then has no mfu); `Accounting.describe` says what it counts."""
  step = model_step_flops(model, batch_shapes)
  if step is None:
    return None
  dense = None
  if isinstance(model, spdf.SparseModel):  # SPDF's runs log the dense count beside theirs.
    dense = model_step_flops(model.model, batch_shapes)
  peak, source = peak_tflops_per_device(dtype, configured=configured_peak_tflops)
  return Accounting(step, jax.device_count(), peak, source, dense_step_flops=dense)
