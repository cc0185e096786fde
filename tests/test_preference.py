"""Preference tuning (t5xlike/posttrain): the pairwise format, the losses against NumPy
float64, the model's loss from its logits, packed = unpacked, the frozen reference."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from t5xlike import errors, optim, partitioning
from t5xlike.data import batch_shapes, feature_converters, packing, pairwise
from t5xlike.models import decoder, encoder_decoder, t5
from t5xlike.posttrain import frozen, preference, preference_losses
from t5xlike.training import trainer as trainer_lib
from tests import test_packing

T5_CONFIG = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, head_dim=8, mlp_dim=32)
DECODER_CONFIG = decoder.DecoderConfig(vocab_size=64, emb_dim=16, num_heads=2, num_kv_heads=1,
                                       num_layers=1, head_dim=8, mlp_dim=32)
LENGTHS = {"inputs": 8, "chosen": 6, "rejected": 5}


def examples(seed, count=4):
  rng = np.random.default_rng(seed)
  ids = lambda n: np.append(rng.integers(2, 64, n - 1), 1).astype(np.int32)  # EOS = 1
  return [{"inputs": ids(int(rng.integers(2, 7))), "chosen": ids(int(rng.integers(2, 6))),
           "rejected": ids(int(rng.integers(2, 6)))} for _ in range(count)]


# -- the pairwise format ------------------------------------------------------------------------


def test_pairwise_encoder_decoder_layout():
  batch = feature_converters.get_converter("pairwise_encoder_decoder")(
      [{"inputs": np.array([7, 8, 1]), "chosen": np.array([3, 9, 1]),
        "rejected": np.array([9, 3, 1])}], {"inputs": 4, "chosen": 4, "rejected": 3})
  expected = {"encoder_input_tokens": [[7, 8, 1, 0]], "decoder_loss_weights": [[1, 1, 1, 0]]}
  for side, targets, shifted in (("chosen", [3, 9, 1, 0], [0, 3, 9, 1]),
                                 ("rejected", [9, 3, 1, 0], [0, 9, 3, 1])):
    for name, value in {**expected, "decoder_target_tokens": [targets],
                        "decoder_input_tokens": [shifted]}.items():
      np.testing.assert_array_equal(batch[f"{side}_{name}"], value, err_msg=f"{side}_{name}")
  assert len(batch) == 8


def test_pairwise_decoder_rows_are_the_decoder_converters_rows():
  exs = examples(0)
  batch = feature_converters.get_converter("pairwise_decoder")(exs, LENGTHS)
  for side in pairwise.SIDES:
    alone = feature_converters.decoder_batch(
        [{"inputs": ex["inputs"], "targets": ex[side]} for ex in exs],
        {"inputs": 8, "targets": 6})
    got = pairwise.side_features(batch, side)
    assert sorted(got) == sorted(alone)
    for key in alone:
      np.testing.assert_array_equal(got[key], alone[key], err_msg=key)


@pytest.mark.parametrize("converter", ["pairwise_encoder_decoder", "pairwise_decoder"])
@pytest.mark.parametrize("pack", [False, True])
def test_predicted_shapes_are_the_pipelines(converter, pack):
  exs = examples(1)
  batch = (test_packing.pack(converter, exs, LENGTHS, num_packing_bins=2) if pack
           else feature_converters.get_converter(converter)(exs[:2], LENGTHS))
  rows = len(batch["chosen_decoder_target_tokens"])
  assert batch_shapes.matches(
      batch_shapes.expected_batch_shapes(converter, LENGTHS, rows, pack), batch)


def test_packed_pairs_share_rows_and_segments():
  batch = test_packing.pack("pairwise_encoder_decoder", examples(2), LENGTHS, num_packing_bins=2)
  np.testing.assert_array_equal(batch["chosen_encoder_segment_ids"],
                                batch["rejected_encoder_segment_ids"])
  chosen, rejected = batch["chosen_decoder_segment_ids"], batch["rejected_decoder_segment_ids"]
  assert {tuple(np.unique(r[r > 0])) for r in chosen} == {tuple(np.unique(r[r > 0]))
                                                          for r in rejected}


def test_a_missing_field_is_named():
  with pytest.raises(ValueError, match=r"lacks the pairwise field\(s\) \['rejected'\]"):
    pairwise.check_features(["inputs", "chosen"], "task 'x'")
  with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS"):
    pairwise.side_lengths({"inputs": 8, "targets": 8})


# -- the losses against NumPy float64 -----------------------------------------------------------


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("loss,expected", [
    (preference_losses.DPO(beta=0.3),
     lambda pc, pr, rc, rr: -log_sigmoid(0.3 * ((pc - rc) - (pr - rr)))),
    (preference_losses.DPO(beta=0.3, label_smoothing=0.2),
     lambda pc, pr, rc, rr: -0.8 * log_sigmoid(0.3 * ((pc - rc) - (pr - rr)))
     - 0.2 * log_sigmoid(-0.3 * ((pc - rc) - (pr - rr)))),
    (preference_losses.IPO(beta=0.25),
     lambda pc, pr, rc, rr: ((pc - rc) - (pr - rr) - 1 / (2 * 0.25)) ** 2),
    (preference_losses.SimPO(beta=2.0, gamma=0.7),
     lambda pc, pr, rc, rr: -log_sigmoid(2.0 * pc - 2.0 * pr - 0.7)),
])
def test_losses_match_numpy(loss, expected):
  rng = np.random.default_rng(3)
  pc, pr, rc, rr = (rng.normal(-8.0, 3.0, 16) for _ in range(4))
  got, chosen_reward, rejected_reward = loss.pair_losses(
      *(np.float32(x) for x in (pc, pr)),
      *((np.float32(rc), np.float32(rr)) if loss.needs_reference else (None, None)))
  np.testing.assert_allclose(got, expected(pc, pr, rc, rr), rtol=2e-5, atol=2e-5)
  reward = (lambda p, r: loss.beta * p) if not loss.needs_reference else (
      lambda p, r: loss.beta * (p - r))
  np.testing.assert_allclose(chosen_reward, reward(pc, rc), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rejected_reward, reward(pr, rr), rtol=1e-5, atol=1e-5)


def test_bad_hyper_parameters_are_refused():
  with pytest.raises(ValueError, match="beta"):
    preference_losses.DPO(beta=0.0)
  with pytest.raises(ValueError, match="label smoothing"):
    preference_losses.IPO(label_smoothing=0.1)


# -- the model's loss from its logits ----------------------------------------------------------


def policy(family):
  if family == "t5":
    return encoder_decoder.EncoderDecoderModel(t5.Transformer(T5_CONFIG))
  return decoder.DecoderOnlyModel(decoder.Transformer(DECODER_CONFIG))


@pytest.fixture(scope="module")
def models():
  """family -> (PreferenceModel with a DPO loss, params with policy != reference)."""
  out = {}
  for family, converter in (("t5", "pairwise_encoder_decoder"), ("decoder", "pairwise_decoder")):
    model = preference.PreferenceModel(policy(family), preference_losses.DPO(beta=0.5),
                                       reference=policy(family))
    batch = feature_converters.get_converter(converter)(examples(4), LENGTHS)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    out[family] = (model, params, converter)
  return out


def numpy_pair_stats(model, params, batch):
  """Per pair (log pi_w, log pi_l, log ref_w, log ref_l, KL sum over both completions),
  float64, from each model's logits of each side alone."""
  policy_params, reference_params = model.split(params)
  out = []
  for which, p in ((model.policy, policy_params), (model.reference, reference_params)):
    for side in pairwise.SIDES:
      rows = pairwise.side_features(batch, side)
      logits = np.asarray(which.logits(p, rows), np.float64)
      log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                         keepdims=True)) - logits.max(-1, keepdims=True)
      picked = np.take_along_axis(log_probs, rows["decoder_target_tokens"][..., None], -1)[..., 0]
      out.append((log_probs, (picked * rows["decoder_loss_weights"]).sum(-1)))
  (lp_c, pc), (lp_r, pr), (lr_c, rc), (lr_r, rr) = out
  kl = 0.0
  for (p_lp, _), (r_lp, _), side in ((out[0], out[2], "chosen"), (out[1], out[3], "rejected")):
    weights = pairwise.side_features(batch, side)["decoder_loss_weights"]
    kl += np.sum(np.sum(np.exp(p_lp) * (p_lp - r_lp), -1) * weights)
  return pc, pr, rc, rr, kl


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_model_loss_matches_numpy_from_logits(models, family):
  model, params, converter = models[family]
  batch = feature_converters.get_converter(converter)(examples(5), LENGTHS)
  loss, stats = jax.jit(model.loss_fn)(params, batch, None)
  pc, pr, rc, rr, kl = numpy_pair_stats(model, params, batch)
  h = 0.5 * ((pc - rc) - (pr - rr))
  np.testing.assert_allclose(float(loss), np.mean(-log_sigmoid(h)), rtol=1e-5)
  metrics = model.metrics(stats)
  np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(h > 0))
  np.testing.assert_allclose(float(metrics["logp_accuracy"]), np.mean(pc > pr))
  np.testing.assert_allclose(float(metrics["reward_margin"]), np.mean(h), rtol=1e-5, atol=1e-6)
  tokens = sum(pairwise.side_features(batch, s)["decoder_loss_weights"].sum()
               for s in pairwise.SIDES)
  np.testing.assert_allclose(float(metrics["kl_to_reference"]), kl / tokens, rtol=1e-4)
  assert float(stats["weight_sum"]) == 4


