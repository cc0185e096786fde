"""Structure figures of the `t5xlike` package, from its syntax trees (nothing imported).

  python scripts/code_structure.py [PACKAGE_DIR] [--json]

Prints one table (or one JSON object with --json): modules, the largest module,
functions over 60 and over 100 lines, the widest signature, import cycles
(module-level and function-level imports alike), private names used across
modules, `getattr`/`hasattr` probes (all, and those on a model / fine-tuning
technique / objective / feed), `pylint: disable` comments, comment lines per
code line, and the share of public functions with five or more parameters
whose docstring documents them. `tests/test_layering.py` uses `import_graph`,
`cycles`, `private_uses` and `library_private_modules` to keep the graph
acyclic, private names private and libraries' private names in
`t5xlike/library_compat.py`.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import pathlib
import re
import sys
import tokenize
from collections.abc import Iterable, Iterator

#: Receivers of a getattr/hasattr probe that count as "probing an interface":
#: an object of one of the package's protocols, named the way the code names them.
PROBED_ROLES = ("model", "finetuning", "technique", "objective", "feed", "network", "evaluator")


def module_name(package_dir: pathlib.Path, path: pathlib.Path) -> str:
  """'t5xlike.data.sources' for PACKAGE_DIR/data/sources.py ('__init__' dropped)."""
  parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """{dotted module name: file} for every .py file of the package."""
  files = sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)
  return {module_name(package_dir, p): p for p in files}


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
  """The absolute module an `ImportFrom` names (relative imports resolved)."""
  if not node.level:
    return node.module or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str, modules: Iterable[str]) -> str | None:
  """The longest package module that `name` is or lies inside."""
  known = set(modules)
  while name and name not in known:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]):
  """Yields (imported package module, bound local name or None, imported attribute or None)
  for every import statement of the file, at any depth (function-level included)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  top = module.split(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == top or alias.name.startswith(top + "."):
          target = _owner(alias.name, modules)
          if target:
            yield target, alias.asname, None
    elif isinstance(node, ast.ImportFrom):
      base = _absolute(module, node, path.name == "__init__.py")
      if not (base == top or base.startswith(top + ".")):
        continue
      for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in modules:  # `from pkg import module`
          yield full, alias.asname or alias.name, None
        else:
          target = _owner(base, modules)
          if target:
            yield target, None, alias.name


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """{module: modules of the package it imports}; a package's `__init__` counts as
  the package, and `from pkg import sub` as an import of `pkg.sub`."""
  modules = package_modules(package_dir)
  graph: dict[str, set[str]] = {m: set() for m in modules}
  for module, path in modules.items():
    for target, _, _ in _imports(module, path, modules):
      if target != module:
        graph[module].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found: list[list[str]] = []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in sorted(graph.get(node, ())):
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
  for node in sorted(graph):
    if node not in index:
      visit(node)
  return sorted(found)


def private_uses(package_dir: pathlib.Path) -> list[str]:
  """'user -> owner._name' for every `_name` (not dunder) of one package module that
  another module imports (`from owner import _name`) or reads (`owner_alias._name`)."""
  modules = package_modules(package_dir)
  uses = []
  for module, path in modules.items():
    aliases = {}
    for target, bound, attribute in _imports(module, path, modules):
      if target == module:
        continue
      if attribute is not None and _is_private(attribute):
        uses.append(f"{module} -> {target}.{attribute}")
      if bound is not None:
        aliases[bound] = target
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and _is_private(node.attr)):
        uses.append(f"{module} -> {aliases[node.value.id]}.{node.attr}")
  return sorted(set(uses))


def library_private_uses(package_dir: pathlib.Path) -> list[str]:
  """'module:line lib.path._name' for every private name of another library (seqio, tfds,
  gin, ...) that a package module reads: `from lib import _x` or `lib.a._x`."""
  return sorted({f"{module}:{line} {name}"
                 for module, line, name in _library_private_names(package_dir)})


def library_private_modules(package_dir: pathlib.Path) -> list[str]:
  """The package modules that read a private name of another library (`library_private_uses`)."""
  return sorted({module for module, _, _ in _library_private_names(package_dir)})


def _library_private_names(package_dir: pathlib.Path) -> Iterator[tuple[str, int, str]]:
  """Yields (module, line, 'lib.path._name') for `library_private_uses`."""
  top = package_dir.name
  for module, path in package_modules(package_dir).items():
    tree = ast.parse(path.read_text())
    libraries = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.split(".")[0] != top:
            libraries.add(alias.asname or alias.name.split(".")[0])
      elif isinstance(node, ast.ImportFrom) and not node.level and (
          node.module or "").split(".")[0] != top:
        if any(_is_private(part) for part in (node.module or "").split(".")):
          yield module, node.lineno, node.module
        for alias in node.names:
          if _is_private(alias.name):
            yield module, node.lineno, f"{node.module}.{alias.name}"
          libraries.add(alias.asname or alias.name)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)} | {"self", "cls"}
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and _is_private(node.attr):
        root, chain = node.value, [node.attr]
        while isinstance(root, ast.Attribute):
          chain.append(root.attr)
          root = root.value
        name = root.id if isinstance(root, ast.Name) else "<expr>"
        # A library module's private name, or one of an object the library made.
        if name in libraries or name not in defined and name not in package_aliases(tree, top):
          yield module, node.lineno, f"{name}.{'.'.join(reversed(chain))}"


