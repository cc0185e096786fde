"""Structured pruning (`t5xlike.compression`): Minitron's importance against a NumPy float64
computation, the kept weights against the original's slices, the pruned network against the
original with the pruned structures zeroed, and the targets' one-line errors."""
import dataclasses
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5xlike.compression import importance, pruning
from t5xlike.data import feature_converters
from t5xlike.interop import network_shapes, param_trees
from t5xlike.models import decoder, encoder_decoder, t5
from tests import pruning_numpy_reference as ref, t5_numpy_reference

T5_CONFIG = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=4, num_encoder_layers=3,
                        num_decoder_layers=2, head_dim=4, mlp_dim=24)
DECODER_CONFIG = decoder.DecoderConfig(vocab_size=64, emb_dim=16, num_heads=8, num_kv_heads=2,
                                       num_layers=3, head_dim=4, mlp_dim=24)


def _shifted(targets):
  return feature_converters.shift_right(targets).astype(np.int32)


def _t5_batches(seed=0, count=2):
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    encoder = rng.integers(2, 64, (3, 7)).astype(np.int32)
    encoder[1, 5:] = 0  # padding
    targets = rng.integers(2, 64, (3, 5)).astype(np.int32)
    targets[2, 3:] = 0
    batches.append({"encoder_input_tokens": encoder, "decoder_target_tokens": targets,
                    "decoder_input_tokens": _shifted(targets),
                    "decoder_loss_weights": (targets > 0).astype(np.float32)})
  return batches


def _decoder_batches(seed=1, count=2):
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    targets = rng.integers(2, 64, (3, 6)).astype(np.int32)
    targets[0, 4:] = 0
    batches.append({"decoder_target_tokens": targets, "decoder_input_tokens": _shifted(targets),
                    "decoder_loss_weights": (targets > 0).astype(np.float32)})
  return batches


class _Family:
  """A tiny model, random parameters (norm scales too) and calibration batches."""

  def __init__(self, model, batches, seed):
    self.model, self.batches, self.config = model, batches, model.network.config
    params = nn.meta.unbox(model.init(jax.random.key(seed), batches[0])["params"])
    rng = np.random.default_rng(seed)
    flat = {k: np.asarray(v) for k, v in param_trees.flatten(jax.device_get(params)).items()}
    for name in flat:
      if name.endswith("/scale"):  # RMSNorm scales start at 1: vary them per channel.
        flat[name] = rng.uniform(0.5, 1.5, flat[name].shape).astype(np.float32)
    self.flat = flat
    self.params = param_trees.unflatten(flat)
    self.scores = importance.calibrate(model, self.params, batches, self.config.head_dim)

  def logits(self, model, flat, batch):
    return np.asarray(model.logits(param_trees.unflatten(flat), batch))


@pytest.fixture(scope="module")
def t5_family():
  return _Family(encoder_decoder.EncoderDecoderModel(t5.Transformer(T5_CONFIG), z_loss=0.0),
                 _t5_batches(), seed=3)


