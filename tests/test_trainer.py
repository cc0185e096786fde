"""Trainer: gradient accumulation, mixed precision, parameter summary."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5xlike import optim, partitioning
from t5xlike.models import encoder_decoder, t5
from t5xlike.training import trainer as trainer_lib
from t5xlike.training.train_state import parameter_summary
from tests import test_t5_model

CONFIG = test_t5_model.CONFIG


def make_trainer(num_microbatches=1, dtype="float32"):
  cfg = t5.T5Config(**{**CONFIG.__dict__, "dtype": dtype})
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg))
  schedule = optim.constant(0.01)
  return trainer_lib.Trainer(model, optim.adafactor(schedule), schedule,
                             partitioning.Partitioner({"data": 1}),
                             num_microbatches=num_microbatches)


def batch_of(size, seed=0):
  rng = np.random.default_rng(seed)
  rows = [test_t5_model.make_batch(rng) for _ in range(size // 2)]
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def full_and_accumulated():
  batch = batch_of(8)
  out = {}
  for k in (1, 4):
    trainer = make_trainer(num_microbatches=k)
    state = trainer.init_state(0, batch)
    state, metrics = trainer.train_step(state, batch)
    out[k] = (jax.device_get(state.params), jax.device_get(metrics))
  return out


def test_accumulation_equals_full_batch(full_and_accumulated):
  (params1, metrics1), (params4, metrics4) = full_and_accumulated[1], full_and_accumulated[4]
  for key in ("loss", "accuracy", "z_loss", "target_tokens"):
    assert float(metrics4[key]) == pytest.approx(float(metrics1[key]), rel=1e-6), key
  assert float(metrics4["grad_norm"]) == pytest.approx(float(metrics1["grad_norm"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params4)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_micro_batches_must_divide_the_batch():
  trainer = make_trainer(num_microbatches=3)
  batch = batch_of(8)
  state = trainer.init_state(0, batch)
  with pytest.raises(TypeError, match="cannot reshape"):  # 8 rows into 3 micro-batches
    trainer.train_step(state, batch)


def test_bfloat16_activations_keep_float32_parameters_and_loss():
  trainer = make_trainer(dtype="bfloat16")
  batch = batch_of(4)
  state = trainer.init_state(0, batch)
  losses = []
  for _ in range(3):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert metrics["loss"].dtype == jnp.float32
  reference = make_trainer()
  ref_state = reference.init_state(0, batch)
  _, ref_metrics = reference.train_step(ref_state, batch)
  assert losses[0] == pytest.approx(float(ref_metrics["loss"]), rel=2e-2)
  assert losses[-1] < losses[0]


def test_parameter_summary_counts_every_parameter(full_and_accumulated):
  params, _ = full_and_accumulated[1]
  rows = dict(parameter_summary(params))
  assert rows["total"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert rows["token_embedder"] == 128 * 32
  assert rows["encoder/layers_0"] == 2 * 32 + 4 * 32 * 32 + 3 * 32 * 48


def abstract(batch):
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def test_background_compile_trains_bit_identically(full_and_accumulated):
  batch = batch_of(8)
  trainer = make_trainer()
  future = trainer.start_compile(abstract(batch))
  state = trainer.init_state(0, batch)
  state, metrics = trainer.train_step(state, batch)
  assert future.done() and future.result() is not None
  # The step ran the background's executable: the jitted step never compiled.
  assert trainer.jitted_step_compilations() == 0
  params1, metrics1 = full_and_accumulated[1]
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(jax.device_get(state.params))):
    assert np.array_equal(a, b)
  assert float(metrics["loss"]) == float(metrics1["loss"])


@pytest.mark.slow  # ~30 s
def test_background_compile_of_other_shapes_is_not_used(full_and_accumulated):
  batch = batch_of(8)
  trainer = make_trainer()
  trainer.start_compile(abstract(batch_of(4))).result()
  state = trainer.init_state(0, batch)
  state, _ = trainer.train_step(state, batch)  # compiles its own (jitted) step
  assert trainer.jitted_step_compilations() == 1
  params1, _ = full_and_accumulated[1]
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(jax.device_get(state.params))):
    assert np.array_equal(a, b)


@pytest.mark.slow  # ~17 s
def test_cancelled_trainer_compiles_nothing_in_the_background(full_and_accumulated):
  batch = batch_of(8)
  trainer = make_trainer()
  trainer.cancel_compile()
  assert trainer.start_compile(abstract(batch)).result() is None
  state = trainer.init_state(0, batch)
  state, _ = trainer.train_step(state, batch)  # its own compilation
  for a, b in zip(jax.tree.leaves(full_and_accumulated[1][0]),
                  jax.tree.leaves(jax.device_get(state.params))):
    assert np.array_equal(a, b)


@pytest.mark.slow  # ~13 s
def test_unoptimised_init_compilation_matches_the_optimised_one_to_rounding():
  batch = batch_of(4)
  trainer = make_trainer()
  state = trainer.init_state(3, batch)
  reference = jax.jit(trainer.state_plan(batch).init_fn)(jax.random.key(3))
  differing = 0
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(state)):
    a, b = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b))
    if a.dtype == np.float32:  # LLVM -O2 contracts a * b + c into FMAs: last-bit changes
      np.testing.assert_array_max_ulp(a, b, maxulp=8)
      differing += int((a != b).sum())
    else:
      assert np.array_equal(a, b)
  assert differing < 0.2 * sum(x.size for x in jax.tree.leaves(reference))
