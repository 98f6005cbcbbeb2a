"""Pictures for people: captioned side-by-side grids, labelled parameter grids, progress strips, masks,
and UnifyEdit's scheduler plot.

All functions take and return float [H, W, 3] images in [0, 1] (NumPy or JAX arrays in) and are
pure: nothing is written to disk here (`io.save_png` does that). Text uses PIL's bundled
default font, which exists on any machine with Pillow >= 10.1 (no system fonts needed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lusd_jax.io import image_from_array, to_uint8

if TYPE_CHECKING:
  from matplotlib.figure import Figure

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (30, 30, 30)
ELLIPSIS = "\u2026"

# Matplotlib's viridis sampled at 17 evenly spaced points; linear interpolation between them is
# within 0.021 of the real map. Hand-written so that heatmaps need no matplotlib (only
# `scheduler_plot` imports it, when called).
_VIRIDIS = np.array(
  [
    [0.2670, 0.0049, 0.3294],
    [0.2823, 0.0950, 0.4173],
    [0.2788, 0.1755, 0.4834],
    [0.2590, 0.2515, 0.5247],
    [0.2297, 0.3224, 0.5457],
    [0.1994, 0.3876, 0.5546],
    [0.1727, 0.4488, 0.5579],
    [0.1490, 0.5081, 0.5573],
    [0.1276, 0.5669, 0.5506],
    [0.1206, 0.6258, 0.5335],
    [0.1579, 0.6838, 0.5017],
    [0.2461, 0.7389, 0.4520],
    [0.3692, 0.7889, 0.3829],
    [0.5160, 0.8312, 0.2943],
    [0.6785, 0.8637, 0.1895],
    [0.8456, 0.8873, 0.0997],
    [0.9932, 0.9062, 0.1439],
  ],
  dtype=np.float32,
)


# ----------------------------------------------------------------------------------------------
# Text


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  """PIL's bundled font at `size` px; the fixed-size bitmap font if FreeType is missing."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):
    return ImageFont.load_default()


def _line_height(font) -> int:
  """Height of one text line including a little leading."""
  _, top, _, bottom = font.getbbox("Ag|")
  return int(bottom - top) + max(2, int(0.3 * (bottom - top)))


def _fit(text: str, font, width: float) -> str:
  """`text` cut and ended with an ellipsis so that it fits in `width` pixels."""
  if font.getlength(text) <= width:
    return text
  while text and font.getlength(text + ELLIPSIS) > width:
    text = text[:-1]
  return text.rstrip() + ELLIPSIS


def wrap_text(text: str, font, width: float, max_lines: int) -> list[str]:
  """Greedy word wrap to a pixel width, ellipsizing what does not fit in `max_lines`.

  Args:
    text: the caption; runs of whitespace count as one space.
    font: a PIL font (anything with `getlength`).
    width: available width in pixels.
    max_lines: the most lines to return (>= 1).

  Returns:
    Lines that each fit in `width`; [] for blank text. A word wider than `width` is ellipsized.
  """
  words = text.split()
  lines: list[str] = []
  current = ""
  for word in words:
    candidate = f"{current} {word}" if current else word
    if font.getlength(candidate) <= width or not current:
      current = candidate
    else:
      lines.append(current)
      current = word
  if current:
    lines.append(current)
  if len(lines) > max_lines:
    lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1 :])]
  return [_fit(line, font, width) for line in lines]


# ----------------------------------------------------------------------------------------------
# Grids


def _as_rgb8(x: Any) -> np.ndarray:
  """Any accepted image (float [0, 1], uint8, HW or HWC, PIL) as uint8 [H, W, 3]."""
  return to_uint8(image_from_array(x))


