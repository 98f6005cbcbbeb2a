"""Rebuilds the bundled benchmark `examples/bench/` from photos that ship inside installed wheels.

    python examples/bench/build.py [OUT]      # default: this script's folder

Thirteen photos (scikit-image's `skimage.data`, matplotlib's sample data; sources and licences in
README.md), each cropped to a square by hand and resized to 512x512 (PIL Lanczos), are written as
JPEG (quality 90) to `OUT/images/`; sixteen edits with hand-written prompts, edit words, a local
description, a MagicBrush-style category and one of Unify-Bench's six edit types go to
`OUT/index.csv`; the masks of the local edits, drawn here as ellipses, rectangles and polygons placed
by hand over the object (one thresholded from the photo), go to `OUT/masks/` as binary PNGs (white =
edit). Global edits (style, and texture over the whole frame) have no mask.

Deterministic: the same wheels give the same pixels. index.csv and the masks depend on nothing but
this file; the JPEG bytes depend on the installed Pillow/libjpeg too (a different libjpeg may round
a few DCT coefficients differently), which is why `tests/test_bench.py` compares the rebuilt photos
by their pixels, within a JPEG-sized tolerance.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 512
JPEG_QUALITY = 90
COLUMNS = (
  "img_path", "source_prompt", "target_prompt", "edit_words", "mask_path", "edit_type",
  "local_prompt", "global_target_prompt", "category",
)  # fmt: skip


def _skimage(name: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    from skimage import data

    x = getattr(data, name)()
    return x[0] if isinstance(x, tuple) else x  # stereo_motorcycle: (left, right, disparity)

  return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data(name, asfileobj=False)) as im:
      return np.asarray(im.convert("RGB"))

  return load


@dataclass(frozen=True)
class Photo:
  """One photo: where it comes from and the square of it the benchmark keeps.

  Attributes:
    load: returns the original pixels, uint8 [H, W] or [H, W, 3].
    crop: (left, top, side) of the square in original pixels; None: the centered square.
  """

  load: Callable[[], np.ndarray]
  crop: tuple[int, int, int] | None = None


PHOTOS: dict[str, Photo] = {
  "astronaut": Photo(_skimage("astronaut")),
  "chelsea": Photo(_skimage("chelsea"), (140, 0, 300)),  # the cat's face, both eyes
  "coffee": Photo(_skimage("coffee")),
  "motorcycle": Photo(_skimage("stereo_motorcycle"), (130, 0, 500)),  # left view, the bike centered
  "coins": Photo(_skimage("coins")),
  "brick": Photo(_skimage("brick")),
  "grass": Photo(_skimage("grass")),
  "camera": Photo(_skimage("camera")),
  "rocket": Photo(_skimage("rocket")),
  "clock": Photo(_skimage("clock")),
  "hubble": Photo(_skimage("hubble_deep_field")),
  "gravel": Photo(_skimage("gravel")),
  "grace_hopper": Photo(_matplotlib("grace_hopper.jpg"), (0, 0, 512)),  # top square: cap and face
}


def square_photo(photo: Photo) -> Image.Image:
  """The photo's square at SIZE x SIZE (mode L for gray photos, RGB otherwise)."""
  x = photo.load()
  im = Image.fromarray(x)
  width, height = im.size
  if photo.crop is None:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
  else:
    left, top, side = photo.crop
  im = im.crop((left, top, left + side, top + side))
  if im.size != (SIZE, SIZE):
    im = im.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
  return im


# ----------------------------------------------------------------------------------------------
# Masks, in the 512x512 frame of the cropped photo (white = the region to edit)


def _draw(*shapes: tuple, invert: bool = False) -> Callable[[Image.Image], Image.Image]:
  """A mask from shapes: ("ellipse" | "rectangle", box), ("polygon", points); `-` prefix erases."""

  def make(_photo: Image.Image) -> Image.Image:
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    for kind, geometry in shapes:
      fill = 0 if kind.startswith("-") else 255
      getattr(d, kind.lstrip("-"))(geometry, fill=fill)
    return m.point(lambda v: 255 - v) if invert else m

  return make


def _bright_region(threshold: int, close: int) -> Callable[[Image.Image], Image.Image]:
  """A thresholded mask: pixels brighter than `threshold`, holes closed by a `close`-pixel filter."""

  def make(photo: Image.Image) -> Image.Image:
    m = photo.convert("L").point(lambda v: 255 if v > threshold else 0)
    # Closing (dilate, then erode) fills the dark engravings inside each coin.
    return m.filter(ImageFilter.MaxFilter(close)).filter(ImageFilter.MinFilter(close))

  return make


MASKS: dict[str, Callable[[Image.Image], Image.Image]] = {
  "chelsea_eyes": _draw(("rectangle", (0, 130, 380, 275))),
  "astronaut_helmet": _draw(("ellipse", (268, 335, 505, 530))),
  "camera_camera": _draw(("rectangle", (250, 130, 340, 215))),
  "coffee_coffee": _draw(("ellipse", (128, 118, 372, 245))),
  "motorcycle_body": _draw(
    (
      "polygon",
      [
        (0, 175),
        (120, 150),
        (200, 140),
        (330, 125),
        (420, 150),
        (505, 235),
        (505, 330),
        (395, 330),
        (300, 300),
        (160, 310),
        (90, 300),
        (0, 300),
      ],
    ),
  ),  # fmt: skip
  "coins_coins": _bright_region(threshold=140, close=5),
  "coffee_table": _draw(
    ("ellipse", (-20, 60, 495, 505)),
    ("ellipse", (85, 10, 400, 190)),
    ("rectangle", (380, 60, 420, 140)),
    invert=True,
  ),  # fmt: skip
  "rocket_sky": _draw(
    ("rectangle", (0, 0, SIZE, 400)),
    ("-rectangle", (245, 100, 305, SIZE)),
    ("-rectangle", (60, 140, 120, SIZE)),
    ("-rectangle", (390, 140, 435, SIZE)),
  ),  # fmt: skip
  "camera_park": _draw(
    (
      "polygon",
      [
        (40, 140),
        (140, 75),
        (175, 55),
        (230, 55),
        (265, 100),
        (340, 110),
        (345, 205),
        (275, 215),
        (255, 260),
        (245, SIZE),
        (0, SIZE),
        (0, 180),
      ],
    ),
    ("polygon", [(290, 175), (195, SIZE), (425, SIZE)]),
    invert=True,
  ),  # fmt: skip
  "astronaut_face": _draw(("ellipse", (175, 45, 265, 160))),
  "grace_hopper_face": _draw(("ellipse", (150, 140, 365, 330))),
}


