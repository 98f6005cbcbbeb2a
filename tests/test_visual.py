"""Grids, progress strips and mask overlays: layout geometry and that text is really drawn."""

import numpy as np
import pytest

from lusd_jax import visual

GAP = 8


def _images(n: int, h: int = 64, w: int = 64) -> list[np.ndarray]:
  rng = np.random.default_rng(0)
  # Values k/255 so that the 8-bit canvas holds them exactly.
  return [(rng.integers(0, 256, (h, w, 3)) / 255.0).astype(np.float32) for _ in range(n)]


def _ink(region: np.ndarray) -> int:
  """Number of clearly non-white pixels (text is near-black on white)."""
  return int((region.min(axis=-1) < 0.5).sum())


def test_grid_geometry_and_exact_image_placement():
  imgs = _images(3)
  g = visual.grid(imgs, ["input", "seed 0", "seed 1"], gap=GAP)
  assert g.dtype == np.float32 and g.ndim == 3 and g.shape[2] == 3
  assert g.shape[1] == GAP + 3 * (64 + GAP)
  assert 0.0 <= g.min() and g.max() <= 1.0
  for i, img in enumerate(imgs):
    x = GAP + i * (64 + GAP)
    np.testing.assert_allclose(g[GAP : GAP + 64, x : x + 64], img, atol=1e-6)
  # Margins between images are white.
  assert g[GAP : GAP + 64, GAP + 64 : 2 * GAP + 64].min() == 1.0


def test_captions_are_drawn_under_their_own_image():
  imgs = [np.ones((64, 96, 3), np.float32)] * 2
  g = visual.grid(imgs, ["a cat", ""], gap=GAP)
  strip = g[GAP + 64 :]
  left, right = strip[:, GAP : GAP + 96], strip[:, 2 * GAP + 96 : 2 * GAP + 192]
  assert strip.shape[0] > GAP  # room for one caption line
  assert _ink(left) > 20
  assert _ink(right) == 0  # an empty caption leaves its strip blank


def test_different_captions_draw_different_text():
  imgs = _images(1)
  a = visual.grid(imgs, ["seed 0"])
  b = visual.grid(imgs, ["seed 1"])
  assert a.shape == b.shape and not np.array_equal(a, b)


def test_no_captions_no_strip():
  g = visual.grid(_images(2), ["", ""], gap=GAP)
  assert g.shape[0] == GAP + 64 + GAP


