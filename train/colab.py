"""Setting up lostjax inside a notebook runtime (Colab, a Jupyter server) without replacing its accelerator jax.

The quickstart notebook's first cell finds the checkout the notebook runs in (or clones the repository URL the
user sets in REPO_URL, and stops with a message when it is unset), puts it on `sys.path` and calls `install(root)`,
which
  1. reads the requirements of `setup.cfg` and installs only when one is missing or too old;
  2. pins every jax distribution already installed (jax, jaxlib, the CUDA/TPU plugins, libtpu) in a pip
     constraints file, so pip installs lostjax's other requirements around the runtime's jax instead of replacing
     a CUDA or TPU build with the CPU wheel; if that jax is too old for lostjax, pip's conflict becomes one message
     saying which jax is installed and what lostjax needs;
  3. checks that a fresh interpreter still sees the accelerator (`jax.default_backend()`) it saw before.
Standard library only: it runs before anything else of lostjax can be imported.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

JAX_DISTS = re.compile(r"^(jax|jaxlib|jax[-_].*|libtpu.*)$")   # jax, jaxlib, jax-cuda12-plugin, jax-cuda12-pjrt, libtpu
PROBE = "import jax; print(jax.default_backend())"


# ------------------------------------------------------------------------------------------- requirements


def installed_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def jax_distributions() -> dict[str, str]:
  """{name: version} of the installed jax distributions (jax, jaxlib, plugins, libtpu)."""
  out = {}
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if JAX_DISTS.match(name):
      out[name] = dist.version
  return out


def requirements(root: str) -> list[str]:
  """install_requires of the checkout's setup.cfg."""
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(root, "setup.cfg"))
  raw = cfg.get("options", "install_requires", fallback="")
  return [ln.strip() for ln in raw.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _satisfied(req: str, version: str | None) -> bool:
  if version is None:
    return False
  try:
    from packaging.requirements import Requirement
  except ImportError:   # no packaging: presence only
    return True
  return Requirement(req).specifier.contains(version, prereleases=True)


def missing(root: str) -> list[str]:
  """The requirements that are not installed or whose installed version does not satisfy them."""
  out = []
  for req in requirements(root):
    name = re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0]
    if not _satisfied(req, installed_version(name)):
      out.append(req)
  return out


def backend(fresh: bool = False) -> str:
  """The platform jax uses (`jax.default_backend()`): in this process if jax is loaded (and not `fresh`), else in a
  fresh interpreter (which sees what pip just installed); 'none' when jax does not start."""
  if "jax" in sys.modules and not fresh:
    return sys.modules["jax"].default_backend()
  r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
  return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else "none"


def pip_command(root: str, constraints: str | None) -> list[str]:
  cmd = [sys.executable, "-m", "pip", "install", "-q", "-e", root]
  return cmd + ["-c", constraints] if constraints else cmd


def install(root: str, log=print) -> dict:
  """Installs what the checkout needs and keeps the runtime's jax; returns what it did."""
  todo = missing(root)
  pinned = jax_distributions()
  if not todo:
    log(f"lostjax at {root}: requirements present, nothing to install")
    return {"installed": False, "pinned": pinned}
  before = backend() if pinned else "none"
  constraints = None
  if pinned:
    fd, constraints = tempfile.mkstemp(prefix="lostjax_keep_jax_", suffix=".txt")
    with os.fdopen(fd, "w") as f:
      f.write("".join(f"{k}=={v}\n" for k, v in sorted(pinned.items())))
  log(f"installing {', '.join(todo)}" + (f" (keeping {', '.join(f'{k} {v}' for k, v in sorted(pinned.items()))})"
                                         if pinned else ""))
  try:
    subprocess.run(pip_command(root, constraints), check=True, capture_output=True, text=True)
  except subprocess.CalledProcessError as e:
    tail = " ".join((e.stderr or e.stdout or "").strip().splitlines()[-3:])
    need = next((r for r in requirements(root) if r.startswith("jax")), "jax")
    if pinned:
      raise RuntimeError(f"pip could not install lostjax next to this runtime's jax {pinned.get('jax', '?')} "
                         f"(lostjax needs {need}); upgrade the accelerator jax first (GPU: pip install -U "
                         f"\"jax[cuda12]\", TPU: pip install -U \"jax[tpu]\"), then rerun this cell. pip: {tail}") from e
    raise RuntimeError(f"pip install -e {root} failed: {tail}") from e
  finally:
    if constraints:
      os.remove(constraints)
  after = backend(fresh=True) if pinned else "none"
  if before in ("gpu", "tpu") and after != before:
    raise RuntimeError(f"jax saw the {before} before the install and sees {after!r} now: the runtime's "
                       f"accelerator jax was replaced; restart the runtime and reinstall it (e.g. pip install -U "
                       f"\"jax[cuda12]\" or \"jax[tpu]\")")
  log(f"installed; jax {installed_version('jax')} on {after}")
  return {"installed": True, "pinned": pinned, "backend_before": before, "backend_after": after}
