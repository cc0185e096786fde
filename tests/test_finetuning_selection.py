"""Parameter selection and the techniques built on it (t5xlike/finetuning): masks of
scanned and unscanned models agree; frozen parameters stay bit-identical and get no
optimizer state; LLRD's per-layer update = decay^(D - d) x the plain one, with the
learning rates of ELECTRA's `_get_layer_lrs` (ported); re-init touches exactly the top
layers, once; HFT freezes half of the parameters, by seed; the four gin files fine-tune
a tiny checkpoint from the command line."""
import collections
import dataclasses
import itertools
import json

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from t5xlike import checkpoints, optim, partitioning, train
from t5xlike.cli import gin_config
from t5xlike.finetuning import base, freezing, hft, llrd, reinit, selection, updates
from t5xlike.models import encoder, encoder_decoder, t5
from t5xlike.training import trainer as trainer_lib
from tests import test_t5_model

CONFIG = test_t5_model.CONFIG  # 2 + 2 layers, emb 32, mlp 48, vocab 128
# Layer 0's MLP of both stacks (partial stacks when scanned), the encoder's layer-1
# attention (one layer of a stacked leaf), the token embeddings (a whole leaf).
FROZEN = [("mlp/", [0]), "encoder/layers_1/attention/", "^token_embedder/"]


def make_model(scan):
  cfg = t5.T5Config(**{**CONFIG.__dict__, "scan_layers": scan})
  return encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg))


def batch():
  return test_t5_model.make_batch(np.random.default_rng(0))


@pytest.fixture(scope="module")
def boxed():
  """Abstract boxed parameters {scan: tree} (nothing compiled)."""
  return {scan: jax.eval_shape(make_model(scan).init, jax.random.key(0), batch())["params"]
          for scan in (False, True)}


def per_layer(params, tree):
  """{unscanned per-layer path: value} of a per-leaf (per-layer) tree."""
  infos = jax.tree.leaves(selection.leaves(params), is_leaf=lambda x: isinstance(x, selection.Leaf))
  out = {}
  for info, value in zip(infos, jax.tree.leaves(tree)):
    values = np.asarray(value)
    for i, (_, path) in enumerate(info.layer_paths):
      out[path] = values[i] if info.scanned else values
  return out


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def unstacked(params):
  return flat(t5.unstack_layers(params))


def random_like(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                      nn.meta.unbox(params))


# -- selection -------------------------------------------------------------------
def test_masks_of_scanned_and_unscanned_models_agree(boxed):
  plain, scanned = (per_layer(boxed[s], selection.select(boxed[s], FROZEN))
                    for s in (False, True))
  assert plain == scanned and len(plain) == 52
  selected = sorted(p for p, m in plain.items() if m)
  assert selected == sorted(
      [f"{s}/layers_0/mlp/{w}/kernel" for s in ("encoder", "decoder")
       for w in ("wi_0", "wi_1", "wo")]
      + [f"encoder/layers_1/attention/{w}/kernel" for w in ("key", "out", "query", "value")]
      + ["token_embedder/embedding"])
  mask = selection.select(boxed[True], FROZEN)
  assert mask["encoder"]["layers"]["mlp"]["wo"]["kernel"].tolist() == [True, False]
  assert mask["token_embedder"]["embedding"].shape == ()
  top = selection.select(boxed[True], [("query", [-1])])
  assert top["decoder"]["layers"]["self_attention"]["query"]["kernel"].tolist() == [False, True]
  assert selection.count(boxed[False], selection.select(boxed[False], FROZEN)) == (
      selection.count(boxed[True], mask))
  emb, mlp, attention = 128 * 32, 2 * 32 * 48 + 48 * 32, 4 * 32 * 32
  assert selection.count(boxed[True], mask)[0] == emb + 2 * mlp + attention


