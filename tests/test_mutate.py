"""The mutation tool (tools/mutate.py): which mutants it makes, that it keeps every other byte, how it maps tests."""
import ast
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import mutate  # noqa: E402

SRC = '''"""Docstring with γ and 1 + 2 inside."""
import jax


def f(x, y=0.5, n=3):
  """Doc: a < b."""
  z = -x + y * 2  # σ comment
  if x < y and not n == 3:
    z -= jax.lax.stop_gradient(y) / n
  return max(z, 0) if n is None else any([z in (1,)])


if __name__ == "__main__":
  print(f(1 - 2, 3))
'''


@pytest.fixture
def mutants(tmp_path, monkeypatch):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "m.py").write_text(SRC)
  monkeypatch.setattr(mutate, "ROOT", tmp_path)
  return mutate.collect_mutants("pkg/m.py")


def _apply(m):
  src = SRC.encode()
  return (src[:m.start] + m.new + src[m.end:]).decode()


def test_expected_mutants(mutants):
  got = {(m.line, m.description) for m in mutants}
  expected = {(7, "drop unary -"), (7, "+ → -"), (7, "* → /"), (7, "2 → 3"), (5, "0.5 → 1.0"), (5, "3 → 4"),
              (8, "< → <="), (8, "and → or"), (8, "drop not"), (8, "== → !="), (9, "-= → +="), (9, "/ → *"),
              (9, "drop stop_gradient"), (10, "max → min"), (10, "is → is not"), (10, "any → all"),
              (10, "in → not in"), (10, "0 → 1"), (10, "1 → 2")}
  assert expected <= got, expected - got
  # docstrings and the command-line block are never mutated
  assert all(m.line not in (1, 6, 13, 14) for m in mutants)


def test_mutants_change_one_token_and_keep_the_rest(mutants):
  lines = SRC.splitlines()
  for m in mutants:
    new = _apply(m).splitlines()
    assert len(new) == len(lines)
    diff = [i for i, (a, b) in enumerate(zip(lines, new)) if a != b]
    assert diff == [m.line - 1], (m, diff)
    ast.parse(_apply(m))                       # still valid Python
  by_desc = {m.description: _apply(m).splitlines()[m.line - 1] for m in mutants}
  assert by_desc["drop stop_gradient"] == "    z -= (y) / n"
  assert by_desc["drop unary -"] == "  z = x + y * 2  # σ comment"       # byte offsets survive non-ASCII text
  assert by_desc["-= → +="] == "    z += jax.lax.stop_gradient(y) / n"
  assert by_desc["is → is not"] == "  return max(z, 0) if n is not None else any([z in (1,)])"


def test_tests_are_found_by_import():
  assert "tests/test_generate.py" in mutate.tests_for("lostjax/generate.py")
  assert "tests/test_metrics_robustness.py" in mutate.tests_for("lostjax/metrics/robustness.py")
  assert "tests/test_data_pipeline.py" in mutate.tests_for("train/data/pipeline.py")
  assert mutate.tests_for("losses/pld.py") == ["tests/test_loss_pld.py"]     # by name: it imports `losses` only


def test_run_counts_outcomes_and_restores_the_file(tmp_path, monkeypatch):
  """End to end on a tiny project: one mutant a test kills, one it cannot see; the file comes back unchanged."""
  (tmp_path / "pkg").mkdir()
  (tmp_path / "tests").mkdir()
  src = "def add(a, b):\n  return a + b\n\n\ndef flag():\n  return True\n"
  (tmp_path / "pkg" / "__init__.py").write_text("")
  (tmp_path / "pkg" / "m.py").write_text(src)
  (tmp_path / "tests" / "test_m.py").write_text("from pkg import m\n\n\ndef test_add():\n  assert m.add(2, 3) == 5\n")
  monkeypatch.setattr(mutate, "ROOT", tmp_path)
  assert mutate.tests_for("pkg/m.py") == ["tests/test_m.py"]
  out = tmp_path / "out.json"
  mutate.main(["pkg/m.py", "--json", str(out)])
  import json
  rec = json.loads(out.read_text())
  assert (tmp_path / "pkg" / "m.py").read_text() == src
  by = {r["mutation"]: r for r in rec["mutants"]}
  assert set(by) == {"+ → -", "True → False"}
  assert by["+ → -"]["outcome"] == "killed" and by["+ → -"]["code"] == "return a + b"
  assert by["True → False"]["outcome"] == "survived" and by["True → False"]["line"] == 6
  s = rec["summary"]["pkg/m.py"]
  assert (s["mutants"], s["killed"], s["survived"], s["timeout"], s["survival"]) == (2, 1, 1, 0, 0.5)


def test_rerun_runs_only_the_survivors(tmp_path, monkeypatch):
  """--rerun takes an earlier --json output (or its printed lines) and runs again only the survivors it lists."""
  import json
  (tmp_path / "pkg").mkdir()
  (tmp_path / "tests").mkdir()
  src = "def add(a, b):\n  return a + b\n\n\ndef flag():\n  return True\n"
  (tmp_path / "pkg" / "__init__.py").write_text("")
  (tmp_path / "pkg" / "m.py").write_text(src)
  (tmp_path / "tests" / "test_m.py").write_text(
      "from pkg import m\n\n\ndef test_add():\n  assert m.add(2, 3) == 5\n\n\n"
      "def test_flag():\n  assert m.flag() is True\n")                 # the test added after the first run
  monkeypatch.setattr(mutate, "ROOT", tmp_path)
  earlier = [{"file": "pkg/m.py", "line": 2, "col": 11, "mutation": "+ → -", "outcome": "killed",
              "code": "return a + b"},
             {"file": "pkg/m.py", "line": 6, "col": 9, "mutation": "True → False", "outcome": "survived",
              "code": "return True"}]
  first, second, log = tmp_path / "first.json", tmp_path / "second.json", tmp_path / "log"
  first.write_text(json.dumps({"summary": {}, "mutants": earlier}))
  mutate.main(["pkg/m.py", "--rerun", str(first), "--json", str(second)])
  rec = json.loads(second.read_text())
  assert [(r["mutation"], r["line"], r["col"], r["outcome"]) for r in rec["mutants"]] == [
      ("True → False", 6, 9, "killed")]
  assert (tmp_path / "pkg" / "m.py").read_text() == src
  log.write_text("not json\n" + "\n".join(json.dumps({k: v for k, v in r.items() if k != "col"}) for r in earlier))
  assert mutate.load_survivors(str(log)) == {("pkg/m.py", 6, None, "True → False", "return True")}
  with pytest.raises(SystemExit, match="no earlier run's output at --rerun .*missing.json"):
    mutate.main(["pkg/m.py", "--rerun", str(tmp_path / "missing.json")])
