"""Evaluation of text-guided edits: CLIP-T, CLIP-R, CLIP-AUC, L1*, CLIP-I* (LUSD Sec. 4.2).

(Over 450 lines for now: the metric formulas, the dataset and result-folder readers and the report
live together until the UnifyEdit protocol (DINO structure distance) splits them into a package.)

Why these metrics: L1 / CLIP-I / DINO against a single ground truth reward doing nothing (LUSD
Sec. 9.3, Table 8), because an unedited image is close to most plausible edits. LUSD therefore
counts an edit as *successful* when it moves the image towards the target description, and
measures background preservation only over successful edits:

- CLIP-T   = cos(CLIP(x), CLIP(y_local))                         x: edited image
- CLIP-R   = cos(CLIP(x), CLIP(y_tgt)) / cos(CLIP(x_src), CLIP(y_tgt))  x_src: source image
- success rate s(k) = #{edits with CLIP-R > k} / #edits, k = 1.00, 1.01, ..., 1.40 (41 values);
  CLIP-AUC = integral of s(k) over k.
- L1*(CLIP-I*) = integral over k = 1.00 .. 1.22 (23 values) of the mean L1 (CLIP-I) over the edits
  with CLIP-R > k. L1 = mean |x - x_gt| of pixels in [0, 1], x resized to the ground truth's size
  (PIL bicubic); CLIP-I = cos(CLIP(x), CLIP(x_gt)).

Integrals use `scipy.integrate.simpson(y, x=k)`: with 41 and 23 equally spaced points (an even
number of intervals) this is exactly the composite Simpson 1/3 rule, h/3 (y0 + 4y1 + 2y2 + ... + yn).
A mean over an empty set (no edit with CLIP-R > k) is NaN, and so is the integral over it: a method
without successful edits has no L1* / CLIP-I*. Doing nothing gives CLIP-R = 1 for every edit, so
s(k) = 0 for every k (the comparison is strict) and CLIP-AUC = 0.

Dataset layout (mirrors MagicBrush's test split; the first three columns are `lusd-jax batch`'s
input, so one folder feeds both the editing and the evaluation):

  dataset/
    index.csv
    images/...

  A relative path in index.csv names `dataset/images/<path>` if that file exists, else
  `dataset/<path>` (the rule of `lusd-jax batch`, so `img_path` may be `cat.png` or `images/cat.png`).

  index.csv columns:
    img_path              source image x_src                                       (required)
    source_prompt         editing prompt for the source (used by `lusd-jax batch`)
    target_prompt         editing prompt for the target (used by `lusd-jax batch`)  (required)
    global_target_prompt  global description of the target image: y_tgt of CLIP-R
                          (empty or absent: target_prompt)
    global_source_prompt  global description of the source image (kept in the per-example CSV)
    local_prompt          local description of the edit: y_local of CLIP-T (empty or absent: target_prompt)
    gt_path               ground-truth edited image x_gt (empty or absent: no L1 / CLIP-I for that row)
    category              optional; "add" is reported as "add", any other value as "other"

Results layout: a `lusd-jax batch` output folder, `{row:03d}_seed{seed}.png` with `row` the index.csv
row (from 0). `seed=None` (default) takes the smallest seed present in the folder (0 for a default
batch run); `seed=N` takes that seed; `seed="all"` counts every (row, seed) image as one edit, which
averages the success rate over seeds. A row without a result image, or with an unreadable one, is
reported once and counted as an edit that failed (it is in every denominator, never above a
threshold, and in the summary's `missing` count); CLIP-T averages the images that exist. Wrong
inputs, and results folders without one result image for the dataset's rows, raise `InputError`
before CLIP loads.

Outputs of `run_eval` (in `out_dir`): `per_example.csv` (one row per edit and results folder),
`summary.csv` and `summary.md` (LUSD Table 2: CLIP-T, CLIP-AUC, L1*, CLIP-I* per method and
category all / add / other), `success_rate.csv` and `success_rate.png` (LUSD Fig. 8: s(k) per method;
matplotlib, imported only to draw it).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image

from lusd_jax.batchdir import INDEX_FILE, image_path_candidates, parse_output_name, read_index_records
from lusd_jax.io import InputError, check_output_dir, check_seeds

SUCCESS_THRESHOLDS = 1.0 + 0.01 * np.arange(41)  # k = 1.00 .. 1.40 (CLIP-AUC)
BACKGROUND_THRESHOLDS = SUCCESS_THRESHOLDS[:23]  # k = 1.00 .. 1.22 (L1*, CLIP-I*)
CATEGORIES = ("all", "add", "other")


class DatasetError(InputError):
  """The dataset or results folder does not have the documented layout (one line; CLI exit 2)."""


class ImageEmbedder(Protocol):
  """Anything that embeds images: `CLIP` (CLIP-I), or e.g. a DINO ViT-S/16 for a DINO* column."""

  def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


# ----------------------------------------------------------------------------- metric math


def cosine_similarity(a_ND, b_ND) -> np.ndarray:
  """Row-wise cosine similarity `[N]` (float64) of two `[N, D]` arrays."""
  a_ND, b_ND = np.asarray(a_ND, np.float64), np.asarray(b_ND, np.float64)
  return np.sum(a_ND * b_ND, -1) / (np.linalg.norm(a_ND, axis=-1) * np.linalg.norm(b_ND, axis=-1))


def clip_t(edited_NP, local_text_NP) -> np.ndarray:
  """CLIP-T `[N]` = cos(CLIP(x), CLIP(y_local)), from image and text embeddings `[N, P]`."""
  return cosine_similarity(edited_NP, local_text_NP)


def clip_r(edited_NP, source_NP, target_text_NP) -> np.ndarray:
  """CLIP-R `[N]` = cos(CLIP(x), CLIP(y_tgt)) / cos(CLIP(x_src), CLIP(y_tgt)); > 1: moved towards y_tgt."""
  return cosine_similarity(edited_NP, target_text_NP) / cosine_similarity(source_NP, target_text_NP)


def success_rate(clip_r_N, thresholds_K=SUCCESS_THRESHOLDS) -> np.ndarray:
  """s(k) `[K]`: fraction of edits with CLIP-R > k. NaN CLIP-R (a missing image) is a failure."""
  clip_r_N = np.asarray(clip_r_N, np.float64)
  if clip_r_N.size == 0:
    return np.full(len(thresholds_K), np.nan)
  passed_KN = clip_r_N[None, :] > np.asarray(thresholds_K)[:, None]  # NaN compares False
  return passed_KN.mean(axis=1)


def simpson(y_K, thresholds_K) -> float:
  """Integral of `y` over `k` by `scipy.integrate.simpson(y, x=k)` (composite Simpson 1/3 here)."""
  from scipy.integrate import simpson as _simpson

  return float(_simpson(np.asarray(y_K, np.float64), x=np.asarray(thresholds_K, np.float64)))


def thresholded_means(values_N, clip_r_N, thresholds_K=BACKGROUND_THRESHOLDS) -> np.ndarray:
  """`[K]`: mean of `values` over the edits with CLIP-R > k (NaN values are left out; no edit: NaN)."""
  values_N = np.asarray(values_N, np.float64)
  clip_r_N = np.asarray(clip_r_N, np.float64)
  valid_KN = (clip_r_N[None, :] > np.asarray(thresholds_K)[:, None]) & np.isfinite(values_N)[None, :]
  count_K = valid_KN.sum(axis=1)
  sum_K = np.where(valid_KN, values_N[None, :], 0.0).sum(axis=1)
  return np.where(count_K > 0, sum_K / np.maximum(count_K, 1), np.nan)


def thresholded_auc(values_N, clip_r_N, thresholds_K=BACKGROUND_THRESHOLDS) -> float:
  """L1* / CLIP-I*: the integral over k = 1.00 .. 1.22 of `thresholded_means` (NaN if any k has no edit)."""
  return simpson(thresholded_means(values_N, clip_r_N, thresholds_K), thresholds_K)


def l1_distance(edited: Image.Image, ground_truth: Image.Image) -> float:
  """Mean |x - x_gt| over pixels and channels in [0, 1]; x is resized to x_gt's size (PIL bicubic)."""
  edited, ground_truth = edited.convert("RGB"), ground_truth.convert("RGB")
  if edited.size != ground_truth.size:
    edited = edited.resize(ground_truth.size, Image.BICUBIC)
  x = np.asarray(edited, np.float64) / 255.0
  y = np.asarray(ground_truth, np.float64) / 255.0
  return float(np.mean(np.abs(x - y)))


