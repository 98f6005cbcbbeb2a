"""Pictures for people: captioned side-by-side grids, progress strips and mask heatmaps.

All functions take and return float [H, W, 3] images in [0, 1] (NumPy or JAX arrays in) and are
pure: nothing is written to disk here (`io.save_png` does that). Text uses PIL's bundled
default font, which exists on any machine with Pillow >= 10.1 (no system fonts needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lusd_jax.io import image_from_array, to_uint8

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (30, 30, 30)
ELLIPSIS = "\u2026"

# Matplotlib's viridis sampled at 17 evenly spaced points; linear interpolation between them is
# within 0.021 of the real map. Hand-written so that matplotlib stays a test-only dependency.
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
