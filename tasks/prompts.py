"""Prompt templates chosen per example by a seeded hash of its content.

P3 (T0) and FLAN write several templates ("prompts") per dataset and render
each example with one of them, drawn at random each time the example is
read. Here the template of an example is chosen by a hash of a seed and the
example's fields instead:

    template_id = Fingerprint64(f"{seed}\\x1f{field_1}\\x1f...\\x1f{field_n}") mod len(templates)

(`tf.strings.to_hash_bucket_fast`, fields in sorted order of their names).
The choice is a *deterministic* preprocessor: it runs before
`seqio.CacheDatasetPlaceholder()`, is written into a task cache, and gives
every example the same prompt in every epoch, after a restart and on every
process (t5xlike refuses random preprocessors after the placeholder). Over a
split the templates are used about equally often. Another seed gives another
assignment, e.g. to hold a template out.

    TEMPLATES = [Template("Reverse the words: {phrase}", "{reversed}"),
                 Template("{phrase} -- backwards:", "{reversed}")]
    preprocessors = [prompts.apply_templates(TEMPLATES, seed=0),
                     seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(), ...]

A template is a pair of Python format strings whose `{field}` placeholders
name string features of the example; the preprocessor outputs the string
features `inputs` and `targets` and the int32 scalar `template_id` (kept by
seqio, dropped by t5xlike's readers, which keep token features only).
"""
from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping, Sequence

import tensorflow as tf

SEPARATOR = "\x1f"  # ASCII unit separator between the hashed fields.


@dataclasses.dataclass(frozen=True)
class Template:
  """A prompt: format strings for `inputs` and `targets` with `{field}` placeholders."""
  inputs: str
  targets: str

  def __post_init__(self):
    for text in (self.inputs, self.targets):
      for _, name, spec, conversion in string.Formatter().parse(text):
        if name is not None and (not name.isidentifier() or spec or conversion):
          raise ValueError(f"template {text!r}: placeholders are plain {{field}} names, "
                           f"got {{{name}{'!' + conversion if conversion else ''}"
                           f"{':' + spec if spec else ''}}}")

  @property
  def fields(self) -> tuple[str, ...]:
    """The field names used by inputs and targets, sorted."""
    names = {name for text in (self.inputs, self.targets)
             for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    return tuple(sorted(names))

  def render(self, example: Mapping[str, str]) -> dict[str, str]:
    """{'inputs', 'targets'} of one example in Python (the reference of `_render_tf`)."""
    return {"inputs": self.inputs.format(**example), "targets": self.targets.format(**example)}


def hashed_fields(templates: Sequence[Template]) -> tuple[str, ...]:
  """The fields the template choice hashes: those of all templates, sorted."""
  return tuple(sorted({name for template in templates for name in template.fields}))


def hash_key(example: Mapping[str, str], fields: Sequence[str], seed: int) -> str:
  """The string hashed to choose a template (Python mirror of the TensorFlow key)."""
  return SEPARATOR.join([str(seed)] + [example[name] for name in fields])


def template_index(example: Mapping[str, str], templates: Sequence[Template], seed: int = 0
                   ) -> int:
  """The template `apply_templates(templates, seed)` picks for an example (eager TensorFlow)."""
  key = hash_key(example, hashed_fields(templates), seed)
  return int(tf.strings.to_hash_bucket_fast(key, len(templates)).numpy())


def _format_tf(text: str, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """`text.format(**features)` on scalar string tensors."""
  parts = []
  for literal, name, _, _ in string.Formatter().parse(text):
    if literal:
      parts.append(tf.constant(literal))
    if name is not None:
      parts.append(features[name])
  return tf.strings.join(parts) if parts else tf.constant("")


def apply_templates(templates: Sequence[Template], seed: int = 0):
  """A seqio preprocessor rendering each example with its hashed template.

  Args:
    templates: at least one Template; their fields must be scalar string
      features of the dataset.
    seed: part of the hashed key (an int; the same seed, the same choice).

  Returns:
    `fn(dataset) -> dataset` mapping each example to {'inputs': string [],
    'targets': string [], 'template_id': int32 []}, in order.
  """
  templates = tuple(templates)
  if not templates:
    raise ValueError("apply_templates needs at least one template")
  fields = hashed_fields(templates)

  def render(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    missing = [name for name in fields if name not in example]
    if missing:
      raise ValueError(f"templates use fields {missing} that the examples lack "
                       f"(they have {sorted(example)})")
    key = tf.strings.join([tf.constant(str(seed))] + [example[name] for name in fields],
                          separator=SEPARATOR)
    index = tf.strings.to_hash_bucket_fast(key, len(templates))
    rendered = {feature: tf.gather(tf.stack([_format_tf(getattr(t, feature), example)
                                             for t in templates]), index)
                for feature in ("inputs", "targets")}
    return {**rendered, "template_id": tf.cast(index, tf.int32)}

  def render_templates(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(render, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return render_templates