def category_group(category: str) -> str:
  """LUSD reports object insertion ("add") apart from every other kind of edit ("other")."""
  c = category.strip().lower()
  if not c:
    return ""
  return "add" if c == "add" else "other"


# ----------------------------------------------------------------------------- dataset and results


@dataclasses.dataclass(frozen=True)
class EditExample:
  """One row of the dataset's index.csv (paths resolved against the dataset folder)."""

  row: int
  source_path: str
  source_prompt: str
  target_prompt: str
  global_source_prompt: str
  global_target_prompt: str  # y_tgt of CLIP-R
  local_prompt: str  # y_local of CLIP-T
  gt_path: str | None
  category: str  # as written in index.csv ("" when absent)


def load_dataset(dataset_dir: str | os.PathLike) -> list[EditExample]:
  """Reads `dataset_dir/index.csv` (layout in this module's docstring) with `batchdir.read_index_records`.

  Raises:
    DatasetError: naming the file, the row and the column when something is missing.
  """
  dataset_dir = os.fspath(dataset_dir)
  index = os.path.join(dataset_dir, INDEX_FILE)
  if not os.path.isfile(index):
    raise DatasetError(f"missing file {index} (a dataset folder holds index.csv and the images it names)")
  try:
    records = read_index_records(index, ("img_path", "target_prompt"))
  except InputError as e:
    raise DatasetError(str(e)) from None

  def resolve(path: str, row: int, column: str) -> str:
    # `lusd-jax batch`'s rule: images/<path> (the official layout), else <path> beside index.csv.
    candidates = image_path_candidates(Path(dataset_dir), path)
    for full in candidates:
      if full.is_file():
        return str(full)
    raise DatasetError(
      f"{index}: row {row}: {column} '{path}' does not exist (looked for {' and '.join(map(str, candidates))})"
    )

  examples = []
  for r in records:
    get = r.fields.__getitem__
    if not get("img_path"):
      raise DatasetError(f"{index}: row {r.row}: empty img_path")
    target = get("target_prompt")
    examples.append(
      EditExample(
        row=r.row,
        source_path=resolve(get("img_path"), r.row, "img_path"),
        source_prompt=get("source_prompt"),
        target_prompt=target,
        global_source_prompt=get("global_source_prompt"),
        global_target_prompt=get("global_target_prompt") or target,
        local_prompt=get("local_prompt") or target,
        gt_path=resolve(get("gt_path"), r.row, "gt_path") if get("gt_path") else None,
        category=get("category"),
      )
    )
  return examples


