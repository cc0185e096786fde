"""DSEE's weight update: low rank plus a sparse residual on a fixed support (Chen et al.,
"DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models",
arXiv:2111.00160, ACL 2023; Section 3, "sparsity-embedded parameter-efficient
fine-tuning").

Every `layers.Dense` whose module path matches `targets` (default: the query and
value projections, as the paper and its code) computes

  y = x W + scale * x (A B + S),    scale = alpha / rank,

with A [in, rank] (`dsee_a`, N(0, 0.02)), B [rank, out] (`dsee_b`, 0) and S [in, out]
non-zero only on a fixed support Omega of `num_sparse` entries: `dsee_values` [N]
(trained, 0 at the start) at the (row, column) pairs of `dsee_support` [N, 2]
(float32 integers: exact below 2**24 rows or columns; a float leaf, because the
train step differentiates every leaf; frozen, but kept in the PEFT checkpoint,
`PeftMethod.export_pattern`). The wrapped model starts as the base model exactly.

Omega is chosen once from the pretrained kernel, when the run starts from
INITIAL_CHECKPOINT_PATH (`initialize`); until then `dsee_support` holds -1 (no
entry; S = 0), and a support read from a checkpoint (resume, a DSEE PEFT checkpoint
as INITIAL_CHECKPOINT_PATH) is kept. `support='grebsmo'` follows the official code
(VITA-Group/DSEE, `examples/pytorch/text-classification/run_glue.py`,
`sparse_method='grebsmo'`): the pretrained W (torch's [out, in] layout, i.e. the
kernel transposed) is split as W ~ U V + S by GreBsmo-style alternating steps
(Zhou & Tao 2013: 100 rounds; each round restarts S = 0 and runs 2 passes of
U = orth((W - S) V^T), V = U^T (W - S), S = W - U V with |S| < 0.01 set to 0, then
appends the first 5 rows of the QR R-factor of the residual W - U V - S to V; V
starts as one N(0, 1) row, seeded here by `seed`, the layer and the path), and
Omega is the `num_sparse` largest |S| (the code thresholds at the k-th value, so
ties can add entries; here exactly N, ties by index). One change: the code's rounds
take U V to rank 496, 65% of BERT-Base's 768 x 768 projections; a matrix whose
smaller side is under 496 would end at full rank with S = 0 (every |S| tied at 0),
so the rank stops at that fraction of the smaller side (`RANK_FRACTION`; 41 for
T5.1.1 tiny's 64 x 64 projections). The paper's text (its GreBsmo reference,
Zhou & Tao 2013) was not at hand here; the code is what this follows. The 0.01
threshold is absolute, as the code's (for weights of BERT's scale).
`support='magnitude'` is
the code's 'omp' option: the N largest |W|. Defaults are the code's and its
scripts' (`scripts/rte_unstructured_0.2.sh`): rank 16, 16 sparse entries per
matrix, alpha 32 (the code's default; scale alpha / rank on both terms).

Only the first of DSEE's two parts is here: the parameter-efficient update. Its
second part (pruning the fine-tuned weights, unstructured or attention heads, for
a sparse final model) is not implemented.

`merge(params)` folds W + scale (A B + S) (float64, rounded once) and drops the
dsee_* leaves: a plain checkpoint of the base architecture.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike.finetuning import lora, peft, peft_registry, selection
from t5xlike.models import layers

SUPPORTS = ("grebsmo", "magnitude")
#: The official code's GreBsmo constants (rounds, passes per round, rows added per
#: round, the hard threshold on |S|).
ROUNDS, PASSES, RANK_STEP, THRESHOLD = 100, 2, 5, 0.01
#: The rank the official code's rounds reach on BERT-Base's 768 x 768 projections
#: (1 + 5 x 99 = 496), as a fraction of the matrix's smaller side: the cap here.
RANK_FRACTION = 496 / 768
_OWN = ("dsee_a", "dsee_b", "dsee_values", "dsee_support")


def grebsmo(w: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(U, V, S) of the official code's W ~ U V + S decomposition of w [out, in] (float64;
  U with orthonormal columns, S = W - U V with |entries| < THRESHOLD set to 0), the rank
  of U V capped at RANK_FRACTION of the smaller side."""
  w = np.asarray(w, np.float64)
  cap = max(1, int(round(RANK_FRACTION * min(w.shape))))
  v = rng.standard_normal((1, w.shape[1]))
  s = np.zeros_like(w)
  u = np.zeros((w.shape[0], 1))
  for round_ in range(ROUNDS):
    s = np.zeros_like(w)
    for _ in range(PASSES):
      u = np.linalg.qr((w - s) @ v.T)[0]
      v = u.T @ (w - s)
      s = w - u @ v
      s[np.abs(s) < THRESHOLD] = 0.0
    residual = w - u @ v - s
    if round_ < ROUNDS - 1:
      v = np.concatenate([v, np.linalg.qr(residual)[1][:RANK_STEP]], axis=0)[:cap]
  return u, v, s


