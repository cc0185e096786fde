"""Sparse fine-tuning (finetuning/sparse.py) and sparse deltas (finetuning/sparse_delta.py):
the reference's (composable-sft) parameter roles, reset, global top-k, learning-rate
restart and per-entry statistics; deltas exact in float64."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5xlike import checkpoints, infer, merge, optim, partitioning
from t5xlike.finetuning import freezing, selection, sparse, sparse_delta, updates
from t5xlike.training import trainer as trainer_lib
from tests import test_finetuning_selection as tfs

K_DENSE, K_TRAIN = 2, 37
#: The reference's roles on the test T5: the head trains whole, the norms never.
HEAD = "decoder/logits_dense/kernel"
NORM = re.compile(selection.NORM_PATTERN)


def make_trainer(scan, technique):
  schedule = optim.constant(0.01)
  return trainer_lib.Trainer(tfs.make_model(scan), optim.adamw(schedule, weight_decay=0.1),
                             schedule, partitioning.Partitioner({"data": 1}),
                             finetuning=technique)


def flat_host(tree):
  return tfs.flat(jax.device_get(tree))


@pytest.fixture(scope="module")
def runs():
  """{scan: (trainer, theta0, params after each of 4 steps, the state after step 3)}:
  AdamW with weight decay (it would move every trained weight), K=2 dense steps."""
  out = {}
  for scan in (False, True):
    trainer = make_trainer(scan, sparse.SparseFineTuning(dense_steps=K_DENSE,
                                                         num_trainable=K_TRAIN))
    state = trainer.init_state(0, tfs.batch())
    theta0, history, saved = flat_host(state.params), [], None
    for step in range(4):
      state, _ = trainer.train_step(state, tfs.batch())
      history.append(flat_host(state.params))
      if step == 2:
        saved = jax.device_get(state)
    out[scan] = (trainer, theta0, history, saved, jax.device_get(state))
  return out


@pytest.mark.parametrize("scan", [False, True])
def test_reset_then_only_the_chosen_k_change_the_rest_bit_identical(runs, scan):
  trainer, theta0, history, _, final = runs[scan]
  # Step 1 is dense: every parameter but the norms moved (the reference's maskable
  # base-model parameters, embeddings and relative position biases included, and the
  # head; `--freeze_layer_norm`).
  moved = {p for p in theta0 if history[0][p].tobytes() != theta0[p].tobytes()}
  assert moved == {p for p in theta0 if not NORM.search(p)}
  assert {"token_embedder/embedding", "encoder/relpos_bias/rel_embedding", HEAD} <= moved
  # Step K resets every parameter to theta0 bit for bit.
  assert all(history[K_DENSE - 1][p].tobytes() == theta0[p].tobytes() for p in theta0)
  # Afterwards exactly the masked scalars may differ; the mask holds exactly k
  # candidates plus the whole head, which trains densely in both phases.
  mask = sparse_delta.flatten(final.opt_state.mask)
  assert mask[HEAD].all()
  assert sum(int(m.sum()) for p, m in mask.items() if p != HEAD) == K_TRAIN
  changed = 0
  for path, value in history[-1].items():
    allowed = mask.get(path, np.zeros(value.shape, bool))
    differs = value.view(np.uint32) != theta0[path].view(np.uint32)
    assert not (differs & ~allowed).any(), path
    changed += int(differs.sum()) if path != HEAD else 0
  assert 0 < changed <= K_TRAIN
  assert (history[-1][HEAD] != theta0[HEAD]).all()  # AdamW moved every head entry
  assert int(final.opt_state.count) == 4


def test_the_chosen_subset_is_the_top_k_change_of_the_dense_phase(runs):
  """Reference: the same K dense steps with the norms frozen (Freeze), then NumPy's
  top-k of |theta_K - theta0| over the candidates, i.e. all but the head (ties: lower
  flat index): the reference's one threshold over every maskable parameter."""
  trainer, theta0, _, _, final = runs[False]
  dense = make_trainer(False, freezing.Freeze(groups=[selection.NORM_PATTERN]))
  state = dense.init_state(0, tfs.batch())
  for _ in range(K_DENSE):
    state, _ = dense.train_step(state, tfs.batch())
  theta_k = flat_host(state.params)
  paths = [p for p in sparse_delta.flatten(final.opt_state.mask) if p != HEAD]  # tree order
  change = np.concatenate([np.abs(theta_k[p].astype(np.float64) - theta0[p]).ravel()
                           for p in paths])
  order = np.lexsort((np.arange(change.size), -change))[:K_TRAIN]
  expected = np.zeros(change.size, bool)
  expected[order] = True
  got = np.concatenate([sparse_delta.flatten(final.opt_state.mask)[p].ravel() for p in paths])
  assert len(paths) == len([p for p in theta0 if not NORM.search(p)]) - 1
  assert got.sum() == K_TRAIN
  assert (got == expected).all()


