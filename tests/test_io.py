"""Image loading / saving and the batch-folder format, on real files written to tmp_path."""

import io as _io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lusd_jax import batchdir, examples
from lusd_jax import io as lio

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
  path = tmp_path / name
  im.save(path, **kw)
  return path


def _solid(mode: str, size, color) -> Image.Image:
  return Image.new(mode, size, color)


# ----------------------------------------------------------------------------------------------
# Size and geometry


@pytest.mark.parametrize("size", [64, 512, 768, np.int64(256)])
def test_validate_size_accepts_multiples_of_64(size):
  assert lio.validate_size(size) == int(size)


@pytest.mark.parametrize("size", [0, -64, 500, 65, 512.0, True, "512", None])
def test_validate_size_rejects_with_the_value_in_the_message(size):
  with pytest.raises(lio.InputError, match="--size must be a positive multiple of 64") as err:
    lio.validate_size(size)
  assert str(size) in str(err.value) or repr(size) in str(err.value)


@pytest.mark.parametrize(
  "w, h, box",
  [
    (300, 200, (50, 0, 250, 200)),
    (301, 200, (50, 0, 250, 200)),
    (200, 333, (0, 66, 200, 266)),
    (64, 64, (0, 0, 64, 64)),
  ],
)
def test_center_crop_box_matches_official_offsets(w, h, box):
  assert lio.center_crop_box(w, h) == box


def test_landscape_and_portrait_crop_keep_only_the_center(tmp_path):
  # 192x128: a 32-px red band on the left, blue on the right, green in the middle 128 columns.
  x = np.zeros((128, 192, 3), np.uint8)
  x[:] = GREEN
  x[:, :32] = RED
  x[:, 160:] = BLUE
  out = lio.load_image(_save(tmp_path, "wide.png", Image.fromarray(x)), 64)
  np.testing.assert_allclose(out, np.broadcast_to(np.array(GREEN) / 255, out.shape), atol=1e-6)
  # The same picture turned on its side crops rows instead.
  out_t = lio.load_image(_save(tmp_path, "tall.png", Image.fromarray(x.transpose(1, 0, 2).copy())), 64)
  np.testing.assert_allclose(out_t, out, atol=1e-6)


def test_off_center_content_is_cropped_away_not_squeezed(tmp_path):
  # A marker in the leftmost quarter of a 2:1 image must disappear, not be resized into view.
  x = np.full((64, 128, 3), 255, np.uint8)
  x[:, :30] = 0
  out = lio.load_image(_save(tmp_path, "m.png", Image.fromarray(x)), 64)
  assert out.min() == 1.0


