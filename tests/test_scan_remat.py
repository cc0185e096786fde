"""Scan over layers and remat policies: same losses and gradients as the plain model
(encoder-decoder and decoder-only)."""
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5xlike import optim, partitioning
from t5xlike.models import decoder, encoder_decoder, layers, t5
from t5xlike.training import trainer as trainer_lib

# emb 128 x mlp 256: big enough for Adafactor to factor the MLP kernels.
BASE = dict(vocab_size=256, emb_dim=128, num_heads=4, num_encoder_layers=3,
            num_decoder_layers=2, head_dim=32, mlp_dim=256)


def make(**overrides):
  cfg = t5.T5Config(**{**BASE, **overrides})
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg))
  schedule = optim.constant(0.05)
  return cfg, trainer_lib.Trainer(model, optim.adafactor(schedule), schedule,
                                  partitioning.Partitioner({"data": 1}))


def batches(count=4):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    targets = rng.integers(1, 256, (4, 8)).astype(np.int32)
    out.append({"encoder_input_tokens": rng.integers(1, 256, (4, 16)).astype(np.int32),
                "decoder_target_tokens": targets,
                "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
                "decoder_loss_weights": np.ones((4, 8), np.float32)})
  return out


@pytest.fixture(scope="module")
def plain_and_scanned():
  data = batches(1) * 4  # the same batch: the loss must fall
  cfg, plain = make()
  state = plain.init_state(0, data[0])
  initial = jax.device_get(state.params)
  cfg_s, scanned = make(scan_layers=True)
  scanned_state = scanned.init_state(0, data[0])
  stacked = t5.stack_layers(initial, cfg.num_encoder_layers, cfg.num_decoder_layers)
  scanned_state = scanned_state.replace(params=jax.device_put(stacked),
                                        opt_state=scanned.state_plan(data[0]).optimizer.init(
                                            stacked))
  losses = {"plain": [], "scanned": []}
  for batch in data:
    state, m = plain.train_step(state, batch)
    losses["plain"].append(float(m["loss"]))
    scanned_state, m = scanned.train_step(scanned_state, batch)
    losses["scanned"].append(float(m["loss"]))
  return losses, jax.device_get(state.params), jax.device_get(scanned_state.params), scanned


def test_scanned_parameters_carry_a_layers_axis(plain_and_scanned):
  _, _, scanned_params, scanned = plain_and_scanned
  assert scanned_params["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (3, 128, 256)
  assert scanned_params["decoder"]["layers"]["self_attention"]["query"]["kernel"].shape == (
      2, 128, 128)
  specs = nn.get_partition_spec(scanned.state_plan(batches(1)[0]).boxed_params)
  assert tuple(specs["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]) == ("layers", "embed", "mlp")


def test_scanned_model_trains_like_the_plain_one(plain_and_scanned):
  losses, plain_params, scanned_params, _ = plain_and_scanned
  np.testing.assert_allclose(losses["scanned"], losses["plain"], rtol=1e-5)
  assert losses["plain"][-1] < losses["plain"][0]
  unstacked = t5.unstack_layers(scanned_params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(plain_params)[0],
                          jax.tree.leaves(unstacked)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=str(path))


def _scanned_gradients(policy):
  batch = batches(1)[0]
  cfg = t5.T5Config(**{**BASE, "scan_layers": True, "remat_policy": policy})
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg))
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  return jax.jit(jax.grad(lambda q: model.loss_fn(q, batch, None)[0]))(params)


@pytest.fixture(scope="module")
def gradients_without_remat():
  return _scanned_gradients("none")


# 'full' in the default run; the other policies (~15 s each) -m slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("policy", ["full", pytest.param("dots_saveable", marks=SLOW),
                                    pytest.param(("mlp_hidden", "attention_out"), marks=SLOW)])
def test_remat_policies_give_the_same_gradients(gradients_without_remat, policy):
  remat = _scanned_gradients(policy)
  for a, b in zip(jax.tree.leaves(gradients_without_remat), jax.tree.leaves(remat)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


# The decoder-only model: 2 layers, grouped-query attention, dropout on (remat must replay
# the same dropout masks in its recomputation), a prefix-LM row (bidirectional prefix).
DECODER_BASE = dict(vocab_size=128, emb_dim=32, num_heads=4, num_kv_heads=2, num_layers=2,
                    head_dim=8, mlp_dim=64, dropout_rate=0.1)


def _decoder_batch():
  rng = np.random.default_rng(1)
  targets = rng.integers(1, 128, (4, 12)).astype(np.int32)
  targets[3, 9:] = 0
  causal = np.zeros((4, 12), np.int32)
  causal[1, :6] = 1  # row 1 is a prefix-LM row: a 5-token prefix
  return {"decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_loss_weights": (targets > 0).astype(np.float32),
          "decoder_causal_attention": causal}


def _decoder_gradients(policy, scan):
  """(gradients of the loss with dropout, whether the gradient program rematerialises)."""
  batch = _decoder_batch()
  cfg = decoder.DecoderConfig(**{**DECODER_BASE, "scan_layers": scan, "remat_policy": policy})
  model = decoder.DecoderOnlyModel(decoder.Transformer(cfg))
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  grad = jax.grad(lambda q: model.loss_fn(q, batch, jax.random.key(5))[0])
  # jax's rematerialisation primitive (`checkpoint`, printed `remat2` by some versions).
  rematerialised = re.search(r"\b(remat2|checkpoint)\[", str(jax.make_jaxpr(grad)(params)))
  return jax.jit(grad)(params), rematerialised is not None


@pytest.fixture(scope="module")
def decoder_gradients_without_remat():
  return {scan: _decoder_gradients("none", scan) for scan in (False, True)}


@pytest.mark.parametrize("policy, scan", [
    pytest.param("full", True, id="full"),
    pytest.param("dots_saveable", True, marks=SLOW, id="dots_saveable"),
    pytest.param(("mlp_hidden", "attention_out"), True, marks=SLOW, id="names"),
    pytest.param("full", False, marks=SLOW, id="full-unscanned")])
def test_decoder_remat_policies_give_the_same_gradients(decoder_gradients_without_remat, policy,
                                                        scan):
  plain, plain_remat = decoder_gradients_without_remat[scan]
  remat, rematerialised = _decoder_gradients(policy, scan)
  assert rematerialised and not plain_remat  # the policy is in effect
  assert jax.tree.structure(remat) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_unknown_remat_policy_is_an_error():
  with pytest.raises(ValueError, match="unknown remat policy"):
    t5.T5Config(**{**BASE, "remat_policy": "some"})
  with pytest.raises(ValueError, match="unknown activation names"):
    layers.remat_policy(["mlp_hiden"])
