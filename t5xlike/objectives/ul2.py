"""UL2's mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language
Learning Paradigms"), in NumPy.

Each example is turned into inputs/targets by one denoiser of a table. The
denoisers (§3.1.2, "Mixture of Denoisers"):

- R-denoisers, regular span corruption as in T5: (μ=3, r=0.15), (μ=8, r=0.15);
- X-denoisers, extreme: long spans and/or high corruption: (μ=3, r=0.5),
  (μ=8, r=0.5), (μ=64, r=0.15), (μ=64, r=0.5);
- the S-denoiser, sequential: prefix LM (§3.1.2 "S-Denoiser"), whose split
  point follows T5's `random_prefix_noise_mask` with density 0.5 as in the
  paper's reference implementation (Appendix 9.2, `ul2_objective` with
  `use_prefix_lm_task=True`): uniform over the chunk.

These are the 7 denoisers of the final UL2 objective. Mode switching (§3.1.3):
each denoiser's paradigm token is prepended to its inputs, `[NLU]` for R,
`[NLG]` for X and `[S2S]` for S, as the released UL2 checkpoints expect
(`PARADIGM_TOKENS`, `paradigm_token_ids`: also what fine-tuning and inference
prepend, `objectives.mode_switching`).
The reference implementation samples the denoisers uniformly (`rates=None`),
which is the default here; every rate is configurable.

Lengths. As in the reference implementation (Appendix 9.2), each span
denoiser takes the longest chunk whose corrupted inputs fit
`TASK_FEATURE_LENGTHS['inputs']` (T5's `random_spans_helper`) and its
targets must fit `targets`; the S-denoiser takes `inputs - 1` tokens (T5's
`prefix_lm`). Unlike the reference, the paradigm tokens count: the
reference computes the lengths for the bare inputs and prepends the prompt
afterwards, so its inputs overflow `inputs` by the prompt's length (and are
truncated by the feature converter); here each denoiser's budget is
`inputs` minus its prompt, so nothing is cut.

Chunks, as the reference does it (`ul2_objective` shards the concatenated
stream and `split_tokens` each shard at its own denoiser's length): the
feeds cut the token stream into chunks of each denoiser's own length, in a
fixed cycle (`chunk_lengths`, `denoiser_cycle`) where denoiser k holds a
share of the slots equal to its rate, and `transform_chunk` denoises chunk
i with the denoiser of its slot. Every corpus token is in exactly one
example per epoch, the share of examples per denoiser is its rate (exactly,
over each cycle), and chunk i's denoiser depends on i alone, so the
pipeline stays a deterministic, resumable function of (seed, position) (the
global shuffle mixes the denoisers). The reference's shards are equal
shares of the tokens sampled at the rates; ours give each denoiser rate x
length of the tokens, so that the shares of one epoch end together.
`transform` alone (outside the feeds) draws the denoiser from the
example's RNG by the rates and uses the first tokens of its length.

A note on μ large compared with the chunk: with μ=64, r=0.15 and a chunk of
~150 tokens there are round(22 / 64) = 0 -> 1 span per example, so the
measured mean span length is the whole noise count (~22), not 64: T5's
algorithm (and UL2's) never makes fewer than one span or spans longer than
the noise. `expected_mean_span_length` gives the value the algorithm can
achieve for a chunk length. With a single span the mask is one run of
non-noise then one of noise, so X(μ=64, r=0.15) at the usual lengths
predicts the last 15% of its chunk (a suffix), as the reference does
(T5's mask with `random_roll=False`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from t5xlike.objectives import base, lm, span_corruption

PARADIGM_TOKEN_MODES = ("text", "special")

#: UL2's paradigm tokens (§3.1.3, "Mode Switching"), in the order of the default table:
#: R-denoisers (regular span corruption), X-denoisers (extreme), the S-denoiser (prefix LM).
NLU, NLG, S2S = "[NLU]", "[NLG]", "[S2S]"
PARADIGM_TOKENS = (NLU, NLG, S2S)


def paradigm_token_ids(paradigms: Sequence[str], vocabulary, paradigm_tokens: str
                       ) -> dict[str, np.ndarray]:
  """The ids each paradigm string stands for: int32 [k] per string.

  Args:
    paradigms: the distinct paradigm strings, in the order of the denoiser table.
    vocabulary: the task's (seqio) vocabulary.
    paradigm_tokens: 'text': `vocabulary.encode(p)` (a few pieces); 'special':
      one id each after the vocabulary, `vocab_size + i` for the i-th of `paradigms`.
  """
  if paradigm_tokens not in PARADIGM_TOKEN_MODES:
    raise ValueError(f"paradigm_tokens must be one of {PARADIGM_TOKEN_MODES}, got "
                     f"{paradigm_tokens!r}")
  if paradigm_tokens == "special":
    size = int(vocabulary.vocab_size)
    return {p: np.array([size + i], np.int32) for i, p in enumerate(paradigms)}
  return {p: np.array(vocabulary.encode(p), np.int32) for p in paradigms}


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One row of the mixture.

  Attributes:
    name: its name in logs and `inspect_data` rows.
    paradigm: the paradigm token prepended to the inputs ('' for none).
    rate: mixing rate, the share of the examples (normalised over the table).
    mean_noise_span_length: μ of a span-corruption denoiser; None for the
      S-denoiser (prefix LM).
    noise_density: r, the corrupted fraction (for prefix LM: the expected
      fraction of the chunk in the targets).
    prefix_split: for prefix LM, 'uniform' or 'fixed' (see `lm.PrefixLM`).
  """
  name: str
  paradigm: str
  rate: float = 1.0
  mean_noise_span_length: float | None = 3.0
  noise_density: float = 0.15
  prefix_split: str = "uniform"

  @property
  def is_prefix_lm(self) -> bool:
    return self.mean_noise_span_length is None


