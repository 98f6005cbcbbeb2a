"""`lusd-jax invert`: bad inputs stop before the weights load; an inversion writes its grid and records."""

import json
import re

import numpy as np
import pytest

from lusd_jax import cli, engine, inversion, io, loading, reconstruction

BASE = ["invert", "--example", "cat", "--model", "tiny-random", "--size", "64"]


@pytest.mark.parametrize(
  "extra, words",
  [
    (["--steps", "0"], ["--steps", "[1, 1000]"]),
    (["--steps", "2000"], ["--steps"]),
    (["--guidance", "-1"], ["--guidance", ">= 0"]),
    (["--inner-steps", "0"], ["--inner-steps"]),
    (["--out", "{file}"], ["--out", "is a file"]),
    (["{file}"], ["either IMAGE or --example"]),
    (["--size", "100"], ["--size"]),
  ],
)
def test_bad_inputs_stop_before_loading(extra, words, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
  (tmp_path / "file").write_text("x")
  extra = [a.replace("{file}", str(tmp_path / "file")) for a in extra]
  assert cli.main([*BASE, "--out", str(tmp_path / "o"), *extra]) == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, err
  for word in words:
    assert word in lines[0], lines[0]


@pytest.mark.slow
def test_invert_writes_grid_and_records(tmp_path, capsys):
  out = tmp_path / "inv"
  assert cli.main([*BASE, "--steps", "3", "--inner-steps", "2", "--out", str(out)]) == 0
  captured = capsys.readouterr()
  text = captured.out
  assert "DDIM inversion: 3 steps" in text and "null-text inversion" in text
  # A progress bar per phase on stderr, each finished; null-text inversion's shows its mean Adam steps.
  for phase in ("DDIM inversion", "null-text inversion", "reconstruction"):
    assert re.search(rf"{phase}: 100%.*3/3", captured.err), captured.err
  assert re.search(r"null-text inversion: 100%.*inner_steps=[12]\.\d", captured.err), captured.err
  for name in ("grid.png", "reconstruction.png", "inversion.npz", "inversion.json"):
    assert (out / name).stat().st_size > 0, name
  rec = np.load(out / "inversion.npz")
  assert rec["trajectory"].shape == (4, 8, 8, 4) and rec["null_embeddings"].shape[:2] == (3, 77)
  np.testing.assert_array_equal(rec["z_T"], rec["trajectory"][-1])
  assert rec["timesteps"].tolist() == [667, 334, 1]  # leading spacing, steps_offset 1
  assert ((rec["inner_steps"] >= 1) & (rec["inner_steps"] <= 2)).all()
  record = json.loads((out / "inversion.json").read_text())
  assert record["null_text"] and record["steps"] == 3 and record["random_weights"]
  assert np.isfinite(record["latent_mse"]) and np.isfinite(record["psnr_db"])
  # The null embeddings moved away from the "" embedding: the optimization ran.
  assert np.abs(rec["null_embeddings"][0] - rec["null_embeddings"][-1]).max() > 0


def test_quiet_turns_the_progress_bars_off(tmp_path, monkeypatch):
  seen = []

  def fake_invert(*_args, progress, **_kw):
    seen.append(progress)
    raise io.InputError("stop here")  # the inversion itself is the slow test's

  monkeypatch.setattr(reconstruction, "invert", fake_invert)
  for extra in ([], ["--quiet"]):
    assert cli.main([*BASE, "--out", str(tmp_path / f"o{len(extra)}"), *extra]) == 2
  assert seen == [True, False]


def test_phase_progress_counts_steps_and_averages_only_real_steps(capsys):
  """Chunks of 2 over N = 5: the last chunk's padding step (past N) moves neither the bar nor the mean."""

  def stats(*counts):  # one element's stats for a chunk
    k = len(counts)
    return inversion.NullTextStats(np.array([counts]), np.zeros((1, k), np.float32), np.ones((1, k), bool))

  with engine.progress(5, "null-text inversion", postfix=reconstruction._mean_inner_steps()) as cb:
    cb(2, None, stats(3, 1))
    cb(4, None, stats(3, 3))
    cb(5, None, stats(2, 99))  # 99: the padding step's stats, dropped
  err = capsys.readouterr().err
  assert re.search(r"null-text inversion: 100%.*5/5.*inner_steps=2\.4", err), err  # (3+1+3+3+2)/5
  with engine.progress(5, "off", enabled=False) as cb:
    assert cb is None
  assert "off" not in capsys.readouterr().err
