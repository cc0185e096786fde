"""Decoding: greedy / sampling / beam search against exhaustive references on known
probability tables; cached decoding of T5 and decoder-only models against full forward
passes; scores against the training loss."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5xlike import losses
from t5xlike.inference import decoding
from t5xlike.models import decoder, encoder_decoder, t5

EOS = 1


# -- known probability tables (a Markov chain over the last token) ------------------
def table_model(table: np.ndarray, first: np.ndarray):
  """step_fn whose next-token log-probs depend only on the token fed (table [V, V])."""
  log_table = jnp.log(jnp.asarray(table, jnp.float32))

  def step_fn(tokens, state):
    return log_table[tokens[:, 0]], state + 1

  gather = lambda state, rows: jnp.take(state, rows, axis=0)
  return step_fn, gather, jnp.log(jnp.asarray(first, jnp.float32))


def exhaustive(table, first, max_length, alpha):
  """Every finished sequence (ends at EOS, or reaches max_length) with its
  length-penalised score, best first (float64)."""
  vocab = table.shape[0]
  results = []
  for length in range(1, max_length + 1):
    for seq in itertools.product(range(vocab), repeat=length):
      if EOS in seq[:-1] or (length < max_length and seq[-1] != EOS):
        continue
      logp = np.log(first[seq[0]]) + sum(np.log(table[a, b]) for a, b in zip(seq, seq[1:]))
      results.append((logp / ((5.0 + length) / 6.0) ** alpha, seq))
  return sorted(results, key=lambda r: -r[0])


def random_tables(seed, vocab, rows=2):
  rng = np.random.default_rng(seed)
  tables = rng.dirichlet(np.ones(vocab) * 0.7, size=vocab)
  firsts = rng.dirichlet(np.ones(vocab) * 0.7, size=rows)
  return tables, firsts


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_search_equals_exhaustive_search(alpha):
  vocab, max_length = 3, 3
  table, firsts = random_tables(0, vocab)
  step_fn, gather, first_logits = table_model(table, np.ones(vocab) / vocab)
  first_logits = jnp.log(jnp.asarray(firsts, jnp.float32))
  k = vocab ** (max_length - 1)  # Wide enough to be exact at this size.
  tokens, scores = jax.jit(lambda f: decoding.beam_search(
      step_fn, jnp.zeros(2), f, max_length, EOS, k, gather, alpha))(first_logits)
  for row in range(2):
    expected = exhaustive(table, firsts[row], max_length, alpha)[:k]
    got = decoding.trim_after_eos(np.asarray(tokens[row]), EOS)
    np.testing.assert_allclose(np.asarray(scores[row]), [s for s, _ in expected], rtol=1e-5)
    # Ties aside, the same sequences in the same order.
    assert [tuple(g[:len(seq)]) for g, (_, seq) in zip(got, expected)] == [
        seq for _, seq in expected]


def test_beam_search_finds_the_best_sequence_greedy_misses():
  # Vocab: 0 pad, 1 EOS, 2 "A", 3 "B". First token: A 0.6, B 0.4. After A everything is
  # flat-ish (best continuation p 0.34 each step); after B, EOS with p 0.99.
  table = np.array([[0.25, 0.25, 0.25, 0.25],
                    [0.25, 0.25, 0.25, 0.25],
                    [0.33, 0.33, 0.34, 0.00001],
                    [0.003, 0.99, 0.003, 0.004]])
  table = table / table.sum(1, keepdims=True)
  first = np.array([0.0001, 0.0001, 0.6, 0.4]) / 1.0002
  step_fn, gather, first_logits = table_model(table, first)
  first_logits = first_logits[None]
  greedy, _ = decoding.sample(step_fn, jnp.zeros(1), first_logits, 4, EOS, greedy=True)
  assert list(np.asarray(greedy[0])) == [2, 2, 2, 2]  # A A A A (p 0.6 * 0.34^3)
  beams, scores = decoding.beam_search(step_fn, jnp.zeros(1), first_logits, 4, EOS, 2,
                                       gather, alpha=0.0)
  assert list(np.asarray(beams[0, 0])) == [3, 1, 0, 0]  # B EOS
  best = exhaustive(table, first, 4, 0.0)[0]
  assert best[1] == (3, 1)
  np.testing.assert_allclose(float(scores[0, 0]), best[0], rtol=1e-5)


def test_beam_size_one_is_greedy_and_top_k_one_sampling_is_greedy():
  table, firsts = random_tables(3, 6, rows=4)
  step_fn, gather, _ = table_model(table, firsts[0])
  first_logits = jnp.log(jnp.asarray(firsts, jnp.float32))
  greedy, greedy_scores = decoding.sample(step_fn, jnp.zeros(4), first_logits, 6, EOS,
                                          greedy=True)
  beam, _ = decoding.beam_search(step_fn, jnp.zeros(4), first_logits, 6, EOS, 1, gather,
                                 alpha=0.0)
  np.testing.assert_array_equal(np.asarray(beam[:, 0]), np.asarray(greedy))
  top1, top1_scores = decoding.sample(step_fn, jnp.zeros(4), first_logits, 6, EOS,
                                      rng=jax.random.key(5), top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
  np.testing.assert_allclose(np.asarray(top1_scores), np.asarray(greedy_scores), rtol=1e-6)
  # Greedy against a NumPy walk: argmax, stop after EOS, zeros after it; scores summed log p.
  for row in range(4):
    probs, expected, logp = firsts[row], [], 0.0
    for _ in range(6):
      token = int(np.argmax(probs))
      expected.append(token)
      logp += np.log(probs[token])
      if token == EOS:
        break
      probs = table[token]
    assert list(np.asarray(greedy[row]))[:len(expected)] == expected
    assert not np.asarray(greedy[row])[len(expected):].any()
    np.testing.assert_allclose(float(greedy_scores[row]), logp, rtol=1e-5)


def test_sampling_follows_filtered_distribution():
  probs = np.array([0.05, 0.1, 0.45, 0.3, 0.1])
  logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
  step_fn = lambda tokens, state: (logits, state)
  draw = lambda **kw: np.asarray(decoding.sample(step_fn, 0, logits, 1, EOS,
                                                 rng=jax.random.key(0), **kw)[0][:, 0])
  counts = np.bincount(draw(), minlength=5) / 4000
  np.testing.assert_allclose(counts, probs, atol=0.025)
  # top_p 0.7: the smallest set reaching 0.7 is {2, 3} (0.45 + 0.3); renormalised.
  counts = np.bincount(draw(top_p=0.7), minlength=5) / 4000
  np.testing.assert_allclose(counts, [0, 0, 0.6, 0.4, 0], atol=0.025)
  counts = np.bincount(draw(top_k=3), minlength=5) / 4000
  assert set(np.nonzero(counts)[0]) <= {1, 2, 3, 4} and counts[0] == 0
  # Temperature -> 0 concentrates on the argmax.
  assert (draw(temperature=1e-3) == 2).all()


# -- models ------------------------------------------------------------------------
T5_CONFIG = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=4, num_encoder_layers=2,
                        num_decoder_layers=2, head_dim=8, mlp_dim=48)
DEC_CONFIG = decoder.DecoderConfig(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2,
                                   num_layers=2, head_dim=8, mlp_dim=48)


def _randomise_scales(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1.0 + 0.5 * rng.standard_normal(x.shape).astype(np.float32))
      if "scale" in str(path) or "rel_embedding" in str(path) else x, params)


# Scanned layers decode like unscanned ones (-m slow: a second model's compiles; the
# scanned cache layout is also covered by test_decoder_model and test_prepacking).
SCANNED_SLOW = ["unscanned", pytest.param("scanned", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=SCANNED_SLOW)
def t5_model(request):
  return _t5_model(request.param == "scanned")


@pytest.fixture(scope="module")
def t5_unscanned():
  return _t5_model(False)


@functools.cache
def _t5_model(scanned):
  cfg = t5.T5Config(**{**T5_CONFIG.__dict__, "scan_layers": scanned})
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg), z_loss=0.0)
  batch = {"encoder_input_tokens": np.ones((2, 9), np.int32),
           "decoder_input_tokens": np.zeros((2, 6), np.int32),
           "decoder_target_tokens": np.ones((2, 6), np.int32),
           "decoder_loss_weights": np.ones((2, 6), np.float32)}
  params = nn.meta.unbox(model.init(jax.random.key(2), batch)["params"])
  return model, _randomise_scales(params, 2)


def t5_full_forward_greedy(model, params, encoder_tokens, max_length):
  """Greedy decoding by full forward passes without a cache (NumPy loop)."""
  logits_fn = jax.jit(model.logits)
  rows = encoder_tokens.shape[0]
  generated = np.zeros((rows, max_length), np.int32)
  done = np.zeros(rows, bool)
  for t in range(max_length):
    dec_in = np.zeros((rows, max_length), np.int32)
    dec_in[:, 1:t + 1] = generated[:, :t]
    batch = {"encoder_input_tokens": encoder_tokens, "decoder_input_tokens": dec_in,
             "decoder_target_tokens": np.ones_like(dec_in)}
    step = np.argmax(np.asarray(logits_fn(params, batch))[:, t], axis=-1)
    generated[:, t] = np.where(done, 0, step)
    done |= generated[:, t] == EOS
  return generated


def test_t5_cached_greedy_equals_full_forward_argmax(t5_model):
  model, params = t5_model
  rng = np.random.default_rng(0)
  encoder_tokens = rng.integers(2, 64, (3, 9)).astype(np.int32)
  encoder_tokens[1, 5:] = 0
  encoder_tokens[2, 2:] = 0
  expected = t5_full_forward_greedy(model, params, encoder_tokens, 8)
  row0 = list(expected[0])
  stop = next(i for i in range(1, 8) if row0[i] not in row0[:i])
  eos = row0[stop]  # An EOS id that first appears at row 0's position `stop`.
  predict = jax.jit(model.predict_batch, static_argnums=(2, 3, 4))
  tokens, scores = predict(params, {"encoder_input_tokens": encoder_tokens},
                           decoding.DecodingConfig(), 8, EOS)
  np.testing.assert_array_equal(np.asarray(tokens), expected)
  # With that EOS id, row 0 stops there and is zero after it.
  tokens, _ = predict(params, {"encoder_input_tokens": encoder_tokens},
                      decoding.DecodingConfig(), 8, eos)
  assert list(np.asarray(tokens[0])) == row0[:stop + 1] + [0] * (7 - stop)
  # The greedy score is the score of the generated targets.
  targets = np.asarray(predict(params, {"encoder_input_tokens": encoder_tokens},
                               decoding.DecodingConfig(), 8, EOS)[0])
  score_batch = {"encoder_input_tokens": encoder_tokens, "decoder_target_tokens": targets,
                 "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
                 "decoder_loss_weights": np.ones(targets.shape, np.float32)}
  np.testing.assert_allclose(np.asarray(scores),
                             np.asarray(model.score_batch(params, score_batch)).sum(1),
                             rtol=1e-5)
  beam1 = jax.jit(model.predict_batch, static_argnums=(2, 3, 4))(
      params, {"encoder_input_tokens": encoder_tokens},
      decoding.DecodingConfig(method="beam", num_beams=1, length_penalty_alpha=0.0), 8, EOS)[0]
  np.testing.assert_array_equal(np.asarray(beam1), expected)


@pytest.mark.slow  # ~22 s; beam search against exhaustive search stays
def test_t5_beam_search_scores_its_sequences_like_the_model(t5_unscanned):
  model, params = t5_unscanned
  encoder_tokens = np.random.default_rng(1).integers(2, 64, (2, 9)).astype(np.int32)
  config = decoding.DecodingConfig(method="beam", num_beams=3, length_penalty_alpha=0.0)
  tokens, scores = jax.jit(model.predict_batch, static_argnums=(2, 3, 4))(
      params, {"encoder_input_tokens": encoder_tokens}, config, 5, 7)
  targets = np.asarray(tokens)
  batch = {"encoder_input_tokens": encoder_tokens, "decoder_target_tokens": targets,
           "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": (targets > 0).astype(np.float32)}
  np.testing.assert_allclose(np.asarray(scores),
                             np.asarray(model.score_batch(params, batch)).sum(1), rtol=1e-5)
  greedy_scores = jax.jit(model.predict_batch, static_argnums=(2, 3, 4))(
      params, {"encoder_input_tokens": encoder_tokens}, decoding.DecodingConfig(), 5, 7)[1]
  assert (np.asarray(scores) >= np.asarray(greedy_scores) - 1e-5).all()


@pytest.fixture(scope="module", params=SCANNED_SLOW)
def decoder_model(request):
  return _decoder_model(request.param == "scanned")


@pytest.fixture(scope="module")
def decoder_unscanned():
  return _decoder_model(False)


@functools.cache
def _decoder_model(scanned):
  cfg = decoder.DecoderConfig(**{**DEC_CONFIG.__dict__, "scan_layers": scanned})
  model = decoder.DecoderOnlyModel(decoder.Transformer(cfg), z_loss=0.0)
  batch = {"decoder_input_tokens": np.zeros((2, 8), np.int32),
           "decoder_target_tokens": np.ones((2, 8), np.int32)}
  params = nn.meta.unbox(model.init(jax.random.key(3), batch)["params"])
  return model, _randomise_scales(params, 3)


def prefix_lm_batch(prompts, width):
  """Prefix-LM features of prompts with empty targets (as the decoder converter lays them out)."""
  rows = len(prompts)
  targets = np.zeros((rows, width), np.int32)
  causal = np.zeros((rows, width), np.int32)
  for i, prompt in enumerate(prompts):
    targets[i, :len(prompt)] = prompt
    causal[i, :len(prompt) + 1] = 1
  return {"decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_causal_attention": causal}


def test_decoder_cached_greedy_equals_full_forward_per_row(decoder_model):
  """Ragged prompts decoded together (left-padded in the cache) equal each row
  decoded alone by full prefix-LM forward passes."""
  model, params = decoder_model
  rng = np.random.default_rng(4)
  prompts = [rng.integers(2, 64, n).tolist() for n in (5, 2, 7)]
  max_length = 6
  tokens, _ = jax.jit(model.predict_batch, static_argnums=(2, 3, 4))(
      params, prefix_lm_batch(prompts, 9), decoding.DecodingConfig(), max_length, EOS)
  logits_fn = jax.jit(model.logits)
  for row, prompt in enumerate(prompts):
    generated = []
    for _ in range(max_length):
      sequence = prompt + generated
      batch = prefix_lm_batch([sequence], 16)
      batch["decoder_causal_attention"][0, len(prompt) + 1:] = 0  # Prefix = the prompt only.
      batch["decoder_target_tokens"][0, len(sequence)] = 5  # Any id: marks the position real.
      logits = np.asarray(logits_fn(params, batch))[0, len(sequence)]
      generated.append(int(np.argmax(logits)))
      if generated[-1] == EOS:
        break
    got = list(np.asarray(tokens[row]))
    assert got[:len(generated)] == generated
    assert not any(got[len(generated):])


def test_causal_decoder_generates_from_bos(decoder_unscanned):
  model, params = decoder_unscanned
  causal = {"decoder_input_tokens": np.zeros((2, 4), np.int32)}
  tokens, _ = jax.jit(model.predict_batch, static_argnums=(2, 3, 4))(
      params, causal, decoding.DecodingConfig(), 3, EOS)
  targets = np.zeros((1, 4), np.int32)
  for t in range(3):
    batch = {"decoder_target_tokens": np.where(np.arange(4) <= t, 5, 0)[None].astype(np.int32),
             "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0)))}
    targets[0, t] = int(np.argmax(np.asarray(model.logits(params, batch))[0, t]))
  np.testing.assert_array_equal(np.asarray(tokens), np.repeat(targets[:, :3], 2, axis=0))


def test_score_is_minus_the_summed_token_losses(t5_unscanned, decoder_unscanned):
  rng = np.random.default_rng(5)
  model, params = t5_unscanned
  targets = rng.integers(2, 64, (3, 6)).astype(np.int32)
  targets[1, 4:] = 0
  batch = {"encoder_input_tokens": rng.integers(1, 64, (3, 9)).astype(np.int32),
           "decoder_target_tokens": targets,
           "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": (targets > 0).astype(np.float32)}
  scores = np.asarray(model.score_batch(params, batch))
  logits = model.logits(params, batch)
  for row in range(3):
    loss_sum, _ = losses.cross_entropy_with_z_loss(
        logits[row:row + 1], targets[row:row + 1], batch["decoder_loss_weights"][row:row + 1],
        z_loss=0.0)
    np.testing.assert_allclose(scores[row].sum(), -float(loss_sum), rtol=1e-5)
  assert (scores[1, 4:] == 0).all() and (scores[:, :4] < 0).all()
  model, params = decoder_unscanned
  batch = prefix_lm_batch([[5, 6, 7], [8]], 8)
  batch["decoder_target_tokens"][0, 3:5] = [9, 10]
  batch["decoder_target_tokens"][1, 1:4] = [11, 12, 13]
  batch["decoder_input_tokens"] = np.pad(batch["decoder_target_tokens"][:, :-1], ((0, 0), (1, 0)))
  weights = np.zeros((2, 8), np.float32)
  weights[0, 3:5], weights[1, 1:4] = 1, 1
  batch["decoder_loss_weights"] = weights
  scores = np.asarray(model.score_batch(params, batch))
  loss_sum, _ = losses.cross_entropy_with_z_loss(model.logits(params, batch),
                                                 batch["decoder_target_tokens"], weights, 0.0)
  np.testing.assert_allclose(scores.sum(), -float(loss_sum), rtol=1e-5)
  assert (scores[weights == 0] == 0).all()


def test_greedy_scores_flag_the_argmax_tokens(t5_unscanned):
  """`greedy_scores`: score_batch's scores, and True where the target is the argmax of the
  logits (NumPy) on a weighted position; the first targets are made the argmax (the first
  position's logits read BOS alone, so they do not change)."""
  rng = np.random.default_rng(6)
  model, params = t5_unscanned
  targets = rng.integers(2, 64, (3, 6)).astype(np.int32)
  targets[2, 3:] = 0
  batch = {"encoder_input_tokens": rng.integers(1, 64, (3, 9)).astype(np.int32),
           "decoder_target_tokens": targets,
           "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": (targets > 0).astype(np.float32)}
  targets[:, 0] = np.argmax(np.asarray(model.logits(params, batch))[:, 0], axis=-1)
  batch["decoder_input_tokens"] = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  scores, greedy = map(np.asarray, model.greedy_scores(params, batch))
  argmax = np.argmax(np.asarray(model.logits(params, batch)), axis=-1)
  np.testing.assert_array_equal(greedy, (argmax == targets) & (targets > 0))
  assert greedy[:, 0].all() and not greedy[2, 3:].any()
  np.testing.assert_allclose(scores, np.asarray(model.score_batch(params, batch)), rtol=1e-6)


def test_filter_logits_equals_sorting_reference():
  logits = np.asarray(jax.random.normal(jax.random.key(0), (16, 300))) * 3.0
  for k in (1, 7, 40, 299):
    kept = np.asarray(decoding.filter_logits(jnp.asarray(logits), top_k=k)) > NEG_KEPT
    np.testing.assert_array_equal(kept, logits >= np.sort(logits, axis=1)[:, -k][:, None])
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  order = np.argsort(-probs, axis=1)
  cumulative = np.cumsum(np.take_along_axis(probs, order, 1), axis=1)

  def nucleus(p):  # the smallest set of most likely tokens holding >= p of the mass
    sets = np.zeros(probs.shape, bool)
    for row, size in enumerate((cumulative < p).sum(1) + 1):
      sets[row, order[row, :size]] = True
    return sets

  for p in (0.1, 0.5, 0.9, 0.99):
    kept = np.asarray(decoding.filter_logits(jnp.asarray(logits), top_p=p)) > NEG_KEPT
    # Float32 sums may differ from float64 by ~1e-6 at the boundary.
    assert (nucleus(p - 1e-5) <= kept).all() and (kept <= nucleus(p + 1e-5)).all()


NEG_KEPT = decoding.NEG_INF / 2
