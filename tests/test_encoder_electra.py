"""Encoder-only family: MLM and ELECTRA against NumPy float64 references,
shared embeddings, gradient isolation of the sampling step, masking
transforms (layout and statistics), parameter layout and gin files."""
import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5xlike import partitioning
from t5xlike.cli import gin_config
from t5xlike.data import feature_converters
from t5xlike.models import encoder
from t5xlike.objectives import electra, mlm
from tests import encoder_numpy_reference as ref

VOCAB = 128        # rows of the tables
REAL_VOCAB = 120   # the vocabulary's ids; rows 120..127 are padding rows
EOS = 1
DISC = encoder.EncoderConfig(vocab_size=VOCAB, emb_dim=32, num_heads=4, num_layers=2, head_dim=8,
                             mlp_dim=64, max_length=16, embedding_dim=32)
GEN = dataclasses.replace(DISC, emb_dim=16, num_heads=2, mlp_dim=32)  # projects 32 -> 16
MLM_CFG = dataclasses.replace(DISC, embedding_dim=24)                  # projects 24 -> 32
LAMBDA, TEMPERATURE = 50.0, 0.7


class FakeVocabulary:
  vocab_size = REAL_VOCAB


def tree_paths(tree):
  return {"/".join(getattr(k, "key", str(k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def perturb(params, rng):
  """Random norms and output biases, so that every parameter matters."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1.0 + 0.5 * rng.standard_normal(x.shape).astype(np.float32))
      if "scale" in str(path) else
      x + rng.standard_normal(x.shape).astype(np.float32) if "output_bias" in str(path) else x,
      params)


def make_batch(objective, seed):
  """3 rows of 12 via objective -> `encoder` converter; row 2 packs two segments."""
  rng = np.random.default_rng(seed)
  lengths = [12, 9, 10]
  examples = [objective.transform(rng.integers(2, 100, size=n).astype(np.int32),
                                  np.random.default_rng([seed, i]), vocab_size=REAL_VOCAB,
                                  eos_id=EOS) for i, n in enumerate(lengths)]
  batch = feature_converters.encoder_batch(examples, {"inputs": 12})
  segments = np.array([[1] * 12, [1] * 9 + [0] * 3, [1] * 6 + [2] * 4 + [0] * 2], np.int32)
  positions = np.array([list(range(12)), list(range(9)) + [0] * 3,
                        list(range(6)) + list(range(4)) + [0] * 2], np.int32)
  return {**batch, "encoder_segment_ids": segments, "encoder_positions": positions}


@pytest.fixture(scope="module")
def electra_setup():
  model = electra.ElectraModel(GEN, DISC, discriminator_weight=LAMBDA,
                               sampling_temperature=TEMPERATURE, vocabulary=FakeVocabulary())
  # Seed 7: the released masking draws one position twice (mlm_weights 2) and leaves one
  # drawn position showing its original token.
  batch = make_batch(electra.ElectraMasking(), seed=7)
  rng = np.random.default_rng(1)
  params = perturb(nn.meta.unbox(model.init(jax.random.key(2), batch)["params"]), rng)
  # Make id 0 and the padding rows the generator's favourites: sampling must still skip them.
  bias = np.array(params["generator"]["mlm_head"]["output_bias"])
  bias[0] += 30.0
  bias[REAL_VOCAB:] += 30.0
  params["generator"]["mlm_head"]["output_bias"] = jnp.asarray(bias)
  loss_fn = jax.jit(model.loss_fn)
  forward = jax.jit(model.forward)
  return model, params, batch, loss_fn, forward


@pytest.fixture(scope="module")
def electra_reference(electra_setup):
  model, params, batch, _, _ = electra_setup
  uniforms = jax.random.uniform(model.rngs(None)[2], batch["encoder_input_tokens"].shape,
                                jnp.float32)
  return ref.electra_loss(jax.device_get(params), batch, GEN.num_heads, DISC.num_heads,
                          np.asarray(uniforms), REAL_VOCAB, LAMBDA, TEMPERATURE)


# -- ELECTRA ----------------------------------------------------------------------------------
def test_electra_parameter_tree(electra_setup):
  model, params, _, _, _ = electra_setup
  shapes = {k: v.shape for k, v in tree_paths(params).items()}
  assert shapes["embedder/token_embedder/embedding"] == (VOCAB, 32)
  assert shapes["embedder/position_embedding"] == (16, 32)
  assert shapes["generator/encoder/embedding_projection/kernel"] == (32, 16)
  assert shapes["generator/encoder/layers_1/attention/query/kernel"] == (16, 16)
  assert shapes["generator/encoder/layers_0/mlp/wi/kernel"] == (16, 32)
  assert shapes["generator/mlm_head/dense/kernel"] == (16, 32)
  assert shapes["generator/mlm_head/layer_norm/scale"] == (32,)
  assert shapes["generator/mlm_head/output_bias"] == (VOCAB,)
  assert shapes["discriminator/encoder/layers_1/mlp/wo/kernel"] == (64, 32)
  assert shapes["discriminator/binary_head/dense/kernel"] == (32, 32)
  assert shapes["discriminator/binary_head/logit/kernel"] == (32,)
  assert "discriminator/encoder/embedding_projection/kernel" not in shapes
  # 2 shared tables; generator: projection + 2 x (2 norms + 4 attention + 2 mlp) + norm + 3
  # head; discriminator: 2 x 8 + norm + 2 head.
  assert len(shapes) == 2 + (1 + 2 * 8 + 1 + 3) + (2 * 8 + 1 + 2)
  # The embeddings exist once: no other table in the generator or discriminator.
  tables = [k for k in shapes if k.endswith("embedding")]
  assert tables == ["embedder/position_embedding", "embedder/token_embedder/embedding"]


def test_logical_axes_on_every_parameter(electra_setup):
  model, _, batch, _, _ = electra_setup
  boxed = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
  specs = tree_paths(nn.get_partition_spec(boxed))
  names = {k: tuple(v) for k, v in specs.items()}
  assert names["embedder/token_embedder/embedding"] == ("vocab", "embed")
  assert names["embedder/position_embedding"] == ("length", "embed")
  assert names["generator/mlm_head/output_bias"] == ("vocab",)
  assert names["discriminator/binary_head/logit/kernel"] == ("mlp",)
  known = {name for name, _ in partitioning.DATA_FSDP_TENSOR_RULES}
  assert all(spec and all(a in known for a in spec) for spec in names.values()), names
  assert names["generator/encoder/embedding_projection/kernel"] == ("embed", "mlp")
  assert names["generator/mlm_head/dense/kernel"] == ("mlp", "embed")
  for rules in partitioning.RULE_PRESETS.values():  # every preset resolves every parameter
    for spec in names.values():
      nn.logical_to_mesh_axes(spec, rules)


def test_electra_loss_matches_numpy_float64(electra_setup, electra_reference):
  model, params, batch, loss_fn, forward = electra_setup
  r = electra_reference
  out = jax.device_get(forward(params, batch, None))
  masked = batch["mlm_weights"] > 0
  np.testing.assert_allclose(out["generator_logits"], r["generator_logits"], rtol=2e-4, atol=2e-4)
  np.testing.assert_array_equal(out["sampled"][masked], r["sampled"][masked])
  np.testing.assert_array_equal(out["corrupted"], r["corrupted"])
  np.testing.assert_array_equal(out["replaced"], r["replaced"])
  valid = batch["encoder_target_tokens"] > 0
  np.testing.assert_allclose(out["discriminator_logits"][valid], r["discriminator_logits"][valid],
                             rtol=2e-4, atol=2e-4)
  loss, stats = loss_fn(params, batch, None)
  metrics = model.metrics(stats)
  assert float(loss) == pytest.approx(r["loss"], rel=1e-4)
  assert float(stats["loss_sum"] / stats["weight_sum"]) == pytest.approx(r["loss"], rel=1e-4)
  assert float(metrics["generator_loss"]) == pytest.approx(r["generator_loss"], rel=1e-4)
  assert float(metrics["discriminator_loss"]) == pytest.approx(r["discriminator_loss"], rel=1e-4)
  assert float(metrics["accuracy"]) == pytest.approx(r["discriminator_accuracy"], abs=1e-6)
  weights = batch["mlm_weights"]
  assert weights.max() == 2 and np.any(masked & (batch["encoder_input_tokens"] != REAL_VOCAB - 1))
  assert float(stats["weight_sum"]) == weights.sum() == masked.sum() + 1  # every draw counts
  assert float(stats["nonpadding_tokens"]) == valid.sum() == 31
  assert float(metrics["replaced_fraction"]) == pytest.approx(r["replaced"].sum() / valid.sum())
  assert 0 < r["replaced"].sum() <= masked.sum()


def test_sampling_skips_padding_and_padded_rows(electra_setup, electra_reference):
  _, _, batch, _, _ = electra_setup
  masked = batch["mlm_weights"] > 0
  # Ids 0 and >= REAL_VOCAB have the largest logits (+30), yet are never sampled.
  favourite = electra_reference["generator_logits"][masked].argmax(-1)
  assert ((favourite == 0) | (favourite >= REAL_VOCAB)).all()
  sampled = electra_reference["sampled"][masked]
  assert ((sampled > 0) & (sampled < REAL_VOCAB)).all()


def test_inverse_cdf_sampling_draws_the_first_id_past_the_uniform_number():
  """`sample_by_inverse_cdf` against float64 prefix sums: a vocabulary that is not a
  multiple of the block, masked ids at both ends, u = 0 and the largest u below 1."""
  rng = np.random.default_rng(0)
  logits = (3 * rng.normal(size=(256, 300))).astype(np.float32)
  logits[:, 0] = -np.inf
  logits[:, 250:] = -np.inf
  uniforms = rng.random(256).astype(np.float32)
  uniforms[:2] = [0.0, np.nextafter(np.float32(1), np.float32(0))]
  got = np.asarray(jax.jit(lambda l, u: electra.sample_by_inverse_cdf(l, u, block=32))(
      logits, uniforms))
  probs = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
  cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
  np.testing.assert_array_equal(got, (cdf <= uniforms[:, None].astype(np.float64)).sum(-1))
  assert got[0] == 1 and got[1] == 249  # the first and the last id with mass
  # Frequencies over many draws follow the probabilities (one row, 4,000 draws).
  row = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
  draws = np.asarray(electra.sample_by_inverse_cdf(
      jnp.broadcast_to(row, (4000, 4)), jax.random.uniform(jax.random.key(3), (4000,)), block=2))
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05],
                             atol=0.025)


def test_eval_is_deterministic_and_training_samples_vary(electra_setup):
  model, params, batch, loss_fn, forward = electra_setup
  a, b = forward(params, batch, None), forward(params, batch, None)
  np.testing.assert_array_equal(np.asarray(a["corrupted"]), np.asarray(b["corrupted"]))
  c = forward(params, batch, jax.random.key(5))
  d = forward(params, batch, jax.random.key(5))
  e = forward(params, batch, jax.random.key(6))
  np.testing.assert_array_equal(np.asarray(c["corrupted"]), np.asarray(d["corrupted"]))
  assert not np.array_equal(np.asarray(c["corrupted"]), np.asarray(e["corrupted"]))


@pytest.fixture(scope="module")
def electra_grads(electra_setup):
  model, params, batch, _, _ = electra_setup
  rng = jax.random.key(7)

  def grads(p):
    stat = lambda key: (lambda q: model.loss_fn(q, batch, rng)[1][key])
    _, stats = model.loss_fn(p, batch, rng)
    m, n = stats["weight_sum"], stats["nonpadding_tokens"]
    paper = lambda q: (model.loss_fn(q, batch, rng)[1]["generator_loss_sum"] / m
                       + LAMBDA * model.loss_fn(q, batch, rng)[1]["discriminator_loss_sum"] / n)
    trainer = lambda q: model.loss_fn(q, batch, rng)[1]["loss_sum"] / m
    return {"gen": jax.grad(stat("generator_loss_sum"))(p),
            "disc": jax.grad(stat("discriminator_loss_sum"))(p),
            "paper": jax.grad(paper)(p), "trainer": jax.grad(trainer)(p)}
  return jax.device_get(jax.jit(grads)(params))


def test_shared_embeddings_get_gradients_from_both_losses(electra_grads):
  for table in ("token_embedder/embedding", "position_embedding"):
    gen = tree_paths(electra_grads["gen"])[f"embedder/{table}"]
    disc = tree_paths(electra_grads["disc"])[f"embedder/{table}"]
    assert np.abs(gen).max() > 0 and np.abs(disc).max() > 0
    assert not np.allclose(gen, disc)


def test_no_gradient_through_the_samples(electra_grads):
  # The discriminator loss reaches the generator only through the sampled
  # tokens: its gradient w.r.t. every generator-only parameter is exactly 0.
  for path, g in tree_paths(electra_grads["disc"]["generator"]).items():
    assert not np.any(g), path
  for path, g in tree_paths(electra_grads["gen"]["discriminator"]).items():
    assert not np.any(g), path
  assert any(np.any(g) for g in jax.tree.leaves(electra_grads["disc"]["discriminator"]))
  assert any(np.any(g) for g in jax.tree.leaves(electra_grads["gen"]["generator"]))


def test_trainer_gradient_is_the_papers(electra_grads):
  # grad(loss_sum) / weight_sum == grad(L_MLM + λ L_Disc), parameter by parameter.
  paper, trainer = tree_paths(electra_grads["paper"]), tree_paths(electra_grads["trainer"])
  for path in paper:
    np.testing.assert_allclose(trainer[path], paper[path], rtol=1e-4, atol=1e-6, err_msg=path)


def test_discriminator_params_extraction(electra_setup):
  model, params, batch, _, forward = electra_setup
  disc = model.discriminator_params(params)
  assert sorted(disc) == ["binary_head", "embedder", "encoder"]
  assert disc["embedder"]["token_embedder"]["embedding"] is \
      params["embedder"]["token_embedder"]["embedding"]
  network = model.discriminator_network()
  expected = jax.eval_shape(network.init, jax.random.key(0), batch["encoder_input_tokens"])
  expected = jax.tree.map(lambda x: x.shape, nn.meta.unbox(expected["params"]))
  assert jax.tree.map(lambda x: x.shape, disc) == expected
  out = forward(params, batch, None)
  logits = network.apply({"params": disc}, out["corrupted"], batch["encoder_segment_ids"],
                         batch["encoder_positions"])
  valid = batch["encoder_target_tokens"] > 0
  np.testing.assert_allclose(np.asarray(logits)[valid],
                             np.asarray(out["discriminator_logits"])[valid], rtol=1e-5, atol=1e-5)


def test_mismatched_shared_sizes_are_refused():
  with pytest.raises(ValueError, match="embedding_size"):
    electra.ElectraModel(dataclasses.replace(GEN, embedding_dim=16), DISC)
  with pytest.raises(ValueError, match="sampling_temperature"):
    electra.ElectraModel(GEN, DISC, sampling_temperature=0.0)


# -- MLM --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlm_setup():
  model = encoder.MLMModel(encoder.EncoderNetwork(MLM_CFG, head="mlm"))
  batch = make_batch(mlm.MaskedLanguageModeling(), seed=3)
  params = perturb(nn.meta.unbox(model.init(jax.random.key(4), batch)["params"]),
                   np.random.default_rng(5))
  return model, params, batch


def test_mlm_loss_matches_numpy_float64(mlm_setup):
  model, params, batch = mlm_setup
  p = jax.device_get(params)
  logits = ref.forward(p["embedder"], p, "mlm", batch["encoder_input_tokens"], MLM_CFG.num_heads,
                       batch["encoder_segment_ids"], batch["encoder_positions"])
  targets, weights = batch["encoder_target_tokens"], batch["mlm_weights"]
  ref_loss = np.sum(ref.cross_entropy(logits, targets) * weights) / weights.sum()
  loss, stats = jax.jit(model.loss_fn)(params, batch, None)
  assert float(loss) == pytest.approx(ref_loss, rel=1e-4)
  assert float(stats["weight_sum"]) == weights.sum() > 0
  assert float(stats["correct"]) == np.sum((logits.argmax(-1) == targets) * weights)
  assert float(model.metrics(stats)["loss"]) == pytest.approx(ref_loss, rel=1e-4)


def test_packed_segments_match_separate_rows(mlm_setup):
  model, params, batch = mlm_setup
  packed = np.asarray(model.logits(params, batch))[2]
  first = {"encoder_input_tokens": batch["encoder_input_tokens"][2:3, :6]}
  second = {"encoder_input_tokens": batch["encoder_input_tokens"][2:3, 6:10]}
  np.testing.assert_allclose(packed[:6], np.asarray(model.logits(params, first))[0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[6:10], np.asarray(model.logits(params, second))[0],
                             rtol=1e-5, atol=1e-5)


# -- masking transforms ------------------------------------------------------------------------
def test_mlm_masking_exact_layout():
  tokens = np.arange(2, 42, dtype=np.int32)
  out = mlm.MaskedLanguageModeling().transform(tokens, np.random.default_rng(6),
                                               vocab_size=8100, eos_id=EOS)
  chosen = [2, 16, 23, 26, 33, 35]
  np.testing.assert_array_equal(np.flatnonzero(out["mlm_weights"]), chosen)
  # [MASK] = <extra_id_0> = 8099; position 23 kept (25), position 33 random (7095).
  np.testing.assert_array_equal(out["inputs"][chosen], [8099, 8099, 25, 8099, 7095, 8099])
  rest = np.setdiff1d(np.arange(40), chosen)
  np.testing.assert_array_equal(out["inputs"][rest], tokens[rest])
  np.testing.assert_array_equal(out["targets"], tokens)
  assert out["inputs"].dtype == np.int32 and out["mlm_weights"].dtype == np.float32
  again = mlm.MaskedLanguageModeling().transform(tokens, np.random.default_rng(6),
                                                 vocab_size=8100, eos_id=EOS)
  np.testing.assert_array_equal(again["inputs"], out["inputs"])


def test_electra_masking_exact_layout():
  """The released rule: 6 draws on 40 tokens, position 37 drawn twice, position 39's draw
  showing the original token (seed 4)."""
  tokens = np.arange(2, 42, dtype=np.int32)
  objective = electra.ElectraMasking(mask_id=5000)
  out = objective.transform(tokens, np.random.default_rng(4), vocab_size=8100, eos_id=EOS)
  np.testing.assert_array_equal(np.flatnonzero(out["mlm_weights"]), [20, 29, 35, 37, 39])
  np.testing.assert_array_equal(out["mlm_weights"][[20, 29, 35, 37, 39]], [1, 1, 1, 2, 1])
  expected = tokens.copy()
  expected[[20, 29, 35, 37]] = 5000
  np.testing.assert_array_equal(out["inputs"], expected)
  np.testing.assert_array_equal(out["targets"], tokens)
  assert objective.name == "electra"
  assert objective.example_stats(tokens, out) == {"original_tokens": 40, "masked_tokens": 5}


def test_electra_paper_rule_masks_distinct_positions_all_with_mask():
  tokens = np.arange(2, 42, dtype=np.int32)
  objective = electra.ElectraMasking(rule="paper", mask_id=5000)
  out = objective.transform(tokens, np.random.default_rng(0), vocab_size=8100, eos_id=EOS)
  expected = tokens.copy()
  expected[[2, 4, 11, 23, 24, 27]] = 5000
  np.testing.assert_array_equal(out["inputs"], expected)
  np.testing.assert_array_equal(out["mlm_weights"], expected == 5000)
  assert objective.example_stats(tokens, out) == {"original_tokens": 40, "masked_tokens": 6}


@pytest.mark.parametrize("length, draws", [(10, 2), (30, 4), (50, 8), (190, 29), (3, 1)])
def test_electra_draw_count_rounds_as_the_released_code(length, draws):
  # tf.round(float32(n) * 0.15), half to even: 1.5 -> 2, 4.5 -> 4, 7.5 -> 8, 28.500002 -> 29
  # (float64 would give 28), and at least one.
  out = electra.ElectraMasking().transform(np.arange(2, 2 + length, dtype=np.int32),
                                           np.random.default_rng(length), vocab_size=8100,
                                           eos_id=EOS)
  assert out["mlm_weights"].sum() == draws


def test_electra_draws_are_capped_as_max_predictions_per_seq():
  # configure_pretraining.py: max_predictions_per_seq = int((0.15 + 0.005) * 32) = 4, below
  # round(0.15 * 32) = 5; it binds only on sequences shorter than 100 tokens.
  objective = electra.ElectraMasking()
  tokens = np.arange(2, 34, dtype=np.int32)
  transform = lambda o, seed: o.transform(tokens, np.random.default_rng(seed), vocab_size=8100,
                                          eos_id=EOS)
  assert transform(objective, 0)["mlm_weights"].sum() == 5  # no lengths seen yet: no cap
  assert objective.raw_length({"inputs": 32}) == 32
  assert all(transform(objective, seed)["mlm_weights"].sum() == 4 for seed in range(5))
  objective = electra.ElectraMasking()
  objective.raw_length({"inputs": 128})  # the cap is 19 there, the draws round(4.8) = 5
  assert transform(objective, 0)["mlm_weights"].sum() == 5
  fixed = electra.ElectraMasking(max_predictions=3)
  fixed.raw_length({"inputs": 128})
  assert transform(fixed, 0)["mlm_weights"].sum() == 3


def _masking_statistics(objective, n_examples=2000, length=128, vocab_size=8100):
  chosen = mask = kept = random = 0
  for i in range(n_examples):
    rng = np.random.default_rng([11, i])
    tokens = rng.integers(2, vocab_size - 100, size=length).astype(np.int32)
    out = objective.transform(tokens, np.random.default_rng([12, i]), vocab_size=vocab_size,
                              eos_id=EOS)
    sel = out["mlm_weights"] > 0
    np.testing.assert_array_equal(out["inputs"][~sel], tokens[~sel])
    np.testing.assert_array_equal(out["targets"], tokens)
    got = out["inputs"][sel]
    is_mask = got == vocab_size - 1
    is_kept = got == tokens[sel]
    replaced = got[~is_mask & ~is_kept]
    assert ((replaced >= 1) & (replaced < vocab_size - 100) & (replaced != EOS)).all()
    chosen += sel.sum()
    mask += is_mask.sum()
    kept += is_kept.sum()
    random += len(replaced)
  return chosen / (n_examples * length), mask / chosen, random / chosen, kept / chosen, chosen


def test_mlm_masking_statistics():
  rate, mask, random, kept, chosen = _masking_statistics(mlm.MaskedLanguageModeling())
  assert abs(rate - 0.15) <= 0.01
  # 4 binomial standard deviations (a random token equal to the original,
  # p ~ 1e-4, counts as kept).
  for got, p in ((mask, 0.8), (random, 0.1), (kept, 0.1)):
    assert abs(got - p) <= 4 * np.sqrt(p * (1 - p) / chosen), (got, p)


def test_electra_masking_statistics():
  """The released rule at n = 128: 19 draws with replacement, each showing [MASK] with
  probability 0.85. A position is drawn at least once with probability 1 - (1 - 1/n)^19
  (0.1384) and reads [MASK] with probability 1 - (1 - 0.85/n)^19 (0.1189): 85.9% of the
  distinct drawn positions."""
  n, draws, examples = 128, 19, 1000
  distinct = mask = 0
  for i in range(examples):
    tokens = np.random.default_rng([11, i]).integers(2, 8000, size=n).astype(np.int32)
    out = electra.ElectraMasking().transform(tokens, np.random.default_rng([12, i]),
                                             vocab_size=8100, eos_id=EOS)
    drawn = out["mlm_weights"] > 0
    assert out["mlm_weights"].sum() == draws
    np.testing.assert_array_equal(out["inputs"][~drawn], tokens[~drawn])
    shown = out["inputs"][drawn]
    assert np.all((shown == 8099) | (shown == tokens[drawn]))  # [MASK] or the original
    distinct += drawn.sum()
    mask += (shown == 8099).sum()
  total = examples * n
  for count, p in ((distinct, 1 - (1 - 1 / n) ** draws), (mask, 1 - (1 - 0.85 / n) ** draws)):
    # 4 binomial standard deviations over the positions (correlations within a row are
    # negative: the draws per row are fixed, so this is conservative).
    assert abs(count / total - p) <= 4 * np.sqrt(p * (1 - p) / total), (count / total, p)


def test_electra_paper_rule_statistics():
  rate, mask, random, kept, _ = _masking_statistics(electra.ElectraMasking(rule="paper"),
                                                    n_examples=300)
  assert abs(rate - 0.15) <= 0.01
  assert (mask, random, kept) == (1.0, 0.0, 0.0)


def test_masking_edge_cases_and_errors():
  objective = mlm.MaskedLanguageModeling()
  out = objective.transform(np.array([7], np.int32), np.random.default_rng(0), vocab_size=8100,
                            eos_id=EOS)
  assert out["mlm_weights"].tolist() == [1.0]  # at least one position
  assert objective.raw_length({"inputs": 128, "targets": 128}) == 128
  with pytest.raises(ValueError, match="inputs"):
    objective.raw_length({"targets": 128})
  with pytest.raises(ValueError, match="too short"):
    objective.raw_length({"inputs": 1})
  with pytest.raises(ValueError, match="mask_rate"):
    mlm.MaskedLanguageModeling(mask_rate=0.0)
  with pytest.raises(ValueError, match="fraction"):
    mlm.MaskedLanguageModeling(mask_token_fraction=0.9, random_token_fraction=0.2)
  with pytest.raises(ValueError, match="rule"):
    electra.ElectraMasking(rule="bert")


# -- gin -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["models/encoder/base.gin", "models/encoder/tiny.gin"])
def test_gin_model_files(name):
  gin_config.configure([name])
  try:
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    mlm_model = gin.get_configurable(encoder.MLMModel)()
  finally:
    gin.clear_config()
  gen, disc = model.generator_config, model.discriminator_config
  assert isinstance(model, electra.ElectraModel) and model.discriminator_weight == 50.0
  assert disc.vocab_size == 8192 and model.sampling_vocab_size == 8100
  assert gen.num_layers == disc.num_layers and gen.embedding_size == disc.embedding_size
  assert mlm_model.network.config == disc
  multiplier = 1 / 3 if name.endswith("base.gin") else 1 / 4  # ELECTRA Table 6
  for field in ("emb_dim", "mlp_dim", "num_heads"):
    assert getattr(gen, field) == pytest.approx(getattr(disc, field) * multiplier, abs=0.5)
  if name.endswith("tiny.gin"):
    batch = {"encoder_input_tokens": jax.ShapeDtypeStruct((2, 32), jnp.int32)}
    params = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
    shapes = {k: v.shape for k, v in tree_paths(nn.meta.unbox(params)).items()}
    assert shapes["embedder/token_embedder/embedding"] == (8192, 64)
    assert shapes["generator/encoder/embedding_projection/kernel"] == (64, 16)


# -- trainer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options,num_microbatches", [
    ({}, 1),
    pytest.param({"scan_layers": True, "remat_policy": "full", "dtype": "bfloat16",
                  "dropout_rate": 0.1}, 2, marks=pytest.mark.slow,
                 id="scanned-remat-bf16-microbatches")])
def test_trainer_step(options, num_microbatches):
  """One Trainer step (real partitioner and optimizer); the slow variant ~35 s on 2 CPUs."""
  from t5xlike import optim
  from t5xlike.training import trainer as trainer_lib
  model = electra.ElectraModel(dataclasses.replace(GEN, **options),
                               dataclasses.replace(DISC, **options), vocabulary=FakeVocabulary())
  schedule = optim.constant(0.01)
  trainer = trainer_lib.Trainer(
      model, optim.adafactor(schedule), schedule,
      partitioning.Partitioner({"data": 1}, partitioning.DATA_FSDP_TENSOR_RULES),
      num_microbatches=num_microbatches)
  batch = make_batch(electra.ElectraMasking(), seed=8)
  batch = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}  # 4 rows
  state = trainer.init_state(0, batch)
  if options.get("scan_layers"):
    assert state.params["discriminator"]["encoder"]["layers"]["mlp"]["wi"]["kernel"].shape == \
        (2, 32, 64)
  before = np.asarray(state.params["embedder"]["token_embedder"]["embedding"])
  state, metrics = trainer.train_step(state, batch)
  metrics = jax.device_get(metrics)
  for key in ("loss", "generator_loss", "generator_accuracy", "discriminator_loss",
              "discriminator_accuracy", "replaced_fraction", "accuracy", "grad_norm"):
    assert np.isfinite(metrics[key]), key
  assert float(metrics["target_tokens"]) == batch["mlm_weights"].sum()
  assert 0.0 < float(metrics["replaced_fraction"]) <= 0.2
  assert not np.allclose(np.asarray(state.params["embedder"]["token_embedder"]["embedding"]),
                         before)