def test_rgb_load_matches_the_official_preprocessing_exactly(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
  path = _save(tmp_path, "rgb.png", Image.fromarray(x))
  # Official `load_image`: crop the longer side with offset (long - short) // 2, `.resize(size)`.
  off = (230 - 150) // 2
  expected = np.array(Image.fromarray(x[:, off : off + 150]).resize((128, 128))) / 255.0
  out = lio.load_image(path, 128)
  assert out.dtype == np.float32 and out.shape == (128, 128, 3)
  np.testing.assert_array_equal(out, expected.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Mode conversion (files written in each mode, loaded at their own size so no resampling blurs)


def test_rgba_is_composited_on_white(tmp_path):
  x = np.zeros((64, 64, 4), np.uint8)
  x[:, :32] = (200, 10, 20, 0)  # fully transparent: white, whatever the color
  x[:, 32:48] = (200, 10, 20, 255)  # opaque: the color
  x[:, 48:] = (0, 0, 0, 128)  # half transparent black: mid gray
  out = lio.load_image(_save(tmp_path, "rgba.png", Image.fromarray(x, "RGBA")), 64)
  np.testing.assert_allclose(out[0, 0], [1, 1, 1])
  np.testing.assert_allclose(out[0, 40], np.array([200, 10, 20]) / 255, atol=1e-6)
  np.testing.assert_allclose(out[0, 60], [127 / 255] * 3, atol=1.5 / 255)


def test_la_gray_with_alpha_is_composited_on_white(tmp_path):
  x = np.zeros((64, 64, 2), np.uint8)
  x[:, :32] = (0, 0)
  x[:, 32:] = (60, 255)
  out = lio.load_image(_save(tmp_path, "la.png", Image.fromarray(x, "LA")), 64)
  np.testing.assert_allclose(out[5, 5], [1, 1, 1])
  np.testing.assert_allclose(out[5, 40], [60 / 255] * 3, atol=1e-6)


def test_l_grayscale_becomes_three_equal_channels(tmp_path):
  x = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
  out = lio.load_image(_save(tmp_path, "l.png", Image.fromarray(x, "L")), 64)
  assert out.shape == (64, 64, 3)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  np.testing.assert_allclose(out[..., 1], x / 255, atol=1e-6)


def test_palette_colors_and_transparency(tmp_path):
  im = Image.new("P", (64, 64), 0)
  im.putpalette([10, 20, 30, 250, 128, 0] + [0] * (256 * 3 - 6))
  im.paste(1, (32, 0, 64, 64))
  out = lio.load_image(_save(tmp_path, "p.png", im), 64)
  np.testing.assert_allclose(out[0, 0], np.array([10, 20, 30]) / 255, atol=1e-6)
  np.testing.assert_allclose(out[0, 63], np.array([250, 128, 0]) / 255, atol=1e-6)
  # Index 0 transparent (tRNS): reads as white.
  out_t = lio.load_image(_save(tmp_path, "pt.png", im, transparency=0), 64)
  np.testing.assert_allclose(out_t[0, 0], [1, 1, 1])
  np.testing.assert_allclose(out_t[0, 63], np.array([250, 128, 0]) / 255, atol=1e-6)


def test_cmyk_tiff_converts_to_rgb(tmp_path):
  im = Image.new("CMYK", (64, 64), (255, 0, 0, 0))  # pure cyan
  im.paste((0, 0, 0, 255), (0, 0, 32, 64))  # pure black
  out = lio.load_image(_save(tmp_path, "cmyk.tif", im), 64)
  np.testing.assert_allclose(out[0, 63], [0, 1, 1], atol=1e-6)
  np.testing.assert_allclose(out[0, 0], [0, 0, 0], atol=1e-6)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
  # PIL's own convert("L") clips at 255, which would make all three bands white.
  x = np.zeros((64, 64), np.uint16)
  x[:, 20:40] = 32768
  x[:, 40:] = 65535
  path = _save(tmp_path, "g16.png", Image.fromarray(x))
  assert Image.open(path).mode.startswith("I")
  out = lio.load_image(path, 64)
  np.testing.assert_allclose(out[0, [0, 30, 60], 0], [0, 128 / 255, 1], atol=1e-6)


def test_float_tiff_in_unit_range(tmp_path):
  x = np.full((64, 64), 0.25, np.float32)
  x[:, 32:] = 1.0
  path = _save(tmp_path, "f.tif", Image.fromarray(x, "F"))
  out = lio.load_image(path, 64)
  np.testing.assert_allclose(out[0, [0, 60], 1], [64 / 255, 1], atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
  # Stored 128x64 (w x h): red left half, blue right half. Orientation 6 means "rotate 90
  # degrees clockwise to display", so the viewer sees a 64x128 image, red on top.
  x = np.zeros((64, 128, 3), np.uint8)
  x[:, :64] = RED
  x[:, 64:] = BLUE
  exif = Image.Exif()
  exif[0x0112] = 6
  path = _save(tmp_path, "rot.jpg", Image.fromarray(x), exif=exif, quality=95)
  out = lio.load_image(path, 64)
  top, bottom = out[4, 32], out[60, 32]
  assert top[0] > 0.8 and top[2] < 0.2, top
  assert bottom[2] > 0.8 and bottom[0] < 0.2, bottom
  # Control: without the tag the same pixels give red left / blue right.
  plain = lio.load_image(_save(tmp_path, "plain.jpg", Image.fromarray(x), quality=95), 64)
  assert plain[32, 4, 0] > 0.8 and plain[32, 60, 2] > 0.8


# ----------------------------------------------------------------------------------------------
# Bad files


def _encoded(fmt: str) -> bytes:
  buf = _io.BytesIO()
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


@pytest.mark.parametrize(
  "name, content, reason",
  [
    ("half.png", _encoded("PNG")[:3000], "corrupt or truncated"),
    ("half.jpg", _encoded("JPEG")[:2000], "corrupt or truncated"),
    ("junk.png", b"definitely not an image" * 10, "not a recognized image format"),
    ("empty.jpg", b"", "empty file"),
  ],
  ids=["truncated-png", "truncated-jpeg", "not-an-image", "zero-bytes"],
)
def test_corrupt_files_raise_input_error_naming_the_path(tmp_path, name, content, reason):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(lio.InputError, match=reason) as err:
    lio.load_image(path, 64)
  assert str(path) in str(err.value)
  assert "\n" not in str(err.value)


def test_missing_file_and_directory(tmp_path):
  with pytest.raises(lio.InputError, match="image not found") as err:
    lio.load_image(tmp_path / "nope.png", 64)
  assert str(tmp_path / "nope.png") in str(err.value)
  with pytest.raises(lio.InputError, match="directory"):
    lio.load_image(tmp_path, 64)


def test_bad_size_is_checked_before_the_file(tmp_path):
  with pytest.raises(lio.InputError, match="--size"):
    lio.load_image(tmp_path / "nope.png", 100)


# ----------------------------------------------------------------------------------------------
# In-memory images


def test_image_from_array_dtypes_and_channels():
  u8 = np.array([[[0, 128, 255]]], np.uint8)
  np.testing.assert_allclose(lio.image_from_array(u8), u8 / 255)
  gray = lio.image_from_array(np.array([[0.0, 0.5]], np.float64))
  assert gray.shape == (1, 2, 3) and gray.dtype == np.float32
  np.testing.assert_allclose(gray[0, 1], [0.5] * 3)
  rgba = lio.image_from_array(np.array([[[0.0, 0.0, 0.0, 0.25]]], np.float32))
  np.testing.assert_allclose(rgba[0, 0], [0.75] * 3)
  u16 = lio.image_from_array(np.array([[65535]], np.uint16))
  np.testing.assert_allclose(u16[0, 0], [1, 1, 1])
  pil = lio.image_from_array(Image.new("LA", (3, 2), (0, 0)))
  np.testing.assert_allclose(pil, np.ones((2, 3, 3)))


@pytest.mark.parametrize(
  "x, reason",
  [
    (np.full((4, 4, 3), 2.0), r"in \[0, 1\]"),
    (np.full((4, 4, 3), -1.0), r"in \[0, 1\]"),
    (np.full((4, 4, 3), np.nan), "NaN"),
    (np.zeros((3, 16, 16)), "channels-first"),
    (np.zeros((0, 4, 3)), "zero size"),
    (np.zeros((2, 4, 4, 3)), "shape"),
    (np.zeros((4, 4, 3), np.int64), "dtype"),
  ],
)
def test_image_from_array_rejects_mistakes(x, reason):
  with pytest.raises(lio.InputError, match=reason):
    lio.image_from_array(x)


def test_image_from_array_with_size_equals_loading_the_png(tmp_path):
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (100, 140, 3), dtype=np.uint8)
  from_file = lio.load_image(_save(tmp_path, "x.png", Image.fromarray(x)), 64)
  np.testing.assert_array_equal(lio.image_from_array(x, 64), from_file)
  np.testing.assert_array_equal(lio.image_from_array(Image.fromarray(x), 64), from_file)
  # The float path skips PIL's 8-bit rounding between its two resize passes: on pixel noise
  # it differs from the 8-bit path by well under a level on average.
  diff = np.abs(lio.image_from_array(x / 255.0, 64) - from_file)
  assert diff.mean() < 0.5 / 255 and diff.max() < 0.05


# ----------------------------------------------------------------------------------------------
# Saving


def test_to_uint8_rounds_clips_and_zeroes_nan():
  x = np.array([0.0, 0.4 / 255, 0.6 / 255, 1.0, -0.5, 1.5, np.nan])
  np.testing.assert_array_equal(lio.to_uint8(x), [0, 0, 1, 255, 0, 255, 0])
  u8 = np.array([3], np.uint8)
  assert lio.to_uint8(u8) is u8


def test_save_png_roundtrip_and_no_temp_files(tmp_path):
  rng = np.random.default_rng(3)
  x = rng.random((32, 48, 3)).astype(np.float32)
  path = lio.save_png(tmp_path / "sub" / "out.png", x)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), lio.to_uint8(x))
  lio.save_png(path, np.zeros((8, 8, 3)))  # overwrite in place
  assert Image.open(path).size == (8, 8)
  assert sorted(p.name for p in path.parent.iterdir()) == ["out.png"]


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = lio.save_png(tmp_path / "out.png", np.ones((8, 8, 3)))
  before = path.read_bytes()
  with pytest.raises((TypeError, ValueError, KeyError)):
    lio.save_png(path, np.zeros((8, 8, 5)))  # PIL cannot encode 5 channels
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_write_json_atomic_converts_numpy_and_paths(tmp_path):
  obj = {
    "steps": np.int64(300),
    "lr": np.float32(0.5),
    "rejections": np.array([0, 2, 1]),
    "path": Path("a/b.png"),
    "prompt": "un chat \u00e0 chapeau",
  }
  path = lio.write_json_atomic(tmp_path / "run.json", obj)
  back = json.loads(path.read_text(encoding="utf-8"))
  assert back == {
    "steps": 300,
    "lr": 0.5,
    "rejections": [0, 2, 1],
    "path": "a/b.png",
    "prompt": obj["prompt"],
  }
  assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
  with pytest.raises(TypeError):
    lio.write_json_atomic(tmp_path / "bad.json", {"x": object()})
  assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


