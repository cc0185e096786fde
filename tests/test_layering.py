"""The core imports no TensorFlow, seqio or grain (docs/architecture.md); the package's
import graph is acyclic, no module reads another's private names, and private names of
other libraries are read in `t5xlike/library_compat.py` only (`scripts/code_structure.py`)."""
import ast
import importlib.util
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "t5xlike"
_SPEC = importlib.util.spec_from_file_location("code_structure",
                                               REPO / "scripts" / "code_structure.py")
code_structure = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(code_structure)

CORE = ["t5xlike.models.t5", "t5xlike.models.layers", "t5xlike.models.encoder_decoder",
        "t5xlike.training.trainer", "t5xlike.partitioning", "t5xlike.optim",
        "t5xlike.checkpoints", "t5xlike.metrics", "t5xlike.losses",
        "t5xlike.objectives.span_corruption", "t5xlike.data.feature_converters",
        "t5xlike.data.batch_shapes", "t5xlike.inference.decoding",
        "t5xlike.inference.predictor", "t5xlike.inference.checkpoint_loading",
        "t5xlike.inference.jsonl_io", "t5xlike.inference.task_evaluator",
        "t5xlike.runs.infer_run", "t5xlike.runs.eval_run", "t5xlike.text_metrics"]


def test_core_imports_no_tensorflow_seqio_or_grain():
  code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE) +
          "bad = [m for m in ('tensorflow', 'seqio', 'grain', 'tensorflow_datasets') "
          "if m in sys.modules]\nprint(bad)\nsys.exit(1 if bad else 0)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr


def test_import_graph_has_no_cycles():
  """Module-level and function-level imports alike."""
  assert code_structure.cycles(code_structure.import_graph(PACKAGE)) == []


def test_no_module_reads_another_modules_private_names():
  assert code_structure.private_uses(PACKAGE) == []


def test_private_names_of_libraries_only_in_library_compat():
  modules = code_structure.library_private_modules(PACKAGE)
  assert set(modules) <= {"t5xlike.library_compat"}, [
      use for use in code_structure.library_private_uses(PACKAGE)
      if not use.startswith("t5xlike.library_compat:")]


def test_peft_checkpoints_load_with_only_checkpoint_loading_imported():
  """Importing `checkpoint_loading` registers every PEFT method (through
  `t5xlike/finetuning/__init__.py`): the same set as importing every module of
  `t5xlike.finetuning` registers; and a `peft.json` method record written before
  the registry existed still loads."""
  code = ("import t5xlike.inference.checkpoint_loading\n"
          "import sys\n"
          "registry = sys.modules['t5xlike.finetuning.peft_registry']\n"
          "print(sorted(registry.method_classes()))\n"
          "record = {'method': 'LoRA', 'rank': 4, 'alpha': 8.0, 'dropout': 0.0,\n"
          "          'targets': 'attention/(query|value)$', 'also_train': []}\n"
          "method = registry.method_from_json(record)\n"
          "assert registry.method_to_json(method) == record, method\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  every_module = ("import importlib, pkgutil, t5xlike.finetuning as f\n"
                  "for m in pkgutil.iter_modules(f.__path__):\n"
                  "  importlib.import_module(f't5xlike.finetuning.{m.name}')\n"
                  "from t5xlike.finetuning import peft_registry\n"
                  "print(sorted(peft_registry.method_classes()))\n")
  expected = subprocess.run([sys.executable, "-c", every_module], capture_output=True,
                            text=True, timeout=300)
  assert expected.returncode == 0, expected.stdout + expected.stderr
  assert {"Adapters", "LoRA", "PromptTuning"} <= set(ast.literal_eval(expected.stdout))
  assert result.stdout == expected.stdout
