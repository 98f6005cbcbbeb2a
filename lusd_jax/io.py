"""Image files in and out, JSON records, atomic writes, and the input checks that run before a model loads.

(About 690 lines: most of it is the image conversions the official code gets wrong, kept beside
the loader that needs them.) UnifyEdit's local edits take a user mask, loaded by `load_mask` /
`mask_from_array`: reduced to one gray channel, then cropped and resized exactly like the photo.

Everything a user can get wrong here (a missing or corrupt image, a bad `--size`, a seed out of
range, an output folder that cannot be written) raises `InputError` with one line that names the
file or argument; the CLI prints that line and exits with status 2. The batch folder format
(index.csv, result names, resume) is `lusd_jax.batchdir`.

Preprocessing follows the official code (`colocation/pipeline_utils.py: load_image`): convert
to 8-bit RGB, center-crop the longer side to a square (offset `(long - short) // 2`), then
`PIL.Image.resize` with its default filter, which is BICUBIC for RGB images since Pillow 7.
On top of that we apply the EXIF orientation and convert the modes the official code would
get wrong (alpha, 16-bit and float grayscale) instead of clipping or blackening them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# SD's VAE downsamples by 8 and the U-Net by another 8, so pixel sizes must be multiples of 64.
SIZE_MULTIPLE = 64

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class InputError(ValueError):
  """A problem with the user's input, as one line naming the file or argument at fault.

  The CLI prints `str(err)` and exits with status 2; no traceback is shown.
  """

  def __init__(self, message: str):
    # Decoder messages can span lines; the CLI contract is one line.
    super().__init__(" ".join(str(message).splitlines()))


# ----------------------------------------------------------------------------------------------
# Checks that run before any model loads


SEED_LIMIT = 2**32  # jax.random.key takes a uint32 seed


def check_seeds(seeds: Iterable[Any], flag: str = "--seeds") -> tuple[int, ...]:
  """Checks a list of seeds: at least one, integers in [0, 2**32), no repeats.

  Args:
    seeds: the seeds of an edit (`jax.random.key(seed)` each).
    flag: how the message names the input (`--seeds` on the command line, `seeds` in Python).

  Returns:
    The seeds as a tuple of Python ints.

  Raises:
    InputError: naming `flag` and the bad seed.
  """
  seeds = list(seeds)
  if not seeds:
    raise InputError(f"{flag}: give at least one seed")
  out = []
  for s in seeds:
    if isinstance(s, bool) or not isinstance(s, int | np.integer):
      raise InputError(f"{flag}: seeds must be integers, got {s!r}")
    if not 0 <= int(s) < SEED_LIMIT:
      raise InputError(f"{flag}: seed {int(s)} is outside [0, 2**32)")
    out.append(int(s))
  repeated = sorted({s for s in out if out.count(s) > 1})
  if repeated:
    raise InputError(f"{flag}: seed {repeated[0]} is repeated in {out}")
  return tuple(out)


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
  """Checks, before any compute, that results can be written to folder `path`.

  The folder may not exist yet (it is created when the first result is written); then its nearest
  existing parent must be a writable folder. Writability is probed by creating and removing a
  temporary file, which also catches read-only file systems where `os.access` says yes (root).

  Args:
    path: the output folder.
    flag: the command-line flag (or argument) that named it, for the message.

  Returns:
    `path` as a `Path`.

  Raises:
    InputError: `path` (or a parent) is a file, or the folder cannot be written.
  """
  p = Path(path).expanduser()
  if p.exists() and not p.is_dir():
    raise InputError(f"{flag}: {p} is a file, not a folder")
  existing = p
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise InputError(f"{flag}: cannot create {p}: {existing} is a file")
  try:
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".lusd_jax_write_test.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise InputError(f"{flag}: cannot write to {existing} ({e.strerror or e})") from None
  return p


# ----------------------------------------------------------------------------------------------
# Size and geometry


def validate_size(size: Any) -> int:
  """Checks the working resolution.

  Args:
    size: side length in pixels of the square image that is edited.

  Returns:
    `size` as a Python int.

  Raises:
    InputError: unless `size` is a positive integer multiple of 64 (bools and floats are rejected
      so that `--size 512.5` or `True` never slip through).
  """
  if isinstance(size, bool) or not isinstance(size, int | np.integer):
    raise InputError(f"--size must be a positive multiple of {SIZE_MULTIPLE}, got {size!r}")
  size = int(size)
  if size <= 0 or size % SIZE_MULTIPLE:
    raise InputError(f"--size must be a positive multiple of {SIZE_MULTIPLE}, got {size}")
  return size


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
  """The largest centered square, as the official code crops it.

  Args:
    width: image width in pixels.
    height: image height in pixels.

  Returns:
    `(left, top, right, bottom)` for `PIL.Image.crop`; the offset along the longer side is
    `(long - short) // 2`, so an odd excess leaves the extra pixel on the right / bottom.
  """
  side = min(width, height)
  left = (width - side) // 2
  top = (height - side) // 2
  return left, top, left + side, top + side


def _crop_resize_rgb8(im: Image.Image, size: int) -> np.ndarray:
  """Center-crops an 8-bit RGB PIL image and resizes it; returns float32 [size, size, 3] in [0, 1]."""
  im = im.crop(center_crop_box(*im.size))
  if im.size != (size, size):
    # BICUBIC is PIL's default for RGB, which is what the official code gets from `.resize(size)`.
    im = im.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(im, dtype=np.float32) / 255.0


def _crop_resize_float(x_hwc: np.ndarray, size: int) -> np.ndarray:
  """Center-crops and bicubic-resizes a float [H, W, 3] image without quantizing to 8 bits."""
  left, top, right, bottom = center_crop_box(x_hwc.shape[1], x_hwc.shape[0])
  x_hwc = x_hwc[top:bottom, left:right]
  if x_hwc.shape[:2] == (size, size):
    return np.ascontiguousarray(x_hwc, dtype=np.float32)
  channels = [
    np.asarray(
      Image.fromarray(x_hwc[..., c].astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BICUBIC
      )
    )
    for c in range(x_hwc.shape[-1])
  ]
  # Bicubic overshoots at sharp edges; clip back into the valid range.
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Mode conversion


def _gray_to_unit(values: np.ndarray, mode: str) -> np.ndarray:
  """Scales single-channel high-bit-depth pixels to float [0, 1].

  PIL's own `convert("L")` clips 16-bit values at 255, turning almost any 16-bit photo white,
  so the range is mapped explicitly:
  - `I;16*` (16-bit PNG/TIFF): divide by 65535.
  - `I` (32-bit int; also how some Pillow versions open 16-bit PNGs): treated as 16-bit when
    the values fit in [0, 65535], otherwise min-max normalized.
  - `F` (float TIFF): used as is when in [0, 1], divided by 255 when in [0, 255], otherwise
    min-max normalized. NaNs become 0.
  """
  v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
  if mode in _INT16_MODES:
    scaled = v / 65535.0
  elif mode == "I" and lo >= 0 and hi <= 65535:
    scaled = v / 65535.0
  elif mode == "F" and lo >= 0 and hi <= 1.0:
    scaled = v
  elif mode == "F" and lo >= 0 and hi <= 255.0:
    scaled = v / 255.0
  else:
    scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
  return np.clip(scaled, 0.0, 1.0)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
  """Flattens an RGBA image onto white: transparent regions read as white paper, not black."""
  white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb8(im: Image.Image) -> Image.Image:
  """Converts a PIL image of any mode to 8-bit RGB.

  Args:
    im: a loaded PIL image: RGB, RGBA/LA/PA (composited on white), L/1, P (palette, with or
      without transparency), CMYK, YCbCr, LAB, HSV, I;16 / I (16-bit), or F (float).

  Returns:
    An RGB PIL image of the same size.

  Raises:
    InputError: for a mode PIL cannot convert to RGB.
  """
  if im.mode == "RGB":
    return im
  if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
    return _composite_on_white(im.convert("RGBA"))
  if im.mode in _INT16_MODES or im.mode in ("I", "F"):
    gray = _gray_to_unit(np.asarray(im), im.mode)
    return Image.fromarray(np.round(gray * 255.0).astype(np.uint8), mode="L").convert("RGB")
  try:
    return im.convert("RGB")
  except (ValueError, OSError) as e:
    raise InputError(f"unsupported image mode {im.mode!r}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Loading


def _open_rgb8(path: Path) -> Image.Image:
  """Opens, fully decodes, orients and converts an image file to RGB; errors name the path."""
  return _open_oriented(path, to_rgb8)


def _open_oriented(path: Path, convert: Callable[[Image.Image], Any]) -> Any:
  """Opens, fully decodes and orients an image file, then returns `convert(image)`; errors name the path.

  `convert` runs inside the error handling, so a decoder error it triggers reads like any other.
  """
  if not path.exists():
    raise InputError(f"image not found: {path}")
  if path.is_dir():
    raise InputError(f"expected an image file, got a directory: {path}")
  if path.stat().st_size == 0:
    raise InputError(f"cannot read image {path}: empty file (0 bytes)")
  try:
    with Image.open(path) as im:
      # `load()` decodes now, so a truncated file fails here and not halfway through the run.
      im.load()
      im = ImageOps.exif_transpose(im)
      if im.width == 0 or im.height == 0:
        raise InputError(f"image has zero size ({im.width}x{im.height}): {path}")
      return convert(im)
  except InputError:
    raise
  except UnidentifiedImageError as e:
    raise InputError(f"cannot read image {path}: not a recognized image format") from e
  except Image.DecompressionBombError as e:
    raise InputError(f"cannot read image {path}: too many pixels ({e})") from e
  except PermissionError as e:
    raise InputError(f"cannot read image {path}: permission denied") from e
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    # PIL reports corrupt / truncated data as OSError ("image file is truncated"),
    # SyntaxError (broken PNG chunks) or ValueError depending on the codec.
    raise InputError(f"cannot read image {path}: corrupt or truncated file ({e})") from e


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """Loads an image file as the square RGB input of an edit.

  EXIF orientation is applied, any mode is converted to RGB (see `to_rgb8`), the image is
  center-cropped to a square and resized to `size` with bicubic filtering, as the official code.

  Args:
    path: image file (any format PIL reads: PNG, JPEG, WebP, TIFF, BMP, GIF...).
    size: output side length, a positive multiple of 64.

  Returns:
    float32 array [size, size, 3] in [0, 1].

  Raises:
    InputError: bad size; missing path, directory, unreadable, corrupt, truncated or zero-size
      image. The message names the path.

  Example:
    >>> x = load_image("photos/cat.jpg", 512)  # doctest: +SKIP
  """
  size = validate_size(size)
  return _crop_resize_rgb8(_open_rgb8(Path(path)), size)


def _array_to_unit_hwc(x: np.ndarray) -> np.ndarray:
  """Checks and converts an HW / HWC array (uint8, uint16, bool or float in [0, 1]) to float RGB."""
  if x.ndim == 3 and x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
    raise InputError(f"image array has shape {x.shape}, which looks channels-first; expected [H, W, C]")
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
    raise InputError(f"image array must be [H, W], [H, W, 1|2|3|4]; got shape {x.shape}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise InputError(f"image array has zero size: shape {x.shape}")
  if x.dtype == np.bool_:
    x = x.astype(np.float32)
  elif x.dtype == np.uint8:
    x = x.astype(np.float32) / 255.0
  elif x.dtype == np.uint16:
    x = x.astype(np.float32) / 65535.0
  elif np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
      raise InputError("image array contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    # A small tolerance for round-off; [-1, 1] or [0, 255] inputs are mistakes worth reporting.
    if lo < -1e-3 or hi > 1.0 + 1e-3:
      raise InputError(f"float image values must be in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    x = np.clip(x, 0.0, 1.0)
  else:
    raise InputError(f"unsupported image array dtype {x.dtype}; use uint8, uint16 or float in [0, 1]")
  channels = x.shape[-1]
  if channels in (2, 4):
    # Last channel is alpha: composite on white as for files.
    color, alpha = x[..., :-1], x[..., -1:]
    x = color * alpha + (1.0 - alpha)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


def image_from_array(x: Any, size: int | None = None) -> np.ndarray:
  """Accepts an in-memory image for the Python API.

  Args:
    x: a PIL image (any mode; EXIF orientation applied), or an array-like (NumPy, JAX) of shape
      [H, W], [H, W, 1|2|3|4] with dtype uint8, uint16, bool or float in [0, 1]. A trailing
      2nd / 4th channel is alpha and is composited on white.
    size: if given, center-crop and resize to [size, size] as `load_image` does; otherwise the
      resolution is kept.

  Returns:
    float32 array [H, W, 3] (or [size, size, 3]) in [0, 1].

  Raises:
    InputError: unsupported shape or dtype, float values outside [0, 1], NaNs, zero size, bad size.
  """
  if size is not None:
    size = validate_size(size)
  if isinstance(x, Image.Image):
    if x.width == 0 or x.height == 0:
      raise InputError(f"image has zero size ({x.width}x{x.height})")
    try:
      rgb = to_rgb8(ImageOps.exif_transpose(x))
    except (OSError, SyntaxError, ValueError) as e:
      if isinstance(e, InputError):
        raise
      raise InputError(f"cannot decode PIL image: {e}") from e
    if size is not None:
      return _crop_resize_rgb8(rgb, size)
    return np.asarray(rgb, dtype=np.float32) / 255.0
  arr = np.asarray(x)
  if arr.dtype == np.uint8 and size is not None and arr.ndim == 3 and arr.shape[-1] == 3:
    # Same quantized path as files, so an array and its PNG give identical inputs.
    return _crop_resize_rgb8(Image.fromarray(arr), size)
  rgb = _array_to_unit_hwc(arr)
  return rgb if size is None else _crop_resize_float(rgb, size)


def image_original_size(path: str | os.PathLike) -> tuple[int, int]:
  """The size of an image file as the user sees it, before cropping: EXIF orientation applied.

  The CLI compares a mask's size with the photo's before any weights load. The file is fully
  decoded, so a corrupt photo fails here with the same message as `load_image`.

  Args:
    path: image file.

  Returns:
    `(width, height)` in pixels after EXIF orientation (a portrait JPEG stored sideways reports
    its upright size).

  Raises:
    InputError: missing, directory, unreadable, corrupt, truncated or zero-size image.
  """
  return _open_oriented(Path(path), lambda im: im.size)


# ----------------------------------------------------------------------------------------------
# Masks (UnifyEdit's local edits)

MASK_THRESHOLD = 0.5  # a pixel is "on" above this gray level (127.5 of 255)


def _mask_gray(im: Image.Image) -> np.ndarray:
  """One channel of a mask image as float [H, W] in [0, 1].

  The alpha channel when the image has one that is not fully opaque (a cut-out drawn on a
  transparent layer); otherwise the luminance, with 16-bit and float grays scaled by
  `_gray_to_unit` instead of PIL's clipping, and every other mode (palette, 1-bit, CMYK...)
  through 8-bit RGB and PIL's ITU-R 601 luma.
  """
  if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
    rgba = im.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    if alpha.min() < 255:
      return alpha.astype(np.float32) / 255.0
    im = rgba.convert("RGB")
  if im.mode in _INT16_MODES or im.mode in ("I", "F"):
    return _gray_to_unit(np.asarray(im), im.mode).astype(np.float32)
  gray = im if im.mode == "L" else to_rgb8(im).convert("L")
  return np.asarray(gray, dtype=np.float32) / 255.0


def _check_image_size(image_size: Any, flag: str) -> tuple[int, int]:
  """`image_size` as a (width, height) pair of positive ints (a programming error otherwise)."""
  try:
    width, height = (int(v) for v in image_size)
  except (TypeError, ValueError):
    raise ValueError(f"{flag}: image_size must be (width, height), got {image_size!r}") from None
  if width <= 0 or height <= 0:
    raise ValueError(f"{flag}: image_size must be positive, got {image_size!r}")
  return width, height


def _binary_mask(gray_HW: np.ndarray, size: int, image_size: Any, flag: str, name: str) -> np.ndarray:
  """Checks, crops, resizes and binarizes a gray mask like the photo (see `load_mask`).

  Args:
    gray_HW: float [H, W] in [0, 1].
    size: output side length (already validated).
    image_size: the photo's original (width, height), or None to skip the size check.
    flag: the flag or argument for messages ("--mask", "mask").
    name: how messages call the mask (its path, or "the mask array").

  Returns:
    float32 [size, size] with values 0.0 / 1.0, at least one of each.
  """
  height, width = gray_HW.shape
  if image_size is not None:
    photo_w, photo_h = _check_image_size(image_size, flag)
    if (width, height) != (photo_w, photo_h):
      raise InputError(
        f"{flag}: {name} is {width}x{height} but the photo is {photo_w}x{photo_h} (width x height); "
        "the mask must have the photo's size"
      )
  left, top, right, bottom = center_crop_box(width, height)
  cropped = gray_HW[top:bottom, left:right]
  resized = cropped
  if cropped.shape != (size, size):
    # BOX = area average: an output pixel is on when more than half of the mask area it covers
    # is on (exactly so for integer factors); enlarging, it repeats pixels. It never overshoots.
    im = Image.fromarray(np.ascontiguousarray(cropped, dtype=np.float32), mode="F")
    resized = np.asarray(im.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
  on = resized > MASK_THRESHOLD
  if not on.any():
    if (cropped > MASK_THRESHOLD).any():
      why = f" (its on-region is too small to survive resizing to {size}x{size})"
    elif (gray_HW > MASK_THRESHOLD).any():
      why = " (all of its on-pixels lie in the margin cropped away)"
    else:
      why = " (no pixel is above half gray)"
    raise InputError(
      f"{flag}: {name} is empty after cropping to the photo's square and binarizing at "
      f"{MASK_THRESHOLD}: nothing to edit{why}"
    )
  if on.all():
    raise InputError(
      f"{flag}: {name} covers the whole photo after cropping and binarizing at {MASK_THRESHOLD}; "
      f"a full mask is a global edit: omit {flag}"
    )
  return on.astype(np.float32)


def load_mask(
  path: str | os.PathLike, size: int, image_size: tuple[int, int] | None = None, flag: str = "--mask"
) -> np.ndarray:
  """Loads the user's mask of a local edit, cropped and resized exactly like the photo.

  White (on) marks the region to edit. The file is opened like `load_image` (EXIF orientation,
  any mode PIL reads) and reduced to one gray channel: the alpha channel if the image has one
  that is not fully opaque, otherwise the luminance (16-bit and float grays keep their
  precision). Then, like the photo: center-crop with `center_crop_box`, resize to `size` with a
  box filter (area average; pixel repetition when enlarging), and binarize at > 0.5.

  Args:
    path: mask image file, at the photo's original size.
    size: output side length, the photo's working size (a positive multiple of 64).
    image_size: the photo's original `(width, height)` after EXIF orientation
      (`image_original_size`); when given, a mask of another size is an error.
    flag: the command-line flag (or argument) that named the mask, for messages.

  Returns:
    float32 [size, size] with values exactly 0.0 and 1.0.

  Raises:
    InputError: one line starting with `flag`: unreadable file (as `load_image`), a size other
      than the photo's, a mask empty after cropping and binarizing (nothing to edit), or a full
      one (a global edit: omit the flag).

  Example:
    >>> m = load_mask("mask.png", 512, image_original_size("photo.jpg"))  # doctest: +SKIP
  """
  size = validate_size(size)
  path = Path(path)
  try:
    gray = _open_oriented(path, _mask_gray)
  except InputError as e:
    raise InputError(f"{flag}: {e}") from e
  return _binary_mask(gray, size, image_size, flag, str(path))


def mask_from_array(
  x: Any, size: int, image_size: tuple[int, int] | None = None, flag: str = "mask"
) -> np.ndarray:
  """`load_mask` for an in-memory mask (the Python API's `mask=` argument).

  Args:
    x: an array-like (NumPy, JAX) [H, W] or [H, W, 1] of bool, uint8, uint16 or float in [0, 1];
      or a PIL image of any mode, reduced to one channel as `load_mask` does.
    size: output side length (a positive multiple of 64).
    image_size: the photo's original `(width, height)`; when given, a mask of another size is an
      error.
    flag: the argument name for messages.

  Returns:
    float32 [size, size] with values exactly 0.0 and 1.0; equal to `load_mask` of the same
    pixels saved as a PNG.

  Raises:
    InputError: one line starting with `flag`: bad shape or dtype, values outside [0, 1] or NaN,
      a size other than the photo's, an empty or a full mask.
  """
  size = validate_size(size)
  if isinstance(x, Image.Image):
    if x.width == 0 or x.height == 0:
      raise InputError(f"{flag}: the mask image has zero size ({x.width}x{x.height})")
    try:
      gray = _mask_gray(ImageOps.exif_transpose(x))
    except InputError as e:
      raise InputError(f"{flag}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
      raise InputError(f"{flag}: cannot decode the mask image: {e}") from e
    return _binary_mask(gray, size, image_size, flag, "the mask image")
  arr = np.asarray(x)
  if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 1)):
    raise InputError(f"{flag}: a mask array must be [H, W] or [H, W, 1], got shape {arr.shape}")
  try:
    # Shared with images: dtype checks and scaling; the one gray channel comes back repeated.
    gray = _array_to_unit_hwc(arr)[..., 0]
  except InputError as e:
    raise InputError(f"{flag}: {str(e).replace('image', 'mask')}") from e
  return _binary_mask(gray, size, image_size, flag, "the mask array")


# ----------------------------------------------------------------------------------------------
# Saving


ROUNDINGS = ("round", "truncate")


def to_uint8(x: Any, rounding: str = "round") -> np.ndarray:
  """Float [0, 1] image to uint8 (uint8 input is returned unchanged).

  Args:
    x: array-like of any shape; values are clipped to [0, 1] and NaNs become 0.
    rounding: "round" to the nearest level, or "truncate" as the official LUSD code does
      (`(x * 255).astype(uint8)`, which darkens by half a level on average).

  Returns:
    uint8 array of the same shape.
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  x = np.asarray(x)
  if x.dtype == np.uint8:
    return x
  x = np.clip(np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0) * 255.0
  return (np.round(x) if rounding == "round" else np.floor(x)).astype(np.uint8)


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool) -> Path:
  """Writes through a temp file in the same folder, then renames it over `path`.

  `os.replace` is atomic on POSIX and Windows, so a killed run leaves either the old file or
  the new one, never a half-written file that a resumed batch would take as finished. Temp
  files are named `.{name}.*.tmp` and are removed if writing fails.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates 0600 files; give outputs the usual permissions (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path


def save_png(path: str | os.PathLike, x: Any, rounding: str = "round") -> Path:
  """Saves an image as PNG atomically.

  Args:
    path: destination; parent folders are created.
    x: [H, W, 3] or [H, W] image, float in [0, 1] or uint8 (NumPy or JAX).
    rounding: how floats become 8-bit levels (`to_uint8`).

  Returns:
    The path written.
  """
  im = Image.fromarray(to_uint8(x, rounding))
  return _atomic_write(path, lambda f: im.save(f, format="PNG"), binary=True)


def atomic_write_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> Path:
  """Saves named arrays as an uncompressed `.npz` atomically (see `save_png`)."""
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  return _atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)


def _json_default(obj: Any) -> Any:
  """Makes NumPy / JAX values, paths and dataclasses JSON-serializable."""
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return dataclasses.asdict(obj)
  if isinstance(obj, set | frozenset):
    return sorted(obj)
  if hasattr(obj, "__array__"):
    return np.asarray(obj).tolist()
  raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
  """Writes `obj` as indented UTF-8 JSON atomically (see `save_png`).

  Args:
    path: destination; parent folders are created.
    obj: JSON data; NumPy/JAX arrays and scalars, paths, sets and dataclasses are converted.

  Returns:
    The path written.
  """
  return _atomic_write(path, lambda f: f.write(json_text(obj)), binary=False)


# A JSON array with no array or object inside it, as json.dumps(indent=2) lays it out.
_FLAT_ARRAY_RE = re.compile(r"\[\n\s*([^\[\]{}]*?)\n\s*\]")


def json_text(obj: Any) -> str:
  """Indented JSON in which every array of plain values stays on one line (per-step records).

  JSON strings escape their newlines, so a newline inside an array is layout, never data.
  """
  text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default)
  one_line = lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",\n")) + "]"
  return _FLAT_ARRAY_RE.sub(one_line, text) + "\n"