@pytest.fixture(scope="module")
def decoder_family():
  return _Family(decoder.DecoderOnlyModel(decoder.Transformer(DECODER_CONFIG), z_loss=0.0),
                 _decoder_batches(), seed=4)


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _reference_scores(family):
  batch = _concat(family.batches)  # the L2 over rows spans the batches
  params = param_trees.unflatten(family.flat)
  if isinstance(family.config, t5.T5Config):
    _, record = ref.t5_forward(params, family.config.num_heads, batch["encoder_input_tokens"],
                               batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    valid = {"encoder": batch["encoder_input_tokens"] > 0,
             "decoder": batch["decoder_target_tokens"] > 0}
  else:
    _, record = ref.decoder_forward(params, family.config.num_heads, family.config.num_kv_heads,
                                    batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    valid = {"decoder": batch["decoder_target_tokens"] > 0}
  return ref.scores(record, valid)


@pytest.mark.parametrize("name", [pytest.param("t5_family", marks=pytest.mark.slow),
                                  "decoder_family"])
def test_recording_reference_is_the_forward_pass(name, request):
  """The recording reference gives the logits t5xlike gives (so its records are the
  network's activations)."""
  family = request.getfixturevalue(name)
  batch = family.batches[0]
  params = param_trees.unflatten(family.flat)
  if isinstance(family.config, t5.T5Config):
    logits, _ = ref.t5_forward(params, family.config.num_heads, batch["encoder_input_tokens"],
                               batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    np.testing.assert_allclose(logits, t5_numpy_reference.forward(
        params, family.config.num_heads, batch["encoder_input_tokens"],
        batch["decoder_input_tokens"], batch["decoder_target_tokens"]), rtol=1e-12, atol=1e-12)
  else:
    logits, _ = ref.decoder_forward(params, family.config.num_heads, family.config.num_kv_heads,
                                    batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  np.testing.assert_allclose(family.logits(family.model, family.flat, batch), logits, atol=2e-5)


@pytest.mark.parametrize("name", ["t5_family", "decoder_family"])
def test_importance_matches_a_numpy_float64_computation(name, request):
  """Every head, MLP unit, norm channel and layer score equals the float64 reference
  (Minitron's aggregation: mean over a row's real tokens, L2 over the rows of both
  batches), and so does every top-k ranking."""
  family = request.getfixturevalue(name)
  expected, scores = _reference_scores(family), family.scores
  for kind, got in (("heads", scores.heads), ("mlp", scores.mlp), ("norm", scores.norms)):
    assert sorted(got) == sorted(expected[kind])
    for path, values in got.items():
      np.testing.assert_allclose(values, expected[kind][path], rtol=2e-5, err_msg=path)
      for k in range(1, len(values)):
        np.testing.assert_array_equal(pruning.top(values, k), pruning.top(expected[kind][path], k))
  np.testing.assert_allclose(scores.embedding, expected["embedding"], rtol=2e-5)
  assert sorted(scores.layers) == sorted(expected["layers"])
  for path, value in scores.layers.items():
    assert value == pytest.approx(expected["layers"][path], abs=2e-6), path
  if isinstance(family.config, t5.T5Config):
    assert scores.tokens == {"encoder": int(sum((b["encoder_input_tokens"] > 0).sum()
                                                for b in family.batches)),
                             "decoder": int(sum((b["decoder_target_tokens"] > 0).sum()
                                                for b in family.batches))}
  assert scores.rows == 6


def _numpy_loss(family, flat):
  """Mean token cross entropy (z_loss 0) of the float64 reference."""
  total, count = 0.0, 0.0
  for batch in family.batches:
    params = param_trees.unflatten(flat)
    if isinstance(family.config, t5.T5Config):
      logits = t5_numpy_reference.forward(params, family.config.num_heads,
                                          batch["encoder_input_tokens"],
                                          batch["decoder_input_tokens"],
                                          batch["decoder_target_tokens"])
    else:
      logits, _ = ref.decoder_forward(params, family.config.num_heads,
                                      family.config.num_kv_heads, batch["decoder_input_tokens"],
                                      batch["decoder_target_tokens"])
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    total -= float((picked * batch["decoder_loss_weights"]).sum())
    count += float(batch["decoder_loss_weights"].sum())
  return total / count


def _without_layer(flat, stack, index):
  """The unscanned parameters with one layer removed and the later ones renumbered."""
  out = {}
  for name, value in flat.items():
    match = re.match(rf"^{stack}/layers_(\d+)/(.*)$", name)
    if match is None:
      out[name] = value
    elif int(match[1]) != index:
      out[f"{stack}/layers_{int(match[1]) - (int(match[1]) > index)}/{match[2]}"] = value
  return out


def test_loss_layer_criterion_is_the_loss_without_the_layer(t5_family):
  """'loss' ranks a layer by the calibration loss of the network without it (the float64
  reference drops the layer outright) minus the full network's loss."""
  scores = importance.calibrate(t5_family.model, t5_family.params, t5_family.batches,
                                T5_CONFIG.head_dim, "loss")
  full = _numpy_loss(t5_family, t5_family.flat)
  assert sorted(scores.layers) == [f"decoder/layers_{i}" for i in range(2)] + [
      f"encoder/layers_{i}" for i in range(3)]
  for path, value in scores.layers.items():
    stack, index = path.split("/layers_")
    expected = _numpy_loss(t5_family, _without_layer(t5_family.flat, stack, int(index))) - full
    assert value == pytest.approx(expected, abs=2e-5), path


def test_scanned_and_unscanned_networks_score_alike(decoder_family):
  """A scanned model is scored through its unscanned copy with the same parameters."""
  scanned = decoder.DecoderOnlyModel(decoder.Transformer(dataclasses.replace(
      DECODER_CONFIG, scan_layers=True, remat_policy="full")), z_loss=0.0)
  unscanned = importance.unscanned_model(scanned)
  assert not unscanned.network.config.scan_layers
  assert unscanned.network.config.remat_policy == "none"
  scores = importance.calibrate(unscanned, decoder_family.params, decoder_family.batches,
                                DECODER_CONFIG.head_dim)
  for path, values in scores.heads.items():
    np.testing.assert_allclose(values, decoder_family.scores.heads[path], rtol=1e-6)
  assert scores.layers == pytest.approx(decoder_family.scores.layers, abs=1e-7)


# ---- Selection and slicing. ----

def _check_slices(family, targets):
  selection = pruning.select(family.config, targets, family.scores)
  config, flat = pruning.prune(family.config, family.flat, selection)
  assert {k: v.shape for k, v in flat.items()} == network_shapes.param_shapes(config)
  ref.assert_slices(family.flat, flat, selection.describe(), family.config.head_dim)
  return selection, config, flat


def test_t5_pruned_shapes_and_kept_weights_are_the_originals_slices(t5_family):
  targets = pruning.targets_from_flags(T5_CONFIG, num_encoder_layers="2", heads="2",
                                       mlp_dim="50%", emb_dim="10")
  selection, config, _ = _check_slices(t5_family, targets)
  assert (config.num_encoder_layers, config.num_decoder_layers, config.num_heads,
          config.mlp_dim, config.emb_dim) == (2, 2, 2, 12, 10)
  scores = t5_family.scores
  # The indices are the importance's: the top layers, units, channels and heads.
  ranked = [scores.layers[f"encoder/layers_{i}"] for i in range(3)]
  assert selection.layers == {"encoder": tuple(sorted(np.argsort(ranked)[1:])),
                              "decoder": (0, 1)}
  for path, kept in selection.mlp.items():
    np.testing.assert_array_equal(kept, np.sort(np.argsort(-scores.mlp[path])[:12]))
  np.testing.assert_array_equal(selection.embedding, np.sort(np.argsort(-scores.embedding)[:10]))
  # Self-attention heads: one set per stack (the shared relative position biases), by the
  # sum over the kept layers; cross-attention heads per layer.
  for stack, name in (("encoder", "attention"), ("decoder", "self_attention")):
    summed = sum(scores.heads[f"{stack}/layers_{i}/{name}"] for i in selection.layers[stack])
    np.testing.assert_array_equal(selection.relpos[stack], np.sort(np.argsort(-summed)[:2]))
    for i in selection.layers[stack]:
      np.testing.assert_array_equal(selection.heads[f"{stack}/layers_{i}/{name}"],
                                    selection.relpos[stack])
  for i in range(2):
    path = f"decoder/layers_{i}/encoder_decoder_attention"
    np.testing.assert_array_equal(selection.heads[path],
                                  np.sort(np.argsort(-scores.heads[path])[:2]))


def test_decoder_gqa_heads_keep_whole_kv_groups(decoder_family):
  """--heads keeps every kv head and the top query heads of each group; --kv_heads keeps
  the groups with the largest L2 norm of their heads' scores; kept query head j reads kv
  head j // g'."""
  scores = decoder_family.scores
  selection, config, _ = _check_slices(
      decoder_family, pruning.targets_from_flags(DECODER_CONFIG, heads="4", num_layers="2"))
  assert (config.num_heads, config.num_kv_heads, config.num_layers) == (4, 2, 2)
  for path, heads in selection.heads.items():
    per_group = scores.heads[path].reshape(2, 4)
    np.testing.assert_array_equal(selection.kv_heads[path], [0, 1])
    np.testing.assert_array_equal(heads, [k * 4 + j for k in range(2)
                                          for j in np.sort(np.argsort(-per_group[k])[:2])])
  selection, config, _ = _check_slices(
      decoder_family, pruning.targets_from_flags(DECODER_CONFIG, kv_heads="1", mlp_dim="8"))
  assert (config.num_heads, config.num_kv_heads, config.mlp_dim) == (4, 1, 8)
  for path, heads in selection.heads.items():
    group = int(np.argmax(np.linalg.norm(scores.heads[path].reshape(2, 4), axis=1)))
    np.testing.assert_array_equal(selection.kv_heads[path], [group])
    np.testing.assert_array_equal(heads, np.arange(4) + 4 * group)


def _zeroed(family, selection):
  """The original unscanned parameters with every pruned head's `out` rows, pruned unit's
  `wo` rows and dropped layer's residual branches zeroed."""
  flat = {k: v.copy() for k, v in family.flat.items()}
  hd = family.config.head_dim
  for name, value in flat.items():
    match = re.match(r"^([^/]+)/layers_(\d+)/", name)
    if match and int(match[2]) not in selection.layers[match[1]]:
      if name.endswith(("/out/kernel", "/wo/kernel")):
        value[...] = 0.0
      continue
    module = name.rsplit("/", 2)[0]
    if name.endswith("/out/kernel"):
      kept = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in selection.heads[module]])
      value[np.setdiff1d(np.arange(value.shape[0]), kept)] = 0.0
    elif name.endswith("/mlp/wo/kernel"):
      value[np.setdiff1d(np.arange(value.shape[0]), selection.mlp[module])] = 0.0
  return flat


@pytest.mark.parametrize("name, flags", [
    ("t5_family", dict(num_encoder_layers="2", num_decoder_layers="1", heads="2", mlp_dim="10")),
    ("t5_family", dict(drop_layers="encoder:0,decoder:1", heads="75%")),
    ("decoder_family", dict(num_layers="2", heads="2", mlp_dim="10")),
    ("decoder_family", dict(kv_heads="1", heads="2", mlp_dim="30%")),
])
def test_pruned_logits_equal_the_original_with_the_pruned_structures_zeroed(name, flags, request):
  """Dropping heads, units and layers is exact: the smaller network computes what the
  original computes with their outputs zeroed (a dropped layer's residual branches zeroed
  pass its input through). Embedding channels are not: RMSNorm's mean runs over fewer."""
  family = request.getfixturevalue(name)
  selection = pruning.select(family.config, pruning.targets_from_flags(family.config, **flags),
                             family.scores)
  config, flat = pruning.prune(family.config, family.flat, selection)
  pruned_model = importance.with_network_config(family.model, config)
  for batch in family.batches:
    pruned = family.logits(pruned_model, flat, batch)
    reference = family.logits(family.model, _zeroed(family, selection), batch)
    np.testing.assert_allclose(pruned, reference, atol=3e-5, rtol=0)
    assert not np.allclose(pruned, family.logits(family.model, family.flat, batch), atol=1e-3)


def test_embedding_pruned_network_is_its_sliced_parameters(t5_family):
  """With embedding channels pruned, the smaller network is T5.1.1 (the float64 reference)
  on the sliced parameters; keeping every channel changes nothing."""
  batch = t5_family.batches[0]
  for emb_dim in ("9", "16"):
    selection = pruning.select(T5_CONFIG, pruning.targets_from_flags(T5_CONFIG, emb_dim=emb_dim),
                               t5_family.scores)
    config, flat = pruning.prune(T5_CONFIG, t5_family.flat, selection)
    got = t5_family.logits(importance.with_network_config(t5_family.model, config), flat, batch)
    expected = t5_numpy_reference.forward(param_trees.unflatten(flat), config.num_heads,
                                          batch["encoder_input_tokens"],
                                          batch["decoder_input_tokens"],
                                          batch["decoder_target_tokens"])
    np.testing.assert_allclose(got, expected, atol=2e-5)
  np.testing.assert_array_equal(got, t5_family.logits(t5_family.model, t5_family.flat, batch))


# ---- The targets' errors: one line naming the flag. ----

@pytest.mark.parametrize("config, flags, message", [
    (T5_CONFIG, dict(mlp_dim="0%"), "--mlp_dim=0% leaves nothing"),
    (T5_CONFIG, dict(heads="10%"), "--heads=10% leaves nothing: it keeps 0 of the model's 4"),
    (T5_CONFIG, dict(emb_dim="0"), "--emb_dim=0 leaves nothing"),
    (T5_CONFIG, dict(heads="5"), "the model has 4 attention heads; pruning cannot add any"),
    (T5_CONFIG, dict(mlp_dim="half"), "--mlp_dim=half: expected the MLP units kept"),
    (T5_CONFIG, dict(mlp_dim="150%"), "between 0% and 100%"),
    (T5_CONFIG, dict(drop_layers="encoder:0,encoder:1,encoder:2"), "leaves nothing"),
    (T5_CONFIG, dict(drop_layers="1"), "name the stack of '1'"),
    (T5_CONFIG, dict(drop_layers="encoder:3"), "is not a layer of encoder (0..2)"),
    (T5_CONFIG, dict(num_layers="1"), "--num_layers: not a depth of this model"),
    (T5_CONFIG, dict(kv_heads="1"), "--kv_heads is for grouped-query attention"),
    (T5_CONFIG, dict(num_encoder_layers="1", drop_layers="encoder:0"), "choose one"),
    (DECODER_CONFIG, dict(heads="3"), "--heads=3 breaks grouped-query attention: 3 query heads "
                                      "do not split evenly over 2 key/value heads"),
    (DECODER_CONFIG, dict(heads="8", kv_heads="1"), "the model's groups have 4"),
    (DECODER_CONFIG, dict(num_decoder_layers="1"), "use --num_layers"),
    (DECODER_CONFIG, dict(num_layers="0%"), "--num_layers=0% leaves nothing"),
])
def test_bad_targets_are_one_line_errors(config, flags, message):
  with pytest.raises(ValueError) as error:
    pruning.targets_from_flags(config, **flags)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_sizes_are_counts_or_rounded_percentages():
  targets = pruning.targets_from_flags(DECODER_CONFIG, heads="50%", mlp_dim="33%", emb_dim="12")
  assert (targets.heads, targets.kv_heads, targets.mlp_dim, targets.emb_dim) == (4, 2, 8, 12)
  mha = dataclasses.replace(DECODER_CONFIG, num_kv_heads=8)
  # Without GQA each query head keeps its own key/value head.
  assert pruning.targets_from_flags(mha, heads="3").kv_heads == 3
  assert pruning.targets_from_flags(DECODER_CONFIG, kv_heads="1").heads == 4
  assert pruning.targets_from_flags(T5_CONFIG).is_empty()


def test_another_family_is_refused():
  from t5xlike.models import encoder
  model = encoder.MLMModel(encoder.EncoderNetwork(encoder.EncoderConfig(
      vocab_size=64, emb_dim=16, num_heads=2, num_layers=1, head_dim=8, mlp_dim=16), head="mlm"))
  with pytest.raises(ValueError, match="MODEL is a MLMModel: pruning supports the T5"):
    pruning.network_config(model)
