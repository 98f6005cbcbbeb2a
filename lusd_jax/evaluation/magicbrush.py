"""The MagicBrush protocol as LUSD uses it: CLIP-T, CLIP-R, CLIP-AUC, L1*, CLIP-I* (LUSD Sec. 4.2).

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

A missing or unreadable result image is a failed edit: it is in every denominator, never above a
threshold, and in the summary's `missing` count; CLIP-T averages the images that exist.

Outputs (written by `lusd_jax.evaluation.run_eval`): `per_example.csv` (one row per edit and
results folder), `summary.csv` and `summary.md` (LUSD Table 2: CLIP-T, CLIP-AUC, L1*, CLIP-I* per
method and category all / add / other), `success_rate.csv` and `success_rate.png` (LUSD Fig. 8:
s(k) per method; matplotlib, imported only to draw it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image

from lusd_jax.evaluation.dataset import EditExample, ResultImage, open_rgb

SUCCESS_THRESHOLDS = 1.0 + 0.01 * np.arange(41)  # k = 1.00 .. 1.40 (CLIP-AUC)
BACKGROUND_THRESHOLDS = SUCCESS_THRESHOLDS[:23]  # k = 1.00 .. 1.22 (L1*, CLIP-I*)
CATEGORIES = ("all", "add", "other")


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


def _embed_paths(embedder: ImageEmbedder, paths: Sequence[str | None], chunk: int = 64) -> np.ndarray:
  """Embeds image files in chunks (few images in memory at once); None paths give NaN rows."""
  idx = [i for i, p in enumerate(paths) if p is not None]
  out = None
  for start in range(0, len(idx), chunk):
    part = idx[start : start + chunk]
    emb = np.asarray(embedder.embed_images([open_rgb(paths[i]) for i in part]), np.float64)
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
      l1 = l1_distance(open_rgb(r.path), open_rgb(ex.gt_path))
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
