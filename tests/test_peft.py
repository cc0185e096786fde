"""Parameter-efficient fine-tuning (t5xlike/finetuning/{peft,lora,adapters,prompt_tuning,
peft_checkpoint}.py): zero-B LoRA and identity-init adapters give exactly the base
logits (T5 scanned and unscanned, decoder-only); merged LoRA equals unmerged; LoRA's
defaults are peft's; adapters follow adapter-bert (after the dropout, near-identity
init, layer norms trained; float64 references); a soft prompt equal to some tokens'
embeddings equals the base model on those tokens prepended, class-label init as the
reference's `from_embedded_list`; training moves only the trained parameters (the rest
bit-identical); the PEFT checkpoint holds only those and loading it (with its base, old
records included) reproduces the trained logits; the three gin files fine-tune from the
command line (one step each; a PEFT checkpoint as INITIAL_CHECKPOINT_PATH: slow)."""
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from t5xlike import checkpoints, errors, optim, partitioning, train
from t5xlike.finetuning import adapters, lora, peft, peft_registry, prompt_tuning, selection
from t5xlike.inference import checkpoint_loading
from t5xlike.models import decoder, encoder_decoder, layers, t5
from t5xlike.training import trainer as trainer_lib
from tests import test_decoder_model, test_t5_model

T5_CONFIG = test_t5_model.CONFIG  # 2 + 2 layers, emb 32, 4 heads x 8, mlp 48, vocab 128
DEC_CONFIG = test_decoder_model.CONFIG  # 2 layers, emb 32, 4 heads / 2 kv heads x 8


def _one_device() -> partitioning.Partitioner:
  return partitioning.Partitioner({"data": 1}, partitioning.logical_axis_rules("data_fsdp_tensor"))


def make_model(kind):
  if kind == "decoder":
    return decoder.DecoderOnlyModel(decoder.Transformer(DEC_CONFIG))
  cfg = t5.T5Config(**{**T5_CONFIG.__dict__, "scan_layers": kind == "t5_scanned"})
  return encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg))


def make_batch(kind):
  rng = np.random.default_rng(0)
  if kind != "decoder":
    return test_t5_model.make_batch(rng)
  targets = rng.integers(1, DEC_CONFIG.vocab_size, size=(2, 9)).astype(np.int32)
  targets[1, 6:] = 0
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


_JITTED = {}


def logits_of(model, params, batch, **kwargs):
  """The model's logits, jit-compiled once per model object (eager scans retrace at
  every call)."""
  if model not in _JITTED:
    _JITTED[model] = jax.jit(model.logits)
  return np.asarray(_JITTED[model](params, batch, **kwargs))


def flat(tree):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def randomised(params, pattern, seed=1, scale=0.3):
  """`params` with the leaves whose path matches `pattern` redrawn N(0, scale)."""
  rng = np.random.default_rng(seed)
  out = {k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
         if re.search(pattern, k) else v for k, v in flat(params).items()}
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


class _Bases(dict):
  """{kind: (model, params, batch, base logits)}, each built on first use."""

  def __missing__(self, kind):
    model, batch = make_model(kind), make_batch(kind)
    params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
    self[kind] = (model, params, batch, logits_of(model, params, batch))
    return self[kind]


@pytest.fixture(scope="module")
def bases():
  return _Bases()


def peft_params(method, kind, bases):
  """(wrapped model, boxed PEFT-model params, params = the base's + new ones)."""
  model, params, batch, _ = bases[kind]
  wrapped = method.wrap(model)
  boxed = wrapped.init(jax.random.key(3), batch)["params"]
  full = flat(nn.meta.unbox(boxed))
  new = sorted(set(full) - set(flat(params)))
  full.update(flat(params))
  return wrapped, boxed, traverse_util.unflatten_dict(
      {tuple(k.split("/")): v for k, v in full.items()}), new


# -- LoRA --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["t5", pytest.param("t5_scanned", marks=pytest.mark.slow),
                                  "decoder"])
