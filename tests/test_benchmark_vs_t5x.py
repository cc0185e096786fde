"""scripts/benchmark_vs_t5x.py: alternating runs, ratios of like with like, one-line failures.
The runs themselves are minutes each (docs/performance.md); here a stand-in harness."""
import importlib.util
import json
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark_vs_t5x.py"
spec = importlib.util.spec_from_file_location("benchmark_vs_t5x", SCRIPT)
vs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vs)

OURS = {"tokens_per_second": 13632.0, "step_time_s": 0.367, "cpu_s_per_step": 0.66,
        "time_to_first_step_s": 16.6, "peak_memory_bytes": 2.45e9, "tflops_per_device": 0.006,
        "peak_tflops_per_device": 0.15, "mfu": 0.04}
T5X = {"tokens_per_second": 4921.0, "step_time_s": 1.018, "compile_s": 18.3,
       "peak_rss_bytes": 2.98e9}


def test_ratios_and_table_row():
  r = vs.ratios(OURS, T5X)
  assert r == pytest.approx({"tokens_per_second": 13632 / 4921, "time_to_first_step": 16.6 / 18.3,
                             "peak_memory": 2.45 / 2.98})
  row = vs.table([("tiny", "float32", OURS, T5X)]).splitlines()[2]
  assert row == ("| tiny | float32 | 13,632 (0.367, 0.66) | 4,921 (1.018) | **2.77x** | "
                 "16.6 / 18.3 s | 0.91x | 2.45 / 2.98 | 0.82x | 0.006 / 0.150 = 4% |")


def test_runs_alternate_t5x_first_and_a_failing_harness_is_named(tmp_path, monkeypatch, capsys):
  calls, real = [], vs._json_line

  def fake(command, cwd):
    calls.append(command)
    return T5X if "bench.py" in command[1] else OURS
  bench = tmp_path / "bench.py"
  bench.write_text("")
  monkeypatch.setattr(vs, "_json_line", fake)
  peaks = []
  monkeypatch.setattr(vs, "measure_peak", lambda dtype: peaks.append(dtype) or 0.25)
  assert vs.main([f"--t5x_bench={bench}", f"--t5x_python={sys.executable}",
                  "--configs=tiny,small", "--dtypes=bfloat16"]) == 0
  assert peaks == ["bfloat16"]  # measured once per dtype, passed to every run of ours
  assert all(c[-1] == "--peak_tflops=0.25" for c in calls[1::2])
  calls[1::2] = [c[:-1] for c in calls[1::2]]
  assert [(c[1].endswith("bench.py"), c[-1]) for c in calls] == [
      (True, "bfloat16"), (False, "--dtype=bfloat16")] * 2
  assert [c[3] for c in calls[::2]] == ["tiny", "small"]
  assert calls[1][2:4] == ["--config=t5x_tiny", "--steps=20"]
  out = capsys.readouterr().out.splitlines()
  assert json.loads(out[0]) == {"peak_tflops": 0.25, "dtype": "bfloat16", "source": "measured"}
  assert [json.loads(line)["stack"] for line in out[1:5]] == ["t5x", "t5xlike"] * 2
  assert out[-1].startswith("| small | bfloat16 |")
  # The real runner: a harness that fails is one line naming it.
  bench.write_text("import sys; print('boom', file=sys.stderr); sys.exit(3)\n")
  with pytest.raises(SystemExit, match=r"bench.py --config tiny failed \(exit 3\): boom"):
    real([sys.executable, str(bench), "--config", "tiny"], tmp_path)


def test_measure_peak_runs_our_matmul_in_a_fresh_process(monkeypatch):
  seen = []
  monkeypatch.setattr(vs, "_json_line",
                      lambda command, cwd: seen.append(command) or {"peak_tflops": 0.17})
  assert vs.measure_peak("float32") == 0.17
  assert seen[0][0] == sys.executable and "measured_matmul_tflops(dtype='float32'" in seen[0][2]
  # The code it runs is valid Python that prints one JSON line (run here with a stub).
  code = seen[0][2].replace("from t5xlike import flops", "import types; flops = types."
                            "SimpleNamespace(measured_matmul_tflops=lambda **k: 0.2)")
  code = code.replace("time.sleep(1.0)", "pass")
  import contextlib
  import io
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(code, {})
  assert json.loads(printed.getvalue()) == {"peak_tflops": 0.2}
