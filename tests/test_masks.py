"""User masks of local edits (UnifyEdit): one channel, cropped and resized like the photo, binary, checked."""

import numpy as np
import pytest
from PIL import Image

from lusd_jax import io
from lusd_jax.io import InputError


def _disc(height: int, width: int, cy: float, cx: float, r: float) -> np.ndarray:
  """bool [height, width], True inside the disc."""
  yy, xx = np.mgrid[:height, :width]
  return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def _expected(on_HW: np.ndarray, size: int) -> np.ndarray:
  """The photo's crop written out by hand, then (integer factor) area average > 0.5."""
  h, w = on_HW.shape
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = on_HW[top : top + side, left : left + side].astype(np.float64)
  f = side // size
  assert f * size == side, "test sizes must be integer factors"
  return (crop.reshape(size, f, size, f).mean(axis=(1, 3)) > 0.5).astype(np.float32)


def _save_l8(path, on_HW) -> str:
  Image.fromarray(on_HW.astype(np.uint8) * 255, mode="L").save(path)
  return str(path)


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(InputError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_disc_mask_at_the_photos_size_is_cropped_like_the_photo(tmp_path):
  # Landscape, odd excess (129 - 64 = 65: the extra column is cropped on the right), no resize.
  on = _disc(64, 129, 30, 70, 20)
  m = io.load_mask(_save_l8(tmp_path / "wide.png", on), 64, image_size=(129, 64))
  assert m.dtype == np.float32 and m.shape == (64, 64)
  assert set(np.unique(m)) == {0.0, 1.0}
  np.testing.assert_array_equal(m, on[:, 32:96].astype(np.float32))
  # Portrait, shrunk by 2 after the crop.
  on = _disc(256, 128, 140, 60, 40)
  m = io.load_mask(_save_l8(tmp_path / "tall.png", on), 64, image_size=(128, 256))
  np.testing.assert_array_equal(m, _expected(on, 64))
  assert 0 < m.sum() < m.size


def test_rgba_mask_uses_its_alpha(tmp_path):
  on = _disc(128, 192, 64, 96, 40)
  rgba = np.zeros((128, 192, 4), np.uint8)
  rgba[..., :3] = 255  # white color everywhere: the luminance would be a full mask
  rgba[..., 3] = on * 255
  Image.fromarray(rgba, mode="RGBA").save(tmp_path / "cut.png")
  np.testing.assert_array_equal(io.load_mask(tmp_path / "cut.png", 64), _expected(on, 64))
  # Fully opaque alpha carries no mask: the luminance is used.
  rgba[..., :3] = on[..., None] * 255
  rgba[..., 3] = 255
  Image.fromarray(rgba, mode="RGBA").save(tmp_path / "opaque.png")
  np.testing.assert_array_equal(io.load_mask(tmp_path / "opaque.png", 64), _expected(on, 64))


def test_16_bit_gray_mask_keeps_its_range(tmp_path):
  on = _disc(128, 128, 50, 70, 30)
  # 40000 / 65535 = 0.61 (on), 20000 / 65535 = 0.31 (off): an 8-bit conversion clipping at 255
  # would turn both white and the mask full.
  values = np.where(on, 40000, 20000).astype(np.uint16)
  Image.fromarray(values).save(tmp_path / "deep.png")
  with Image.open(tmp_path / "deep.png") as im:
    assert im.mode in ("I;16", "I")
  np.testing.assert_array_equal(io.load_mask(tmp_path / "deep.png", 64), _expected(on, 64))


def test_palette_and_one_bit_masks(tmp_path):
  on = _disc(64, 64, 20, 40, 15)
  Image.fromarray(on).convert("1").save(tmp_path / "bits.png")
  Image.fromarray(on.astype(np.uint8) * 255).convert("P").save(tmp_path / "pal.png")
  for name in ("bits.png", "pal.png"):
    np.testing.assert_array_equal(io.load_mask(tmp_path / name, 64), on.astype(np.float32))


def test_exif_orientation_applies_to_the_mask_and_the_size(tmp_path):
  stored = np.zeros((64, 128), bool)
  stored[:, :40] = True  # the left of the stored pixels
  exif = Image.Exif()
  exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the stored left becomes the top
  Image.fromarray(stored.astype(np.uint8) * 255).save(tmp_path / "rot.png", exif=exif)
  assert io.image_original_size(tmp_path / "rot.png") == (64, 128)
  upright = np.rot90(stored, k=-1)
  m = io.load_mask(tmp_path / "rot.png", 64, image_size=(64, 128))
  np.testing.assert_array_equal(m, upright[32:96].astype(np.float32))
  assert m[:8].sum() == m[:8].size and m[-8:].sum() == 0


def test_a_mask_of_another_size_names_both_sizes(tmp_path):
  path = _save_l8(tmp_path / "mask.png", _disc(64, 96, 32, 48, 20))
  message = _error(io.load_mask, path, 64, image_size=(100, 64))
  assert message.startswith("--mask:") and path in message
  assert "96x64" in message and "100x64" in message
  # The flag is the caller's.
  assert _error(io.load_mask, path, 64, (100, 64), flag="--masks").startswith("--masks:")


@pytest.mark.parametrize("fill, words", [(False, "is empty after cropping"), (True, "global edit")])
def test_empty_and_full_masks(tmp_path, fill, words):
  path = _save_l8(tmp_path / "mask.png", np.full((64, 96), fill))
  message = _error(io.load_mask, path, 64)
  assert message.startswith("--mask:") and words in message and path in message
  if fill:
    assert "omit --mask" in message
  else:
    assert "nothing to edit" in message


def test_a_mask_empty_only_after_the_crop(tmp_path):
  on = np.zeros((64, 160), bool)
  on[10:50, 5:40] = True  # all in the left margin: the crop keeps columns 48..111
  message = _error(io.load_mask, _save_l8(tmp_path / "margin.png", on), 64, image_size=(160, 64))
  assert "is empty after cropping" in message and "margin" in message
  # The same mask shifted into the kept square is fine.
  np.testing.assert_array_equal(
    io.mask_from_array(np.roll(on, 60, axis=1), 64), _expected(np.roll(on, 60, 1), 64)
  )


def test_mask_from_array_equals_the_same_pixels_as_png(tmp_path):
  on = _disc(192, 384, 100, 180, 70)
  from_file = io.load_mask(_save_l8(tmp_path / "m.png", on), 64, image_size=(384, 192))
  np.testing.assert_array_equal(from_file, _expected(on, 64))
  for x in (on, on.astype(np.float32), on.astype(np.float64)[..., None], on.astype(np.uint8) * 255):
    np.testing.assert_array_equal(io.mask_from_array(x, 64, image_size=(384, 192)), from_file)
  np.testing.assert_array_equal(io.mask_from_array(Image.open(tmp_path / "m.png"), 64), from_file)
  # Gray levels away from the threshold binarize the same in a PNG (8-bit) and as floats.
  # (Means of 9 pixels, each 0.3 or 0.7, never land on 0.5, nor do their 8-bit versions.)
  gray = np.where(on, 0.7, 0.3).astype(np.float32)
  Image.fromarray(np.round(gray * 255).astype(np.uint8)).save(tmp_path / "g.png")
  np.testing.assert_array_equal(io.mask_from_array(gray, 64), from_file)
  np.testing.assert_array_equal(io.load_mask(tmp_path / "g.png", 64), from_file)


def test_mask_from_array_errors_name_the_argument():
  good = _disc(64, 64, 32, 32, 10)
  assert _error(io.mask_from_array, np.stack([good] * 3, -1), 64).startswith("mask: a mask array must be")
  bad = good.astype(np.float32)
  bad[0, 0] = np.nan
  assert "NaN" in _error(io.mask_from_array, bad, 64)
  assert "[0, 1]" in _error(io.mask_from_array, good * 255.0, 64)
  assert "64x64" in _error(io.mask_from_array, good, 64, image_size=(64, 65))
  assert _error(io.mask_from_array, np.zeros((64, 64)), 64, flag="mask=").startswith(
    "mask=: the mask array is empty"
  )
  assert "global edit" in _error(io.mask_from_array, np.ones((64, 64), bool), 64)


def test_unreadable_mask_files_name_the_flag_and_the_file(tmp_path):
  assert _error(io.load_mask, tmp_path / "nope.png", 64).startswith("--mask: image not found")
  assert "directory" in _error(io.load_mask, tmp_path, 64)
  (tmp_path / "empty.png").write_bytes(b"")
  assert "empty file" in _error(io.load_mask, tmp_path / "empty.png", 64)
  (tmp_path / "junk.png").write_bytes(b"not an image at all")
  assert "not a recognized image format" in _error(io.load_mask, tmp_path / "junk.png", 64)
  _save_l8(tmp_path / "whole.png", _disc(64, 64, 32, 32, 10))
  data = (tmp_path / "whole.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
  message = _error(io.load_mask, tmp_path / "cut.png", 64)
  assert message.startswith("--mask: cannot read image") and "cut.png" in message
  assert _error(io.image_original_size, tmp_path / "nope.png").startswith("image not found")