def scan_results(results_dir: str | os.PathLike) -> dict[int, dict[int, str]]:
  """`{row: {seed: path}}` of the `{row:03d}_seed{seed}.png` files (`batchdir.output_name`) in a batch folder."""
  results_dir = os.fspath(results_dir)
  if not os.path.isdir(results_dir):
    raise DatasetError(f"results folder {results_dir} does not exist")
  try:
    names = sorted(os.listdir(results_dir))
  except OSError as e:
    raise DatasetError(f"cannot read results folder {results_dir} ({e.strerror or e})") from None
  found: dict[int, dict[int, str]] = {}
  for name in names:
    parsed = parse_output_name(name)
    if parsed:
      row, seed = parsed
      found.setdefault(row, {})[seed] = os.path.join(results_dir, name)
  return found


class ResultImage(NamedTuple):
  row: int
  seed: int | None  # None: no image of this row was found
  path: str | None  # None: missing


def select_results(found: Mapping[int, Mapping[int, str]], num_rows: int, seed: int | str | None = None):
  """Pairs dataset rows with result images; returns (list of `ResultImage`, the seed rule used).

  Args:
    found: `scan_results` output.
    num_rows: rows in the dataset (result files for other rows are ignored).
    seed: None (the smallest seed present), an int, or "all" (every seed of every row).
  """
  if seed == "all":
    out = []
    for row in range(num_rows):
      seeds = sorted(found.get(row, {}))
      out += [ResultImage(row, s, found[row][s]) for s in seeds] or [ResultImage(row, None, None)]
    return out, "all"
  if seed is None:
    present = sorted({s for row in range(num_rows) for s in found.get(row, {})})
    seed = present[0] if present else 0
  seed = int(seed)
  out = [ResultImage(row, seed, found.get(row, {}).get(seed)) for row in range(num_rows)]
  return out, str(seed)


