"""Starting `jax.distributed` for multi-process runs, from flags or the cluster's environment."""
from __future__ import annotations

import argparse
import logging
import os


def cluster_environment() -> str | None:
  """The multi-host environment JAX can configure itself from, if any."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "SLURM"
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "Cloud TPU"
  return None


def initialize_distributed(args: argparse.Namespace) -> None:
  """Starts `jax.distributed` for multi-process runs.

  With `--num_processes > 1` the flags are passed on; without flags, a
  multi-host SLURM job or Cloud TPU slice is detected from its environment
  and `jax.distributed.initialize()` finds the coordinator itself.
  """
  # jax is imported here, after argument parsing: `--help` and flag errors stay fast.
  import jax  # noqa: PLC0415
  # Only CPU devices use these collectives; GPUs and TPUs keep their own.
  if args.num_processes is not None and args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.coordinator_address is None and cluster_environment():
    logging.getLogger(__name__).info("multi-host %s environment detected",
                                     cluster_environment())
    jax.distributed.initialize()