def test_depths_per_stack_and_serial(boxed):
  layer = lambda path: int(path.split("layers_")[1][0])
  # Default: each stack from its own top, the head two above the top layers (ELECTRA).
  expected = lambda path: (0 if path.startswith("token_embedder") or "relpos" in path
                           else 1 + layer(path) if "/layers_" in path else 4)
  serial = lambda path: (0 if path.startswith("token_embedder") or "relpos" in path
                         else 1 + layer(path) if path.startswith("encoder/layers")
                         else 3 + layer(path) if path.startswith("decoder/layers") else 6)
  for scan in (False, True):
    depth, top = selection.depths(boxed[scan])
    assert top == 4
    assert per_layer(boxed[scan], depth) == {p: expected(p) for p in per_layer(boxed[scan], depth)}
    depth, top = selection.depths(boxed[scan], serial=True)
    assert top == 6
    assert per_layer(boxed[scan], depth) == {p: serial(p) for p in per_layer(boxed[scan], depth)}
    depth, top = selection.depths(boxed[scan], head_offset=1)
    assert top == 3 and per_layer(boxed[scan], depth)["decoder/logits_dense/kernel"] == 3


def test_depths_of_unequal_stacks_count_from_each_top():
  """3 encoder layers, 1 decoder layer: both top layers at depth 3, the head at 5."""
  cfg = dataclasses.replace(CONFIG, num_encoder_layers=3, num_decoder_layers=1)
  params = jax.eval_shape(encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg)).init,
                          jax.random.key(0), batch())["params"]
  depth, top = selection.depths(params)
  depth = per_layer(params, depth)
  assert top == 5
  assert [depth[f"encoder/layers_{i}/mlp/wo/kernel"] for i in range(3)] == [1, 2, 3]
  assert depth["decoder/layers_0/mlp/wo/kernel"] == 3
  assert depth["token_embedder/embedding"] == 0 and depth["decoder/logits_dense/kernel"] == 5


def electra_layer_lrs(learning_rate, layer_decay, n_layers):
  """A port of google-research/electra `model/optimization.py` `_get_layer_lrs`."""
  key_to_depths = collections.OrderedDict({"/embeddings/": 0, "/embeddings_project/": 0,
                                           "task_specific/": n_layers + 2})
  for layer in range(n_layers):
    key_to_depths["encoder/layer_" + str(layer) + "/"] = layer + 1
  return {key: learning_rate * (layer_decay ** (n_layers + 2 - depth))
          for key, depth in key_to_depths.items()}


def test_llrd_learning_rates_of_an_encoder_are_electras():
  """ELECTRA's own setting: an encoder with an embedding projection and a task head;
  each parameter's factor equals the port's rate for its variable scope (embeddings
  and projection '/embeddings/', layers 'encoder/layer_i/', head and final norm
  'task_specific/')."""
  cfg = encoder.EncoderConfig(vocab_size=128, emb_dim=32, num_heads=4, num_layers=3,
                              head_dim=8, mlp_dim=64, max_length=16, embedding_dim=24)
  network = encoder.EncoderNetwork(cfg, head="classifier", num_classes=3)
  params = jax.eval_shape(network.init, jax.random.key(0),
                          np.ones((2, 8), np.int32))["params"]
  reference = electra_layer_lrs(1.0, 0.8, 3)
  scope = lambda path: ("/embeddings/" if path.startswith("embedder/")
                        else "/embeddings_project/" if "embedding_projection" in path
                        else "encoder/layer_" + path.split("layers_")[1].split("/")[0] + "/"
                        if "/layers_" in path else "task_specific/")
  got = per_layer(params, llrd.LayerwiseDecay(decay=0.8).update_scales(params))
  assert {scope(p) for p in got} == set(reference)
  for path, factor in got.items():
    assert factor == pytest.approx(reference[scope(path)], rel=1e-6), path