def test_zero_b_lora_gives_exactly_the_base_logits(bases, kind):
  wrapped, boxed, params, new = peft_params(lora.LoRA(rank=4, alpha=8.0), kind, bases)
  _, _, batch, base_logits = bases[kind]
  layer = "layers" if kind == "t5_scanned" else "layers_1"
  stack = "encoder" if kind.startswith("t5") else "decoder"
  attention = "attention" if kind.startswith("t5") else "self_attention"
  assert f"{stack}/{layer}/{attention}/query/lora_a" in new
  assert f"{stack}/{layer}/{attention}/value/lora_b" in new
  assert not [p for p in new if "/key/" in p or "/out/" in p or "mlp" in p]
  # T5: query and value of the encoder's and the decoder's self- and cross-attention.
  per_layer = {"t5": 2 * (2 + 4), "t5_scanned": 2 * (1 + 2), "decoder": 2 * 2}[kind]
  assert len(new) == 2 * per_layer
  names = flat(jax.tree.map(lambda x: x.names, boxed,
                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
  a_names = names[f"{stack}/{layer}/{attention}/query/lora_a"]
  assert a_names == (("layers",) if kind == "t5_scanned" else ()) + ("embed", "lora_rank")
  assert not flat(params)[f"{stack}/{layer}/{attention}/value/lora_b"].any()
  logits = logits_of(wrapped, params, batch)
  assert np.array_equal(logits, base_logits)


@pytest.mark.parametrize("kind", ["t5", "decoder"])
def test_merged_lora_equals_unmerged_and_a_numpy_reference(bases, kind):
  method = lora.LoRA(rank=4, alpha=8.0)
  wrapped, _, params, _ = peft_params(method, kind, bases)
  model, base_params, batch, base_logits = bases[kind]
  params = randomised(params, r"lora_b$")
  logits = logits_of(wrapped, params, batch)
  assert not np.allclose(logits, base_logits, atol=1e-3)  # B != 0 changes the model.
  merged = method.merge(params)
  assert sorted(flat(merged)) == sorted(flat(base_params))
  np.testing.assert_allclose(logits_of(model, merged, batch), logits, atol=1e-5,
                             rtol=1e-5)
  for path, kernel in flat(merged).items():  # W + (alpha / r) A B in float64.
    module = path[:-len("kernel")]
    if module + "lora_a" in flat(params):
      a, b = (np.asarray(flat(params)[module + n], np.float64) for n in ("lora_a", "lora_b"))
      want = np.asarray(flat(params)[path], np.float64) + 2.0 * np.matmul(a, b)
      np.testing.assert_allclose(np.asarray(kernel), want, atol=1e-6)


def test_lora_dropout_acts_in_training_only(bases):
  method = lora.LoRA(rank=4, alpha=8.0, dropout=0.5)
  wrapped, _, params, _ = peft_params(method, "decoder", bases)
  _, _, batch, _ = bases["decoder"]
  params = randomised(params, r"lora_b$")
  no_lora = lora.LoRA(rank=4, alpha=8.0).wrap(bases["decoder"][0])
  eval_logits = logits_of(wrapped, params, batch)
  assert np.array_equal(eval_logits, logits_of(no_lora, params, batch))
  train_logits = logits_of(wrapped, params, batch, dropout_rng=jax.random.key(0))
  assert not np.allclose(train_logits, eval_logits, atol=1e-4)


def test_lora_defaults_are_peft_lora_config():
  """HF peft `LoraConfig` (src/peft/tuners/lora/config.py): r = 8, lora_alpha = 8,
  lora_dropout = 0.0; its T5 targets ["q", "v"] (utils/constants.py) are our query and
  value; so the update scale alpha / r is 1."""
  method = lora.LoRA()
  assert (method.rank, method.alpha, method.dropout, method.scale) == (8, 8.0, 0.0, 1.0)
  assert [m for m in ("attention/query", "attention/key", "attention/value", "attention/out",
                      "encoder_decoder_attention/query", "mlp/wo")
          if re.search(method.targets, m)] == ["attention/query", "attention/value",
                                               "encoder_decoder_attention/query"]


# -- adapters ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["t5", "decoder"])
def test_identity_init_adapters_give_exactly_the_base_logits(bases, kind):
  method = adapters.Adapters(size=8, init="identity")
  wrapped, _, params, new = peft_params(method, kind, bases)
  _, _, batch, base_logits = bases[kind]
  modules = {p.rsplit("/", 1)[0] for p in new}
  if kind == "decoder":
    assert modules == {f"decoder/layers_{i}/{m}" for i in range(2)
                       for m in ("self_attention", "mlp")}
  else:
    assert modules == {f"{stack}/layers_{i}/{m}" for i in range(2)
                       for stack, ms in (("encoder", ("attention", "mlp")), ("decoder", (
                           "self_attention", "encoder_decoder_attention", "mlp"))) for m in ms}
  assert np.array_equal(logits_of(wrapped, params, batch), base_logits)
  changed = logits_of(wrapped, randomised(params, r"adapter_up$"), batch)
  assert not np.allclose(changed, base_logits, atol=1e-3)


def test_adapters_match_a_numpy_reference_on_the_mlp_output():
  """h + relu(h W_down + b_down) W_up + b_up on an MlpBlock, float64 reference."""
  block = layers.MlpBlock(intermediate_dim=12, name="mlp")
  x = np.random.default_rng(0).standard_normal((2, 3, 6)).astype(np.float32)
  method = adapters.Adapters(size=4, targets="", activation="relu", placement="before_dropout")
  wrapped = peft.InterceptedNetwork(block, method.interceptor)
  params = randomised(nn.meta.unbox(wrapped.init(jax.random.key(0), x)["params"]),
                      r"adapter_(up|down_bias|up_bias)$")
  out = np.asarray(wrapped.apply({"params": params}, x))
  h = np.asarray(block.apply({"params": {k: v for k, v in params.items()
                                         if not k.startswith("adapter")}}, x), np.float64)
  p = {k: np.asarray(v, np.float64) for k, v in params.items() if k.startswith("adapter")}
  want = h + np.maximum(h @ p["adapter_down"] + p["adapter_down_bias"], 0) @ p["adapter_up"] \
      + p["adapter_up_bias"]
  np.testing.assert_allclose(out, want, atol=1e-5)
  # Houlsby's placement needs the block's output to go into a dropout: none here.
  after = peft.InterceptedNetwork(block, adapters.Adapters(size=4, targets="").interceptor)
  with pytest.raises(ValueError, match="does not go into a dropout"):
    after.init(jax.random.key(0), x)


class ResidualBlock(nn.Module):
  """x + dropout(mlp(x)), T5's sub-layer with its residual dropout (rate 0.5)."""

  @nn.compact
  def __call__(self, x, deterministic):
    h = layers.MlpBlock(intermediate_dim=12, name="mlp")(x)
    return x + layers.residual_dropout(0.5)(h, deterministic=deterministic)


def gelu64(x):
  """adapter-bert `modeling.gelu` (the tanh approximation), float64."""
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("placement", ["after_dropout", "before_dropout"])
def test_adapter_placement_against_numpy(placement):
  """adapter-bert's `transformer_model`: dropout, then the adapter, then the residual:
  x + adapter(dropout(h)); 'before_dropout': x + dropout(adapter(h)); adapter(z) =
  z + gelu(z W_down + b_down) W_up + b_up (float64 reference). The dropout mask is the
  base block's (same rng, same module path): dropout(h) = its output - x."""
  block = ResidualBlock()
  x = np.random.default_rng(0).standard_normal((2, 3, 6)).astype(np.float32)
  wrapped = peft.InterceptedNetwork(block, adapters.Adapters(size=4, targets="mlp$",
                                                             placement=placement).interceptor)
  params = randomised(nn.meta.unbox(wrapped.init(jax.random.key(0), x, True)["params"]),
                      r"adapter_(up|down_bias|up_bias)$")
  rngs = {"dropout": jax.random.key(5)}
  out = np.asarray(wrapped.apply({"params": params}, x, False, rngs=rngs), np.float64)
  base = {"mlp": {k: v for k, v in params["mlp"].items() if not k.startswith("adapter")}}
  dropped = np.asarray(block.apply({"params": base}, x, False, rngs=rngs), np.float64) - x
  h = np.asarray(block.apply({"params": base}, x, True), np.float64) - x
  kept = np.abs(dropped) > 0  # T5's dropout: whole (row, feature) columns, scaled by 2
  assert 0 < kept.mean() < 1
  p = {k: np.asarray(v, np.float64) for k, v in params["mlp"].items() if k.startswith("adapter")}
  adapter = lambda z: z + gelu64(z @ p["adapter_down"] + p["adapter_down_bias"]) \
      @ p["adapter_up"] + p["adapter_up_bias"]
  want = x + (adapter(dropped) if placement == "after_dropout"
              else np.where(kept, 2.0 * adapter(h), 0.0))
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_adapter_defaults_are_houlsbys(bases):
  """adapter-bert `feedforward_adapter(hidden_size=64, init_scale=1e-3)`: both
  projections truncated normal with stddev 1e-3 (cut at 2 stddev), zero biases, GELU;
  `optimization.py` trains the 'adapters' and 'layer_norm' collections: the norms
  train, nothing else of the base."""
  method = adapters.Adapters()
  assert (method.size, method.activation, method.placement, method.init, method.init_scale) == (
      64, "gelu", "after_dropout", "near_identity", 1e-3)
  wrapped, boxed, params, new = peft_params(method, "t5", bases)
  values = flat(nn.meta.unbox(boxed))
  for name in ("adapter_down", "adapter_up"):
    w = np.concatenate([np.ravel(v) for k, v in values.items() if k.endswith(name)])
    assert np.abs(w).max() <= 2e-3 and 0.7e-3 < w.std() < 1e-3  # truncation shrinks it
  assert not any(np.any(v) for k, v in values.items() if k.endswith("_bias"))
  trained = {p for p, m in flat(method.trainable(boxed)).items() if np.asarray(m).any()}
  assert trained == {p for p in values if re.search(method.param_pattern, p)
                     or re.search(selection.NORM_PATTERN, p)}
  assert "encoder/layers_0/pre_attention_layer_norm/scale" in trained
  assert "decoder/logits_dense/kernel" not in trained
  only = adapters.Adapters(also_train=())  # the option: the adapters alone
  assert {p for p, m in flat(only.trainable(boxed)).items() if np.asarray(m).any()} == {
      p for p in values if re.search(method.param_pattern, p)}
  # Near the identity: the logits move, a little.
  _, _, batch, base_logits = bases["t5"]
  logits = logits_of(wrapped, params, batch)
  assert 0 < np.abs(logits - base_logits).max() < 1e-3


def test_old_adapter_records_load_with_their_placement_and_init():
  """A `peft.json` method record written before `placement` / `init` existed (the
  adapter before the dropout, W_up = 0) loads as that; a new record round-trips."""
  old = {"method": "Adapters", "size": 32, "activation": "relu", "targets": "(attention|mlp)$",
         "also_train": []}
  method = peft_registry.method_from_json(old)
  assert method == adapters.Adapters(size=32, activation="relu", also_train=(),
                                     placement="before_dropout", init="identity")
  new = adapters.Adapters()
  assert peft_registry.method_from_json(json.loads(json.dumps(new.to_json()))) == new
  prompt = {"method": "PromptTuning", "length": 20, "init": "vocab", "seed": 0,
            "vocab_low": 3, "vocab_high": 5000, "also_train": []}
  assert peft_registry.method_from_json(prompt) == prompt_tuning.PromptTuning(length=20)
  assert peft_registry.method_from_json({"method": "LoRA", "rank": 8, "alpha": 16.0,
                                         "dropout": 0.0, "targets": lora.DEFAULT_TARGETS,
                                         "also_train": []}).scale == 2.0


# -- prompt tuning -------------------------------------------------------------------
PROMPT_IDS = np.array([5, 17, 9], np.int32)


@pytest.mark.parametrize("kind", [pytest.param("t5", marks=pytest.mark.slow), "decoder"])
def test_a_prompt_of_token_embeddings_equals_those_tokens_prepended(bases, kind):
  """The prompt = the embeddings of PROMPT_IDS: the logits equal the base model's on
  the input with PROMPT_IDS in front (decoder-only: its logits after them); the
  layout of logits and targets is the user's."""
  method = prompt_tuning.PromptTuning(length=3)
  wrapped, _, params, new = peft_params(method, kind, bases)
  model, base_params, batch, base_logits = bases[kind]
  stack = "encoder" if kind.startswith("t5") else "decoder"
  assert new == [f"{stack}/prompt"]
  table = np.asarray(base_params["token_embedder"]["embedding"])
  params = {**params, stack: {**params[stack], "prompt": table[PROMPT_IDS]}}
  logits = logits_of(wrapped, params, batch)
  assert logits.shape == base_logits.shape
  assert not np.allclose(logits, base_logits, atol=1e-3)
  rows = batch["decoder_target_tokens"].shape[0]
  prefix = np.broadcast_to(PROMPT_IDS, (rows, 3))
  if kind.startswith("t5"):
    prompted = np.concatenate([prefix, batch["encoder_input_tokens"]], 1)
    reference = logits_of(model, base_params, {**batch, "encoder_input_tokens": prompted})
  else:
    longer = {name: np.concatenate([prefix, batch[name]], 1)
              for name in ("decoder_input_tokens", "decoder_target_tokens")}
    reference = logits_of(model, base_params, longer)[:, 3:]
  np.testing.assert_allclose(logits, np.asarray(reference), atol=2e-5, rtol=1e-5)
  # The loss counts the user's target positions only: the same weights, the same layout.
  loss, stats = wrapped.loss_fn(params, batch, None)
  assert float(stats["weight_sum"]) == float(batch["decoder_loss_weights"].sum())


def test_prompt_initialised_from_vocabulary_rows_equals_those_rows(bases):
  _, _, params, _ = peft_params(prompt_tuning.PromptTuning(length=4), "t5", bases)
  method = prompt_tuning.PromptTuning(length=4, seed=3, vocab_low=3, vocab_high=100)
  ids = method.token_ids(128)
  assert len(set(ids.tolist())) == 4 and ((ids >= 3) & (ids < 100)).all()
  np.testing.assert_array_equal(ids, prompt_tuning.PromptTuning(
      length=4, seed=3, vocab_low=3, vocab_high=100).token_ids(128))
  assert not np.array_equal(ids, prompt_tuning.PromptTuning(
      length=4, seed=4, vocab_low=3, vocab_high=100).token_ids(128))
  out = method.initialize(params, fresh=None, restored=frozenset())
  table = np.asarray(params["token_embedder"]["embedding"])
  assert np.asarray(out["encoder"]["prompt"]).tobytes() == table[ids].tobytes()
  uniform = prompt_tuning.PromptTuning(length=4, init="uniform")
  assert uniform.initialize(params, None, frozenset()) is params
  # A prompt read from the checkpoint (a prompt-tuning run's own) is kept.
  kept = method.initialize(params, None, frozenset({"encoder/prompt", "decoder/x"}))
  assert kept["encoder"]["prompt"] is params["encoder"]["prompt"]
  assert prompt_tuning.PromptTuning().length == 100  # the reference's released prompts


class FakeVocabulary:
  """`encode` as seqio's: pieces of a text, no EOS."""
  pieces = {"positive": [17, 40], "negative": [23], "neutral": [41, 42, 43]}

  def encode(self, text):
    return self.pieces[text]


def test_class_label_init_is_the_references_from_embedded_list(bases):
  """prompt-tuning `prompts.from_embedded_list(initializer=from_sample_of_embeddings)`:
  the sampled rows, then row i = the mean embedding of class label i's pieces."""
  _, _, params, _ = peft_params(prompt_tuning.PromptTuning(length=5), "t5", bases)
  ids = prompt_tuning.label_token_ids(["positive", "negative", "neutral"], FakeVocabulary())
  assert ids == ((17, 40), (23,), (41, 42, 43))
  method = prompt_tuning.PromptTuning(length=5, init="class_labels", class_label_ids=ids, seed=2)
  table = np.asarray(params["token_embedder"]["embedding"], np.float64)
  want = table[method.token_ids(table.shape[0])]
  for row, label in enumerate(ids):
    want[row] = table[list(label)].mean(axis=0)
  got = np.asarray(method.initialize(params, None, frozenset())["encoder"]["prompt"])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got[3:], table[method.token_ids(table.shape[0])][3:])
  assert peft_registry.method_from_json(json.loads(json.dumps(method.to_json()))) == method
  with pytest.raises(ValueError, match="class_label_ids"):
    prompt_tuning.PromptTuning(init="class_labels")
  with pytest.raises(ValueError, match="3 class label"):
    prompt_tuning.PromptTuning(length=2, init="class_labels", class_label_ids=ids)


def test_decoder_only_prompt_tuning_refuses_cached_decoding():
  wrapped = prompt_tuning.PromptTuning(length=2).wrap(make_model("decoder"))
  with pytest.raises(ValueError, match="cached decoding"):
    wrapped.init_cache(2, 8)


@pytest.mark.parametrize("bad,match", [(lambda: lora.LoRA(rank=0), "rank"),
                                       (lambda: adapters.Adapters(activation="tanh"), "tanh"),
                                       (lambda: prompt_tuning.PromptTuning(init="x"), "init")])
def test_bad_settings_are_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()


def test_targets_that_match_no_module_are_an_error():
  method = lora.LoRA(targets="no_such_module$")
  boxed = jax.eval_shape(method.wrap(make_model("decoder")).init, jax.random.key(0),
                         make_batch("decoder"))["params"]
  with pytest.raises(ValueError, match="added no parameter"):
    method.trainable(boxed)


# -- training, export and loading ------------------------------------------------------
METHODS = {"lora": (lora.LoRA(rank=4, alpha=8.0), "t5_scanned"),
           "adapters": (adapters.Adapters(size=8), "decoder"),
           "prompt": (prompt_tuning.PromptTuning(length=3, init="uniform"), "t5")}


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
  """{name: (method, kind, params before, params after 3 steps, PEFT export dirs)}."""
  root = tmp_path_factory.mktemp("peft")
  out = {}
  for name, (method, kind) in METHODS.items():
    model, base_params, batch, _ = bases[kind]
    base_dir = checkpoints.save_params(root / name / "base", 7, base_params)
    wrapped, _, params, _ = peft_params(method, kind, bases)
    schedule = optim.constant(0.05)
    trainer = trainer_lib.Trainer(wrapped, optim.adamw(schedule), schedule,
                                  partitioning.Partitioner({"data": 1}), finetuning=method)
    state = trainer.state_from_params(params, jnp.asarray(7, jnp.int32), 0, batch)
    for _ in range(3):
      state, _ = trainer.train_step(state, batch)
    after = jax.device_get(state.params)
    written = method.export(after, root / name / "run", 10, str(base_dir))
    out[name] = (method, kind, params, after, written)
  return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_moves_only_the_peft_parameters(trained, name):
  method, _, before, after, _ = trained[name]
  before, after = flat(before), flat(after)
  moved = {p for p in before if np.asarray(before[p]).tobytes() != np.asarray(after[p]).tobytes()}
  own = {p for p in before if any(re.search(g, p) for g in method.trained_groups())}
  # (B is 0 at the start, so A gets no gradient at step 1; after 3 steps every trained
  # parameter has moved.)
  assert moved == own and own
  if name == "adapters":  # Houlsby: the layer norms train too
    assert {p for p in own if "norm" in p} == {p for p in before if "norm/scale" in p}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_peft_export_holds_only_the_trained_params_and_reloads_exactly(trained, bases, name):
  method, kind, _, after, written = trained[name]
  model, _, batch, _ = bases[kind]
  peft_dir = written[0]
  assert peft_dir.name == "checkpoint_10" and peft_dir.parent.name == "peft"
  own = {p for p in flat(after) if any(re.search(g, p) for g in method.trained_groups())}
  assert set(checkpoints.own_param_shapes(peft_dir)) == own
  assert set(checkpoints.saved_param_shapes(peft_dir)) == set(flat(after))
  info = json.loads((peft_dir / "peft.json").read_text())
  assert info["base_checkpoint"].endswith(f"{name}/base/checkpoint_7")
  assert info["method"]["method"] == type(method).__name__
  lengths = {"inputs": 11, "targets": 7} if kind != "decoder" else {"targets": 9}
  loaded_model, params, step = checkpoint_loading.load_model_checkpoint(
      model, str(peft_dir), lengths, _one_device())
  assert step == 10 and loaded_model.peft_method == method
  loaded = flat(jax.device_get(params))
  assert sorted(loaded) == sorted(flat(after))
  assert all(np.asarray(loaded[k]).tobytes() == np.asarray(v).tobytes()
             for k, v in flat(after).items())
  trained_logits = logits_of(method.wrap(model), after, batch)
  assert np.array_equal(logits_of(loaded_model, params, batch), trained_logits)
  # INITIAL_CHECKPOINT_PATH: the same full tree from the checkpoint chain.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), after)
  restored, missing = checkpoints.restore_matching_params(peft_dir, abstract)
  assert not missing and all(np.asarray(restored_leaf).tobytes() == np.asarray(v).tobytes()
                             for restored_leaf, v in zip(jax.tree.leaves(restored),
                                                         jax.tree.leaves(after)))
  # The run's own checkpoint (the whole wrapped tree) is refused by the plain model.
  run_dir = checkpoints.save_params(peft_dir.parent.parent / "whole", 10, after)
  with pytest.raises(errors.ConfigError, match="PEFT run's own checkpoint"):
    checkpoint_loading.load_checkpoint(model, str(run_dir), lengths, _one_device())
  if name == "lora":  # The merged checkpoint: the plain model, within float tolerance.
    assert [w.parent.name for w in written] == ["peft", "merged"]
    for path in (written[1], peft_dir):  # load_checkpoint merges a LoRA PEFT checkpoint
      merged, _ = checkpoint_loading.load_checkpoint(model, str(path), lengths, _one_device())
      np.testing.assert_allclose(logits_of(model, merged, batch), trained_logits,
                                 atol=1e-5, rtol=1e-5)
  else:
    assert len(written) == 1


# -- the gin files, from the command line -----------------------------------------------
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}"
TASK = "--gin.MIXTURE_OR_TASK_NAME='mt_first_word'"