# ----------------------------------------------------------------------------- scoring


def _readable(path: str) -> bool:
  try:
    with Image.open(path) as im:
      im.verify()
    return True
  except Exception:  # noqa: BLE001 - truncated or not an image: the edit failed
    return False


def _open_rgb(path: str) -> Image.Image:
  with Image.open(path) as im:
    return im.convert("RGB")


def _embed_paths(embedder: ImageEmbedder, paths: Sequence[str | None], chunk: int = 64) -> np.ndarray:
  """Embeds image files in chunks (few images in memory at once); None paths give NaN rows."""
  idx = [i for i, p in enumerate(paths) if p is not None]
  out = None
  for start in range(0, len(idx), chunk):
    part = idx[start : start + chunk]
    emb = np.asarray(embedder.embed_images([_open_rgb(paths[i]) for i in part]), np.float64)
    if out is None:
      out = np.full((len(paths), emb.shape[-1]), np.nan)
    out[part] = emb
  return out if out is not None else np.full((len(paths), 1), np.nan)


class DatasetEmbeddings(NamedTuple):
  """What every results folder is compared against, embedded once."""

  source_NP: np.ndarray  # CLIP(x_src)
  target_text_NP: np.ndarray  # CLIP(y_tgt)
  local_text_NP: np.ndarray  # CLIP(y_local)
  gt: dict[str, np.ndarray]  # embedder name -> [N, D] of x_gt (NaN rows without ground truth)


def embed_dataset(
  examples: Sequence[EditExample], clip, embedders: Mapping[str, ImageEmbedder]
) -> DatasetEmbeddings:
  """Embeds source images, ground truths and descriptions (`embedders` includes "clip")."""
  return DatasetEmbeddings(
    source_NP=_embed_paths(clip, [e.source_path for e in examples]),
    target_text_NP=np.asarray(clip.embed_texts([e.global_target_prompt for e in examples]), np.float64),
    local_text_NP=np.asarray(clip.embed_texts([e.local_prompt for e in examples]), np.float64),
    gt={name: _embed_paths(emb, [e.gt_path for e in examples]) for name, emb in embedders.items()},
  )


def score_results(
  examples: Sequence[EditExample],
  results: Sequence[ResultImage],
  clip,
  dataset_emb: DatasetEmbeddings,
  embedders: Mapping[str, ImageEmbedder] | None = None,
) -> list[dict[str, Any]]:
  """Per-edit scores: one dict per `ResultImage` (NaN where the image or the ground truth is missing).

  Keys: row, seed, result_path, missing, category, clip_t, clip_r, l1, and `{name}_i` (cos to the
  ground truth) for every embedder ("clip_i" for CLIP).
  """
  embedders = dict(embedders or {"clip": clip})
  rows_N = np.asarray([r.row for r in results], np.int64)
  paths = [r.path for r in results]
  emb = {name: _embed_paths(e, paths) for name, e in embedders.items()}
  edited_NP = emb["clip"] if "clip" in emb else _embed_paths(clip, paths)
  ct_N = clip_t(edited_NP, dataset_emb.local_text_NP[rows_N])
  cr_N = clip_r(edited_NP, dataset_emb.source_NP[rows_N], dataset_emb.target_text_NP[rows_N])
  sims = {name: cosine_similarity(emb[name], dataset_emb.gt[name][rows_N]) for name in embedders}
  out = []
  for i, r in enumerate(results):
    ex = examples[r.row]
    l1 = math.nan
    if r.path is not None and ex.gt_path is not None:
      l1 = l1_distance(_open_rgb(r.path), _open_rgb(ex.gt_path))
    rec = {
      "row": r.row,
      "seed": "" if r.seed is None else r.seed,
      "result_path": r.path or "",
      "missing": r.path is None,
      "category": ex.category,
      "clip_t": float(ct_N[i]),
      "clip_r": float(cr_N[i]),
      "l1": l1,
    }
    rec.update({f"{name}_i": float(sims[name][i]) for name in embedders})
    out.append(rec)
  return out