# -- optimizer state and bit-identical freezing ----------------------------------
def stacked_counts(boxed_params):
  return jax.tree.map(lambda x: x.value.shape[0] if x.names[:1] == ("layers",) else 0,
                      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def state_paths(opt_state):
  """'/'-joined dict keys of every array leaf of an optimizer state."""
  return ["/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
          for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name,inner", [("adafactor", optim.adafactor(0.01)),
                                        ("adamw", optim.adamw(0.01, weight_decay=0.1))])
def test_frozen_parameters_have_no_optimizer_state(boxed, scan, name, inner):
  params = boxed[scan]
  tx = freezing.Freeze(FROZEN).wrap_optimizer(optim.per_layer(inner, stacked_counts(params)),
                                              params)
  paths = state_paths(jax.eval_shape(tx.init, nn.meta.unbox(params)))
  assert not [p for p in paths if p.endswith("token_embedder/embedding")], name
  assert any(p.endswith("logits_dense/kernel") for p in paths)
  # Unscanned: no state for any frozen leaf. Scanned: a partially frozen stacked leaf
  # keeps its (whole-leaf) state.
  mlp0 = [p for p in paths if "/mlp/wo/kernel" in p and ("layers/" in p or "layers_0/" in p)]
  assert bool(mlp0) == scan


@pytest.fixture(scope="module")
def trained_scanned():
  """A scanned model trained 3 steps with AdamW + weight decay, FROZEN frozen:
  (trainer, params before, params after, optimizer state after)."""
  schedule = optim.constant(0.01)
  trainer = trainer_lib.Trainer(make_model(True), optim.adamw(schedule, weight_decay=0.1),
                                schedule, partitioning.Partitioner({"data": 1}),
                                finetuning=freezing.Freeze(FROZEN))
  state = trainer.init_state(0, batch())
  before = jax.device_get(state.params)
  for _ in range(3):
    state, metrics = trainer.train_step(state, batch())
  return trainer, before, jax.device_get(state.params), jax.device_get(state.opt_state)


def test_frozen_parameters_are_bit_identical_after_training(trained_scanned):
  trainer, before, after, opt_state = trained_scanned
  plan = trainer.state_plan(batch())
  frozen = per_layer(plan.boxed_params, selection.select(plan.boxed_params, FROZEN))
  before, after = unstacked(before), unstacked(after)
  for path, is_frozen in frozen.items():
    same = before[path].tobytes() == after[path].tobytes()
    assert same == is_frozen, path
  # No gradient reached the frozen layers of a partially frozen stacked leaf: Adam's
  # first moment (allocated for the whole leaf) is 0 there, nonzero on layer 1.
  mu = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
        if "mu" in jax.tree_util.keystr(path) and "encoder']['layers']['mlp']['wo'" in
        jax.tree_util.keystr(path)]
  assert len(mu) == 1 and mu[0].shape == (2, 48, 32)
  assert not mu[0][0].any() and mu[0][1].any()
  assert selection.count(plan.boxed_params, plan.trainable)[0] == (
      selection.count(plan.boxed_params)[1]
      - selection.count(plan.boxed_params, selection.select(plan.boxed_params, FROZEN))[0])


# -- layer-wise learning-rate decay ----------------------------------------------
@pytest.mark.parametrize("scan", [False, True])
def test_llrd_update_of_each_layer_is_decay_to_the_depth_from_top(boxed, scan):
  params = boxed[scan]
  values, grads = random_like(params, 1), random_like(params, 2)
  technique = llrd.LayerwiseDecay(decay=0.7)
  depth = {"token_embedder": 0, "relpos_bias": 0, "encoder/layers_0": 1, "encoder/layers_1": 2,
           "decoder/layers_0": 1, "decoder/layers_1": 2}
  factor = lambda path: 0.7 ** (4 - next((d for k, d in depth.items() if k in path), 4))
  sgd = optim.per_layer(optax.sgd(0.1), stacked_counts(params))
  adafactor = optim.per_layer(optim.adafactor(0.01), stacked_counts(params))

  @jax.jit
  def all_updates(grads, values):
    out = []
    for tx in (technique.wrap_optimizer(sgd, params), technique.wrap_optimizer(adafactor, params),
               adafactor):
      out.append(tx.update(grads, tx.init(values), values)[0])
    return out
  got_sgd, got_adafactor, plain = (per_layer(params, u) for u in all_updates(grads, values))
  # SGD: update = -lr * factor * grad; Adafactor (nonlinear in the gradient): the
  # factor times the plain update.
  for path, g in per_layer(params, grads).items():
    np.testing.assert_allclose(got_sgd[path], -0.1 * factor(path) * g.astype(np.float64),
                               rtol=1e-6, err_msg=path)
    np.testing.assert_allclose(got_adafactor[path], factor(path) * plain[path].astype(np.float64),
                               rtol=1e-6, err_msg=path)