#: The final UL2 objective: 7 denoisers (Tay et al. 2022 §3.1.2), sampled
#: uniformly as in the paper's reference implementation (Appendix 9.2).
DEFAULT_DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("R_mu3_r0.15", NLU, mean_noise_span_length=3.0, noise_density=0.15),
    Denoiser("R_mu8_r0.15", NLU, mean_noise_span_length=8.0, noise_density=0.15),
    Denoiser("X_mu3_r0.5", NLG, mean_noise_span_length=3.0, noise_density=0.5),
    Denoiser("X_mu8_r0.5", NLG, mean_noise_span_length=8.0, noise_density=0.5),
    Denoiser("X_mu64_r0.15", NLG, mean_noise_span_length=64.0, noise_density=0.15),
    Denoiser("X_mu64_r0.5", NLG, mean_noise_span_length=64.0, noise_density=0.5),
    Denoiser("S_prefix_lm", S2S, mean_noise_span_length=None, noise_density=0.5),
)


def expected_mean_span_length(length: int, noise_density: float,
                              mean_noise_span_length: float) -> float:
  """The mean span length T5's `random_spans_noise_mask` produces on `length` tokens:
  noise tokens / spans, counted as the mask counts them (`span_corruption.noise_counts`)."""
  num_noise, num_spans = span_corruption.noise_counts(length, noise_density,
                                                      mean_noise_span_length)
  return num_noise / num_spans


#: The most chunk slots of one cycle of `denoiser_cycle` (rates are approximated to 1/1000).
MAX_CYCLE = 1000


