"""Hyperparameter sweeps: a grid of LUSD configs x seeds as one compiled program.

`sweep` edits one image with every combination of the grid's values (row-major over the grid's
axes, in the order the dict gives them) and every seed. The grid's keys are `LUSDConfig` fields
that `LUSDConfig.numeric()` passes traced (numbers and ablation switches), so the C x S edits are
one batch of the engine's program (`engine.run_chunk`): no recompilation across grid values, prompts or
images of the same size, only when the grid's shape, the seeds' count, `num_steps` or `gradient`
change. Each cell is exactly the edit `lusd_jax.edit` makes with that config and seed.

`sweep_grid_image` draws the results like the paper's tuning grids (Appendix 12): one row per value
of the first axis, one column per value of the others (and per seed), labelled "reg_scale=0.02".

  res = lusd_jax.sweep(model, "cat.png", "a cat", "a cat wearing a party hat",
                       grid={"reg_scale": [0.0, 0.02, 0.05], "threshold": [0.005, 0.01]}, seeds=[0, 1])
  res.images.shape                  # (6, 2, 512, 512, 3): [C, S, H, W, 3]
  res.labels[1]                     # 'reg_scale=0, threshold=0.01'
  io.save_png("grid.png", sweep_grid_image(res))

Command line: `lusd-jax sweep IMAGE --target ... --grid reg_scale=0,0.02,0.05 --grid
threshold=0.005,0.01` writes sweep_grid.png, one PNG per cell and seed, and sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from lusd_jax import examples, io, pipeline, sharding, visual
from lusd_jax.loading import SDModel
from lusd_jax.lusd import core
from lusd_jax.lusd.config import _BOOL_NUMERIC, _INT_NUMERIC, LUSDConfig, LUSDNumeric, stack_numeric

# Read by the prompt analysis before the optimization: one value for the whole sweep.
_PROMPT_FIELDS = ("edit_token_last_subtoken",)


class SweepResult(NamedTuple):
  """What `sweep` returns (C = configs, the product of the grid's sizes; S = seeds; N = steps)."""

  images: np.ndarray  # [C, S, H, W, 3] float32 in [0, 1]
  latents: np.ndarray  # [C, S, h, w, 4] final latents (scaled)
  input_image: np.ndarray  # [H, W, 3] the preprocessed input
  source_prompt: str
  target_prompt: str
  seeds: tuple[int, ...]  # [S]
  axes: tuple[tuple[str, tuple], ...]  # the grid: ((field, values), ...) in the dict's order
  configs: tuple[LUSDConfig, ...]  # [C], row-major over `axes` (the last axis varies fastest)
  labels: tuple[str, ...]  # [C], e.g. "reg_scale=0.02, threshold=0.01"
  rejections: np.ndarray  # [C, S, N] redraws before acceptance at each step
  timesteps: np.ndarray  # [C, S, N] accepted t at each step
  hit_max_attempts: np.ndarray  # [C, S] bool: some step accepted after max_attempts draws
  mask: np.ndarray | None  # [C, S, h, w] final moving-average mask (None: no edit words)
  edit_tokens: Any  # prompts.EditTokens, shared by every cell
  base_config: LUSDConfig  # the config the grid's values override
  timings: dict
  zero_gradient_steps: np.ndarray | None = None  # [C, S] int: steps whose g was exactly 0

  @property
  def grid_shape(self) -> tuple[int, ...]:
    """Sizes of the grid's axes (their product is C)."""
    return tuple(len(values) for _, values in self.axes)

  def cell(self, c: int) -> pipeline.EditResult:
    """Config c's edits as the `EditResult` that `lusd_jax.edit` returns for them (no snapshots)."""
    known = dict(
      images=self.images[c],
      latents=self.latents[c],
      input_image=self.input_image,
      source_prompt=self.source_prompt,
      target_prompt=self.target_prompt,
      seeds=self.seeds,
      rejections=self.rejections[c],
      timesteps=self.timesteps[c],
      hit_max_attempts=self.hit_max_attempts[c],
      zero_gradient_steps=None if self.zero_gradient_steps is None else self.zero_gradient_steps[c],
      mask=None if self.mask is None else self.mask[c],
      snapshot_steps=(),
      edit_tokens=self.edit_tokens,
      config=self.configs[c],
      timings=self.timings,
    )
    return pipeline.EditResult(**{f: known.get(f) for f in pipeline.EditResult._fields})


# ----------------------------------------------------------------------------- the grid


def _field_kind(name: str) -> type:
  return bool if name in _BOOL_NUMERIC else int if name in _INT_NUMERIC else float


def _check_value(name: str, value: Any) -> Any:
  """`value` as the Python type of field `name`; ValueError naming the field otherwise."""
  kind = _field_kind(name)
  if kind is bool:
    if isinstance(value, bool | np.bool_):
      return bool(value)
  elif kind is int:
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
      return int(value)
  elif isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_):
    if math.isfinite(float(value)):
      return float(value)
  raise io.InputError(f"grid: {name} takes {kind.__name__} values, got {value!r}")


