"""ELECTRA's replaced-token detection (Clark et al. 2020, "ELECTRA:
Pre-training Text Encoders as Discriminators Rather Than Generators"):
the data transform (NumPy) and the generator + discriminator model (JAX).

Method (§2). Positions m (15% of the tokens) are masked,
x^masked = REPLACE(x, m, [MASK]); a small generator G, a masked LM, predicts
the original tokens there; its samples x̂_i ~ p_G(x_i | x^masked) fill the
masked positions, x^corrupt = REPLACE(x, m, x̂); the discriminator D
predicts for every token of x^corrupt whether it is replaced (differs from
the original: a sample equal to the original counts as original). Both are
trained together on

  L = L_MLM(x, θ_G) + λ · L_Disc(x, θ_D),   λ = 50  (Appendix A; the
                                            released code's disc_weight = 50)

with no gradient through the sampling step into the generator (§2: the
generator is trained by maximum likelihood, not adversarially). After
pre-training the generator is dropped and the discriminator fine-tuned
(`ElectraModel.discriminator_params`).

Weight sharing (§3.2 "Model Extensions": with a generator smaller than the
discriminator only the embeddings, token AND position, are shared): here
one `Embedder` (`params['embedder']`) is read by both networks and receives
the gradients of both losses. Generator size (§3.2 "Smaller generators",
Appendix A Table 6): hidden size, FFN size and heads scaled by 1/4 (Small),
1/3 (Base), 1/4 (Large), with all the discriminator's layers; the
embeddings keep the discriminator's width (ELECTRA-Small: 128, projected to
each network's hidden size by `embedding_projection`).

Masking follows the released code by default (google-research/electra,
`pretrain/pretrain_helpers.py`, `mask`; `ElectraMasking`, rule 'released'):
round(0.15·n) positions are drawn uniformly *with replacement*, and each
draw shows [MASK] with probability 0.85, so about 86% of the distinct
chosen positions read [MASK] and the rest keep their original token (the
generator predicts the original token at all of them, every draw counting
once in its loss). The paper's formula (§2, x^masked = REPLACE(x, m,
[MASK]): round(0.15·n) distinct positions, all [MASK]) is rule 'paper'. The
two differ in what the generator sees and in the replaced fraction: at
n = 128, 19 draws hit 17.7 distinct positions on average (13.8% of the
tokens, against 14.8% for the paper's rule), 11.9% of the tokens reading
[MASK].
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5xlike import interfaces, losses
from t5xlike.models import encoder
from t5xlike.objectives import mlm

Array = jax.Array
Batch = Mapping[str, Array]


#: `ElectraMasking` rules: the released code's (default) and the paper's formula.
MASKING_RULES = ("released", "paper")


def released_masking(tokens: np.ndarray, rng: np.random.Generator, *, mask_rate: float,
                     mask_token_fraction: float, max_predictions: int | None,
                     mask_id: int) -> dict[str, np.ndarray]:
  """ELECTRA's released masking (google-research/electra, `pretrain_helpers.mask`) of one
  sequence without padding or special tokens (every position a candidate).

  As the released code: the number of draws is round(float32(n) * mask_rate)
  (`tf.round`, half to even) clamped to [1, max_predictions]; the positions
  are drawn uniformly with replacement (`tf.random.categorical` over the
  candidates); each draw independently shows [MASK] with probability
  `mask_token_fraction` (`tf.random.uniform < 0.85`), and a position drawn
  several times reads [MASK] if any of its draws does (`scatter_update`
  applies one update per position). The generator is scored on every draw
  (`masked_lm_weights`), so a position's `mlm_weights` is its number of draws.

  Args:
    tokens: int [n], the original tokens.
    rng: draws, in this order, the positions and one uniform number per draw.
    mask_rate: the fraction of n drawn (0.15).
    mask_token_fraction: per draw, the probability of showing [MASK] (0.85).
    max_predictions: the released code's `max_predictions_per_seq` (None: no cap).
    mask_id: the [MASK] id.

  Returns:
    {'inputs': int32 [n], 'targets': int32 [n] (= tokens), 'mlm_weights':
    float32 [n] (draws per position; they sum to the number of draws)}.
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  n = len(tokens)
  inputs = tokens.copy()
  weights = np.zeros(n, dtype=np.float32)
  if n:
    num = max(1, int(np.rint(np.float32(n) * np.float32(mask_rate))))
    if max_predictions is not None:
      num = max(1, min(num, max_predictions))
    positions = rng.integers(0, n, size=num)
    shows_mask = rng.random(num) < mask_token_fraction
    inputs[positions[shows_mask]] = mask_id
    weights = np.bincount(positions, minlength=n).astype(np.float32)
  return {"inputs": inputs, "targets": tokens, "mlm_weights": weights}


