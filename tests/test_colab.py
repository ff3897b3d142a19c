"""train/colab.py and the quickstart notebook's install cell, on CPU and without network: subprocess calls (git
clone, pip, the jax probe) are recorded and answered by fakes.

Paths: inside a checkout vs a clone of REPO_URL (unset: a clear stop); jax already installed (pinned in a pip
constraints file, accelerator checked afterwards) vs absent (plain install)."""

from __future__ import annotations

import json
import os
import subprocess
import types

import pytest

from train import colab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_GPU = {"jax": "0.10.2", "jaxlib": "0.10.2", "jax-cuda12-plugin": "0.10.2", "jax-cuda12-pjrt": "0.10.2"}


class FakeRun:
  """Records subprocess.run calls; pip succeeds (or fails) and the jax probe answers `probe`."""

  def __init__(self, probe="gpu", pip_fails=False):
    self.calls, self.constraints, self.probe, self.pip_fails = [], None, probe, pip_fails

  def __call__(self, cmd, **kw):
    self.calls.append(list(cmd))
    if cmd[1:3] == ["-m", "pip"]:
      if "-c" in cmd:
        with open(cmd[cmd.index("-c") + 1]) as f:
          self.constraints = f.read()
      if self.pip_fails:
        raise subprocess.CalledProcessError(1, cmd, "", "ERROR: ResolutionImpossible: jax>=0.10.2 vs jax==0.4.35")
      return types.SimpleNamespace(returncode=0, stdout="", stderr="")
    if cmd[1] == "-c" and cmd[2] == colab.PROBE:
      return types.SimpleNamespace(returncode=0, stdout=f"{self.probe}\n", stderr="")
    if cmd[:2] == ["git", "clone"]:
      dest = cmd[-1]
      os.makedirs(os.path.join(dest, "train"))
      open(os.path.join(dest, "train", "colab.py"), "w").close()
      return types.SimpleNamespace(returncode=0, stdout="", stderr="")
    raise AssertionError(f"unexpected command {cmd}")


@pytest.fixture
def fake(monkeypatch):
  run = FakeRun()
  monkeypatch.setattr(colab.subprocess, "run", run)
  return run


def _versions(monkeypatch, versions):
  monkeypatch.setattr(colab, "installed_version", lambda name: versions.get(name.lower()))


# ------------------------------------------------------------------------------------------- install


def test_requirements_and_missing(monkeypatch):
  reqs = colab.requirements(ROOT)
  assert any(r.startswith("jax>=") for r in reqs) and any(r.startswith("flax") for r in reqs)
  present = {r.split(">")[0].split("=")[0].split("<")[0].lower(): "99.0" for r in reqs}
  present.update(jax="0.10.2", flax="0.12.8")
  _versions(monkeypatch, present)
  assert colab.missing(ROOT) == []
  _versions(monkeypatch, {**present, "flax": "0.8.0", "optax": None})     # too old, absent
  assert [r.split(">")[0] for r in colab.missing(ROOT)] == ["flax", "optax"]


def test_nothing_missing_runs_nothing(fake, monkeypatch):
  monkeypatch.setattr(colab, "missing", lambda root: [])
  assert colab.install(ROOT, log=lambda s: None)["installed"] is False
  assert fake.calls == []


def test_jax_present_is_pinned_and_the_accelerator_checked(fake, monkeypatch):
  monkeypatch.setattr(colab, "missing", lambda root: ["optax>=0.2.8"])
  monkeypatch.setattr(colab, "jax_distributions", lambda: dict(JAX_GPU))
  monkeypatch.setitem(colab.sys.modules, "jax", types.SimpleNamespace(default_backend=lambda: "gpu"))
  out = colab.install(ROOT, log=lambda s: None)
  pip = [c for c in fake.calls if c[1:3] == ["-m", "pip"]]
  assert len(pip) == 1 and pip[0][3:7] == ["install", "-q", "-e", ROOT] and "-c" in pip[0]
  assert sorted(fake.constraints.splitlines()) == sorted(f"{k}=={v}" for k, v in JAX_GPU.items())
  assert not os.path.exists(pip[0][pip[0].index("-c") + 1])          # the constraints file is removed
  assert fake.calls[-1][1:3] == ["-c", colab.PROBE]                  # a fresh interpreter after pip
  assert out == {"installed": True, "pinned": JAX_GPU, "backend_before": "gpu", "backend_after": "gpu"}