def check_grid(grid: Mapping[str, Sequence[Any]]) -> tuple[tuple[str, tuple], ...]:
  """Validates a sweep grid: keys are traced `LUSDConfig` fields, values non-empty lists of their type.

  Args:
    grid: {field: [values]}, e.g. {"reg_scale": [0.0, 0.02], "threshold": [0.005, 0.01]}.

  Returns:
    The axes ((field, values), ...) in the dict's order.

  Raises:
    io.InputError (a ValueError) naming the field: unknown, static (num_steps, gradient: a new
      program each), read by the prompt analysis, empty, repeated values or a value of the wrong type.
  """
  if not grid:
    raise io.InputError("grid: give at least one field with values, e.g. {'reg_scale': [0.0, 0.02]}")
  fields = {f.name for f in dataclasses.fields(LUSDConfig)}
  axes = []
  for name, values in grid.items():
    if name not in fields:
      raise io.InputError(f"grid: unknown LUSDConfig field {name!r}")
    if name in _PROMPT_FIELDS:
      raise io.InputError(f"grid: {name} is read by the prompt analysis and cannot vary within a sweep")
    if name not in LUSDNumeric._fields:
      raise io.InputError(
        f"grid: {name} is a static field (it shapes the compiled program); run one sweep per value"
      )
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
      raise io.InputError(f"grid: {name} needs a list of values, got {values!r}")
    values = tuple(_check_value(name, v) for v in values)
    if not values:
      raise io.InputError(f"grid: {name} has no values")
    if len(set(values)) != len(values):
      raise io.InputError(f"grid: {name} repeats a value in {list(values)}")
    axes.append((name, values))
  return tuple(axes)


def format_value(value: Any) -> str:
  """A grid value as a short label: 0.02 -> "0.02", 1e-05 -> "1e-05", 50 -> "50", True -> "True"."""
  return format(value, "g") if isinstance(value, float) else str(value)


def grid_configs(
  base: LUSDConfig, axes: Sequence[tuple[str, Sequence]]
) -> tuple[list[LUSDConfig], list[str]]:
  """The configs of a grid, row-major (the last axis varies fastest), and their labels.

  Raises:
    io.InputError: naming the cell whose config `LUSDConfig` rejects (e.g. t_max <= t_min).
  """
  names = [name for name, _ in axes]
  configs, labels = [], []
  for combo in itertools.product(*(values for _, values in axes)):
    label = ", ".join(f"{n}={format_value(v)}" for n, v in zip(names, combo, strict=True))
    try:
      configs.append(base.replace(**dict(zip(names, combo, strict=True))))
    except ValueError as e:
      raise io.InputError(f"grid cell {label}: {e}") from None
    labels.append(label)
  return configs, labels


# ----------------------------------------------------------------------------- the sweep