def gin_finetune(technique, initial, model_dir, steps, *extra):
  return train.main(["--gin_file=gin_configs/models/t5_1_1/tiny.gin",
                     f"--gin_file=gin_configs/finetune/{technique}.gin",
                     f"--gin.INITIAL_CHECKPOINT_PATH={initial}", f"--gin.MODEL_DIR={model_dir}",
                     f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=2", "--gin.EVAL_PERIOD=None",
                     "--gin.LOG_PERIOD=1", "--gin.EvalConfig.inference_evaluator=None",
                     LENGTHS, TASK, *extra])


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
  """A step-2 checkpoint of T5.1.1 tiny (models/t5_1_1/tiny.gin) and its parameters."""
  from tests import test_finetuning_selection as selection_tests
  step_dir = checkpoints.save_params(tmp_path_factory.mktemp("peft_gin") / "pretrain", 2,
                                     selection_tests.tiny_params())
  return step_dir, selection_tests.load(step_dir)


# LoRA's gin file in the default run; adapters' and prompt tuning's (~15 s each) -m slow
# (their in-process training and export are tested above).
@pytest.mark.parametrize("technique", ["lora", pytest.param("adapters", marks=pytest.mark.slow),
                                       pytest.param("prompt_tuning", marks=pytest.mark.slow)])
