"""DePT, DSEE and intrinsic-dimension fine-tuning (t5xlike/finetuning/{dept,dsee,fastfood,
intrinsic}.py) against float64 NumPy references: DePT's embedding update is
E[tokens] + scale (A B)[positions] after its prompt, with two learning rates; DSEE's
update is scale (A B + S) with S only on its support (magnitude and GreBsmo supports),
merged = unmerged; the Fastfood projection equals the dense H G Π H B built in NumPy and
has unit columns, SAID / DID parameters equal θ_0 + λ_i (P θ)_i, merged = unmerged;
training moves only the new parameters, the PEFT checkpoint holds only those (DSEE: and
its support) and reloads exactly; the gin files fine-tune from the command line, and a
DePT prompt longer than the inputs is one line, exit 2, nothing written."""
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5xlike import checkpoints, optim, partitioning
from t5xlike.finetuning import dept, dsee, fastfood, intrinsic, peft_registry
from t5xlike.inference import checkpoint_loading
from t5xlike.models import layers
from t5xlike.training import trainer as trainer_lib
from tests import test_peft
from tests.test_peft import flat, logits_of, peft_params, randomised


@pytest.fixture(scope="module")
def bases():
  return test_peft._Bases()


def first_norm_input(wrapped, params, batch, stack):
  """The input of the first RMSNorm of `stack` (the embedded sequence the layers see)."""
  seen = []

  def record(next_fun, args, kwargs, context):
    path = "/".join(str(p) for p in context.module.path)
    if isinstance(context.module, layers.RMSNorm) and path.startswith(stack) and not seen:
      seen.append(np.asarray(args[0], np.float64))
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    wrapped.logits(params, batch)
  return seen[0]


# -- DePT ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["t5", "decoder"])
def test_dept_adds_the_low_rank_update_to_the_token_embeddings(bases, kind):
  method = dept.DePT(length=3, rank=4, max_length=16, init="uniform")
  wrapped, _, params, new = peft_params(method, kind, bases)
  stack = "encoder" if kind == "t5" else "decoder"
  assert sorted(new) == [f"{stack}/dept_a", f"{stack}/dept_b", f"{stack}/prompt"]
  params = randomised(params, r"dept_b$", seed=2)
  p = flat(params)
  a, b, prompt = p[f"{stack}/dept_a"], p[f"{stack}/dept_b"], p[f"{stack}/prompt"]
  assert a.shape == (16, 4) and b.shape == (4, 32) and prompt.shape == (3, 32)
  assert np.abs(a).max() <= 0.5  # U(-1/sqrt(r), 1/sqrt(r))
  _, _, batch, _ = bases[kind]
  tokens = batch["encoder_input_tokens" if kind == "t5" else "decoder_input_tokens"]
  table = np.asarray(p["token_embedder/embedding"], np.float64)
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  expected_tokens = table[tokens] + dept.offsets(a, b, positions, 8.0 / np.sqrt(4))
  expected = np.concatenate([np.broadcast_to(np.asarray(prompt, np.float64),
                                             (tokens.shape[0],) + prompt.shape),
                             expected_tokens], axis=1)
  got = first_norm_input(wrapped, params, batch, stack)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_dept_trains_prompt_and_low_rank_pair_at_two_learning_rates(bases):
  method = dept.DePT(length=3, rank=4, max_length=16, learning_rate=0.3,
                     low_rank_learning_rate=0.003)
  _, boxed, _, _ = peft_params(method, "t5", bases)
  scales = flat(method.update_scales(boxed))
  assert float(scales["encoder/prompt"]) == 1.0
  assert np.isclose(float(scales["encoder/dept_a"]), 0.01)
  assert np.isclose(float(scales["encoder/dept_b"]), 0.01)
  assert all(not np.asarray(s).any() for k, s in scales.items() if "/dept_" not in k
             and not k.endswith("/prompt"))


@pytest.mark.parametrize("length,max_length,match", [(12, 16, "longer than the inputs"),
                                                      (3, 8, "max_length=8")])
def test_dept_lengths_that_do_not_fit_the_inputs_are_errors(bases, length, max_length,
                                                             match):
  method = dept.DePT(length=length, rank=4, max_length=max_length)
  model, _, batch, _ = bases["t5"]  # 11 input positions
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(method.wrap(model).init, jax.random.key(0), batch)


