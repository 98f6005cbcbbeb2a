"""The UnifyEdit protocol: fidelity (DINO structure distance) and editability (CLIP-L score) per edit type.

Per edit (x_src: source image, x: result image, y: the row's target_prompt):

- fidelity, DINO = the DINO ViT-B/8 structure distance between x_src and x (Splice's self-similarity
  of the last layer's keys, `lusd_jax.models.dino.structure_distance`; lower = structure kept);
- editability, CLIP-L = 100 * cos(CLIP(x), CLIP(y)) with CLIP ViT-L/14, as loveu-tgve's
  `clip_score_text` computes it (`logits_per_image`: OpenAI's logit scale is exactly 100); higher
  = closer to the target prompt.

Mask-box crops (as PFB-Diff scores localized edits): for a *local* edit type (`LOCAL_EDIT_TYPES`:
color, texture, object, face) whose row names a mask, x_src and x are both cropped to the bounding
box of the mask before scoring, so that the metrics look at the edited region and not at the
untouched rest of the photo. *Global* edit types (background, style), rows without an edit type,
and local rows without a mask_path (which `lusd-jax batch` also edits as global edits) are scored
whole. The box: the mask is read as `lusd-jax batch` reads it (alpha channel or luminance, EXIF
orientation), resized to the source image's size (box filter) where it differs, and binarized at
> 0.5; the box spans its on-pixels. It is kept in coordinates relative to the image (`mask_box`)
and cut from each image at that image's size (`crop_to_box`: outward to whole pixels).

Frames: `lusd-jax batch` edits the largest centred square of the photo, so when a result image is
square and its source is not, the source (and its mask) are center-cropped the same way
(`io.center_crop_box`) before anything is compared. DINO's input is each image (or crop) resized to
224 x 224 on the host (PIL bilinear, antialiased when shrinking, as DINO's `preprocess` resizes);
CLIP's is OpenAI's preprocessing of the image (or crop).

Failures: a missing or unreadable result image is counted in the summary's `failed` column and
left out of both means (a mean over the edits that produced an image); the per-example rows keep
it with empty scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from lusd_jax import io
from lusd_jax.evaluation.dataset import DatasetError, EditExample, ResultImage, open_rgb
from lusd_jax.evaluation.magicbrush import cosine_similarity
from lusd_jax.unifyedit.config import EDIT_TYPES

CLIP_SCORE_SCALE = 100.0  # loveu-tgve: logits_per_image = exp(logit_scale) * cos, exp(logit_scale) = 100
LOCAL_EDIT_TYPES = ("color", "texture", "object", "face")  # cropped to the mask's box when a mask is given
GLOBAL_EDIT_TYPES = ("background", "style")  # always scored whole
UNTYPED = "untyped"  # the per-type tables' name for rows without an edit_type
MASK_THRESHOLD = io.MASK_THRESHOLD

Box = tuple[float, float, float, float]  # (left, top, right, bottom), fractions of the width / height


# ----------------------------------------------------------------------------- metric math


def clip_score(image_NP, text_NP) -> np.ndarray:
  """CLIP score `[N]` = 100 * cos(image embedding, text embedding) (loveu-tgve's `clip_score_text`)."""
  return CLIP_SCORE_SCALE * cosine_similarity(image_NP, text_NP)


def mask_box(mask_HW) -> Box | None:
  """The bounding box of a mask's on-pixels (> 0.5), as fractions of its width and height.

  Args:
    mask_HW: `[H, W]` mask, bool or values in [0, 1].

  Returns:
    `(left, top, right, bottom)` with `right` / `bottom` exclusive: pixel columns `left * W` ..
    `right * W - 1` hold the on-pixels; None when no pixel is on.
  """
  on_HW = np.asarray(mask_HW, np.float64) > MASK_THRESHOLD
  if not on_HW.any():
    return None
  h, w = on_HW.shape
  cols, rows = np.flatnonzero(on_HW.any(axis=0)), np.flatnonzero(on_HW.any(axis=1))
  return (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)


def box_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
  """`box` on an image of `width` x `height`: `(left, top, right, bottom)` for `PIL.Image.crop`.

  Rounded outward to whole pixels (the crop holds the whole box), at least one pixel wide and high.
  """
  left, top = math.floor(box[0] * width + 1e-9), math.floor(box[1] * height + 1e-9)
  right, bottom = math.ceil(box[2] * width - 1e-9), math.ceil(box[3] * height - 1e-9)
  left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
  return left, top, max(min(right, width), left + 1), max(min(bottom, height), top + 1)


def crop_to_box(image: Image.Image, box: Box | None) -> Image.Image:
  """The part of `image` inside `box` (fractions, `mask_box`); the whole image when `box` is None."""
  return image if box is None else image.crop(box_pixels(box, *image.size))


# ----------------------------------------------------------------------------- dataset rows


class RowRegion(NamedTuple):
  """Where one dataset row is scored: the mask's box in the source's frame and in its centred square."""

  scope: str  # "local" (cropped to the box) or "global" (scored whole)
  box: Box | None  # on the whole source image; None: scored whole
  square_box: Box | None  # on the source's centred square (the frame of a square result)


def _read_mask_box(path: str, source_size: tuple[int, int]) -> tuple[Box | None, Box | None]:
  """(box on the source, box on its centred square) of the mask at `path`, resized to the source's size."""
  gray_HW = io._open_oriented(Path(path), io._mask_gray)  # the batch's reading of a mask file
  w, h = source_size
  if gray_HW.shape != (h, w):
    im = Image.fromarray(np.ascontiguousarray(gray_HW, np.float32), mode="F")
    gray_HW = np.asarray(im.resize((w, h), Image.Resampling.BOX), np.float32)
  left, top, right, bottom = io.center_crop_box(w, h)
  return mask_box(gray_HW), mask_box(gray_HW[top:bottom, left:right])


def row_regions(examples: Sequence[EditExample], log: Callable[[str], None]) -> list[RowRegion]:
  """Checks the dataset's edit types and masks and finds each row's box (no model is needed).

  Raises:
    DatasetError: naming `--dataset`, the row and the column: an edit type that is not one of
      `EDIT_TYPES`, a mask_path of a local row that does not exist or cannot be read, or a mask
      without an on-pixel.
  """
  regions, unmasked = [], []
  for ex in examples:
    where = f"--dataset: index.csv row {ex.row}"
    if ex.edit_type and ex.edit_type not in EDIT_TYPES:
      raise DatasetError(f"{where}: edit_type '{ex.edit_type}' is not one of {', '.join(EDIT_TYPES)}")
    if ex.edit_type not in LOCAL_EDIT_TYPES:
      regions.append(RowRegion("global", None, None))
      continue
    if ex.mask_path is None:
      unmasked.append(ex.row)
      regions.append(RowRegion("global", None, None))
      continue
    try:
      box, square_box = _read_mask_box(ex.mask_path, io.image_original_size(ex.source_path))
    except (io.InputError, OSError) as e:
      raise DatasetError(f"{where}: mask_path: {e}") from None
    if box is None:
      raise DatasetError(f"{where}: mask_path {ex.mask_path} has no pixel above half gray (nothing edited)")
    regions.append(RowRegion("local", box, square_box))
  if unmasked:
    log(
      f"eval: {len(unmasked)} rows of a local edit type have no mask_path and are scored whole: rows "
      f"{', '.join(map(str, unmasked))}"
    )
  return regions


# ----------------------------------------------------------------------------- scoring


def _pair(source_path: str, result_path: str, region: RowRegion):
  """(source crop, result crop, the box's pixels on the result or None) of one edit, in the result's frame."""
  # The source as `lusd-jax batch` reads it (EXIF orientation, alpha composited on white).
  source, result = io._open_oriented(Path(source_path), io.to_rgb8), open_rgb(result_path)
  box = region.box
  if result.width == result.height and source.width != source.height:
    source = source.crop(io.center_crop_box(*source.size))  # the square `lusd-jax batch` edited
    box = region.square_box
  if region.scope == "global":
    box = None
  return crop_to_box(source, box), crop_to_box(result, box), box and box_pixels(box, *result.size)


def _dino_input(image: Image.Image, size: int) -> np.ndarray:
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(image, np.float32) / np.float32(255.0)


def _padded(x_BHWC: np.ndarray, batch: int) -> np.ndarray:
  """Pads a batch to `batch` images by repeating its last one: DINO compiles one program per run."""
  n = x_BHWC.shape[0]
  return np.concatenate([x_BHWC, np.repeat(x_BHWC[-1:], batch - n, axis=0)]) if batch > n else x_BHWC


def score_unifyedit(
  examples: Sequence[EditExample],
  results: Sequence[ResultImage],
  regions: Sequence[RowRegion],
  clip_l,
  dino,
  target_text_NP: np.ndarray,
  chunk: int = 8,
) -> list[dict[str, Any]]:
  """Per-edit fidelity and editability: one dict per `ResultImage` (NaN scores where it is missing).

  Args:
    examples: the dataset's rows.
    results: which result image scores each edit (`dataset.select_results`); path None: failed.
    regions: `row_regions(examples)`.
    clip_l: a CLIP (`embed_images`), ViT-L/14 for the protocol.
    dino: a `lusd_jax.models.dino.Dino` (`structure_distance`, `config.image_size`).
    target_text_NP: `[rows, P]` CLIP-L embeddings of the rows' target prompts.
    chunk: edits scored at once (the DINO batch is padded to it: one compiled program).

  Returns:
    dicts with keys row, seed, result_path, failed, edit_type, scope, box (pixels of the result,
    "l,t,r,b", or "" when scored whole), dino, clip_l.
  """
  size = dino.config.image_size
  out = []
  for start in range(0, len(results), chunk):
    part = results[start : start + chunk]
    ok = [r for r in part if r.path is not None]
    dino_N = clip_N = np.zeros(0)
    pairs = [_pair(examples[r.row].source_path, r.path, regions[r.row]) for r in ok]
    if pairs:
      src_BHWC = _padded(np.stack([_dino_input(s, size) for s, _, _ in pairs]), chunk)
      res_BHWC = _padded(np.stack([_dino_input(x, size) for _, x, _ in pairs]), chunk)
      dino_N = np.asarray(dino.structure_distance(src_BHWC, res_BHWC), np.float64)[: len(pairs)]
      image_NP = np.asarray(clip_l.embed_images([x for _, x, _ in pairs]), np.float64)
      clip_N = clip_score(image_NP, target_text_NP[[r.row for r in ok]])
    scored = {id(r): i for i, r in enumerate(ok)}
    for r in part:
      ex, i = examples[r.row], scored.get(id(r))
      box = "" if i is None or pairs[i][2] is None else ",".join(map(str, pairs[i][2]))
      out.append(
        {
          "row": r.row,
          "seed": "" if r.seed is None else r.seed,
          "result_path": r.path or "",
          "failed": r.path is None,
          "edit_type": ex.edit_type or UNTYPED,
          "scope": regions[r.row].scope,
          "box": box,
          "dino": math.nan if i is None else float(dino_N[i]),
          "clip_l": math.nan if i is None else float(clip_N[i]),
        }
      )
  return out


def edit_type_order(types: Sequence[str]) -> list[str]:
  """The edit types present, in Unify-Bench's order, rows without a type last."""
  present = set(types)
  return [t for t in EDIT_TYPES if t in present] + ([UNTYPED] if UNTYPED in present else [])


def summarize_unifyedit(scores: Sequence[Mapping[str, Any]], method: str) -> list[dict[str, Any]]:
  """The per-folder table: overall ("all") and per edit type present.

  Returns:
    one dict per group, keys method, edit_type, n (edits), failed (no readable result image: left out
    of the means), cropped (scored on the mask's box), DINO (mean structure distance, lower is
    better), CLIP-L (mean CLIP score, higher is better); NaN means when every edit of a group failed.
  """
  rows = []
  for group in ["all", *edit_type_order([s["edit_type"] for s in scores])]:
    pick = [s for s in scores if group == "all" or s["edit_type"] == group]
    done = [s for s in pick if not s["failed"]]
    mean = lambda key, done=done: float(np.mean([s[key] for s in done])) if done else math.nan
    rows.append(
      {
        "method": method,
        "edit_type": group,
        "n": len(pick),
        "failed": len(pick) - len(done),
        "cropped": sum(1 for s in done if s["box"]),
        "DINO": mean("dino"),
        "CLIP-L": mean("clip_l"),
      }
    )
  return rows
