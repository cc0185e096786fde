"""Preference tuning as a model: a policy, a frozen reference and a preference loss.

`PreferenceModel` is an `interfaces.Model` the existing trainer compiles like
any other (no second loop): its batches are pairwise (`data.pairwise`: a
prompt, a chosen and a rejected completion, packed or not), its `loss_fn`
runs the policy once on the 2B rows of both completions (and the reference,
frozen, on the same rows) and sums a preference loss
(`preference_losses`: DPO, IPO, SimPO) over the pairs. The trainer divides
by `weight_sum`, here the number of pairs: the loss is per pair.

The reference (`posttrain.frozen`): a frozen copy of the starting checkpoint
in the same parameter tree (`reference/...`; INITIAL_CHECKPOINT_PATH, or
`reference_checkpoint_path`), or, with `reference=None` and a loss that needs
one, its log-likelihoods precomputed into the task
(`reference_chosen_logp` / `reference_rejected_logp`: a task that carries
them; no command writes them yet), so that the run holds one model. Encoder-
decoder (T5) and decoder-only (Llama-style, prefix-LM rows) policies alike:
the model only calls the policy's `logits`.

Statistics (summed over pairs, so gradient accumulation and evaluation add
them up): the loss, chosen / rejected rewards (the loss's implicit rewards),
their margin, the preference accuracy (`accuracy`: chosen reward > rejected reward,
a tie counting 1/2, so the starting policy, equal to its reference, scores 0.5
where TRL's strict count reports 0), `logp_accuracy` (the policy's own
log-likelihood, normalised as the loss's, prefers the chosen completion:
the policy as a ranker, meaningful at step 0 too), the completions'
log-likelihoods, and `kl_to_reference`: the mean over completion tokens of
KL(pi(.|x, y<t) || pi_ref(.|x, y<t)), exact over the vocabulary at each
token of the data (an in-model reference only).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from t5xlike import interfaces
from t5xlike.data import pairwise
from t5xlike.posttrain import frozen, preference_losses

Array = jax.Array
Batch = Mapping[str, Any]


def token_log_probs(logits: Array, targets: Array) -> tuple[Array, Array]:
  """(log-softmax float32 [b, l, vocab], the targets' log-probabilities [b, l])."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return log_probs, jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def pair_sums(values: Array, weights: Array, segment_ids: Array | None) -> tuple[Array, Array]:
  """Per-pair sums of one side of a pairwise batch.

  Args:
    values: float [b, l] per-token values.
    weights: [b, l], > 0 on the completion's tokens.
    segment_ids: int [b, l] of packed rows (pair k of row i is segment k), or None
      (one pair per row).
  Returns:
    (the sums of values * weights, the token counts), each float32 [b * (l + 1)]:
    entry i * (l + 1) + k is pair k of row i (k = 1 without packing; entries of
    absent pairs are 0).
  """
  rows, length = weights.shape
  mask = (weights > 0).astype(jnp.float32)
  segments = (mask.astype(jnp.int32) if segment_ids is None
              else jnp.asarray(segment_ids, jnp.int32))
  ids = (jnp.arange(rows, dtype=jnp.int32)[:, None] * (length + 1) + segments).reshape(-1)
  count = rows * (length + 1)
  sums = jax.ops.segment_sum((values * mask).reshape(-1), ids, num_segments=count)
  tokens = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=count)
  return sums, tokens


def _wins(margin: Array) -> Array:
  """1 where the chosen completion wins (margin > 0), 1/2 on a tie, 0 otherwise: a policy
  equal to its reference (every reward 0) scores chance, 0.5, not 0."""
  return (margin > 0).astype(jnp.float32) + 0.5 * (margin == 0).astype(jnp.float32)