def test_packed_batch_gives_the_unpacked_loss(models):
  model, params, converter = models["t5"]
  exs = examples(6)
  unpacked = feature_converters.get_converter(converter)(exs, LENGTHS)
  packed = test_packing.pack(converter, exs, {**LENGTHS, "inputs": 16, "chosen": 12,
                                              "rejected": 12}, num_packing_bins=2)
  assert packed["chosen_decoder_segment_ids"].max() > 1  # several pairs in a row
  a, b = (jax.jit(model.loss_fn)(params, batch, None)[1] for batch in (unpacked, packed))
  for key in ("loss_sum", "weight_sum", "chosen_logp_sum", "rejected_logp_sum", "kl_sum"):
    np.testing.assert_allclose(float(b[key]), float(a[key]), rtol=1e-5, err_msg=key)


def test_precomputed_reference_log_probabilities_replace_the_reference(models):
  model, params, converter = models["t5"]
  exs = examples(7)
  batch = feature_converters.get_converter(converter)(exs, LENGTHS)
  _, _, rc, rr, _ = numpy_pair_stats(model, params, batch)
  with_scores = [{**ex, "reference_chosen_logp": np.float32(c),
                  "reference_rejected_logp": np.float32(r)} for ex, c, r in zip(exs, rc, rr)]
  one_model = preference.PreferenceModel(model.policy, model.loss, reference=None)
  policy_params, _ = model.split(params)
  got = jax.jit(one_model.loss_fn)(policy_params, feature_converters.get_converter(converter)(
      with_scores, LENGTHS), None)[0]
  want = jax.jit(model.loss_fn)(params, batch, None)[0]
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  with pytest.raises(ValueError, match="reference_chosen_logp"):
    one_model.loss_fn(policy_params, batch, None)
  with pytest.raises(ValueError, match="per example"):
    packing.prepare_for_packing(converter, with_scores[0], LENGTHS)


