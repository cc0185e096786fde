"""Autoregressive decoding over a step function with a KV cache.

The algorithms see a model only through three things:
  step_fn(tokens int32 [n, 1], state) -> (logits float32 [n, vocab], state)
      feeds one token per row (the token just generated) and returns the
      logits of the next one; `state` is the model's pytree (KV cache,
      encoder output, ...).
  gather_rows(state, rows int32 [m]) -> state
      the state of rows `rows` (m rows; used to expand each row into beams
      and to reorder beams).
  first_logits float32 [b, vocab]: the logits of the first generated token
      (after the model has read its BOS or prompt; see the models'
      `decoding_start`).
A state must have room for max_length + 1 fed tokens: the step after the
last generated token is run (and its logits unused).

Every algorithm generates at most `max_length` tokens per row and stops a row
at `eos_id` (the EOS is kept in the output; positions after it are 0). Scores
are natural-log likelihoods under the model (log-softmax of the raw logits,
before temperature / top-k / top-p): summed over the generated tokens incl.
EOS for sampling and greedy; for beam search divided by T5X's length penalty
((5 + length) / 6) ** alpha. Everything is jit-compatible (`lax.while_loop`:
the loop ends when every row has finished).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
StepFn = Callable[[Array, Any], tuple[Array, Any]]
GatherFn = Callable[[Any, Array], Any]
NEG_INF = float(np.finfo(np.float32).min)  # -inf that stays finite in sums.

METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How `predict` chooses tokens (bind with gin: `decoding.DecodingConfig.method = 'beam'`).

  Attributes:
    method: 'greedy' (argmax), 'sample' (temperature / top-k / top-p) or
      'beam' (beam search with a length penalty).
    temperature: logits are divided by it before sampling (> 0).
    top_k: sample among the k most likely tokens (0: all).
    top_p: nucleus sampling: the smallest set of tokens whose probability
      reaches top_p (1.0: all).
    num_beams: beams per row (beam search).
    length_penalty_alpha: beam scores are log p / ((5 + length) / 6) ** alpha
      (Wu et al. 2016, as T5X); 0 ranks by log p.
  """
  method: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 4
  length_penalty_alpha: float = 0.6

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"DecodingConfig.method must be one of {METHODS}, got {self.method!r}")
    if self.temperature <= 0:
      raise ValueError(f"DecodingConfig.temperature must be > 0, got {self.temperature}")
    if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"DecodingConfig needs top_k >= 0 and 0 < top_p <= 1, got "
                       f"{self.top_k} and {self.top_p}")
    if self.num_beams < 1:
      raise ValueError(f"DecodingConfig.num_beams must be >= 1, got {self.num_beams}")