def top_entries(scores: np.ndarray, count: int) -> np.ndarray:
  """(row, column) of the `count` largest `scores` [in, out] (ties: lower flat index
  first), sorted by flat index: float32 [count, 2]."""
  flat = np.abs(np.asarray(scores, np.float64)).ravel()
  order = np.argsort(-flat, kind="stable")[:count]
  rows, cols = np.unravel_index(np.sort(order), scores.shape)
  return np.stack([rows, cols], axis=-1).astype(np.float32)


def sparse_matrix(values: jax.Array, support: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """S [in, out]: `values` [N] at the (row, column) pairs `support` [N, 2]; pairs with a
  negative entry (not chosen yet) add nothing."""
  rows, cols = support[:, 0].astype(jnp.int32), support[:, 1].astype(jnp.int32)
  valid = (rows >= 0) & (cols >= 0)
  kept = jnp.where(valid, values, jnp.zeros_like(values))
  return jnp.zeros(shape, values.dtype).at[jnp.maximum(rows, 0), jnp.maximum(cols, 0)].add(kept)


def dense_delta(a: np.ndarray, b: np.ndarray, values: np.ndarray, support: np.ndarray,
                scale: float) -> np.ndarray:
  """scale (A B + S) in float64 for one layer (NumPy): the kernel's update."""
  delta = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  for (row, col), value in zip(np.asarray(support, np.int64), np.asarray(values, np.float64)):
    if row >= 0 and col >= 0:
      delta[row, col] += value
  return scale * delta


@peft_registry.register
@dataclasses.dataclass(frozen=True)
class DSEE(peft.PeftMethod):
  """Low-rank plus sparse updates of the dense layers matching `targets` (module doc).

  Attributes:
    rank: r of A B (the code's scripts: 16).
    num_sparse: N, the entries of S per matrix (the scripts: 16; the code's default 128).
    alpha: both terms are scaled by alpha / rank (the code's default 32).
    support: 'grebsmo' (the code's default) or 'magnitude' (its 'omp').
    seed: seeds GreBsmo's starting V.
    targets: regex searched in module paths ('.../attention/query').
    also_train: further parameter groups trained (`selection.GroupSpec`s).
  """
  rank: int = 16
  num_sparse: int = 16
  alpha: float = 32.0
  support: str = "grebsmo"
  seed: int = 0
  targets: str = lora.DEFAULT_TARGETS
  also_train: Sequence[selection.GroupSpec] = ()

  param_pattern = r"/dsee_(a|b|values)$"
  export_pattern: ClassVar[str] = r"/dsee_support$"

  def __post_init__(self):
    peft.check_positive(self, "rank", "num_sparse")
    if self.support not in SUPPORTS:
      raise ValueError(f"DSEE.support must be one of {SUPPORTS}, got {self.support!r}")
    re.compile(self.targets)
    peft.as_tuple(self, "also_train")

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  def interceptor(self):
    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if (context.method_name != "__call__" or not isinstance(module, layers.Dense)
          or not re.search(self.targets, peft.module_path(module))):
        return next_fun(*args, **kwargs)
      y = next_fun(*args, **kwargs)
      x = args[0] if args else kwargs["x"]
      in_axis, out_axis = module.kernel_axes
      shape = (x.shape[-1], module.features)
      if self.num_sparse > shape[0] * shape[1]:
        raise ValueError(f"DSEE.num_sparse={self.num_sparse} exceeds the {shape[0]} x "
                         f"{shape[1]} kernel of {peft.module_path(module)}")
      param = lambda name, init, axes, dims: layers.logical_param(module, name, init, axes,
                                                                 dims, jnp.float32)
      a = param("dsee_a", nn.initializers.normal(0.02), (in_axis, "lora_rank"),
                (shape[0], self.rank))
      b = param("dsee_b", nn.initializers.zeros, ("lora_rank", out_axis), (self.rank, shape[1]))
      values = param("dsee_values", nn.initializers.zeros, ("dsee_entries",),
                     (self.num_sparse,))
      support = param("dsee_support", nn.initializers.constant(-1.0), ("dsee_entries", None),
                      (self.num_sparse, 2))
      dtype = module.dtype
      xs = x.astype(dtype)
      update = (jnp.dot(jnp.dot(xs, a.astype(dtype)), b.astype(dtype))
                + jnp.dot(xs, sparse_matrix(values, support, shape).astype(dtype)))
      return y + (jnp.asarray(self.scale, dtype) * update).astype(y.dtype)
    return intercept

  def choose_support(self, kernel: np.ndarray, path: str, layer: int) -> np.ndarray:
    """Omega of one kernel [in, out] (float32 [N, 2] (row, column) pairs)."""
    kernel = np.asarray(kernel, np.float64)
    if self.support == "magnitude":
      return top_entries(kernel, self.num_sparse)
    rng = np.random.default_rng([self.seed, zlib.crc32(path.encode()), layer])
    return top_entries(grebsmo(kernel.T, rng)[2].T, self.num_sparse)

  def initialize(self, params: Any, fresh, restored):
    """Chooses the support of every DSEE module whose support is unset (-1) from its
    (restored) kernel; a support already set (read from a checkpoint) is kept."""
    del fresh, restored

    def walk(tree, path):
      if not isinstance(tree, dict):
        return tree
      if "dsee_support" not in tree:
        return {k: walk(v, f"{path}/{k}" if path else k) for k, v in tree.items()}
      support = np.asarray(jax.device_get(tree["dsee_support"]))
      if not (support < 0).all():
        return tree
      kernel = np.asarray(jax.device_get(tree["kernel"]))
      name = re.sub(r"/layers_\d+(?=/|$)", "/layers", path)
      chosen = (self.choose_support(kernel, name, 0) if kernel.ndim == 2 else
                np.stack([self.choose_support(k, name, i) for i, k in enumerate(kernel)]))
      return {**tree, "dsee_support": chosen.astype(support.dtype)}
    return walk(params, "")

  def merge(self, params: Any) -> Any:
    """Base-architecture parameters: each DSEE module's kernel becomes W + scale (A B + S)
    (float64, rounded once); the dsee_* leaves are dropped."""
    if not isinstance(params, dict):
      return params
    if "dsee_a" not in params:
      return {k: self.merge(v) for k, v in params.items()}
    host = {k: np.asarray(jax.device_get(params[k])) for k in ("kernel", *_OWN)}
    kernel = host["kernel"]
    def layer(pick):
      return dense_delta(pick(host["dsee_a"]), pick(host["dsee_b"]),
                         pick(host["dsee_values"]), pick(host["dsee_support"]), self.scale)
    if kernel.ndim == 2:
      delta = layer(lambda x: x)
    else:
      delta = np.stack([layer(lambda x, i=i: x[i]) for i in range(kernel.shape[0])])
    out = {k: v for k, v in params.items() if k not in _OWN}
    out["kernel"] = (kernel.astype(np.float64) + delta).astype(kernel.dtype)
    return out

  def describe(self, params):
    return super().describe(params) + [
        f"  sparse support: the {self.num_sparse} largest entries per matrix of "
        + ("the GreBsmo residual S of W ~ U V + S" if self.support == "grebsmo"
           else "|W|") + " (chosen from INITIAL_CHECKPOINT_PATH's kernels)"]