def test_long_caption_wraps_within_its_cell_and_is_ellipsized():
  long = "a cat wearing a party hat and sunglasses and a scarf " * 6
  imgs = [np.ones((64, 128, 3), np.float32)] * 2
  one = visual.grid(imgs, ["short", "short"], gap=GAP, max_caption_lines=2)
  two = visual.grid(imgs, ["short", long], gap=GAP, max_caption_lines=2)
  lines_h = two.shape[0] - one.shape[0]
  assert lines_h > 0  # a second line was added
  three = visual.grid(imgs, ["short", long], gap=GAP, max_caption_lines=3)
  assert three.shape[0] - two.shape[0] == lines_h  # one more line allowed, one more line used
  # The text of the second caption stays inside the second cell's columns.
  strip = two[GAP + 64 :]
  assert _ink(strip[:, : GAP + 128 + GAP // 2 - 1]) > 0  # first caption present
  assert _ink(strip[:, GAP + 128 + 2 : 2 * GAP + 128 - 2]) == 0  # nothing spills into the gap
  assert _ink(strip[:, 2 * GAP + 256 :]) == 0


def test_wrap_text_lines_fit_and_end_with_ellipsis():
  font = visual._font(16)
  text = "one two three four five six seven eight nine ten eleven twelve"
  lines = visual.wrap_text(text, font, 80, max_lines=2)
  assert len(lines) == 2 and all(font.getlength(line) <= 80 for line in lines)
  assert lines[-1].endswith(visual.ELLIPSIS)
  assert visual.wrap_text("  ", font, 80, 2) == []
  assert visual.wrap_text("a cat", font, 500, 2) == ["a cat"]
  word = visual.wrap_text("x" * 200, font, 50, 2)
  assert len(word) == 1 and font.getlength(word[0]) <= 50


def test_title_adds_a_line_of_text_on_top():
  imgs = _images(2)
  plain = visual.grid(imgs, ["a", "b"], gap=GAP)
  titled = visual.grid(imgs, ["a", "b"], title="a cat -> a cat wearing a party hat", gap=GAP)
  extra = titled.shape[0] - plain.shape[0]
  assert extra > 10 and titled.shape[1] == plain.shape[1]
  assert _ink(titled[:extra]) > 50
  # Images and captions moved down by exactly the title's height.
  np.testing.assert_allclose(titled[extra + GAP :], plain[GAP:], atol=1e-6)


def test_mixed_sizes_grayscale_and_uint8_inputs():
  tall = np.zeros((80, 40), np.float32)  # grayscale
  small = np.full((40, 40, 3), 255, np.uint8)
  g = visual.grid([tall, small], ["tall", "small"], gap=GAP)
  assert g.shape[1] == GAP + 40 + GAP + 40 + GAP
  # The small image is centered vertically in the 80-px row: white block at rows 20..60.
  x = 2 * GAP + 40
  assert g[GAP + 20 : GAP + 60, x : x + 40].min() == 1.0
  assert g[GAP : GAP + 80, GAP : GAP + 40].max() == 0.0


def test_grid_argument_errors():
  with pytest.raises(ValueError, match="captions"):
    visual.grid(_images(2), ["one"])
  with pytest.raises(ValueError, match="no images"):
    visual.grid([], [])


def test_snapshot_strip_is_a_captioned_grid():
  x, s1, s2 = _images(3)
  strip = visual.snapshot_strip(x, [s1, s2], [30, 60])
  np.testing.assert_array_equal(strip, visual.grid([x, s1, s2], ["input", "step 30", "step 60"]))
  with pytest.raises(ValueError, match="steps"):
    visual.snapshot_strip(x, [s1], [30, 60])


def test_colormap_matches_matplotlib_viridis():
  matplotlib = pytest.importorskip("matplotlib")
  t = np.linspace(0, 1, 101)
  ref = matplotlib.colormaps["viridis"](t)[:, :3]
  np.testing.assert_allclose(visual.colormap(t), ref, atol=0.03)
  np.testing.assert_allclose(visual.colormap([-1.0, 2.0, np.nan]), ref[[0, -1, 0]], atol=1e-3)


def test_mask_overlay_highlights_the_masked_region():
  image = np.full((64, 64, 3), 0.5, np.float32)
  mask = np.zeros((8, 8), np.float32)
  mask[:, 4:] = 1.0  # right half "on", at a lower resolution than the image
  out = visual.mask_overlay(image, mask, alpha=0.6)
  assert out.shape == (64, 64, 3) and out.dtype == np.float32
  lo, hi = visual.colormap(0.0), visual.colormap(1.0)
  np.testing.assert_allclose(out[10, 2], 0.4 * 0.5 + 0.6 * lo, atol=1e-5)
  np.testing.assert_allclose(out[10, 60], 0.4 * 0.5 + 0.6 * hi, atol=1e-5)
  # alpha 0 gives the image back; a raw map is min-max normalized on request.
  np.testing.assert_allclose(visual.mask_overlay(image, mask, alpha=0.0), image)
  raw = visual.mask_overlay(image, mask[None] * 7 + 3, alpha=1.0, normalize=True)
  np.testing.assert_allclose(raw[10, 60], hi, atol=1e-5)


def test_mask_overlay_errors():
  with pytest.raises(ValueError, match="2-D"):
    visual.mask_overlay(np.zeros((8, 8, 3)), np.zeros((2, 4, 4)))
  with pytest.raises(ValueError, match="alpha"):
    visual.mask_overlay(np.zeros((8, 8, 3)), np.zeros((4, 4)), alpha=2.0)


def test_labelled_grid_of_plain_arrays():
  # 2 x 3 configs (row-major: the last axis varies fastest) x 2 seeds, each image a distinct gray.
  c, s, size, gap = 6, 2, 16, 8
  levels = np.arange(c * s, dtype=np.float32).reshape(c, s) / (c * s)
  images = np.broadcast_to(levels[:, :, None, None, None], (c, s, size, size, 3))
  axes = (("a", ("1", "2")), ("b", ("x", "y", "z")))
  rows, cols, cells = visual.grid_layout(axes, (7, 9))
  assert rows == ["a=1", "a=2"] and cols[:2] == ["b=x, seed 7", "b=x, seed 9"] and len(cols) == 6
  assert cells[1][2:4] == [(4, 0), (4, 1)]
  g = visual.labelled_grid(
    images, np.zeros((size, size, 3)), axes, (7, 9), "t", include_input=False, min_cell=16
  )
  h, w = g.shape[:2]
  # Bottom-right tile: the last config's last seed; the one left of it, the same config's first seed.
  np.testing.assert_allclose(
    g[h - gap - size : h - gap, w - gap - size : w - gap], images[5, 1], atol=1 / 255
  )
  left = w - 2 * (gap + size)
  np.testing.assert_allclose(g[h - gap - size : h - gap, left : left + size], images[5, 0], atol=1 / 255)
  one_seed = visual.labelled_grid(images, np.zeros((size, size, 3)), axes, (7, 9), "t", seed_index=1)
  assert (
    one_seed.shape[1] < visual.labelled_grid(images, np.zeros((size, size, 3)), axes, (7, 9), "t").shape[1]
  )
