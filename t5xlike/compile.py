"""Compiles a run's train step for a TPU slice or GPU node that is not here, and reports it.

    python -m t5xlike.compile --gin_file=F [--gin_file=G ...] [--gin.NAME=VALUE ...]
        --topology=v4-256 [--num_slices=2] [--json] [--dump_hlo=FILE]
        [--estimate=auto|loops|probe] [--step=train|decode]

Takes the gin files and overrides of `python -m t5xlike.train` and compiles
exactly the train step that run would execute (model, optimizer, logical
axis rules over MESH_SHAPE, scan / remat, micro-batches, attention kernel)
for batches of the configured shapes, with the target's real compiler:
libtpu for TPUs (`pip install -e '.[tpu]'`), JAX's CUDA plugin for GPUs
(`pip install -e '.[gpu]'`). No data is read, no accelerator is needed and
nothing is written. `--topology`: a Cloud TPU accelerator name (`v4-256`,
`v5litepod-64`, `v5p-128`, `v6e-256`), libtpu's form (`v5p:4x4x4`) or a GPU
node (`h100-8`, `h200-8`, `a100-8`, `b200-8`; several hosts: `2xh100-8`);
`--num_slices`: TPU slices over DCN (DCN_MESH_SHAPE, default
`{'data': num_slices}`; MESH_SHAPE is then one slice's mesh).

Prints a table (per-chip bytes of parameters, optimizer state, batch,
temporaries and outputs against the chip's HBM; model and compiler FLOPs;
the cost model's estimated step time with the tokens/s/chip and MFU it
implies; collectives per step; compile time) and one JSON line (`--json`:
the line alone on stdout, the progress log on stderr); `--dump_hlo=FILE`
also writes the optimised HLO text. The step time is the compiler cost
model's estimate (TPU) or a roofline (GPU), never a measurement.
`--estimate=probe` (the default on GPUs, `auto`) takes it (on GPUs the
roofline's HBM term) from the unrolled step compiled at 2 and 4 layers and
extrapolated to the model's depth (`aot.depth_probe`), instead of scaling
the scanned step's loops by their trip counts. Exit codes:
0 reported (also when the step does not fit: the report says so), 2 bad
input (unknown topology, a mesh that does not match the chips, compiler not
installed), 1 the compiler refused the step.

`--step=decode` takes an infer run's gin files instead (a model gin and
`runs/infer.gin`: TASK_FEATURE_LENGTHS, BATCH_SIZE, the decoding method) and
compiles the generation `python -m t5xlike.infer` would run, its prefill and
one decode step: per-chip memory with the KV cache, the cost model's prefill
and per-token times, the HBM floor of a decode step (`aot.decode_report`).
"""
from __future__ import annotations

import logging
import os
import sys


def _log_to_stderr() -> None:
  """Moves the log handlers that write to stdout (`cli.entry`'s) to stderr."""
  for handler in logging.getLogger().handlers:
    if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
      handler.setStream(sys.stderr)


def main(argv: list[str] | None = None) -> int:
  # Compile-only devices need no local accelerator, and JAX's CUDA plugin registers its
  # compile-only GPU topology only when it is not also trying to start a GPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from t5xlike.cli import entry  # noqa: PLC0415  (after JAX_PLATFORMS: JAX reads it once)

  def add_flags(parser):
    parser.add_argument("--topology", default=None,
                        help="v4-256, v5litepod-64, v5p-128, v6e-256, v5p:4x4x4, h100-8, ...")
    parser.add_argument("--num_slices", type=int, default=1,
                        help="TPU slices over the data-center network")
    parser.add_argument("--json", action="store_true", help="print the JSON line only")
    parser.add_argument("--dump_hlo", default=None, metavar="FILE",
                        help="also write the optimised HLO text of the step to FILE")
    parser.add_argument("--step", default="train", choices=("train", "decode"),
                        help="train: the train step of a training run's gin files; decode: "
                             "the generation of an infer run's (runs/infer.gin)")
    parser.add_argument("--estimate", default="auto", metavar="{auto,loops,probe}",
                        help="step time (GPU: HBM traffic): the scanned step's loops scaled "
                             "by their trip counts (loops), or the unrolled step at 2 and 4 "
                             "layers extrapolated to the model's depth (probe: 2-3 more "
                             "compiles); auto: loops on TPUs, probe on GPUs")

  def call_root(args):
    from t5xlike import errors  # noqa: PLC0415  (after the flags, like the run)
    from t5xlike.runs import compile_run  # noqa: PLC0415  (JAX, the model: after the flags)
    if not args.topology:
      raise errors.ConfigError("--topology is required (e.g. v4-256, v5p:4x4x4, h100-8)")
    if args.json:  # stdout holds the JSON line alone; progress goes to stderr
      _log_to_stderr()
    if args.step == "decode":
      from t5xlike.runs import compile_decode_run  # noqa: PLC0415  (as compile_run)
      if args.dump_hlo or args.estimate != "auto":
        raise errors.ConfigError("--step=decode takes neither --dump_hlo nor --estimate")
      decode = compile_decode_run.compile_decode(args.topology, args.num_slices)
      if not args.json:
        print(decode.table())
      print(decode.json_line(), flush=True)
      return
    report = compile_run.compile_step(args.topology, args.num_slices, args.dump_hlo,
                                      args.estimate)
    compile_run.print_report(report, as_json=args.json)

  return entry.run_entry(__doc__.splitlines()[0], call_root, add_flags, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