def grid(
  images: Sequence[Any],
  captions: Sequence[str],
  title: str | None = None,
  *,
  gap: int = 8,
  font_size: int | None = None,
  max_caption_lines: int = 2,
) -> np.ndarray:
  """Images side by side, each with a caption strip under it, and an optional title line.

  Images of different heights are centered vertically in a row as tall as the tallest.
  Captions are word-wrapped to the width of their image and ellipsized past
  `max_caption_lines`; the title is ellipsized to one line.

  Args:
    images: N images, float [H, W, 3] / [H, W] in [0, 1] or uint8 (NumPy, JAX or PIL).
    captions: N strings ("" for none).
    title: text across the top, e.g. "a cat -> a cat wearing a party hat".
    gap: white margin in pixels around and between images.
    font_size: caption size in px; default scales with the narrowest image (20 px at 512).
    max_caption_lines: wrap limit per caption.

  Returns:
    float32 [H', W', 3] in [0, 1], where W' = gap + sum(W_i + gap). Without a title the first
    image's top-left pixel is at (gap, gap).

  Example:
    >>> g = grid([x, y0, y1], ["input", "seed 0", "seed 1"], title="a cat -> a cat in a hat")  # doctest: +SKIP
  """
  if len(images) != len(captions):
    raise ValueError(f"grid: {len(images)} images but {len(captions)} captions")
  if not images:
    raise ValueError("grid: no images")
  cells = [_as_rgb8(x) for x in images]
  widths = [c.shape[1] for c in cells]
  cell_h = max(c.shape[0] for c in cells)
  if font_size is None:
    font_size = max(11, round(min(widths) / 26))
  font = _font(font_size)
  line_h = _line_height(font)
  wrapped = [wrap_text(cap, font, w - 4, max_caption_lines) for cap, w in zip(captions, widths, strict=True)]
  n_lines = max(len(lines) for lines in wrapped)
  caption_h = n_lines * line_h + (gap // 2 if n_lines else 0)

  total_w = gap + sum(w + gap for w in widths)
  title_font = _font(round(font_size * 1.2))
  title_h = _line_height(title_font) + gap // 2 if title else 0
  y_img = gap + title_h
  total_h = y_img + cell_h + caption_h + gap

  canvas = Image.new("RGB", (total_w, total_h), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  if title:
    text = _fit(" ".join(title.split()), title_font, total_w - 2 * gap)
    x = (total_w - title_font.getlength(text)) / 2
    draw.text((x, gap), text, font=title_font, fill=TEXT_COLOR)
  x = gap
  for cell, w, lines in zip(cells, widths, wrapped, strict=True):
    canvas.paste(Image.fromarray(cell), (x, y_img + (cell_h - cell.shape[0]) // 2))
    y = y_img + cell_h + gap // 2
    for line in lines:
      draw.text((x + (w - font.getlength(line)) / 2, y), line, font=font, fill=TEXT_COLOR)
      y += line_h
    x += w + gap
  return np.asarray(canvas, dtype=np.float32) / 255.0


def snapshot_strip(
  input_image: Any, snapshots: Sequence[Any], steps: Sequence[int], title: str | None = None
) -> np.ndarray:
  """Progress picture: the input, then the decoded edit at each saved step.

  Args:
    input_image: the source image [H, W, 3].
    snapshots: decoded images [H, W, 3], one per entry of `steps`.
    steps: optimization step of each snapshot (captioned "step k").
    title: optional title line.

  Returns:
    float32 [H', W', 3] grid (input | step k0 | step k1 ...).
  """
  if len(snapshots) != len(steps):
    raise ValueError(f"snapshot_strip: {len(snapshots)} snapshots but {len(steps)} steps")
  captions = ["input"] + [f"step {int(k)}" for k in steps]
  return grid([input_image, *snapshots], captions, title=title)


# ----------------------------------------------------------------------------------------------
# Heatmaps


def colormap(values: Any) -> np.ndarray:
  """Maps values in [0, 1] to viridis colors.

  Args:
    values: array of any shape; clipped to [0, 1], NaN reads as 0.

  Returns:
    float32 array of shape `values.shape + (3,)`.
  """
  v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0), 0.0, 1.0)
  pos = v * (len(_VIRIDIS) - 1)
  lo = np.minimum(np.floor(pos).astype(np.int32), len(_VIRIDIS) - 2)
  frac = (pos - lo)[..., None]
  return (_VIRIDIS[lo] * (1.0 - frac) + _VIRIDIS[lo + 1] * frac).astype(np.float32)


def _resize_map(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a 2-D float map (bilinear never overshoots the input range)."""
  if mask.shape == (height, width):
    return mask
  im = Image.fromarray(mask.astype(np.float32), mode="F")
  return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def mask_overlay(image: Any, mask: Any, alpha: float = 0.5, normalize: bool = False) -> np.ndarray:
  """Heatmap of a spatial mask (e.g. LUSD's attention mask M) blended over the image.

  Args:
    image: [H, W, 3] (or [H, W]) image in [0, 1] or uint8.
    mask: [h, w] map at any resolution (latent 64x64, attention 32x32...), resized bilinearly
      to [H, W]; a leading singleton axis ([1, h, w]) is accepted.
    alpha: weight of the heatmap, in [0, 1].
    normalize: min-max normalize the mask first (for raw attention maps); otherwise it is
      clipped to [0, 1], so a uniform mask of ones stays uniformly "on".

  Returns:
    float32 [H, W, 3]: `(1 - alpha) * image + alpha * viridis(mask)`.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"mask_overlay: alpha must be in [0, 1], got {alpha}")
  rgb = image_from_array(image)
  m = np.squeeze(np.asarray(mask, dtype=np.float32))
  if m.ndim != 2:
    raise ValueError(f"mask_overlay: mask must be 2-D, got shape {np.shape(mask)}")
  m = np.nan_to_num(m, nan=0.0)
  if normalize:
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
  m = _resize_map(np.clip(m, 0.0, 1.0), *rgb.shape[:2])
  return ((1.0 - alpha) * rgb + alpha * colormap(m)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Labelled parameter grids (the paper's tuning grids, Appendix 12)


def grid_layout(
  axes: Sequence[tuple[str, Sequence[str]]], seeds: Sequence[int], seed_index: int | None = None
):
  """Where each (config, seed) goes in `labelled_grid`.

  The configs are the product of the axes' values, row-major (the last axis varies fastest). One
  axis: a single row, one column per value. Two or more: one row per value of the first axis, one
  column per combination of the others (row-major). Seeds (all, or `seed_index`) are the innermost
  columns.

  Args:
    axes: ((name, value labels), ...), e.g. (("reg_scale", ("0", "0.02")), ("threshold", ("0.01",))).
    seeds: the seeds every config ran with [S].
    seed_index: show only `seeds[seed_index]` (default: every seed).

  Returns:
    (row_labels [R] (None for one row), col_labels [K], cells [R][K] of (config, seed) indices).
  """
  names = [name for name, _ in axes]
  seed_ids = range(len(seeds)) if seed_index is None else [seed_index]
  show_seed = seed_index is None and len(seeds) > 1
  sizes = tuple(len(values) for _, values in axes)
  row_axes, col_axes = ([], [0]) if len(sizes) == 1 else ([0], list(range(1, len(sizes))))

  def label(axis_ids, combo):
    return ", ".join(f"{names[a]}={axes[a][1][v]}" for a, v in zip(axis_ids, combo, strict=True))

  row_combos = list(itertools.product(*(range(sizes[a]) for a in row_axes)))
  col_combos = list(itertools.product(*(range(sizes[a]) for a in col_axes)))
  row_labels = [label(row_axes, r) for r in row_combos] if row_axes else None
  col_labels, cells = [], []
  for cc in col_combos:
    for si in seed_ids:
      col_labels.append(", ".join([label(col_axes, cc)] + ([f"seed {seeds[si]}"] if show_seed else [])))
  for rc in row_combos:
    row = []
    for cc in col_combos:
      index = [0] * len(sizes)
      for a, v in zip(row_axes + col_axes, rc + cc, strict=True):
        index[a] = v
      config = int(np.ravel_multi_index(index, sizes))
      row.extend((config, si) for si in seed_ids)
    cells.append(row)
  return row_labels, col_labels, cells


def labelled_grid(
  images_CS: Any,
  input_image: Any,
  axes: Sequence[tuple[str, Sequence[str]]],
  seeds: Sequence[int],
  title: str,
  seed_index: int | None = None,
  *,
  include_input: bool = True,
  gap: int = 8,
  min_cell: int = 160,
) -> np.ndarray:
  """Configs x seeds as a labelled grid, like the paper's tuning grids (Appendix 12).

  Rows: values of the first axis ("reg_scale=0.02"); columns: values of the other axes
  ("threshold=0.01" and, for more axes, one line per axis), with each seed as its own column
  ("seed 1") unless `seed_index` picks one. A one-axis grid is a single row. The input image heads
  the first row.

  Args:
    images_CS: [C, S, H, W, 3] in [0, 1]; config c is row-major over `axes` (`grid_layout`).
    input_image: [H, W, 3] in [0, 1].
    axes: ((name, value labels), ...), as `grid_layout`.
    seeds: [S] the seeds, for the column labels.
    title: the line above the grid.
    seed_index: show only `seeds[seed_index]` (default: every seed).
    include_input: prepend an "input" column (image in the first row only).
    gap: white margin in pixels.
    min_cell: images narrower than this are enlarged (nearest neighbour, integer factor) so that
      the labels fit.

  Returns:
    float32 [H', W', 3] in [0, 1].
  """
  row_labels, col_labels, cells = grid_layout(axes, seeds, seed_index)
  scale = max(1, math.ceil(min_cell / np.shape(images_CS)[3]))

  def tile(x):
    x = _as_rgb8(x)
    return np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)

  tiles = [[tile(images_CS[c, s]) for c, s in row] for row in cells]
  if include_input:
    col_labels = ["input"] + col_labels
    blank = np.full_like(tiles[0][0], 255)
    x = tile(input_image)
    tiles = [[x if r == 0 else blank] + row for r, row in enumerate(tiles)]
  h, w = tiles[0][0].shape[:2]
  font_size = max(11, round(w / 26))
  font, title_font = _font(font_size), _font(round(font_size * 1.2))
  line_h = _line_height(font)
  # One line (or two, wrapped) per "name=value" part of a column label.
  col_text = [
    [line for part in t.split(", ") for line in wrap_text(part, font, w - 4, 2)] for t in col_labels
  ]
  header_h = max(len(lines) for lines in col_text) * line_h + gap // 2
  label_w, row_text = 0, None
  if row_labels is not None:
    label_w = min(w, max(int(font.getlength(t)) for t in row_labels) + 4)
    row_text = [wrap_text(t, font, label_w, max(1, h // line_h)) for t in row_labels]
  title_h = _line_height(title_font) + gap // 2
  x0 = gap + (label_w + gap if label_w else 0)
  y0 = gap + title_h + header_h
  n_rows, n_cols = len(tiles), len(tiles[0])
  total_w = x0 + n_cols * (w + gap)
  total_h = y0 + n_rows * (h + gap)

  canvas = Image.new("RGB", (total_w, total_h), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  text = _fit(title, title_font, total_w - 2 * gap)
  draw.text(((total_w - title_font.getlength(text)) / 2, gap), text, font=title_font, fill=TEXT_COLOR)
  for k, lines in enumerate(col_text):
    x = x0 + k * (w + gap)
    y = y0 - gap // 2 - len(lines) * line_h
    for line in lines:
      draw.text((x + (w - font.getlength(line)) / 2, y), line, font=font, fill=TEXT_COLOR)
      y += line_h
  for r, row in enumerate(tiles):
    y = y0 + r * (h + gap)
    if row_text is not None:
      lines = row_text[r]
      ty = y + (h - len(lines) * line_h) / 2
      for line in lines:
        draw.text((gap + label_w - font.getlength(line), ty), line, font=font, fill=TEXT_COLOR)
        ty += line_h
    for k, t in enumerate(row):
      canvas.paste(Image.fromarray(t), (x0 + k * (w + gap), y))
  return np.asarray(canvas, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# UnifyEdit: masks and the adaptive time-step scheduler


def mask_image(mask_HW: Any, size: int | None = None) -> np.ndarray:
  """A mask as a white-on-black picture for grids (input | reconstruction | edit | mask).

  `mask_overlay` blends a viridis heatmap over the photo, which suits soft attention maps; a
  user's binary mask reads best as plain white on black, at the photo's size.

  Args:
    mask_HW: [h, w] mask (a leading singleton axis is accepted); values are clipped to [0, 1]
      (soft masks show as gray), NaN reads as 0.
    size: enlarge or shrink to [size, size] with nearest-neighbour sampling, so that a mask
      at latent resolution shows the very cells the method used; default: keep [h, w].

  Returns:
    float32 [h, w, 3] (or [size, size, 3]) in [0, 1].
  """
  m = np.asarray(mask_HW, dtype=np.float32)
  if m.ndim == 3 and m.shape[0] == 1:
    m = m[0]
  if m.ndim != 2:
    raise ValueError(f"mask_image: mask must be 2-D, got shape {np.shape(mask_HW)}")
  m = np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0)
  if size is not None and m.shape != (size, size):
    m = np.asarray(Image.fromarray(m, mode="F").resize((size, size), Image.Resampling.NEAREST))
  return np.repeat(m[..., None], 3, axis=-1).astype(np.float32)


def _log_scale_wanted(*curves: np.ndarray) -> bool:
  """Whether the positive values span more than two decades (then a log axis reads better)."""
  positive = np.concatenate([c[np.isfinite(c) & (c > 0)] for c in curves])
  return positive.size > 0 and float(positive.max()) > 100.0 * float(positive.min())


def scheduler_plot(
  lambda1_N: Any,
  lambda2_N: Any,
  sap_grad_N: Any,
  caa_grad_N: Any,
  title: str | None = None,
  tau1: float | None = None,
  tau2: float | None = None,
) -> np.ndarray:
  """UnifyEdit's scheduler over one run's denoising steps, as the paper's Fig. 5 / 11 draw it.

  Entry i of every array belongs to step index t = N - i (the order the denoising loop runs:
  t = T first, with T = N), and the x axis runs from T on the left down to 1. Left panel: the
  weights lambda1 (self-attention preservation, SAP) and lambda2 (cross-attention alignment,
  CAA). Right panel: the gradient magnitudes ||g_SAP|| and ||g_CAA||, on a log axis when their
  positive values span more than two decades (zeros, i.e. steps where a term was inactive, are
  then left out). Dashed vertical lines mark tau1 (CAA active while t >= tau1) and tau2 (SAP
  active while t >= tau2) when given.

  Drawn with matplotlib's Agg canvas directly (no pyplot), so the global backend (a notebook's
  inline one, say) is left alone; nothing is written: save the result with `io.save_png`.

  Args:
    lambda1_N: [N] lambda1 per step, N >= 1.
    lambda2_N: [N] lambda2 per step.
    sap_grad_N: [N] ||g_SAP|| per step (>= 0).
    caa_grad_N: [N] ||g_CAA|| per step (>= 0).
    title: a line above both panels, e.g. the prompts and the preset.
    tau1: L_CAA is active while t >= tau1 (a dashed line at tau1).
    tau2: L_SAP is active while t >= tau2.

  Returns:
    float32 [H, W, 3] in [0, 1] (about 340 x 900 pixels; taller with a title).

  Example:
    >>> io.save_png("scheduler.png", scheduler_plot(r.lambda1, r.lambda2, r.sap_grad, r.caa_grad))  # doctest: +SKIP
  """
  fig = scheduler_figure(lambda1_N, lambda2_N, sap_grad_N, caa_grad_N, title=title, tau1=tau1, tau2=tau2)
  fig.canvas.draw()
  rgba = np.asarray(fig.canvas.buffer_rgba())
  return rgba[..., :3].astype(np.float32) / 255.0


def scheduler_figure(
  lambda1_N: Any,
  lambda2_N: Any,
  sap_grad_N: Any,
  caa_grad_N: Any,
  title: str | None = None,
  tau1: float | None = None,
  tau2: float | None = None,
) -> Figure:
  """The matplotlib `Figure` that `scheduler_plot` renders, from the same arguments.

  For a vector file (`fig.savefig("scheduler.pdf")`) or a restyled plot.

  Returns:
    a `matplotlib.figure.Figure` with an Agg canvas and two axes (weights, gradient magnitudes).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  curves = [
    np.asarray(c, dtype=np.float64).reshape(-1) for c in (lambda1_N, lambda2_N, sap_grad_N, caa_grad_N)
  ]
  n = curves[0].size
  if n < 1 or any(c.size != n for c in curves):
    raise ValueError(
      f"scheduler_plot: the four curves need the same length >= 1, got {[c.size for c in curves]}"
    )
  lambda1, lambda2, sap, caa = curves
  t_N = np.arange(n, 0, -1)  # step index of each entry: T, T - 1, ..., 1
  marker = "o" if n <= 25 else None  # a short run (N = 1 above all) would otherwise draw no line

  fig = Figure(figsize=(9.0, 3.4 if title is None else 3.7), dpi=100)
  FigureCanvasAgg(fig)
  ax_l, ax_g = fig.subplots(1, 2)
  ax_l.plot(t_N, lambda1, marker=marker, markersize=3, color="tab:blue", label=r"$\lambda_1$ (SAP)")
  ax_l.plot(t_N, lambda2, marker=marker, markersize=3, color="tab:orange", label=r"$\lambda_2$ (CAA)")
  ax_l.set_ylabel("weight")
  log = _log_scale_wanted(sap, caa)
  for values, color, label in ((sap, "tab:blue", r"$\|g_{SAP}\|$"), (caa, "tab:orange", r"$\|g_{CAA}\|$")):
    shown = np.where(values > 0, values, np.nan) if log else values
    ax_g.plot(t_N, shown, marker=marker, markersize=3, color=color, label=label)
  if log:
    ax_g.set_yscale("log")
  else:
    ax_g.set_ylim(bottom=0.0)  # magnitudes: an all-zero run sits on the axis, not mid-panel
  ax_g.set_ylabel("gradient magnitude")
  for ax in (ax_l, ax_g):
    for tau, color, name in ((tau1, "tab:orange", r"$\tau_1$"), (tau2, "tab:blue", r"$\tau_2$")):
      if tau is not None:
        ax.axvline(
          float(tau), color=color, linestyle="--", linewidth=1.0, alpha=0.8, label=f"{name} = {float(tau):g}"
        )
    # T on the left, as the paper draws it; the half-step margins keep N = 1 from a singular range.
    ax.set_xlim(n + 0.5, 0.5)
    if n <= 10:
      ax.set_xticks(t_N)  # every step (the integer locator still ticks halves on a 1-step range)
    else:
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("denoising step t")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def fidelity_editability_plot(points: Any, title: str | None = None) -> np.ndarray:
  """The UnifyEdit paper's Fig. 7: editability (x) against fidelity (y), one panel per edit type.

  One marker per method (results folder), the same marker and color in every panel; the x axis is
  the mean CLIP-L score (higher = closer to the target prompt), the y axis the mean DINO structure
  distance (lower = structure kept), so that the lower right is better, which each panel says.
  Drawn with matplotlib's Agg canvas directly (no pyplot, the global backend is left alone);
  nothing is written: save the result with `io.save_png`.

  Args:
    points: `{panel: {method: (clip_score, dino_distance)}}`, panels in drawing order (e.g. "all",
      then the edit types); a NaN point (every edit failed) is left out of its panel.
    title: a line above the panels.

  Returns:
    float32 [H, W, 3] in [0, 1] (about 330 pixels high per row of at most three panels).

  Example:
    >>> io.save_png("scatter.png", fidelity_editability_plot({"all": {"lusd": (24.1, 0.031)}}))  # doctest: +SKIP
  """
  fig = fidelity_editability_figure(points, title)
  fig.canvas.draw()
  rgba = np.asarray(fig.canvas.buffer_rgba())
  return rgba[..., :3].astype(np.float32) / 255.0


def fidelity_editability_figure(points: Any, title: str | None = None) -> Figure:
  """The matplotlib `Figure` that `fidelity_editability_plot` renders, from the same arguments."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.lines import Line2D
  from matplotlib.ticker import MaxNLocator

  panels = list(points)
  if not panels:
    raise ValueError("fidelity_editability_plot: no panel to draw")
  methods = list(dict.fromkeys(m for p in panels for m in points[p]))
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(3.6 * cols, 3.3 * rows + (0.5 if title else 0.2) + 0.4), dpi=100)
  FigureCanvasAgg(fig)
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
  for ax, panel in zip(axes, panels, strict=False):
    for i, method in enumerate(methods):
      x, y = points[panel].get(method, (math.nan, math.nan))
      if np.isfinite(x) and np.isfinite(y):
        ax.scatter(
          [x], [y], marker=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}", s=60, edgecolors="black",
          linewidths=0.5, label=method, zorder=3,
        )  # fmt: skip
    ax.set_title(panel, fontsize=10)
    ax.set_xlabel("CLIP-L score (editability)", fontsize=8)
    ax.set_ylabel("DINO distance (fidelity)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(5))  # long tick labels of a narrow range would overlap
    ax.margins(0.25)  # one point per method: keep the markers off the frame
    ax.grid(alpha=0.3)
    ax.text(
      0.97, 0.03, "lower-right is better", transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
      color="0.35", style="italic",
    )  # fmt: skip
  for ax in axes[len(panels) :]:
    ax.set_visible(False)
  handles = [
    Line2D(
      [],
      [],
      marker=_MARKERS[i % len(_MARKERS)],
      linestyle="",
      markerfacecolor=f"C{i % 10}",
      markeredgecolor="black",
      markersize=8,
    )  # fmt: skip
    for i in range(len(methods))
  ]
  fig.legend(handles, methods, loc="lower center", ncol=min(len(methods), 4), fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.08 / rows + 0.02, 1, 1))
  return fig