def sweep(
  model: SDModel,
  image,
  source_prompt: str,
  target_prompt: str,
  grid: Mapping[str, Sequence[Any]],
  seeds: Sequence[int] = (0,),
  base_config: LUSDConfig | None = None,
  edit_words: str | None = None,
  *,
  token_positions: Sequence[int] | None = None,
  size: int = 512,
  progress: bool = False,
  announce: Callable[[str], None] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  chunk_size: int | None = None,
) -> SweepResult:
  """Edits `image` once per (grid config, seed), all C x S edits in one compiled program.

  Args:
    model: from `lusd_jax.load_model`.
    image: a path, a PIL image or an [H, W, 3] array (as `lusd_jax.edit`).
    source_prompt: describes the input ("" is allowed).
    target_prompt: describes the wanted edit.
    grid: {LUSDConfig field: [values]} over traced fields (numbers and switches, e.g. "reg_scale",
      "threshold", "spatial_reg"); C = the product of the lists' lengths.
    seeds: every config runs with the same seeds (`jax.random.key(seed)` each, as `edit`).
    base_config: the config the grid overrides (default `LUSDConfig()`); sets num_steps, gradient.
    edit_words: words of the target prompt to build the attention mask from (default: inferred).
    token_positions: explicit edit-token positions in the target prompt (instead of edit_words).
    size: image side, a multiple of 64.
    progress: show a progress bar over the optimization steps.
    announce: where to print the one-line notes (edit tokens, long prompts); default: nowhere.
    mesh: a `sharding.data_mesh()` to spread the C x S edits over devices (None: one device).
    chunk_size: steps per compiled call (the progress bar moves between chunks).

  Returns:
    `SweepResult`: `images[c, s]` is config `configs[c]` (label `labels[c]`) with `seeds[s]`.

  Raises:
    ValueError (`io.InputError`): a grid key that is unknown or static, a bad value, bad inputs.
    core.NonFiniteError: naming the step, seed and config of a NaN/inf.

  Example:
    >>> res = sweep(model, "cat.png", "a cat", "a cat in a hat", grid={"reg_scale": [0.0, 0.05]}, seeds=[0, 1])  # doctest: +SKIP
    >>> res.images.shape  # doctest: +SKIP
    (2, 2, 512, 512, 3)
  """
  base = LUSDConfig() if base_config is None else base_config
  announce = announce or (lambda _msg: None)
  axes = check_grid(grid)
  configs, labels = grid_configs(base, axes)
  timings = {}
  t0 = time.perf_counter()
  prep = pipeline.prepare_edit(
    model, image, source_prompt, target_prompt, seeds, base, edit_words,
    token_positions=token_positions, size=size, announce=announce,
  )  # fmt: skip
  seeds = prep.seeds
  c, s = len(configs), len(seeds)
  # Flatten configs x seeds (config-major) into one batch: element c * S + i is (configs[c], seeds[i]).
  numeric_B = jax.tree.map(lambda x: jnp.repeat(x, s, axis=0), stack_numeric(configs))
  keys_B = prep.keys[jnp.tile(jnp.arange(s), c)]
  inputs_B = sharding.broadcast_batch(prep.inputs, c * s)
  ids = [f"seed {seed} with {label}" for label in labels for seed in seeds]
  jax.block_until_ready(inputs_B)
  timings["encode_s"] = time.perf_counter() - t0

  n = base.num_steps
  if progress:
    chunk_size = pipeline.progress_chunk_size(n, chunk_size)
  t1 = time.perf_counter()
  desc = f"LUSD sweep {c} config(s) x {s} seed(s)"
  with pipeline.step_progress(n, desc, enabled=progress) as on_chunk:
    out = core.optimize_batch(
      core.FlaxUNet(model.configs.unet, model.unet_dtype),
      model.params.unet,
      inputs_B,
      keys_B,
      numeric_B,
      static=base.static(),
      schedule=model.configs.schedule,
      mesh=mesh,
      chunk_size=chunk_size,
      ids=ids,
      on_chunk=on_chunk,
    )
  timings["optimize_s"] = time.perf_counter() - t1

  t2 = time.perf_counter()
  images = pipeline.decode_latents(model, out.z)
  timings["decode_s"] = time.perf_counter() - t2
  cs = lambda x: x.reshape((c, s) + x.shape[1:])
  return SweepResult(
    images=cs(images),
    latents=cs(out.z),
    input_image=prep.image,
    source_prompt=source_prompt,
    target_prompt=target_prompt,
    seeds=seeds,
    axes=axes,
    configs=tuple(configs),
    labels=tuple(labels),
    rejections=cs(out.rejections),
    timesteps=cs(out.t),
    hit_max_attempts=cs(out.hit_max_attempts.any(axis=1)),
    mask=None if prep.edit_tokens.uniform else cs(out.mask),
    edit_tokens=prep.edit_tokens,
    base_config=base,
    timings=timings,
    zero_gradient_steps=cs(out.zero_gradient.sum(axis=1)),
  )


# ----------------------------------------------------------------------------- pictures and records


