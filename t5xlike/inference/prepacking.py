"""Prepacked prefill: prompts of different lengths share rows for the prefill.

Zhao et al. 2024, "Prepacking: A Simple Method for Fast Prefilling and
Increased Throughput in Large Language Models" (§3): a batch of prompts padded
to its longest one wastes the prefill's compute on padding. Prepacking
bin-packs the prompts into fewer rows (bin capacity = the padded prompt width;
the authors' code uses the greedy first-fit-decreasing of the `binpacking`
package's `to_constant_volume`), runs the prefill once over the packed rows
with a block-diagonal attention mask (each prompt sees only itself) and
positions restarting at 0 per prompt, and then unpacks the per-prompt KV
caches (and last-token logits) into one padded row per request, from which
generation runs exactly as without packing.

Host side (NumPy, before jit): `first_fit_decreasing` chooses the bins and
`pack_prompts` turns them into a `PackedPrompts` of index arrays. Device side
(inside the jitted prefill): `gather_packed` lays the requests' tokens into the
packed rows, `unpack` lays packed per-token arrays (keys, values, encoder
states) back into per-request rows, right-aligned (a decoder's left-padded
prompts) or left-aligned (an encoder's right-padded inputs), and
`unpack_cache` does so for every array of a KV cache. The models'
`prepacked_decoding_start` (decoder-only, encoder-decoder) put these together.

The number of packed rows is rounded up to a multiple of `row_multiple` so that
a run compiles its prefill for a few row counts only.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from t5xlike.models import layers

Array = jax.Array


@struct.dataclass
class PackedPrompts:
  """Where each request's prompt sits in the packed rows (int32 arrays).

  R packed rows of C columns (C = the bin capacity, the unpacked prompt width);
  b requests (the decode batch's rows).

  Attributes:
    example: [R, C] the request whose prompt token a packed slot holds (0 on padding).
    positions: [R, C] the token's index in its prompt, restarting at 0 per prompt
      (0 on padding): the restarted position ids and the column read in the request.
    segment_ids: [R, C] 1, 2, ... per prompt of a row (0 on padding): the
      block-diagonal mask is `segment_ids[q] == segment_ids[k] > 0`.
    row: [b] the packed row of request i's prompt.
    offset: [b] its first column there.
    length: [b] its length (tokens).
  """
  example: Any
  positions: Any
  segment_ids: Any
  row: Any
  offset: Any
  length: Any

  @property
  def packed_rows(self) -> int:
    return int(self.example.shape[0])


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Bins of item indices: items by decreasing length (ties by index), each into
  the first bin with room for it, else into a new bin (Johnson 1973; the authors'
  `binpacking.to_constant_volume`). Every bin holds at most `capacity` in total.

  Raises ValueError for an item longer than `capacity` or shorter than 1.
  """
  bad = [n for n in lengths if not 1 <= n <= capacity]
  if bad:
    raise ValueError(f"prompt lengths must be in [1, {capacity}], got {bad[:3]}")
  bins: list[list[int]] = []
  free: list[int] = []
  for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    for index, room in enumerate(free):
      if lengths[item] <= room:
        bins[index].append(item)
        free[index] -= lengths[item]
        break
    else:
      bins.append([item])
      free.append(capacity - lengths[item])
  return bins


def packed_row_count(bins: int, batch_rows: int, row_multiple: int) -> int:
  """`bins` rounded up to a multiple of `row_multiple`, at most max(bins, batch_rows)."""
  return max(bins, min(-(-bins // row_multiple) * row_multiple, batch_rows))


def pack_prompts(lengths: Sequence[int], capacity: int, batch_rows: int,
                 row_multiple: int = 1) -> PackedPrompts:
  """The packing of the prompts of requests 0 .. len(lengths) - 1.

  Args:
    lengths: each real request's prompt length (1 .. capacity).
    capacity: C, the packed row width (the unpacked path's prompt width).
    batch_rows: b >= len(lengths), the decode batch's rows; rows past the real
      requests (the padding of a last, short batch) are copies of request 0, as
      the unpacked path pads them, and unpack request 0's prompt.
    row_multiple: the packed row count is rounded up to a multiple of it (rows
      of padding), capped at `batch_rows` (fewer compiled shapes).
  Returns:
    NumPy int32 `PackedPrompts` (pass it to the jitted prefill).
  """
  if not 1 <= len(lengths) <= batch_rows:
    raise ValueError(f"need 1 to {batch_rows} prompts, got {len(lengths)}")
  bins = first_fit_decreasing(lengths, capacity)
  rows = packed_row_count(len(bins), batch_rows, row_multiple)
  example = np.zeros((rows, capacity), np.int32)
  positions = np.zeros((rows, capacity), np.int32)
  segment_ids = np.zeros((rows, capacity), np.int32)
  row = np.zeros((batch_rows,), np.int32)
  offset = np.zeros((batch_rows,), np.int32)
  length = np.full((batch_rows,), lengths[0], np.int32)
  for r, items in enumerate(bins):
    column = 0
    for segment, item in enumerate(items, start=1):
      n = lengths[item]
      example[r, column:column + n] = item
      positions[r, column:column + n] = np.arange(n)
      segment_ids[r, column:column + n] = segment
      row[item], offset[item], length[item] = r, column, n
      column += n
  row[len(lengths):], offset[len(lengths):] = row[0], offset[0]
  return PackedPrompts(example=example, positions=positions, segment_ids=segment_ids,
                       row=row, offset=offset, length=length)


def gather_packed(tokens: Array, packing: PackedPrompts) -> Array:
  """Requests' tokens [b, w] (prompt i = tokens[i, :length[i]]) -> packed [R, C] (0 on padding)."""
  packed = jnp.asarray(tokens)[packing.example, packing.positions]
  return jnp.where(packing.segment_ids > 0, packed, 0)


def block_diagonal_mask(packing: PackedPrompts) -> Array:
  """bool [R, 1, C, C]: packed token q sees token k of its own prompt (both
  directions, as a prefix LM's prompt or an encoder; AND it with a causal mask
  for causal prompts); padding sees nothing."""
  segments = jnp.asarray(packing.segment_ids)
  return ((segments[:, None, :, None] == segments[:, None, None, :])
          & (segments > 0)[:, None, :, None])


def unpack(packed: Array, packing: PackedPrompts, width: int, right_aligned: bool) -> Array:
  """Packed per-token values [R, C, ...] -> per-request rows [b, width, ...].

  Request i's prompt goes to columns [width - length_i, width) when
  `right_aligned` (left padding), else [0, length_i); other columns are 0.
  """
  length = jnp.asarray(packing.length)[:, None]
  columns = jnp.arange(width, dtype=jnp.int32)[None, :]
  index = columns - (width - length) if right_aligned else columns
  valid = (index >= 0) & (index < length)
  source = jnp.asarray(packing.offset)[:, None] + jnp.clip(index, 0, None)
  source = jnp.clip(source, 0, packed.shape[1] - 1)
  values = packed[jnp.asarray(packing.row)[:, None], source]
  return jnp.where(valid.reshape(valid.shape + (1,) * (values.ndim - 2)), values,
                   jnp.zeros((), values.dtype))


def unpack_cache(cache: Any, packing: PackedPrompts, width: int, slots: int,
                 scanned: bool) -> Any:
  """A KV cache filled by a packed prefill -> the cache of the unpacked rows.

  Every cached array [R, C, ...] (under a scanned stack [layers, R, C, ...])
  becomes [b, slots, ...]: `unpack` right-aligned to `width` (the prompts end
  at slot width - 1, as the left-padded unpacked prefill leaves them), then
  zeros up to `slots`; counters (`layers.CACHE_COUNTERS`) become `width`.
  """
  def per_request(x):
    rows = unpack(x, packing, width, right_aligned=True)
    return jnp.pad(rows, [(0, 0), (0, slots - width)] + [(0, 0)] * (rows.ndim - 2))

  def convert(path, x):
    if getattr(path[-1], "key", None) in layers.CACHE_COUNTERS:
      return jnp.full_like(x, width)
    in_scan = scanned and any(getattr(k, "key", None) == "layers" for k in path)
    return jax.vmap(per_request)(x) if in_scan else per_request(x)
  return jax.tree_util.tree_map_with_path(convert, cache)


def last_token(packed: Array, packing: PackedPrompts) -> Array:
  """Packed per-token values [R, C, ...] -> each request's last prompt token's [b, ...]."""
  return packed[jnp.asarray(packing.row),
                jnp.asarray(packing.offset) + jnp.asarray(packing.length) - 1]