# ----------------------------------------------------------------------------------------------
# Batch folder


def _batch_dir(tmp_path: Path, csv_text: str, encoding: str = "utf-8", images=("cat.jpg",)) -> Path:
  (tmp_path / "images").mkdir()
  for name in images:
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
  (tmp_path / "index.csv").write_text(csv_text, encoding=encoding, newline="")
  return tmp_path


def test_read_index_official_format(tmp_path):
  d = _batch_dir(
    tmp_path,
    "img_path,source_prompt,target_prompt\n"
    "cat.jpg,a cat,a cat wearing a party hat\n"
    "\n"
    'dark_sky.jpg,,"thunder, and rain"\n',
  )
  rows = batchdir.read_index(d)
  assert [r.row for r in rows] == [0, 1]  # the blank line does not shift numbering
  assert rows[0] == batchdir.BatchRow(
    0, 2, d / "images" / "cat.jpg", "a cat", "a cat wearing a party hat", None
  )
  # Empty source prompt is valid (the official samples have one); missing image resolved to images/.
  assert rows[1].source_prompt == "" and rows[1].target_prompt == "thunder, and rain"
  assert rows[1].img_path == d / "images" / "dark_sky.jpg" and rows[1].problem is None


def test_read_index_edit_words_bom_and_reordered_columns(tmp_path):
  d = _batch_dir(
    tmp_path,
    "target_prompt, img_path ,source_prompt,edit_words,notes\n"
    "a cat wearing a party hat,cat.jpg,a cat,party hat,x\n"
    "a cup of matcha,cat.jpg,a cup of coffee,  ,y\n",
    encoding="utf-8-sig",
  )
  rows = batchdir.read_index(d)
  assert rows[0].img_path == d / "images" / "cat.jpg"  # BOM did not corrupt the first column name
  assert [r.edit_words for r in rows] == ["party hat", None]
  assert rows[1].source_prompt == "a cup of coffee"


