"""DePT: decomposed prompt tuning (Shi & Lipani 2023, "DePT: Decomposed Prompt Tuning for
Parameter-Efficient Fine-tuning", arXiv:2309.05173).

A soft prompt of `length` = m vectors (shorter than prompt tuning's) plus a low-rank
update of the frozen input embeddings (the paper's Section 2, "Decomposed Prompt
Tuning"): the embedded input E [s, d] of the s token positions becomes

  E' = E + scale * A B,    A: [s, r] (`dept_a`), B: [r, d] (`dept_b`),

row i of A B added to the token at position i (every row of a batch alike), then the
prompt is prepended as in prompt tuning (`prompt_tuning.PromptTuning`, whose
machinery, masks, positions and initialisation this class inherits). The prompt and
the pair train at two learning rates: the prompt at the run's LEARNING_RATE
(`learning_rate`), A and B at `low_rank_learning_rate` (their update scale is the
ratio, `updates.scaled`: the same per-parameter multiplier mechanism as LLRD).

As the reference code (ZhengxiangShi/DePT, `peft/tuners/prompt_tuning_lora.py`
and `peft_model.py`): `scale = alpha / sqrt(r)` with alpha = 8 (its
`lora_alpha` default), A ~ U(-1/sqrt(r), 1/sqrt(r)) (`kaiming_uniform_(a=sqrt(5))`
on an [s, r] tensor: fan-in r) and B = 0, so the wrapped model starts as prompt
tuning with m vectors. The reference pads every input to s = `max_seq_length`
and adds all s rows; here the T5 encoder's L <= s input positions take rows
0..L-1 (the padding positions it would also shift are masked out of attention), and
the decoder-only stack takes the row of each token's position (packed segments each
from row 0). Parameters: '<stack>/prompt' [m, embed], '<stack>/dept_a' [s, r]
(`dept_length`, `lora_rank`), '<stack>/dept_b' [r, embed] (`lora_rank`, `embed`).

Parameter count: m d + r (s + d). The reference's runs keep prompt tuning's count
(T5-Base, s 256, d 768: m = 40, r = 45 train 76,800 = 100 x 768); `finetune/dept.gin`
keeps it for T5.1.1 tiny (s 64, d 64: m = 40, r = 30 train 6,400 = 100 x 64).

Errors (ValueError when the wrapped model is initialised, a one-line ConfigError in
a run before anything is written): inputs longer than `max_length` (positions A has
no row for), and a prompt longer than the inputs (m > L: the point of DePT is a
prompt shorter than prompt tuning's; one longer than the sequence it conditions is
a configuration mistake).

No merge: A B shifts positions, not token ids, so it cannot be folded into the
embedding table (nor into any weight), and the prompt is extra positions; a DePT
checkpoint is loaded with its technique (`checkpoint_loading.load_model_checkpoint`).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike.finetuning import peft, peft_registry, prompt_tuning, selection
from t5xlike.models import layers

LOW_RANK_PATTERN = r"^(encoder|decoder)/dept_[ab]$"


def a_init(key, shape, dtype=jnp.float32):
  """U(-1/sqrt(r), 1/sqrt(r)) for A [s, r]: torch's `kaiming_uniform_(a=sqrt(5))`."""
  bound = 1.0 / math.sqrt(shape[-1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


@peft_registry.register
@dataclasses.dataclass(frozen=True)
class DePT(prompt_tuning.PromptTuning):
  """A soft prompt of `length` vectors and the low-rank update A B of the input
  embeddings (see the module docstring); the `PromptTuning` fields mean the same.

  Attributes:
    length: m, the prompt vectors (the reference's runs: 40 or 60).
    rank: r, the inner size of A B.
    max_length: s, the rows of A: the longest input (TASK_FEATURE_LENGTHS['inputs'];
      decoder-only: the longest position + 1).
    alpha: A B is scaled by alpha / sqrt(rank) (the reference's 8).
    learning_rate: the prompt's learning rate, the run's LEARNING_RATE.
    low_rank_learning_rate: A's and B's; their update scale is
      low_rank_learning_rate / learning_rate.
  """
  length: int = 40
  rank: int = 30
  max_length: int = 64
  alpha: float = 8.0
  learning_rate: float = 0.3
  low_rank_learning_rate: float = 1e-2

  param_pattern = rf"^(encoder|decoder)/({prompt_tuning.PARAM}|dept_[ab])$"

  def __post_init__(self):
    super().__post_init__()
    peft.check_positive(self, "rank", "max_length")
    if not (self.learning_rate > 0 and self.low_rank_learning_rate >= 0):
      raise ValueError(f"DePT needs learning_rate > 0 and low_rank_learning_rate >= 0, "
                       f"got {self.learning_rate}, {self.low_rank_learning_rate}")

  @property
  def scale(self) -> float:
    return float(self.alpha) / math.sqrt(int(self.rank))

  def token_offset(self, module: nn.Module, positions: jax.Array,
                   features: int) -> jax.Array:
    """scale * (A B)[positions]: [b, l, features] (A, B created on the stack `module`)."""
    length = positions.shape[-1]
    if length > self.max_length:
      raise ValueError(f"DePT: the inputs have {length} positions but its low-rank update "
                       f"A has max_length={self.max_length} rows (DEPT_MAX_LENGTH)")
    if self.length > length:
      raise ValueError(f"DePT: a prompt of {self.length} vectors (DEPT_PROMPT_LENGTH) is "
                       f"longer than the inputs ({length} positions)")
    a = layers.logical_param(module, "dept_a", a_init, ("dept_length", "lora_rank"),
                             (self.max_length, self.rank), jnp.float32)
    b = layers.logical_param(module, "dept_b", nn.initializers.zeros, ("lora_rank", "embed"),
                             (self.rank, features), jnp.float32)
    rows = jnp.take(a, jnp.clip(positions, 0, self.max_length - 1), axis=0)  # [b, l, r]
    return self.scale * jnp.einsum("blr,rd->bld", rows, b)

  def update_scales(self, params):
    scales = super().update_scales(params)
    low_rank = selection.select(params, [LOW_RANK_PATTERN])
    ratio = np.float32(self.low_rank_learning_rate / self.learning_rate)
    return jax.tree.map(lambda s, m: np.where(np.asarray(m, bool), s * ratio, s)
                        .astype(np.float32), scales, low_rank)

  def describe(self, params):
    return super().describe(params) + [
        f"  prompt at learning rate {self.learning_rate:g}, A and B at "
        f"{self.low_rank_learning_rate:g} (update scale "
        f"{self.low_rank_learning_rate / self.learning_rate:.4g})"]


def offsets(a: np.ndarray, b: np.ndarray, positions: np.ndarray, scale: float) -> np.ndarray:
  """scale * (A B)[positions] in float64 (NumPy): the update DePT adds to the
  embeddings of tokens at `positions` [b, l]; for tests and inspection."""
  product = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  return scale * product[np.asarray(positions)]