def test_resume_from_a_checkpoint_continues_bit_for_bit(runs, tmp_path):
  trainer, _, history, saved, _ = runs[True]
  checkpointer = checkpoints.Checkpointer(tmp_path, async_save=False)
  checkpointer.save(3, saved, {})
  checkpointer.wait()
  restored, _ = checkpointer.restore(3, trainer.abstract_state(tfs.batch()))
  checkpointer.close()
  state, _ = trainer.train_step(restored, tfs.batch())
  after = flat_host(state.params)
  assert all(after[p].tobytes() == history[3][p].tobytes() for p in after)


def test_top_k_masks_ties_go_to_the_lower_index():
  a, b = np.array([[1.0, 3.0], [3.0, 0.5]], np.float32), np.array([3.0, -1.0], np.float32)
  masks = sparse.top_k_masks([a, b], 3)
  assert np.asarray(masks[0]).tolist() == [[False, True], [True, False]]
  assert np.asarray(masks[1]).tolist() == [True, False]


def test_candidates_as_configured(runs):
  """groups=(MATRICES,) with include_embeddings: the attention / MLP matrices and the
  embeddings are candidates; the head still trains whole, the norms never."""
  trainer = runs[False][0]
  params = trainer.state_plan(tfs.batch()).boxed_params
  technique = sparse.SparseFineTuning(num_trainable=5, groups=(sparse.MATRICES,),
                                      include_embeddings=True)
  candidates = tfs.per_layer(params, technique.candidates_mask(params))
  dense = tfs.per_layer(params, technique.dense_mask(params))
  assert {p for p, m in candidates.items() if m} == {
      p for p in candidates if re.search(sparse.MATRICES, p) or "embed" in p or "relpos" in p}
  assert {p for p, m in dense.items() if m} == {HEAD}
  no_head = sparse.SparseFineTuning(num_trainable=5, dense_groups=())
  assert tfs.per_layer(params, no_head.candidates_mask(params))[HEAD]


@pytest.mark.parametrize("scan", [False, True])
def test_per_entry_statistics_flatten_the_candidates_for_the_optimizer(runs, scan):
  """With Adafactor factoring matrices of 16+ entries: per_entry_statistics keeps one
  second moment per candidate entry ([n], or [L, n] scanned); False keeps the factored
  row and column moments. The head (dense, not a candidate) is factored either way."""
  params = runs[scan][0].state_plan(tfs.batch()).boxed_params
  adafactor = optim.per_layer(optim.adafactor(0.01, min_dim_size_to_factor=16),
                              tfs.stacked_counts(params))
  shapes = {}
  for flag in (True, False):
    technique = sparse.SparseFineTuning(num_trainable=5, per_entry_statistics=flag)
    state = jax.eval_shape(technique.wrap_optimizer(adafactor, params).init,
                           jax.tree.map(lambda x: x.value, params,
                                        is_leaf=lambda x: hasattr(x, "names")))
    shapes[flag] = {tuple(leaf.shape) for leaf in jax.tree.leaves(state.inner)}
  wo = (2, 48 * 32) if scan else (48 * 32,)  # an MLP `wo` kernel [48, 32], flattened
  assert wo in shapes[True] and wo not in shapes[False]
  factored = {(2, 48), (2, 32)} if scan else {(48,), (32,)}
  assert factored <= shapes[False]
  assert {(128,), (32,)} <= shapes[True] & shapes[False]  # the head's row / column moments


def first_sparse_update(inner, density, shape=(128, 256)):
  """(the update of entry (0, 0), the mean |update| of the chosen entries) at the first
  sparse step; k = density * size. The dense step's gradient is nonzero on k scattered
  entries only ((0, 0) and the first k - 1 of a fixed permutation), so exactly those
  moved and are chosen; the sparse step's gradient g is the same random array at every
  density (masked to the chosen entries)."""
  k = int(density * np.prod(shape))
  g = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  order = np.random.default_rng(2).permutation(np.arange(1, g.size))
  chosen = np.zeros(g.size, bool)
  chosen[np.concatenate([[0], order[:k - 1]])] = True
  first = np.where(chosen.reshape(shape), g, 0.0)
  params = {"w": jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)}
  tx = sparse.sparse_phases(inner, {"w": np.ones((), bool)}, 1, k)
  state = tx.init(params)
  step, state = tx.update({"w": jnp.asarray(first)}, state, params)
  params = sparse.apply_sparse_updates(params, step, state, 1)
  step, state = tx.update({"w": jnp.asarray(g)}, state, params)
  mask = np.asarray(state.mask["w"])
  assert (mask.reshape(-1) == chosen).all()
  return float(step["w"][0, 0]), float(np.abs(np.asarray(step["w"])[mask]).mean())


