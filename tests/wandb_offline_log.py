"""A W&B offline run read back from its transaction log (`run-<id>.wandb`).

wandb 0.31 reads this file only in its Go core (`wandb sync`); the format is LevelDB's
log (32 KiB blocks of checksummed chunks) after a 7-byte W&B header, each record a
`wandb.proto.wandb_internal_pb2.Record`, which this module decodes with wandb's own
protobuf classes.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
import time
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
CHUNK = struct.Struct("<IHB")  # CRC-32C, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: pathlib.Path) -> list[wandb_internal_pb2.Record]:
  """The records of a `.wandb` file, in order."""
  data = path.read_bytes()
  ident, magic, _ = HEADER.unpack_from(data)
  assert ident == b":W&B" and magic == 0xBEE1, path
  out, pending, pos = [], b"", HEADER.size
  while pos + CHUNK.size <= len(data):
    left = BLOCK - pos % BLOCK
    if left < CHUNK.size:  # A block's tail too short for a chunk header is padding.
      pos += left
      continue
    _, length, kind = CHUNK.unpack_from(data, pos)  # (the CRC is not checked)
    if kind == 0:  # Zero padding to the end of the block.
      pos += left
      continue
    if pos + CHUNK.size + length > len(data):
      break  # A chunk still being written.
    payload = data[pos + CHUNK.size:pos + CHUNK.size + length]
    pos += CHUNK.size + length
    pending = payload if kind in (FULL, FIRST) else pending + payload
    if kind in (FULL, LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
  return out


@dataclasses.dataclass
class OfflineRun:
  """What an offline run recorded: its id, config, history rows by step (W&B's own `_`
  keys dropped), saved file names and exit code (None: no exit record)."""
  run_id: str
  config: dict[str, Any]
  history: dict[int, dict[str, Any]]
  saved_files: list[str]
  exit_code: int | None


def read(run_dir: pathlib.Path, timeout_s: float = 60.0) -> OfflineRun:
  """Reads `run_dir` (`.../wandb/offline-run-<time>-<id>`) once its exit record is there:
  wandb's core process writes the log after `run.finish()` returns (up to `timeout_s`)."""
  [log_file] = run_dir.glob("run-*.wandb")
  deadline = time.monotonic() + timeout_s
  while True:
    found = records(log_file)
    if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
      break
    time.sleep(0.2)
  run_id, config, history, saved, exit_code = "", {}, {}, [], None
  for record in found:
    kind = record.WhichOneof("record_type")
    if kind == "run":
      run_id = record.run.run_id
      config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    elif kind == "config":
      config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    elif kind == "history":
      row = history.setdefault(record.history.step.num, {})
      for item in record.history.item:
        key = item.key or "/".join(item.nested_key)
        if not key.startswith("_"):
          row[key] = json.loads(item.value_json)
    elif kind == "files":
      saved += [f.path for f in record.files.files]
    elif kind == "exit":
      exit_code = record.exit.exit_code
  config.pop("_wandb", None)
  return OfflineRun(run_id, config, history, saved, exit_code)
