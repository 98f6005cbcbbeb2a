"""`lusd_jax.sweep` on the tiny random model: grid cells equal single edits, one program per shape.

Compiles: the sweep program (4 configs x 2 seeds = one batch of 8), the `pipeline.edit` program for
2 seeds (reused by the 4 reference edits), the text encoder and the VAE. The second sweep, with
other prompts, image, seeds and grid values, and the CLI run must not compile anything.
"""

import argparse
import json
import os

import jax
import numpy as np
import pytest

from lusd_jax import engine, io, loading, pipeline
from lusd_jax.cli import add_sweep_arguments, sweep_command
from lusd_jax.lusd.config import LUSDConfig
from lusd_jax.sweeps import (
  SweepResult,
  check_grid,
  grid_configs,
  grid_layout,
  sweep,
  sweep_grid_image,
)

SIZE = 64  # latent 8x8: attention at 8, 4, 2; LUSD captures self maps at 4 and cross maps at 2
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
# SD's per-element step is lr * 2000 / (64 * 64); lr = 1/64 keeps it on this 8x8 latent. With
# threshold 0.1 the tiny model's std(g) (~0.07) is rejected a few times per step (eta *= 0.9).
BASE = LUSDConfig(num_steps=3, lr=1 / 64, threshold_decay_rate=0.9)
GRID = {"reg_scale": [0.0, 0.05], "threshold": [0.0, 0.1]}
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def model():
  return loading.load_model("tiny-random")


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def result(model, image):
  return sweep(model, image, SOURCE, TARGET, GRID, seeds=SEEDS, base_config=BASE, size=SIZE)