def test_an_entrys_update_does_not_depend_on_the_density():
  """Adafactor (T5X defaults) factors a 128 x 256 matrix; with per-entry statistics a
  chosen entry's first sparse update is the same whether 1% or all of the entries
  train, as with the reference's Adam; factored statistics inflate the chosen entries'
  updates about 1/sqrt(density)."""
  adafactor = updates.scaled(optim.adafactor(0.01), {"w": np.ones((), np.float32)})
  per_entry = sparse.per_entry(adafactor, {"w": (128 * 256,)})
  got = np.array([first_sparse_update(per_entry, d) for d in (0.01, 0.05, 0.5, 1.0)])
  np.testing.assert_allclose(got, np.broadcast_to(got[-1], got.shape), rtol=1e-6)
  adam = np.array([first_sparse_update(optax.adam(0.01), d) for d in (0.01, 1.0)])
  np.testing.assert_allclose(adam[0], adam[1], rtol=1e-6)
  factored = [first_sparse_update(adafactor, d)[1] for d in (0.05, 1.0)]
  assert factored[0] > 3.0 * factored[1]


def test_the_sparse_phase_restarts_the_learning_rate_schedule():
  """SGD at lr(count) = 0.1 (count + 1) on a constant gradient: updates -0.1, -0.2 in
  the dense phase, then the fresh inner state starts the schedule again (-0.1, -0.2),
  as the reference builds a new optimizer and scheduler per phase."""
  params = {"w": jnp.zeros((4,), jnp.float32)}
  tx = sparse.sparse_phases(optax.sgd(lambda count: 0.1 * (count + 1)),
                            {"w": np.ones((), bool)}, 2, 4)
  state, seen = tx.init(params), []
  for _ in range(4):
    step, state = tx.update({"w": jnp.ones((4,))}, state, params)
    params = sparse.apply_sparse_updates(params, step, state, 2)
    seen.append(float(step["w"][0]))
  np.testing.assert_allclose(seen, [-0.1, -0.2, -0.1, -0.2], rtol=1e-6)


# -- sparse deltas ---------------------------------------------------------------
def random_pair(seed=0, theta0=None):
  """(theta0, theta, mask): theta differs from theta0 on ~30% of two leaves (one
  trained scalar ends unchanged, one crosses to ~0)."""
  rng = np.random.default_rng(seed)
  if theta0 is None:
    theta0 = {"a/kernel": rng.standard_normal((6, 5)).astype(np.float32),
              "b/layers/kernel": rng.standard_normal((2, 3, 4)).astype(np.float32),
              "c/scale": np.ones(4, np.float32)}
  theta = {k: v.copy() for k, v in theta0.items()}
  mask = {"a/kernel": rng.random((6, 5)) < 0.3, "b/layers/kernel": rng.random((2, 3, 4)) < 0.3}
  for name, m in mask.items():
    theta[name][m] += rng.standard_normal(int(m.sum())).astype(np.float32) * 0.05
  trained = np.flatnonzero(mask["a/kernel"])
  theta["a/kernel"].reshape(-1)[trained[0]] = theta0["a/kernel"].reshape(-1)[trained[0]]
  theta["a/kernel"].reshape(-1)[trained[1]] = 1e-30
  shrunk = np.flatnonzero(mask["b/layers/kernel"])[0]  # 1.0 -> 0.25 + 2**-25: the
  theta0["b/layers/kernel"].reshape(-1)[shrunk] = 1.0   # difference needs 26 bits
  theta["b/layers/kernel"].reshape(-1)[shrunk] = np.float32(0.25 + 2.0**-25)
  return theta0, theta, mask, trained[1]