def test_gin_file_fine_tunes_from_the_command_line(tiny_pretrained, tmp_path, technique):
  """One step of each PEFT gin file (from a step-2 checkpoint): the parameters that moved
  are exactly the exported ones, the base is bit-identical, the export holds the run's
  values; LoRA's merged checkpoint is W + (alpha / r) A B of the exported A and B."""
  from tests import test_finetuning_selection as selection_tests
  step_dir, start = tiny_pretrained
  model_dir = tmp_path / technique
  assert gin_finetune(technique, step_dir, model_dir, 3) == 0
  assert [r["step"] for r in map(json.loads, (model_dir / "metrics" / "train.jsonl")
                                 .read_text().splitlines())] == [3]
  peft_dir = model_dir / "peft" / "checkpoint_3"
  own = checkpoints.own_param_shapes(peft_dir)
  pattern = {"lora": "/lora_[ab]$", "adapters": "/adapter_|norm/scale$",
             "prompt_tuning": "/prompt$"}
  assert own and all(re.search(pattern[technique], p) for p in own)
  full = selection_tests.load(model_dir / "checkpoint_3")
  # Exported: what the run added and the base parameters it moved; the rest of the base
  # is frozen bit for bit (Houlsby's adapters train the layer norms).
  added = set(full) - set(start)
  moved = {p for p in start if full[p].tobytes() != start[p].tobytes()}
  assert added | moved == set(own)
  assert moved == ({p for p in own if p.endswith("norm/scale")} if technique == "adapters"
                   else set())
  if technique == "lora":  # B starts at 0 and has moved
    assert all(np.any(full[p] != 0) for p in own if p.endswith("lora_b"))
  abstract = traverse_util.unflatten_dict({tuple(k.split("/")): jax.ShapeDtypeStruct(
      v, jnp.float32) for k, v in own.items()})
  exported, _ = checkpoints.restore_params_from_path(peft_dir, abstract,
                                                     jax.ShapeDtypeStruct((), jnp.int32))
  assert all(np.asarray(v).tobytes() == full[p].tobytes() for p, v in flat(exported).items())
  info = json.loads((peft_dir / "peft.json").read_text())
  assert info["base_checkpoint"] == str(step_dir)
  if technique == "prompt_tuning":  # the reference's 100 prompt tokens
    assert full["encoder/prompt"].shape == (100, 64)
  if technique == "lora":
    merged = selection_tests.load(model_dir / "merged" / "checkpoint_3")
    assert set(merged) == set(start)
    kernels = {p[:-len("lora_a")] + "kernel" for p in own if p.endswith("lora_a")}
    assert kernels and all("attention/query/" in k or "attention/value/" in k for k in kernels)
    for path, value in merged.items():
      if path in kernels:
        prefix = path[:-len("kernel")]
        expected = start[path] + 1.0 * (full[prefix + "lora_a"] @ full[prefix + "lora_b"])
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)
        assert value.tobytes() != start[path].tobytes(), path
      else:
        assert value.tobytes() == start[path].tobytes(), path


@pytest.mark.slow
@pytest.mark.parametrize("technique", ["lora", "prompt_tuning"])
def test_peft_checkpoint_as_initial_checkpoint_restores_base_and_its_parameters(
    tiny_pretrained, tmp_path, technique):
  """INITIAL_CHECKPOINT_PATH = a PEFT checkpoint: base + LoRA / the trained prompt restored
  (lr 0 keeps them; the prompt is not initialised again from the vocabulary)."""
  from tests import test_finetuning_selection as selection_tests
  step_dir, _ = tiny_pretrained
  assert gin_finetune(technique, step_dir, tmp_path / "first", 4) == 0
  peft_dir = tmp_path / "first" / "peft" / "checkpoint_4"
  full = selection_tests.load(tmp_path / "first" / "checkpoint_4")
  again = tmp_path / "again"
  assert gin_finetune(technique, peft_dir, again, 5, "--gin.LEARNING_RATE=0.0") == 0
  resumed = selection_tests.load(again / "checkpoint_5")
  assert resumed.keys() == full.keys()
  assert all(resumed[p].tobytes() == full[p].tobytes() for p in full)
  info = json.loads((again / "peft" / "checkpoint_5" / "peft.json").read_text())
  assert info["base_checkpoint"] == str(peft_dir)
