"""Runs 3 training steps of a small T5.1.1 on several meshes (a subprocess).

Usage: python tests/sharding_worker.py OUT.npz
Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the test).
Writes, per mesh: the losses of steps 1-3, the gradients at the state after
step 3 (flattened), and the mesh axes of a few parameters' shardings.
"""
import json
import sys

import jax
import numpy as np

from t5xlike import optim, partitioning
from t5xlike.models import encoder_decoder, t5
from t5xlike.training import trainer as trainer_lib

CONFIG = t5.T5Config(vocab_size=512, emb_dim=128, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=2, head_dim=32, mlp_dim=256)
MESHES = {
    "single": ({"data": 1}, "data_parallel", 1),
    "data8": ({"data": 8}, "data_parallel", 8),
    "fsdp8": ({"fsdp": 8}, "fsdp", 8),
    "d2f2t2": ({"data": 2, "fsdp": 2, "tensor": 2}, "data_fsdp_tensor", 8),
}
WATCHED = ["encoder/layers_0/mlp/wi_0/kernel", "decoder/logits_dense/kernel",
           "token_embedder/embedding", "encoder/layers_0/attention/out/kernel"]


def batches(count=3, batch=16, li=32, lt=8):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    targets = rng.integers(1, 512, (batch, lt)).astype(np.int32)
    targets[:, -2:] = 0
    out.append({"encoder_input_tokens": rng.integers(1, 512, (batch, li)).astype(np.int32),
                "decoder_target_tokens": targets,
                "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
                "decoder_loss_weights": (targets > 0).astype(np.float32)})
  return out


def run(mesh_shape, preset, num_devices):
  partitioner = partitioning.Partitioner(mesh_shape, partitioning.logical_axis_rules(preset),
                                         devices=jax.devices()[:num_devices])
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(CONFIG))
  schedule = optim.constant(0.05)
  trainer = trainer_lib.Trainer(model, optim.adafactor(schedule), schedule, partitioner)
  data = batches()
  state = trainer.init_state(0, data[0])
  losses = []
  for batch in data:
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  grad_fn = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b, None)[0]))
  with partitioner.activate():
    grads = grad_fn(state.params, trainer.device_batch(data[0]))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]}
  params = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  specs = {name: [list(a) if isinstance(a, tuple) else a for a in params[name].sharding.spec]
           for name in WATCHED}
  opt_leaves = jax.tree.leaves(state.opt_state)
  opt_sharded = sum(1 for x in opt_leaves
                    if x.ndim and x.sharding.shard_shape(x.shape) != x.shape)
  return losses, flat, specs, opt_sharded


def main(out_path):
  assert jax.device_count() == 8, jax.device_count()
  results = {}
  arrays = {}
  for name, (mesh_shape, preset, num_devices) in MESHES.items():
    losses, grads, specs, opt_sharded = run(mesh_shape, preset, num_devices)
    results[name] = {"losses": losses, "specs": specs, "opt_sharded": opt_sharded}
    for key, value in grads.items():
      arrays[f"{name}|{key}"] = value
  np.savez(out_path, **arrays)
  with open(out_path + ".json", "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv[1])
