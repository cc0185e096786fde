"""`attention._per_shard` on 4 forced CPU devices (a subprocess: XLA_FLAGS before JAX starts).

The kernel is the flash module's pure-JAX reference (interpret mode hangs under shard_map
on the CPU), so this checks the shard_map wrapping: specs from the logical rules, same
values as one device. Prints a JSON line."""
import functools
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as flash

from t5xlike import partitioning
from t5xlike.models import attention


def main():
  rng = np.random.default_rng(0)
  b, h, l, d = 4, 4, 16, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, h, l, d)), jnp.float32) for _ in range(3))
  ab = jnp.asarray(rng.normal(size=(b, h, l, l)), jnp.float32)
  ids = jnp.asarray(np.repeat([[1] * 10 + [2] * 6], b, axis=0), jnp.int32)
  segments = flash.SegmentIds(q=ids, kv=ids)
  kernel = functools.partial(flash.mha_reference, causal=True)
  want = kernel(q, k, v, ab, segments)
  part = partitioning.Partitioner({"data": 2, "tensor": 2},
                                  partitioning.logical_axis_rules("data_fsdp_tensor"))
  with part.activate():
    fn = jax.jit(lambda *a: attention._per_shard(kernel, b, h)(*a))
    got = fn(q, k, v, ab, segments)
    text = fn.lower(q, k, v, ab, segments).as_text()
    no_bias = fn(q, k, v, None, segments)  # The kernel's structured route: no ab.
    with pltpu.force_tpu_interpret_mode():
      interpret = attention.resolve("pallas", jnp.float32, dropout=False)
    size = attention.mesh_size()
  no_bias_want = kernel(q, k, v, None, segments)
  error = max(float(np.abs(np.asarray(got) - np.asarray(want)).max()),
              float(np.abs(np.asarray(no_bias) - np.asarray(no_bias_want)).max()))
  print(json.dumps({"max_error": error,
                    "manual": "manual" in text.lower(),
                    "mesh_size": size, "interpret_resolves_to": interpret}))


if __name__ == "__main__":
  main()
