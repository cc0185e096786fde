"""Analytic training FLOPs (t5xlike.flops) against XLA's own count of the train step.

References: (1) the matmul FLOPs of the lowered train step, counted from
every `stablehlo.dot_general` (2 x output size x contracted size), and (2)
XLA's cost analysis of the compiled step (all FLOPs, elementwise included:
the matmul count must be a little below it). d_model 256 so that
elementwise work stays a few percent.
"""
import re

import jax
import numpy as np
import pytest

from t5xlike import flops, optim, partitioning
from t5xlike.models import decoder, encoder_decoder, t5
from t5xlike.objectives import spdf
from t5xlike.training import trainer as trainer_lib

T5 = t5.T5Config(vocab_size=512, emb_dim=256, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=1, head_dim=64, mlp_dim=512)
DECODER = decoder.DecoderConfig(vocab_size=512, emb_dim=256, num_heads=4, num_kv_heads=2,
                                num_layers=1, head_dim=64, mlp_dim=512)


def shapes(features: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(shape, np.float32 if "weights" in k else np.int32)
          for k, shape in features.items()}


T5_BATCH = shapes({"encoder_input_tokens": (2, 64), "decoder_input_tokens": (2, 32),
                   "decoder_target_tokens": (2, 32), "decoder_loss_weights": (2, 32)})
DECODER_BATCH = shapes({"decoder_input_tokens": (2, 64), "decoder_target_tokens": (2, 64),
                        "decoder_loss_weights": (2, 64)})


def make_trainer(model):
  schedule = optim.constant(0.01)
  return trainer_lib.Trainer(model, optim.adafactor(schedule), schedule,
                             partitioning.Partitioner({"data": 1}))


_DOT = re.compile(r"stablehlo\.dot_general.*contracting_dims = \[([\d, ]*)\] x .*: "
                  r"\(tensor<([\dx]+)x\w+>, tensor<[\dx]+x\w+>\) -> tensor<([\dx]+)x\w+>")


def dot_general_flops(stablehlo: str) -> float:
  """2 x output elements x contracted elements, summed over every dot_general."""
  total = 0.0
  count = 0
  for line in stablehlo.splitlines():
    if "stablehlo.dot_general" not in line:
      continue
    match = _DOT.search(line)
    assert match, line
    contracting = [int(i) for i in match.group(1).split(",") if i.strip()]
    lhs = [int(n) for n in match.group(2).split("x")]
    out = [int(n) for n in match.group(3).split("x")]
    total += 2.0 * np.prod(out, dtype=np.float64) * np.prod([lhs[i] for i in contracting],
                                                            dtype=np.float64)
    count += 1
  assert count > 10
  return total


@pytest.fixture(scope="module", params=["t5", "decoder"])
def compiled(request):
  if request.param == "t5":
    model, batch = encoder_decoder.EncoderDecoderModel(t5.Transformer(T5)), T5_BATCH
  else:
    model, batch = decoder.DecoderOnlyModel(decoder.Transformer(DECODER)), DECODER_BATCH
  trainer = make_trainer(model)
  lowered = trainer.lower_train_step(batch)
  return model, batch, lowered.as_text(), lowered.compile().cost_analysis()["flops"]


def test_formula_matches_the_step_matmuls_and_xla_cost_analysis(compiled):
  model, batch, stablehlo, xla_flops = compiled
  ours = flops.model_step_flops(model, batch)
  assert ours.model == pytest.approx(dot_general_flops(stablehlo), rel=0.01)
  assert 0.9 * xla_flops <= ours.model <= xla_flops
  assert ours.hardware == ours.model  # no remat
  assert ours.forward == pytest.approx(ours.model / 3, rel=0.01)


def layer_kernel_train_flops(params, encoder_tokens: int, decoder_tokens: int) -> float:
  """6 x kernel size x the positions it is applied to, for attention/MLP kernels."""
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if "layers_" not in name or not name.endswith("kernel"):
      continue
    reads_encoder = name.startswith("encoder/") or (
        "encoder_decoder_attention/key" in name or "encoder_decoder_attention/value" in name)
    total += 6.0 * np.prod(leaf.shape) * (encoder_tokens if reads_encoder else decoder_tokens)
  return total


def test_sparsity_and_lora_adjust_only_the_layer_kernels():
  model = encoder_decoder.EncoderDecoderModel(t5.Transformer(T5))
  params = jax.eval_shape(model.init, jax.random.key(0), T5_BATCH)["params"]
  params = jax.tree.map(lambda x: x.value, params,
                        is_leaf=lambda x: hasattr(x, "value") and hasattr(x, "names"))
  layer = layer_kernel_train_flops(params, 2 * 64, 2 * 32)
  dense = flops.model_step_flops(model, T5_BATCH).model
  sparse = flops.model_step_flops(spdf.SparseModel(model, sparsity=0.75), T5_BATCH).model
  assert dense - sparse == pytest.approx(0.75 * layer, rel=1e-9)
  # SPDF's `include` regex selects the sparse kernels: here the MLPs alone.
  named = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  mlp = sum(layer_kernel_train_flops({name: leaf}, 2 * 64, 2 * 32)
            for name, leaf in named.items() if "/mlp/" in name)
  mlp_only = spdf.SparseModel(model, sparsity=0.75, include=r"mlp/[^/]+/kernel$")
  assert 0 < mlp < layer
  assert dense - flops.model_step_flops(mlp_only, T5_BATCH).model == pytest.approx(
      0.75 * mlp, rel=1e-9)
  rank = 8
  lora = flops.t5_step_flops(T5, 2, 64, 32, lora_rank=rank)
  # Frozen base: 4/6 of its training cost; adapters [m, r] and [r, n] cost (m + n) r / (m n)
  # of the kernel's.
  adapters = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if "layers_" in name and name.endswith("kernel"):
      kernel = layer_kernel_train_flops({name: leaf}, 2 * 64, 2 * 32)
      adapters += kernel * (leaf.shape[0] + leaf.shape[1]) * rank / np.prod(leaf.shape)
  assert lora.model == pytest.approx(dense - layer / 3 + adapters, rel=1e-9)


