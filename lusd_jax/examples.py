"""Ready-made edits on photos bundled with scikit-image, for `lusd-jax edit --example NAME`.

The pictures are read at run time from `skimage.data` (no files ship with this package). The
prompts are the cat and coffee rows of the official LUSD `samples/index.csv`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lusd_jax.io import InputError, image_from_array, to_uint8


def _skimage_photo(name: str) -> Callable[[], np.ndarray]:
  """A loader for `skimage.data.<name>()` as float32 [H, W, 3] in [0, 1]."""

  def load() -> np.ndarray:
    try:
      from skimage import data  # imported lazily: it takes a second and only examples need it
    except ImportError as e:
      raise InputError("examples need scikit-image: pip install scikit-image") from e
    return image_from_array(getattr(data, name)())

  load.__name__ = f"skimage_{name}"
  return load


@dataclass(frozen=True)
class Example:
  """One example edit.

  Attributes:
    image_fn: returns the full-resolution photo, float32 [H, W, 3] in [0, 1].
    source: prompt describing the photo.
    target: prompt describing the wanted edit.
    edit_words: the words of `target` the edit is about (where LUSD's attention mask looks),
      or None to let the prompt diff decide.
    description: one line for `--help` / listings.
  """

  image_fn: Callable[[], np.ndarray]
  source: str
  target: str
  edit_words: str | None = None
  description: str = ""

  def image(self, size: int | None = None) -> np.ndarray:
    """The photo, center-cropped and resized to [size, size, 3] when `size` is given."""
    x = self.image_fn()
    # Through uint8 (exact for these 8-bit photos) so the crop/resize is the one files get.
    return x if size is None else image_from_array(to_uint8(x), size)


EXAMPLES: dict[str, Example] = {
  "cat": Example(
    image_fn=_skimage_photo("chelsea"),
    source="a cat",
    target="a cat wearing a party hat",
    edit_words="party hat",
    description="Chelsea the cat (skimage.data.chelsea): object insertion",
  ),
  "coffee": Example(
    image_fn=_skimage_photo("coffee"),
    source="a cup of coffee",
    target="a cup of matcha",
    edit_words="matcha",
    description="a cup of coffee (skimage.data.coffee): appearance change",
  ),
}


def get_example(name: str) -> Example:
  """Looks up an example by name (case-insensitive).

  Args:
    name: one of `EXAMPLES`' keys.

  Returns:
    The `Example`.

  Raises:
    InputError: unknown name; the message lists the valid names.
  """
  key = name.strip().lower()
  if key not in EXAMPLES:
    raise InputError(f"unknown example {name!r}; choose one of: {', '.join(sorted(EXAMPLES))}")
  return EXAMPLES[key]