def summarize(scores: Sequence[Mapping[str, Any]], method: str, embedder_names: Sequence[str] = ("clip",)):
  """LUSD Table 2 rows for one results folder; returns (rows, success-rate curves).

  Returns:
    rows: one dict per category present ("all"; "add" / "other" when index.csv has categories),
      keys method, category, n, missing, CLIP-T, CLIP-AUC, L1*, and `{NAME}-I*` per embedder.
    curves: category -> s(k) `[41]` on `SUCCESS_THRESHOLDS`.
  """
  groups = np.asarray([category_group(s["category"]) for s in scores])
  rows, curves = [], {}
  for cat in CATEGORIES:
    sel = np.ones(len(scores), bool) if cat == "all" else groups == cat
    if cat != "all" and not sel.any():
      continue
    pick = [s for s, keep in zip(scores, sel, strict=True) if keep]
    col = lambda key, pick=pick: np.asarray([s[key] for s in pick], np.float64)
    cr_N = col("clip_r")
    ct_N = col("clip_t")
    curves[cat] = success_rate(cr_N)
    row = {
      "method": method,
      "category": cat,
      "n": len(pick),
      "missing": int(sum(bool(s["missing"]) for s in pick)),
      "CLIP-T": float(np.nanmean(ct_N)) if np.isfinite(ct_N).any() else math.nan,
      "CLIP-AUC": simpson(curves[cat], SUCCESS_THRESHOLDS),
      "L1*": thresholded_auc(col("l1"), cr_N),
    }
    for name in embedder_names:
      row[f"{name.upper()}-I*"] = thresholded_auc(col(f"{name}_i"), cr_N)
    rows.append(row)
  return rows, curves


# ----------------------------------------------------------------------------- tables and plot


def _fmt(v, digits: int = 3) -> str:
  if isinstance(v, float):
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
  return str(v)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """Writes dict rows (the union of their keys, in first-seen order) to `path`."""
  keys: list[str] = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
      w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A GitHub Markdown table of dict rows (floats to 3 decimals, NaN as n/a)."""
  keys = list(rows[0]) if rows else []
  lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
  lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def plot_success_rate(curves: Mapping[str, np.ndarray], path: str, thresholds_K=SUCCESS_THRESHOLDS) -> None:
  """LUSD Fig. 8: success rate s(k) against the CLIP-R threshold k, one line per method (PNG)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=120)
  for name, curve in curves.items():
    ax.plot(thresholds_K, curve, label=name, linewidth=1.8)
  ax.set_xlabel("CLIP-R threshold k")
  ax.set_ylabel("success rate (CLIP-R > k)")
  ax.set_xlim(float(thresholds_K[0]), float(thresholds_K[-1]))
  ax.set_ylim(-0.02, 1.02)  # a curve at 0 (doing nothing) stays visible
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# ----------------------------------------------------------------------------- driver


class EvalReport(NamedTuple):
  summary: list[dict[str, Any]]  # summary.csv rows (method x category)
  per_example: list[dict[str, Any]]  # per_example.csv rows
  curves: dict[str, np.ndarray]  # method -> s(k) over all edits, [41]
  files: dict[str, str]  # "per_example", "summary_csv", "summary_md", "curves_csv", "plot" -> path
  # ("plot" is absent when matplotlib cannot be imported)


def _method_names(results_dirs: Sequence[str]) -> list[str]:
  names = []
  for d in results_dirs:
    base = os.path.basename(os.path.normpath(d)) or d
    name, i = base, 2
    while name in names:
      name, i = f"{base}_{i}", i + 1
    names.append(name)
  return names


def _check_folder(path: str, flag: str) -> None:
  if not os.path.exists(path):
    raise InputError(f"{flag}: folder {path} does not exist")
  if not os.path.isdir(path):
    raise InputError(f"{flag}: {path} is a file, not a folder")


def _looked_for(num_rows: int, seed: int | str | None) -> str:
  s = "*" if seed is None or seed == "all" else seed
  first = f"000_seed{s}.png"
  return first if num_rows == 1 else f"{first} ... {num_rows - 1:03d}_seed{s}.png"


