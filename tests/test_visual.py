"""Grids, progress strips, mask pictures and the scheduler plot: geometry, and that text and curves are really drawn."""

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


# UnifyEdit: the scheduler plot and mask pictures


def _schedule(n: int = 50, k: float = 0.08):
  """Eq. 14 over t = T..1 (entry i is t = T - i), and gradient norms that switch off at tau."""
  s = np.arange(n)  # T - t
  t = n - s
  lambda1, lambda2 = 5 * (1 - np.exp(-k * s)), 5 * np.exp(-k * s)
  sap = np.where(t >= n // 2, 3.0 + np.sin(s), 0.0)  # tau2 = T / 2
  caa = np.where(t >= n // 10, 1.0 + 0.1 * s, 0.0)  # tau1 = T / 10
  return lambda1, lambda2, sap, caa


def _colored(img: np.ndarray, rgb, tol: float = 0.12) -> int:
  """Number of pixels close to the color `rgb` (0..255)."""
  return int((np.abs(img - np.asarray(rgb) / 255.0).max(axis=-1) < tol).sum())


def test_scheduler_plot_is_an_rgb_picture_with_both_curves():
  import matplotlib

  backend = matplotlib.get_backend()
  img = visual.scheduler_plot(*_schedule(), title="a cat -> a red cat", tau1=5, tau2=25)
  assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
  assert 200 <= img.shape[0] <= 1200 and 400 <= img.shape[1] <= 2000
  assert 0.0 <= img.min() and img.max() <= 1.0
  assert _ink(img) > 2000  # axes, ticks, labels
  assert _colored(img, (31, 119, 180)) > 300 and _colored(img, (255, 127, 14)) > 300  # blue, orange lines
  untitled = visual.scheduler_plot(*_schedule(), tau1=5, tau2=25)
  assert untitled.shape[0] < img.shape[0]
  assert matplotlib.get_backend() == backend  # a notebook's inline backend is left alone


def test_scheduler_plot_changes_with_the_lambdas_and_the_taus():
  base = visual.scheduler_plot(*_schedule())
  lambda1, lambda2, sap, caa = _schedule()
  other = visual.scheduler_plot(lambda1, lambda2 * 0.5, sap, caa)
  assert other.shape == base.shape and np.abs(other - base).max() > 0.5
  assert not np.array_equal(visual.scheduler_plot(*_schedule(), tau1=5), base)


def test_scheduler_plot_one_step_and_all_zero_gradients():
  one = visual.scheduler_plot([0.0], [5.0], [0.0], [0.0], tau1=1, tau2=1)
  assert one.ndim == 3 and one.shape[0] >= 200 and _ink(one) > 1000
  zeros = np.zeros(10)
  flat = visual.scheduler_plot(np.linspace(0, 5, 10), np.linspace(5, 0, 10), zeros, zeros)
  assert np.isfinite(flat).all() and _ink(flat) > 1000
  with pytest.raises(ValueError, match="same length"):
    visual.scheduler_plot([1.0, 2.0], [1.0], [1.0, 1.0], [1.0, 1.0])
  with pytest.raises(ValueError, match="same length"):
    visual.scheduler_plot([], [], [], [])


def test_scheduler_figure_puts_step_T_on_the_left_and_picks_the_scale():
  lambda1, lambda2, sap, caa = _schedule(20)
  fig = visual.scheduler_figure(lambda1, lambda2, sap, caa, tau1=5, tau2=12)
  ax_l, ax_g = fig.axes
  line = ax_l.lines[0]
  np.testing.assert_array_equal(line.get_xdata(), np.arange(20, 0, -1))  # entry 0 is t = T = 20
  np.testing.assert_allclose(line.get_ydata(), lambda1)
  x_T, x_1 = (ax_l.transData.transform((t, 0.0))[0] for t in (20, 1))
  assert x_T < x_1
  assert ax_g.get_yscale() == "linear"  # 1 .. 4: no need for a log axis
  # Spanning six decades: log scale, and the zeros of switched-off steps are not drawn.
  wide = np.where(sap > 0, 10.0 ** -np.arange(20) * 1e3, 0.0)
  fig = visual.scheduler_figure(lambda1, lambda2, wide, caa)
  ax_g = fig.axes[1]
  assert ax_g.get_yscale() == "log"
  drawn = np.asarray(ax_g.lines[0].get_ydata(), dtype=np.float64)
  assert np.isnan(drawn[wide == 0]).all() and np.isfinite(drawn[wide > 0]).all()
  # The tau lines: two dashed verticals per panel at t = 5 and 12.
  fig = visual.scheduler_figure(lambda1, lambda2, sap, caa, tau1=5, tau2=12)
  dashed = [ln for ln in fig.axes[0].lines if ln.get_linestyle() == "--"]
  assert sorted(float(ln.get_xdata()[0]) for ln in dashed) == [5.0, 12.0]


def test_mask_image_is_white_on_black_and_resizes_by_nearest():
  m = np.zeros((4, 4), np.float32)
  m[1:3, 2:] = 1.0
  img = visual.mask_image(m)
  assert img.shape == (4, 4, 3) and img.dtype == np.float32
  np.testing.assert_array_equal(img[..., 0], m)
  np.testing.assert_array_equal(img[..., 0], img[..., 2])
  big = visual.mask_image(m[None], size=16)
  np.testing.assert_array_equal(big[..., 1], np.kron(m, np.ones((4, 4), np.float32)))
  np.testing.assert_array_equal(visual.mask_image([[2.0, np.nan]])[0, :, 0], [1.0, 0.0])
  with pytest.raises(ValueError, match="2-D"):
    visual.mask_image(np.zeros((2, 4, 4)))
  # A grid takes it like any image.
  g = visual.grid([np.full((16, 16, 3), 0.5, np.float32), big], ["edit", "mask"], gap=GAP)
  np.testing.assert_array_equal(g[GAP : GAP + 16, 2 * GAP + 16 : 2 * GAP + 32], big)