def package_aliases(tree: ast.AST, top: str) -> set[str]:
  """Local names bound to the package's own modules by import statements."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0]
                                             == top):
      names.update(alias.asname or alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
      names.update(alias.asname or alias.name.split(".")[0] for alias in node.names
                   if alias.name.split(".")[0] == top)
  return names


def _is_private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def _functions(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
  args = node.args
  names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
  return [n for n in names if n not in ("self", "cls")]


def _documents_parameters(node: ast.FunctionDef | ast.AsyncFunctionDef,
                          parameters: list[str]) -> bool:
  """The docstring has an Args section, refers to another function's for the same
  arguments ("arguments as `train`'s"), or names (in backticks or as `name:`) at least
  half of the parameters."""
  doc = ast.get_docstring(node) or ""
  if "Args:" in doc or re.search(r"arguments as `[\w.]+`'s", doc):
    return True
  named = sum(1 for p in parameters if f"`{p}`" in doc or f"{p}:" in doc or f"{p} " in doc)
  return named >= (len(parameters) + 1) // 2


def _probe_receiver(node: ast.Call) -> str | None:
  """The probed object's name of a `getattr(x, ...)` / `hasattr(x, ...)` call."""
  if not (isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
          and node.args):
    return None
  target = node.args[0]
  if isinstance(target, ast.Attribute):
    return target.attr
  if isinstance(target, ast.Name):
    return target.id
  return ""


def _comment_and_code_lines(source: str) -> tuple[int, int]:
  comments, code = set(), set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments.add(token.start[0])
    elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER, tokenize.STRING):
      code.add(token.start[0])
  return len(comments - code), len(code)


def measure(package_dir: pathlib.Path) -> dict:
  """All the figures, as one JSON-able dict."""
  modules = package_modules(package_dir)
  over_60, over_100, probes, role_probes = [], [], 0, []
  widest = ("", 0)
  largest = ("", 0)
  disables = comment_lines = code_lines = 0
  wide_public = wide_documented = 0
  for module, path in modules.items():
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    lines = source.count("\n")
    largest = max(largest, (module, lines), key=lambda item: item[1])
    disables += source.count("pylint: disable")
    comments, code = _comment_and_code_lines(source)
    comment_lines += comments
    code_lines += code
    for fn in _functions(tree):
      length = fn.end_lineno - fn.lineno + 1
      if length > 60:
        over_60.append(f"{module}.{fn.name}: {length}")
      if length > 100:
        over_100.append(f"{module}.{fn.name}: {length}")
      parameters = _parameters(fn)
      if len(parameters) > widest[1]:
        widest = (f"{module}.{fn.name}", len(parameters))
      if len(parameters) >= 5 and not fn.name.startswith("_"):
        wide_public += 1
        wide_documented += _documents_parameters(fn, parameters)
    for node in ast.walk(tree):
      if isinstance(node, ast.Call):
        receiver = _probe_receiver(node)
        if receiver is not None:
          probes += 1
          if any(role in receiver.lower() for role in PROBED_ROLES):
            role_probes.append(f"{module}:{node.lineno} {receiver}")
  graph = import_graph(package_dir)
  return {
      "modules": len(modules),
      "largest_module": f"{largest[0]}: {largest[1]} lines",
      "functions_over_60_lines": sorted(over_60),
      "functions_over_100_lines": sorted(over_100),
      "widest_signature": f"{widest[0]}: {widest[1]} parameters",
      "import_cycles": cycles(graph),
      "private_uses_across_modules": private_uses(package_dir),
      "library_private_uses": library_private_uses(package_dir),
      "getattr_hasattr_calls": probes,
      "probes_on_interfaces": role_probes,
      "pylint_disable_comments": disables,
      "comment_lines_per_code_line": round(comment_lines / max(code_lines, 1), 3),
      "public_functions_5plus_params": wide_public,
      "of_which_document_parameters": wide_documented,
  }


def _table(figures: dict) -> str:
  rows = []
  for key, value in figures.items():
    if isinstance(value, list):
      shown = "; ".join(" <-> ".join(v) if isinstance(v, list) else v for v in value)
      rows.append(f"{key:32s} {len(value):5d}  {shown[:400]}")
    else:
      rows.append(f"{key:32s} {value}")
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("package_dir", nargs="?",
                      default=str(pathlib.Path(__file__).resolve().parents[1] / "t5xlike"))
  parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
  args = parser.parse_args(argv)
  figures = measure(pathlib.Path(args.package_dir).resolve())
  print(json.dumps(figures, indent=1) if args.json else _table(figures))
  return 0


if __name__ == "__main__":
  sys.exit(main())
