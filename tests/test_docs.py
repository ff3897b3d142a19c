"""The front-door documents stay short, their relative links resolve, and the repository speaks of the project only.

README.md is the front door (at most 250 lines) and BENCHMARKS.md a dashboard (at most 400 lines); the detail lives
in docs/. Every relative Markdown link in README.md, BENCHMARKS.md, RESULTS.md and docs/ must name an existing file
or folder. The text files of the repository must not narrate how the work was organised (issue numbers, sessions,
waves of work, engineers, follow-ups).
"""
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FORBIDDEN = [
    r"\bissues? ?#?\d",                      # issue 7, issue #12
    r"(?<![\w&/])#\d{1,4}\b",                # #12
    r"\bsessions?\b",
    r"\bwaves? ?-?\d",                       # wave 2, wave-2
    r"\bengineers?\b",
    r"\bfollow-?ups?\b",
    r"\brounds? of work\b",
]
# The same words in other senses: a third-party tool's own "session" (cosmic-ray's session database, an HTTP or
# TensorFlow Session object).
ALLOWED_LINE = re.compile(r"cosmic-ray|requests\.Session|\bSession\(|tf\.(compat\.v1\.)?Session")
TEXT_SUFFIXES = {".md", ".py", ".ipynb", ".cfg", ".sh", ".toml", ".sbatch", ".txt", ".yaml", ".yml"}
SKIP_DIRS = {".git", "runs", "hf", "__pycache__", "node_modules", "build", "dist"}


def _doc_files():
  files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RESULTS.md"]
  return files + sorted((ROOT / "docs").rglob("*.md"))


def _text_files():
  for dirpath, dirnames, filenames in os.walk(ROOT):
    dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")]
    for name in filenames:
      path = pathlib.Path(dirpath) / name
      if path.suffix in TEXT_SUFFIXES and path != pathlib.Path(__file__).resolve():
        yield path


def _lines(path):
  return path.read_text(encoding="utf-8").count("\n")


@pytest.mark.parametrize("name, limit", [("README.md", 250), ("BENCHMARKS.md", 400)])
def test_front_documents_are_short(name, limit):
  n = _lines(ROOT / name)
  assert n <= limit, f"{name} has {n} lines (at most {limit}); move the detail into docs/"


def test_relative_links_resolve():
  broken = []
  for path in _doc_files():
    for target in LINK.findall(path.read_text(encoding="utf-8")):
      if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        continue   # http(s):, mailto:, in-page anchors
      rel = target.split("#", 1)[0]
      if rel and not (path.parent / rel).exists():
        broken.append(f"{path.relative_to(ROOT)}: {target}")
  assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_links_checker_catches_a_broken_link(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("[ok](page.md) [bad](missing.md) [web](https://example.org) [anchor](#x)\n")
  targets = [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
  assert [t for t in targets if not (tmp_path / t).exists()] == ["missing.md"]


def test_no_words_about_how_the_work_was_organised():
  pattern = re.compile("|".join(FORBIDDEN), re.IGNORECASE)
  hits = []
  for path in _text_files():
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
      m = pattern.search(line)
      if m and not ALLOWED_LINE.search(line):
        hits.append(f"{path.relative_to(ROOT)}:{i}: {m.group(0)!r} in {line.strip()[:100]}")
  assert not hits, "organisational words (write about the project only):\n" + "\n".join(hits)


@pytest.mark.parametrize("text", ["fixed in issue 14", "see #12", "second session", "wave-2 losses", "a follow-up"])
def test_forbidden_patterns_match(text):
  assert re.search("|".join(FORBIDDEN), text, re.IGNORECASE)


@pytest.mark.parametrize("text", ["each benign node issues one query", "colour #1f77b4", "round 1 has one bucket",
                                  "requests are issued", "arXiv 2508.02668, §3"])
def test_forbidden_patterns_spare_ordinary_words(text):
  assert not re.search("|".join(FORBIDDEN), text, re.IGNORECASE)


def test_allowed_senses_are_narrow():
  assert ALLOWED_LINE.search("cosmic-ray needs a session database")
  assert not ALLOWED_LINE.search("measured in the second session")


def test_readme_first_screen_has_the_ci_command():
  """`.ci/run` runs the README's test command; it must stay verbatim in the README's first screen."""
  command = 'python3 -m pip install -e ".[test,oracles]" && python3 -m pytest -n 2 tests'
  first_screen = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:40]
  assert command in first_screen
  assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