class ElectraMasking(mlm.MaskedLanguageModeling):
  """ELECTRA's input masking.

  Rule 'released' (default), google-research/electra's `pretrain_helpers.mask`
  (see `released_masking`): round(mask_rate·n) draws with replacement, each
  showing [MASK] with probability 0.85 (else the original token);
  `mlm_weights` counts the draws of each position. Rule 'paper', §2's
  x^masked = REPLACE(x, m, [MASK]): round(mask_rate·n) distinct positions,
  all [MASK] (BERT's selection with mask_token_fraction = 1).

  One detail of the released code is not reproduced: for a position drawn
  twice it writes the floor of the mean of the generator's two sampled ids
  into the discriminator's input (`scatter_update` divides the summed ids
  by the count), an artefact; `ElectraModel` samples one token per position.

  Args:
    mask_rate: fraction of tokens masked (ELECTRA: 0.15 for Small and Base,
      0.25 for Large, Appendix A Table 6).
    rule: 'released' or 'paper' (see above).
    mask_token_fraction: rule 'released': the probability that a draw shows
      [MASK] (0.85 in the released code).
    max_predictions: rule 'released': the cap on the draws per sequence (the
      released `max_predictions_per_seq`); None: int((mask_rate + 0.005) x
      TASK_FEATURE_LENGTHS['inputs']) as its `configure_pretraining.py` sets
      it, once `raw_length` has seen the lengths (no cap before: a
      standalone `transform`). It binds only below 100 tokens.
    mask_id, num_reserved_ids: as in `mlm.MaskedLanguageModeling` ([MASK] is
      `vocab_size - 1`, `<extra_id_0>`, by default).
  """

  name = "electra"

  def __init__(self, mask_rate: float = 0.15, rule: str = "released",
               mask_token_fraction: float = 0.85, max_predictions: int | None = None,
               mask_id: int | None = None, num_reserved_ids: int = 100):
    if rule not in MASKING_RULES:
      raise ValueError(f"ElectraMasking rule must be one of {MASKING_RULES}, got {rule!r}")
    if max_predictions is not None and max_predictions < 1:
      raise ValueError(f"max_predictions must be >= 1, got {max_predictions}")
    super().__init__(mask_rate=mask_rate,
                     mask_token_fraction=mask_token_fraction if rule == "released" else 1.0,
                     random_token_fraction=0.0, mask_id=mask_id,
                     num_reserved_ids=num_reserved_ids)
    self.rule = rule
    self.max_predictions = max_predictions
    self._max_predictions = max_predictions

  def raw_length(self, feature_lengths: Mapping[str, int]) -> int:
    length = super().raw_length(feature_lengths)
    if self.max_predictions is None:
      # configure_pretraining.py: max_predictions_per_seq = int((mask_prob + 0.005) * L).
      self._max_predictions = max(1, int((self.mask_rate + 0.005) * length))
    return length

  def transform(self, tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
                eos_id: int) -> dict[str, np.ndarray]:
    """tokens: int [n] -> {'inputs' int32 [n], 'targets' int32 [n], 'mlm_weights' float32 [n]}."""
    if self.rule == "paper":
      return super().transform(tokens, rng, vocab_size=vocab_size, eos_id=eos_id)
    return released_masking(tokens, rng, mask_rate=self.mask_rate,
                            mask_token_fraction=self.mask_token_fraction,
                            max_predictions=self._max_predictions,
                            mask_id=self.mask_token_id(vocab_size))