def denoiser_cycle(rates: Sequence[float]) -> tuple[int, ...]:
  """The denoiser of each chunk slot of one cycle (the feeds repeat it over the stream).

  Denoiser k gets n_k = rate_k x M of the M slots, M the smallest cycle that
  holds the normalised rates exactly (7 slots for 7 equal rates, 10 for
  0.5 / 0.3 / 0.2), or M = `MAX_CYCLE` with the counts rounded by largest
  remainder. A denoiser's slots are spread evenly: slot j of denoiser k sits
  at (j + 1/2) / n_k of the cycle (ties in table order). Raises ValueError
  for a positive rate below 1/2 of 1/`MAX_CYCLE` of the total (no slot).
  """
  p = np.asarray(rates, dtype=np.float64)
  p = p / p.sum()
  for size in range(1, MAX_CYCLE + 1):
    counts = np.rint(p * size)
    if np.abs(p * size - counts).max() < 1e-6:
      break
  else:
    counts = np.floor(p * MAX_CYCLE)
    rest = int(MAX_CYCLE - counts.sum())
    counts[np.argsort(-(p * MAX_CYCLE - counts), kind="stable")[:rest]] += 1
  if np.any((p > 0) & (counts == 0)):
    raise ValueError(f"denoiser rates {p.tolist()} include one below 1/{2 * MAX_CYCLE} of the "
                     "total: it would never be used")
  slots = sorted(((j + 0.5) / n, k) for k, n in enumerate(counts.astype(int)) for j in range(n))
  return tuple(k for _, k in slots)


def _as_denoiser(row: Denoiser | Mapping[str, Any]) -> Denoiser:
  return row if isinstance(row, Denoiser) else Denoiser(**dict(row))


