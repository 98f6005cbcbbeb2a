"""Evaluation metrics against hand-computed values, the dataset / results layouts, and run_eval end to end."""

import argparse
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from skimage import data

from lusd_jax import cli, loading
from lusd_jax import evaluation as ev
from lusd_jax.evaluation import dataset
from lusd_jax.io import InputError
from lusd_jax.models import clip as clip_lib

H = 0.01  # threshold step


# ----------------------------------------------------------------------------- metric math


def test_clip_t_and_clip_r_on_synthetic_embeddings():
  edited = np.array([[3.0, 4.0], [1.0, 0.0]])
  source = np.array([[4.0, 3.0], [1.0, 0.0]])
  target_text = np.array([[1.0, 0.0], [2.0, 5.0]])
  local_text = np.array([[0.0, 1.0], [0.0, 1.0]])
  np.testing.assert_allclose(ev.clip_t(edited, local_text), [0.8, 0.0], atol=1e-12)
  # cos(edited, y_tgt) / cos(source, y_tgt) = 0.6 / 0.8; the second edit did nothing -> exactly 1.
  np.testing.assert_allclose(ev.clip_r(edited, source, target_text), [0.75, 1.0], atol=1e-12)
  assert ev.clip_r(edited, source, target_text)[1] == 1.0


def test_thresholds():
  assert len(ev.SUCCESS_THRESHOLDS) == 41 and len(ev.BACKGROUND_THRESHOLDS) == 23
  assert ev.SUCCESS_THRESHOLDS[0] == 1.0
  np.testing.assert_allclose(ev.SUCCESS_THRESHOLDS[[10, 40]], [1.1, 1.4], atol=1e-12)
  np.testing.assert_allclose(ev.BACKGROUND_THRESHOLDS[-1], 1.22, atol=1e-12)


def clip_auc(clip_r_N):
  """CLIP-AUC as `summarize` computes it: Simpson's integral of s(k) over k = 1.00 .. 1.40."""
  return ev.simpson(ev.success_rate(clip_r_N), ev.SUCCESS_THRESHOLDS)


def test_success_rate_and_clip_auc_by_hand():
  clip_r = [1.005, 1.105, 1.295, math.nan]  # the NaN is a missing image: a failure
  s = ev.success_rate(clip_r)
  expected = np.array([0.75] + [0.5] * 10 + [0.25] * 19 + [0.0] * 11)
  np.testing.assert_allclose(s, expected, atol=1e-12)
  # Composite Simpson, h/3 * (1, 4, 2, 4, ..., 4, 1) weights: k=1.00 -> 1; k=1.01..1.10 -> 5*4 + 5*2 = 30;
  # k=1.11..1.29 -> 10*4 + 9*2 = 58; the rest are zeros.
  by_hand = H / 3 * (0.75 * 1 + 0.5 * 30 + 0.25 * 58)
  assert clip_auc(clip_r) == pytest.approx(by_hand, abs=1e-12)
  assert by_hand == pytest.approx(0.1008333333, abs=1e-9)
  # Every edit succeeding at every k: the area of a unit-height strip of width 0.4.
  assert clip_auc([2.0, 3.0]) == pytest.approx(0.4, abs=1e-12)


def test_doing_nothing_scores_zero():
  # Doing nothing: x = x_src, so CLIP-R = 1 for every edit, never strictly above any k >= 1.
  rng = np.random.default_rng(0)
  src = rng.standard_normal((6, 8))
  txt = rng.standard_normal((6, 8))
  cr = ev.clip_r(src, src, txt)
  assert np.all(cr == 1.0)
  np.testing.assert_array_equal(ev.success_rate(cr), np.zeros(41))
  assert clip_auc(cr) == 0.0
  # No successful edit: the background metrics are undefined, not a perfect 0 L1.
  assert math.isnan(ev.thresholded_auc(np.zeros(6), cr))
  assert np.all(np.isnan(ev.thresholded_means(np.zeros(6), cr)))


def test_l1_star_by_hand():
  clip_r = [1.005, 1.105, 1.295, math.nan, 1.5]
  l1 = [0.1, 0.2, 0.4, math.nan, math.nan]  # row 4 succeeded but has no ground truth: left out
  means = ev.thresholded_means(l1, clip_r)
  expected = np.array([0.7 / 3] + [0.3] * 10 + [0.4] * 12)
  np.testing.assert_allclose(means, expected, atol=1e-12)
  # 23 points: k=1.00 -> 1; k=1.01..1.10 -> 30; k=1.11..1.21 -> 6*4 + 5*2 = 34; k=1.22 -> 1.
  by_hand = H / 3 * (0.7 / 3 + 0.3 * 30 + 0.4 * 35)
  assert ev.thresholded_auc(l1, clip_r) == pytest.approx(by_hand, abs=1e-12)
  # A constant value c over [1, 1.22] integrates to 0.22 c (CLIP-I* of perfect edits is 0.22).
  assert ev.thresholded_auc([1.0, 1.0], [1.5, 2.0]) == pytest.approx(0.22, abs=1e-12)