# ----------------------------------------------------------------------------------------------
# The edits


@dataclass(frozen=True)
class Edit:
  """One row of index.csv (see lusd_jax/batchdir.py for the columns)."""

  photo: str
  edit_type: str  # Unify-Bench: color, texture, object, background, style, face
  source: str
  target: str
  edit_words: str  # words of `target` (LUSD's attention mask, UnifyEdit's s*)
  local: str  # local description of the edit: y_local of CLIP-T (MagicBrush protocol)
  category: str  # MagicBrush-style: add / change
  mask: str | None = None  # a key of MASKS; None: a global edit


EDITS: tuple[Edit, ...] = (
  Edit("chelsea", "object", "a cat", "a cat wearing sunglasses", "sunglasses", "sunglasses", "add", "chelsea_eyes"),
  Edit("astronaut", "object", "an astronaut next to a space helmet", "an astronaut next to a basketball",
       "basketball", "a basketball", "change", "astronaut_helmet"),
  Edit("camera", "object", "a man looking through a camera on a tripod",
       "a man looking through a telescope on a tripod", "telescope", "a telescope", "change", "camera_camera"),
  Edit("coffee", "color", "a cup of coffee", "a cup of matcha", "matcha", "a cup of green matcha", "change",
       "coffee_coffee"),
  Edit("motorcycle", "color", "a red motorcycle in a garage", "a green motorcycle in a garage", "green",
       "a green motorcycle", "change", "motorcycle_body"),
  Edit("coins", "color", "silver coins on a black background", "gold coins on a black background", "gold",
       "gold coins", "change", "coins_coins"),
  Edit("coffee", "texture", "a cup of coffee on a wooden table", "a cup of coffee on a marble table", "marble",
       "a marble table", "change", "coffee_table"),
  Edit("brick", "texture", "a brick wall", "a marble wall", "marble", "a marble wall", "change"),
  Edit("grass", "texture", "a close-up photo of grass", "a close-up photo of grass covered in frost", "frost",
       "grass covered in frost", "change"),
  Edit("rocket", "background", "a rocket on a launch pad under a blue evening sky",
       "a rocket on a launch pad under a starry night sky", "starry night", "a starry night sky", "change",
       "rocket_sky"),
  Edit("camera", "background", "a man with a camera in a park", "a man with a camera on a sandy beach",
       "sandy beach", "a sandy beach", "change", "camera_park"),
  Edit("clock", "style", "a blurry photo of a clock on a wall", "a watercolor painting of a clock on a wall",
       "watercolor painting", "a watercolor painting", "change"),
  Edit("hubble", "style", "a photo of galaxies in deep space", "an oil painting of galaxies in deep space",
       "oil painting", "an oil painting", "change"),
  Edit("gravel", "style", "a photo of gravel", "a pencil sketch of gravel", "pencil sketch", "a pencil sketch",
       "change"),
  Edit("astronaut", "face", "a portrait of a smiling woman astronaut",
       "a portrait of a smiling old woman astronaut", "old", "an old woman's face", "change", "astronaut_face"),
  Edit("grace_hopper", "face", "a portrait of an old woman in a navy uniform",
       "a portrait of a young woman in a navy uniform", "young", "a young woman's face", "change",
       "grace_hopper_face"),
)  # fmt: skip


def index_rows() -> list[dict[str, str]]:
  """The rows of index.csv, in EDITS order."""
  return [
    dict(
      img_path=f"{e.photo}.jpg",
      source_prompt=e.source,
      target_prompt=e.target,
      edit_words=e.edit_words,
      mask_path=f"masks/{e.mask}.png" if e.mask else "",
      edit_type=e.edit_type,
      local_prompt=e.local,
      global_target_prompt=e.target,
      category=e.category,
    )  # fmt: skip
    for e in EDITS
  ]


def _png(im: Image.Image) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="PNG", optimize=True)
  return buf.getvalue()


def _jpeg(im: Image.Image) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
  return buf.getvalue()


def build_files() -> dict[str, bytes]:
  """Every file of the benchmark folder, `{relative path: bytes}`, computed in memory."""
  squares = {name: square_photo(p) for name, p in PHOTOS.items()}
  files = {f"images/{name}.jpg": _jpeg(im) for name, im in squares.items()}
  for e in EDITS:
    if e.mask:
      files[f"masks/{e.mask}.png"] = _png(
        MASKS[e.mask](squares[e.photo]).point(lambda v: 255 if v > 127 else 0)
      )
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows(index_rows())
  files["index.csv"] = text.getvalue().encode("utf-8")
  return files


def main(argv: list[str]) -> int:
  out = Path(argv[0]) if argv else Path(__file__).resolve().parent
  files = build_files()
  for rel, data in sorted(files.items()):
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  total = sum(len(d) for d in files.values())
  print(f"wrote {len(files)} files ({total / 1e6:.2f} MB) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
