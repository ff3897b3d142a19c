"""The package rules of docs/architecture.md, checked by reading every module's imports (no import is executed).

* `lostjax/`, `optim/` and `losses/` are libraries: they import nothing from `train/` (the application).
* `losses/` and `optim/` do not import each other; `lostjax/` imports neither.
* No module of `train/` imports `train.trainer` (the loop is the top of the application; only `train.main`,
  the command, runs it).
* No import cycle among the project's modules (module-level imports and imports inside functions both count).
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lostjax", "optim", "losses", "train")


def _modules():
  out = {}
  for pkg in PACKAGES:
    for root, _, files in os.walk(os.path.join(REPO, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(root, f)
          rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
          out[rel.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _resolve(name):
  """The project module a dotted import refers to (the longest known prefix), or None for third-party code."""
  parts = name.split(".")
  while parts:
    cand = ".".join(parts)
    if cand in MODULES:
      return cand
    parts.pop()
  return None


def imports_of(module):
  path = MODULES[module]
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  is_pkg = path.endswith("__init__.py")
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".")[:len(module.split(".")) - node.level + (1 if is_pkg else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
      else:
        prefix = node.module or ""
      names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    else:
      continue
    for n in names:
      r = _resolve(n)
      if r is not None and r != module:
        found.add(r)
  return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_the_scan_sees_known_imports():
  assert "train.state" in GRAPH["train.trainer"] and "lostjax.models" in GRAPH["train.state"]
  assert "optim.projection" in GRAPH["optim.frugal"]


@pytest.mark.parametrize("lib", ["lostjax", "optim", "losses"])
def test_libraries_do_not_import_the_application(lib):
  bad = {m: sorted(d for d in deps if d.split(".")[0] == "train")
         for m, deps in GRAPH.items() if m.split(".")[0] == lib}
  assert {m: d for m, d in bad.items() if d} == {}


def test_library_layering():
  allowed = {"lostjax": {"lostjax"}, "optim": {"optim", "lostjax"}, "losses": {"losses", "lostjax"}}
  bad = {m: sorted(d for d in deps if d.split(".")[0] not in allowed[m.split(".")[0]])
         for m, deps in GRAPH.items() if m.split(".")[0] in allowed}
  assert {m: d for m, d in bad.items() if d} == {}


def test_nothing_in_train_imports_the_loop_back():
  users = sorted(m for m, deps in GRAPH.items() if "train.trainer" in deps)
  assert users == ["train.main"]


def test_no_import_cycles():
  # a package's __init__ importing its own submodules is how packages export names, not a cycle
  def edges(m):
    return {d for d in GRAPH[m] if not (m + ".").startswith(d + ".") or d == m}

  color, stack, cycles = {}, [], []

  def visit(m):
    color[m] = 1
    stack.append(m)
    for d in sorted(edges(m)):
      if color.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in color:
        visit(d)
    stack.pop()
    color[m] = 2

  for m in sorted(GRAPH):
    if m not in color:
      visit(m)
  assert cycles == []
