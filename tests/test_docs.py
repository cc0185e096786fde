"""The architecture map and the README's layout table name every module; the repository
refers to nothing outside it."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "t5xlike"


def _modules() -> list[str]:
  """Every module's name (file stem) and every subpackage's name."""
  names = {p.stem for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}
  names |= {p.parent.name for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
  return sorted(names)


def _named(text: str, name: str) -> bool:
  return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text) is not None


def test_architecture_doc_names_every_module():
  text = (REPO / "docs" / "architecture.md").read_text()
  assert [name for name in _modules() if not _named(text, name)] == []


def test_readme_layout_table_names_every_module():
  readme = (REPO / "README.md").read_text()
  layout = readme[readme.index("## Layout"):]
  layout = layout[:layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
  assert [name for name in _modules() if not _named(layout, name)] == []


def test_nothing_refers_outside_the_repository():
  skip = {".git", ".venv", "__pycache__", "build", "dist"}
  offenders = []
  for path in REPO.rglob("*"):
    parts = path.relative_to(REPO).parts
    if skip & set(parts) or any(p.endswith(".egg-info") for p in parts) or not path.is_file():
      continue
    if path.suffix not in (".py", ".md", ".gin", ".toml", ".txt", ".cfg", "") or (
        path.stat().st_size > 2_000_000):
      continue
    try:
      text = path.read_text()
    except UnicodeDecodeError:
      continue
    if "../shared" in text or "DESIGN.md" in text:
      offenders.append(str(path.relative_to(REPO)))
  assert [path for path in offenders if path != "tests/test_docs.py"] == []
