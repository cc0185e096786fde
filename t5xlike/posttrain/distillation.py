"""Knowledge distillation as a model: a student, a frozen teacher, token-level KL and MiniLM.

`DistillationModel` is an `interfaces.Model` the existing trainer compiles
(no second loop): the batch is the student's own (any task or pretraining
objective), the frozen teacher (`posttrain.frozen`: `teacher/...` in the same
parameter tree, from `teacher_checkpoint_path`, any size, same vocabulary)
reads the same batch in the same step, and the loss per target token is

  L = (1 - alpha) CE(y, p_S) + alpha T^2 D(p_T^T, p_S^T) + gamma L_rel

- Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network", §2):
  p^T = softmax(z / T) at temperature T, the soft-target term scaled by T^2
  so that its gradients keep their size as T changes, mixed with the
  cross entropy of the true labels (CE includes the student's z-loss);
- D is the forward KL(p_T || p_S) (Hinton's), or with `divergence='reverse'`
  KL(p_S || p_T), mode-seeking (Gu et al. 2024, "MiniLLM: Knowledge
  Distillation of Large Language Models", §2.1), summed over the vocabulary
  at every scored target position;
- L_rel (`SelfAttentionRelations`), MiniLM's deep self-attention
  distillation (Wang et al. 2020, "MiniLM", §3.1 attention distributions,
  §3.2 value relations): the last
  layer's self-attention distributions and value relations of a stack
  (`encoder`: encoder-only and encoder-decoder models), KL(teacher ||
  student) averaged over relation heads and query positions,

    L_AT = 1/(A_r |x|) sum_a sum_t KL(A^T_{a,t} || A^S_{a,t}),  A = softmax(Q K^T / sqrt(d_r))
    L_VR = 1/(A_r |x|) sum_a sum_t KL(VR^T_{a,t} || VR^S_{a,t}), VR = softmax(V V^T / sqrt(d_r))
    L_rel = L_AT + L_VR.

  MiniLM v1 needs the teacher's and the student's head counts to be equal;
  here queries, keys and values are concatenated over heads and re-split
  into `relation_heads` relation heads (MiniLMv2, Wang et al. 2021, §3.1),
  so teacher and student may differ in heads and width (relations are
  |x| x |x| either way); with relation_heads = both models' head count and
  runtime-scaled queries it is v1's per-head formula. The distributions are
  recomputed from the layer's projections: T5's relative position bias and
  its query scaling folded into initialisation are not part of them.

Metrics (train.jsonl / eval.jsonl): `loss` (the mixed loss), `task_loss`
(the student's cross entropy + z-loss per token: compare it with a run
without a teacher), `accuracy`, `z_loss`, `kd_divergence` (D per token) and,
with relations, `attention_relation` and `value_relation`.

The teacher's logits come from the same step (teacher frozen and sharded
like the student); reading them from a cache instead is not implemented.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5xlike import interfaces, losses
from t5xlike.models import base, layers
from t5xlike.posttrain import frozen

Array = jax.Array
Batch = Mapping[str, Any]

DIVERGENCES = ("forward", "reverse")


def token_divergence(student_logits: Array, teacher_logits: Array, temperature: float,
                     divergence: str = "forward") -> Array:
  """Per-position KL between the temperature-softened distributions, float32 [b, l].

  forward: KL(p_T || p_S) = sum_v p_T (log p_T - log p_S); reverse: KL(p_S || p_T);
  p = softmax(logits / temperature) over the vocabulary (last axis).
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  if divergence == "reverse":
    student, teacher = teacher, student
  return jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def relation_log_probs(left: Array, right: Array, heads: int, key_mask: Array) -> Array:
  """log softmax(L_a R_a^T / sqrt(d_r)) per relation head a, float32 [b, heads, l, l].

  Args:
    left, right: [b, l, width], concatenated over attention heads (Q and K, or V and V);
      split into `heads` relation heads of d_r = width / heads.
    heads: relation heads (must divide width).
    key_mask: bool [b, 1, l, l], the keys each query may relate to.
  """
  batch, length, width = left.shape
  if width % heads:
    raise ValueError(f"relation_heads={heads} must divide the attention width {width} of "
                     f"both teacher and student")
  split = lambda x: x.astype(jnp.float32).reshape(batch, length, heads, width // heads)
  logits = jnp.einsum("bqhd,bkhd->bhqk", split(left), split(right)) / jnp.sqrt(width / heads)
  logits = jnp.where(key_mask, logits, -1e9)
  return jax.nn.log_softmax(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class SelfAttentionRelations:
  """MiniLM's last-layer self-attention and value-relation distillation (module docstring).

  Attributes:
    weight: gamma, the weight of L_rel = L_AT + L_VR in the loss.
    relation_heads: relation heads A_r (must divide teacher's and student's
      heads x head_dim).
    stack: the network's stack whose last layer is distilled ('encoder').
  """
  weight: float = 1.0
  relation_heads: int = 4
  stack: str = "encoder"

  def __post_init__(self):
    if self.weight < 0 or self.relation_heads < 1:
      raise ValueError(f"SelfAttentionRelations needs weight >= 0 and relation_heads >= 1, "
                       f"got {self.weight} and {self.relation_heads}")

  def capture(self) -> tuple[dict[tuple[int, str], Array], Any]:
    """(a dict filled with {(layer, 'query'|'key'|'value'): [b, l, width]}, the
    interceptor that fills it) for one network call."""
    pattern = re.compile(rf"^{re.escape(self.stack)}/layers_(\d+)/attention/(query|key|value)$")
    found: dict[tuple[int, str], Array] = {}

    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, layers.Dense) and context.method_name == "__call__":
        match = pattern.match("/".join(str(p) for p in context.module.path))
        if match:
          found[(int(match.group(1)), match.group(2))] = out
      return out
    return found, intercept

  def last_layer(self, found: Mapping[tuple[int, str], Array], who: str) -> tuple[Array, ...]:
    """(Q, K, V) of the highest layer captured; ValueError when there is none."""
    if not found:
      raise ValueError(f"SelfAttentionRelations found no unscanned {self.stack}/layers_<i>/"
                       f"attention in the {who}: MiniLM distillation needs scan_layers=False "
                       f"and remat_policy='none', and a network with that stack")
    last = max(layer for layer, _ in found)
    return tuple(found[(last, name)] for name in ("query", "key", "value"))

  def losses(self, student: tuple[Array, ...], teacher: tuple[Array, ...],
             tokens: Array, segment_ids: Array | None) -> tuple[Array, Array, Array]:
    """(L_AT, L_VR, valid query positions) of a batch: the KLs averaged over the relation
    heads and the valid (non-padding) query positions of the batch."""
    valid = tokens > 0
    pair = valid[:, :, None] & valid[:, None, :]
    if segment_ids is not None:
      pair &= segment_ids[:, :, None] == segment_ids[:, None, :]
    key_mask = pair[:, None]
    queries = valid.astype(jnp.float32)[:, None, :]  # [b, 1, l]
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32) * self.relation_heads

    def kl(teacher_pair: tuple[Array, Array], student_pair: tuple[Array, Array]) -> Array:
      t = relation_log_probs(teacher_pair[0], teacher_pair[1], self.relation_heads, key_mask)
      s = relation_log_probs(student_pair[0], student_pair[1], self.relation_heads, key_mask)
      per_query = jnp.sum(jnp.where(key_mask, jnp.exp(t) * (t - s), 0.0), axis=-1)
      return jnp.sum(per_query * queries) / count

    (sq, sk, sv), (tq, tk, tv) = student, teacher
    return kl((tq, tk), (sq, sk)), kl((tv, tv), (sv, sv)), jnp.sum(valid)


