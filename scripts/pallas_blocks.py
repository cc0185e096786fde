"""Chooses the Pallas flash-attention block size per TPU generation from libtpu's cost model.

    python scripts/pallas_blocks.py [--blocks 128 256 512] [--output docs/pallas_blocks.md]

For each generation (v4, v5e, v5p, v6e) and each attention shape of the scale table's
models (T5.1.1-large's biased encoder attention, the ~1B decoder's and the 8B decoder's
causal packed attention; `SHAPES`), compiles the kernel's forward and backward pass
(`jax.grad` through `flash_attention`, bfloat16, one chip) with square blocks of each
size (block_q = block_k_major = block_k and their backward twins) for a compile-only
chip of that generation, and reads libtpu's estimate (`optimal_seconds`, with the
kernels it cannot price counted as free: `aot.step_report.tpu_estimate`). A block size
a generation's compiler refuses (Mosaic: scoped VMEM) is out. The chosen size is the
one with the lowest estimate summed over the shapes; `models.attention.PALLAS_BLOCKS`
holds the result, and this script fails (exit 1) when it disagrees with it.

What the cost model sees: the Mosaic kernels carry no cycle estimate of their own in
the compiled HLO (the forward declares a block-independent `pl.CostEstimate`), so
the estimates differ through the XLA work around them: the residuals the backward
pass reads (the softmax's row max and sum, kept [b, heads, q, block_k] wide) and
the layout copies, both growing with the block. Measured speed on the hardware may
rank blocks differently: the kernel's own work per grid step is not modelled.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
GENERATIONS = {"v4": "v4-8", "v5e": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}


@dataclasses.dataclass(frozen=True)
class Shape:
  """One chip's attention call: batch rows, heads, length, head_dim, bias, causal."""
  name: str
  batch: int
  heads: int
  length: int
  head_dim: int
  bias: bool
  causal: bool


#: One chip's share of the scale table's attention (its rows per chip, all heads).
SHAPES = (
    Shape("T5.1.1-large encoder (bias)", 4, 16, 512, 64, True, False),
    Shape("decoder-1.1B (causal, packed)", 2, 16, 2048, 128, False, True),
    Shape("Llama-3-8B-shaped (causal, packed)", 1, 32, 8192, 128, False, True),
)


def estimate(device, shape: Shape, block: int) -> tuple[float | None, str]:
  """(libtpu's seconds for the forward + backward pass, '' or why it did not compile)."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.tpu import flash_attention as fa

  from t5xlike.aot import hlo_stats, step_report
  from t5xlike.models import attention

  if block > shape.length:
    return None, f"block {block} > length {shape.length}"
  sizes = attention.pallas_block_sizes(block)
  sharding = jax.sharding.SingleDeviceSharding(device)
  qkv = jax.ShapeDtypeStruct((shape.batch, shape.heads, shape.length, shape.head_dim),
                             jnp.bfloat16, sharding=sharding)
  segments = jax.ShapeDtypeStruct((shape.batch, shape.length), jnp.int32, sharding=sharding)
  bias = jax.ShapeDtypeStruct((shape.batch, shape.heads, shape.length, shape.length),
                              jnp.float32, sharding=sharding)

  def loss(q, k, v, s, ab):
    out = fa.flash_attention(q, k, v, ab=ab if shape.bias else None,
                             segment_ids=None if shape.bias else fa.SegmentIds(s, s),
                             causal=shape.causal, sm_scale=1.0, block_sizes=sizes)
    return jnp.sum(out.astype(jnp.float32))

  argnums = (0, 1, 2, 4) if shape.bias else (0, 1, 2)
  try:
    compiled = jax.jit(jax.grad(loss, argnums=argnums)).lower(
        qkv, qkv, qkv, segments, bias).compile()
  except Exception as error:
    return None, str(error).splitlines()[0][:120]
  seconds, _, source = step_report.tpu_estimate(compiled.cost_analysis(),
                                                hlo_stats.hlo_stats(compiled.as_text()))
  return seconds, "" if seconds else source


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512])
  parser.add_argument("--output", default=str(REPO / "docs" / "pallas_blocks.md"))
  args = parser.parse_args(argv)
  sys.path.insert(0, str(REPO))
  from t5xlike.aot import targets
  from t5xlike.models import attention

  rows, chosen = [], {}
  for generation, topology in GENERATIONS.items():
    device = targets.compile_devices(targets.parse_target(topology))[0]
    totals: dict[int, float | None] = {}
    for block in args.blocks:
      cells, total = [], 0.0
      for shape in SHAPES:
        start = time.perf_counter()
        seconds, why = estimate(device, shape, block)
        print(f"{generation} block {block} {shape.name}: "
              f"{f'{seconds * 1e3:.3f} ms' if seconds else why} "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        cells.append(f"{seconds * 1e3:.3f}" if seconds else f"- ({why})")
        total = total + seconds if (seconds and total is not None) else None
      totals[block] = total
      rows.append((generation, block, cells, total))
    usable = {b: t for b, t in totals.items() if t is not None}
    if usable:
      chosen[device.device_kind] = min(usable, key=lambda b: (usable[b], b))
  lines = [
      "# Pallas flash-attention block sizes per TPU generation",
      "",
      "Made by `python scripts/pallas_blocks.py` on a CPU host: libtpu's estimate (ms) of the",
      "kernel's forward and backward pass on one compile-only chip, bfloat16, per shape (one",
      "chip's share of the scale table's models: batch rows x heads x length x head_dim).",
      "The block size with the lowest total is the generation's",
      "(`t5xlike.models.attention.PALLAS_BLOCKS`). The kernels themselves carry no cycle",
      "estimate in the compiled HLO (the forward declares a block-independent cost), so",
      "the totals differ through the XLA work around them (the softmax residuals the",
      "backward reads, [b, heads, q, block_k] wide, and layout copies): the choice is the",
      "cost model's, not a measurement; a kernel's own speed per block is not modelled.",
      "",
      "| generation | block | " + " | ".join(
          f"{s.name}: {s.batch}x{s.heads}x{s.length}x{s.head_dim}" for s in SHAPES)
      + " | total ms |",
      "|---|---|" + "---|" * len(SHAPES) + "---|",
  ]
  for generation, block, cells, total in rows:
    mark = " (chosen)" if chosen.get(targets.DEVICE_KINDS[generation]) == block else ""
    lines.append(f"| {generation} | {block}{mark} | " + " | ".join(cells)
                 + f" | {f'{total * 1e3:.3f}' if total else '-'} |")
  pathlib.Path(args.output).write_text("\n".join(lines) + "\n")
  print(f"chosen: {chosen}")
  if chosen != attention.PALLAS_BLOCKS:
    print(f"models.attention.PALLAS_BLOCKS is {attention.PALLAS_BLOCKS}: update it",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
