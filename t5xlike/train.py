"""Trains a model from gin files: `python -m t5xlike.train --gin_file=... [--gin.NAME=VALUE]`.

Example (the quickstart):
  python -m t5xlike.train --gin_file=gin_configs/quickstart.gin --gin.MODEL_DIR=/tmp/qs

Exit codes: 0 done, 2 configuration or input error (one line on stderr, no
file written), anything else a crash (with traceback). Set T5XLIKE_TRACEBACK=1
to see the traceback of an error raised while the run is being configured.
"""
from __future__ import annotations

import sys

import gin

from t5xlike.cli import entry


def main(argv: list[str] | None = None) -> int:
  def call_root(args):
    del args
    # The run imports JAX, TensorFlow and seqio: `--help` and flag errors stay fast.
    from t5xlike.runs import train_run  # noqa: PLC0415
    gin.get_configurable(train_run.train)()
  return entry.run_entry(__doc__.splitlines()[0], call_root, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