def test_spdf_saving_on_gpt3_xl_is_the_papers():
  """SPDF (Thangarasa et al. 2023, abstract): 75% sparsity cuts GPT-3 XL's pre-training
  FLOPs ~2.5x. Its shapes (Cerebras modelzoo's gpt3_xl: 24 layers, d 2,048, 16 heads of
  128, f 8,192, GELU, tied embeddings, 2,048 tokens, vocabulary 50,257) give 2.49x; the
  attention and MLP kernels alone would give 4x (3.24x counting an untied output layer)."""
  cfg = decoder.DecoderConfig(vocab_size=50257, emb_dim=2048, num_heads=16, num_kv_heads=16,
                              num_layers=24, head_dim=128, mlp_dim=8192,
                              mlp_activations=("gelu",), tie_embeddings=True)
  dense = flops.decoder_step_flops(cfg, 1, 2048).model
  assert dense / flops.decoder_step_flops(cfg, 1, 2048, sparsity=0.75).model == pytest.approx(
      2.494, abs=1e-3)
  assert dense / flops.decoder_step_flops(cfg, 1, 2048, sparsity=0.5).model == pytest.approx(
      1.665, abs=1e-3)


def test_remat_adds_the_layers_forward_pass():
  cfg = t5.T5Config(**{**T5.__dict__, "remat_policy": "full"})
  plain = flops.t5_step_flops(T5, 2, 64, 32)
  remat = flops.t5_step_flops(cfg, 2, 64, 32)
  output_forward = 2.0 * 2 * 32 * T5.emb_dim * T5.vocab_size
  assert remat.model == plain.model
  assert remat.hardware == pytest.approx(plain.model + plain.forward - output_forward)


def test_peak_table_and_accounting():
  assert flops.peak_tflops_per_device("bfloat16", configured=123.0) == (123.0, "configured")

  class Device:
    platform, device_kind = "tpu", "TPU v5 lite"
  assert flops.peak_tflops_per_device("bfloat16", device=Device())[0] == 197.0
  Device.device_kind = "NVIDIA H100 80GB HBM3"
  assert flops.peak_tflops_per_device("float32", device=Device())[0] == 494.5
  step = flops.StepFlops(model=4e12, hardware=4e12, forward=4e12 / 3)
  fields = flops.Accounting(step, num_devices=2, peak_tflops=10.0).fields(0.5)
  assert fields == pytest.approx({"tflops_per_device": 4.0, "mfu": 0.4})


def test_lora_run_counts_the_adapters_and_no_frozen_weight_gradients():
  """A LoRA-wrapped model trained with its method (base frozen): the formula against
  the step's dot_generals. The formula charges every frozen weight its input
  gradient (4 m n T); the step skips it where nothing below is trainable (the
  first layers' query/key/value), so the count is a little below the formula."""
  from t5xlike.finetuning import lora, peft
  cfg = t5.T5Config(vocab_size=512, emb_dim=256, num_heads=4, num_encoder_layers=2,
                    num_decoder_layers=2, head_dim=64, mlp_dim=512)
  method = lora.LoRA(rank=8)
  model = peft.wrap_model(encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg)), method)
  schedule = optim.constant(0.01)
  trainer = trainer_lib.Trainer(model, optim.adafactor(schedule), schedule,
                                partitioning.Partitioner({"data": 1}), finetuning=method)
  lowered = trainer.lower_train_step(T5_BATCH)
  counted = dot_general_flops(lowered.as_text())
  ours = flops.model_step_flops(model, T5_BATCH)
  dense = flops.model_step_flops(encoder_decoder.EncoderDecoderModel(t5.Transformer(cfg)),
                                 T5_BATCH)
  # Input gradients the step does not need: q, k, v of encoder layer 0 (64 tokens x 2) and
  # of decoder layer 0's self-attention (32 tokens x 2), 2 m n T each.
  unneeded = 3 * 2.0 * 256 * 256 * (2 * 64 + 2 * 32)
  assert ours.model - unneeded == pytest.approx(counted, rel=0.01)
  assert ours.model != pytest.approx(counted, rel=0.01)  # the correction matters
  assert ours.model < 0.75 * dense.model  # no weight gradients for the frozen base


def test_electra_is_its_generator_plus_its_discriminator():
  """ELECTRA's count (generator masked LM over every position + discriminator with the
  binary head) against the dot_generals of its lowered train step."""
  from t5xlike.models import encoder
  from t5xlike.objectives import electra
  common = dict(vocab_size=512, num_layers=1, head_dim=64, embedding_dim=128, max_length=64)
  model = electra.ElectraModel(
      generator=encoder.EncoderConfig(emb_dim=128, num_heads=2, mlp_dim=256, **common),
      discriminator=encoder.EncoderConfig(emb_dim=256, num_heads=4, mlp_dim=512, **common))
  batch = shapes({"encoder_input_tokens": (2, 64), "encoder_target_tokens": (2, 64),
                  "mlm_weights": (2, 64)})
  ours = flops.model_step_flops(model, batch)
  stablehlo = make_trainer(model).lower_train_step(batch).as_text()
  assert ours.model == pytest.approx(dot_general_flops(stablehlo), rel=0.02)
  gen = flops.encoder_step_flops(model.generator_config, 2, 64, head="mlm")
  disc = flops.encoder_step_flops(model.discriminator_config, 2, 64, head="binary")
  assert ours.model == gen.model + disc.model
