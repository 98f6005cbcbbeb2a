"""Hyperparameter sweeps: a grid of LUSD configs x seeds as one compiled program.

`sweep` edits one image with every combination of the grid's values (row-major over the grid's
axes, in the order the dict gives them) and every seed. The grid's keys are `LUSDConfig` fields
that `LUSDConfig.numeric()` passes traced (numbers and ablation switches), so the C x S edits are
one batch of the engine's program (`engine.run_chunk`): no recompilation across grid values, prompts or
images of the same size, only when the grid's shape, the seeds' count, `num_steps` or `gradient`
change. Each cell is exactly the edit `lusd_jax.edit` makes with that config and seed.

`sweep_grid_image` draws the results like the paper's tuning grids (Appendix 12, drawn by
`visual.labelled_grid`): one row per value of the first axis, one column per value of the others
(and per seed), labelled "reg_scale=0.02".

  res = lusd_jax.sweep(model, "cat.png", "a cat", "a cat wearing a party hat",
                       grid={"reg_scale": [0.0, 0.02, 0.05], "threshold": [0.005, 0.01]}, seeds=[0, 1])
  res.images.shape                  # (6, 2, 512, 512, 3): [C, S, H, W, 3]
  res.labels[1]                     # 'reg_scale=0, threshold=0.01'
  io.save_png("grid.png", sweep_grid_image(res))

Command line: `lusd-jax sweep IMAGE --target ... --grid reg_scale=0,0.02,0.05 --grid
threshold=0.005,0.01` writes sweep_grid.png, one PNG per cell and seed, and sweep.json
(`lusd_jax.cli.sweep`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from lusd_jax import io, pipeline, visual
from lusd_jax.loading import SDModel
from lusd_jax.lusd.config import LUSDConfig, LUSDNumeric
from lusd_jax.unifyedit import config as unifyedit_config
from lusd_jax.unifyedit import pipeline as unifyedit_pipeline

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
  results: tuple | None = None  # UnifyEdit: [C] the cells' `EditResult`s (S = 1)

  @property
  def grid_shape(self) -> tuple[int, ...]:
    """Sizes of the grid's axes (their product is C)."""
    return tuple(len(values) for _, values in self.axes)

  def cell(self, c: int) -> pipeline.EditResult:
    """Config c's edits as the `EditResult` that `lusd_jax.edit` returns for them (no snapshots)."""
    if self.results is not None:
      return self.results[c]
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


def _traced_fields(config_cls: type) -> tuple[str, ...]:
  """The fields of a method's config that are passed traced (a sweep's axes)."""
  if config_cls is unifyedit_config.UnifyEditConfig:
    return unifyedit_config.TRACED_FIELDS
  return LUSDNumeric._fields


def _field_kind(name: str, config_cls: type = LUSDConfig) -> type:
  return type(next(f.default for f in dataclasses.fields(config_cls) if f.name == name))


def _check_value(name: str, value: Any, config_cls: type = LUSDConfig) -> Any:
  """`value` as the Python type of field `name`; ValueError naming the field otherwise."""
  kind = _field_kind(name, config_cls)
  if kind is bool:
    if isinstance(value, bool | np.bool_):
      return bool(value)
  elif kind is str:
    if isinstance(value, str):
      return value
  elif kind is int:
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
      return int(value)
  elif isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_):
    if math.isfinite(float(value)):
      return float(value)
  raise io.InputError(f"grid: {name} takes {kind.__name__} values, got {value!r}")