def test_read_index_missing_column_names_file_and_column(tmp_path):
  d = _batch_dir(tmp_path, "img_path,source_prompt\ncat.jpg,a cat\n")
  with pytest.raises(lio.InputError, match="missing column 'target_prompt'") as err:
    batchdir.read_index(d)
  assert "index.csv" in str(err.value)


@pytest.mark.parametrize(
  "text, reason", [("", "empty"), ("img_path,source_prompt,target_prompt\n", "no rows")]
)
def test_read_index_empty_files(tmp_path, text, reason):
  with pytest.raises(lio.InputError, match=reason):
    batchdir.read_index(_batch_dir(tmp_path, text))


def test_read_index_missing_index_and_dir(tmp_path):
  with pytest.raises(lio.InputError, match="index.csv not found"):
    batchdir.read_index(tmp_path)
  with pytest.raises(lio.InputError, match="not a directory"):
    batchdir.read_index(tmp_path / "nope")


def test_read_index_not_utf8(tmp_path):
  d = _batch_dir(
    tmp_path, "img_path,source_prompt,target_prompt\ncat.jpg,caf\u00e9,th\u00e9\n", encoding="latin-1"
  )
  with pytest.raises(lio.InputError, match="UTF-8"):
    batchdir.read_index(d)


def test_read_index_keeps_bad_rows_with_a_problem(tmp_path):
  d = _batch_dir(
    tmp_path,
    "img_path,source_prompt,target_prompt\n"
    "cat.jpg,a cat,\n"  # empty target
    "cat.jpg,a cat\n"  # short row
    ",a cat,a dog\n"  # no image
    "cat.jpg,a cat,a cat, with a hat\n"  # unquoted comma
    "cat.jpg,a cat,a cat with a hat\n",
  )
  rows = batchdir.read_index(d)
  assert len(rows) == 5
  problems = [r.problem for r in rows]
  assert "empty target_prompt" in problems[0] and "line 2" in problems[0]
  assert "empty target_prompt" in problems[1]
  assert "empty img_path" in problems[2]
  assert "more fields" in problems[3]
  assert problems[4] is None


