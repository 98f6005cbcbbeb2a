"""`lusd-jax edit --method unifyedit`: masks and flags checked before the weights load; an edit's files.

The end-to-end runs use T = 3 at 128 px with DDIM inversion and the color preset's layers, like the
other UnifyEdit end-to-end tests, so that they share compiled programs (persistent cache).
"""

import json

import numpy as np
import pytest
from PIL import Image

from lusd_jax import cli, loading

W, H = 200, 160  # the photo (and its mask), not square: the mask is cropped like the photo


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
  mask = np.zeros((H, W), np.uint8)
  mask[40:120, 60:150] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "empty.png")
  Image.fromarray(np.full((H, W), 255, np.uint8)).save(tmp_path / "full.png")
  Image.fromarray(mask[:100]).save(tmp_path / "small.png")
  edge = np.zeros((H, W), np.uint8)
  edge[:, :15] = 255  # only in the margin that the center crop cuts away
  Image.fromarray(edge).save(tmp_path / "edge.png")
  # An inversion record of 3 steps (`lusd-jax invert --steps 3` layout; the shapes do not matter here).
  np.savez(
    tmp_path / "inv3.npz", trajectory=np.zeros((4, 1, 16, 16, 4)), null_embeddings=np.zeros((3, 77, 32))
  )
  return tmp_path


def argv(files, *extra, method="unifyedit"):
  return [
    "edit", str(files / "photo.png"), "--source", "a cat", "--target", "a dog", "--method", method,
    "--model", "tiny-random", "--size", "128", "--out", str(files / "out"), "--quiet", *extra,
  ]  # fmt: skip


@pytest.mark.parametrize(
  "extra, method, words",
  [
    (["--mask", "{f}/small.png"], "unifyedit", ["--mask", "small.png", "200x160"]),
    (["--mask", "{f}/empty.png"], "unifyedit", ["--mask", "empty"]),
    (["--mask", "{f}/edge.png"], "unifyedit", ["--mask", "empty"]),
    (["--mask", "{f}/full.png"], "unifyedit", ["--mask", "global edit"]),
    (["--mask", "{f}/nope.png"], "unifyedit", ["--mask", "nope.png"]),
    (["--mask", "{f}/mask.png"], "lusd", ["--mask", "--method unifyedit"]),
    (["--edit-type", "color"], "lusd", ["--edit-type", "--method unifyedit"]),
    (["--beta1", "2"], "lusd", ["--beta1", "unifyedit"]),
    (["--reg-scale", "0.1"], "unifyedit", ["--reg-scale", "lusd"]),
    (["--preset", "official"], "unifyedit", ["--preset", "--edit-type"]),
    (["--seeds", "0", "1"], "unifyedit", ["--seeds", "one seed"]),
    (["--k1", "-1"], "unifyedit", ["--k1", ">= 0"]),
    (["--gradient", "sbp"], "unifyedit", ["--gradient", "blc"]),
    (["--sa-resolutions", "x"], "unifyedit", ["--sa-resolutions"]),
    (["--edit-words", "unicorn"], "unifyedit", ["--edit-words", "unicorn"]),
    (["--save-step", "2"], "unifyedit", ["--save-step"]),
    (["--reuse-inversion", "{f}/nope.npz"], "unifyedit", ["--reuse-inversion", "nope.npz"]),
    (["--reuse-inversion", "{f}/photo.png"], "unifyedit", ["--reuse-inversion", "cannot read"]),
    (
      ["--reuse-inversion", "{f}/inv3.npz", "--num-steps", "5"],
      "unifyedit",
      ["--reuse-inversion", "3 inversion steps", "--num-steps 5"],
    ),
  ],
)
def test_bad_inputs_stop_before_loading(files, extra, method, words, capsys, monkeypatch):
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
  extra = [a.replace("{f}", str(files)) for a in extra]
  try:
    code = cli.main(argv(files, *extra, method=method))
  except SystemExit as e:  # argparse's own usage errors
    code = e.code
  err = capsys.readouterr().err
  assert code == 2, err
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, err
  for word in words:
    assert word in lines[0], lines[0]
  assert "Traceback" not in err


def test_sweep_over_guidance_under_null_text_inversion_stops_before_loading(files, capsys, monkeypatch):
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
  common = [
    "sweep", str(files / "photo.png"), "--source", "a cat", "--target", "a dog", "--method", "unifyedit",
    "--model", "tiny-random", "--size", "128", "--out", str(files / "sweep"), "--quiet",
    "--grid", "guidance=5,7.5",
  ]  # fmt: skip
  assert cli.main([*common, "--set", "inversion=nti"]) == 2
  err = capsys.readouterr().err
  assert [line for line in err.splitlines() if line.startswith("error:")] == [
    "error: --grid guidance: null-text inversion is optimized for one guidance; sweep it with "
    "--inversion ddim, or run one sweep per guidance"
  ]


