"""The pairwise (preference) example format and its feature layout (NumPy, no TensorFlow).

A pairwise seqio task has three token features: `inputs` (the prompt),
`chosen` and `rejected` (two completions of it, the first preferred), and
optionally two float32 scalars, `reference_chosen_logp` and
`reference_rejected_logp`: a frozen reference model's summed log-likelihood
of each completion, precomputed once so that a DPO run holds one model (the
model reads them when a task carries them; `python -m
t5xlike.precompute_reference` writes such a task).

TASK_FEATURE_LENGTHS name `inputs`, `chosen` and `rejected`. Each completion
becomes one row of its policy's own (non-pairwise) feature converter, on
`{inputs: prompt, targets: completion}`, at the lengths `{inputs: L_in,
targets: L_c}` with L_c = max(chosen, rejected) (both sides share one
shape, so the model runs them as one batch of 2B rows). The features of the
two sides are prefixed `chosen_` / `rejected_`:

  pairwise_encoder_decoder, inputs [7 8 1], chosen [3 9 1], rejected [9 3 1],
  L_in 4, L_c 4:
    chosen_encoder_input_tokens     7 8 1 0     rejected_encoder_input_tokens   7 8 1 0
    chosen_decoder_target_tokens    3 9 1 0     rejected_decoder_target_tokens  9 3 1 0
    chosen_decoder_input_tokens     0 3 9 0     rejected_decoder_input_tokens   0 9 3 0
    chosen_decoder_loss_weights     1 1 1 0     rejected_decoder_loss_weights   1 1 1 0

  pairwise_decoder: the prefix-LM rows of the `decoder` converter (prompt +
  completion, loss on the completion) per side.

Packed (`packing`), the two sides of an example pack into the same row at
the same place with the same segment id (grain's packer places all of an
example's features together), so pair k of a row is segment k on both
sides. The precomputed reference scalars need one example per row (they are
per example): they are refused with packing.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

Example = Mapping[str, np.ndarray]
Batch = dict[str, np.ndarray]
Converter = Callable[[Sequence[Example], Mapping[str, int]], Batch]

#: The two completions, in the order the model stacks them (rows [0, B) then [B, 2B)).
SIDES = ("chosen", "rejected")
#: The token features a pairwise task must have.
TOKEN_FEATURES = ("inputs", "chosen", "rejected")
#: Optional per-example reference log-likelihoods (float32 scalars), one per side.
REFERENCE_FEATURES = {"chosen": "reference_chosen_logp", "rejected": "reference_rejected_logp"}
#: The pairwise converter of each policy converter.
PREFIX = "pairwise_"


def is_pairwise(converter: str) -> bool:
  """Whether `converter` names a pairwise feature converter."""
  return converter.startswith(PREFIX)


def base_converter(converter: str) -> str:
  """'pairwise_decoder' -> 'decoder': the converter each side's rows are made with."""
  return converter.removeprefix(PREFIX)


def check_features(features: Sequence[str], what: str) -> None:
  """ValueError naming the pairwise fields `features` (a task's output features or an
  example's keys) lacks."""
  missing = [name for name in TOKEN_FEATURES if name not in features]
  if missing:
    raise ValueError(f"{what} lacks the pairwise field(s) {missing}: a preference task has "
                     f"'inputs' (the prompt), 'chosen' and 'rejected' (has {sorted(features)})")


def side_lengths(feature_lengths: Mapping[str, int]) -> dict[str, int]:
  """TASK_FEATURE_LENGTHS of a pairwise task -> the lengths of one side's rows:
  {inputs: L_in, targets: max(chosen, rejected)}."""
  missing = [name for name in TOKEN_FEATURES if name not in feature_lengths]
  if missing:
    raise ValueError(f"a pairwise feature converter needs TASK_FEATURE_LENGTHS {missing} "
                     f"(got {dict(feature_lengths)}), e.g. {{'inputs': 64, 'chosen': 32, "
                     f"'rejected': 32}}")
  return {"inputs": int(feature_lengths["inputs"]),
          "targets": max(int(feature_lengths["chosen"]), int(feature_lengths["rejected"]))}


def side_example(example: Example, side: str) -> dict[str, np.ndarray]:
  """One completion of a pairwise example as a supervised example {inputs, targets}."""
  check_features(list(example), "a pairwise example")
  return {"inputs": np.asarray(example["inputs"]), "targets": np.asarray(example[side])}


def prefixed(side: str, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {f"{side}_{name}": value for name, value in features.items()}


def side_features(batch: Mapping[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
  """The features of one side of a pairwise batch, unprefixed (the policy's own names)."""
  start = f"{side}_"
  return {name[len(start):]: value for name, value in batch.items() if name.startswith(start)}


def reference_logps(examples: Sequence[Example]) -> dict[str, np.ndarray]:
  """The precomputed reference scalars of the examples as float32 [b] features (all or
  none of the examples carry them; ValueError otherwise)."""
  out = {}
  for name in REFERENCE_FEATURES.values():
    present = [name in ex for ex in examples]
    if any(present) and not all(present):
      raise ValueError(f"only some pairwise examples carry {name!r}")
    if all(present) and examples:
      out[name] = np.asarray([float(np.asarray(ex[name]).reshape(())) for ex in examples],
                             np.float32)
  return out


def converter_of(base: Converter) -> Converter:
  """The pairwise converter around a policy's converter (`feature_converters.CONVERTERS`):
  examples with inputs / chosen / rejected -> the prefixed features of both sides (and
  the precomputed reference scalars, when the examples carry them)."""
  def convert(examples: Sequence[Example], feature_lengths: Mapping[str, int]) -> Batch:
    lengths = side_lengths(feature_lengths)
    out: Batch = {}
    for side in SIDES:
      out.update(prefixed(side, base([side_example(ex, side) for ex in examples], lengths)))
    out.update(reference_logps(examples))
    return out
  return convert
