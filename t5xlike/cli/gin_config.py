"""Loading gin files and `--gin.NAME=VALUE` overrides, with one-line errors.

Gin files are found relative to the search paths, the current directory and the
shipped `gin_configs/` (`GIN_CONFIGS_DIR`: the repository's top-level directory in a
source checkout or an editable install, `t5xlike/gin_configs/` in an installed wheel), so
`--gin_file=gin_configs/quickstart.gin` and `--gin_file=quickstart.gin` work from any
directory. Checks that gin itself does not make: every
gin file exists before any is parsed, and `--gin.NAME=VALUE` for a macro
(`NAME` without a dot) is refused unless a loaded gin file defines that
macro, so a typo such as `--gin.TRAIN_STEP=10` cannot silently do nothing. A
value that is not a gin literal (`--gin.MODEL_DIR=/tmp/run`) is taken as a
string. Every known macro's value is then checked for its form
(`macro_checks`).
"""
from __future__ import annotations

import difflib
import importlib
import logging
import pathlib
import re
from collections.abc import Sequence

import gin

from t5xlike import library_compat
from t5xlike.cli import macro_checks
from t5xlike.errors import ConfigError, one_line

log = logging.getLogger(__name__)
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]
# A wheel ships the gin files inside the package (setup.py); a source checkout, and the
# editable install that runs from it, keeps them at the repository's top.
GIN_CONFIGS_DIR = (_PACKAGE_DIR / "gin_configs" if (_PACKAGE_DIR / "gin_configs").is_dir()
                   else _PACKAGE_DIR.parent / "gin_configs")
_MACRO = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMPORT = re.compile(r"^(?:from\s+(?P<package>[\w.]+)\s+)?import\s+(?P<name>[\w.]+)"
                     r"(?:\s+as\s+(?P<alias>\w+))?\s*(?:#.*)?$")


def _importable(package: str | None, name: str) -> bool:
  module = f"{package}.{name}" if package else name
  try:
    importlib.import_module(module)
    return True
  except ImportError:
    pass
  if package is None:
    return False
  try:  # `from package import name` where name is not a module.
    return hasattr(importlib.import_module(package), name)
  except ImportError:
    return False


def without_unimportable(text: str) -> tuple[str, list[str], set[str]]:
  """(gin text without its import lines that fail here, the modules of those lines,
  the selectors of their configurables, for gin's `skip_unknown`).

  gin's `skip_unknown=True` cannot be used instead: with dynamic registration
  it also skips every configurable referenced before its module's first
  binding (an operative config's macros come first), the importable ones too.
  """
  kept, modules, aliases = [], [], []
  for line in text.splitlines():
    match = _IMPORT.match(line.strip())
    if match and match["package"] != "__gin__" and not _importable(match["package"],
                                                                   match["name"]):
      modules.append(".".join(filter(None, (match["package"], match["name"]))))
      aliases.append(match["alias"] or match["name"])
      continue
    kept.append(line)
  unknown: set[str] = set()
  for alias in aliases:
    for reference in re.findall(rf"(?<![\w.]){re.escape(alias)}(?:\.\w+)+", text):
      parts = reference.split(".")  # Every prefix: a binding's selector drops its parameter.
      unknown.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
  return "\n".join(kept) + "\n", modules, unknown


def quiet_gin_search_logs() -> None:
  """Hides gin's 'Path not found' warnings while it tries each search path."""
  logging.getLogger().addFilter(lambda record: not str(record.msg).startswith(
      ("Path not found", "system_path_file_exists")))


def search_paths(extra: Sequence[str]) -> list[pathlib.Path]:
  """`--gin_search_paths` (comma-separated items), then the current directory and
  the shipped gin_configs/."""
  paths = [pathlib.Path(p) for item in extra for p in item.split(",") if p]
  return paths + [pathlib.Path.cwd(), GIN_CONFIGS_DIR]