def _no_results_error(
  results_dirs: Sequence[str], found: Sequence[Mapping[int, Mapping[int, str]]], num_rows: int, seed
) -> InputError:
  """The one-line error when not one result image of any dataset row was found."""
  seeds_present = sorted({s for f in found for row, by_seed in f.items() if row < num_rows for s in by_seed})
  looked = _looked_for(num_rows, seed)
  if seeds_present:  # images for these rows exist, under other seeds
    return InputError(
      f"--seed {seed}: no result image with seed {seed} in {' '.join(results_dirs)} (looked for {looked}; "
      f"seeds present: {', '.join(map(str, seeds_present))}); check --results and --seed"
    )
  hints = []
  other_rows = sum(len(by_seed) for f in found for row, by_seed in f.items() if row >= num_rows)
  if other_rows:
    hints.append(
      f"{other_rows} result images are for rows beyond the {num_rows} rows of --dataset's index.csv"
    )
  pngs = sum(
    1 for d in results_dirs for n in os.listdir(d) if n.lower().endswith(".png") and not parse_output_name(n)
  )
  if pngs:
    hints.append(f"{pngs} .png files with other names")
  hint = f"; {'; '.join(hints)}" if hints else ""
  return InputError(
    f"--results {' '.join(results_dirs)}: no result images found (looked for {looked}{hint}); "
    "check --results and --seed"
  )


class _Selection(NamedTuple):
  folder: str
  results: list[ResultImage]  # unreadable images have path None (failed edits)
  rule: str  # the seed rule used, for the log


def _check_and_select(
  results_dirs: Sequence[str],
  dataset_dir: str,
  out_dir: str,
  seed: int | str | None,
  names: Sequence[str],
  log: Callable[[str], None],
) -> tuple[list[EditExample], list[_Selection]]:
  """Every check of `run_eval` that needs no model: bad inputs stop here, before CLIP's weights load.

  Also reports each unreadable and each missing result image once (both are failed edits).
  """
  if seed is not None and seed != "all":
    check_seeds([seed], flag="--seed")
  if not results_dirs:
    raise InputError("--results: give at least one results folder")
  if len(names) != len(results_dirs):
    raise InputError(f"--names: {len(names)} names for {len(results_dirs)} --results folders")
  _check_folder(dataset_dir, "--dataset")
  for d in results_dirs:
    _check_folder(d, "--results")
  check_output_dir(out_dir, flag="--out")
  try:
    examples = load_dataset(dataset_dir)
  except DatasetError as e:
    raise DatasetError(f"--dataset: {e}") from None
  try:
    found = [scan_results(d) for d in results_dirs]
  except DatasetError as e:
    raise DatasetError(f"--results: {e}") from None
  selections = []
  for folder, fnd in zip(results_dirs, found, strict=True):
    results, rule = select_results(fnd, len(examples), seed)
    selections.append(_Selection(folder, results, rule))
  if all(r.path is None for sel in selections for r in sel.results):
    raise _no_results_error(results_dirs, found, len(examples), seed)

  checked = []
  for folder, results, rule in selections:
    missing = [r for r in results if r.path is None]
    unreadable = [r for r in results if r.path is not None and not _readable(r.path)]
    if unreadable:  # reported here by path, and not again among the missing ones
      log(
        f"eval: {folder}: {len(unreadable)} unreadable result images, counted as failed edits: "
        f"{', '.join(r.path for r in unreadable)}"
      )
    if missing:
      shown = ", ".join(f"{r.row:03d}_seed{'*' if r.seed is None else r.seed}.png" for r in missing[:10])
      more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
      log(
        f"eval: {folder}: {len(missing)} of {len(results)} result images missing, counted as failed edits: "
        f"{shown}{more}"
      )
    bad = set(unreadable)
    checked.append(_Selection(folder, [r._replace(path=None) if r in bad else r for r in results], rule))
  return examples, checked