def test_scaled_updates_of_frozen_layers_are_negative_zero():
  params = {"w": jnp.array([[-0.0, 1.0], [2.0, -0.0]]), "b": jnp.array([-0.0, 3.0])}
  scales = {"w": np.array([0.0, 1.0]), "b": np.array(0.0)}
  tx = updates.scaled(optax.adamw(1.0, weight_decay=0.5), scales)
  grads = jax.tree.map(jnp.ones_like, params)
  step, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, step)
  assert np.asarray(new["b"]).tobytes() == np.asarray(params["b"]).tobytes()
  assert np.asarray(new["w"][0]).tobytes() == np.asarray(params["w"][0]).tobytes()
  assert not np.array_equal(new["w"][1], params["w"][1])
  with pytest.raises(ValueError, match="every parameter is frozen"):
    updates.scaled(optax.sgd(1.0), {"w": np.zeros(2), "b": np.array(0.0)})


# -- re-initialisation -------------------------------------------------------------
@pytest.mark.parametrize("scan", [False, True])
def test_reinit_changes_exactly_the_top_layers_and_head(boxed, scan):
  params = boxed[scan]
  restored, fresh = random_like(params, 3), random_like(params, 4)
  out = reinit.ReinitTop(num_layers=1, head=True).initialize(restored, lambda: fresh, frozenset())
  stack = (lambda p: t5.unstack_layers(p)) if scan else (lambda p: p)
  out, restored, fresh = flat(stack(out)), flat(stack(restored)), flat(stack(fresh))
  for path, value in out.items():
    renewed = "layers_1/" in path or "logits_dense" in path
    assert value.tobytes() == (fresh if renewed else restored)[path].tobytes(), path
  untouched = reinit.ReinitTop(num_layers=0).initialize(restored, lambda: pytest.fail("called"),
                                                        frozenset())
  assert untouched is restored


# -- Half Fine-Tuning ----------------------------------------------------------------
def test_hft_freezes_half_of_the_parameters_reproducibly(boxed):
  total = selection.count(boxed[False])[1]
  for granularity in ("matrix", "module"):
    technique = hft.HalfFineTuning(seed=0, granularity=granularity)
    groups = technique.groups(boxed[False])
    # The groups partition the parameters (a module group: the pre-norm with its module).
    members = [{p for p, m in per_layer(boxed[False], selection.select(boxed[False], [g])).items()
                if m} for g in groups.values()]
    assert sum(map(len, members)) == len(set().union(*members)) == 52
    smallest = min(technique.group_sizes(boxed[False]).values())
    shares = set()
    for seed, stage in itertools.product(range(6), range(2)):
      draw = hft.HalfFineTuning(seed=seed, stage=stage, granularity=granularity)
      frozen = selection.count(boxed[False], draw.frozen(boxed[False]))[0]
      assert abs(2 * frozen - total) <= smallest, (granularity, seed, stage, frozen, total)
      shares.add(tuple(draw.frozen_groups(boxed[False])))
      # Scanned and unscanned: the same groups, the same parameters.
      assert draw.frozen_groups(boxed[True]) == draw.frozen_groups(boxed[False])
      assert per_layer(boxed[False], draw.frozen(boxed[False])) == per_layer(
          boxed[True], draw.frozen(boxed[True]))
    assert len(shares) >= 6  # seeds and stages draw different halves
  matrix = hft.HalfFineTuning(seed=0)
  sizes = matrix.group_sizes(boxed[False])
  assert len(sizes) == 52  # every per-layer tensor its own group, norms and biases too
  assert sizes["encoder/layers_0/attention/query"] == 32 * 32
  assert sizes["token_embedder"] == sizes["decoder/logits_dense"] == 128 * 32
  assert matrix.frozen_groups(boxed[False]) == hft.HalfFineTuning(seed=0).frozen_groups(
      boxed[False])


