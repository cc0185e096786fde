"""Registering multitask mixtures with examples-proportional, capped, tempered rates.

    add_mixture("my_mix", ["task_a", "task_b"], maximum=100_000, temperature=2.0)

registers the seqio mixture of those tasks with the rate of each task

    rate = min(num_examples, maximum) ** (1 / temperature)

(T5 §3.5.2 "examples-proportional mixing" with its cap K, temperature
scaling as in T5 and mT5; T0 and FLAN cap each task's examples). The rates are
`t5xlike.data.mixing.num_examples` objects: t5xlike's pipeline evaluates them
with the example count of the split it reads (train for training, the eval
split for evaluation).
"""
from __future__ import annotations

from collections.abc import Sequence

import seqio

from t5xlike.data import mixing


def add_mixture(name: str, tasks: Sequence[str], maximum: float | None = None,
                temperature: float = 1.0) -> seqio.Mixture:
  """Registers the mixture `name` of `tasks` with capped, tempered rates.

  Args:
    name: the mixture's name.
    tasks: names of registered tasks (not mixtures: t5xlike evaluates these rates
      with a task's own example count).
    maximum: the cap on each task's example count (None: no cap).
    temperature: T in count ** (1 / T); 1 is examples-proportional.

  Re-registering a name with the same tasks and rates returns the existing
  mixture (importing a task module twice is harmless); other tasks or rates
  under a registered name are a ValueError.
  """
  rate = mixing.num_examples(maximum=maximum, temperature=temperature)
  if name in seqio.MixtureRegistry.names():
    existing = seqio.MixtureRegistry.get(name)
    registered = dict(existing.rate_per_task_name)
    if registered != {task: rate for task in tasks}:
      raise ValueError(f"mixture {name!r} is already registered with other tasks or rates: "
                       f"{registered}")
    return existing
  return seqio.MixtureRegistry.add(name, list(tasks), default_rate=rate)