def run_eval(
  results_dirs: str | os.PathLike | Sequence[str | os.PathLike],
  dataset_dir: str | os.PathLike,
  clip_model: Any = "openai/clip-vit-base-patch32",
  out_dir: str | os.PathLike = "eval",
  *,
  seed: int | str | None = None,
  names: Sequence[str] | None = None,
  extra_embedders: Mapping[str, ImageEmbedder] | None = None,
  log: Callable[[str], None] | None = None,
) -> EvalReport:
  """Scores one or several `lusd-jax batch` results folders on a dataset and writes the tables and plot.

  Args:
    results_dirs: one folder or a list (compared side by side).
    dataset_dir: dataset folder (index.csv layout in this module's docstring).
    clip_model: a `CLIP` (`lusd_jax.models.clip`), or what `loading.load_clip` takes (folder, hub id, "tiny-random").
    out_dir: where per_example.csv, summary.csv, summary.md, success_rate.csv / .png are written.
    seed: which result image per row: None (smallest seed present), an int, or "all".
    names: method names for the tables (default: the folder names).
    extra_embedders: more image similarities behind the CLIP-I interface, e.g. {"dino": ...}; each
      adds a `{name}_i` column and a `{NAME}-I*` summary column.
    log: where warnings (missing images) and progress go (default: stderr).

  Returns:
    `EvalReport` (summary rows, per-example rows, curves, written files).

  Raises:
    InputError: before CLIP loads, naming the `lusd-jax eval` flag: a bad seed, a missing dataset or
      results folder (or a file there), an output folder that cannot be written, a dataset error
      (`DatasetError`), or not one result image found for the dataset's rows.

  Example:
    >>> report = run_eval(["out/lusd"], "magicbrush_test", "openai/clip-vit-base-patch32", "eval")
  """
  from lusd_jax import loading  # jax and the models load only when a run needs them

  log = log or (lambda msg: print(msg, file=sys.stderr))
  if isinstance(results_dirs, str | os.PathLike):
    results_dirs = [results_dirs]
  results_dirs = [os.fspath(d) for d in results_dirs]
  names = list(names) if names is not None else _method_names(results_dirs)
  examples, selections = _check_and_select(
    results_dirs, os.fspath(dataset_dir), os.fspath(out_dir), seed, names, log
  )
  clip = clip_model if hasattr(clip_model, "embed_texts") else loading.load_clip(clip_model)
  embedders = {"clip": clip, **dict(extra_embedders or {})}

  log(f"eval: embedding {len(examples)} dataset rows with CLIP {getattr(clip, 'name', '')}")
  dataset_emb = embed_dataset(examples, clip, embedders)
  per_example, summary, curves = [], [], {}
  for name, (folder, results, rule) in zip(names, selections, strict=True):
    log(f"eval: scoring {folder} ({len(results)} edits, seed {rule})")
    scores = score_results(examples, results, clip, dataset_emb, embedders)
    for s, r in zip(scores, results, strict=True):
      ex = examples[r.row]
      per_example.append(
        {
          "method": name,
          **s,
          "source_path": ex.source_path,
          "gt_path": ex.gt_path or "",
          "global_source_prompt": ex.global_source_prompt,
          "global_target_prompt": ex.global_target_prompt,
          "local_prompt": ex.local_prompt,
        }
      )
    rows, cat_curves = summarize(scores, name, list(embedders))
    summary += rows
    curves[name] = cat_curves["all"]

  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  files = {
    "per_example": os.path.join(out_dir, "per_example.csv"),
    "summary_csv": os.path.join(out_dir, "summary.csv"),
    "summary_md": os.path.join(out_dir, "summary.md"),
    "curves_csv": os.path.join(out_dir, "success_rate.csv"),
    "plot": os.path.join(out_dir, "success_rate.png"),
  }
  write_csv(files["per_example"], per_example)
  write_csv(files["summary_csv"], summary)
  with open(files["summary_md"], "w", encoding="utf-8") as f:
    f.write(markdown_table(summary))
  write_csv(
    files["curves_csv"],
    [
      {"k": round(float(k), 2), **{n: float(c[i]) for n, c in curves.items()}}
      for i, k in enumerate(SUCCESS_THRESHOLDS)
    ],
  )
  try:
    plot_success_rate(curves, files["plot"])
  except ImportError as e:  # the tables are written; losing them to a missing plotting library is worse
    log(f"eval: {files.pop('plot')} not written ({e}; pip install matplotlib)")
  return EvalReport(summary, per_example, curves, files)
