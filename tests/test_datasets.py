"""`convert_magicbrush` / `lusd-jax convert-magicbrush` on a small MagicBrush-shaped folder built here."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from lusd_jax import batchdir, cli, datasets, evaluation, io

N = 64  # image side (a multiple of 64, as `io.load_mask` wants)
HOLE = (slice(10, 30), slice(20, 40))  # session 100 turn 1: the transparent region (DALL-E 2 style)
RECT = (slice(40, 60), slice(5, 25))  # session 100 turn 2: the white region on black
GLOBAL = {
  "100": {
    "100-input.png": "A red ball on green grass.",
    "100-output1.png": "A blue ball on green grass.",
    "100-output2.png": "A blue ball and a dog on green grass.",
  },
  "200": {"200-input.png": "A cup on a table.", "200-output1.png": "A cup on a table, in snow."},
}
LOCAL = {"100": {"100-output1.png": "blue ball", "100-output2.png": "dog on grass"}}


def _photo(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (N, N, 3), dtype=np.uint8)


def make_magicbrush(root) -> str:
  """A MagicBrush-shaped test split: session 100 with two turns, session 200 with one."""
  src = root / "magicbrush"
  for image_id, names in (("100", ["input", "output1", "output2"]), ("200", ["input", "output1"])):
    (src / "images" / image_id).mkdir(parents=True)
    for i, name in enumerate(names):
      Image.fromarray(_photo(int(image_id) + i)).save(src / "images" / image_id / f"{image_id}-{name}.png")
  # Turn 1: the input with a transparent hole (DALL-E 2's editor: transparent = edit).
  rgba = np.dstack([_photo(100), np.full((N, N), 255, np.uint8)])
  rgba[HOLE + (3,)] = 0
  Image.fromarray(rgba, "RGBA").save(src / "images/100/100-mask1.png")
  # Turn 2: a white region on black, RGB, at twice the image's resolution (MagicBrush's masks may be
  # of another size than their images: resized to the image, then binarized).
  rgb = np.zeros((N, N, 3), np.uint8)
  rgb[RECT] = 255
  Image.fromarray(rgb.repeat(2, 0).repeat(2, 1)).save(src / "images/100/100-mask2.png")
  # Session 200: an all-white mask (the whole image: a global edit).
  Image.fromarray(np.full((N, N, 3), 255, np.uint8)).save(src / "images/200/200-mask1.png")
  sessions = {
    "100": [
      dict(
        input="100-input.png",
        mask="100-mask1.png",
        output="100-output1.png",
        instruction="Make the ball blue.",
      ),
      dict(input="100-output1.png", mask="100-mask2.png", output="100-output2.png", instruction="Add a dog"),
    ],
    "200": [
      dict(input="200-input.png", mask="200-mask1.png", output="200-output1.png", instruction="Let it snow")
    ],
  }
  for name, obj in (("edit_sessions.json", sessions), ("global_descriptions.json", GLOBAL)):
    (src / name).write_text(json.dumps(obj), encoding="utf-8")
  (src / "local_descriptions.json").write_text(json.dumps(LOCAL), encoding="utf-8")
  return str(src)


def _rows(out) -> list[dict]:
  with open(os.path.join(out, "index.csv"), encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


def test_convert_magicbrush_writes_one_row_per_turn(tmp_path):
  src, out = make_magicbrush(tmp_path), tmp_path / "data"
  summary = datasets.convert_magicbrush(src, out)
  assert (summary.rows, summary.sessions, summary.masks, summary.global_masks) == (3, 2, 2, 1)
  rows = _rows(out)
  assert [r["img_path"] for r in rows] == ["100/100-input.png", "100/100-output1.png", "200/200-input.png"]
  assert [r["gt_path"] for r in rows] == ["100/100-output1.png", "100/100-output2.png", "200/200-output1.png"]
  assert [r["mask_path"] for r in rows] == ["masks/100-mask1.png", "masks/100-mask2.png", ""]
  # Turn 2 edits turn 1's ground truth: its prompts describe that image and the next one.
  assert rows[1]["source_prompt"] == rows[1]["global_source_prompt"] == "A blue ball on green grass."
  assert (
    rows[1]["target_prompt"] == rows[1]["global_target_prompt"] == "A blue ball and a dog on green grass."
  )
  assert [r["local_prompt"] for r in rows] == ["blue ball", "dog on grass", ""]
  assert [r["idx"] for r in rows] == ["100-input", "100-output1", "200-input"]
  assert (
    rows[0]["instruction"] == "Make the ball blue." and rows[0]["edit_words"] == rows[0]["edit_type"] == ""
  )
  # The images are the source files; the masks are white = edit, as `io.load_mask` reads them.
  for rel in ("100/100-input.png", "100/100-output2.png"):
    assert (out / "images" / rel).read_bytes() == (tmp_path / "magicbrush/images" / rel).read_bytes()
  want = np.zeros((N, N), np.float32)
  want[HOLE] = 1
  np.testing.assert_array_equal(io.load_mask(out / "masks/100-mask1.png", N, (N, N)), want)
  # The 2x mask resized to the image: the rectangle, up to its one-pixel border (bilinear filtering).
  got = io.load_mask(out / "masks/100-mask2.png", N, (N, N))
  rows, cols = RECT
  assert got[rows.start + 1 : rows.stop - 1, cols.start + 1 : cols.stop - 1].all()
  outside = np.ones((N, N), bool)
  outside[rows.start - 1 : rows.stop + 1, cols.start - 1 : cols.stop + 1] = False
  assert not got[outside].any()
  # Both readers accept the folder: `lusd-jax batch`'s and `lusd-jax eval`'s.
  batch_rows = batchdir.read_index(out)
  assert all(r.problem is None and os.path.isfile(r.img_path) for r in batch_rows)
  assert batch_rows[0].mask_path == out / "masks/100-mask1.png" and batch_rows[2].mask_path is None
  examples = evaluation.load_dataset(out)
  assert examples[1].gt_path == str(out / "images/100/100-output2.png")
  assert examples[2].local_prompt == examples[2].target_prompt  # no local description: the target


def test_first_turns_and_lusd_prompts(tmp_path):
  src, out = make_magicbrush(tmp_path), tmp_path / "data"
  prompts = tmp_path / "reformat.csv"
  prompts.write_text(
    "idx,source_prompt,target_prompt,category\n100-input.png,a red ball,a blue ball,change\n"
  )
  summary = datasets.convert_magicbrush(src, out, turns="first", prompts_csv=prompts)
  rows = _rows(out)
  assert summary.prompts_replaced == 1 and [r["idx"] for r in rows] == ["100-input", "200-input"]
  assert (rows[0]["source_prompt"], rows[0]["target_prompt"], rows[0]["category"]) == (
    "a red ball",
    "a blue ball",
    "change",
  )
  assert rows[0]["global_target_prompt"] == "A blue ball on green grass."  # the evaluation's, unchanged
  assert rows[1]["source_prompt"] == "A cup on a table." and rows[1]["category"] == ""
  assert not (out / "images/100/100-output2.png").exists()  # only what the first turns use


def test_bad_inputs_stop_with_one_line_naming_the_input(tmp_path, capsys):
  src = make_magicbrush(tmp_path)
  os.remove(os.path.join(src, "images/100/100-output2.png"))
  with pytest.raises(io.InputError, match="100-output2.png not found"):
    datasets.convert_magicbrush(src, tmp_path / "a")
  assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))  # nothing written
  assert datasets.convert_magicbrush(src, tmp_path / "b", turns="first").rows == 2  # turn 2 not needed
  with pytest.raises(io.InputError, match="exists and is not an empty folder"):
    datasets.convert_magicbrush(src, tmp_path / "b", turns="first")
  os.remove(os.path.join(src, "global_descriptions.json"))
  with pytest.raises(io.InputError, match="global_descriptions.json not found"):
    datasets.convert_magicbrush(src, tmp_path / "c")
  # The command line: one `error:` line, exit 2; and a success line.
  assert cli.main(["convert-magicbrush", str(tmp_path / "none"), str(tmp_path / "d")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: SRC: ") and err.count("\n") == 1
  src2 = make_magicbrush(tmp_path / "again")
  assert cli.main(["convert-magicbrush", src2, str(tmp_path / "e"), "--turns", "first"]) == 0
  assert "2 edit turns of 2 sessions, 1 with a mask" in capsys.readouterr().out
