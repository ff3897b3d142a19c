"""Mutation testing for lostjax: break the code one plausible way at a time and check that a test notices.

    python tools/mutate.py lostjax/generate.py                 # every mutant of one file, its mapped tests
    python tools/mutate.py optim/ losses/pld.py --sample 30    # 30 mutants per file, chosen with --seed
    python tools/mutate.py train/study.py --list                # print the mutants, run nothing
    python tools/mutate.py train/study.py --json out.json       # also write every outcome as JSON
    python tools/mutate.py losses/ --rerun out.json             # only the mutants that survived in out.json

Each mutant is a one-token change of the source, made on the text so that everything else stays byte-identical:
an arithmetic operator swapped (``+``/``-``, ``*``/``/``, ``**``→``*``), a comparison weakened or negated
(``<``/``<=``, ``>``/``>=``, ``==``/``!=``, ``is``/``is not``, ``in``/``not in``), ``and``/``or``, a unary minus
or ``not`` dropped, a number changed (``0``→``1``, ``n``→``n+1``, ``x``→``2x`` for floats), ``True``/``False``,
``any``/``all``, ``min``/``max`` (also ``jnp.``/``np.``), ``argmin``/``argmax``, and a ``stop_gradient(x)`` call
replaced by ``x``. Docstrings, strings, ``__name__ == "__main__"`` blocks and lines marked ``# pragma: no mutate``
are left alone.

For each source file the tool finds its tests: ``tests/test_*.py`` files that import the module (by dotted name or
``from package import name``) or are named after it (``tests/test_loss_pld.py`` for ``losses/pld.py``, whose
tests import the functions from the package), plus the explicit entries of ``EXTRA_TESTS``; ``--tests`` overrides
all of them. The tests
run once on the unmutated code (they must pass; their time sets the per-mutant timeout), then once per mutant with
``pytest -x`` and the default markers (slow tests excluded), in a subprocess sharing one persistent JAX compilation
cache. A mutant is *killed* when the tests fail or time out, *survived* when they pass. The file is restored after
every mutant, also on Ctrl-C. ``--rerun`` takes the JSON (or the JSON lines printed) of an earlier run and runs only
its survivors again, matched by file, line, column, mutation and source line: the check after adding tests.

Why a script of our own rather than mutmut or cosmic-ray: mutmut 3 first runs the whole suite under its
trampolines to map functions to tests (over ten minutes on two cores, with jit-traced functions wrapped in its
dispatcher), and cosmic-ray needs a session database and one test command per session; here a file maps to a
handful of test files, and a mutant costs one pytest start-up plus those tests.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Tests that exercise a module without importing it by name (through the trainer, a CLI or a registry).
EXTRA_TESTS = {
    "train/study.py": ["tests/test_study.py"],
    "train/workdir.py": ["tests/test_workdir.py"],
    "train/export.py": ["tests/test_export.py"],
    "lostjax/models/moe.py": ["tests/test_moe.py"],
    "lostjax/generate.py": ["tests/test_generate.py"],
    "train/data/": ["tests/test_data_*.py"],
}

_BINOP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
          ast.FloorDiv: ("//", "/"), ast.Pow: ("**", "*"), ast.Mod: ("%", "//")}
_CMPOP = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
          ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is not", "is"),
          ast.IsNot: ("is not", "is"), ast.In: ("not in", "in"), ast.NotIn: ("not in", "in")}
_NAME_SWAP = {"any": "all", "all": "any", "min": "max", "max": "min", "minimum": "maximum",
              "maximum": "minimum", "argmin": "argmax", "argmax": "argmin", "amin": "amax", "amax": "amin"}


@dataclasses.dataclass(frozen=True)
class Mutant:
  path: str       # relative to the repository root
  start: int      # byte offsets of the replaced span in the file
  end: int
  new: bytes
  line: int
  description: str


def _line_offsets(src: bytes) -> list[int]:
  offs, pos = [0], 0
  for line in src.splitlines(keepends=True):
    pos += len(line)
    offs.append(pos)
  return offs


class _Collector(ast.NodeVisitor):
  """Walks a module and records one-token mutants as byte spans of the original source."""

  def __init__(self, path: str, src: bytes):
    self.path, self.src = path, src
    self.offs = _line_offsets(src)
    self.lines = src.splitlines()
    self.mutants: list[Mutant] = []
    self._skip: set[int] = set()   # id() of nodes that must not be mutated (docstrings)

  def _pos(self, lineno: int, col: int) -> int:
    return self.offs[lineno - 1] + col

  def _span(self, node) -> tuple[int, int]:
    return self._pos(node.lineno, node.col_offset), self._pos(node.end_lineno, node.end_col_offset)

  def _add(self, start: int, end: int, new: bytes, line: int, desc: str):
    if b"pragma: no mutate" in self.lines[line - 1]:
      return
    self.mutants.append(Mutant(self.path, start, end, new, line, desc))

  def _operator_in_gap(self, left, right, token: str, new: str, line: int, desc: str):
    """Replaces the operator token found between the end of ``left`` and the start of ``right``."""
    a = self._pos(left.end_lineno, left.end_col_offset)
    b = self._pos(right.lineno, right.col_offset)
    gap = self.src[a:b].decode()
    pattern = r"\bis\s+not\b|\bnot\s+in\b|\bis\b|\bin\b|\band\b|\bor\b" if token[0].isalpha() else re.escape(token)
    m = None
    for cand in re.finditer(pattern, gap):
      if re.sub(r"\s+", " ", cand.group(0)) == token:
        m = cand
        break
    if m is None:
      return
    s = a + len(gap[:m.start()].encode())
    e = a + len(gap[:m.end()].encode())
    self._add(s, e, new.encode(), line, desc)

  # --- nodes -------------------------------------------------------------------------------------------------
  def _mark_docstring(self, body):
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(
        body[0].value.value, str):
      self._skip.add(id(body[0].value))

  def visit_Module(self, node):
    self._mark_docstring(node.body)
    self.generic_visit(node)

  def visit_FunctionDef(self, node):
    self._mark_docstring(node.body)
    self.generic_visit(node)

  visit_AsyncFunctionDef = visit_FunctionDef

  def visit_ClassDef(self, node):
    self._mark_docstring(node.body)
    self.generic_visit(node)

  def visit_If(self, node):
    t = node.test
    if (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"):
      return   # the command-line block
    self.generic_visit(node)

  def visit_BinOp(self, node):
    op = _BINOP.get(type(node.op))
    if op:
      self._operator_in_gap(node.left, node.right, op[0], op[1], node.lineno, f"{op[0]} → {op[1]}")
    self.generic_visit(node)

  def visit_AugAssign(self, node):
    op = _BINOP.get(type(node.op))
    if op:
      self._operator_in_gap(node.target, node.value, op[0] + "=", op[1] + "=", node.lineno,
                            f"{op[0]}= → {op[1]}=")
    self.generic_visit(node)

  def visit_Compare(self, node):
    left = node.left
    for op, right in zip(node.ops, node.comparators):
      tok = _CMPOP.get(type(op))
      if tok:
        old = {ast.Is: "is", ast.In: "in"}.get(type(op), tok[0])
        new = tok[0] if isinstance(op, (ast.Is, ast.In)) else tok[1]
        self._operator_in_gap(left, right, old, new, node.lineno, f"{old} → {new}")
      left = right
    self.generic_visit(node)

  def visit_BoolOp(self, node):
    old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
    self._operator_in_gap(node.values[0], node.values[1], old, new, node.lineno, f"{old} → {new}")
    self.generic_visit(node)

  def visit_UnaryOp(self, node):
    if isinstance(node.op, (ast.USub, ast.Not)):
      s, _ = self._span(node)
      o, e = self._span(node.operand)
      # keep the operand's own text (and any parentheses around it) by deleting only the operator prefix
      self._add(s, o, b"", node.lineno, "drop unary -" if isinstance(node.op, ast.USub) else "drop not")
    self.generic_visit(node)

  def visit_Constant(self, node):
    if id(node) in self._skip or not hasattr(node, "lineno"):
      return
    v = node.value
    s, e = self._span(node)
    text = self.src[s:e].decode()
    if isinstance(v, bool):
      self._add(s, e, str(not v).encode(), node.lineno, f"{v} → {not v}")
    elif isinstance(v, int):
      new = "1" if v == 0 else str(v + 1)
      if not re.fullmatch(r"[0-9_]+", text):
        return   # hex, octal: leave alone
      self._add(s, e, new.encode(), node.lineno, f"{text} → {new}")
    elif isinstance(v, float):
      new = "1.0" if v == 0.0 else repr(v * 2.0)
      self._add(s, e, new.encode(), node.lineno, f"{text} → {new}")

  def visit_Call(self, node):
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name in _NAME_SWAP:
      if isinstance(f, ast.Attribute):
        e = self._pos(f.end_lineno, f.end_col_offset)
        s = e - len(name.encode())
      else:
        s, e = self._span(f)
      self._add(s, e, _NAME_SWAP[name].encode(), node.lineno, f"{name} → {_NAME_SWAP[name]}")
    if name == "stop_gradient" and len(node.args) == 1 and not node.keywords:
      s, e = self._span(node)
      a, b = self._span(node.args[0])
      self._add(s, e, b"(" + self.src[a:b] + b")", node.lineno, "drop stop_gradient")
    self.generic_visit(node)

  def visit_JoinedStr(self, node):
    return   # f-strings: messages, not logic


def collect_mutants(path: str) -> list[Mutant]:
  src = (ROOT / path).read_bytes()
  tree = ast.parse(src, filename=path)
  col = _Collector(path, src)
  col.visit(tree)
  out, seen = [], set()
  base = ast.dump(tree)
  for m in col.mutants:
    new_src = src[:m.start] + m.new + src[m.end:]
    try:
      d = ast.dump(ast.parse(new_src))
    except SyntaxError:
      continue
    if d == base or d in seen:
      continue   # syntactically equivalent, or the same mutant reached twice
    seen.add(d)
    out.append(m)
  return out


def module_name(path: str) -> str:
  p = Path(path).with_suffix("")
  parts = list(p.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def tests_for(path: str) -> list[str]:
  mod = module_name(path)
  pkg, _, leaf = mod.rpartition(".")
  pats = [re.compile(rf"\b{re.escape(mod)}\b")]
  if pkg:
    pats.append(re.compile(rf"from\s+{re.escape(pkg)}\s+import\s+[^\n]*\b{re.escape(leaf)}\b"))
    pats.append(re.compile(rf"from\s+{re.escape(pkg)}\s+import\s*\([^)]*\b{re.escape(leaf)}\b", re.S))
  found = set()
  for key, globs in EXTRA_TESTS.items():
    if path == key or (key.endswith("/") and path.startswith(key)):
      for g in globs:
        found.update(str(t.relative_to(ROOT)) for t in ROOT.glob(g))
  for t in sorted((ROOT / "tests").glob("test_*.py")):
    stem = leaf.lstrip("_")   # losses/_utils.py -> tests/test_loss_utils.py
    named = stem and (t.stem == f"test_{stem}" or t.stem.endswith(f"_{stem}"))
    if named or any(p.search(t.read_text()) for p in pats):
      found.add(str(t.relative_to(ROOT)))
  return sorted(found)


def run_tests(tests: list[str], timeout: float, cache_dir: str) -> tuple[str, float]:
  env = dict(os.environ, LOSTJAX_TEST_JAX_CACHE=cache_dir, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1",
             PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")   # the suite needs no plugin; their entry points cost seconds
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
  t0 = time.monotonic()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=timeout, start_new_session=True)
    status = "passed" if proc.returncode == 0 else "failed"
  except subprocess.TimeoutExpired:
    status = "timeout"
  return status, time.monotonic() - t0


def load_survivors(path: str) -> set[tuple]:
  """(file, line, col, mutation, code) of every survived mutant in a --json file or the printed JSON lines."""
  if not Path(path).is_file():
    raise SystemExit(f"error: no earlier run's output at --rerun {path!r}")
  text = Path(path).read_text()
  try:
    recs = json.loads(text)["mutants"]
  except (json.JSONDecodeError, KeyError, TypeError):
    recs = [json.loads(l) for l in text.splitlines() if l.strip().startswith("{")]
  return {(r["file"], r["line"], r.get("col"), r["mutation"], r["code"]) for r in recs
          if r.get("outcome") == "survived"}


def _key(m: Mutant, original: bytes) -> tuple:
  col = m.start - _line_offsets(original)[m.line - 1]
  return m.path, m.line, col, m.description, original.splitlines()[m.line - 1].decode().strip()


def expand(paths: list[str]) -> list[str]:
  out = []
  for p in paths:
    q = ROOT / p
    if q.is_dir():
      out += [str(f.relative_to(ROOT)) for f in sorted(q.rglob("*.py"))]
    elif q.is_file() and q.suffix == ".py":
      out.append(str(q.relative_to(ROOT)))
    else:
      raise SystemExit(f"error: no Python file or folder at {p!r}")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("paths", nargs="+", help="source files or folders to mutate")
  ap.add_argument("--tests", nargs="*", help="test files to run (default: the tests that import each module)")
  ap.add_argument("--sample", type=int, default=0, help="at most this many mutants per file (0: all)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--list", action="store_true", help="print the mutants and exit")
  ap.add_argument("--json", help="write every outcome to this file")
  ap.add_argument("--rerun", help="run only the mutants that survived in this earlier --json output (or log)")
  ap.add_argument("--timeout_factor", type=float, default=3.0)
  args = ap.parse_args(argv)
  keep = load_survivors(args.rerun) if args.rerun else None

  cache_dir = os.environ.get("LOSTJAX_TEST_JAX_CACHE") or os.path.join(tempfile.gettempdir(), "lostjax-mutate-cache")
  results, summary = [], {}
  files = expand(args.paths)
  for path in files:
    mutants = collect_mutants(path)
    if args.sample and len(mutants) > args.sample:
      mutants = sorted(random.Random(f"{args.seed}:{path}").sample(mutants, args.sample),
                       key=lambda m: m.start)
    if keep is not None:
      src = (ROOT / path).read_bytes()
      mutants = [m for m in mutants if _key(m, src) in keep or _key(m, src)[:2] + (None,) + _key(m, src)[3:] in keep]
    if not mutants:
      continue   # nothing to mutate (a package's __init__ that only re-exports): no test run
    if args.list:
      for m in mutants:
        print(f"{path}:{m.line}: {m.description}")
      continue
    tests = args.tests or tests_for(path)
    if not tests:
      print(json.dumps({"file": path, "error": "no test imports this module; pass --tests"}), flush=True)
      continue
    status, base_t = run_tests(tests, timeout=3600, cache_dir=cache_dir)
    if status != "passed":
      print(json.dumps({"file": path, "error": f"tests fail on the unmutated code: {tests}"}), flush=True)
      continue
    timeout = max(60.0, args.timeout_factor * base_t)
    original = (ROOT / path).read_bytes()
    counts = {"killed": 0, "survived": 0, "timeout": 0}

    def restore(*_):
      (ROOT / path).write_bytes(original)
      if _:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, restore)
    try:
      for m in mutants:
        (ROOT / path).write_bytes(original[:m.start] + m.new + original[m.end:])
        try:
          status, dt = run_tests(tests, timeout, cache_dir)
        finally:
          (ROOT / path).write_bytes(original)
        outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
        counts[outcome] += 1
        _, line, col, desc, code = _key(m, original)
        rec = {"file": path, "line": line, "col": col, "mutation": desc, "outcome": outcome,
               "seconds": round(dt, 1), "code": code}
        results.append(rec)
        print(json.dumps(rec, ensure_ascii=False), flush=True)
    finally:
      restore()
      signal.signal(signal.SIGTERM, old)
    n = sum(counts.values())
    summary[path] = dict(counts, mutants=n, tests=tests,
                         survival=round(counts["survived"] / n, 3) if n else None)
    print(json.dumps({"file": path, **summary[path]}), flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps({"summary": summary, "mutants": results}, indent=1, ensure_ascii=False))
  survived = sum(s["survived"] for s in summary.values())
  total = sum(s["mutants"] for s in summary.values())
  if total:
    print(json.dumps({"total_mutants": total, "survived": survived, "survival": round(survived / total, 3)}))


if __name__ == "__main__":
  main()