def length_penalty(length: Array | int, alpha: float) -> Array:
  """T5X's brevity penalty ((5 + length) / 6) ** alpha (1 when alpha = 0)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _largest_threshold(values: Array, holds: Callable[[Array], Array], low: Array,
                       high: Array, iterations: int = 40) -> Array:
  """Bisection per row for the largest t in [low, high] with `holds(t)` true, where
  `holds` is monotone (true at `low`, true for every t below a true t).
  values: [n, vocab]; low, high: [n, 1]. O(iterations * vocab) per row and no
  sort (XLA's CPU sort of a [32, 8192] array takes ~50 ms)."""
  def body(_, bounds):
    low, high = bounds
    middle = (low + high) / 2
    ok = holds(middle)
    return jnp.where(ok, middle, low), jnp.where(ok, high, middle)
  low, _ = jax.lax.fori_loop(0, iterations, body, (low, high))
  # Snap to the smallest value >= low: the threshold is one of the values.
  return jnp.min(jnp.where(values >= low, values, jnp.inf), axis=-1, keepdims=True)


def filter_logits(logits: Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """Logits [n, vocab] divided by `temperature` with everything outside the
  top-k / top-p (nucleus) set at NEG_INF; the most likely token always stays.

  The k-th largest logit and the nucleus threshold (the smallest probability
  p* such that the tokens with p >= p* hold at least top_p of the mass) are
  found by bisection (exact up to values closer than 2^-40 of the range;
  tokens tied at the threshold are all kept).
  """
  logits = logits.astype(jnp.float32) / temperature
  top = jnp.max(logits, axis=-1, keepdims=True)
  if top_k and top_k < logits.shape[-1]:
    bottom = jnp.min(logits, axis=-1, keepdims=True)
    kth = _largest_threshold(
        logits, lambda t: jnp.sum(logits >= t, axis=-1, keepdims=True) >= top_k, bottom, top)
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    probs = jax.nn.softmax(logits, axis=-1)
    rows = logits.shape[0]
    threshold = _largest_threshold(
        probs, lambda t: jnp.sum(jnp.where(probs >= t, probs, 0.0), axis=-1,
                                 keepdims=True) >= top_p,
        jnp.zeros((rows, 1), jnp.float32), jnp.max(probs, axis=-1, keepdims=True))
    logits = jnp.where(probs < threshold, NEG_INF, logits)
  return logits


def sample(step_fn: StepFn, state: Any, first_logits: Array, max_length: int, eos_id: int,
           rng: Array | None = None, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False) -> tuple[Array, Array]:
  """Greedy decoding (`greedy=True`) or sampling, one token per row per step.

  Args:
    step_fn: (tokens int32 [b, 1], state) -> (logits [b, vocab], state): one decoder
      step with the KV cache in `state`.
    state: the decoding state after the prompt (`model.decoding_start`).
    first_logits: [b, vocab] logits of the first generated token.
    max_length: tokens generated per row at most.
    eos_id: generation of a row stops after this id (kept in the output).
    rng: the sampling key (token t uses fold_in(rng, t)); required unless greedy.
    temperature, top_k, top_p: how logits are filtered before sampling
      (`filter_logits`; 0 / 1.0 turn top-k / top-p off).
    greedy: take the argmax instead of sampling.

  Returns:
    tokens int32 [b, max_length] (EOS kept, 0 after it) and scores float32
    [b], the summed log-likelihood of each row's generated tokens.
  """
  batch = first_logits.shape[0]
  if not greedy and rng is None:
    raise ValueError("sampling needs an rng")
  rng = jax.random.key(0) if rng is None else rng

  def body(carry):
    t, logits, state, tokens, scores, done = carry
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if greedy:
      chosen = jnp.argmax(logits, axis=-1)
    else:
      filtered = filter_logits(logits, temperature, top_k, top_p)
      chosen = jax.random.categorical(jax.random.fold_in(rng, t), filtered, axis=-1)
    chosen = jnp.where(done, 0, chosen).astype(jnp.int32)
    picked = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(done, 0.0, picked)
    tokens = tokens.at[:, t].set(chosen)
    done = done | (chosen == eos_id)
    logits, state = step_fn(chosen[:, None], state)
    return t + 1, logits, state, tokens, scores, done

  def cond(carry):
    t, done = carry[0], carry[-1]
    return (t < max_length) & ~jnp.all(done)

  carry = (jnp.int32(0), first_logits.astype(jnp.float32), state,
           jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((batch,), jnp.float32),
           jnp.zeros((batch,), jnp.bool_))
  _, _, _, tokens, scores, _ = jax.lax.while_loop(cond, body, carry)
  return tokens, scores


def beam_search(step_fn: StepFn, state: Any, first_logits: Array, max_length: int,
                eos_id: int, num_beams: int, gather_rows: GatherFn,
                alpha: float = 0.6) -> tuple[Array, Array]:
  """Beam search with T5X's length penalty.

  Each step extends every live beam by every token, keeps the 2k best
  extensions, moves those among the k best that end in EOS (or reach
  `max_length`) to the finished set (score = log p / length_penalty) and
  keeps the k best extensions not ending in EOS alive (one beam with
  alpha = 0 is greedy decoding). A row stops when its worst finished score beats
  the best score any live beam could still reach.

  Args:
    step_fn: (tokens int32 [b * k, 1], state) -> (logits [b * k, vocab], state).
    state: the decoding state of the b rows after the prompt (repeated k times here).
    first_logits: [b, vocab] logits of the first generated token.
    max_length: tokens generated per beam at most.
    eos_id: a beam ending in this id is finished.
    num_beams: k, beams kept per row.
    gather_rows: (state, rows int32 [m]) -> the state of those rows (beam reordering).
    alpha: the length penalty's exponent (`length_penalty`; T5X's default 0.6).

  Returns:
    tokens int32 [b, k, max_length] and scores float32 [b, k] of the k best
    finished sequences, best first (score NEG_INF where fewer than k exist).
  """
  batch, k, length = first_logits.shape[0], num_beams, max_length
  state = gather_rows(state, jnp.repeat(jnp.arange(batch, dtype=jnp.int32), k))
  logits = jnp.repeat(first_logits.astype(jnp.float32), k, axis=0)
  alive_seq = jnp.zeros((batch, k, length), jnp.int32)
  alive_logp = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  done_seq = jnp.zeros((batch, k, length), jnp.int32)
  done_score = jnp.full((batch, k), NEG_INF, jnp.float32)
  beam_offsets = (jnp.arange(batch, dtype=jnp.int32) * k)[:, None]

  def body(carry):
    t, logits, state, alive_seq, alive_logp, done_seq, done_score = carry
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
    candidates = (alive_logp[:, :, None] + log_probs).reshape(batch, k * vocab)
    cand_logp, cand_index = jax.lax.top_k(candidates, 2 * k)
    cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
    cand_seq = jnp.take_along_axis(alive_seq, cand_beam[:, :, None], axis=1)
    cand_seq = cand_seq.at[:, :, t].set(cand_token)
    live = cand_logp > NEG_INF / 2
    # Only the k best extensions may finish (as HF's beam search), so one beam
    # without a length penalty is greedy decoding.
    in_top_k = jnp.arange(2 * k)[None, :] < k
    finishing = live & in_top_k & ((cand_token == eos_id) | (t == length - 1))
    live_ending = live & (cand_token == eos_id)
    # Finished: merge the new ones into the k best so far.
    new_score = jnp.where(finishing, cand_logp / length_penalty(t + 1, alpha), NEG_INF)
    all_score = jnp.concatenate([done_score, new_score], axis=1)
    all_seq = jnp.concatenate([done_seq, cand_seq], axis=1)
    done_score, keep = jax.lax.top_k(all_score, k)
    done_seq = jnp.take_along_axis(all_seq, keep[:, :, None], axis=1)
    # Alive: the k best extensions that did not finish.
    alive_logp, keep = jax.lax.top_k(jnp.where(finishing | live_ending, NEG_INF, cand_logp), k)
    alive_seq = jnp.take_along_axis(cand_seq, keep[:, :, None], axis=1)
    source_beam = jnp.take_along_axis(cand_beam, keep, axis=1)
    state = gather_rows(state, (beam_offsets + source_beam).reshape(-1))
    current = jnp.take_along_axis(cand_token, keep, axis=1).reshape(-1)
    logits, state = step_fn(current[:, None], state)
    return t + 1, logits, state, alive_seq, alive_logp, done_seq, done_score

  def cond(carry):
    t, alive_logp, done_score = carry[0], carry[4], carry[6]
    best_reachable = alive_logp[:, 0] / length_penalty(length, alpha)
    finished = done_score[:, -1] >= best_reachable
    return (t < length) & ~jnp.all(finished)

  carry = (jnp.int32(0), logits, state, alive_seq, alive_logp, done_seq, done_score)
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[5], carry[6]


def decode(config: DecodingConfig, step_fn: StepFn, state: Any, first_logits: Array,
           max_length: int, eos_id: int, gather_rows: GatherFn,
           rng: Array | None = None) -> tuple[Array, Array]:
  """Runs the method of `config`: tokens int32 [b, max_length] and scores float32 [b]
  (beam search: the best beam and its length-penalised score).

  Args:
    config: greedy, sampling (temperature, top-k, top-p) or beam search.
    step_fn, state, first_logits, max_length, eos_id: as `sample`'s.
    gather_rows: as `beam_search`'s (used by beam search only).
    rng: the sampling key (sampling only).
  """
  if config.method == "beam":
    tokens, scores = beam_search(step_fn, state, first_logits, max_length, eos_id,
                                 config.num_beams, gather_rows, config.length_penalty_alpha)
    return tokens[:, 0], scores[:, 0]
  return sample(step_fn, state, first_logits, max_length, eos_id, rng=rng,
                temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                greedy=config.method == "greedy")


def trim_after_eos(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
  """Rows of generated ids [b, L] -> lists ending at (and keeping) the first EOS."""
  rows = []
  for row in np.asarray(tokens).tolist():
    rows.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
  return rows
