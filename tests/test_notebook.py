"""Executes notebooks/quickstart.ipynb top to bottom with the tiny random model."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

# Runs a Jupyter kernel and the whole quickstart: the fast tier (-m "not slow") skips it.
pytestmark = pytest.mark.slow

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_shows_pictures(monkeypatch, tmp_path):
  monkeypatch.setenv("LUSD_JAX_MODEL", "tiny-random")
  monkeypatch.setenv("LUSD_JAX_STEPS", "4")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) == 3  # the input, the grid, the snapshot strip
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "rejections per seed" in text and "edit words: party, hat" in text