def test_result_layout(result):
  c, s = 4, len(SEEDS)
  assert result.images.shape == (c, s, SIZE, SIZE, 3)
  assert result.latents.shape == (c, s, SIZE // 8, SIZE // 8, 4)
  assert result.rejections.shape == result.timesteps.shape == (c, s, BASE.num_steps)
  assert result.mask.shape == (c, s, SIZE // 8, SIZE // 8)
  assert result.grid_shape == (2, 2)
  assert result.labels == (
    "reg_scale=0, threshold=0",
    "reg_scale=0, threshold=0.1",
    "reg_scale=0.05, threshold=0",
    "reg_scale=0.05, threshold=0.1",
  )
  # Row-major: the last axis varies fastest.
  assert [(cfg.reg_scale, cfg.threshold) for cfg in result.configs] == [
    (0.0, 0.0),
    (0.0, 0.1),
    (0.05, 0.0),
    (0.05, 0.1),
  ]
  assert all(
    cfg.replace(reg_scale=BASE.reg_scale, threshold=BASE.threshold) == BASE for cfg in result.configs
  )
  # The grid really varies the edits: filtering redraws only with the threshold on, and the
  # pull to the source changes the latents.
  assert (result.rejections[[0, 2]] == 0).all() and (result.rejections[[1, 3]] > 0).all()
  assert not np.allclose(result.latents[0], result.latents[2])
  assert not np.allclose(result.latents[0, 0], result.latents[0, 1])


def test_cells_equal_single_edits(model, image, result):
  for c, config in enumerate(result.configs):
    single = pipeline.edit(model, image, SOURCE, TARGET, seeds=SEEDS, config=config, size=SIZE)
    np.testing.assert_allclose(
      result.latents[c], single.latents, atol=1e-5, rtol=1e-5, err_msg=result.labels[c]
    )
    np.testing.assert_array_equal(result.rejections[c], single.rejections)
    np.testing.assert_array_equal(result.timesteps[c], single.timesteps)
    # The mask min-max normalizes near-uniform attention maps of random weights: rounding grows.
    np.testing.assert_allclose(result.mask[c], single.mask, atol=1e-4)
    np.testing.assert_allclose(result.images[c], single.images, atol=1e-4)
    np.testing.assert_array_equal(result.input_image, single.input_image)
    cell = result.cell(c)
    assert cell.config == config and cell.seeds == single.seeds == SEEDS
    assert cell.edit_tokens == single.edit_tokens


def _count_compiles():
  """A list that gathers every jaxpr trace and backend compile event until unregistered."""
  events = []

  def listener(event, duration, **_):
    if event in ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration"):
      events.append(event)

  return events, listener


def test_second_sweep_with_other_prompts_and_values_does_not_compile(model, image, result):
  before = engine.run_chunk._cache_size()
  events, listener = _count_compiles()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    other = sweep(
      model,
      image[::-1],
      "a cat on a sofa",
      "a red dog on a sofa",
      {"spatial_reg": [True, False], "ds_high": [0.3, 0.2]},
      seeds=(5, 7),
      base_config=BASE.replace(lr=1 / 32, t_min=100),
      size=SIZE,
    )
    compiled_in_sweep = list(events)
    jax.jit(lambda x: x * 3 + 1)(np.float32(2))  # a new program: the listener does see it
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiled_in_sweep == []
  assert events  # (a trace at least, even where a persistent compilation cache holds the program)
  assert engine.run_chunk._cache_size() == before  # (other test files may have added programs)
  assert other.images.shape == result.images.shape
  assert other.labels[1] == "spatial_reg=True, ds_high=0.2"
  assert not np.allclose(other.latents[0], result.latents[0])


@pytest.mark.parametrize(
  "grid, words",
  [
    ({"num_steps": [3, 4]}, ["num_steps", "static"]),
    ({"gradient": ["sbp", "dds"]}, ["gradient", "static"]),
    ({"reg_scal": [0.1]}, ["reg_scal", "unknown"]),
    ({"edit_token_last_subtoken": [True, False]}, ["edit_token_last_subtoken", "prompt"]),
    ({"reg_scale": []}, ["reg_scale", "no values"]),
    ({"reg_scale": 0.1}, ["reg_scale", "list"]),
    ({"reg_scale": [0.1, 0.1]}, ["reg_scale", "repeats"]),
    ({"spatial_reg": [1, 0]}, ["spatial_reg", "bool"]),
    ({"t_min": [1.5]}, ["t_min", "int"]),
    ({"reg_scale": ["0.1"]}, ["reg_scale", "float"]),
    ({}, ["at least one"]),
  ],
)
def test_bad_grids_raise_naming_the_field(grid, words):
  with pytest.raises(ValueError) as err:
    sweep(None, None, SOURCE, TARGET, grid, base_config=BASE)
  for word in words:
    assert word in str(err.value)


def test_invalid_cell_config_names_the_cell():
  with pytest.raises(ValueError, match="reg_scale=2.*reg_scale must be in"):
    grid_configs(BASE, check_grid({"threshold": [0.01], "reg_scale": [0.0, 2.0]}))


def _fake_result(axes, seeds, size=16):
  configs, labels = grid_configs(BASE, axes)
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(len(configs), len(seeds), size, size, 3)).astype(np.float32)
  return SweepResult(
    images, None, np.zeros((size, size, 3), np.float32), "a", "b", tuple(seeds), tuple(axes), tuple(configs),
    tuple(labels), None, None, None, None, None, BASE, {},
  )  # fmt: skip


def test_grid_layout_rows_columns_and_seeds():
  three = (("reg_scale", (0.0, 0.05)), ("threshold", (0.005, 0.01)), ("anneal", (True, False)))
  rows, cols, cells = grid_layout(_fake_result(three, (3,)))
  assert rows == ["reg_scale=0", "reg_scale=0.05"]
  assert cols == [
    "threshold=0.005, anneal=True",
    "threshold=0.005, anneal=False",
    "threshold=0.01, anneal=True",
    "threshold=0.01, anneal=False",
  ]
  assert cells == [[(c, 0) for c in range(4)], [(c, 0) for c in range(4, 8)]]

  two = _fake_result((("reg_scale", (0.0, 0.05)), ("threshold", (0.005, 0.01))), (0, 1))
  rows, cols, cells = grid_layout(two)
  assert cols == [
    "threshold=0.005, seed 0",
    "threshold=0.005, seed 1",
    "threshold=0.01, seed 0",
    "threshold=0.01, seed 1",
  ]
  assert cells[1] == [(2, 0), (2, 1), (3, 0), (3, 1)]
  rows, cols, cells = grid_layout(two, seed_index=1)
  assert cols == ["threshold=0.005", "threshold=0.01"] and cells[0] == [(0, 1), (1, 1)]

  rows, cols, cells = grid_layout(_fake_result((("lr", (0.5, 1.0, 2.0)),), (0,)))
  assert rows is None and cols == ["lr=0.5", "lr=1", "lr=2"] and cells == [[(0, 0), (1, 0), (2, 0)]]


def test_grid_image_places_every_cell(result):
  img = sweep_grid_image(result, include_input=False, min_cell=SIZE)
  h, w = img.shape[:2]
  n_rows, n_cols = 2, 4  # reg_scale values; threshold values x seeds
  assert w > n_cols * (SIZE + 8) and h > n_rows * (SIZE + 8)
  # The bottom-right tile is the last config's last seed, at the bottom-right corner less the gap.
  tile = img[h - 8 - SIZE : h - 8, w - 8 - SIZE : w - 8]
  np.testing.assert_array_equal(io.to_uint8(tile), io.to_uint8(result.images[3, 1]))
  assert sweep_grid_image(result).shape[1] > w  # the input column


def test_sweep_command_writes_grid_cells_and_record(model, image, result, tmp_path, monkeypatch, capsys):
  io.save_png(tmp_path / "in.png", image)
  parser = add_sweep_arguments(argparse.ArgumentParser())
  # Same shapes as the fixture: the command reuses its compiled programs (and its model object).
  monkeypatch.setattr(loading, "load_model", lambda name, dtype="float32": model)
  out = tmp_path / "out"
  args = parser.parse_args(
    [str(tmp_path / "in.png"), "--source", SOURCE, "--target", TARGET, "--model", "tiny-random"]
    + ["--grid", "reg_scale=0,0.05", "--grid", "threshold=0,0.1", "--seeds", "0", "1", "--size", str(SIZE)]
    + ["--num-steps", "3", "--set", "lr=0.015625", "--set", "threshold-decay-rate=0.9", "--quiet"]
    + ["--out", str(out)]
  )
  assert sweep_command(args) == 0
  assert "sweep_grid.png" in capsys.readouterr().out
  record = json.loads((out / "sweep.json").read_text())
  assert record["grid"] == {"reg_scale": [0.0, 0.05], "threshold": [0.0, 0.1]}
  assert record["seeds"] == [0, 1] and record["source_prompt"] == SOURCE
  assert record["base_config"]["num_steps"] == 3 and record["base_config"]["threshold_decay_rate"] == 0.9
  assert [cell["label"] for cell in record["cells"]] == list(result.labels)
  assert record["cells"][3]["overrides"] == {"reg_scale": 0.05, "threshold": 0.1}
  assert record["cells"][1]["total_rejections"] == [int(r) for r in result.rejections[1].sum(axis=1)]
  assert (out / "sweep_grid.png").is_file() and (out / "input.png").is_file()
  for c, cell in enumerate(record["cells"]):
    for s, name in enumerate(cell["files"]):
      written = io.load_image(out / name, SIZE)
      np.testing.assert_array_equal(io.to_uint8(written), io.to_uint8(result.images[c, s]))
  assert record["cells"][3]["files"][1] == "reg_scale=0.05_threshold=0.1_seed1.png"


@pytest.mark.parametrize(
  "argv, words",
  [
    (["--grid", "num_steps=3,4"], ["num_steps", "static"]),
    (["--grid", "reg_scale=0,x"], ["reg_scale", "'x'"]),
    (["--grid", "reg_scale"], ["--grid", "FIELD="]),
    (["--grid", "lr=1", "--set", "lr=2"], ["lr", "--grid axis"]),
    (["--grid", "reg_scale=0,2"], ["reg_scale=2"]),
    (["--grid", "lr=1", "--seeds", "1", "1"], ["--seeds", "repeated"]),
    (["--grid", "lr=1", "--size", "100"], ["--size"]),
  ],
)
def test_sweep_command_bad_input_is_one_line_and_exit_2(argv, words, tmp_path, capsys):
  parser = add_sweep_arguments(argparse.ArgumentParser())
  args = parser.parse_args(
    [os.fspath(tmp_path / "missing.png"), "--target", "t", "--out", str(tmp_path)] + argv
  )
  assert sweep_command(args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err
  for word in words:
    assert word in err
