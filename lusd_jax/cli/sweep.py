"""`lusd-jax sweep`: --grid / --set parsing, the command, and its files (`write_sweep`)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from lusd_jax import batchdir, distributed, io, methods, pipeline, sweeps
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
  args_lib.add_distributed_arguments(parser)
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
  """`lusd-jax sweep`: every check before the weights load, the sweep, then `write_sweep`.

  With `--distributed`, each process runs its `distributed.assign` share of the cells and writes it
  as `sweep.part{i}.npz` (`_sweep_distributed`); process 0 then writes the sweep's files from every
  part.
  """
  distributed.check_flags(args.distributed, args.coordinator, args.num_processes, args.process_id)
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
  if args.distributed:
    return _sweep_distributed(args, grid, axes, seeds, base, configs)
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


# ----------------------------------------------------------------------------- several processes


def part_name(process_index: int) -> str:
  """The file of process i's cells in a `--distributed` sweep: "sweep.part{i}.npz"."""
  return f"sweep.part{process_index}.npz"


def _signature(args, image, source, target, edit_words, mask, axes, seeds, base) -> dict:
  """What a sweep's cells depend on: a part written for other inputs is not reused."""
  digest = lambda x: hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()  # noqa: E731
  sig = {
    "image_sha256": digest(image),
    "source_prompt": source,
    "target_prompt": target,
    "edit_words": edit_words,
    "mask": mask if mask is None or isinstance(mask, str) else digest(mask),
    "grid": {name: list(values) for name, values in axes},
    "base_config": dataclasses.asdict(base),
    "seeds": list(seeds),
    "size": args.size,
    "model": args.model,
    "dtype": args.dtype,
    "method": args.method,
  }
  return json.loads(io.json_text(sig))  # as it reads back from a part


def _write_part(path, result: SweepResult, model: SDModel, model_id, cells, signature) -> None:
  """Writes a process's cells: their images, run records and (UnifyEdit) scheduler plots, in one file."""
  meta = {"signature": signature, "cells": list(cells), "records": _cell_records(result, model, model_id)}
  arrays = {"meta": np.array(io.json_text(meta)), "images": result.images, "input_image": result.input_image}
  for j, plot in enumerate(_scheduler_plots(result) or ()):  # (their sizes may differ)
    arrays[f"plot{j}"] = plot
  io.atomic_write_npz(path, arrays)


def _read_part(path, signature: dict, cells) -> dict | None:
  """A part's contents when it exists and holds `cells` of this sweep (`signature`); else None."""
  try:
    with np.load(path) as f:
      part = {k: f[k] for k in f.files}
    meta = json.loads(part.pop("meta").item())
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent, or not a part
    return None
  if meta.get("signature") != signature or meta.get("cells") != list(cells):
    return None
  return part | {"records": meta["records"]}


