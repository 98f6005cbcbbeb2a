"""The bundled benchmark `examples/bench/`: a valid dataset folder for both methods and `eval`, and
`build.py` rebuilds it from the wheels (nothing here runs a model)."""

from __future__ import annotations

import collections
import importlib.util
import io as _io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lusd_jax import batchdir, evaluation, io, loading
from lusd_jax.unifyedit import pipeline as ue
from lusd_jax.unifyedit.config import EDIT_TYPES, UnifyEditConfig

BENCH = Path(__file__).resolve().parent.parent / "examples" / "bench"


def _pixels(data_or_path) -> np.ndarray:
  src = _io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
  with Image.open(src) as im:
    return np.asarray(im)


def test_the_folder_is_a_valid_dataset_for_batch_and_eval():
  rows = batchdir.read_index(BENCH)  # the reader of `lusd-jax batch`
  assert len(rows) >= 12 and all(r.problem is None for r in rows)
  assert len({r.img_path for r in rows}) >= 12  # distinct real photos
  counts = collections.Counter(r.edit_type for r in rows)
  assert set(counts) == set(EDIT_TYPES) and min(counts.values()) >= 2, counts
  head = loading.load_model_head("tiny-random")  # tokenizer and schedule only, as the CLI checks
  for r in rows:
    with Image.open(r.img_path) as im:
      assert im.size == (512, 512), r.img_path
    if r.mask_path is not None:
      m = _pixels(r.mask_path)
      assert m.shape == (512, 512) and set(np.unique(m)) == {0, 255}, r.mask_path  # binary, not empty/full
    # The checks `lusd-jax batch --method unifyedit` runs before loading weights: the edit words
    # occur in the target prompt and give at most 4 edit tokens; the mask loads (not empty, not full).
    _, groups, mask = ue.check_unifyedit(
      head.tokenizer, head.schedule, r.source_prompt, r.target_prompt, UnifyEditConfig.preset(r.edit_type),
      r.edit_words, mask=r.mask_path, image_size=io.image_original_size(r.img_path), size=512,
    )  # fmt: skip
    assert groups and (mask is None) == (r.mask_path is None), r.row
  examples = evaluation.load_dataset(BENCH)  # the reader of `lusd-jax eval`
  assert [e.source_path for e in examples] == [str(r.img_path) for r in rows]
  assert all(e.local_prompt and e.category in ("add", "change") for e in examples)
  assert sum(f.stat().st_size for f in BENCH.rglob("*") if f.is_file()) < 2.5e6


def _load_build():
  spec = importlib.util.spec_from_file_location("bench_build", BENCH / "build.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up
  try:
    spec.loader.exec_module(module)
  finally:
    del sys.modules[spec.name]
  return module


def test_build_py_rebuilds_the_folder():
  pytest.importorskip("skimage")
  files = _load_build().build_files()
  on_disk = {
    str(p.relative_to(BENCH))
    for p in BENCH.rglob("*")
    if p.is_file() and (p.parent.name in ("images", "masks") or p.name == "index.csv")
  }
  assert set(files) == on_disk
  assert files["index.csv"] == (BENCH / "index.csv").read_bytes()
  for name, data in files.items():
    if name.startswith("masks/"):
      np.testing.assert_array_equal(_pixels(data), _pixels(BENCH / name), err_msg=name)
    elif name.startswith("images/"):
      # Another libjpeg may round a few coefficients differently: compare pixels, not bytes.
      new, old = _pixels(data).astype(np.int16), _pixels(BENCH / name).astype(np.int16)
      assert new.shape == old.shape and new.shape[:2] == (512, 512), name
      assert np.abs(new - old).mean() < 1.0, name
