"""`lusd-jax invert`: bad inputs stop before the weights load; an inversion writes its grid and records."""

import json

import numpy as np
import pytest

from lusd_jax import cli, loading

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
  text = capsys.readouterr().out
  assert "DDIM inversion: 3 steps" in text and "null-text inversion" in text
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