class ElectraNetwork(nn.Module):
  """Generator (masked LM) and discriminator (binary head) over one shared `Embedder`.

  Parameter tree:
    embedder/{token_embedder/embedding, position_embedding}   shared
    generator/{encoder, mlm_head}                            EncoderNetwork(head='mlm')
    discriminator/{encoder, binary_head}                     EncoderNetwork(head='binary')
  The embedder has the discriminator's dtype and the (common) vocab_size,
  embedding_size and max_length of both configs.
  """
  generator_config: encoder.EncoderConfig
  discriminator_config: encoder.EncoderConfig

  def setup(self):
    disc = self.discriminator_config
    self.embedder = encoder.Embedder(disc.vocab_size, disc.embedding_size, disc.max_length,
                                     dtype=disc.jnp_dtype,
                                     learned_positions=disc.learned_positions)
    self.generator = encoder.EncoderNetwork(self.generator_config, head="mlm",
                                            shared_embedder=self.embedder)
    self.discriminator = encoder.EncoderNetwork(disc, head="binary",
                                                shared_embedder=self.embedder)

  def generate(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True) -> Array:
    """Generator logits float32 [b, l, vocab] of the masked tokens [b, l]."""
    return self.generator(tokens, segment_ids, positions, deterministic)

  def discriminate(self, tokens: Array, segment_ids: Array | None = None,
                   positions: Array | None = None, deterministic: bool = True) -> Array:
    """Discriminator logits float32 [b, l] (replaced vs original) of tokens [b, l]."""
    return self.discriminator(tokens, segment_ids, positions, deterministic)

  def __call__(self, tokens: Array, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True):
    """Both networks on the same tokens (used to initialise every parameter)."""
    return (self.generate(tokens, segment_ids, positions, deterministic),
            self.discriminate(tokens, segment_ids, positions, deterministic))


