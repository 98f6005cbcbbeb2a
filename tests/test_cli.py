"""End-to-end runs of the `lusd-jax` command with the tiny random model, and every error path.

The edits run in-process (`cli.main`) so that they share compiled programs; one test runs the
installed entry point in a subprocess to check the exit code and that no traceback leaks.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lusd_jax import cli, examples

FAST = ["--model", "tiny-random", "--size", "64", "--num-steps", "3", "--quiet"]


def _run(capsys, argv):
  code = cli.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def _cat_png(path, mode="RGB"):
  img = Image.fromarray((examples.get_example("cat").image() * 255).astype(np.uint8))
  img.convert(mode).save(path)
  return str(path)


def test_edit_example_writes_images_grid_snapshots_and_record(capsys, tmp_path):
  out_dir = tmp_path / "cat"
  code, out, err = _run(
    capsys,
    ["edit", "--example", "cat", *FAST, "--seeds", "0", "1", "--save-step", "2", "--out", str(out_dir)],
  )
  assert code == 0, err
  assert "random weights" in err
  assert "edit words: party, hat -> tokens [5, 6]" in out
  for name in (
    "edit_seed0.png",
    "edit_seed1.png",
    "grid.png",
    "snapshots_seed0.png",
    "snapshots_seed1.png",
    "run.json",
  ):
    assert (out_dir / name).stat().st_size > 0, name
  assert Image.open(out_dir / "edit_seed0.png").size == (64, 64)
  grid = Image.open(out_dir / "grid.png")
  assert grid.width >= 4 * 64  # input | seed 0 | seed 1 | mask
  record = json.loads((out_dir / "run.json").read_text())
  assert record["seeds"] == [0, 1]
  assert record["source_prompt"] == "a cat" and record["target_prompt"] == "a cat wearing a party hat"
  assert record["edit_tokens"]["positions"] == [5, 6]
  assert len(record["rejections_per_step"]) == 2 and len(record["rejections_per_step"][0]) == 3
  assert all(50 <= t < 950 for t in record["timestep_per_step"][0])
  assert record["config"]["num_steps"] == 3 and record["random_weights"] is True
  # Two seeds, two different edits.
  a = np.asarray(Image.open(out_dir / "edit_seed0.png"), np.float32)
  b = np.asarray(Image.open(out_dir / "edit_seed1.png"), np.float32)
  assert np.abs(a - b).max() > 0


def test_edit_image_file_with_official_preset_and_overrides(capsys, tmp_path):
  image = _cat_png(tmp_path / "cat.png", "RGBA")
  out_dir = tmp_path / "out"
  argv = ["edit", image, "--source", "a cat", "--target", "a cat wearing a party hat", *FAST]
  argv += ["--seeds", "0", "1", "--preset", "official", "--reg-scale", "0.05", "--out", str(out_dir)]
  code, out, err = _run(capsys, argv)
  assert code == 0, err
  record = json.loads((out_dir / "run.json").read_text())
  assert record["config"]["reg_scale"] == 0.05
  assert record["config"]["redraw_t_on_reject"] is True
  assert record["edit_tokens"]["positions"] == [5, 6]  # last sub-token of "party", "hat": one each


def _write_batch(tmp_path):
  d = tmp_path / "in"
  (d / "images").mkdir(parents=True)
  _cat_png(d / "images" / "cat.png")
  (d / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  rows = [
    ("cat.png", "a cat", "a cat wearing a party hat"),
    ("broken.png", "a cat", "a dog"),
    ("missing.png", "a cat", "a dog"),
    ("cat.png", "", "thunder"),
  ]
  with open(d / "index.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["img_path", "source_prompt", "target_prompt"])
    w.writerows(rows)
  return d


@pytest.mark.slow
def test_batch_reports_bad_rows_goes_on_and_resumes(capsys, tmp_path):
  in_dir, out_dir = _write_batch(tmp_path), tmp_path / "out"
  argv = ["batch", "--input-dir", str(in_dir), "--output-dir", str(out_dir), *FAST, "--seeds", "0", "1"]
  code, out, err = _run(capsys, argv)
  assert code == 1  # some rows failed
  for name in (
    "000_seed0.png",
    "000_seed1.png",
    "003_seed0.png",
    "003_seed1.png",
    "000_grid.png",
    "000_run.json",
  ):
    assert (out_dir / name).is_file(), name
  assert not list(out_dir.glob("001_*")) and not list(out_dir.glob("002_*"))
  assert "broken.png" in err and "missing.png" in err
  assert "2 edited, 0 already done, 2 failed" in out
  assert "row 001" in out and "row 002" in out

  # Resume: a rerun skips finished rows; a lost output is redone, and only that one.
  kept = (out_dir / "000_seed0.png").stat().st_mtime_ns
  (out_dir / "003_seed1.png").unlink()
  code, out, _ = _run(capsys, argv)
  assert code == 1
  assert "1 edited, 1 already done, 2 failed" in out
  assert (out_dir / "003_seed1.png").is_file()
  assert (out_dir / "000_seed0.png").stat().st_mtime_ns == kept

  # All good rows only: exit code 0.
  with open(in_dir / "index.csv", "w", newline="") as f:
    f.write("img_path,source_prompt,target_prompt\ncat.png,a cat,a cat wearing a party hat\n")
  code, out, _ = _run(capsys, argv)
  assert code == 0 and "0 edited, 1 already done, 0 failed" in out


@pytest.mark.parametrize(
  "argv, message",
  [
    (["edit", "{tmp}/nope.png", "--target", "a dog"], "nope.png"),
    (["edit", "{tmp}/corrupt.png", "--target", "a dog"], "corrupt.png"),
    (["edit", "--example", "cat", "--size", "100"], "--size"),
    (["edit", "--example", "cat", "--model", "{tmp}/no_model"], "no_model"),
    (["edit", "--example", "cat", "--target", "a cat"], "nothing to edit"),
    (["edit", "--example", "cat", "--t-min", "900", "--t-max", "100"], "--t-max"),
    (["edit", "--example", "cat", "--lr", "-1"], "--lr"),
    (["edit", "--example", "dog"], "cat, coffee"),
    (["edit", "--example", "cat", "--seeds", "1", "1"], "--seeds"),
    (["edit", "--example", "cat", "--edit-words", "unicorn"], "unicorn"),
    (["batch", "--input-dir", "{tmp}/no_dir", "--output-dir", "{tmp}/o"], "no_dir"),
    (["edit", "--example", "cat", "--num-steps", "abc"], "--num-steps"),
    (["edit", "--example", "cat", "--devices", "64"], "--devices: 64 asked"),
    (["sweep", "--example", "cat", "--grid", "lr=1", "--method", "sdedit"], "--method"),
  ],
)
def test_errors_are_one_line_with_exit_code_2(capsys, tmp_path, argv, message):
  (tmp_path / "corrupt.png").write_bytes(b"garbage")
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  if "--model" not in argv:
    argv += ["--model", "tiny-random"]
  try:
    code, out, err = _run(capsys, argv + ["--quiet"])
  except SystemExit as e:  # argparse usage errors exit through SystemExit
    code = e.code
    out, err = capsys.readouterr()
  assert code == 2
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], err
  assert "Traceback" not in err


def test_entry_point_exit_code_and_no_traceback(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "lusd_jax.cli", "edit", str(tmp_path / "missing.jpg"), "--target", "a dog"],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error:") and "missing.jpg" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_long_prompt_is_warned_and_truncated(capsys, tmp_path):
  target = "a cat wearing a party hat " + "with a long striped tail " * 16
  argv = ["edit", "--example", "cat", "--target", target, *FAST, "--seeds", "0", "1", "--out", str(tmp_path)]
  code, out, err = _run(capsys, argv)
  assert code == 0, err
  warning = [line for line in out.splitlines() if line.startswith("warning: the target prompt has")]
  assert len(warning) == 1 and "the rest is cut" in warning[0]
  assert int(warning[0].split()[5]) > 77
  assert json.loads((tmp_path / "run.json").read_text())["edit_tokens"]["positions"] == [5, 6]


def test_diverging_run_is_one_error_line_and_a_batch_goes_on(capsys, tmp_path):
  # lr 1e37 overflows the latent at step 0 (lr is traced: the programs of the tests above serve).
  argv = [
    "edit",
    "--example",
    "cat",
    *FAST,
    "--seeds",
    "0",
    "1",
    "--lr",
    "1e37",
    "--out",
    str(tmp_path / "e"),
  ]
  code, _, err = _run(capsys, argv)
  assert code == 1 and "Traceback" not in err
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "non-finite" in lines[0] and "step 0" in lines[0], err

  in_dir, out_dir = _write_batch(tmp_path), tmp_path / "out"
  argv = ["batch", "--input-dir", str(in_dir), "--output-dir", str(out_dir), *FAST, "--seeds", "0", "1"]
  code, out, err = _run(capsys, [*argv, "--lr", "1e37"])
  assert code == 1 and "Traceback" not in err
  assert "0 edited, 0 already done, 4 failed" in out
  assert "[row 0] failed: non-finite" in err and "[row 3] failed: non-finite" in err
  assert not list(out_dir.glob("*.png"))