def test_read_index_records_reads_every_known_column(tmp_path):
  d = _batch_dir(
    tmp_path,
    " category ,img_path,target_prompt,gt_path,local_prompt,global_target_prompt,notes\n"
    "add, a.png ,a cat in a hat,gt/a.png,a hat,a photo of a cat in a hat,x\n"
    "\n"
    "change,b.png,a dog,,,,y,surplus\n",
  )
  records = batchdir.read_index_records(d / "index.csv", ("img_path", "target_prompt"))
  assert [(r.row, r.line) for r in records] == [(0, 2), (1, 4)]
  first = records[0].fields
  assert set(first) == set(
    batchdir.INDEX_COLUMNS
  )  # absent columns read as "", unknown ones ("notes") dropped
  assert (first["img_path"], first["category"], first["gt_path"]) == ("a.png", "add", "gt/a.png")
  assert (first["global_target_prompt"], first["source_prompt"], first["edit_words"]) == (
    "a photo of a cat in a hat",
    "",
    "",
  )
  assert records[0].extra == () and records[1].extra == ("surplus",)
  # The required columns are the caller's: the evaluation's dataset needs no source_prompt.
  with pytest.raises(lio.InputError, match="missing column 'source_prompt'"):
    batchdir.read_index_records(d / "index.csv", batchdir.REQUIRED_COLUMNS)


def test_image_paths_resolve_in_images_then_input_dir_then_absolute(tmp_path):
  d = _batch_dir(tmp_path, "", images=("a.png",))
  Image.new("RGB", (8, 8)).save(d / "b.png")
  absolute = tmp_path / "elsewhere.png"
  (d / "index.csv").write_text(
    f"img_path,source_prompt,target_prompt\na.png,x,y\nb.png,x,y\n{absolute},x,y\n", encoding="utf-8"
  )
  assert [r.img_path for r in batchdir.read_index(d)] == [d / "images" / "a.png", d / "b.png", absolute]


def test_output_names_and_resume(tmp_path):
  assert batchdir.output_name(7, 0) == "007_seed0.png"
  assert batchdir.output_name(1234, 12) == "1234_seed12.png"
  for row, seed in [(0, 0), (7, 1), (1234, 12), (3, 2**32 - 1)]:
    assert batchdir.parse_output_name(batchdir.output_name(row, seed)) == (row, seed)
  assert batchdir.parse_output_name("7_seed1.png") == (7, 1)  # unpadded rows are results too
  for other in [
    "007_grid.png",
    "007_seed1.json",
    "007_snapshots_seed1.png",
    "007_seed1.png\n",
    "a_seed1.png",
  ]:
    assert batchdir.parse_output_name(other) is None, other
  assert batchdir.pending_seeds(tmp_path / "not_yet", 0, [0, 1]) == [0, 1]
  lio.save_png(tmp_path / batchdir.output_name(3, 1), np.zeros((4, 4, 3)))
  (tmp_path / batchdir.output_name(3, 2)).write_bytes(b"")  # zero bytes: not finished
  (tmp_path / f".{batchdir.output_name(3, 0)}.abc.tmp").write_bytes(b"partial")  # a killed write
  assert batchdir.pending_seeds(tmp_path, 3, [0, 1, 2]) == [0, 2]
  assert batchdir.pending_seeds(tmp_path, 4, [1]) == [1]


def test_summarize_failures():
  assert batchdir.summarize_failures([]) == "all rows succeeded"
  text = batchdir.summarize_failures([(2, "image not found: x.png"), (10, "empty target_prompt")])
  assert text.splitlines() == [
    "2 row(s) failed:",
    "  row 002: image not found: x.png",
    "  row 010: empty target_prompt",
  ]


def test_input_error_is_one_line():
  assert str(lio.InputError("a\nb\r\nc")) == "a b c"
  assert isinstance(lio.InputError("x"), ValueError)


# ----------------------------------------------------------------------------------------------
# Examples


def test_examples_load_from_skimage():
  cat = examples.get_example("Cat")
  assert (cat.source, cat.target) == ("a cat", "a cat wearing a party hat")
  full = cat.image()
  assert full.shape == (300, 451, 3) and full.dtype == np.float32 and 0 <= full.min() < full.max() <= 1
  small = cat.image(64)
  assert small.shape == (64, 64, 3)
  assert examples.get_example("coffee").image(64).shape == (64, 64, 3)


def test_unknown_example_lists_the_choices():
  with pytest.raises(lio.InputError, match="choose one of: cat, coffee"):
    examples.get_example("dog")


def test_saved_files_are_readable_by_others(tmp_path):
  # mkstemp makes 0600 files; outputs must get the usual 0666 & ~umask like any other file.
  umask = os.umask(0o022)
  try:
    png = lio.save_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32))
    js = lio.write_json_atomic(tmp_path / "a.json", {"a": 1})
  finally:
    os.umask(umask)
  assert png.stat().st_mode & 0o777 == 0o644
  assert js.stat().st_mode & 0o777 == 0o644
