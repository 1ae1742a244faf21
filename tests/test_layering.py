"""The shape of src/: libraries below, command lines on top, no import cycle, short
functions and files, and `cfg.task` read in one place (docs/architecture.md).

A command-line module is one with an `if __name__ == "__main__":` block. Every import
counts, the ones inside functions too (they are how a cycle hides); imports under
`if TYPE_CHECKING:` do not run and are not counted.
"""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400


def module_name(path: Path) -> str:
  parts = path.relative_to(SRC.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = SRC) -> dict[str, ast.Module]:
  return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}


def is_cli(tree: ast.Module) -> bool:
  return any(isinstance(n, ast.If) and "__name__" in ast.unparse(n.test) and "__main__" in ast.unparse(n.test)
             for n in tree.body)


def _type_checking_nodes(tree: ast.Module) -> set[int]:
  skipped = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
  return skipped


def imports(tree: ast.Module, known: set[str]) -> set[str]:
  """The src modules a module imports, anywhere in it (TYPE_CHECKING blocks aside)."""
  skipped, found = _type_checking_nodes(tree), set()
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:  # `from src import mesh` imports src.mesh
      subs = {f"{node.module}.{a.name}" for a in node.names} & known
      found |= subs if len(subs) == len(node.names) else subs | {node.module}
  return {name for name in found if name in known}


def graph(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
  return {name: imports(tree, set(mods)) - {name} for name, tree in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a path [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt, path + [nxt])):
        return cycle
    state[node] = 2
    return None

  for start in sorted(edges):
    if start not in state and (cycle := visit(start, [start])):
      return cycle
  return None


def test_the_command_lines_are_the_expected_ones():
  clis = {name for name, tree in modules().items() if is_cli(tree)}
  assert clis == {"src.train", "src.sample", "src.encode", "src.convert", "src.aot", "src.bench", "src.data.build"}


def test_no_library_module_imports_a_command_line():
  mods = modules()
  clis = {name for name, tree in mods.items() if is_cli(tree)}
  bad = {name: sorted(deps & clis) for name, deps in graph(mods).items() if name not in clis and deps & clis}
  assert not bad, f"library modules importing command-line modules: {bad}"


def test_no_import_cycle_even_through_function_local_imports():
  assert find_cycle(graph(modules())) is None, find_cycle(graph(modules()))


def test_the_checker_finds_what_it_looks_for(tmp_path):
  """The three checks above on a made-up tree that breaks each rule."""
  pkg = tmp_path / "src"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "cli.py").write_text("import sys\nif __name__ == '__main__':\n  sys.exit(0)\n")
  (pkg / "lib.py").write_text("from src import other\n")
  (pkg / "other.py").write_text("def f():\n  from src.lib import x\n  from src import cli\n")
  (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from src import cli\n")
  mods = {f"src.{p.stem}" if p.stem != "__init__" else "src": ast.parse(p.read_text()) for p in pkg.rglob("*.py")}
  edges = graph(mods)
  assert is_cli(mods["src.cli"]) and not is_cli(mods["src.lib"])
  assert edges["src.other"] == {"src.lib", "src.cli"}  # function-local imports count
  assert edges["src.typed"] == set()  # typing-only imports do not
  assert find_cycle(edges) == ["src.lib", "src.other", "src.lib"]


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_files_and_functions_stay_short(path):
  lines = path.read_text().splitlines()
  assert len(lines) <= MAX_FILE_LINES, f"{path.name}: {len(lines)} lines"
  long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse("\n".join(lines)))
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_task_is_chosen_in_one_place():
  uses = [(p.relative_to(SRC), i) for p in SRC.rglob("*.py")
          for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bcfg\.task\b", line)]
  assert len(uses) == 1 and uses[0][0] == Path("tasks/__init__.py"), uses