def _sweep_distributed(args, grid, axes, seeds, base, configs) -> int:
  """`lusd-jax sweep --distributed`: this process's cells, then (process 0) the sweep's files.

  Each process runs its `distributed.assign` share of the C cells (all their seeds) as one program
  on its own devices and writes it as `part_name(i)` (atomically; a rerun whose part is there skips
  the compute, so the same command resumes every process). After every process has written its part
  (`distributed.barrier`), process 0 alone reads the parts and writes what a one-process sweep
  writes, from the same images and records: --out must be one folder that every process sees.
  """
  image, source, target, edit_words = args_lib.inputs_from_args(args)
  me = args_lib.process_from_args(args)  # before anything starts JAX
  mesh, mask = args_lib.check_before_load(args, [base, *configs], seeds, source, target, edit_words)
  signature = _signature(args, image, source, target, edit_words, mask, axes, seeds, base)
  n = len(configs)
  mine = distributed.assign(n, me.index, me.count)
  out_dir = os.fspath(args.out)
  path = os.path.join(out_dir, part_name(me.index))
  print(f"sweep: process {me.index} of {me.count}: {len(mine)} of the {n} cells")
  t0 = time.time()
  if mine and _read_part(path, signature, mine) is not None:
    print(f"sweep: {path} holds this process's cells already: nothing to compute")
  elif mine:
    model = args_lib.load_model(args)
    result = sweeps.sweep(
      model, image, source, target, grid, seeds=seeds, base_config=base, edit_words=edit_words,
      size=args.size, progress=not args.quiet, announce=lambda _note: None, mesh=mesh, mask=mask,
      cells=mine,
    )  # fmt: skip
    _write_part(path, result, model, args.model, mine, signature)
    print(f"sweep: wrote {path} ({len(mine) * len(seeds)} edited image(s)) in {time.time() - t0:.1f} s")
  # Every process calls this, also one with no cells.
  distributed.barrier("lusd-jax sweep: every process's part is written")
  if me.index != 0:
    return 0
  parts, missing = [], []
  for p in range(me.count):
    cells = distributed.assign(n, p, me.count)
    part = _read_part(os.path.join(out_dir, part_name(p)), signature, cells) if cells else None
    if cells and part is None:
      missing.append(p)
    parts += [part] if part is not None else []
  if missing:
    print(
      f"error: the part(s) of process(es) {', '.join(map(str, missing))} are not in {out_dir}: they failed "
      "there, or --out is not one folder that every process sees",
      file=sys.stderr,
    )
    return 1
  _, labels = sweeps.grid_configs(base, axes)
  result = SweepResult(
    images=np.concatenate([part["images"] for part in parts]), latents=None,
    input_image=parts[0]["input_image"], source_prompt=source, target_prompt=target, seeds=tuple(seeds),
    axes=axes, configs=tuple(configs), labels=tuple(labels), rejections=None, timesteps=None,
    hit_max_attempts=None, mask=None, edit_tokens=None, base_config=base, timings={},
  )  # fmt: skip
  records = [record for part in parts for record in part["records"]]
  plots = None
  if "plot0" in parts[0]:  # UnifyEdit
    plots = [part[f"plot{j}"] for part in parts for j in range(len(part["records"]))]
  _write_sweep_files(result, out_dir, records, plots)
  print(
    f"wrote {os.path.join(out_dir, 'sweep_grid.png')} and {n * len(seeds)} edited image(s) from {len(parts)} part(s)"
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


def _cell_records(result: SweepResult, model: SDModel, model_id: str | None) -> list[dict]:
  """Each config's `pipeline.run_record` (over its seeds)."""
  return [pipeline.run_record(result.cell(c), model, model_id) for c in range(len(result.configs))]


def _scheduler_plots(result: SweepResult) -> list[np.ndarray] | None:
  """UnifyEdit: each cell's scheduler plot, as `edit` draws it (None for LUSD)."""
  if result.results is None:
    return None
  return [unifyedit_scheduler_plot(r, label) for r, label in zip(result.results, result.labels, strict=True)]


def sweep_record(result: SweepResult, model: SDModel, model_id: str | None = None) -> dict:
  """The JSON run record of a sweep: inputs, grid, edit tokens, base config, per-cell statistics."""
  return _sweep_record(result, _cell_records(result, model, model_id))


def _sweep_record(result: SweepResult, per_cell: list[dict]) -> dict:
  """`sweep_record` from the cells' run records (`_cell_records`; of every process's part)."""
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
  return _write_sweep_files(result, out_dir, _cell_records(result, model, model_id), _scheduler_plots(result))


def _write_sweep_files(result: SweepResult, out_dir: str, per_cell: list[dict], plots) -> list[str]:
  """`write_sweep` from the images of `result`, the cells' run records and (UnifyEdit) plots."""
  paths = [
    io.save_png(os.path.join(out_dir, "sweep_grid.png"), sweeps.sweep_grid_image(result)),
    io.save_png(os.path.join(out_dir, "input.png"), result.input_image),
  ]
  for c in range(len(result.configs)):
    for s in range(len(result.seeds)):
      path = os.path.join(out_dir, cell_file_name(result, c, s))
      paths.append(io.save_png(path, result.images[c, s], result.configs[c].output_rounding))
    if plots is not None:  # UnifyEdit: each cell's scheduler plot, as `edit` writes it
      name = cell_file_name(result, c, 0)[: -len("_seed0.png")] + "_scheduler.png"
      paths.append(io.save_png(os.path.join(out_dir, name), plots[c]))
  paths.append(io.write_json_atomic(os.path.join(out_dir, "sweep.json"), _sweep_record(result, per_cell)))
  return [os.fspath(p) for p in paths]
