"""A t5xlike checkpoint as an lm-evaluation-harness model: `HarnessLM`, registered
with lm_eval as "t5xlike" (the optional extra `lm_eval`).

The harness asks for three things, each served through `Predictor` (batched to
BATCH_SIZE, fixed TASK_FEATURE_LENGTHS, parameters on the mesh):

- `loglikelihood((context, continuation))` -> (log p(continuation | context),
  is_greedy): `Predictor.score` of the row `inference.harness_requests` lays out
  (encoder-decoder: the context is the encoder input; decoder-only: the prefix,
  or with DECODER_CONTEXT='causal' the tokens before the continuation); is_greedy:
  every continuation token is the argmax of the model's logits.
- `loglikelihood_rolling((text,))` -> log p(text): the text's ids in windows of
  TASK_FEATURE_LENGTHS['targets'] (causal: 'targets' - 1), cut by the harness's
  `get_rolling_token_windows`; each window is a continuation whose context is
  every id before it (the first window's: empty, so an encoder-decoder's
  encoder reads EOS alone, the ids `infer` makes of the inputs text ""); the sum
  of the windows' log-likelihoods.
- `generate_until((context, {"until": [...], "max_gen_toks": N}))` -> text:
  `Predictor.predict` with the configured decoding (greedy by default; the
  request's `do_sample` / `temperature` are not read), at most N tokens (default
  256), the text cut at the first `until` string. Decoder-only models generate from
  the context as a prefix.

A continuation longer than TASK_FEATURE_LENGTHS['targets'], or generation with
DECODER_CONTEXT='causal', is a ConfigError naming the harness task.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lm_eval import utils as lm_eval_utils
from lm_eval.api import model as lm_eval_model, registry

from t5xlike import errors
from t5xlike.inference import decoding
from t5xlike.inference.harness_requests import RequestEncoder, Scoring, cut_at
from t5xlike.inference.predictor import Predictor

log = logging.getLogger(__name__)

#: The tokens generated when a request gives no `max_gen_toks` (the harness's default).
DEFAULT_MAX_GEN_TOKS = 256
#: DECODER_CONTEXT values: how a decoder-only model reads the context.
DECODER_CONTEXTS = ("prefix", "causal")


def layout_of(model: Any, decoder_context: str) -> str:
  """The `harness_requests` layout of `model`: 'encoder_decoder' for the
  encoder-decoder feature converter, else `decoder_context` ('prefix' or 'causal')
  for the decoder-only one; ConfigError for other models."""
  if decoder_context not in DECODER_CONTEXTS:
    raise errors.ConfigError(f"DECODER_CONTEXT must be one of {DECODER_CONTEXTS}, got "
                             f"{decoder_context!r}")
  converter = getattr(model, "feature_converter", None)
  if converter == "encoder_decoder":
    return "encoder_decoder"
  if converter == "decoder":
    return decoder_context
  raise errors.ConfigError(f"MODEL {type(model).__name__} (feature converter {converter!r}) "
                           f"is not an encoder-decoder or decoder-only language model")


@registry.register_model("t5xlike")
class HarnessLM(lm_eval_model.LM):
  """A t5xlike model and its parameters, serving the harness's requests.

  Args:
    model: a token model (encoder-decoder or decoder-only) with its VOCABULARY.
    params: its parameters (`checkpoint_loading.load_model_checkpoint`).
    feature_lengths: TASK_FEATURE_LENGTHS: 'inputs' (context ids + EOS, cut from the
      left) and 'targets' (continuation ids; causal: context and continuation).
    batch_size: rows per compiled call (BATCH_SIZE).
    decoding_config: how `generate_until` chooses tokens (default greedy).
    decoder_context: decoder-only models: 'prefix' or 'causal' (DECODER_CONTEXT).
    seed: the sampling seed (RANDOM_SEED).
  """

  def __init__(self, model: Any, params: Any, feature_lengths: Mapping[str, int],
               batch_size: int, decoding_config: decoding.DecodingConfig | None = None,
               decoder_context: str = "prefix", seed: int = 0):
    super().__init__()
    if model.vocabulary is None:
      raise errors.ConfigError("the harness sends text: MODEL needs a VOCABULARY")
    try:
      self.requests = RequestEncoder(model.vocabulary, dict(feature_lengths),
                                     layout_of(model, decoder_context))
    except ValueError as error:
      raise errors.ConfigError(errors.one_line(error)) from None
    self.model, self.params = model, params
    self.feature_lengths, self.batch_size = dict(feature_lengths), batch_size
    self.decoding_config = decoding_config or decoding.DecodingConfig()
    self.seed = seed
    self._scorer = Predictor(model, params, self.feature_lengths, batch_size,
                             eos_id=self.requests.eos_id, progress="lm_eval: loglikelihood")
    self._generators: dict[int, Predictor] = {}  # max_gen_toks -> its Predictor
    self._warned_sampling = False

  # -- loglikelihood ----------------------------------------------------------------------
  def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
    """(summed log-likelihood of the continuation, whether it is the greedy one) per
    request; `Instance.args` = (context, continuation)."""
    pairs = [self.requests.encode_pair(*request.args) for request in requests]
    tasks = [request.task_name for request in requests]
    _warn_cut(tasks, [self.requests.truncated(*pair) for pair in pairs], "scored")
    results = self._score(pairs, tasks)
    for request, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", request.args, result)
    return results

  def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
    """The log-likelihood of each request's whole text (`Instance.args` = (text,)), scored
    in windows (module docstring)."""
    window = self.feature_lengths["targets"] - (self.requests.layout == "causal")
    if window < 1:
      raise errors.ConfigError("TASK_FEATURE_LENGTHS['targets'] is too short to score text")
    keep = max(self.feature_lengths.values())  # (no row holds more of the text before)
    pairs, owners, tasks = [], [], []
    for index, request in enumerate(requests):
      tokens = self.requests.encode(request.args[0])
      start = 0
      for _, chunk in lm_eval_utils.get_rolling_token_windows(
          token_list=tokens, prefix_token=self.requests.eos_id, max_seq_len=window,
          context_len=1):
        pairs.append((tokens[max(start - keep, 0):start], chunk))
        owners.append(index)
        tasks.append(request.task_name)
        start += len(chunk)
    totals = [0.0] * len(requests)
    for owner, (value, _) in zip(owners, self._score(pairs, tasks)):
      totals[owner] += value
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def _score(self, pairs: Sequence[tuple[list[int], list[int]]],
             tasks: Sequence[str | None]) -> list[tuple[float, bool]]:
    rows: list[Scoring] = []
    for (context, continuation), task in zip(pairs, tasks):
      try:
        rows.append(self.requests.scoring(context, continuation))
      except ValueError as error:
        raise errors.ConfigError(f"harness task {task!r}: {errors.one_line(error)}: raise "
                                 f"it") from None
    if not rows:
      return []
    out = []
    for row, score in zip(rows, self._scorer.score([row.example for row in rows], greedy=True)):
      first = len(score.token_scores) - row.scored
      greedy = score.greedy or []
      out.append((math.fsum(score.token_scores[first:]), all(greedy[first:])))
    return out

  # -- generation --------------------------------------------------------------------------
  def generate_until(self, requests: Sequence[Any]) -> list[str]:
    """The generated text of each request (`Instance.args` = (context, generation
    kwargs)), cut at the first of its `until` strings."""
    jobs: dict[int, list[int]] = {}  # max_gen_toks -> request indices
    prompts, stops, cut = [], [], []
    for index, request in enumerate(requests):
      context, kwargs = request.args[0], dict(request.args[1] or {})
      until = kwargs.get("until") or []
      stops.append([until] if isinstance(until, str) else list(until))
      if kwargs.get("do_sample") and not self._warned_sampling:
        log.warning("harness task %s asks to sample: the configured decoding (%s) is used",
                    request.task_name, self.decoding_config.method)
        self._warned_sampling = True
      try:
        context_ids = self.requests.encode(context)
        prompts.append(self.requests.prompt(context_ids))
        cut.append(self.requests.truncated(context_ids, []))
      except ValueError as error:
        raise errors.ConfigError(f"harness task {request.task_name!r}: DECODER_CONTEXT="
                                 f"'causal' cannot generate ({errors.one_line(error)})") from None
      jobs.setdefault(int(kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS), []).append(index)
    _warn_cut([request.task_name for request in requests], cut, "generated from")
    texts = [""] * len(requests)
    for max_tokens, indices in jobs.items():
      predictions = self._generator(max_tokens).predict([{"inputs": prompts[i]}
                                                         for i in indices])
      for index, prediction in zip(indices, predictions):
        texts[index] = cut_at(self.requests.decode(prediction.ids), stops[index])
        self.cache_hook.add_partial("generate_until", requests[index].args, texts[index])
    return texts

  def _generator(self, max_tokens: int) -> Predictor:
    """The Predictor that generates up to `max_tokens` tokens (one compilation each)."""
    if max_tokens not in self._generators:
      self._generators[max_tokens] = Predictor(
          self.model, self.params, self.feature_lengths, self.batch_size, self.decoding_config,
          max_decode_length=max_tokens, eos_id=self.requests.eos_id, seed=self.seed,
          progress="lm_eval: generate_until")
    return self._generators[max_tokens]


def _warn_cut(tasks: Sequence[str | None], cut: Sequence[bool], what: str) -> None:
  """One warning per task whose contexts lost ids from the left to fit
  TASK_FEATURE_LENGTHS (the harness would have read them whole)."""
  counts: dict[str | None, list[int]] = {}
  for task, was_cut in zip(tasks, cut):
    counts.setdefault(task, [0, 0])[0] += int(was_cut)
    counts[task][1] += 1
  for task, (number, total) in counts.items():
    if number:
      log.warning("harness task %s: %d of %d contexts %s were cut from the left to fit "
                  "TASK_FEATURE_LENGTHS (raise it to keep them whole)", task, number, total,
                  what)