# -- DSEE ------------------------------------------------------------------------------
def test_grebsmo_is_the_codes_decomposition_and_the_support_its_largest_entries():
  rng = np.random.default_rng(0)
  w = 0.05 * rng.standard_normal((48, 40))
  u, v, s = dsee.grebsmo(w, np.random.default_rng(1))
  cap = round(dsee.RANK_FRACTION * 40)
  assert u.shape[1] <= cap and np.allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-10)
  residual = w - u @ v
  assert np.array_equal(s, np.where(np.abs(residual) < dsee.THRESHOLD, 0.0, residual))
  assert np.count_nonzero(s) > 20
  support = dsee.top_entries(s, 20)
  chosen = np.zeros(s.shape, bool)
  chosen[support[:, 0].astype(int), support[:, 1].astype(int)] = True
  assert chosen.sum() == 20 and np.abs(s[chosen]).min() >= np.abs(s[~chosen]).max()


@pytest.mark.parametrize("kind,support", [
    pytest.param("t5_scanned", "grebsmo", marks=pytest.mark.slow),   # ~45 s
    ("decoder", "magnitude"), ("t5", "grebsmo")])
def test_dsee_delta_is_low_rank_plus_sparse_on_its_support_and_merges(bases, kind, support):
  method = dsee.DSEE(rank=4, num_sparse=8, support=support)
  wrapped, _, params, new = peft_params(method, kind, bases)
  model, base_params, batch, base_logits = bases[kind]
  assert all(np.all(flat(params)[p] == -1) for p in new if p.endswith("dsee_support"))
  assert np.array_equal(logits_of(wrapped, params, batch), base_logits)  # B = 0, S unset
  params = method.initialize(params, None, frozenset())
  params = randomised(params, r"dsee_(b|values)$", seed=4, scale=0.2)
  logits = logits_of(wrapped, params, batch)
  assert not np.allclose(logits, base_logits, atol=1e-3)
  merged = method.merge(params)
  assert sorted(flat(merged)) == sorted(flat(base_params))
  np.testing.assert_allclose(logits_of(model, merged, batch), logits, rtol=1e-5, atol=1e-5)
  p = flat(params)
  kernels = [k[:-len("dsee_a")] + "kernel" for k in p if k.endswith("dsee_a")]
  assert kernels
  for path in kernels:
    prefix = path[:-len("kernel")]
    w = np.asarray(p[path], np.float64)
    stacked = w.ndim == 3
    for layer in range(w.shape[0] if stacked else 1):
      pick = (lambda x: np.asarray(x[layer], np.float64)) if stacked else (
          lambda x: np.asarray(x, np.float64))
      w0, a, b = pick(p[path]), pick(p[prefix + "dsee_a"]), pick(p[prefix + "dsee_b"])
      values, where = pick(p[prefix + "dsee_values"]), pick(p[prefix + "dsee_support"])
      rows, cols = where[:, 0].astype(int), where[:, 1].astype(int)
      scores = (np.abs(w0) if support == "magnitude" else np.abs(dsee.grebsmo(
          w0.T, np.random.default_rng([0, __import__("zlib").crc32(
              re.sub(r"/layers_\d+", "/layers", prefix[:-1]).encode()), layer]))[2].T))
      assert np.array_equal(where, dsee.top_entries(scores, 8))
      delta = pick(flat(merged)[path]) - w0
      sparse = delta / method.scale - a @ b  # S: values on the support, 0 elsewhere
      on = np.zeros(w0.shape, bool)
      on[rows, cols] = True
      np.testing.assert_allclose(sparse[rows, cols], values, atol=1e-5)
      assert np.abs(sparse[~on]).max() < 1e-5


# -- Fastfood and intrinsic dimension ----------------------------------------------------
def hadamard(n):
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def dense_fastfood(ff):
  """(H G Π H B)[:D, :d] / norm as an explicit float64 matrix."""
  n = ff.length
  h = hadamard(n)
  perm = np.zeros((n, n))
  perm[np.arange(n), ff.perm] = 1.0
  full = h @ np.diag(ff.gauss.astype(np.float64)) @ perm @ h @ np.diag(
      ff.signs.astype(np.float64))
  return full[:ff.out_dim, :ff.in_dim] / ff.norm