def test_lost_accelerator_stops(fake, monkeypatch):
  fake.probe = "cpu"
  monkeypatch.setattr(colab, "missing", lambda root: ["optax>=0.2.8"])
  monkeypatch.setattr(colab, "jax_distributions", lambda: dict(JAX_GPU))
  monkeypatch.setitem(colab.sys.modules, "jax", types.SimpleNamespace(default_backend=lambda: "gpu"))
  with pytest.raises(RuntimeError, match="jax saw the gpu before the install and sees 'cpu' now"):
    colab.install(ROOT, log=lambda s: None)


def test_jax_too_old_is_one_message(monkeypatch):
  run = FakeRun(pip_fails=True)
  monkeypatch.setattr(colab.subprocess, "run", run)
  monkeypatch.setattr(colab, "missing", lambda root: ["jax>=0.10.2,<0.13"])
  monkeypatch.setattr(colab, "jax_distributions", lambda: {"jax": "0.4.35", "jaxlib": "0.4.35"})
  monkeypatch.delitem(colab.sys.modules, "jax", raising=False)
  with pytest.raises(RuntimeError, match=r"next to this runtime's jax 0\.4\.35 \(lostjax needs jax>=0\.10\.2,<0\.13\)"):
    colab.install(ROOT, log=lambda s: None)


def test_jax_absent_plain_install(fake, monkeypatch):
  monkeypatch.setattr(colab, "missing", lambda root: ["jax>=0.10.2,<0.13", "flax>=0.12.8,<0.13"])
  monkeypatch.setattr(colab, "jax_distributions", lambda: {})
  out = colab.install(ROOT, log=lambda s: None)
  assert fake.calls == [colab.pip_command(ROOT, None)] and "-c" not in fake.calls[0]
  assert out["installed"] and out["pinned"] == {}


def test_backend_probe(monkeypatch):
  monkeypatch.delitem(colab.sys.modules, "jax", raising=False)
  monkeypatch.setattr(colab.subprocess, "run", FakeRun(probe="tpu"))
  assert colab.backend() == "tpu"
  monkeypatch.setattr(colab.subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=1, stdout=""))
  assert colab.backend(fresh=True) == "none"


def test_jax_distributions_finds_this_jax():
  d = colab.jax_distributions()
  assert d["jax"] == colab.installed_version("jax") and "jaxlib" in d
  assert not any(k in ("jaxtyping", "flax") for k in d)


# ------------------------------------------------------------------------------------------- notebook cell


def _notebook_root_fn(run):
  with open(os.path.join(ROOT, "notebooks", "quickstart.ipynb")) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  src = next("".join(c["source"]) for c in cells if "def lostjax_root" in "".join(c["source"]))
  ns = {"os": os, "subprocess": types.SimpleNamespace(run=run)}
  exec(src.split("\nROOT = ")[0], ns)    # the function only; the test does not install anything
  assert "colab.install(ROOT)" in src and "YOUR_ORG" not in src
  return ns["lostjax_root"]


def test_notebook_inside_a_checkout(fake, monkeypatch):
  monkeypatch.chdir(os.path.join(ROOT, "notebooks"))
  assert _notebook_root_fn(fake)("") == ROOT and fake.calls == []


def test_notebook_clones_the_url_or_stops(fake, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  root_fn = _notebook_root_fn(fake)
  with pytest.raises(RuntimeError, match="not inside a lostjax checkout: set REPO_URL"):
    root_fn("")
  assert fake.calls == []
  url = "https://example.invalid/lostjax.git"
  assert root_fn(url) == str(tmp_path / "lostjax_repo")
  assert fake.calls == [["git", "clone", "-q", url, "lostjax_repo"]]
  assert root_fn(url) == str(tmp_path / "lostjax_repo") and len(fake.calls) == 1   # reused, not cloned again
