"""Converts checkpoints: `python -m t5xlike.convert --from=t5x|hf|t5xlike|peft --to=t5xlike|hf
--checkpoint=IN --output=OUT`.

  # A T5X checkpoint (T5X's orbax step directory or msgpack; T5.1.1 / mT5 / Flan-T5;
  # UL2: --mlp_activation=silu) -> t5xlike:
  python -m t5xlike.convert --from=t5x --checkpoint=t5x_run/checkpoint_1000000 --output=OUT \
    [--vocabulary=spiece.model]
  # A Hugging Face T5 / mT5 / umT5 / Llama (2, 3.x) / Qwen2 / Mistral directory -> t5xlike:
  python -m t5xlike.convert --from=hf --checkpoint=HF_DIR --output=OUT
  # t5xlike -> Hugging Face (the model: --gin_file, else model.gin beside the checkpoint,
  # else a training run's MODEL_DIR/config.gin):
  python -m t5xlike.convert --from=t5xlike --to=hf --checkpoint=OUT --output=HF_DIR
  python -m t5xlike.convert --from=t5xlike --to=hf --checkpoint=MODEL_DIR/checkpoint_N \
    --output=HF_DIR
  # A Hugging Face PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
  # for a t5xlike base (e.g. a --from=hf output) -> OUT/checkpoint, a LoRA PEFT checkpoint
  # (CHECKPOINT_PATH of eval / infer with the base's model gin), and OUT/lora.gin (to
  # continue training it with finetune/lora.gin):
  python -m t5xlike.convert --from=peft --checkpoint=ADAPTER_DIR --base=BASE --output=OUT

A t5xlike OUT holds OUT/checkpoint (step 0) and OUT/model.gin (see
`t5xlike/interop/output_dir.py`); an HF OUT holds config.json and
model.safetensors (float32). Every tensor's path, shape and source dtype is
logged; a shape that does not fit the model is an error naming its path.
Exit codes: 0 done, 2 bad input (one line on stderr, nothing written:
OUT is written under a temporary name and renamed when complete).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from t5xlike import errors
from t5xlike.cli import console_log, flags, gin_config
from t5xlike.runs import convert_run

SOURCES = ("t5x", "hf", "t5xlike", "peft")
TARGETS = ("t5xlike", "hf")


def _flags(parser) -> None:
  parser.add_argument("--from", dest="source", choices=SOURCES, required=True)
  parser.add_argument("--to", dest="target", choices=TARGETS, default="t5xlike")
  parser.add_argument("--checkpoint", required=True,
                      help="T5X step dir, HF model dir, t5xlike step dir or convert output, "
                           "HF PEFT adapter dir")
  parser.add_argument("--base", default=None,
                      help="--from=peft: the t5xlike base checkpoint the adapter is for (a "
                           "convert output or step dir; its model gin as for --from=t5xlike)")
  parser.add_argument("--output", required=True, help="directory to create")
  parser.add_argument("--vocabulary", default=None,
                      help="SentencePiece .model to use (default: the source's, if any)")
  parser.add_argument("--scan_layers", choices=("auto", "true", "false"), default="auto",
                      help="t5xlike output layout (auto: as the source)")
  parser.add_argument("--mlp_activation", default="gelu",
                      help="T5X sources: the MLP activation the arrays cannot tell "
                           "(gelu: T5.1.1/mT5/Flan-T5; silu: UL2; relu: T5 v1.0)")
  parser.add_argument("--relative_attention_max_distance", type=int, default=128,
                      help="T5X sources: T5's relative position max distance (128 in every "
                           "released T5X model)")
  parser.add_argument("--max_position_embeddings", type=int, default=2048,
                      help="HF Llama export: max_position_embeddings of config.json")
  parser.add_argument("--hf_model_type", choices=("auto", "llama", "mistral", "qwen2"),
                      default="auto",
                      help="HF export of a decoder: its model_type (auto: qwen2 with q/k/v "
                           "biases, else llama)")


def main(argv: Sequence[str] | None = None) -> int:
  # (importing orbax has already given the root logger a stderr handler: replaced here, so
  # that the progress log is not beside the one-line error on stderr)
  console_log.configure()
  gin_config.quiet_gin_search_logs()
  parser = flags.build_parser(__doc__.splitlines()[0])
  _flags(parser)
  try:
    args = flags.parse_args(parser, sys.argv[1:] if argv is None else argv)
    convert_run.validate(args)
    convert_run.convert(args)
  except errors.ConfigError as error:
    print(f"error: {errors.one_line(error)}", file=sys.stderr)
    return 2
  except SystemExit as error:  # argparse: a missing or invalid flag.
    return int(error.code or 0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