def test_delta_has_exactly_the_mask_and_base_plus_delta_reproduces_theta(tmp_path):
  theta0, theta, mask, crossed = random_pair()
  delta = sparse_delta.from_params(theta, theta0, mask, base_checkpoint="/b/checkpoint_2", step=9)
  assert delta.num_entries == sum(int(m.sum()) for m in mask.values())  # unchanged one too
  sparse_delta.save(tmp_path / "d", delta)
  loaded = sparse_delta.load(tmp_path / "d")
  meta = json.loads((tmp_path / "d" / "delta.json").read_text())
  assert meta["num_entries"] == delta.num_entries and meta["base_checkpoint"] == "/b/checkpoint_2"
  assert meta["parameters"]["c/scale"] == {"shape": [4], "dtype": "float32", "entries": 0}
  for name, (indices, values) in loaded.entries.items():
    assert indices.tolist() == np.flatnonzero(mask[name]).tolist() and values.dtype == np.float64
  out = sparse_delta.apply(theta0, loaded)
  for name in theta0:
    # Bit for bit: the float64 difference of two float32s is exact (exponents
    # within 29 bits), rounded once ...
    same = out[name].view(np.uint32) == theta[name].view(np.uint32)
    if name == "a/kernel":  # ... except the weight moved to 1e-30 from ~1.
      assert same.reshape(-1).tolist() == [i != crossed for i in range(same.size)]
      assert out[name].reshape(-1)[crossed] == 0.0
    else:
      assert same.all(), name
  # A float32 difference would not do: 1.0 + fl32((0.25 + 2**-25) - 1.0) is 0.25.
  b0, b = theta0["b/layers/kernel"], theta["b/layers/kernel"]
  assert (b0 + (b - b0) != b).sum() == 1


def test_compose_is_the_sum_on_the_union_of_indices():
  theta0, theta_a, mask_a, _ = random_pair(1)
  _, theta_b, mask_b, _ = random_pair(2, theta0)
  a = sparse_delta.from_params(theta_a, theta0, mask_a)
  b = sparse_delta.from_params(theta_b, theta0, mask_b)
  both = sparse_delta.compose(a, b)
  dense = {k: sparse_delta.to_dense(a)[k] + sparse_delta.to_dense(b)[k] for k in theta0}
  for name in theta0:
    assert sparse_delta.to_dense(both)[name].tobytes() == dense[name].tobytes()
  overlap = sum(int((mask_a[k] & mask_b[k]).sum()) for k in mask_a)
  assert overlap > 0
  assert both.num_entries == a.num_entries + b.num_entries - overlap


# -- from the command line: sparse_ft.gin, the export, merge --method=add_deltas, infer
def test_sparse_ft_gin_exports_a_delta_that_merge_adds_and_infer_loads(tmp_path):
  base_dir, step_dir, start = _pretrained(tmp_path)
  assert tfs.finetune(base_dir, step_dir, "sparse_ft", "sft", "--gin.SPARSE_DENSE_STEPS=1",
                      "--gin.SPARSE_NUM_TRAINABLE=50", "--gin.SPARSE_FRACTION=None") == 0
  run = base_dir / "sft"
  delta = sparse_delta.load(run / "sparse_delta")
  head = start[HEAD].size  # the output layer: trained whole, stored whole
  assert delta.num_entries == 50 + head and delta.step == 4
  assert len(delta.entries[HEAD][0]) == head
  assert delta.base_checkpoint == str(step_dir)
  tuned = tfs.load(run / "checkpoint_4")
  rebuilt = sparse_delta.apply(start, delta)
  changed = sum(int((tuned[p] != start[p]).sum()) for p in start if p != HEAD)
  assert 0 < changed <= 50
  assert all(tuned[p].tobytes() == start[p].tobytes() for p in start if NORM.search(p))
  assert all(rebuilt[p].tobytes() == tuned[p].tobytes() for p in start)
  # merge: base + delta -> a normal checkpoint that infer --mode=score loads.
  out = tmp_path / "merged"
  assert merge.main(["--method=add_deltas", f"--base={step_dir}",
                     f"--deltas={run / 'sparse_delta'}", f"--output={out}"]) == 0
  merged = tfs.load(out / "checkpoint_4")
  assert all(merged[p].tobytes() == rebuilt[p].tobytes() for p in start)
  examples = tmp_path / "in.jsonl"
  examples.write_text(json.dumps({"input_ids": [5, 6, 1], "target_ids": [7, 1]}) + "\n")
  assert infer.main(["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
                     "--gin_file=gin_configs/runs/infer.gin",
                     f"--gin.CHECKPOINT_PATH={out / 'checkpoint_4'}", "--mode=score",
                     f"--input={examples}", f"--output={tmp_path / 'scores.jsonl'}"]) == 0
  row = json.loads((tmp_path / "scores.jsonl").read_text())
  assert np.isfinite(row["score"]) and len(row["token_scores"]) == 2


def _pretrained(tmp_path):
  step_dir = checkpoints.save_params(tmp_path / "pretrain", 2, tfs.tiny_params())
  return tmp_path, step_dir, tfs.load(step_dir)