def test_fwht_is_the_sylvester_hadamard_matrix():
  x = np.random.default_rng(0).standard_normal((3, 64))
  np.testing.assert_allclose(np.asarray(fastfood.fwht(jnp.asarray(x, jnp.float32))),
                             x @ hadamard(64).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("d,big", [(5, 12), (20, 300), (64, 64)])
def test_fastfood_equals_the_dense_hgphb_matrix(d, big):
  ff = fastfood.fastfood_vars(d, big, (3, d))
  theta = np.random.default_rng(d).standard_normal(d)
  np.testing.assert_allclose(np.asarray(fastfood.project(jnp.asarray(theta, jnp.float32), ff)),
                             dense_fastfood(ff) @ theta, rtol=1e-4, atol=1e-5)
  assert ff is fastfood.fastfood_vars(d, big, (3, d))  # regenerated from the seed


def test_fastfood_columns_are_unit_and_nearly_orthogonal():
  square = dense_fastfood(fastfood.fastfood_vars(32, 1024, 7))  # D = L: exact unit columns
  gram = square.T @ square
  np.testing.assert_allclose(np.diag(gram), 1.0, rtol=1e-10)
  off = gram[~np.eye(32, dtype=bool)]
  assert np.abs(off).max() < 0.25 and np.abs(off).mean() < 3.0 / np.sqrt(1024)
  cut = dense_fastfood(fastfood.fastfood_vars(64, 700, 8))  # 700 of 1024 rows kept
  assert abs(np.mean(np.sum(cut ** 2, axis=0)) - 1.0) < 0.1


@pytest.mark.parametrize("kind,said", [("t5", True), pytest.param("t5_scanned", False,
                                                                  marks=pytest.mark.slow)])
def test_intrinsic_parameters_are_theta0_plus_the_projection_and_merge(bases, kind, said):
  method = intrinsic.IntrinsicDimension(dimension=40, said=said, seed=5,
                                        targets=r"norm/scale$")
  wrapped, boxed, params, new = peft_params(method, kind, bases)
  model, base_params, batch, base_logits = bases[kind]
  assert new == (["intrinsic/lambda", "intrinsic/theta"] if said else ["intrinsic/theta"])
  assert np.array_equal(logits_of(wrapped, params, batch), base_logits)  # θ = 0
  sizes = method.sizes(base_params)
  rng = np.random.default_rng(1)
  own = {"theta": rng.standard_normal(40 - (len(sizes) if said else 0)).astype(np.float32)}
  if said:
    own["lambda"] = rng.uniform(0.5, 2.0, len(sizes)).astype(np.float32)
  params = {**params, "intrinsic": own}
  merged = method.merge(params)
  assert sorted(flat(merged)) == sorted(flat(base_params))
  ray = dense_fastfood(method.projection(sizes)) @ own["theta"].astype(np.float64)
  offset = 0
  for i, (path, size) in enumerate(sizes.items()):
    theta0 = np.asarray(flat(base_params)[path], np.float64)
    part = ray[offset:offset + size].reshape(theta0.shape) * (own["lambda"][i] if said else 1)
    np.testing.assert_allclose(flat(merged)[path], theta0 + part, rtol=1e-5, atol=1e-6)
    offset += size
  for path in set(flat(base_params)) - set(sizes):
    assert np.array_equal(flat(merged)[path], flat(base_params)[path])
  logits = logits_of(wrapped, params, batch)
  assert not np.allclose(logits, base_logits, atol=1e-3)
  np.testing.assert_allclose(logits_of(model, merged, batch), logits, rtol=1e-5, atol=1e-5)


# -- training, export and loading ------------------------------------------------------
METHODS = {"dept": (dept.DePT(length=3, rank=4, max_length=16, init="uniform",
                              learning_rate=0.05, low_rank_learning_rate=0.05), "t5"),
           "dsee": (dsee.DSEE(rank=4, num_sparse=8, support="magnitude"), "t5_scanned"),
           "intrinsic": (intrinsic.IntrinsicDimension(dimension=60, seed=2), "decoder")}


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
  """{name: (method, kind, params before, after 3 AdamW steps, export dirs)}."""
  root = tmp_path_factory.mktemp("peft_decomposed")
  out = {}
  for name, (method, kind) in METHODS.items():
    _, base_params, batch, _ = bases[kind]
    base_dir = checkpoints.save_params(root / name / "base", 7, base_params)
    wrapped, _, params, _ = peft_params(method, kind, bases)
    params = method.initialize(params, None, frozenset()) if name == "dsee" else params
    schedule = optim.constant(0.05)
    trainer = trainer_lib.Trainer(wrapped, optim.adamw(schedule), schedule,
                                  partitioning.Partitioner({"data": 1}), finetuning=method)
    state = trainer.state_from_params(params, jnp.asarray(7, jnp.int32), 0, batch)
    for _ in range(3):
      state, _ = trainer.train_step(state, batch)
    after = jax.device_get(state.params)
    out[name] = (method, kind, params, after,
                 method.export(after, root / name / "run", 10, str(base_dir)))
  return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_moves_only_the_new_parameters_and_the_export_holds_them(trained, bases,
                                                                         name):
  method, kind, before, after, written = trained[name]
  before, after_flat = flat(before), flat(after)
  moved = {p for p in before if np.asarray(before[p]).tobytes()
           != np.asarray(after_flat[p]).tobytes()}
  trained_paths = {p for p in before if re.search(method.param_pattern, p)}
  assert moved == trained_paths and moved
  kept = set(checkpoints.own_param_shapes(written[0]))
  support = {p for p in before if p.endswith("/dsee_support")}
  assert kept == trained_paths | support and (support or name != "dsee")
  info = json.loads((written[0] / "peft.json").read_text())
  assert peft_registry.method_from_json(info["method"]) == method
  model, _, batch, _ = bases[kind]
  lengths = {"inputs": 11, "targets": 7} if kind != "decoder" else {"targets": 9}
  loaded_model, params, step = checkpoint_loading.load_model_checkpoint(
      model, str(written[0]), lengths, partitioning.Partitioner(
          {"data": 1}, partitioning.logical_axis_rules("data_fsdp_tensor")))
  assert step == 10
  loaded = flat(jax.device_get(params))
  assert all(np.asarray(loaded[k]).tobytes() == np.asarray(v).tobytes()
             for k, v in after_flat.items())
  trained_logits = logits_of(method.wrap(model), after, batch)
  assert np.array_equal(logits_of(loaded_model, params, batch), trained_logits)
  if name == "dept":  # A position-wise input update merges into no weight.
    assert [w.parent.name for w in written] == ["peft"] and not hasattr(method, "merge")
  else:
    assert [w.parent.name for w in written] == ["peft", "merged"]
    merged, _ = checkpoint_loading.load_checkpoint(model, str(written[1]), lengths,
                                                   test_peft._one_device())
    np.testing.assert_allclose(logits_of(model, merged, batch), trained_logits,
                               rtol=1e-5, atol=1e-5)


# -- the gin files ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
  from tests import test_finetuning_selection as selection_tests
  step_dir = checkpoints.save_params(tmp_path_factory.mktemp("decomposed_gin") / "pretrain",
                                     2, selection_tests.tiny_params())
  return step_dir, selection_tests.load(step_dir)


# One gin file end to end in the default run (DSEE: support chosen, export, merge); the
# other two (40-75 s each on the 2-core host) with -m slow.
@pytest.mark.parametrize("technique,extra", [
    pytest.param("dept", ["--gin.DEPT_PROMPT_LENGTH=4", "--gin.DEPT_MAX_LENGTH=16"],
                 marks=pytest.mark.slow),
    ("dsee", []), pytest.param("intrinsic_dim", [], marks=pytest.mark.slow)])
def test_gin_file_fine_tunes_only_the_new_parameters(tiny_pretrained, tmp_path, technique,
                                                     extra):
  from tests import test_finetuning_selection as selection_tests
  step_dir, start = tiny_pretrained
  model_dir = tmp_path / technique
  assert test_peft.gin_finetune(technique, step_dir, model_dir, 3, *extra) == 0
  full = selection_tests.load(model_dir / "checkpoint_3")
  own = checkpoints.own_param_shapes(model_dir / "peft" / "checkpoint_3")
  added = set(full) - set(start)
  assert added == set(own) and all(full[p].tobytes() == start[p].tobytes() for p in start)
  if technique == "dsee":  # the support was chosen from the checkpoint's kernels
    supports = [full[p] for p in own if p.endswith("dsee_support")]
    assert supports and all((s >= 0).all() for s in supports)
  if technique != "dept":
    merged = selection_tests.load(model_dir / "merged" / "checkpoint_3")
    assert set(merged) == set(start)
    assert any(merged[p].tobytes() != start[p].tobytes() for p in start)


def test_a_dept_prompt_longer_than_the_inputs_is_one_line_exit_2(tiny_pretrained, tmp_path,
                                                                 capsys):
  step_dir, _ = tiny_pretrained  # inputs of 16 tokens, DEPT_PROMPT_LENGTH 40
  assert test_peft.gin_finetune("dept", step_dir, tmp_path / "run", 3) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "longer than the inputs" in err[0]
  assert not (tmp_path / "run").exists()
