"""SPDF: static sparsity held exactly through training, masks in the optimizer state."""
import re

import jax
import numpy as np
import pytest

from t5xlike import flops, optim, partitioning
from t5xlike.models import encoder_decoder, t5
from t5xlike.objectives import spdf
from t5xlike.training import trainer as trainer_lib
from tests import test_t5_model

SPARSITY = 0.75


def make_trainer(sparse: bool, scan_layers: bool = False):
  cfg = t5.T5Config(**{**test_t5_model.CONFIG.__dict__, "scan_layers": scan_layers})
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg))
  schedule = optim.constant(0.01)
  optimizer = optim.adamw(schedule)
  if sparse:
    model = spdf.SparseModel(model, sparsity=SPARSITY, seed=3)
    optimizer = spdf.keep_sparse(optimizer)
  return trainer_lib.Trainer(model, optimizer, schedule, partitioning.Partitioner({"data": 1}))


def flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module", params=[False, pytest.param(True, marks=pytest.mark.slow)],
                ids=["unscanned", "scanned"])  # scanned: ~16 s more, -m slow
def trained(request):
  trainer = make_trainer(sparse=True, scan_layers=request.param)
  batch = test_t5_model.make_batch(np.random.default_rng(0))
  state = trainer.init_state(0, batch)
  initial = flat(jax.device_get(state.params))
  for _ in range(4):
    state, metrics = trainer.train_step(state, batch)
  return initial, jax.device_get(state), jax.device_get(metrics), request.param


def is_sparsified(name):
  return ("attention/" in name or "mlp/" in name) and name.endswith("kernel")


def test_masked_fraction_is_exact_and_zeros_stay_zero(trained):
  initial, state, _, scanned = trained
  final = flat(state.params)
  sparsified = [n for n in final if is_sparsified(n)]
  # Encoder layers: q, k, v, out + wi_0, wi_1, wo; decoder layers add cross-attention.
  assert len(sparsified) == (2 * 7 + 2 * 11 if not scanned else 7 + 11)
  for name in sparsified:
    per_matrix = final[name].reshape((-1,) + final[name].shape[-2:]) if scanned else \
        final[name][None]
    for matrix in per_matrix:
      zeros = int((matrix == 0.0).sum())
      assert zeros == round(SPARSITY * matrix.size), name
    # Exactly the weights zero at init are zero now, and the others moved.
    assert np.array_equal(final[name] == 0.0, initial[name] == 0.0), name
    kept = initial[name] != 0.0
    # (A kept weight whose input features are all masked upstream gets no gradient.)
    assert np.mean(final[name][kept] != initial[name][kept]) > 0.8, name
  for name in final:
    if not is_sparsified(name):
      assert (final[name] == 0.0).sum() == 0, name  # embeddings, norms, output dense


def test_masks_and_adam_moments_are_in_the_optimizer_state(trained):
  _, state, _, _ = trained
  params = flat(state.params)
  owner = lambda name: next(p for p in params if name.endswith(p))
  leaves = flat(state.opt_state)
  masks = {owner(n): v for n, v in leaves.items() if v.dtype == bool}
  assert masks.keys() == {n for n in params if is_sparsified(n)}
  for name, mask in masks.items():
    assert np.array_equal(mask, params[name] != 0.0), name
  moments = [(n, v) for n, v in leaves.items() if v.dtype != bool and v.ndim >= 2]
  assert len(moments) == 2 * len(params) - sum(p.ndim < 2 for p in params.values()) * 2
  for name, value in moments:
    param = owner(name)
    if param in masks:
      assert np.all(value[~masks[param]] == 0.0), name  # Adam's mu / nu of masked weights
      assert np.any(value[masks[param]] != 0.0), name


def _kernel_train_flops(params, encoder_tokens, decoder_tokens, selected):
  """6 x size x the token positions it is applied to, summed over the selected kernels
  (cross-attention keys and values read the encoder's positions)."""
  total = 0.0
  for name, value in params.items():
    if not selected(name):
      continue
    reads_encoder = name.startswith("encoder/") or re.search(
        r"encoder_decoder_attention/(key|value)/", name) is not None
    total += 6.0 * value.size * (encoder_tokens if reads_encoder else decoder_tokens)
  return total


def test_flops_are_logged_dense_and_sparse(trained):
  """train.jsonl's `dense_train_flops` / `sparse_train_flops` (`flops.Accounting`): the
  dense count is `t5xlike.flops`' count of the step (checked against the compiled step's
  matmuls in tests/test_flops.py); the sparse one removes exactly 75% of the FLOPs of the
  kernels whose weights the masks zero, nothing else (attention's QK/PV, the output layer)."""
  _, state, _, scanned = trained
  params = flat(state.params)
  batch = test_t5_model.make_batch(np.random.default_rng(0))
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  model = make_trainer(sparse=True, scan_layers=scanned).model
  fields = flops.accounting(model, shapes).fields(0.5)
  dense, sparse = fields["dense_train_flops"], fields["sparse_train_flops"]
  assert dense == flops.model_step_flops(model.model, shapes).model
  assert sparse == flops.model_step_flops(model, shapes).model
  has_zeros = lambda name: bool(np.any(params[name] == 0.0))
  masked = _kernel_train_flops(params, batch["encoder_input_tokens"].size,
                               batch["decoder_target_tokens"].size, has_zeros)
  assert masked > 0 and dense - sparse == pytest.approx(SPARSITY * masked, rel=1e-9)
  assert fields["mfu"] > 0  # the MFU divides the sparse count


@pytest.mark.slow  # ~20 s
def test_masks_depend_on_the_seed_only():
  boxed = jax.eval_shape(
      make_trainer(False).model.init, jax.random.key(0),
      test_t5_model.make_batch(np.random.default_rng(0)))["params"]
  a = flat(jax.jit(lambda: spdf.weight_masks(boxed, 0.5, seed=1))())
  b = flat(jax.jit(lambda: spdf.weight_masks(boxed, 0.5, seed=1))())
  c = flat(jax.jit(lambda: spdf.weight_masks(boxed, 0.5, seed=2))())
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert any(not np.array_equal(a[k], c[k]) for k in a)