def grid_layout(result: SweepResult, seed_index: int | None = None):
  """Where each edit goes in `sweep_grid_image`.

  One grid axis: a single row, one column per value. Two or more: one row per value of the first
  axis, one column per combination of the others (row-major). Seeds (all, or `seed_index`) are
  the innermost columns.

  Returns:
    (row_labels [R] (None for one row), col_labels [K], cells [R][K] of (config, seed) indices).
  """
  names = [name for name, _ in result.axes]
  seeds = range(len(result.seeds)) if seed_index is None else [seed_index]
  show_seed = seed_index is None and len(result.seeds) > 1
  sizes = result.grid_shape
  row_axes, col_axes = ([], [0]) if len(sizes) == 1 else ([0], list(range(1, len(sizes))))

  def label(axis_ids, combo):
    return ", ".join(
      f"{names[a]}={format_value(result.axes[a][1][v])}" for a, v in zip(axis_ids, combo, strict=True)
    )

  row_combos = list(itertools.product(*(range(sizes[a]) for a in row_axes)))
  col_combos = list(itertools.product(*(range(sizes[a]) for a in col_axes)))
  row_labels = [label(row_axes, r) for r in row_combos] if row_axes else None
  col_labels, cells = [], []
  for cc in col_combos:
    for si in seeds:
      col_labels.append(
        ", ".join([label(col_axes, cc)] + ([f"seed {result.seeds[si]}"] if show_seed else []))
      )
  for rc in row_combos:
    row = []
    for cc in col_combos:
      index = [0] * len(sizes)
      for a, v in zip(row_axes + col_axes, rc + cc, strict=True):
        index[a] = v
      config = int(np.ravel_multi_index(index, sizes))
      row.extend((config, si) for si in seeds)
    cells.append(row)
  return row_labels, col_labels, cells


