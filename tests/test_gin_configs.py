"""Every shipped gin file parses; model gins carry the published T5.1.1 sizes."""
import pathlib
import re

import gin
import pytest

from t5xlike import library_compat
from t5xlike.cli import gin_config
from t5xlike.errors import ConfigError
from t5xlike.interop import output_dir
from t5xlike.models import t5

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"
ALL_GIN = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin"))

# (emb_dim, heads, layers per stack, head_dim, mlp_dim) as published for T5.1.1.
PUBLISHED = {"small": (512, 6, 8, 64, 1024), "base": (768, 12, 12, 64, 2048),
             "large": (1024, 16, 24, 64, 2816), "xl": (2048, 32, 24, 64, 5120),
             "xxl": (4096, 64, 24, 64, 10240), "tiny": (64, 4, 2, 16, 256)}


def test_there_are_gin_files():
  assert "quickstart.gin" in ALL_GIN and "runs/pretrain.gin" in ALL_GIN
  assert len(ALL_GIN) >= 8


def _needs_model(name):
  """Run gins, and the gins that include one (directly or through another include), compose
  with a model gin."""
  if name.startswith("runs/"):
    return True
  included = re.findall(r"^include '([^']+)'", (GIN_DIR / name).read_text(), re.MULTILINE)
  return any(_needs_model(other) for other in included if (GIN_DIR / other).is_file())


def _teacher_gin(directory: pathlib.Path) -> str:
  """A teacher.gin as `prune` writes it (the tiny T5 as TEACHER): what
  posttrain/distill_pruned.gin composes after."""
  gin_config.configure(["models/t5_1_1/tiny.gin"])
  try:
    config = output_dir.configured_model().network.config
  finally:
    gin.clear_config()
  path = directory / "teacher.gin"
  path.write_text(output_dir.teacher_gin(config, "/nonexistent/checkpoint_2", "prune"))
  return str(path)


@pytest.mark.parametrize("name", ALL_GIN)
def test_gin_file_parses(name, tmp_path):
  # A run gin needs a model gin to bind MODEL; a schedule composes after a run (the
  # quickstart); the pruned model's distillation after a model and prune's teacher.gin;
  # everything else runs alone.
  if name.startswith("schedules/"):
    files = ["quickstart.gin", name]
  elif name == "posttrain/distill_pruned.gin":
    files = ["quickstart.gin", _teacher_gin(tmp_path), name]
  else:
    files = ["models/t5_1_1/tiny.gin", name] if _needs_model(name) else [name]
  gin_config.configure(files)
  gin.clear_config()


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_model_sizes(size):
  gin_config.configure([f"models/t5_1_1/{size}.gin"])
  cfg = gin.get_configurable(t5.T5Config)()
  gin.clear_config()
  emb, heads, depth, head_dim, mlp = PUBLISHED[size]
  assert (cfg.emb_dim, cfg.num_heads, cfg.num_encoder_layers, cfg.num_decoder_layers,
          cfg.head_dim, cfg.mlp_dim) == (emb, heads, depth, depth, head_dim, mlp)
  assert cfg.mlp_activations == ("gelu", "linear") and not cfg.logits_via_embedding
  assert cfg.vocab_size == 8192  # 8,000 pieces + 100 extra ids, padded to 128


def test_shipped_gin_files_are_found_from_any_directory(tmp_path, monkeypatch):
  """The README's spelling (gin_configs/...) and the bare name, from a directory outside the
  repository; a gin_configs/ of the current directory comes first."""
  monkeypatch.chdir(tmp_path)
  paths = gin_config.search_paths([])
  assert gin_config.GIN_CONFIGS_DIR == GIN_DIR  # A source checkout: its top-level directory.
  for name in ("gin_configs/quickstart.gin", "quickstart.gin"):
    assert gin_config.find_gin_file(name, paths) == GIN_DIR / "quickstart.gin"
  with pytest.raises(ConfigError, match="'gin_configs/no_such.gin' not found"):
    gin_config.find_gin_file("gin_configs/no_such.gin", paths)
  (tmp_path / "gin_configs").mkdir()
  (tmp_path / "gin_configs" / "quickstart.gin").write_text("# mine\n")
  assert gin_config.find_gin_file("gin_configs/quickstart.gin", paths) == (
      tmp_path / "gin_configs" / "quickstart.gin")


REQUIRED_MACROS = ("MODEL_DIR", "TRAIN_STEPS", "BATCH_SIZE", "MIXTURE_OR_TASK_NAME",
                   "MIXTURE_OR_TASK_MODULE", "TASK_FEATURE_LENGTHS", "INITIAL_CHECKPOINT_PATH",
                   "RANDOM_SEED", "DROPOUT_RATE", "USE_CACHED_TASKS", "VOCABULARY", "MESH_SHAPE",
                   "LOG_PERIOD", "EVAL_PERIOD", "CHECKPOINT_PERIOD")


OBJECTIVE_GINS = sorted(str(p.relative_to(GIN_DIR))
                        for p in (GIN_DIR / "objectives").glob("[!_]*.gin"))


@pytest.mark.parametrize("files", [["quickstart.gin"],
                                   ["models/t5_1_1/small.gin", "runs/pretrain.gin"],
                                   ["models/t5_1_1/tiny.gin", "runs/finetune.gin"]]
                         + [[name] for name in OBJECTIVE_GINS])
def test_run_configs_bind_every_macro(files):
  gin_config.configure(files)
  defined = library_compat.gin_defined_macros()
  gin.clear_config()
  assert set(REQUIRED_MACROS) <= defined


@pytest.mark.parametrize("run,macros", [
    ("runs/eval.gin", ("CHECKPOINT_PATH", "EVAL_OUTPUT_DIR")),
    ("runs/infer.gin", ("CHECKPOINT_PATH", "INFER_OUTPUT_DIR", "RANDOM_SEED"))])
def test_eval_and_infer_configs_bind_their_macros(run, macros):
  gin_config.configure(["models/decoder/tiny.gin", run])
  defined = library_compat.gin_defined_macros()
  gin.clear_config()
  common = ("MIXTURE_OR_TASK_NAME", "MIXTURE_OR_TASK_MODULE", "TASK_FEATURE_LENGTHS",
            "BATCH_SIZE", "USE_CACHED_TASKS", "MESH_SHAPE", "VOCABULARY")
  assert set(macros) | set(common) <= defined
