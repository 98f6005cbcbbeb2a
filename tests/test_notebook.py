"""Executes the notebooks (notebooks/*.ipynb) top to bottom with the tiny random model."""

import base64
import io
import math
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

# Runs a Jupyter kernel and whole notebooks: the fast tier (-m "not slow") skips it.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _run_notebook(name, monkeypatch, tmp_path):
  """Executes notebooks/<name> in `tmp_path`; returns the outputs of its code cells."""
  # The kernel runs in tmp_path, where `import lusd_jax` would find whichever checkout is installed
  # (editable): put this one first.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_quickstart_notebook_runs_and_shows_pictures(monkeypatch, tmp_path):
  monkeypatch.setenv("LUSD_JAX_MODEL", "tiny-random")
  monkeypatch.setenv("LUSD_JAX_STEPS", "4")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  outputs = _run_notebook("quickstart.ipynb", monkeypatch, tmp_path)
  assert not [o for o in outputs if o.output_type == "error"]
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) == 3  # the input, the grid, the snapshot strip
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "rejections per seed" in text and "edit words: party, hat" in text


def test_unifyedit_notebook_runs_and_shows_pictures(monkeypatch, tmp_path):
  monkeypatch.setenv("LUSD_JAX_MODEL", "tiny-random")
  # T = 3 at 128 px with DDIM inversion and no progress bars (all steps in one call): the notebook's one
  # denoising program (its 2 x 2 sweep, which holds the preset's edit) is then test_unifyedit_batch's
  # sweep program, which the persistent compilation cache may already hold.
  monkeypatch.setenv("LUSD_JAX_UNIFY_STEPS", "3")
  monkeypatch.setenv("LUSD_JAX_PROGRESS", "0")
  monkeypatch.setenv("LUSD_JAX_UNIFY_INVERSION", "ddim")
  monkeypatch.setenv("LUSD_JAX_SIZE", "128")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  outputs = _run_notebook("unifyedit.ipynb", monkeypatch, tmp_path)
  assert not [o for o in outputs if o.output_type == "error"]
  pngs = [
    Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"])))
    for o in outputs
    if "image/png" in o.get("data", {})
  ]
  assert len(pngs) == 4  # photo and mask, the edit's grid, the scheduler plot, the sweep grid
  # `visual.grid` is gap + sum(W + gap) wide (gap 8): 3 tiles of 128 px, then 4 (input |
  # reconstruction | UnifyEdit | mask), so the notebook ran at LUSD_JAX_SIZE and showed every tile.
  assert pngs[0].width == 8 + 3 * (128 + 8) and pngs[1].width == 8 + 4 * (128 + 8)
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert f"lusd_jax from {ROOT}" in text  # this checkout's package, not an installed one
  for line in (
    "size 128",
    "UnifyEdit timings",
    "R_l at the first step",
    "sweep of 4 configs",
  ):
    assert line in text
  # R_l (inside over outside mean attention) positive and finite: the mask covers cells of the 4 x 4
  # cross-attention maps, and not all of them.
  ratio_lines = [line for line in text.splitlines() if line.startswith("R_l at the")]
  assert len(ratio_lines) == 2
  ratios = [float(v) for line in ratio_lines for v in line.split(":")[-1].split()]
  assert len(ratios) == 6 and all(math.isfinite(r) and r > 0 for r in ratios)  # 3 layers at latent/4


def test_compare_notebook_runs_both_methods_and_both_protocols(monkeypatch, tmp_path):
  monkeypatch.setenv("LUSD_JAX_MODEL", "tiny-random")
  monkeypatch.setenv("LUSD_JAX_STEPS", "2")
  monkeypatch.setenv(
    "LUSD_JAX_UNIFY_STEPS", "3"
  )  # T = 3 at 128 px, DDIM inversion: the other UnifyEdit tests'
  monkeypatch.setenv("LUSD_JAX_UNIFY_INVERSION", "ddim")
  monkeypatch.setenv("LUSD_JAX_SIZE", "128")
  monkeypatch.setenv("LUSD_JAX_BENCH_ROWS", "6")  # one edit of each type
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  outputs = _run_notebook("compare.ipynb", monkeypatch, tmp_path)
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert f"lusd_jax from {ROOT}" in text
  assert "6 edits: background, color, face, object, style, texture" in text
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) == 1 + 4 + 2  # the benchmark, 4 side-by-side rows, the scatter and the success rate
  tables = "".join(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
  runs = ("LUSD", "UnifyEdit", "UnifyEdit k=0.3")
  for name in runs:
    assert f"| {name} |" in tables, tables
  for edit_type in ("color", "texture", "object", "background", "style", "face"):
    assert f"| {edit_type} |" in tables, tables
  # Every run wrote one image per row (LUSD: per seed), and the report embeds both pictures.
  for name, per_row in (("LUSD", 2), ("UnifyEdit", 1), ("UnifyEdit_k=0.3", 1)):
    assert len(list((tmp_path / "runs" / name).glob("*_seed*.png"))) == 6 * per_row, name
  report = (tmp_path / "runs" / "eval" / "report.md").read_text()
  assert "fidelity_editability.png" in report and "success_rate.png" in report
