"""Masked Thought (Chen et al. 2024, "Masked Thought: Simply Masking Partial
Reasoning Steps Can Improve Mathematical Reasoning Learning of Language
Models", ACL 2024, arXiv:2403.02178: its method, Masked thought Fine-Tuning,
as the authors' code implements it), in NumPy.

During supervised fine-tuning each token of the target side that the
decoder READS (its teacher-forced input) is replaced by a mask token with
probability `rate`, independently per token (the authors' code:
`if random.random() < p: input_id[i] = MASK_INDEX` for every position of the
response); what it must PREDICT (the labels, `decoder_target_tokens`) and
the loss weights stay as they were. The prompt is never masked: the
encoder's inputs of an encoder-decoder, the prefix of a prefix LM.

Which tokens, as teacher-forced decoder inputs: target token j of an example
is read at decoder position j + 1 (the inputs are the targets shifted right,
0 = BOS first), so the candidates are targets[0 .. n-2] of the n target
tokens kept by TASK_FEATURE_LENGTHS['targets']: the last one (EOS) is read
only at a padding position (unpacked rows) or not at all (packed rows,
where the shift stops at each segment's end), and masking it would change
nothing the loss sees. So the first decoder input (BOS), padding, the
prompt and the segment boundaries of packed rows are never touched:

  targets [3 9 4 1], rate 0.5, draws mask target token 1 (9):
  decoder_target_tokens   3 9 4 1 0
  decoder_input_tokens    0 3 M 4 1        (M = mask_id; 1 = EOS as without masking)
  decoder_loss_weights    1 1 1 1 0

The example keeps its `targets` and gains `feature_converters.DECODER_INPUT_TARGETS`
(the targets as the decoder reads them); the feature converters and the
packer shift that feature instead of the targets into `decoder_input_tokens`.

Randomness: example i of task t in epoch e draws from
`np.random.default_rng([seed, t, e, i, STREAM])`: the pipeline's per-example
seeding (`data.pipeline`: objectives draw from `[seed, t, e, i]`) with one
more word, so the masks are a stream of their own (an objective's draws do
not move them) and a resumed run, a function of its position, masks exactly
as an uninterrupted one.

The mask token: the paper adds a new `[mask]` token (or reuses the pad token,
the authors' README says); pad (0) is BOS for our decoder, so the default
here is `vocab_size - 1`, the first sentinel `<extra_id_0>` of a T5-style
vocabulary, a token plain text never contains (as the MLM objective's
[MASK]). Default rate: 0 (off); `gin_configs/finetune/masked_thought.gin`
sets 0.4, the `max_mask_rate` of the authors' released GSM8K / Llama-2-7B
recipe (`training_scripts/run_llama2_7b_gsm8k_mft.sh`), which also ramps the
rate up over training (not reproduced here: the rate is constant).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from t5xlike import errors
from t5xlike.data import feature_converters

#: The extra word of a masking generator's seed ("MFT"): a stream apart from the objective's.
STREAM = 0x4D4654

#: The feature converters whose decoder reads teacher-forced targets.
CONVERTERS = ("encoder_decoder", "decoder")


def example_rng(seed: int, task: int, epoch: int, index: int) -> np.random.Generator:
  """The masking generator of example `index` of task `task` in epoch `epoch`."""
  return np.random.default_rng([int(seed), int(task), int(epoch), int(index), STREAM])


def mask_targets(targets: np.ndarray, rng: np.random.Generator, *, rate: float, mask_id: int,
                 target_length: int) -> np.ndarray:
  """The targets as the decoder reads them: int32 [n], n = min(len(targets), target_length).

  Each of targets[0 .. n-2] becomes `mask_id` when its draw u ~ U[0, 1) is < `rate`
  (n - 1 draws from `rng`, in order); targets[n-1] is kept (see the module docstring).
  """
  tokens = np.asarray(targets, dtype=np.int32)[:target_length].copy()
  draws = rng.random(max(len(tokens) - 1, 0))
  tokens[:len(draws)][draws < rate] = mask_id
  return tokens


@dataclasses.dataclass(frozen=True)
class MaskedThought:
  """Masked Thought fine-tuning's corruption of the teacher-forced decoder inputs.

  Attributes:
    rate: the probability that a candidate target token is read as the mask
      token, in [0, 1); 0 is off (the feeds then make exactly the batches they
      make without it).
    mask_id: the mask token's id; None: `vocab_size - 1` (`<extra_id_0>`).
  """
  rate: float = 0.0
  mask_id: int | None = None

  def __post_init__(self):
    rate = self.rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
      raise errors.ConfigError(f"MASKED_THOUGHT_RATE must be a number in [0, 1), got {rate!r}")
    if self.mask_id is not None:
      errors.require_int("masked_thought mask_id", self.mask_id, minimum=1)

  @property
  def active(self) -> bool:
    return self.rate > 0

  def mask_token_id(self, vocab_size: int) -> int:
    """The id that replaces a masked token."""
    return int(vocab_size) - 1 if self.mask_id is None else int(self.mask_id)

  def check_converter(self, converter: str) -> None:
    """ConfigError unless the model's converter feeds the decoder teacher-forced targets."""
    if self.active and converter not in CONVERTERS:
      raise errors.ConfigError(
          f"MASKED_THOUGHT_RATE={self.rate} masks teacher-forced decoder inputs: the model's "
          f"feature converter {converter!r} has none (supported: {', '.join(CONVERTERS)})")

  def apply(self, example: Mapping[str, np.ndarray], rng: np.random.Generator, *,
            vocab_size: int, target_length: int) -> dict[str, np.ndarray]:
    """`example` with `DECODER_INPUT_TARGETS` added (its other features unchanged)."""
    out = dict(example)
    out[feature_converters.DECODER_INPUT_TARGETS] = mask_targets(
        example["targets"], rng, rate=float(self.rate),
        mask_id=self.mask_token_id(vocab_size), target_length=target_length)
    return out
