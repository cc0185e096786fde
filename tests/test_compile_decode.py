"""`python -m t5xlike.compile --step=decode`: infer's generation, prefill and decode step
compiled by libtpu for a slice that is not here (runs/compile_decode_run.py)."""
import contextlib
import importlib.util
import io
import json

import pytest

from t5xlike import compile as compile_command

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e '.[tpu]')")

LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}"


def decode_row(capsys, model_gin, *flags):
  code = compile_command.main([f"--gin_file={model_gin}", "--gin_file=runs/infer.gin",
                               "--topology=v5e:2x2", "--step=decode", "--json",
                               "--gin.BATCH_SIZE=8", LENGTHS, *flags])
  out = capsys.readouterr().out.strip().splitlines()
  assert code == 0 and len(out) == 1
  return json.loads(out[0])


@pytest.fixture(scope="module")
def decoder_row():
  """The tiny decoder's row (a module fixture cannot take capsys: stdout captured here)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = compile_command.main(["--gin_file=models/decoder/tiny.gin",
                                 "--gin_file=runs/infer.gin", "--topology=v5e:2x2",
                                 "--step=decode", "--json", "--gin.BATCH_SIZE=8", LENGTHS])
  assert code == 0
  return json.loads(out.getvalue().strip().splitlines()[-1])


def test_decoder_generation_compiles_with_its_kv_cache_per_chip(decoder_row):
  row = decoder_row
  assert row["step"] == "decode" and row["chips"] == 4 and row["method"] == "greedy"
  assert row["max_decode_length"] == 32 and row["fits"]
  width = row["batch_shapes"]["decoder_input_tokens"][1]   # prompt width of the feed
  # tiny decoder: 2 layers, 2 kv heads x 16, float32; the cache holds width + 32 + 1 slots.
  kv = 2 * 2 * 8 * (width + 32 + 1) * 2 * 16 * 4
  logits = 8 * 8192 * 4
  cache = row["bytes_per_chip"]["prefill_output"]
  assert kv / 4 <= cache <= kv + logits + 64 * 1024   # sharded over the 4 chips, or not
  params = row["bytes_per_chip"]["params"]
  assert row["hbm_floor_decode_step_s"] == pytest.approx((params + cache) / 819e9, rel=1e-6)
  assert 0 < row["estimated_decode_step_s"] < row["estimated_prefill_s"]
  assert row["estimated_request_s"] == pytest.approx(
      row["estimated_prefill_s"] + 32 * row["estimated_decode_step_s"])
  assert row["estimated_tokens_per_s_per_chip"] == pytest.approx(
      8 / row["estimated_decode_step_s"] / 4)


@pytest.mark.slow
def test_t5_generation_compiles(capsys):
  row = decode_row(capsys, "models/t5_1_1/tiny.gin")
  assert row["fits"] and row["estimated_decode_step_s"] > 0
  assert row["batch_shapes"]["encoder_input_tokens"] == [8, 128]


@pytest.mark.parametrize("flags,message", [
    (["--gin_file=objectives/causal_lm.gin"], "infer_run.infer"),
    (["--gin_file=models/decoder/tiny.gin", "--gin_file=runs/infer.gin", "--estimate=probe"],
     "--step=decode takes neither"),
])
def test_bad_input_is_one_line_exit_2(flags, message, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code = compile_command.main([*flags, "--topology=v5e:2x2", "--step=decode"])
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and message in lines[0], captured.err
  assert captured.out == "" and list(tmp_path.iterdir()) == []