def test_l1_distance_by_hand():
  edited = Image.new("RGB", (8, 8), (100, 150, 200))
  gt = Image.new("RGB", (16, 16), (0, 0, 0))  # the edited image is resized to 16 x 16 first
  assert ev.l1_distance(edited, gt) == pytest.approx(150 / 255, abs=1e-12)
  half = Image.new("RGB", (10, 4), (0, 0, 0))
  ImageDraw.Draw(half).rectangle([0, 0, 4, 3], fill=(255, 255, 255))
  assert ev.l1_distance(Image.new("RGB", (10, 4)), half) == pytest.approx(0.5, abs=1e-12)
  assert ev.l1_distance(gt, gt) == 0.0


def test_category_groups():
  assert [ev.category_group(c) for c in ["add", " Add ", "remove", "change", ""]] == [
    "add",
    "add",
    "other",
    "other",
    "",
  ]


def test_summarize_per_category():
  scores = [
    dict(category="add", clip_t=0.3, clip_r=1.5, l1=0.1, clip_i=0.9, missing=False),
    dict(category="add", clip_t=math.nan, clip_r=math.nan, l1=math.nan, clip_i=math.nan, missing=True),
    dict(category="remove", clip_t=0.2, clip_r=0.9, l1=0.3, clip_i=0.5, missing=False),
  ]
  rows, curves = ev.summarize(scores, "m")
  assert [(r["category"], r["n"], r["missing"]) for r in rows] == [
    ("all", 3, 1),
    ("add", 2, 1),
    ("other", 1, 0),
  ]
  by_cat = {r["category"]: r for r in rows}
  assert by_cat["all"]["CLIP-T"] == pytest.approx(0.25)  # mean over the images that exist
  assert by_cat["all"]["CLIP-AUC"] == pytest.approx(0.4 / 3)  # one of three edits succeeds at every k
  assert by_cat["add"]["CLIP-AUC"] == pytest.approx(0.2)  # one of two (the missing one failed)
  assert by_cat["other"]["CLIP-AUC"] == 0.0 and math.isnan(by_cat["other"]["L1*"])
  assert by_cat["all"]["L1*"] == pytest.approx(0.1 * 0.22) and by_cat["add"]["CLIP-I*"] == pytest.approx(
    0.9 * 0.22
  )
  np.testing.assert_allclose(curves["all"], np.full(41, 1 / 3))


# ----------------------------------------------------------------------------- UnifyEdit protocol math


def test_clip_score_by_hand():
  # 100 x cos: loveu-tgve's logits_per_image with OpenAI's logit scale (exp = 100); not clamped at 0.
  image = np.array([[3.0, 4.0], [1.0, 0.0], [1.0, 0.0]])
  text = np.array([[4.0, 3.0], [0.0, 2.0], [-5.0, 0.0]])
  np.testing.assert_allclose(ev.clip_score(image, text), [96.0, 0.0, -100.0], atol=1e-12)


def test_mask_box_and_crop_by_hand():
  mask = np.zeros((8, 10), np.uint8)  # H = 8, W = 10
  mask[2:5, 3:7] = 255  # rows 2..4, columns 3..6
  mask[6, 0] = 100  # below half gray: off
  box = ev.mask_box(mask / 255.0)
  np.testing.assert_allclose(box, (0.3, 0.25, 0.7, 0.625), atol=1e-12)
  assert ev.mask_box(mask > 127) == box  # a bool mask is the same mask
  assert ev.mask_box(np.zeros((8, 10))) is None
  # On a 20 x 16 image the box is exactly columns 6..13, rows 4..9.
  pixels = np.arange(16 * 20 * 3, dtype=np.uint8).reshape(16, 20, 3)
  crop = ev.crop_to_box(Image.fromarray(pixels), box)
  np.testing.assert_array_equal(np.asarray(crop), pixels[4:10, 6:14])
  # On 15 x 12 it falls between pixels: rounded outward (left 4.5 -> 4, right 10.5 -> 11; top 3, bottom 7.5 -> 8).
  assert ev.box_pixels(box, 15, 12) == (4, 3, 11, 8)
  assert ev.box_pixels((0.5, 0.5, 0.5, 0.5), 4, 4) == (2, 2, 3, 3)  # never empty
  assert ev.crop_to_box(Image.fromarray(pixels), None).size == (20, 16)  # global: whole


def test_local_and_global_edit_types():
  from lusd_jax.unifyedit.config import EDIT_TYPES

  assert sorted(ev.LOCAL_EDIT_TYPES + ev.GLOBAL_EDIT_TYPES) == sorted(EDIT_TYPES)
  assert set(ev.GLOBAL_EDIT_TYPES) == {"background", "style"}


# ----------------------------------------------------------------------------- layouts