def sweep_grid_image(
  result: SweepResult,
  seed_index: int | None = None,
  *,
  include_input: bool = True,
  gap: int = 8,
  min_cell: int = 160,
) -> np.ndarray:
  """The sweep as a labelled grid, like the paper's tuning grids (Appendix 12).

  Rows: values of the first grid axis ("reg_scale=0.02"); columns: values of the other axes
  ("threshold=0.01" and, for more axes, one line per axis), with each seed as its own column
  ("seed 1") unless `seed_index` picks one. A one-axis grid is a single row. The input image heads
  the first row.

  Args:
    result: from `sweep`.
    seed_index: show only `result.seeds[seed_index]` (default: every seed).
    include_input: prepend an "input" column (image in the first row only).
    gap: white margin in pixels.
    min_cell: images narrower than this are enlarged (nearest neighbour, integer factor) so that
      the labels fit.

  Returns:
    float32 [H', W', 3] in [0, 1].
  """
  row_labels, col_labels, cells = grid_layout(result, seed_index)
  scale = max(1, math.ceil(min_cell / result.images.shape[3]))

  def tile(x):
    x = visual._as_rgb8(x)
    return np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)

  tiles = [[tile(result.images[c, s]) for c, s in row] for row in cells]
  if include_input:
    col_labels = ["input"] + col_labels
    blank = np.full_like(tiles[0][0], 255)
    x = tile(result.input_image)
    tiles = [[x if r == 0 else blank] + row for r, row in enumerate(tiles)]
  h, w = tiles[0][0].shape[:2]
  font_size = max(11, round(w / 26))
  font, title_font = visual._font(font_size), visual._font(round(font_size * 1.2))
  line_h = visual._line_height(font)
  # One line (or two, wrapped) per "name=value" part of a column label.
  col_text = [
    [line for part in t.split(", ") for line in visual.wrap_text(part, font, w - 4, 2)] for t in col_labels
  ]
  header_h = max(len(lines) for lines in col_text) * line_h + gap // 2
  label_w, row_text = 0, None
  if row_labels is not None:
    label_w = min(w, max(int(font.getlength(t)) for t in row_labels) + 4)
    row_text = [visual.wrap_text(t, font, label_w, max(1, h // line_h)) for t in row_labels]
  title = f'"{result.source_prompt}" -> "{result.target_prompt}"'
  title_h = visual._line_height(title_font) + gap // 2
  x0 = gap + (label_w + gap if label_w else 0)
  y0 = gap + title_h + header_h
  n_rows, n_cols = len(tiles), len(tiles[0])
  total_w = x0 + n_cols * (w + gap)
  total_h = y0 + n_rows * (h + gap)

  canvas = Image.new("RGB", (total_w, total_h), visual.BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  text = visual._fit(title, title_font, total_w - 2 * gap)
  draw.text(((total_w - title_font.getlength(text)) / 2, gap), text, font=title_font, fill=visual.TEXT_COLOR)
  for k, lines in enumerate(col_text):
    x = x0 + k * (w + gap)
    y = y0 - gap // 2 - len(lines) * line_h
    for line in lines:
      draw.text((x + (w - font.getlength(line)) / 2, y), line, font=font, fill=visual.TEXT_COLOR)
      y += line_h
  for r, row in enumerate(tiles):
    y = y0 + r * (h + gap)
    if row_text is not None:
      lines = row_text[r]
      ty = y + (h - len(lines) * line_h) / 2
      for line in lines:
        draw.text((gap + label_w - font.getlength(line), ty), line, font=font, fill=visual.TEXT_COLOR)
        ty += line_h
    for k, t in enumerate(row):
      canvas.paste(Image.fromarray(t), (x0 + k * (w + gap), y))
  return np.asarray(canvas, dtype=np.float32) / 255.0


def cell_file_name(result: SweepResult, c: int, s: int) -> str:
  """File name of config c with seed index s, e.g. "reg_scale=0.02_threshold=0.01_seed0.png"."""
  combo = np.unravel_index(c, result.grid_shape)
  parts = [f"{name}={format_value(values[i])}" for (name, values), i in zip(result.axes, combo, strict=True)]
  return "_".join(parts) + f"_seed{result.seeds[s]}.png"


def sweep_record(result: SweepResult, model: SDModel, model_id: str | None = None) -> dict:
  """The JSON run record of a sweep: inputs, grid, edit tokens, base config, per-cell statistics."""
  per_cell = [pipeline.run_record(result.cell(c), model, model_id) for c in range(len(result.configs))]
  shared = {k: v for k, v in per_cell[0].items() if k not in _CELL_KEYS}
  cells = []
  for c, rec in enumerate(per_cell):
    overrides = {name: getattr(result.configs[c], name) for name, _ in result.axes}
    files = [cell_file_name(result, c, s) for s in range(len(result.seeds))]
    cells.append(
      {"label": result.labels[c], "overrides": overrides, "files": files}
      | {k: rec[k] for k in _CELL_KEYS if k in rec}
    )
  return {
    **shared,
    "kind": "sweep",
    "source_prompt": result.source_prompt,
    "target_prompt": result.target_prompt,
    "grid": {name: list(values) for name, values in result.axes},
    "base_config": dataclasses.asdict(result.base_config),
    "cells": cells,
  }


# Per-config entries of `pipeline.run_record`; the rest is shared by the sweep's cells.
_CELL_KEYS = ("config", *io.PER_SEED_KEYS)


# ----------------------------------------------------------------------------- command line

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LUSDConfig)}


def _parse_value(name: str, text: str, flag: str) -> Any:
  """One command-line value of LUSDConfig field `name`, typed like the field's default."""
  kind = type(_DEFAULTS[name])
  t = text.strip()
  try:
    if kind is bool:
      return {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
      }[t.lower()]
    return kind(t)
  except (KeyError, ValueError):
    raise io.InputError(f"{flag} {name}: {t!r} is not a valid {kind.__name__}") from None


def _parse_assignments(items: Sequence[str] | None, flag: str, many: bool) -> dict[str, Any]:
  """["reg_scale=0,0.02"] -> {"reg_scale": [0.0, 0.02]} (many) or ["lr=0.5"] -> {"lr": 0.5}."""
  out: dict[str, Any] = {}
  for item in items or ():
    name, sep, rhs = item.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not rhs.strip():
      raise io.InputError(f"{flag} takes FIELD={'V1,V2,...' if many else 'VALUE'}, got {item!r}")
    if name not in _DEFAULTS:
      raise io.InputError(f"{flag}: unknown LUSDConfig field {name!r}")
    if name in out:
      raise io.InputError(f"{flag}: {name} is given twice")
    if many:
      if name not in LUSDNumeric._fields:
        check_grid({name: [_DEFAULTS[name]]})  # raises the static / prompt-analysis message
      out[name] = [_parse_value(name, v, flag) for v in rhs.split(",")]
    else:
      out[name] = _parse_value(name, rhs, flag)
  return out


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the `lusd-jax sweep` options to `parser` (a subcommand parser)."""
  from lusd_jax import loading

  parser.description = (
    "Edit one image with every combination of hyperparameter values (x seeds) in one compiled "
    "program, and draw the labelled grid: lusd-jax sweep IMAGE --target ... "
    "--grid reg_scale=0,0.02,0.05 --grid threshold=0.005,0.01"
  )
  parser.add_argument("image", nargs="?", help="input image (any format PIL reads)")
  parser.add_argument("--example", default=None, help="use a bundled example instead of IMAGE: cat, coffee")
  parser.add_argument("--source", default=None, help="source prompt (describes the input; may be empty)")
  parser.add_argument("--target", default=None, help="target prompt (describes the edit)")
  parser.add_argument("--edit-words", default=None, help="words of the target prompt to localize the edit on")
  parser.add_argument(
    "--grid",
    action="append",
    required=True,
    metavar="FIELD=V1,V2,...",
    help="a traced LUSDConfig field and its values, e.g. reg_scale=0,0.02,0.05; repeat for more axes "
    "(the first axis gives the grid's rows)",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=None,
    metavar="FIELD=VALUE",
    help="fix another LUSDConfig field for every cell, e.g. --set lr=0.5 (repeatable)",
  )
  parser.add_argument(
    "--seeds", type=int, nargs="+", default=[0], help="seeds, each run with every config (default 0)"
  )
  parser.add_argument(
    "--num-steps", type=int, default=None, help="optimization steps (default: the preset's)"
  )
  parser.add_argument(
    "--preset",
    default="paper",
    choices=["paper", "official"],
    help="base config that --set and --grid override (default %(default)s)",
  )
  loading.add_model_arguments(parser)
  parser.add_argument(
    "--size", type=int, default=512, help="image side, a multiple of 64 (default %(default)s)"
  )
  sharding.add_devices_argument(parser)
  parser.add_argument("--out", default="sweep", help="output folder (default %(default)s)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  return parser


def sweep_command(args: argparse.Namespace) -> int:
  """Runs `lusd-jax sweep` from parsed arguments; writes the grid, the cells and sweep.json.

  Returns:
    0 on success, 2 after printing one `error: ...` line for bad input.
  """
  from lusd_jax import cli, loading  # cli: the shared flag checks (this command moves there later)

  try:
    grid = _parse_assignments(args.grid, "--grid", many=True)
    fixed = _parse_assignments(args.set, "--set", many=False)
    both = sorted(set(grid) & set(fixed))
    if both:
      raise io.InputError(f"--set {both[0]} is also a --grid axis")
    axes = check_grid(grid)
    seeds = io.check_seeds(args.seeds, "--seeds")
    if args.num_steps is not None:
      fixed["num_steps"] = args.num_steps
    base = LUSDConfig.official() if args.preset == "official" else LUSDConfig()
    base = cli.config_from_flags(base, fixed)
    configs, _ = grid_configs(base, axes)  # every cell valid before the model loads
    image, source, target, edit_words = examples.inputs_from_args(args)
    mesh = cli.check_before_load(args, [base, *configs], seeds, source, target, edit_words)
    if args.model == loading.TINY_RANDOM:
      print("note: --model tiny-random has random weights: the pictures are meaningless.", file=sys.stderr)
    model = loading.load_model(args.model, dtype=args.dtype)
    t0 = time.time()
    result = sweep(
      model,
      image,
      source,
      target,
      grid,
      seeds=seeds,
      base_config=base,
      edit_words=edit_words,
      size=args.size,
      progress=not args.quiet,
      announce=lambda _note: None,  # check_before_load printed the notes
      mesh=mesh,
    )
  except (io.InputError, loading.ModelLoadError) as e:
    if os.environ.get("LUSD_JAX_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  write_sweep(result, model, args.out, args.model)
  c, s = len(result.configs), len(result.seeds)
  print(
    f"wrote {os.path.join(args.out, 'sweep_grid.png')} and {c * s} edited image(s) in {time.time() - t0:.1f} s"
  )
  return 0


def write_sweep(result: SweepResult, model: SDModel, out_dir: str, model_id: str | None = None) -> list[str]:
  """Writes sweep_grid.png, input.png, one PNG per (config, seed) and sweep.json into `out_dir`.

  Returns:
    The paths written.
  """
  paths = [
    io.save_png(os.path.join(out_dir, "sweep_grid.png"), sweep_grid_image(result)),
    io.save_png(os.path.join(out_dir, "input.png"), result.input_image),
  ]
  for c in range(len(result.configs)):
    for s in range(len(result.seeds)):
      path = os.path.join(out_dir, cell_file_name(result, c, s))
      paths.append(io.save_png(path, result.images[c, s], result.configs[c].output_rounding))
  paths.append(
    io.write_json_atomic(os.path.join(out_dir, "sweep.json"), sweep_record(result, model, model_id))
  )
  return [os.fspath(p) for p in paths]