# -- the frozen reference in training -----------------------------------------------------------


def test_reference_stays_bit_identical_without_optimizer_state(models):
  model, params, converter = models["t5"]
  batch = feature_converters.get_converter(converter)(examples(8), LENGTHS)
  schedule = optim.constant(0.01)
  technique = frozen.technique(model, None)
  trainer = trainer_lib.Trainer(model, optim.adamw(schedule, weight_decay=0.1), schedule,
                                partitioning.Partitioner({"data": 1}), finetuning=technique)
  state = trainer.init_state(0, batch)
  before = jax.device_get(state.params)
  for _ in range(2):
    state, metrics = trainer.train_step(state, batch)
  after = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(before["reference"]), jax.tree.leaves(after["reference"])):
    assert a.tobytes() == b.tobytes()
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(model.split(before)[0]), jax.tree.leaves(model.split(after)[0]))]
  assert all(changed)
  policy_size = sum(x.size for x in jax.tree.leaves(model.split(after)[0]))
  state_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert 2 * policy_size <= state_size < 2 * policy_size + 16  # Adam's two moments, policy only
  assert float(metrics["grad_norm"]) > 0


def test_a_teacher_of_another_vocabulary_is_a_config_error():
  other = encoder_decoder.EncoderDecoderModel(t5.Transformer(
      t5.T5Config(**{**T5_CONFIG.__dict__, "vocab_size": 128})))
  model = preference.PreferenceModel(policy("t5"), preference_losses.DPO(), reference=other)
  with pytest.raises(errors.ConfigError, match="another vocabulary.*128 embeddings vs None in 64"):
    frozen.check_model(model)
  with pytest.raises(ValueError, match="reference-free"):
    preference.PreferenceModel(policy("t5"), preference_losses.SimPO(), reference=policy("t5"))