def test_hft_half_of_the_groups_is_the_earlier_rule(boxed):
  """half_of='groups' with 'module' groups: the first n // 2 of a permutation of the
  sorted group names by default_rng([seed, stage]), whatever their sizes."""
  technique = hft.HalfFineTuning(seed=3, stage=1, granularity="module", half_of="groups")
  names = sorted(technique.groups(boxed[False]))
  assert len(names) == 12 and {"embeddings", "head", "encoder/layers_0/attention",
                               "decoder/layers_0/encoder_decoder_attention"} <= set(names)
  order = np.random.default_rng([3, 1]).permutation(12)
  assert technique.frozen_groups(boxed[False]) == sorted(names[i] for i in order[:6])
  assert hft.group_sizes(boxed[False], technique)["encoder/layers_0/attention"] == (
      4 * 32 * 32 + 32)


def test_nearest_half_is_within_twice_the_best_gap():
  """Against brute force on random group sizes: |2 frozen - total| is at most the
  smallest group's size or twice the best achievable (the search band doubles)."""
  rng = np.random.default_rng(0)
  for trial in range(40):
    sizes = {f"g{i}": int(s) for i, s in enumerate(rng.choice([1, 3, 8, 64, 500, 4096],
                                                               size=rng.integers(2, 11)))}
    total = sum(sizes.values())
    best = min(abs(2 * sum(sizes[n] for n in subset) - total)
               for r in range(len(sizes) + 1) for subset in itertools.combinations(sizes, r))
    chosen = hft.nearest_half(sizes, np.random.default_rng(trial))
    gap = abs(2 * sum(sizes[n] for n in chosen) - total)
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(sizes)
    assert gap <= max(min(sizes.values()), 2 * best), (sizes, chosen, best)


def test_combine_multiplies_scales(boxed):
  combined = base.Combine([freezing.FreezeLower(1), llrd.LayerwiseDecay(0.5)])
  scales = per_layer(boxed[True], combined.update_scales(boxed[True]))
  assert scales["encoder/layers_0/mlp/wo/kernel"] == 0 and scales["token_embedder/embedding"] == 0
  assert scales["encoder/layers_1/mlp/wo/kernel"] == pytest.approx(0.5 ** 2)
  assert scales["decoder/logits_dense/kernel"] == 1


def test_a_group_that_selects_nothing_is_an_error(boxed):
  with pytest.raises(ValueError, match="no parameter"):
    freezing.Freeze(["^encoder/layers_0/", "mpl/"]).trainable(boxed[False])
  only_head = freezing.Freeze(train_only=["logits_dense"]).trainable(boxed[True])
  assert selection.count(boxed[True], only_head)[0] == 32 * 128


# -- the gin files, from the command line --------------------------------------------
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}"
TASK = "--gin.MIXTURE_OR_TASK_NAME='mt_first_word'"  # one task of the mixture: quicker to read


def tiny_params():
  gin_config.configure(["models/t5_1_1/tiny.gin"])
  cfg = gin.get_configurable(t5.T5Config)()
  gin.clear_config()
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg))
  return nn.meta.unbox(model.init(jax.random.key(7), batch())["params"])


