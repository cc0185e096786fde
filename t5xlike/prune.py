"""Prunes a checkpoint into a smaller model: `python -m t5xlike.prune --gin_file=... --output=OUT`.

  # The training run's gin files give the model and the calibration batches (task,
  # lengths, objective); the flags give the sizes kept (a count, or a percentage):
  python -m t5xlike.prune --gin_file=gin_configs/quickstart.gin \
    --gin.CHECKPOINT_PATH=/tmp/quickstart/checkpoint_400 --output=/tmp/pruned \
    --heads=2 --mlp_dim=50% [--emb_dim=48] [--num_encoder_layers=1] [--drop_layers=decoder:0]
  # Decoder-only (grouped-query attention: --heads keeps every kv head, --kv_heads drops
  # whole groups):
  python -m t5xlike.prune --gin_file=gin_configs/objectives/causal_lm.gin \
    --gin.CHECKPOINT_PATH=DIR/checkpoint_300 --output=OUT --num_layers=1 --heads=2

Heads, MLP units, embedding channels and layers are ranked by Minitron's
activation-based importance on CALIBRATION_BATCHES training batches
(`--layer_importance=block_importance|loss`); the top ones are kept. Writes
OUT/checkpoint (step 0), OUT/model.gin and OUT/prune.json; retrain it with
`python -m t5xlike.train --gin_file=... --gin_file=OUT/model.gin
--gin.INITIAL_CHECKPOINT_PATH=OUT/checkpoint`, or evaluate it with
`--gin_file=OUT/model.gin --gin.CHECKPOINT_PATH=OUT/checkpoint`.
gin_configs/runs/prune.gin is loaded first (the gin files given override it).
Exit codes as `t5xlike.train` (2: bad input such as a size that leaves nothing,
one line, nothing written). The library: t5xlike/compression/; the run:
t5xlike/runs/prune_run.py.
"""
from __future__ import annotations

import sys

import gin

from t5xlike.cli import entry

PRUNE_GIN = "runs/prune.gin"
#: The size flags: (name, help).
_SIZES = (
    ("num_layers", "layers kept (decoder-only)"),
    ("num_encoder_layers", "encoder layers kept (T5)"),
    ("num_decoder_layers", "decoder layers kept (T5)"),
    ("heads", "query heads kept per attention module"),
    ("kv_heads", "key/value heads kept (grouped-query attention)"),
    ("mlp_dim", "MLP units kept per layer"),
    ("emb_dim", "embedding channels kept"),
)


def _flags(parser) -> None:
  parser.add_argument("--output", default=None, help="directory to create")
  for name, text in _SIZES:
    parser.add_argument(f"--{name}", default=None, help=f"{text}: N or P%%")
  parser.add_argument("--drop_layers", default=None,
                      help="layers dropped by hand: I,J (T5: encoder:I,decoder:J)")
  parser.add_argument("--layer_importance", default="block_importance",
                      help="block_importance (1 - cos(layer input, output)) or loss (the "
                           "calibration loss without the layer)")
  parser.add_argument("--importance", default="activation",
                      help="activation (Minitron's scores) or random (the baseline: a random "
                           "choice of the same sizes, seeded by RANDOM_SEED)")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a.startswith("--gin_file") and a.rstrip("/").endswith(PRUNE_GIN) for a in argv):
    argv.insert(0, f"--gin_file={PRUNE_GIN}")

  def call_root(args):
    # The run imports JAX and the data pipeline: `--help` and flag errors stay fast.
    from t5xlike.runs import prune_run  # noqa: PLC0415
    targets = {name: getattr(args, name) for name in prune_run.TARGET_FLAGS}
    gin.get_configurable(prune_run.prune)(output=args.output, targets=targets,
                                          layer_importance=args.layer_importance,
                                          importance_scores=args.importance)
  return entry.run_entry(__doc__.splitlines()[0], call_root, _flags, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