class DistillationModel(frozen.PairedModel):
  """A student trained on its task loss mixed with a frozen teacher's distributions.

  Args:
    student: the model trained (a token model: T5, decoder-only, MLM encoder).
    teacher: the frozen teacher (any size, the same vocabulary), e.g. a larger
      gin-scoped MODEL (`teacher/t5.T5Config.emb_dim = ...`).
    teacher_checkpoint_path: TEACHER_CHECKPOINT_PATH, the teacher's step directory
      (None: INITIAL_CHECKPOINT_PATH).
    kd_weight: alpha, the weight of the soft-target term (1 - alpha: the task loss).
    temperature: T of the softened distributions (the term is scaled by T^2).
    divergence: 'forward' (KL(p_T || p_S)) or 'reverse' (KL(p_S || p_T)).
    relations: MiniLM's self-attention relations (None: logits only).
  """

  def __init__(self, student: base.TokenModel, teacher: base.TokenModel | None,
               teacher_checkpoint_path: str | None = None, kd_weight: float = 0.5,
               temperature: float = 2.0, divergence: str = "forward",
               relations: SelfAttentionRelations | None = None):
    if teacher is None:
      raise ValueError("DistillationModel needs a teacher (DistillationModel.teacher)")
    if not 0.0 <= kd_weight <= 1.0 or temperature <= 0:
      raise ValueError(f"kd_weight must be in [0, 1] and temperature > 0, got {kd_weight} "
                       f"and {temperature}")
    if divergence not in DIVERGENCES:
      raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if relations is not None and not isinstance(relations, SelfAttentionRelations):
      raise ValueError(f"relations must be a SelfAttentionRelations or None, got {relations!r} "
                       f"(posttrain/minilm.gin binds it)")
    super().__init__(cast(interfaces.Model, student), cast(interfaces.Model, teacher),
                     "teacher", teacher_checkpoint_path)
    self.student, self.teacher = student, teacher
    self.kd_weight, self.temperature, self.divergence = kd_weight, temperature, divergence
    self.relations = relations
    #: The converter of its batches: the student's.
    self.feature_converter: str = cast(interfaces.Model, student).feature_converter

  def _logits(self, model: base.TokenModel, params: Any, batch: Batch,
              dropout_rng: Array | None) -> tuple[Array, tuple[Array, ...] | None]:
    """(logits, the last layer's (Q, K, V) when relations are distilled)."""
    if self.relations is None:
      return model.logits(params, batch, dropout_rng), None
    found, intercept = self.relations.capture()
    with nn.intercept_methods(intercept):
      logits = model.logits(params, batch, dropout_rng)
    who = "student" if model is self.student else "teacher"
    return logits, self.relations.last_layer(found, who)

  def loss_fn(self, params: Any, batch: Batch,
              dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
    """(loss per target token, summed statistics); see the module docstring."""
    student_params, teacher_params = self.split(params)
    student_logits, student_qkv = self._logits(self.student, student_params, batch, dropout_rng)
    teacher_logits, teacher_qkv = self._logits(self.teacher, teacher_params, batch, None)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    targets = jnp.asarray(batch[self.student.target_feature])
    weights = jnp.asarray(batch[self.student.weight_feature]).astype(jnp.float32)
    task = losses.token_stats(student_logits, targets, weights, z_loss=self.student.z_loss,
                              label_smoothing=self.student.label_smoothing)
    divergence = token_divergence(student_logits, teacher_logits, self.temperature,
                                  self.divergence)
    kd_sum = jnp.sum(divergence * weights)
    loss_sum = ((1.0 - self.kd_weight) * task["loss_sum"]
                + self.kd_weight * self.temperature ** 2 * kd_sum)
    stats = {**task, "task_loss_sum": task["loss_sum"], "kd_divergence_sum": kd_sum}
    if self.relations is not None:
      assert student_qkv is not None and teacher_qkv is not None
      attention, value, _ = self.relations.losses(
          student_qkv, jax.lax.stop_gradient(teacher_qkv),
          jnp.asarray(batch["encoder_input_tokens"]), batch.get("encoder_segment_ids"))
      # Batch means, carried as sums over the target tokens (the trainer's divisor).
      stats["attention_relation_sum"] = attention * task["weight_sum"]
      stats["value_relation_sum"] = value * task["weight_sum"]
      loss_sum = loss_sum + self.relations.weight * (attention + value) * task["weight_sum"]
    stats["loss_sum"] = loss_sum
    return loss_sum / jnp.maximum(task["weight_sum"], 1.0), stats

  def metrics(self, sums: Mapping[str, Any]) -> dict[str, Any]:
    """Per-token means of the summed statistics (`loss_fn`)."""
    tokens = jnp.maximum(sums["weight_sum"], 1.0)
    out = {"loss": sums["loss_sum"] / tokens, "task_loss": sums["task_loss_sum"] / tokens,
           "accuracy": sums["correct"] / tokens, "z_loss": sums["z_loss_sum"] / tokens,
           "kd_divergence": sums["kd_divergence_sum"] / tokens}
    for name in ("attention_relation", "value_relation"):
      if f"{name}_sum" in sums:
        out[name] = sums[f"{name}_sum"] / tokens
    return out