def check_grid(
  grid: Mapping[str, Sequence[Any]], config_cls: type = LUSDConfig
) -> tuple[tuple[str, tuple], ...]:
  """Validates a sweep grid: keys are traced fields of the method's config, values non-empty lists.

  Args:
    grid: {field: [values]}, e.g. {"reg_scale": [0.0, 0.02], "threshold": [0.005, 0.01]}.
    config_cls: `LUSDConfig` or `UnifyEditConfig` (whose traced fields include beta, k, tau,
      gradient and schedule_form).

  Returns:
    The axes ((field, values), ...) in the dict's order.

  Raises:
    io.InputError (a ValueError) naming the field: unknown, static (num_steps, gradient: a new
      program each), read by the prompt analysis, empty, repeated values or a value of the wrong type.
  """
  if not grid:
    raise io.InputError("grid: give at least one field with values, e.g. {'reg_scale': [0.0, 0.02]}")
  fields = {f.name for f in dataclasses.fields(config_cls)}
  traced = _traced_fields(config_cls)
  axes = []
  for name, values in grid.items():
    if name not in fields:
      raise io.InputError(f"grid: unknown {config_cls.__name__} field {name!r}")
    if name in _PROMPT_FIELDS:
      raise io.InputError(f"grid: {name} is read by the prompt analysis and cannot vary within a sweep")
    if name not in traced:
      raise io.InputError(
        f"grid: {name} is a static field (it shapes the compiled program); run one sweep per value"
      )
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
      raise io.InputError(f"grid: {name} needs a list of values, got {values!r}")
    values = tuple(_check_value(name, v, config_cls) for v in values)
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
  mask=None,
  cells: Sequence[int] | None = None,
) -> SweepResult:
  """Edits `image` once per (grid config, seed), all C x S edits in one compiled program.

  With a `UnifyEditConfig` as `base_config`, the grid runs UnifyEdit (one seed; the configs share
  one inversion and one denoising program; `mask` as `lusd_jax.unifyedit.edit`).

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
    mask: UnifyEdit's edit mask (as `lusd_jax.unifyedit.edit`).
    cells: compute only these cells (indices into the row-major grid, ascending), e.g. this
      process's `distributed.assign(C, me.index, me.count)` of a multi-host sweep (default: all).

  Returns:
    `SweepResult`: `images[c, s]` is config `configs[c]` (label `labels[c]`) with `seeds[s]`. With
    `cells`, `configs`, `labels` and the arrays hold only those cells, in their order (`axes` is
    still the whole grid).

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
  axes = check_grid(grid, type(base))
  configs, labels = grid_configs(base, axes)
  if cells is not None:
    cells = [int(c) for c in cells]
    if not cells or sorted(set(cells)) != cells or not 0 <= cells[0] <= cells[-1] < len(configs):
      raise ValueError(f"sweep: cells must be ascending indices in [0, {len(configs)}), got {cells}")
    configs, labels = [configs[c] for c in cells], [labels[c] for c in cells]
  if isinstance(base, unifyedit_config.UnifyEditConfig):
    if tuple(seeds) != (0,):
      raise io.InputError("seeds: UnifyEdit is deterministic (DDIM inversion and sampling): give one seed")
    results = unifyedit_pipeline.edit_configs(
      model, image, source_prompt, target_prompt, configs, mask=mask, edit_words=edit_words,
      token_positions=token_positions, size=size, progress=progress, announce=announce, mesh=mesh,
      chunk_size=chunk_size,
    )  # fmt: skip
    return _unifyedit_sweep(results, axes, labels, base)
  timings = {}
  t0 = time.perf_counter()
  prep = pipeline.prepare_edit(
    model, image, source_prompt, target_prompt, seeds, base, edit_words,
    token_positions=token_positions, size=size, announce=announce,
  )  # fmt: skip
  seeds = prep.seeds
  c, s = len(configs), len(seeds)
  # configs x seeds as one flat batch (config-major): element c * S + i is (configs[c], seeds[i]).
  numerics = [config.numeric() for config in configs]
  batch = pipeline.stack_elements([(prep.inputs, key, numeric) for numeric in numerics for key in prep.keys])
  jax.block_until_ready(batch)
  timings["encode_s"] = time.perf_counter() - t0
  out, timings["optimize_s"] = pipeline.run_batch(
    model, base, batch, ids=[f"seed {seed} with {label}" for label in labels for seed in seeds],
    desc=f"LUSD sweep {c} config(s) x {s} seed(s)", mesh=mesh, chunk_size=chunk_size, progress=progress,
  )  # fmt: skip

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


def _unifyedit_sweep(results, axes, labels, base) -> SweepResult:
  """UnifyEdit's cells ([C] `EditResult`s with S = 1) as a `SweepResult`."""
  first = results[0]
  stack = lambda name: np.stack([getattr(r, name) for r in results])  # noqa: E731
  return SweepResult(
    images=stack("images"),
    latents=stack("latents"),
    input_image=first.input_image,
    source_prompt=first.source_prompt,
    target_prompt=first.target_prompt,
    seeds=(0,),
    axes=axes,
    configs=tuple(r.config for r in results),
    labels=tuple(labels),
    rejections=stack("rejections"),
    timesteps=stack("timesteps"),
    hit_max_attempts=stack("hit_max_attempts"),
    mask=None if first.mask is None else stack("mask"),
    edit_tokens=first.edit_tokens,
    base_config=base,
    timings=first.timings,
    results=tuple(results),
  )


# ----------------------------------------------------------------------------- the picture


def _axis_labels(axes) -> tuple[tuple[str, tuple[str, ...]], ...]:
  return tuple((name, tuple(format_value(v) for v in values)) for name, values in axes)


def grid_layout(result: SweepResult, seed_index: int | None = None):
  """Where each edit goes in `sweep_grid_image` (`visual.grid_layout` over the result's grid)."""
  return visual.grid_layout(_axis_labels(result.axes), result.seeds, seed_index)


def sweep_grid_image(result: SweepResult, seed_index: int | None = None, **kwargs) -> np.ndarray:
  """The sweep as a labelled grid, like the paper's tuning grids (`visual.labelled_grid`).

  Args:
    result: from `sweep`.
    seed_index: show only `result.seeds[seed_index]` (default: every seed).
    **kwargs: `include_input`, `gap`, `min_cell` of `visual.labelled_grid`.

  Returns:
    float32 [H', W', 3] in [0, 1].
  """
  title = f'"{result.source_prompt}" -> "{result.target_prompt}"'
  return visual.labelled_grid(
    result.images, result.input_image, _axis_labels(result.axes), result.seeds, title, seed_index, **kwargs
  )
