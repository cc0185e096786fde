"""Preference losses over per-pair log-likelihoods: DPO, IPO and the reference-free SimPO.

Every loss sees, for each pair, the policy's log-likelihood of the chosen
completion y_w and of the rejected one y_l (summed over their tokens, or
averaged with `length_normalize`) and, for DPO and IPO, the frozen
reference's; it returns the loss per pair and the implicit rewards of both
completions (what the metrics report: reward margin, preference accuracy).
With log-ratios rho_w = log pi(y_w|x) - log pi_ref(y_w|x) (rho_l likewise)
and h = rho_w - rho_l:

- DPO (Rafailov et al. 2023, "Direct Preference Optimization", §4 Eq. 7):
    L = -log sigma(beta h),  rewards beta rho_w, beta rho_l  (§5.1).
  `label_smoothing` eps > 0 is the conservative DPO of Mitchell (2023, "A
  note on DPO with noisy preferences"), as TRL's `label_smoothing`: the
  label is flipped with probability eps,
    L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
- IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand
  Learning from Human Preferences", §5.2 Eq. 17, tau = `beta`):
    L = (h - 1 / (2 tau))^2.
  The paper's h uses sequence log-likelihoods (the default); TRL averages
  them over tokens (`length_normalize=True`).
- SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
  Reference-Free Reward", §2 Eq. 6): no reference; the reward is the
  length-normalised log-likelihood scaled by beta, with a target margin gamma:
    L = -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma),
  rewards beta/|y| log pi(y|x) (`label_smoothing` as for DPO). The paper's
  tuned ranges: beta 2.0-2.5, gamma 0.3-1.6 (§3, Table 7 hyper-parameters).

`sft_weight` alpha (all three) adds alpha times the chosen completion's mean
token negative log-likelihood to each pair's loss: the supervised term that
"Preference-Oriented SFT" and "Balancing the Budget" weigh against the
preference term (RPO / ORPO-style regularisation), 0 by default.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


def _smoothed_sigmoid_loss(logits: Array, label_smoothing: float) -> Array:
  """-(1 - eps) log sigma(z) - eps log sigma(-z), per element."""
  loss = -jax.nn.log_sigmoid(logits)
  if label_smoothing:
    loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-logits)
  return loss


def _check_common(beta: float, label_smoothing: float, sft_weight: float) -> None:
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
  if sft_weight < 0:
    raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
  """Base class: the hyper-parameters every loss shares (gin bindings).

  Attributes:
    beta: the inverse temperature (DPO's beta, IPO's tau, SimPO's beta).
    label_smoothing: probability that a preference label is flipped (DPO, SimPO).
    length_normalize: log-likelihoods averaged over each completion's tokens
      instead of summed.
    sft_weight: weight of the chosen completion's mean token NLL added per pair.
  """
  beta: float = 0.1
  label_smoothing: float = 0.0
  length_normalize: bool = False
  sft_weight: float = 0.0
  #: Whether the loss reads a reference model's log-likelihoods.
  needs_reference = True

  def __post_init__(self):
    _check_common(self.beta, self.label_smoothing, self.sft_weight)

  def pair_losses(self, policy_chosen: Array, policy_rejected: Array,
                  reference_chosen: Array | None,
                  reference_rejected: Array | None) -> tuple[Array, Array, Array]:
    """(loss, chosen reward, rejected reward), each float32 [pairs], from the (summed or
    length-normalised) log-likelihoods of the pairs, each [pairs]."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DPO(PreferenceLoss):
  """Direct Preference Optimization (see the module docstring)."""

  def pair_losses(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    assert reference_chosen is not None and reference_rejected is not None
    chosen = self.beta * (policy_chosen - reference_chosen)
    rejected = self.beta * (policy_rejected - reference_rejected)
    return _smoothed_sigmoid_loss(chosen - rejected, self.label_smoothing), chosen, rejected


@dataclasses.dataclass(frozen=True)
class IPO(PreferenceLoss):
  """Identity Preference Optimization (see the module docstring); `beta` is tau."""

  def __post_init__(self):
    super().__post_init__()
    if self.label_smoothing:
      raise ValueError("IPO has no label smoothing (its loss is a regression to 1/(2 tau))")

  def pair_losses(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    assert reference_chosen is not None and reference_rejected is not None
    chosen, rejected = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    loss = jnp.square(chosen - rejected - 1.0 / (2.0 * self.beta))
    return loss, self.beta * chosen, self.beta * rejected


@dataclasses.dataclass(frozen=True)
class SimPO(PreferenceLoss):
  """Simple Preference Optimization, reference-free (see the module docstring).

  Attributes:
    gamma: the target reward margin.
  """
  beta: float = 2.0
  length_normalize: bool = True
  gamma: float = 1.0
  needs_reference = False

  def pair_losses(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    del reference_chosen, reference_rejected
    chosen, rejected = self.beta * policy_chosen, self.beta * policy_rejected
    return (_smoothed_sigmoid_loss(chosen - rejected - self.gamma, self.label_smoothing),
            chosen, rejected)
