"""On-policy preference data: completions sampled from the policy being trained, every K steps.

Tajwar et al. 2024 ("Preference Fine-Tuning of LLMs Should Leverage
Suboptimal, On-Policy Data", §4-5) find that preference losses with a
negative gradient work best on samples of the current policy, ranked by a
reward. `OnPolicySampling` (gin: `train_run.train.on_policy`) wraps the
pairwise training feed in an `OnPolicyFeed` (an `interfaces.PolicySampledFeed`:
the training loop shows it the parameters before every step) that, every
`every_steps` steps, with the parameters of that step:

1. reads the next K batches of the task (prompt, chosen, rejected);
2. samples `num_samples` completions per prompt from the policy with the
   existing decoding code (`predict_batch`: temperature / top-k sampling,
   KV cache), seeded by (seed, step, batch);
3. ranks them with the reward registered for the task
   (`posttrain.rewards`, e.g. bigram F1 against the chosen completion):
   the worst sample becomes the rejected completion; with `sample_chosen`
   the best becomes the chosen one (else the task's chosen is kept);
4. serves those K batches, one per step.

Its state (the K batches' base-feed position, how many were served and the
sampled token ids) is part of `get_state()`, hence of every checkpoint: a run
killed at any step and resumed re-reads the round's batches and lays the
saved samples over them, so it trains on exactly the batches an
uninterrupted run trains on (the fault drill checks it bit for bit). A round
starts when the previous one is used up, counted from the run's first step.
Needs unpacked batches (DataConfig.pack=False), one process (the samples of a
multi-process run are not gathered per process yet), and an in-model
reference or a reference-free loss (precomputed reference log-likelihoods
would not match the samples).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from t5xlike import errors, interfaces
from t5xlike.data import feature_converters, pairwise
from t5xlike.inference import decoding
from t5xlike.posttrain import preference, rewards

log = logging.getLogger(__name__)

#: Format version of the sampler's part of `get_state()`.
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class OnPolicySampling:
  """How the rejected (and optionally chosen) completions are sampled from the policy.

  Attributes:
    every_steps: K, steps between two samplings (each samples K batches).
    num_samples: completions sampled per prompt and ranked by the reward.
    sample_chosen: the best sample replaces the task's chosen completion too.
    temperature: sampling temperature.
    top_k: sample among the k most likely tokens (0: all).
    seed: the samples' seed (with the step and the batch index).
  """
  every_steps: int = 8
  num_samples: int = 2
  sample_chosen: bool = False
  temperature: float = 1.0
  top_k: int = 0
  seed: int = 0

  def wrap(self, feed: interfaces.DataFeed, model: Any, trainer: Any, pack: bool,
           task_name: str) -> OnPolicyFeed:
    """The on-policy feed around a pairwise training feed; ConfigError (one line) when the
    run cannot sample (see the module docstring).

    Args:
      feed: the pairwise training feed.
      model: the run's model (a `preference.PreferenceModel`).
      trainer: the run's `training.trainer.Trainer` (mesh, device batches).
      pack: DataConfig.pack.
      task_name: MIXTURE_OR_TASK_NAME (its registered reward ranks the samples).
    """
    errors.require_int("on_policy every_steps", self.every_steps)
    errors.require_int("on_policy num_samples", self.num_samples)
    if not isinstance(model, preference.PreferenceModel):
      raise errors.ConfigError("on-policy sampling needs a preference model "
                               "(train_run.train.model = @preference.PreferenceModel())")
    if model.loss.needs_reference and model.reference is None:
      raise errors.ConfigError("on-policy sampling needs the reference in the run "
                               "(PreferenceModel.reference): precomputed reference "
                               "log-probabilities do not cover the samples")
    if pack:
      raise errors.ConfigError("on-policy sampling needs DataConfig.pack=False")
    if jax.process_count() > 1:
      raise errors.ConfigError("on-policy sampling runs on one process only (for now)")
    try:
      reward = rewards.reward_for(task_name)
    except ValueError as error:
      raise errors.ConfigError(errors.one_line(error)) from None
    return OnPolicyFeed(feed, model, trainer, self, reward)


def _prompt_and_completion(side: Mapping[str, np.ndarray], row: int,
                           converter: str) -> tuple[np.ndarray, np.ndarray]:
  """(prompt ids, completion ids) of one row of one side of an unpacked pairwise batch
  (EOS included as the pipeline appended it)."""
  targets = np.asarray(side["decoder_target_tokens"][row])
  completion = targets[np.asarray(side["decoder_loss_weights"][row]) > 0]
  if converter == "decoder":  # prefix-LM rows: the prompt is the first len(inputs) positions
    prompt = targets[:int(np.sum(side["decoder_causal_attention"][row])) - 1]
  else:
    tokens = np.asarray(side["encoder_input_tokens"][row])
    prompt = tokens[tokens > 0]
  return prompt.astype(np.int32), completion.astype(np.int32)


class OnPolicyFeed:
  """A pairwise feed whose completions are sampled from the policy (module docstring);
  an `interfaces.PolicySampledFeed`.

  Args:
    feed: the pairwise training feed it reads prompts from.
    model: the `preference.PreferenceModel` trained.
    trainer: the run's trainer (its mesh and device batches).
    config: the sampling settings.
    reward: reward(sample text, chosen text) -> float.
  """

  def __init__(self, feed: interfaces.DataFeed, model: preference.PreferenceModel,
               trainer: Any, config: OnPolicySampling, reward: Callable[[str, str], float]):
    self.base = feed
    self.model = model
    self.trainer = trainer
    self.config = config
    self.reward = reward
    self.batch_size = feed.batch_size
    self.feature_lengths = dict(feed.feature_lengths)
    self.task = feed.task
    self.vocabulary = feed.vocabulary
    self.converter = pairwise.base_converter(model.feature_converter)
    self.convert = feature_converters.get_converter(model.feature_converter)
    self.max_length = pairwise.side_lengths(self.feature_lengths)["targets"]
    self.eos_id = int(self.vocabulary.eos_id)
    method = decoding.DecodingConfig(method="sample", temperature=config.temperature,
                                     top_k=config.top_k)
    self._predict = jax.jit(functools.partial(model.predict_batch, config=method,
                                              max_length=self.max_length, eos_id=self.eos_id))
    self._round: dict[str, Any] | None = None  # start, base_state, served, samples
    self._batches: list[dict[str, np.ndarray]] = []

  # -- the loop's hook ------------------------------------------------------------------------
  def observe_policy(self, step: int, params: Any) -> None:
    """Samples a new round of K batches with `params` (the parameters after `step`
    updates) when the current round is used up (or there is none)."""
    if self._round is not None and self._round["served"] < self.config.every_steps:
      return
    base_state = self.base.get_state()
    batches = [next(self.base) for _ in range(self.config.every_steps)]
    samples = [self._sample(batch, params, step, index) for index, batch in enumerate(batches)]
    self._round = {"start": step, "base_state": base_state, "served": 0, "samples": samples}
    self._batches = [self._overlay(batch, sample) for batch, sample in zip(batches, samples)]
    log.debug("on-policy round at step %d: %d batches sampled", step, len(batches))

  # -- sampling -------------------------------------------------------------------------------
  def _sample(self, batch: Mapping[str, np.ndarray], params: Any, step: int,
              index: int) -> dict[str, Any]:
    """{'rejected': ids per row[, 'chosen': ids per row], 'rewards': [mean reward of the
    worst sample, of the best]}, chosen among num_samples samples per row."""
    n = self.config.num_samples
    prompts = {k: np.repeat(np.asarray(v), n, axis=0)
               for k, v in pairwise.side_features(batch, "chosen").items()}
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), step), index)
    with self.trainer.partitioner.activate():
      tokens, _ = self._predict(params, self.trainer.device_batch(prompts), rng=rng)
    tokens = np.asarray(jax.device_get(tokens))
    rows = len(tokens) // n
    side = pairwise.side_features(batch, "chosen")
    worst, best, rejected_rewards, chosen_rewards = [], [], [], []
    for row in range(rows):
      chosen_ids = _prompt_and_completion(side, row, self.converter)[1]
      target = self.vocabulary.decode([int(i) for i in chosen_ids if i != self.eos_id])
      ids = [self._trimmed(tokens[row * n + j]) for j in range(n)]
      scores = [self.reward(self.vocabulary.decode([i for i in s if i != self.eos_id]), target)
                for s in ids]
      order = np.argsort(scores, kind="stable")
      worst.append(ids[int(order[0])])
      best.append(ids[int(order[-1])])
      rejected_rewards.append(scores[int(order[0])])
      chosen_rewards.append(scores[int(order[-1])])
    out: dict[str, Any] = {"rejected": worst, "rewards": [float(np.mean(rejected_rewards)),
                                                          float(np.mean(chosen_rewards))]}
    if self.config.sample_chosen:
      out["chosen"] = best
    return out

  def _trimmed(self, ids: np.ndarray) -> list[int]:
    """Generated ids up to and including the first EOS (all of them without one); a
    generated padding id 0 is dropped (it would read as padding in the batch)."""
    out = []
    for i in ids:
      if i:
        out.append(int(i))
      if i == self.eos_id:
        break
    return out

  def _overlay(self, batch: Mapping[str, np.ndarray],
               samples: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The batch with the sampled completions in place of the task's."""
    sides = {side: pairwise.side_features(batch, side) for side in pairwise.SIDES}
    examples = []
    for row in range(len(samples["rejected"])):
      prompt, chosen = _prompt_and_completion(sides["chosen"], row, self.converter)
      example = {"inputs": prompt, "chosen": chosen,
                 "rejected": np.asarray(samples["rejected"][row], np.int32)}
      if "chosen" in samples:
        example["chosen"] = np.asarray(samples["chosen"][row], np.int32)
      examples.append(example)
    return self.convert(examples, self.feature_lengths)

  # -- interfaces.DataFeed --------------------------------------------------------------------
  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._round is None:  # (before the first step: a look at the batch shapes)
      return next(self.base)
    if self._round["served"] >= len(self._batches):
      raise RuntimeError("the on-policy round is used up: observe_policy must run first")
    batch = self._batches[self._round["served"]]
    self._round["served"] += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """The base feed's position and the current round (JSON-able: ids as lists)."""
    return {"on_policy_version": STATE_VERSION, "base": self.base.get_state(),
            "round": None if self._round is None else dict(self._round)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `get_state()`: the round's batches are re-read from the base feed
    and the saved samples laid over them."""
    if state.get("on_policy_version") != STATE_VERSION:
      raise ValueError("the checkpoint's data state was not written by an on-policy run (or "
                       "by another version): start a new MODEL_DIR from the checkpoint with "
                       "INITIAL_CHECKPOINT_PATH")
    saved = state["round"]
    if saved is None:
      self._round, self._batches = None, []
      self.base.set_state(state["base"])
      return
    self.base.set_state(saved["base_state"])
    batches = [next(self.base) for _ in range(len(saved["samples"]))]
    self._batches = [self._overlay(b, s) for b, s in zip(batches, saved["samples"])]
    self._round = {**saved, "samples": [dict(s) for s in saved["samples"]]}

  def metrics(self) -> dict[str, float]:
    """The base feed's figures and the mean rewards of the batch served last (rejected:
    the worst sample's, best: the best sample's)."""
    out = dict(self.base.metrics())
    if self._round is not None and self._round["served"]:
      worst, best = self._round["samples"][self._round["served"] - 1]["rewards"]
      out.update(on_policy_rejected_reward=worst, on_policy_best_reward=best)
    return out

  def close(self) -> None:
    self.base.close()
