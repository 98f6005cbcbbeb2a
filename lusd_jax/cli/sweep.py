"""`lusd-jax sweep`: --grid / --set parsing, the command, and its files (`write_sweep`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lusd_jax import batchdir, io, methods, pipeline, sweeps
from lusd_jax.cli import args as args_lib
from lusd_jax.cli.edit import unifyedit_scheduler_plot
from lusd_jax.loading import SDModel
from lusd_jax.sweeps import SweepResult


def _defaults(method: str) -> dict[str, Any]:
  """{field: default} of the --method's config."""
  return {f.name: f.default for f in dataclasses.fields(methods.get(method).config)}


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the `lusd-jax sweep` options to `parser` (a subcommand parser)."""
  parser.description = (
    "Edit one image with every combination of hyperparameter values (x seeds) in one compiled "
    "program, and draw the labelled grid: lusd-jax sweep IMAGE --target ... "
    "--grid reg_scale=0,0.02,0.05 --grid threshold=0.005,0.01"
  )
  args_lib.add_image_arguments(parser)
  parser.add_argument(
    "--grid",
    action="append",
    required=True,
    metavar="FIELD=V1,V2,...",
    help="a traced field of the --method's config and its values, e.g. reg_scale=0,0.02,0.05 (LUSD) or "
    "beta1=2,5 (UnifyEdit); repeat for more axes "
    "(the first axis gives the grid's rows)",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=None,
    metavar="FIELD=VALUE",
    help="fix another config field for every cell, e.g. --set lr=0.5 (repeatable)",
  )
  args_lib.add_seed_arguments(parser)
  parser.add_argument(
    "--num-steps", type=int, default=None, help="optimization steps (default: the preset's)"
  )
  args_lib.add_method_argument(parser)
  args_lib.add_preset_argument(parser, "LUSD's base config that --set and --grid override")
  args_lib.add_mask_arguments(parser)
  args_lib.add_model_arguments(parser)
  args_lib.add_size_argument(parser)
  args_lib.add_devices_argument(parser)
  parser.add_argument("--out", default="sweep", help="output folder (default %(default)s)")
  args_lib.add_quiet_argument(parser)
  return parser


def _parse_value(name: str, text: str, flag: str, defaults: dict) -> Any:
  """One command-line value of config field `name`, typed like the field's default."""
  kind = type(defaults[name])
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


def _parse_assignments(
  items: Sequence[str] | None, flag: str, many: bool, method: str = "lusd"
) -> dict[str, Any]:
  """["reg_scale=0,0.02"] -> {"reg_scale": [0.0, 0.02]} (many) or ["lr=0.5"] -> {"lr": 0.5}."""
  config_cls = methods.get(method).config
  defaults = _defaults(method)
  out: dict[str, Any] = {}
  for item in items or ():
    name, sep, rhs = item.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not rhs.strip():
      raise io.InputError(f"{flag} takes FIELD={'V1,V2,...' if many else 'VALUE'}, got {item!r}")
    if name not in defaults:
      raise io.InputError(f"{flag}: unknown {config_cls.__name__} field {name!r}")
    if name in out:
      raise io.InputError(f"{flag}: {name} is given twice")
    if many:
      sweeps.check_grid({name: [defaults[name]]}, config_cls)  # the static / prompt-analysis message
      out[name] = [_parse_value(name, v, flag, defaults) for v in rhs.split(",")]
    elif name == "sa_resolutions":  # "16,8": one value with commas
      out[name] = rhs.strip()
    else:
      out[name] = _parse_value(name, rhs, flag, defaults)
  return out


def cmd_sweep(args: argparse.Namespace) -> int:
  """`lusd-jax sweep`: every check before the weights load, the sweep, then `write_sweep`."""
  grid = _parse_assignments(args.grid, "--grid", many=True, method=args.method)
  fixed = _parse_assignments(args.set, "--set", many=False, method=args.method)
  both = sorted(set(grid) & set(fixed))
  if both:
    raise io.InputError(f"--set {both[0]} is also a --grid axis")
  axes = sweeps.check_grid(grid, methods.get(args.method).config)
  seeds = args_lib.seeds_from_args(args)
  if args.num_steps is not None:
    fixed["num_steps"] = args.num_steps
  base = args_lib.config_from_flags(args_lib.base_config(args), fixed)
  configs, _ = sweeps.grid_configs(base, axes)  # every cell valid before the model loads
  run = args_lib.check_then_load(args, [base, *configs], seeds)
  t0 = time.time()
  result = sweeps.sweep(
    run.model, run.image, run.source, run.target, grid, seeds=seeds, base_config=base,
    edit_words=run.edit_words, size=args.size, progress=not args.quiet,
    announce=lambda _note: None,  # check_then_load printed the notes
    mesh=run.mesh, mask=run.mask,
  )  # fmt: skip
  write_sweep(result, run.model, args.out, args.model)
  c, s = len(result.configs), len(result.seeds)
  print(
    f"wrote {os.path.join(args.out, 'sweep_grid.png')} and {c * s} edited image(s) in {time.time() - t0:.1f} s"
  )
  return 0


# ----------------------------------------------------------------------------- files


def cell_file_name(result: SweepResult, c: int, s: int) -> str:
  """File name of config c with seed index s, e.g. "reg_scale=0.02_threshold=0.01_seed0.png"."""
  combo = np.unravel_index(c, result.grid_shape)
  parts = [
    f"{name}={sweeps.format_value(values[i])}" for (name, values), i in zip(result.axes, combo, strict=True)
  ]
  return "_".join(parts) + f"_seed{result.seeds[s]}.png"


# Per-config entries of `pipeline.run_record`; the rest is shared by the sweep's cells.
_CELL_KEYS = ("config", *batchdir.PER_SEED_KEYS, "per_step", "cross_attention_ratio_per_step")


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


def write_sweep(result: SweepResult, model: SDModel, out_dir: str, model_id: str | None = None) -> list[str]:
  """Writes sweep_grid.png, input.png, one PNG per (config, seed) and sweep.json into `out_dir`.

  Returns:
    The paths written.
  """
  paths = [
    io.save_png(os.path.join(out_dir, "sweep_grid.png"), sweeps.sweep_grid_image(result)),
    io.save_png(os.path.join(out_dir, "input.png"), result.input_image),
  ]
  for c in range(len(result.configs)):
    for s in range(len(result.seeds)):
      path = os.path.join(out_dir, cell_file_name(result, c, s))
      paths.append(io.save_png(path, result.images[c, s], result.configs[c].output_rounding))
    if result.results is not None:  # UnifyEdit: each cell's scheduler plot, as `edit` writes it
      plot = unifyedit_scheduler_plot(result.results[c], result.labels[c])
      paths.append(
        io.save_png(
          os.path.join(out_dir, cell_file_name(result, c, 0)[: -len("_seed0.png")] + "_scheduler.png"), plot
        )
      )
  paths.append(
    io.write_json_atomic(os.path.join(out_dir, "sweep.json"), sweep_record(result, model, model_id))
  )
  return [os.fspath(p) for p in paths]