@pytest.mark.slow
@pytest.mark.xdist_group("unifyedit-programs")  # one worker: each compiled program is reused from the cache
def test_edit_writes_grid_scheduler_plot_and_record(files, capsys):
  steps = ["--num-steps", "3", "--tau1", "1", "--tau2", "2", "--inversion", "ddim"]
  assert cli.main(argv(files, "--mask", str(files / "mask.png"), "--edit-type", "color", *steps)) == 0
  out = files / "out"
  for name in ("edit.png", "reconstruction.png", "grid.png", "scheduler.png", "run.json"):
    assert (out / name).stat().st_size > 0, name
  record = json.loads((out / "run.json").read_text())
  assert record["method"] == "unifyedit" and record["config"]["k1"] == 0.05  # the color preset
  per_step = record["per_step"]
  assert len(per_step["lambda1"]) == 3
  # Windows: L_SAP acts for t >= 2 (steps t = 3, 2), L_CAA for t >= 1 (every step).
  assert per_step["lambda1"][0] == 0.0 and per_step["lambda1"][1] > 0 and per_step["lambda1"][2] == 0.0
  assert all(v > 0 for v in per_step["lambda2"])
  assert 0.2 < record["mask"]["fraction"] < 0.5
  grid = np.asarray(Image.open(out / "grid.png"))
  assert grid.shape[1] > 4 * 128  # input | reconstruction | edit | mask


@pytest.mark.slow
@pytest.mark.xdist_group("unifyedit-programs")  # one worker: each compiled program is reused from the cache
def test_batch_reads_mask_path_and_edit_type_and_resumes(files, capsys):
  images = files / "in" / "images"
  images.mkdir(parents=True)
  for name in ("photo.png", "mask.png", "empty.png"):
    (images / name).write_bytes((files / name).read_bytes())
  (files / "in" / "index.csv").write_text(
    "img_path,source_prompt,target_prompt,mask_path,edit_type\n"
    "photo.png,a cat,a dog,mask.png,color\n"
    "photo.png,a cat,a painting of a cat,,color\n"  # a global edit: no mask
    "photo.png,a cat,a dog,empty.png,color\n"  # fails before the model loads
    "photo.png,a cat,a dog,mask.png,sculpture\n"  # not an edit type
  )
  out = files / "bout"
  cmd = [
    "batch", "--input-dir", str(files / "in"), "--output-dir", str(out), "--method", "unifyedit",
    "--model", "tiny-random", "--size", "128", "--num-steps", "3", "--tau1", "1", "--tau2", "2",
    "--inversion", "ddim", "--quiet",
  ]  # fmt: skip
  assert cli.main(cmd) == 1
  captured = capsys.readouterr()
  assert "batch: 2 edited, 0 already done, 2 failed (of 4 rows)" in captured.out
  assert "[row 2] failed: mask_path" in captured.err and "empty" in captured.err
  assert "[row 3] failed: edit_type 'sculpture'" in captured.err
  for r in (0, 1):
    for name in (
      f"{r:03d}_seed0.png",
      f"{r:03d}_reconstruction.png",
      f"{r:03d}_grid.png",
      f"{r:03d}_scheduler.png",
    ):
      assert (out / name).stat().st_size > 0, name
  rec0, rec1 = (json.loads((out / f"{r:03d}_run.json").read_text()) for r in (0, 1))
  assert rec0["mask"]["fraction"] > 0 and rec1["mask"] is None
  assert rec0["config"]["k1"] == 0.05 and rec0["config"]["tau1"] == 1  # the color preset, --tau1 over it
  # A rerun skips the finished rows (and fails the bad ones again, before loading anything).
  assert cli.main(cmd) == 1
  assert "batch: 0 edited, 2 already done, 2 failed" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.xdist_group("unifyedit-programs")  # one worker: each compiled program is reused from the cache
def test_sweep_writes_cells_scheduler_plots_and_record(files, capsys):
  out = files / "sweep"
  cmd = [
    "sweep", str(files / "photo.png"), "--source", "a cat", "--target", "a dog", "--method", "unifyedit",
    "--mask", str(files / "mask.png"), "--grid", "beta1=2,5", "--grid", "k2=0.1,0.4", "--num-steps", "3",
    "--set", "tau1=1", "--set", "tau2=1", "--set", "inversion=ddim", "--model", "tiny-random",
    "--size", "128", "--out", str(out), "--quiet",
  ]  # fmt: skip
  assert cli.main(cmd) == 0
  assert (out / "sweep_grid.png").stat().st_size > 0
  for label in ("beta1=2_k2=0.1", "beta1=2_k2=0.4", "beta1=5_k2=0.1", "beta1=5_k2=0.4"):
    assert (out / f"{label}_seed0.png").stat().st_size > 0
    assert (out / f"{label}_scheduler.png").stat().st_size > 0
  record = json.loads((out / "sweep.json").read_text())
  assert record["grid"] == {"beta1": [2.0, 5.0], "k2": [0.1, 0.4]}
  lambda2 = [cell["per_step"]["lambda2"] for cell in record["cells"]]
  # lambda2 = beta2 exp(-k2 (T - t)): the first step is beta2 = 5 in every cell, later steps follow k2.
  assert all(row[0] == pytest.approx(5.0) for row in lambda2)
  assert lambda2[0][1] == pytest.approx(5 * np.exp(-0.1), rel=1e-5)
  assert lambda2[1][1] == pytest.approx(5 * np.exp(-0.4), rel=1e-5)