def sample_by_inverse_cdf(logits: Array, uniforms: Array, block: int = 128) -> Array:
  """int32 [...] categorical samples of softmax(logits) by inverse transform sampling.

  Each position draws the first id k whose cumulative probability exceeds its
  uniform number u: sum_{j<=k} p_j > u (the exact categorical distribution,
  up to float32 rounding), in two levels so that no [..., vocab] array of
  random numbers or long prefix sums is formed: the cumulative sums of the
  probability mass of blocks of `block` ids pick the block, the cumulative sums
  inside that block pick the id. One uniform number per position instead of
  the Gumbel-max trick's one per (position, id): 4,096 instead of 33.5 M draws
  for a 32 x 128 batch over 8,192 ids (1.9 s -> 0.16 s on 2 CPU cores).

  Args:
    logits: float32 [..., vocab]; -inf for ids that must not be drawn (at least
      one id per position finite).
    uniforms: float32 [...] in [0, 1).
    block: ids per block (the vocabulary is padded with zero mass to a multiple).
  """
  vocab = logits.shape[-1]
  mass = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [..., vocab], 0 at -inf
  blocks = -(-vocab // block)
  mass = jnp.pad(mass, [(0, 0)] * (mass.ndim - 1) + [(0, blocks * block - vocab)])
  mass = mass.reshape(*mass.shape[:-1], blocks, block)
  block_mass = jnp.sum(mass, axis=-1)  # [..., blocks]
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  target = uniforms[..., None] * block_cdf[..., -1:]  # [..., 1]
  # Rounding can put the target at the total: then the last block with mass.
  last_block = jnp.max(jnp.where(block_mass > 0, jnp.arange(blocks), -1), axis=-1)
  chosen = jnp.minimum(jnp.sum(block_cdf <= target, axis=-1), last_block)  # [...]
  below = jnp.take_along_axis(block_cdf, jnp.maximum(chosen - 1, 0)[..., None], axis=-1)
  below = jnp.where(chosen[..., None] > 0, below, 0.0)  # mass of the blocks before
  inner = jnp.take_along_axis(mass, chosen[..., None, None], axis=-2)[..., 0, :]  # [..., block]
  inner_cdf = below + jnp.cumsum(inner, axis=-1)
  index = jnp.sum(inner_cdf <= target, axis=-1)
  # Rounding can leave the target above the block's last sum: its last id with mass.
  last = jnp.max(jnp.where(inner > 0, jnp.arange(block), -1), axis=-1)
  return (chosen * block + jnp.minimum(index, last)).astype(jnp.int32)


def _as_config(net_or_config: encoder.EncoderConfig | encoder.EncoderNetwork
               ) -> encoder.EncoderConfig:
  """The config itself, or the config of an `EncoderNetwork`."""
  if isinstance(net_or_config, encoder.EncoderConfig):
    return net_or_config
  if isinstance(net_or_config, encoder.EncoderNetwork):
    return net_or_config.config
  raise TypeError(f"expected an encoder.EncoderConfig or an encoder.EncoderNetwork, got "
                  f"{type(net_or_config).__name__}")


def sigmoid_cross_entropy(logits: Array, labels: Array) -> Array:
  """Elementwise -[z log σ(x) + (1 - z) log(1 - σ(x))], computed stably."""
  logits = logits.astype(jnp.float32)
  return (jnp.maximum(logits, 0.0) - logits * labels.astype(jnp.float32)
          + jnp.log1p(jnp.exp(-jnp.abs(logits))))


class ElectraModel:
  """ELECTRA pre-training: generator MLM loss + λ · discriminator loss (§2).

  Args:
    generator, discriminator: `encoder.EncoderConfig`s (or `EncoderNetwork`s,
      whose configs are used). They must agree on vocab_size,
      embedding_size (the shared tables' width) and max_length; heads are
      fixed (MLM for the generator, binary for the discriminator).
    discriminator_weight: λ (50 in the paper, Appendix A).
    sampling_temperature: generator logits are divided by it before sampling
      (the released code's `temperature`, 1.0).
    vocabulary: the (seqio) vocabulary. Its `vocab_size` is the number of
      real ids: sampling never picks id 0 (padding) nor the padded rows
      >= vocab_size of the table. Without a vocabulary every row but 0 can
      be sampled.

  Batches come from the `encoder` feature converter (`ElectraMasking`):
  `encoder_input_tokens` (x^masked), `encoder_target_tokens` (x),
  `mlm_weights` (> 0 on m: the draws of each masked position, 1 with the
  paper's rule), optional `encoder_segment_ids` / `encoder_positions`.

  Loss and statistics. With M = Σ mlm_weights (masked draws), N the
  non-padding tokens, gen_sum the summed generator cross entropy over the
  masked positions and disc_sum the summed sigmoid cross entropy over the N
  positions, the paper's loss over a batch is
    L = gen_sum / M + λ · disc_sum / N.
  The trainer reports `loss_sum / weight_sum` and steps along
  ∇loss_sum / weight_sum, so `weight_sum` = M and
    loss_sum = gen_sum + λ · disc_sum · M / N
  (M / N depends on the batch only, not on the parameters): both the loss
  and its gradient are exactly L's for one batch. Summed over micro-batches
  or eval batches, each batch weighs its discriminator term by its own
  M / N (they differ little: M ≈ 0.15 N); the separate sums
  (`generator_loss_sum`, `discriminator_loss_sum`, `nonpadding_tokens`, ...)
  add up exactly, and `metrics` reports from them.

  Randomness: with a `dropout_rng` (training) it is split into the
  generator's dropout, the discriminator's dropout and the uniform numbers of
  the sampling; without one (evaluation) there is no dropout and the numbers
  come from the fixed key `jax.random.key(0)`, so evaluation is
  deterministic (the same batch always gets the same replacements).
  """

  feature_names = ("encoder_input_tokens", "encoder_target_tokens", "mlm_weights")
  #: The feature converter (`t5xlike.data.feature_converters.CONVERTERS`) that makes its batches.
  feature_converter = "encoder"
  #: The PEFT technique the network carries (`interfaces.Model`): none for pretraining.
  peft_method: interfaces.FineTuningTechnique | None = None

  def __init__(self, generator: encoder.EncoderConfig | encoder.EncoderNetwork,
               discriminator: encoder.EncoderConfig | encoder.EncoderNetwork,
               discriminator_weight: float = 50.0, sampling_temperature: float = 1.0,
               vocabulary: Any = None):
    gen, disc = _as_config(generator), _as_config(discriminator)
    for name in ("vocab_size", "embedding_size", "max_length", "position_encoding"):
      if getattr(gen, name) != getattr(disc, name):
        raise ValueError(f"generator and discriminator share their embeddings, so their "
                         f"{name} must agree: {getattr(gen, name)} != {getattr(disc, name)}")
    if discriminator_weight < 0:
      raise ValueError(f"discriminator_weight must be >= 0, got {discriminator_weight}")
    if sampling_temperature <= 0:
      raise ValueError(f"sampling_temperature must be > 0, got {sampling_temperature}")
    encoder.check_vocabulary(vocabulary, disc)
    self.generator_config = gen
    self.discriminator_config = disc
    self.network = ElectraNetwork(gen, disc)
    self.discriminator_weight = float(discriminator_weight)
    self.sampling_temperature = float(sampling_temperature)
    self.vocabulary = vocabulary
    vocab_size = getattr(vocabulary, "vocab_size", None)
    #: Ids in [1, sampling_vocab_size) can be sampled as replacements.
    self.sampling_vocab_size = int(vocab_size) if vocab_size is not None else disc.vocab_size

  def init(self, rng: Array, batch: Batch) -> Any:
    """The (logically boxed) variables for a batch of these shapes."""
    return self.network.init(rng, batch["encoder_input_tokens"], deterministic=True)

  @staticmethod
  def rngs(dropout_rng: Array | None) -> tuple[Array | None, Array | None, Array]:
    """(generator dropout rng, discriminator dropout rng, sampling key) from `dropout_rng`.

    None (evaluation) -> (None, None, jax.random.key(0)).
    """
    if dropout_rng is None:
      return None, None, jax.random.key(0)
    gen_rng, disc_rng, sample_rng = jax.random.split(dropout_rng, 3)
    return gen_rng, disc_rng, sample_rng

  def sample(self, generator_logits: Array, key: Array) -> Array:
    """Samples int32 [b, l] from softmax(generator_logits / temperature)
    (`sample_by_inverse_cdf`, one uniform number per position drawn from `key`).

    Id 0 and ids >= `sampling_vocab_size` are never sampled. The logits are
    taken under `stop_gradient`: nothing flows back through the samples.
    """
    logits = jax.lax.stop_gradient(generator_logits).astype(jnp.float32)
    logits = logits / self.sampling_temperature
    ids = jnp.arange(logits.shape[-1])
    allowed = (ids > 0) & (ids < self.sampling_vocab_size)
    logits = jnp.where(allowed, logits, -jnp.inf)
    uniforms = jax.random.uniform(key, logits.shape[:-1], jnp.float32)
    return jax.lax.stop_gradient(sample_by_inverse_cdf(logits, uniforms))

  def _apply(self, params: Any, method: str, tokens: Array, batch: Batch,
             rng: Array | None) -> Array:
    # `apply` without `mutable` returns the network's output alone.
    return cast(Array, self.network.apply(
        {"params": params}, tokens, batch.get("encoder_segment_ids"),
        batch.get("encoder_positions"), rng is None,
        rngs={"dropout": rng} if rng is not None else None, method=method))

  def forward(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> dict:
    """The intermediate values of the loss, all [b, l] unless noted.

    Returns `generator_logits` [b, l, vocab], `sampled` (the generator's
    sample at every position), `corrupted` (x^corrupt: the sample at masked
    positions, the original elsewhere), `replaced` (bool: corrupted token
    differs from the original, on non-padding positions) and
    `discriminator_logits`.
    """
    gen_rng, disc_rng, sample_key = self.rngs(dropout_rng)
    targets = jnp.asarray(batch["encoder_target_tokens"])
    masked = jnp.asarray(batch["mlm_weights"]) > 0
    gen_logits = self._apply(params, "generate", batch["encoder_input_tokens"], batch, gen_rng)
    sampled = self.sample(gen_logits, sample_key)
    corrupted = jnp.where(masked, sampled, targets).astype(targets.dtype)
    replaced = (corrupted != targets) & (targets > 0)
    disc_logits = self._apply(params, "discriminate", corrupted, batch, disc_rng)
    return {"generator_logits": gen_logits, "sampled": sampled, "corrupted": corrupted,
            "replaced": replaced, "discriminator_logits": disc_logits}

  def loss_fn(self, params: Any, batch: Batch,
              dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
    """(L = L_MLM + λ L_Disc, summed statistics); see the class docstring."""
    out = self.forward(params, batch, dropout_rng)
    targets = jnp.asarray(batch["encoder_target_tokens"])
    weights = jnp.asarray(batch["mlm_weights"]).astype(jnp.float32)
    nonpad = (targets > 0).astype(jnp.float32)
    gen = losses.token_stats(out["generator_logits"], targets, weights)
    disc_logits, replaced = out["discriminator_logits"], out["replaced"]
    disc_sum = jnp.sum(sigmoid_cross_entropy(disc_logits, replaced) * nonpad)
    disc_correct = jnp.sum(((disc_logits > 0) == replaced).astype(jnp.float32) * nonpad)
    masked, tokens = gen["weight_sum"], jnp.sum(nonpad)
    loss_sum = (gen["loss_sum"]
                + self.discriminator_weight * disc_sum * masked / jnp.maximum(tokens, 1.0))
    stats = {
        "loss_sum": loss_sum,
        "z_loss_sum": jnp.zeros((), jnp.float32),
        "weight_sum": masked,
        "generator_loss_sum": gen["loss_sum"],
        "generator_correct": gen["correct"],
        "discriminator_loss_sum": disc_sum,
        "discriminator_correct": disc_correct,
        "nonpadding_tokens": tokens,
        "replaced_tokens": jnp.sum(replaced.astype(jnp.float32)),
    }
    return loss_sum / jnp.maximum(masked, 1.0), stats

  def metrics(self, sums: Mapping[str, Array]) -> dict[str, Array]:
    """Reported metrics from `loss_fn` statistics summed over batches.

    `loss` (loss_sum / masked draws), `generator_loss` and
    `generator_accuracy` (per masked draw), `discriminator_loss`,
    `discriminator_accuracy` and `replaced_fraction` (per non-padding
    token), `accuracy` (= discriminator_accuracy) and `z_loss` (0).
    """
    masked = jnp.maximum(sums["weight_sum"], 1.0)
    tokens = jnp.maximum(sums["nonpadding_tokens"], 1.0)
    disc_accuracy = sums["discriminator_correct"] / tokens
    return {
        "loss": sums["loss_sum"] / masked,
        "z_loss": sums["z_loss_sum"] / masked,
        "accuracy": disc_accuracy,
        "generator_loss": sums["generator_loss_sum"] / masked,
        "generator_accuracy": sums["generator_correct"] / masked,
        "discriminator_loss": sums["discriminator_loss_sum"] / tokens,
        "discriminator_accuracy": disc_accuracy,
        "replaced_fraction": sums["replaced_tokens"] / tokens,
    }

  def discriminator_network(self, head: str = "binary") -> encoder.EncoderNetwork:
    """A standalone `EncoderNetwork` with the discriminator's config (and its own embedder)."""
    return encoder.EncoderNetwork(self.discriminator_config, head=head)

  @staticmethod
  def discriminator_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The discriminator alone, in the layout of `EncoderNetwork(head='binary')`.

    params (unboxed, as in the train state): {'embedder', 'generator',
    'discriminator': {'encoder', 'binary_head'}} -> {'embedder', 'encoder',
    'binary_head'}, the shared embeddings folded in (the same arrays, not
    copies). To fine-tune: restore the ELECTRA train state, take
    `discriminator_params(state.params)` and apply it with
    `model.discriminator_network()` (`network.apply({'params': p}, tokens)`),
    or save it (e.g. with orbax) as the initial parameters of an encoder-only
    run; for a task head other than the replaced-token one, keep
    `embedder` and `encoder` and drop `binary_head`.
    """
    if "embedder" not in params or "discriminator" not in params:
      raise ValueError(f"expected ELECTRA parameters with 'embedder' and 'discriminator', got "
                       f"{sorted(params)}")
    return {"embedder": params["embedder"], **params["discriminator"]}

  def exports(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """What a run writes beside its checkpoints at the end: the discriminator alone
    (`MODEL_DIR/discriminator/checkpoint_<N>`, see `discriminator_params`)."""
    return {"discriminator": self.discriminator_params(params)}

  @property
  def vocab_size(self) -> int:
    """Rows of the shared embedding table."""
    return self.discriminator_config.vocab_size
