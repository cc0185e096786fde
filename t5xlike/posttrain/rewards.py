"""Reward functions registered with seqio tasks, for on-policy preference tuning.

`posttrain.on_policy` ranks the completions it samples from the policy with
the reward registered for the training task: a Python callable
`reward(prediction: str, target: str) -> float` (higher is better), e.g. a
metric of the sample against the task's chosen completion. A task module
registers it next to its task:

    rewards.register("pref_continue", rewards.bigram_f1)

(a mixture registers one for itself). No TensorFlow, no JAX.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

Reward = Callable[[str, str], float]

_REWARDS: dict[str, Reward] = {}


def register(task_name: str, reward: Reward) -> None:
  """Registers `reward` for the task or mixture `task_name` (a second registration of the
  same function is a no-op; another function replaces it)."""
  _REWARDS[task_name] = reward


def reward_for(task_name: str) -> Reward:
  """The reward registered for `task_name`; ValueError naming the registered ones."""
  if task_name not in _REWARDS:
    known = ", ".join(sorted(_REWARDS)) or "none"
    raise ValueError(f"no reward function is registered for task {task_name!r} (on-policy "
                     f"sampling ranks its samples with one: posttrain.rewards.register"
                     f"({task_name!r}, fn)); registered: {known}")
  return _REWARDS[task_name]


def _bigrams(text: str) -> Counter:
  words = ["<s>", *text.split()]
  return Counter(zip(words, words[1:]))


def bigram_f1(prediction: str, target: str) -> float:
  """F1 of the word bigrams (the first word paired with a start marker) of `prediction`
  against `target`, in [0, 1]: order matters, so a shuffled target scores below it."""
  predicted, wanted = _bigrams(prediction), _bigrams(target)
  overlap = sum((predicted & wanted).values())
  if not overlap:
    return 0.0
  precision = overlap / sum(predicted.values())
  recall = overlap / sum(wanted.values())
  return 2 * precision * recall / (precision + recall)
