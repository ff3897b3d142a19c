"""The notebooks in notebooks/: stored without outputs, and (slow) executed top to bottom on CPU in smoke mode
(`LOSTJAX_NOTEBOOK_SMOKE=1`: a 2-step tiny run in a temporary directory) with nbclient."""

from __future__ import annotations

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_notebooks_exist_and_have_no_outputs():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert {"quickstart.ipynb", "analysis.ipynb"} <= set(names)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, (path, cell.source[:60])
    assert any("LOSTJAX_NOTEBOOK_SMOKE" in c.source for c in nb.cells if c.cell_type == "code"), path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart.ipynb", "analysis.ipynb"])
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  monkeypatch.setenv("LOSTJAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("LOSTJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("LOSTJAX_NOTEBOOK_RUNS", str(tmp_path / "none*"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}})
  client.execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  if name == "quickstart.ipynb":
    assert "def " in text and "-" * 40 in text
  else:
    assert "RankMe per layer" in text and "alpha=" in text and "|I_q ∩ I_k ∩ I_v|" in text