def find_gin_file(name: str, paths: Sequence[pathlib.Path]) -> pathlib.Path:
  """The file `name`: absolute, or relative to a search path or its gin_configs/; a name
  starting `gin_configs/` (the README's spelling) is also found in the shipped directory."""
  candidate = pathlib.Path(name)
  if candidate.is_absolute():
    if candidate.is_file():
      return candidate
  else:
    options = [path for base in paths
               for path in (base / candidate, base / "gin_configs" / candidate)]
    if candidate.parts[:1] == ("gin_configs",):
      options.append(GIN_CONFIGS_DIR.joinpath(*candidate.parts[1:]))
    for path in options:
      if path.is_file():
        return path
  raise ConfigError(f"gin file {name!r} not found (searched: "
                    f"{', '.join(str(p) for p in paths)})")


def _parse_override(name: str, value: str) -> None:
  try:
    gin.parse_config(f"{name} = {value}")
  except (ValueError, SyntaxError) as error:
    if value[:1] in "'\"" or not value:
      raise ConfigError(f"--gin.{name}={value}: {one_line(error)}") from None
    try:  # A bare string such as a path: bind it quoted.
      gin.parse_config(f"{name} = {value!r}")
    except Exception:  # noqa: BLE001  (gin raises many kinds; the first error is the one shown)
      raise ConfigError(f"--gin.{name}={value}: {one_line(error)}") from None


def configure(gin_files: Sequence[str], overrides: Sequence[tuple[str, str]] = (),
              bindings: Sequence[str] = (), extra_search_paths: Sequence[str] = (),
              skip_unknown: bool = False) -> None:
  """Loads gin files then overrides; raises ConfigError naming the culprit.

  Args:
    gin_files: `--gin_file` values, parsed in order.
    overrides: `(NAME, VALUE)` pairs of `--gin.NAME=VALUE`; a macro NAME must be
      defined by a loaded file.
    bindings: `--gin_bindings` strings, parsed after the overrides.
    extra_search_paths: `--gin_search_paths` values (comma-separated directories).
    skip_unknown: drop the files' imports that this process cannot import and
      the bindings of their configurables (`without_unimportable`), and do not
      finalize, e.g. to build the MODEL of a run's operative `config.gin` where
      the run's own task or objective code is not importable.
  """
  if not gin_files:
    raise ConfigError("no --gin_file given")
  gin.clear_config(clear_constants=False)
  paths = search_paths(extra_search_paths)
  files = [find_gin_file(name, paths) for name in gin_files]
  for path in paths:
    if path.is_dir():
      gin.add_config_file_search_path(str(path))
  gin.add_config_file_search_path(str(GIN_CONFIGS_DIR))
  for path in files:
    try:
      if skip_unknown:
        text, modules, unknown = without_unimportable(path.read_text())
        if modules:
          log.warning("%s: not importable here, skipped with their bindings: %s", path,
                      ", ".join(modules))
        gin.parse_config(text, skip_unknown=unknown)
      else:
        gin.parse_config_file(str(path))
    except (ValueError, SyntaxError, ImportError, OSError, TypeError) as error:
      raise ConfigError(f"gin file {path}: {one_line(error)}") from None
  macros = library_compat.gin_defined_macros()
  for name, value in overrides:
    if _MACRO.match(name) and name not in macros:
      close = difflib.get_close_matches(name, macros, n=1)
      hint = (f"did you mean {close[0]}?" if close
              else f"defined: {', '.join(sorted(macros)) or 'none'}")
      raise ConfigError(f"--gin.{name}: no loaded gin file defines the macro {name} ({hint})")
    _parse_override(name, value)
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except (ValueError, SyntaxError, ImportError) as error:
      raise ConfigError(f"--gin_bindings={binding}: {one_line(error)}") from None
  if skip_unknown:
    # gin.finalize refuses any binding that references a skipped configurable (e.g. the
    # run's objective); what is then built from the config fails only if it needs one.
    return
  try:
    gin.finalize()
  except ValueError as error:  # e.g. a macro that is used but never bound.
    raise ConfigError(one_line(error).split(" in config string")[0]) from None
  macro_checks.check_macros()