class UL2(base.Objective):
  """UL2's mixture of denoisers for encoder-decoder and prefix-LM decoder-only models.

  Args:
    denoisers: the table: `Denoiser`s or dicts of their fields (gin writes
      dicts); default `DEFAULT_DENOISERS`.
    paradigm_tokens: 'text' tokenizes each paradigm string with the task's
      vocabulary ('[NLU]' becomes a few pieces); 'special' gives each
      distinct paradigm string its own id after the vocabulary
      (vocab_size, vocab_size + 1, ... in table order): bind
      `padded_vocab_size.extra_tokens` to their number so the model's
      embedding covers them (it stays a multiple of 128).
  """

  name = "ul2"

  def __init__(self, denoisers: Sequence[Denoiser | Mapping[str, Any]] = DEFAULT_DENOISERS,
               paradigm_tokens: str = "text"):
    self.denoisers = tuple(_as_denoiser(d) for d in denoisers)
    if not self.denoisers:
      raise ValueError("UL2 needs at least one denoiser")
    if paradigm_tokens not in PARADIGM_TOKEN_MODES:
      raise ValueError(f"paradigm_tokens must be one of {PARADIGM_TOKEN_MODES}, got "
                       f"{paradigm_tokens!r}")
    names = [d.name for d in self.denoisers]
    if len(set(names)) != len(names):
      raise ValueError(f"denoiser names must be unique: {names}")
    rates = np.array([d.rate for d in self.denoisers], dtype=np.float64)
    if (rates < 0).any() or rates.sum() <= 0:
      raise ValueError(f"denoiser rates must be >= 0 with a positive sum, got {rates.tolist()}")
    self.rates = rates / rates.sum()
    #: The denoiser of each chunk slot (`denoiser_cycle`).
    self.cycle = denoiser_cycle(self.rates)
    self.paradigm_tokens = paradigm_tokens
    # `d.is_prefix_lm`, written as the test on μ so that the type checker knows μ is a
    # float in the span-corruption branch.
    self._objectives: list[lm.PrefixLM | span_corruption.SpanCorruption] = [
        lm.PrefixLM(d.noise_density, d.prefix_split) if d.mean_noise_span_length is None
        else span_corruption.SpanCorruption(d.noise_density, d.mean_noise_span_length)
        for d in self.denoisers]
    self._paradigm_ids: list[np.ndarray] | None = None
    self._raw_lengths: list[int] | None = None
    self._vocab_size: int | None = None

  # -- set-up -----------------------------------------------------------------
  def _distinct_paradigms(self) -> list[str]:
    return list(dict.fromkeys(d.paradigm for d in self.denoisers if d.paradigm))

  def setup(self, vocabulary) -> None:
    """Tokenizes the paradigm tokens ('text') or assigns their ids ('special')."""
    self._vocab_size = int(vocabulary.vocab_size)
    ids = paradigm_token_ids(self._distinct_paradigms(), vocabulary, self.paradigm_tokens)
    self._paradigm_ids = [ids[d.paradigm] if d.paradigm else np.zeros([0], np.int32)
                          for d in self.denoisers]

  def extra_token_names(self, vocab_size: int) -> dict[int, str]:
    if self.paradigm_tokens != "special":
      return {}
    return {vocab_size + i: p for i, p in enumerate(self._distinct_paradigms())}

  def _paradigm(self, k: int) -> np.ndarray:
    if self._paradigm_ids is None:
      raise RuntimeError("UL2.setup(vocabulary) must run before transform")
    return self._paradigm_ids[k]

  def _denoiser_raw_length(self, k: int) -> int:
    if self._raw_lengths is None:
      raise RuntimeError("UL2.raw_length(feature_lengths) must run before transform")
    return self._raw_lengths[k]

  def denoiser_raw_lengths(self, feature_lengths: Mapping[str, int]) -> list[int]:
    """Chunk length of each denoiser: the longest whose inputs (with the paradigm
    tokens) and targets fit `feature_lengths`. Raises ValueError naming the
    denoiser that cannot fit."""
    for key in ("inputs", "targets"):
      if key not in feature_lengths:
        raise ValueError(f"UL2 needs TASK_FEATURE_LENGTHS[{key!r}]")
    out = []
    for k, (denoiser, objective) in enumerate(zip(self.denoisers, self._objectives)):
      lengths = dict(feature_lengths)
      lengths["inputs"] -= len(self._paradigm(k))
      try:
        out.append(objective.raw_length(lengths))
      except ValueError as error:
        raise ValueError(f"denoiser {denoiser.name}: {error}") from None
    return out

  def raw_length(self, feature_lengths: Mapping[str, int]) -> int:
    """The longest denoiser's chunk length (the feeds cut each denoiser's chunks at its
    own length: `chunk_lengths`)."""
    self._raw_lengths = self.denoiser_raw_lengths(feature_lengths)
    return max(self._raw_lengths)

  def chunk_lengths(self, feature_lengths: Mapping[str, int]) -> tuple[int, ...]:
    """One cycle of chunks: slot s has the length of its denoiser `cycle[s]`."""
    self.raw_length(feature_lengths)
    return tuple(self._denoiser_raw_length(k) for k in self.cycle)

  # -- per example ------------------------------------------------------------
  def choose(self, rng: np.random.Generator) -> int:
    """The denoiser index of a standalone example (its first draw from the example's RNG)."""
    return int(rng.choice(len(self.denoisers), p=self.rates))

  def transform_chunk(self, tokens: np.ndarray, slot: int, rng: np.random.Generator, *,
                      vocab_size: int, eos_id: int) -> dict[str, np.ndarray]:
    """A chunk the feeds cut at slot `slot` of the cycle: its denoiser `cycle[slot]`
    denoises all of it."""
    return self._denoise(self.cycle[slot], tokens, rng, vocab_size=vocab_size, eos_id=eos_id)

  def transform(self, tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
                eos_id: int) -> dict[str, np.ndarray]:
    """A standalone example: the denoiser is drawn from `rng` by the rates and uses the
    first tokens of its own length."""
    return self._denoise(self.choose(rng), tokens, rng, vocab_size=vocab_size, eos_id=eos_id)

  def _denoise(self, k: int, tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
               eos_id: int) -> dict[str, np.ndarray]:
    tokens = np.asarray(tokens, dtype=np.int32)[:self._denoiser_raw_length(k)]
    features = self._objectives[k].transform(tokens, rng, vocab_size=vocab_size, eos_id=eos_id)
    features["inputs"] = np.concatenate([self._paradigm(k), features["inputs"]]).astype(np.int32)
    features["denoiser"] = np.array(k, dtype=np.int32)
    return features

  def row_name(self, features) -> str:
    return self.denoisers[int(features["denoiser"])].name

  def example_stats(self, raw, features) -> dict[str, float]:
    k = int(features["denoiser"])
    used = np.asarray(raw)[:self._denoiser_raw_length(k)]
    without_paradigm = dict(features)
    without_paradigm["inputs"] = features["inputs"][len(self._paradigm(k)):]
    return self._objectives[k].example_stats(used, without_paradigm)