class PreferenceModel(frozen.PairedModel):
  """A policy trained on preference pairs against a frozen reference.

  Args:
    policy: the model trained (a token model: `logits`, `target_feature`,
      `weight_feature`; T5 encoder-decoder or decoder-only; PEFT-wrapped too).
    loss: the preference loss (`preference_losses.DPO()`, `IPO()`, `SimPO()`).
    reference: the frozen reference model: the policy's plain model (for a
      PEFT-wrapped policy, the unwrapped one), initialised from
      `reference_checkpoint_path` or INITIAL_CHECKPOINT_PATH. None: no reference
      in the run; a loss that needs one reads the task's precomputed
      `reference_*_logp` features.
    reference_checkpoint_path: the reference's own checkpoint (None: a copy of
      INITIAL_CHECKPOINT_PATH, the starting policy).
  """

  def __init__(self, policy: interfaces.TokenLogitsModel, loss: preference_losses.PreferenceLoss,
               reference: interfaces.TokenLogitsModel | None = None,
               reference_checkpoint_path: str | None = None):
    if not loss.needs_reference and reference is not None:
      raise ValueError(f"{type(loss).__name__} is reference-free: bind "
                       f"PreferenceModel.reference = None")
    super().__init__(policy, reference, "reference", reference_checkpoint_path)
    self.policy = policy
    self.reference = reference
    self.loss = loss
    #: The converter of its batches: the policy's, one row per completion.
    self.feature_converter = pairwise.PREFIX + policy.feature_converter

  def model_batch(self, batch: Batch) -> Batch:
    """The chosen side's features (the policy's own names): shapes for `init`."""
    return pairwise.side_features(batch, "chosen")

  def _side_log_likelihoods(self, log_probs: Array, picked: Array, rows: Batch,
                            reference_log_probs: Array | None) -> dict[str, Array]:
    """Per-pair sums of one side: log-likelihood, tokens, and KL to the reference."""
    weights = jnp.asarray(rows[self.policy.weight_feature])
    segments = rows.get("decoder_segment_ids")
    logp, tokens = pair_sums(picked, weights, segments)
    out = {"logp": logp, "tokens": tokens}
    if reference_log_probs is not None:
      reference_picked = jnp.take_along_axis(
          reference_log_probs, jnp.asarray(rows[self.policy.target_feature])[..., None],
          axis=-1)[..., 0]
      out["reference_logp"] = pair_sums(reference_picked, weights, segments)[0]
      kl = jnp.sum(jnp.exp(log_probs) * (log_probs - reference_log_probs), axis=-1)
      out["kl"] = pair_sums(kl, weights, segments)[0]
    return out

  def _precomputed(self, batch: Batch, side: str, like: Array) -> Array:
    """The task's precomputed reference log-likelihood of one side, laid out as
    `pair_sums` (pair 1 of each row)."""
    name = pairwise.REFERENCE_FEATURES[side]
    if name not in batch:
      raise ValueError(f"{type(self.loss).__name__} needs a reference: bind "
                       f"PreferenceModel.reference (a frozen copy of the starting model) or "
                       f"use a task with precomputed {name!r}")
    values = jnp.asarray(batch[name], jnp.float32)
    rows = values.shape[0]
    return jnp.zeros((rows, like.shape[0] // rows), jnp.float32).at[:, 1].set(values).reshape(-1)

  def loss_fn(self, params: Any, batch: Batch,
              dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
    """(loss per pair, summed statistics); see the module docstring."""
    policy_params, reference_params = self.split(params)
    sides = [pairwise.side_features(batch, side) for side in pairwise.SIDES]
    both = {k: jnp.concatenate([jnp.asarray(sides[0][k]), jnp.asarray(sides[1][k])])
            for k in sides[0]}
    rows = sides[0][self.policy.target_feature].shape[0]
    log_probs, picked = token_log_probs(self.policy.logits(policy_params, both, dropout_rng),
                                        jnp.asarray(both[self.policy.target_feature]))
    reference_log_probs = None
    if self.reference is not None:
      reference_logits = jax.lax.stop_gradient(self.reference.logits(reference_params, both))
      reference_log_probs = jax.nn.log_softmax(reference_logits.astype(jnp.float32), axis=-1)
    chosen, rejected = (
        self._side_log_likelihoods(log_probs[half], picked[half], side,
                                   None if reference_log_probs is None
                                   else reference_log_probs[half])
        for half, side in ((slice(0, rows), sides[0]), (slice(rows, None), sides[1])))
    if self.loss.needs_reference and self.reference is None:
      chosen["reference_logp"] = self._precomputed(batch, "chosen", chosen["logp"])
      rejected["reference_logp"] = self._precomputed(batch, "rejected", rejected["logp"])
    present = ((chosen["tokens"] > 0) & (rejected["tokens"] > 0)).astype(jnp.float32)
    norm = lambda side, key: (side[key] / jnp.maximum(side["tokens"], 1.0)
                              if self.loss.length_normalize else side[key])
    policy_chosen, policy_rejected = norm(chosen, "logp"), norm(rejected, "logp")
    losses, chosen_reward, rejected_reward = self.loss.pair_losses(
        policy_chosen, policy_rejected,
        *((norm(chosen, "reference_logp"), norm(rejected, "reference_logp"))
          if self.loss.needs_reference else (None, None)))
    if self.loss.sft_weight:  # + alpha * the chosen completion's mean token NLL
      losses = losses - self.loss.sft_weight * chosen["logp"] / jnp.maximum(chosen["tokens"], 1.0)
    policy_margin = policy_chosen - policy_rejected
    stats = {
        "loss_sum": jnp.sum(losses * present),
        "weight_sum": jnp.sum(present),
        "chosen_reward_sum": jnp.sum(chosen_reward * present),
        "rejected_reward_sum": jnp.sum(rejected_reward * present),
        "preference_correct": jnp.sum(_wins(chosen_reward - rejected_reward) * present),
        "logp_correct": jnp.sum(_wins(policy_margin) * present),
        "chosen_logp_sum": jnp.sum(chosen["logp"] * present),
        "rejected_logp_sum": jnp.sum(rejected["logp"] * present),
    }
    if "kl" in chosen:
      stats["kl_sum"] = jnp.sum(chosen["kl"] + rejected["kl"])
      stats["kl_tokens"] = jnp.sum(chosen["tokens"] + rejected["tokens"])
    return stats["loss_sum"] / jnp.maximum(stats["weight_sum"], 1.0), stats

  def metrics(self, sums: Mapping[str, Any]) -> dict[str, Any]:
    """Per-pair means of the summed statistics (`loss_fn`), and the KL per token."""
    pairs = jnp.maximum(sums["weight_sum"], 1.0)
    out = {
        "loss": sums["loss_sum"] / pairs,
        "pairs": sums["weight_sum"],
        "chosen_reward": sums["chosen_reward_sum"] / pairs,
        "rejected_reward": sums["rejected_reward_sum"] / pairs,
        "reward_margin": (sums["chosen_reward_sum"] - sums["rejected_reward_sum"]) / pairs,
        # The preference accuracy (named as every model's accuracy: progress lines show it).
        "accuracy": sums["preference_correct"] / pairs,
        "logp_accuracy": sums["logp_correct"] / pairs,
        "chosen_logp": sums["chosen_logp_sum"] / pairs,
        "rejected_logp": sums["rejected_logp_sum"] / pairs,
    }
    if "kl_sum" in sums:
      out["kl_to_reference"] = sums["kl_sum"] / jnp.maximum(sums["kl_tokens"], 1.0)
    return out