def load(step_dir):
  shapes = checkpoints.saved_param_shapes(step_dir)
  abstract = traverse_util.unflatten_dict(
      {tuple(k.split("/")): jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()})
  params, _ = checkpoints.restore_params_from_path(step_dir, abstract,
                                                   jax.ShapeDtypeStruct((), jnp.int32))
  return flat(params)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A step-2 checkpoint of T5.1.1 tiny (models/t5_1_1/tiny.gin) and its parameters."""
  base_dir = tmp_path_factory.mktemp("finetuning")
  step_dir = checkpoints.save_params(base_dir / "pretrain", 2, tiny_params())
  return base_dir, step_dir, load(step_dir)


def finetune(base_dir, step_dir, technique, model_dir, *extra):
  return train.main(["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
                     f"--gin_file=gin_configs/finetune/{technique}.gin",
                     f"--gin.INITIAL_CHECKPOINT_PATH={step_dir}",
                     f"--gin.MODEL_DIR={base_dir / model_dir}", "--gin.TRAIN_STEPS=4",
                     "--gin.BATCH_SIZE=2", "--gin.EVAL_PERIOD=None", "--gin.LOG_PERIOD=1",
                     "--gin.EvalConfig.inference_evaluator=None", LENGTHS, TASK, *extra])


def steps_logged(model_dir):
  lines = (model_dir / "metrics" / "train.jsonl").read_text().splitlines()
  return [json.loads(line)["step"] for line in lines]


# One gin file in the default run; the others (same entry point, ~20 s each) under -m slow.
@pytest.mark.parametrize("technique", [pytest.param("freeze_lower", marks=pytest.mark.slow),
                                       pytest.param("llrd", marks=pytest.mark.slow), "hft"])
def test_gin_file_fine_tunes_from_the_command_line(pretrained, technique):
  base_dir, step_dir, start = pretrained
  assert finetune(base_dir, step_dir, technique, technique) == 0
  assert steps_logged(base_dir / technique) == [3, 4]
  after = load(base_dir / technique / "checkpoint_4")
  unchanged = {p for p in start if start[p].tobytes() == after[p].tobytes()}
  if technique == "freeze_lower":  # layer 0 of both stacks, token embeddings, relpos biases
    assert unchanged == {p for p in start if "layers_0/" in p or "embed" in p or "relpos" in p}
  elif technique == "hft":
    abstract = traverse_util.unflatten_dict(
        {tuple(k.split("/")): jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in start.items()})
    frozen = per_layer(abstract, hft.HalfFineTuning(seed=0).frozen(abstract))
    assert unchanged == {p for p, m in frozen.items() if m} and 0 < len(unchanged) < len(start)
  else:
    assert not unchanged


@pytest.mark.slow  # ~27 s; reinit's masks are tested in process
def test_reinit_top_gin_reinitialises_once(pretrained, monkeypatch):
  """With a learning rate of 0 the checkpoint holds the parameters the run started
  from: the top layer of each stack is new, the rest the checkpoint's. A resume
  from MODEL_DIR does not call `initialize` again."""
  base_dir, step_dir, start = pretrained
  calls = []
  original = reinit.ReinitTop.initialize
  monkeypatch.setattr(reinit.ReinitTop, "initialize",
                      lambda self, *args: calls.append(1) or original(self, *args))
  assert finetune(base_dir, step_dir, "reinit_top", "reinit", "--gin.LEARNING_RATE=0.0") == 0
  assert len(calls) == 1
  first = load(base_dir / "reinit" / "checkpoint_4")
  for path, value in first.items():  # (norm scales are initialised to 1: unchanged)
    renewed = "layers_1/" in path and not path.endswith("/scale")
    assert (value.tobytes() != start[path].tobytes()) == renewed, path
  # The same command again resumes from MODEL_DIR/checkpoint_4 (nothing left to train).
  assert finetune(base_dir, step_dir, "reinit_top", "reinit", "--gin.LEARNING_RATE=0.0") == 0
  assert len(calls) == 1