def _write_index(folder, rows):
  with open(os.path.join(folder, "index.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def test_dataset_layout_and_errors(tmp_path):
  with pytest.raises(ev.DatasetError, match="index.csv"):
    ev.load_dataset(tmp_path)
  (tmp_path / "images").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
  _write_index(tmp_path, [dict(img_path="images/a.png", source_prompt="a cat")])
  with pytest.raises(ev.DatasetError, match="target_prompt"):
    ev.load_dataset(tmp_path)
  _write_index(tmp_path, [dict(img_path="images/b.png", target_prompt="a cat")])
  with pytest.raises(ev.DatasetError, match="row 0: img_path 'images/b.png'"):
    ev.load_dataset(tmp_path)
  # As `lusd-jax batch` reads it: `a.png` is images/a.png; a BOM and spaces in the header are fine.
  (tmp_path / "index.csv").write_text("\ufeffimg_path, target_prompt\na.png,a dog\n", encoding="utf-8")
  assert ev.load_dataset(tmp_path)[0].source_path == os.path.join(str(tmp_path), "images", "a.png")
  # Only the batch columns: descriptions fall back to target_prompt, no ground truth, no category.
  _write_index(
    tmp_path, [dict(img_path="images/a.png", source_prompt="a cat", target_prompt="a cat in a hat")]
  )
  (ex,) = ev.load_dataset(tmp_path)
  assert (ex.global_target_prompt, ex.local_prompt, ex.gt_path, ex.category) == ("a cat in a hat",) * 2 + (
    None,
    "",
  )
  assert ex.source_path == os.path.join(str(tmp_path), "images/a.png")
  # The batch's index.csv reader: its file errors, as DatasetErrors.
  (tmp_path / "index.csv").write_text("img_path,target_prompt\na.png,un caf\u00e9\n", encoding="latin-1")
  with pytest.raises(ev.DatasetError, match="not valid UTF-8"):
    ev.load_dataset(tmp_path)
  (tmp_path / "index.csv").write_text("")
  with pytest.raises(ev.DatasetError, match="is empty"):
    ev.load_dataset(tmp_path)


def test_result_selection(tmp_path):
  for name in ["000_seed1.png", "000_seed2.png", "002_seed1.png", "007_seed1.png", "notes.txt"]:
    Image.new("RGB", (4, 4)).save(tmp_path / name) if name.endswith(".png") else (tmp_path / name).write_text(
      ""
    )
  found = ev.scan_results(tmp_path)
  assert sorted(found) == [0, 2, 7]
  res, rule = ev.select_results(found, 3)  # default: the smallest seed present
  assert rule == "1" and [(r.row, r.seed, r.path is None) for r in res] == [
    (0, 1, False),
    (1, 1, True),
    (2, 1, False),
  ]
  res, _ = ev.select_results(found, 3, seed=2)
  assert [r.path is None for r in res] == [False, True, True]
  res, rule = ev.select_results(found, 3, seed="all")
  assert rule == "all" and [(r.row, r.seed) for r in res] == [(0, 1), (0, 2), (1, None), (2, 1)]
  with pytest.raises(ev.DatasetError, match="does not exist"):
    ev.scan_results(tmp_path / "nope")


# ----------------------------------------------------------------------------- end to end

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
CATEGORIES = ("add", "remove", "add", "change", "add")
# Local types (color, object, face) get a mask on the region `_edit` paints; row 2's is drawn at twice
# the photo's size (the protocol resizes a mask to its image). Style and background are scored whole.
EDIT_TYPES = ("color", "style", "object", "background", "face")
MASK_BOX = (20, 10, 45, 35)  # the masks' on-pixels on the 64 x 48 photos: columns 20..44, rows 10..34


def _edit(im: Image.Image, shift: int = 0) -> Image.Image:
  out = im.copy()
  ImageDraw.Draw(out).ellipse([20 + shift, 10, 44 + shift, 34], fill=(220, 30, 30))
  return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """A MagicBrush-style dataset of real photos with two results folders (nothing done / edited)."""
  root = tmp_path_factory.mktemp("bench")
  ds, nothing, edited = root / "dataset", root / "nothing", root / "edited"
  for d in (ds / "images", nothing, edited):
    d.mkdir(parents=True)
  rows = []
  for i, (name, cat) in enumerate(zip(PHOTOS, CATEGORIES, strict=True)):
    src = Image.fromarray(getattr(data, name)()).convert("RGB").resize((64, 48), Image.BICUBIC)
    src.save(ds / "images" / f"{name}.png")
    _edit(src).save(ds / "images" / f"{name}_gt.png")
    mask = ""
    if EDIT_TYPES[i] in ev.LOCAL_EDIT_TYPES:
      scale = 2 if i == 2 else 1
      m = Image.new("L", (64 * scale, 48 * scale), 0)
      ImageDraw.Draw(m).rectangle(
        [c * scale for c in MASK_BOX[:2]] + [(c * scale) - 1 for c in MASK_BOX[2:]], 255
      )
      m.save(ds / "images" / f"{name}_mask.png")
      mask = f"{name}_mask.png"
    rows.append(
      dict(
        img_path=f"images/{name}.png",
        source_prompt=f"a photo of a {name}",
        target_prompt=f"a photo of a {name} with a red ball",
        global_source_prompt=f"a photo of a {name}",
        global_target_prompt=f"a photo of a {name} with a red ball",
        local_prompt="a red ball",
        gt_path=f"images/{name}_gt.png",
        category=cat,
        mask_path=mask,
        edit_type=EDIT_TYPES[i],
      )
    )
    src.save(nothing / f"{i:03d}_seed0.png")
    if i != 2:  # one result missing
      _edit(src, shift=4).resize((128, 96)).save(edited / f"{i:03d}_seed0.png")
  (edited / "004_seed0.png").write_bytes(b"\x89PNG truncated")  # and one unreadable
  _write_index(ds, rows)
  return dict(dataset=str(ds), nothing=str(nothing), edited=str(edited), root=root)


@pytest.fixture(scope="module")
def tiny_clip():
  return clip_lib.tiny_random_clip(seed=0)


def _read_csv(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def test_run_eval_end_to_end(bench, tiny_clip, tmp_path):
  logs = []
  report = ev.run_eval(
    [bench["nothing"], bench["edited"]], bench["dataset"], tiny_clip, tmp_path / "out", log=logs.append
  )
  n = len(PHOTOS)
  # The missing and the unreadable image are reported, by name, once each.
  assert any("unreadable" in m and "004_seed0.png" in m for m in logs)
  assert any("1 of 5 result images missing" in m and "002_seed0.png" in m for m in logs)
  assert sum(m.count("004_seed0.png") for m in logs) == 1

  summary = _read_csv(report.files["summary_csv"])
  assert [(r["method"], r["category"]) for r in summary] == [
    (m, c) for m in ("nothing", "edited") for c in ("all", "add", "other")
  ]
  assert list(summary[0]) == ["method", "category", "n", "missing", "CLIP-T", "CLIP-AUC", "L1*", "CLIP-I*"]
  md = open(report.files["summary_md"], encoding="utf-8").read().strip().splitlines()
  assert len(md) == 2 + 6 and md[0].startswith("| method | category | n | missing | CLIP-T | CLIP-AUC")
  per_example = _read_csv(report.files["per_example"])
  assert len(per_example) == 2 * n

  by = {(r["method"], r["category"]): r for r in summary}
  assert (by["nothing", "all"]["n"], by["nothing", "all"]["missing"]) == ("5", "0")
  assert (by["edited", "all"]["n"], by["edited", "all"]["missing"]) == ("5", "2")
  assert (by["edited", "add"]["n"], by["edited", "add"]["missing"]) == ("3", "2")
  assert (by["edited", "other"]["n"], by["edited", "other"]["missing"]) == ("2", "0")

  # Doing nothing: CLIP-R = 1 (to float rounding of the same image embedded twice), no success above k = 1.
  nothing = [r for r in report.per_example if r["method"] == "nothing"]
  np.testing.assert_allclose([r["clip_r"] for r in nothing], 1.0, atol=1e-5)
  assert np.all(report.curves["nothing"][1:] == 0.0)

  # The missing edit is a failure: NaN scores, and in every denominator.
  edited = [r for r in report.per_example if r["method"] == "edited"]
  assert edited[2]["missing"] and math.isnan(edited[2]["clip_r"]) and edited[2]["result_path"] == ""
  cr = np.array([r["clip_r"] for r in edited])
  np.testing.assert_allclose(report.curves["edited"], ev.success_rate(cr))
  assert edited[4]["missing"] and math.isnan(edited[4]["clip_t"])
  assert report.curves["edited"].max() <= (n - 2) / n
  assert float(by["edited", "all"]["CLIP-AUC"]) == pytest.approx(clip_auc(cr))
  assert float(by["edited", "all"]["CLIP-T"]) == pytest.approx(np.nanmean([r["clip_t"] for r in edited]))

  # Per-example scores are the metric definitions applied to this CLIP's embeddings.
  ex0 = ev.load_dataset(bench["dataset"])[0]
  res0 = Image.open(edited[0]["result_path"]).convert("RGB")
  src0, gt0 = Image.open(ex0.source_path), Image.open(ex0.gt_path)
  x, x_src, x_gt = tiny_clip.embed_images([res0, src0, gt0])
  y_tgt, y_local = tiny_clip.embed_texts([ex0.global_target_prompt, ex0.local_prompt])
  assert edited[0]["clip_t"] == pytest.approx(ev.cosine_similarity(x[None], y_local[None])[0], abs=1e-5)
  assert edited[0]["clip_r"] == pytest.approx(ev.clip_r(x[None], x_src[None], y_tgt[None])[0], abs=1e-5)
  assert edited[0]["clip_i"] == pytest.approx(ev.cosine_similarity(x[None], x_gt[None])[0], abs=1e-5)
  assert edited[0]["l1"] == pytest.approx(ev.l1_distance(res0, gt0), abs=1e-12) and edited[0]["l1"] > 0

  curves = _read_csv(report.files["curves_csv"])
  assert len(curves) == 41 and list(curves[0]) == ["k", "nothing", "edited"]
  with Image.open(report.files["plot"]) as png:
    assert png.format == "PNG" and png.size[0] > 300


def test_eval_command(bench, tiny_clip, tmp_path, capsys):
  parser = cli.add_eval_arguments(argparse.ArgumentParser())
  out = tmp_path / "cmd"
  args = parser.parse_args(
    [
      "--results",
      bench["nothing"],
      "--results",
      bench["edited"],
      "--dataset",
      bench["dataset"],
      "--clip",
      "tiny-random",
    ]
    + ["--out", str(out), "--seed", "0", "--names", "Nothing", "Edited"]
  )
  assert args.results == [bench["nothing"], bench["edited"]] and args.seed == 0
  assert cli.eval_command(args) == 0
  printed = capsys.readouterr().out
  assert "| Nothing | all | 5 | 0 |" in printed and "| Edited | add | 3 | 2 |" in printed
  assert sorted(os.listdir(out)) == sorted(
    ["per_example.csv", "summary.csv", "summary.md", "success_rate.csv", "success_rate.png", "report.md"]
  )
  bad = parser.parse_args(
    ["--results", bench["edited"], "--dataset", str(tmp_path / "none"), "--clip", "tiny-random"]
  )
  assert cli.eval_command(bad) == 2
  assert "--dataset: folder" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    parser.parse_args(["--results", "x", "--dataset", "y", "--seed", "first"])


@pytest.mark.slow
@pytest.mark.xdist_group(
  "unifyedit-programs"
)  # UnifyEdit's T = 3, 128 px, color-preset programs: compiled once
def test_cli_batch_both_methods_then_eval(tmp_path, capsys):
  """`batch` with each method on one dataset folder, then `eval --protocol all` over both result folders.

  In-process (no interpreter start-ups). The dataset and the UnifyEdit command are those of
  test_unifyedit_cli's batch test (its two good rows: a masked and an unmasked color edit of a
  200 x 160 photo), so that the programs compiled there serve this run.
  """
  ds = tmp_path / "in"
  (ds / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray((rng.random((160, 200, 3)) * 255).astype(np.uint8)).save(ds / "images" / "photo.png")
  mask = np.zeros((160, 200), np.uint8)
  mask[40:120, 60:150] = 255
  Image.fromarray(mask).save(ds / "images" / "mask.png")
  (ds / "index.csv").write_text(
    "img_path,source_prompt,target_prompt,mask_path,edit_type\n"
    "photo.png,a cat,a dog,mask.png,color\n"
    "photo.png,a cat,a painting of a cat,,color\n"  # no mask: edited, and scored, whole
  )
  lusd, unify, out = tmp_path / "lusd", tmp_path / "unifyedit", tmp_path / "eval"
  batch = ["batch", "--input-dir", str(ds), "--model", "tiny-random", "--quiet", "--output-dir"]
  assert cli.main([*batch, str(lusd), "--num-steps", "2", "--size", "64"]) == 0
  unify_flags = ["--size", "128", "--num-steps", "3", "--tau1", "1", "--tau2", "2", "--inversion", "ddim"]
  assert cli.main([*batch, str(unify), "--method", "unifyedit", *unify_flags]) == 0
  capsys.readouterr()
  code, printed, err = _eval(
    ["--protocol", "all", "--results", str(lusd), str(unify), "--dataset", str(ds), "--out", str(out)]
    + ["--clip", "tiny-random", "--clip-l", "tiny-random", "--dino", "tiny-random"],
    capsys,
  )
  assert code == 0, err
  assert "1 rows of a local edit type have no mask_path and are scored whole: rows 1" in err
  summary = _read_csv(out / "unifyedit_summary.csv")
  assert [(r["method"], r["edit_type"], r["n"], r["failed"], r["cropped"]) for r in summary] == [
    (m, t, "2", "0", "1") for m in ("lusd", "unifyedit") for t in ("all", "color")
  ]
  assert all(float(r["DINO"]) > 0 and math.isfinite(float(r["CLIP-L"])) for r in summary)
  # The mask's box on the square the batch edited (columns 20..179 of the photo): 0.25 .. 0.8125 across,
  # 0.25 .. 0.75 down, on each method's output size.
  per = {(r["method"], r["row"]): r for r in _read_csv(out / "unifyedit_per_example.csv")}
  assert per["lusd", "0"]["box"] == "16,16,52,48" and per["unifyedit", "0"]["box"] == "32,32,104,96"
  assert per["lusd", "1"]["box"] == "" and per["lusd", "1"]["scope"] == "global"
  assert [r["method"] for r in _read_csv(out / "summary.csv")] == ["lusd", "unifyedit"]
  report = (out / "report.md").read_text(encoding="utf-8")
  assert "](fidelity_editability.png)" in report and "| unifyedit | color | 2 | 0 | 1 |" in report
  assert os.path.getsize(out / "fidelity_editability.png") > 0 and "| lusd | all | 2 | 0 |" in printed


# ----------------------------------------------------------------------------- the command line


@pytest.fixture
def clip_loads(monkeypatch, tiny_clip):
  """Records every CLIP load of `run_eval` (and still loads the tiny CLIP)."""
  calls = []

  def load(spec, **kw):
    calls.append(spec)
    return tiny_clip

  monkeypatch.setattr(loading, "load_clip", load)
  return calls


def _eval(argv, capsys):
  """`lusd-jax eval ARGV` -> (exit code, stdout, stderr)."""
  code = cli.main(["eval", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def _one_error_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


def test_eval_help_defines_the_metrics_and_flags(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["eval", "--help"])
  assert exit_.value.code == 0
  text = capsys.readouterr().out
  lines = text.splitlines()
  # One definition line each, kept as written (the default formatter would refill the paragraph).
  for metric, definition in [
    ("CLIP-T", "cos(CLIP(x), CLIP(local_prompt))"),
    ("CLIP-R", "cos(CLIP(x), CLIP(global_target_prompt)) / cos(CLIP(x_src)"),
    ("CLIP-AUC", "CLIP-R > k, k = 1.00 .. 1.40"),
    ("L1*", "k = 1.00 .. 1.22"),
    ("CLIP-I*", "the same for CLIP-I"),
    ("DINO", "structure distance between x_src and x (Splice)"),
    ("CLIP-L", "100 x cos(CLIP-L(x), CLIP-L(target_prompt))"),
    ("crops", "local edit types (color, texture, object, face) with a mask_path"),
    ("failed", "left out of the means"),
  ]:
    assert any(line.split()[:1] == [metric] and definition in line for line in lines), metric
  assert "add / other" in text and "lower-right is better" in text
  for name in ("summary.md", "summary.csv", "per_example.csv", "success_rate.csv", "success_rate.png"):
    assert name in text
  for name in ("report.md", "unifyedit_summary.md", "unifyedit_per_example.csv", "fidelity_editability.png"):
    assert name in text
  parser = cli.build_parser()
  (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  flags = [a for a in sub.choices["eval"]._actions if a.option_strings and a.dest != "help"]
  assert {a.dest for a in flags} == {
    "results", "dataset", "clip", "out", "seed", "names", "protocol", "clip_l", "dino"
  }  # fmt: skip
  for a in flags:
    assert a.help and ("(default" in a.help or "(required" in a.help), a.dest
    if a.default is not None:
      assert f"(default {a.default})" in a.help % {"default": a.default}


def test_eval_without_result_images_stops_before_clip(bench, tmp_path, clip_loads, capsys):
  empty = tmp_path / "out"
  empty.mkdir()
  (empty / "notes.txt").write_text("")
  code, out, err = _eval(
    ["--results", str(empty), "--dataset", bench["dataset"], "--out", str(tmp_path / "e")], capsys
  )
  line = _one_error_line(err)
  assert code == 2 and f"--results {empty}: no result images found" in line
  assert "000_seed*.png ... 004_seed*.png" in line and "--seed" in line
  # Images, but none with the asked seed: the message names --seed and the seeds present.
  code, out, err = _eval(
    ["--results", bench["nothing"], "--dataset", bench["dataset"], "--seed", "7"], capsys
  )
  line = _one_error_line(err)
  assert code == 2 and line.startswith("error: --seed 7:") and "000_seed7.png ... 004_seed7.png" in line
  assert "seeds present: 0" in line
  # Result images of another dataset (rows beyond index.csv's) are named as the likely cause.
  Image.new("RGB", (4, 4)).save(empty / "009_seed0.png")
  code, out, err = _eval(["--results", str(empty), "--dataset", bench["dataset"]], capsys)
  assert code == 2 and "beyond the 5 rows" in _one_error_line(err)
  assert clip_loads == [] and not (tmp_path / "e").exists()


def test_eval_reports_a_corrupt_image_once(bench, tmp_path, clip_loads, capsys):
  code, out, err = _eval(
    ["--results", bench["edited"], "--dataset", bench["dataset"], "--clip", "tiny-random"]
    + ["--out", str(tmp_path / "e")],
    capsys,
  )
  assert code == 0 and clip_loads == ["tiny-random"]
  corrupt = os.path.join(bench["edited"], "004_seed0.png")
  assert (out + err).count("004_seed0.png") == 1 and corrupt in err
  assert "| edited | all | 5 | 2 |" in out  # still a failed edit, with the missing one


def _cases(bench, tmp_path):
  ds, res = bench["dataset"], bench["nothing"]
  a_file = tmp_path / "file.txt"
  a_file.write_text("")
  no_index = tmp_path / "no_index"
  no_index.mkdir()
  return [
    (["--dataset", str(tmp_path / "none"), "--results", res], "--dataset: folder", "does not exist"),
    (["--dataset", str(a_file), "--results", res], "--dataset:", "is a file, not a folder"),
    (["--dataset", str(no_index), "--results", res], "--dataset:", "index.csv"),
    (["--dataset", ds, "--results", res, str(tmp_path / "none")], "--results: folder", "does not exist"),
    (["--dataset", ds, "--results", str(a_file)], "--results:", "is a file, not a folder"),
    (["--dataset", ds, "--results", res, "--out", str(a_file)], "--out:", "is a file, not a folder"),
    (["--dataset", ds, "--results", res, "--out", str(a_file / "sub")], "--out:", "is a file"),
    (["--dataset", ds, "--results", res, "--seed", "-1"], "--seed:", "outside [0, 2**32)"),
    (["--dataset", ds, "--results", res, "--seed", str(2**32)], "--seed:", "outside [0, 2**32)"),
    (["--dataset", ds, "--results", res, "--names", "a", "b"], "--names:", "2 names for 1"),
  ]


@pytest.mark.parametrize("case", range(10))
def test_eval_bad_inputs_stop_before_clip(case, bench, tmp_path, clip_loads, capsys):
  argv, flag, says = _cases(bench, tmp_path)[case]
  code, out, err = _eval(argv + ["--clip", "tiny-random"], capsys)
  line = _one_error_line(err)
  assert code == 2 and line.startswith(f"error: {flag}") and says in line, line
  assert clip_loads == [] and out == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_eval_unwritable_out_stops_before_clip(bench, tmp_path, clip_loads, capsys):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    code, out, err = _eval(
      ["--dataset", bench["dataset"], "--results", bench["nothing"], "--out", str(locked / "eval")], capsys
    )
  finally:
    locked.chmod(0o700)
  assert code == 2 and _one_error_line(err).startswith("error: --out: cannot write") and clip_loads == []


def test_eval_without_matplotlib_writes_the_tables(bench, tiny_clip, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
  logs = []
  report = ev.run_eval(bench["nothing"], bench["dataset"], tiny_clip, tmp_path / "out", log=logs.append)
  assert "plot" not in report.files and not (tmp_path / "out" / "success_rate.png").exists()
  assert os.path.isfile(report.files["summary_csv"]) and any("pip install matplotlib" in m for m in logs)


def test_matplotlib_is_a_dependency_and_imported_only_to_plot():
  # `pip install -e .` (no test extra) must be enough for `lusd-jax eval`.
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
  deps = [d.split(">")[0].split("=")[0].strip() for d in pyproject["project"]["dependencies"]]
  assert "matplotlib" in deps and "scipy" in deps
  probe = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys; from lusd_jax import cli; cli.build_parser(); print('matplotlib' in sys.modules)",
    ],
    capture_output=True,
    text=True,
  )
  assert probe.returncode == 0 and probe.stdout.strip() == "False", probe.stderr


# ----------------------------------------------------------------------------- the UnifyEdit protocol


def _dino_distances(pairs, dino) -> np.ndarray:
  """Structure distances of (source, result) pairs, each image resized to DINO's input here (PIL bilinear).

  Padded to the protocol's batch of 8, so that the program it compiled serves this check too.
  """
  size = dino.config.image_size
  arr = lambda im: np.asarray(im.resize((size, size), Image.BILINEAR), np.float32) / 255.0
  pad = lambda xs: np.stack(xs + xs[-1:] * (8 - len(xs)))
  src, res = pad([arr(a) for a, _ in pairs]), pad([arr(b) for _, b in pairs])
  return dino.structure_distance(src, res)[: len(pairs)]


def test_eval_protocol_all_end_to_end(bench, tmp_path, capsys):
  out = tmp_path / "all"
  code, printed, err = _eval(
    ["--protocol", "all", "--results", bench["nothing"], bench["edited"], "--dataset", bench["dataset"]]
    + ["--clip", "tiny-random", "--clip-l", "tiny-random", "--dino", "tiny-random", "--out", str(out)],
    capsys,
  )
  assert code == 0, err
  # The missing (row 2) and the unreadable (row 4) result are reported once each, before scoring.
  assert err.count("004_seed0.png") == 1 and err.count("002_seed0.png") == 1
  assert sorted(os.listdir(out)) == sorted(
    ["per_example.csv", "summary.csv", "summary.md", "success_rate.csv", "success_rate.png", "report.md"]
    + [
      "unifyedit_per_example.csv",
      "unifyedit_summary.csv",
      "unifyedit_summary.md",
      "fidelity_editability.png",
    ]
  )
  summary = _read_csv(out / "unifyedit_summary.csv")
  types = ["all", "color", "object", "background", "style", "face"]  # Unify-Bench's order
  assert [(r["method"], r["edit_type"]) for r in summary] == [
    (m, t) for m in ("nothing", "edited") for t in types
  ]
  assert list(summary[0]) == ["method", "edit_type", "n", "failed", "cropped", "DINO", "CLIP-L"]
  by = {(r["method"], r["edit_type"]): r for r in summary}
  assert [by["nothing", "all"][k] for k in ("n", "failed", "cropped")] == ["5", "0", "3"]
  assert [by["edited", "all"][k] for k in ("n", "failed", "cropped")] == ["5", "2", "1"]
  assert (by["edited", "object"]["failed"], by["edited", "object"]["DINO"]) == ("1", "nan")
  # Doing nothing keeps the structure exactly, cropped or not.
  assert all(abs(float(by["nothing", t]["DINO"])) < 1e-6 for t in types)
  assert "| edited | object | 1 | 1 | 0 | n/a | n/a |" in printed  # the table, also printed

  per = {(r["method"], int(r["row"])): r for r in _read_csv(out / "unifyedit_per_example.csv")}
  dino, clip_l = loading.load_dino("tiny-random"), loading.load_clip("tiny-random")
  ex = ev.load_dataset(bench["dataset"])
  # Row 0 (color, masked): both images cut to the mask's box; the result is 128 x 96, twice the photo.
  r0 = per["edited", 0]
  assert (r0["scope"], r0["box"], r0["failed"]) == ("local", "40,20,90,70", "False")
  src = Image.open(ex[0].source_path).convert("RGB").crop(MASK_BOX)
  res = Image.open(r0["result_path"]).convert("RGB").crop((40, 20, 90, 70))
  # Row 1 (style): global, whole images.
  r1 = per["edited", 1]
  assert (r1["scope"], r1["box"]) == ("global", "")
  whole = (Image.open(ex[1].source_path).convert("RGB"), Image.open(r1["result_path"]).convert("RGB"))
  d_crop, d_whole = _dino_distances([(src, res), whole], dino)
  assert float(r0["dino"]) == pytest.approx(d_crop, rel=1e-4, abs=1e-7)
  assert float(r1["dino"]) == pytest.approx(d_whole, rel=1e-4, abs=1e-7) and d_whole > 0
  # The CLIP score of the crop (batch shapes as the protocol's: 4 images, 8 prompts).
  x = clip_l.embed_images([res] * 4)[:1]
  y = clip_l.embed_texts([e.target_prompt for e in ex] + [""] * 3)[:1]
  assert float(r0["clip_l"]) == pytest.approx(100 * ev.cosine_similarity(x, y)[0], abs=1e-3)
  # Row 2's mask is drawn at twice the photo's size: resized to it, the same box.
  assert per["nothing", 2]["box"] == ",".join(map(str, MASK_BOX))
  assert per["edited", 2]["failed"] == "True" and per["edited", 4]["dino"] == "nan"
  assert float(by["edited", "all"]["DINO"]) == pytest.approx(
    np.mean([float(per["edited", r]["dino"]) for r in (0, 1, 3)]), rel=1e-6
  )

  report = (out / "report.md").read_text(encoding="utf-8")
  assert "Random weights" in report
  assert "](fidelity_editability.png)" in report and "](success_rate.png)" in report
  assert "| edited | all | 5 | 2 | 1 |" in report and "| edited | add | 3 | 2 |" in report  # both protocols
  assert "- edited: 2 (002_seed0.png, 004_seed0.png)" in report
  with Image.open(out / "fidelity_editability.png") as png:
    assert png.format == "PNG" and png.size[0] > 600


@pytest.fixture
def model_loads(monkeypatch):
  """Fails the test if any evaluation model (CLIP, CLIP-L, DINO) loads."""
  fail = lambda *a, **k: pytest.fail("a model was loaded")
  monkeypatch.setattr(loading, "load_clip", fail)
  monkeypatch.setattr(loading, "load_dino", fail)


def _unifyedit_cases(bench, tmp_path):
  a_file = tmp_path / "file.txt"
  a_file.write_text("")
  no_config = tmp_path / "no_config"
  no_config.mkdir()
  ds = bench["dataset"]
  images = os.path.join(ds, "images")

  def dataset(name, **row0):
    d = tmp_path / name
    d.mkdir()
    base = dict(img_path=f"{images}/astronaut.png", target_prompt="a red ball", mask_path="", edit_type="")
    _write_index(d, [dict(base, edit_type="style"), dict(base, **row0)])
    return str(d)

  Image.new("L", (64, 48), 40).save(tmp_path / "dark.png")
  return [
    (["--dataset", ds, "--dino", str(tmp_path / "none")], "--dino:", "no folder and no Hugging Face hub id"),
    (["--dataset", ds, "--clip-l", str(a_file)], "--clip-l:", "is a file"),
    (["--dataset", ds, "--dino", str(no_config)], "--dino:", "has no config.json"),
    (
      ["--dataset", dataset("types", edit_type="sculpture")],
      "--dataset: index.csv row 1",
      "edit_type 'sculpture'",
    ),
    (
      ["--dataset", dataset("nomask", edit_type="color", mask_path="gone.png")],
      "--dataset: index.csv row 1",
      "gone.png",
    ),
    (
      ["--dataset", dataset("dark", edit_type="face", mask_path=str(tmp_path / "dark.png"))],
      "--dataset: index.csv row 1",
      "no pixel above half gray",
    ),
  ]


@pytest.mark.parametrize("case", range(6))
def test_unifyedit_bad_inputs_stop_before_any_model(case, bench, tmp_path, model_loads, capsys):
  argv, flag, says = _unifyedit_cases(bench, tmp_path)[case]
  code, out, err = _eval(
    argv + ["--protocol", "all", "--results", bench["nothing"], "--out", str(tmp_path / "e")], capsys
  )
  line = _one_error_line(err)
  assert code == 2 and line.startswith(f"error: {flag}") and says in line, line
  assert out == "" and not (tmp_path / "e").exists()


def test_unknown_protocol_is_an_input_error(bench, tmp_path, model_loads, capsys):
  with pytest.raises(InputError, match="^--protocol: 'dino' is not one of magicbrush, unifyedit, all$"):
    ev.run_eval(bench["nothing"], bench["dataset"], out_dir=tmp_path / "e", protocol="dino")
  with pytest.raises(SystemExit) as exit_:
    cli.main(["eval", "--results", bench["nothing"], "--dataset", bench["dataset"], "--protocol", "dino"])
  assert exit_.value.code == 2 and "--protocol" in capsys.readouterr().err


def test_a_png_with_damaged_pixel_data_is_unreadable(tmp_path):
  """A PNG whose compressed pixels are damaged but whose chunk checksums are right (PIL's `verify`
  passes it) is a failed edit, not a crash when it is scored."""
  import io
  import struct
  import zlib

  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
  png, out, pos = buf.getvalue(), bytearray(), 8
  out += png[:8]
  while pos < len(png):
    (length,) = struct.unpack(">I", png[pos : pos + 4])
    kind, data = png[pos + 4 : pos + 8], bytearray(png[pos + 8 : pos + 8 + length])
    if kind == b"IDAT":
      data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)  # zero the second half of the stream
    out += struct.pack(">I", length) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    pos += 12 + length
  bad, good = tmp_path / "bad.png", tmp_path / "good.png"
  bad.write_bytes(bytes(out))
  good.write_bytes(png)
  with Image.open(bad) as im:
    im.verify()  # the checksums are right: verify cannot tell
  assert dataset.readable(str(good)) and not dataset.readable(str(bad))
