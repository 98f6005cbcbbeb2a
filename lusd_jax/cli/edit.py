"""`lusd-jax edit` (one image) and `lusd-jax batch` (every row of an index.csv), and their files."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from lusd_jax import batchdir, distributed, engine, io, loading, pipeline, sharding, visual
from lusd_jax.cli import args as args_lib
from lusd_jax.unifyedit import pipeline as unifyedit_pipeline
from lusd_jax.unifyedit.config import EDIT_TYPES, UnifyEditConfig


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `lusd-jax edit` arguments to `parser` (a subcommand parser)."""
  parser.description = "Edit one image: lusd-jax edit IMAGE --source ... --target ..."
  args_lib.add_image_arguments(parser)
  parser.add_argument("--out", default="outputs", help="output folder (default %(default)s)")
  args_lib.add_run_arguments(parser)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `lusd-jax batch` arguments to `parser` (a subcommand parser)."""
  parser.description = "Edit every row of DIR/index.csv (img_path,source_prompt,target_prompt[,edit_words])."
  parser.add_argument("--input-dir", required=True, help="folder with index.csv and images/ (required)")
  parser.add_argument(
    "--output-dir",
    required=True,
    help="folder for {row:03d}_seed{seed}.png, grids and run records (required)",
  )
  args_lib.add_run_arguments(parser)
  args_lib.add_distributed_arguments(parser)


# ----------------------------------------------------------------------------- edit


def _edit_grid(input_image, images, seeds, mask, title: str, random_weights: bool):
  """The picture of one edit: input | one edit per seed | the first seed's mask, captioned."""

  tiles = [input_image, *images]
  captions = ["input"] + [f"seed {s}" for s in seeds]
  if mask is not None:
    tiles.append(visual.mask_overlay(input_image, mask))
    captions.append(f"edit mask (seed {seeds[0]})")
  if random_weights:
    title += " (random weights)"
  return visual.grid(tiles, captions, title=title)


def _save_result(result, model, args, out_dir, name_fn, title_prefix=""):
  """Writes one edit's images, grid, snapshot strips and run record."""
  seeds = result.seeds
  os.makedirs(out_dir, exist_ok=True)
  for i, s in enumerate(seeds):
    io.save_png(os.path.join(out_dir, name_fn(s)), result.images[i], result.config.output_rounding)
  base = name_fn(None)
  mask = None if result.mask is None else np.asarray(result.mask[0])
  title = f'{title_prefix}"{result.source_prompt}" -> "{result.target_prompt}"'
  grid = _edit_grid(result.input_image, list(result.images), seeds, mask, title, model.is_random)
  io.save_png(os.path.join(out_dir, f"{base}grid.png"), grid)
  if result.snapshots is not None:
    for i, s in enumerate(seeds):
      strip = visual.snapshot_strip(
        result.input_image, list(result.snapshots[i]), list(result.snapshot_steps)
      )
      io.save_png(os.path.join(out_dir, f"{base}snapshots_seed{s}.png"), strip)
  io.write_json_atomic(
    os.path.join(out_dir, f"{base}run.json"), pipeline.run_record(result, model, args.model)
  )


def unifyedit_grid(result, title: str, random_weights: bool):
  """UnifyEdit's picture: input | reconstruction (source branch) | edit | mask, captioned."""
  tiles = [result.input_image, result.reconstruction[0], result.images[0]]
  captions = ["input", "reconstruction (source branch)", "UnifyEdit"]
  if result.user_mask is not None:
    tiles.append(visual.mask_image(result.user_mask))
    captions.append("mask")
  return visual.grid(tiles, captions, title=title + (" (random weights)" if random_weights else ""))


def unifyedit_scheduler_plot(result, title: str):
  """The lambdas and gradient norms of a UnifyEdit run over its steps (paper Fig. 5/11)."""
  st = {k: np.asarray(v)[0] for k, v in result.step_stats.items()}
  c = result.config
  return visual.scheduler_plot(
    st["lambda1"],
    st["lambda2"],
    st["sap_grad_norm"],
    st["caa_grad_norm"],
    title=title,
    tau1=c.tau1,
    tau2=c.tau2,
  )


# The files of one UnifyEdit edit (`lusd-jax edit`); `batch` names them per row (`_unifyedit_row_names`).
UNIFYEDIT_FILES = dict(
  edit="edit.png",
  reconstruction="reconstruction.png",
  grid="grid.png",
  scheduler="scheduler.png",
  record="run.json",
)


def save_unifyedit(
  result, model, model_id: str, out_dir, names=UNIFYEDIT_FILES, title_prefix: str = ""
) -> list[str]:
  """Writes a UnifyEdit edit: the edit, the reconstruction, the grid, the scheduler plot, the run record.

  The run record is written last: its presence means the edit is complete (`batch` resumes on it).
  """
  os.makedirs(out_dir, exist_ok=True)
  title = f'{title_prefix}"{result.source_prompt}" -> "{result.target_prompt}"'
  rounding = result.config.output_rounding
  files = {
    names["edit"]: (result.images[0], rounding),
    names["reconstruction"]: (result.reconstruction[0], rounding),
    names["grid"]: (unifyedit_grid(result, title, model.is_random), "round"),
    names["scheduler"]: (unifyedit_scheduler_plot(result, title), "round"),
  }
  for name, (image, how) in files.items():
    io.save_png(os.path.join(out_dir, name), image, how)
  io.write_json_atomic(os.path.join(out_dir, names["record"]), pipeline.run_record(result, model, model_id))
  return [*files, names["record"]]


def _unifyedit_row_names(r: int) -> dict[str, str]:
  """A batch row's UnifyEdit files: the edit under LUSD's name (`{row:03d}_seed0.png`, what `eval` reads)."""
  return dict(
    edit=batchdir.output_name(r, 0), reconstruction=f"{r:03d}_reconstruction.png", grid=batchdir.grid_name(r),
    scheduler=f"{r:03d}_scheduler.png", record=batchdir.run_record_name(r),
  )  # fmt: skip


def _batch_unifyedit(args, rows, out_dir, me: distributed.Process) -> int:
  """`lusd-jax batch --method unifyedit`: every row's inputs (mask_path, edit_type) checked before the
  weights load, then one edit per row (each with its own inversion), written as it finishes.

  A row is done when its run record exists (written last); a rerun skips it. With several processes
  each runs its `distributed.assign` share of the rows (one seed each: a row is never split).
  """
  share = distributed.assign(len(rows), me.index, me.count)
  if me.count > 1:
    print(f"batch: process {me.index} of {me.count}: {len(share)} of the {len(rows)} rows")
  rows = [rows[i] for i in share]
  if args.mask is not None or args.reuse_inversion is not None:
    raise io.InputError("--mask / --reuse-inversion are per row in a batch: use index.csv's mask_path column")
  if args_lib.seeds_from_args(args) != (0,):
    raise io.InputError(
      "--seeds: UnifyEdit is deterministic (DDIM inversion and sampling): leave the seeds out"
    )
  overrides = args_lib.config_overrides(args)
  head = loading.load_model_head(args.model)
  failures: list[tuple[int, str]] = []
  jobs, skipped = [], 0

  def fail(r: int, message: str):
    failures.append((r, message))
    print(f"[row {r}] failed: {message}", file=sys.stderr)

  for row in rows:
    if batchdir.is_done(out_dir / batchdir.run_record_name(row.row)):
      skipped += 1
      continue
    if row.problem:
      fail(row.row, f"index.csv row {row.row}: {row.problem}")
      continue
    try:
      edit_type = row.edit_type or args.edit_type
      if edit_type is not None and edit_type not in EDIT_TYPES:
        raise io.InputError(f"edit_type {edit_type!r} is not one of {', '.join(EDIT_TYPES)}")
      base = UnifyEditConfig.preset(edit_type) if edit_type else UnifyEditConfig()
      config = args_lib.config_from_flags(base, overrides)
      args_lib.check_timesteps(config, head.schedule)
      if not os.path.isfile(row.img_path):
        raise io.InputError(f"image not found: {row.img_path}")
      _, _, mask = unifyedit_pipeline.check_unifyedit(
        head.tokenizer, head.schedule, row.source_prompt, row.target_prompt, config, row.edit_words,
        mask=None if row.mask_path in (None, "auto") else row.mask_path,
        image_size=io.image_original_size(row.img_path), size=args.size,
        names=lambda a: "mask_path" if a == "mask" else args_lib.flag_name(a),
      )  # fmt: skip
    except io.InputError as e:
      fail(row.row, str(e))
      continue
    jobs.append((row, config, "auto" if row.mask_path == "auto" else mask))
  done = 0
  model = args_lib.load_model(args) if jobs else None
  for row, config, mask in jobs:
    print(f"[row {row.row}] {os.path.basename(row.img_path)}: {row.source_prompt!r} -> {row.target_prompt!r}")
    try:
      # The photo as an array: the mask was checked against its file's size and is already cropped.
      image = io.load_image(row.img_path, args.size)
      result = unifyedit_pipeline.edit(
        model, image, row.source_prompt, row.target_prompt, config, mask=mask,
        edit_words=row.edit_words, size=args.size, progress=not args.quiet,
      )  # fmt: skip
    except (io.InputError, ValueError, engine.NonFiniteError) as e:
      fail(row.row, str(e))
      continue
    save_unifyedit(result, model, args.model, out_dir, _unifyedit_row_names(row.row), f"{row.row:03d}: ")
    done += 1
  return _batch_summary(done, skipped, failures, len(rows), me)


def cmd_edit(args: argparse.Namespace) -> int:
  """`lusd-jax edit`: every check before the weights load, the edit, then its files (`_save_result`)."""
  seeds = args_lib.seeds_from_args(args)
  config = args_lib.config_from_args(args)
  run = args_lib.check_then_load(args, [config], seeds)
  t0 = time.time()
  if args.method == "unifyedit":
    result = unifyedit_pipeline.edit(
      run.model, run.image, run.source, run.target, config, mask=run.mask, edit_words=run.edit_words,
      size=args.size, inversion_record=args.reuse_inversion, progress=not args.quiet,
      announce=lambda _note: None,  # check_then_load printed the notes
      mesh=run.mesh,
    )  # fmt: skip
    files = save_unifyedit(result, run.model, args.model, args.out)
    print(f"wrote {args.out}/{', '.join(files)} in {time.time() - t0:.1f} s")
    return 0
  result = pipeline.edit(
    run.model, run.image, run.source, run.target, seeds=seeds, config=config, edit_words=run.edit_words,
    snapshot_every=args.save_step or None, size=args.size, progress=not args.quiet,
    announce=lambda _note: None,  # check_then_load printed the notes
    mesh=run.mesh,
  )  # fmt: skip
  _save_result(result, run.model, args, args.out, lambda s: "" if s is None else f"edit_seed{s}.png")
  print(f"wrote {args.out}/grid.png and {len(seeds)} edited image(s) in {time.time() - t0:.1f} s")
  return 0


# ----------------------------------------------------------------------------- batch


class RowShare(NamedTuple):
  """One process's part of a batch row (`row_shares`)."""

  seeds: tuple[int, ...]  # the row's seeds this process computes, in the requested order
  owner: bool  # this process writes the row's grid and run.json (it has the row's first seed)
  split: bool  # other processes compute the row's other seeds


def row_shares(rows: int, seeds, me: distributed.Process) -> dict[int, RowShare]:
  """Process `me`'s part of a batch: the (row, seed) pairs, row-major, `distributed.assign`-ed.

  Contiguous shares keep a row's seeds together: at most `me.count - 1` rows are split between two
  processes, and such a row's grid and run.json wait for every process (`cmd_batch`).

  Args:
    rows: the number of data rows R (row r is the r-th of index.csv).
    seeds: the requested seeds, S of them.
    me: this process.

  Returns:
    `{row: RowShare}` of the rows with a seed for this process (all R rows with one process).
  """
  seeds = tuple(seeds)
  n, k = rows * len(seeds), len(seeds)
  mine = distributed.assign(n, me.index, me.count)
  out = {}
  for r in range(rows):
    own = tuple(s for i, s in enumerate(seeds) if r * k + i in mine)
    if own:
      owner = distributed.owner(r * k, n, me.count) == me.index
      out[r] = RowShare(own, owner, len(own) < k)
  return out


def _any_row_split(rows: int, num_seeds: int, count: int) -> bool:
  """Whether some row's seeds go to two processes (every process computes the same answer)."""
  n = rows * num_seeds
  return any(
    distributed.owner(r * num_seeds, n, count) != distributed.owner((r + 1) * num_seeds - 1, n, count)
    for r in range(rows)
  )


def _share_names(shares: dict[int, RowShare], snapshots: bool) -> list[str]:
  """The names of the files a process writes for its shares (its seeds; the rows it owns)."""
  names = []
  for r, share in shares.items():
    for s in share.seeds:
      names += [batchdir.output_name(r, s), batchdir.seed_record_name(r, s)]
      names += [batchdir.snapshot_name(r, s)] if snapshots else []
    if share.owner:
      names += [batchdir.grid_name(r), batchdir.run_record_name(r)]
  return names


def cmd_batch(args: argparse.Namespace) -> int:
  """Edits every unfinished (row, seed) of index.csv; on several devices, several rows run at once.

  Resume is per seed and per row (see the comment above `batchdir.PER_SEED_KEYS`): each seed's image is
  followed by its record `{row:03d}_seed{s}.json`; a rerun keeps the seeds that have both, computes
  the others, and then rebuilds the row's grid and run.json from every requested seed, reading the
  finished ones back. Rows already complete are skipped, and when no seed is left to compute the
  model is not loaded.

  With `--distributed`, each process runs its `row_shares` and writes only their files: the images
  and records of its seeds, and the grid and run.json of the rows whose first seed it has. A row
  split between two processes gets its grid and run.json after every process has finished
  (`distributed.barrier`), from the files the other process wrote (so --output-dir must be one
  folder every process sees, when a row is split). A rerun resumes each process from its own files.
  """

  rows = batchdir.read_index(args.input_dir)
  config = args_lib.config_from_args(args)
  io.validate_size(args.size)
  out_dir = io.check_output_dir(args.output_dir, flag="--output-dir")
  seeds = args_lib.seeds_from_args(args)
  me = args_lib.process_from_args(args)  # before anything starts JAX
  if args.method == "unifyedit":
    return _batch_unifyedit(args, rows, out_dir, me)
  if any(row.mask_path is not None or row.edit_type is not None for row in rows):
    print(
      "batch: the mask_path and edit_type columns are UnifyEdit's (--method unifyedit); LUSD ignores them"
    )
  mesh = args_lib.mesh_from_args(args)
  snapshots = bool(args.save_step)
  shares = row_shares(len(rows), seeds, me)
  if me.count > 1:
    print(
      f"batch: process {me.index} of {me.count}: {sum(len(x.seeds) for x in shares.values())} of the "
      f"{len(rows) * len(seeds)} (row, seed) pairs"
    )
  # Another process may be writing into the same folder: remove only the temp files of our own names.
  stale = batchdir.remove_stale_temp_files(
    out_dir, None if me.count == 1 else _share_names(shares, snapshots)
  )
  if stale:
    print(f"batch: removed {len(stale)} temporary file(s) left by an interrupted run", file=sys.stderr)
  failures: list[tuple[int, str]] = []
  jobs, job_rows, kept = [], [], []  # kept[j]: the finished seeds' records of job j's row
  rebuild = []  # (row, records): every seed finished, the row's grid or run.json missing
  skipped = 0

  def fail(r: int, message: str):
    failures.append((r, message))
    print(f"[row {r}] failed: {message}", file=sys.stderr)

  for row in rows:
    share = shares.get(row.row)
    if share is None:  # another process's row
      continue
    if batchdir.row_is_done(out_dir, row.row, seeds, snapshots):
      skipped += 1
      continue
    if row.problem:
      fail(row.row, f"index.csv row {row.row}: {row.problem}")
      continue
    finished = batchdir.finished_seed_records(out_dir, row.row, seeds, snapshots)
    todo = [s for s in share.seeds if s not in finished]
    if not todo:
      if share.split:  # our seeds are written; the owner completes the row after the barrier
        skipped += 1
      else:
        rebuild.append((row, finished))
      continue
    label = (
      f"[row {row.row}] {os.path.basename(row.img_path)}: {row.source_prompt!r} -> {row.target_prompt!r}"
    )
    jobs.append(
      pipeline.EditJob(row.img_path, row.source_prompt, row.target_prompt, tuple(todo), row.edit_words, label)
    )
    job_rows.append(row.row)
    kept.append(finished)
  if jobs:  # the rows' prompts, edit words and images, checked before the weights load
    jobs, job_rows, kept = _check_batch_jobs(args, config, seeds, jobs, job_rows, kept, failures)
  done = 0
  for row, finished in rebuild:  # no compute: the input image is all that is read
    print(f"[row {row.row}] every seed is finished: writing the row's grid and run.json")
    done += _rebuild_batch_row(out_dir, row, seeds, finished, args.size, fail)
  if jobs:
    model = args_lib.load_model(args)
    devices = sharding.num_devices(mesh)
    if devices > 1:
      print(f"batch: {sum(len(j.seeds) for j in jobs)} edits over {devices} devices")
    results = pipeline.edit_many(
      model,
      jobs,
      config,
      size=args.size,
      mesh=mesh,
      snapshot_every=args.save_step or None,
      progress=not args.quiet,
      announce=print,
    )
    for j, result in results:
      r = job_rows[j]
      if isinstance(result, Exception):
        fail(r, str(result))
        continue
      new = _save_batch_seeds(result, model, args, out_dir, r)
      if not shares[r].split:
        images = {s: result.images[i] for i, s in enumerate(result.seeds)}
        _save_batch_row(out_dir, r, seeds, result.input_image, images, {**kept[j], **new})
      done += 1
  if me.count > 1 and _any_row_split(len(rows), len(seeds), me.count):
    # Every process calls this (the same decision everywhere), also one with nothing to compute.
    distributed.barrier("lusd-jax batch: every process's seeds are written")
    for row in rows:
      share = shares.get(row.row)
      if share is None or not (share.split and share.owner) or row.problem:
        continue
      if any(r == row.row for r, _ in failures):  # this process's own seeds of it failed: said once
        continue
      if batchdir.row_is_done(out_dir, row.row, seeds, snapshots):
        continue
      finished = batchdir.finished_seed_records(out_dir, row.row, seeds, snapshots)
      missing = [s for s in seeds if s not in finished and s not in share.seeds]
      if missing:
        fail(
          row.row,
          f"seed(s) {', '.join(map(str, missing))} of another process are not in {out_dir}: they failed "
          "there, or --output-dir is not one folder that every process sees",
        )
        continue
      print(f"[row {row.row}] every process's seeds are written: writing the row's grid and run.json")
      _rebuild_batch_row(out_dir, row, seeds, finished, args.size, fail)
  return _batch_summary(done, skipped, failures, len(shares), me)


def _rebuild_batch_row(out_dir, row, seeds, finished: dict, size: int, fail) -> int:
  """Writes the grid and run.json of a row whose seeds are all finished; 1 when written, else 0."""
  try:
    image = io.load_image(row.img_path, size)
  except io.InputError as e:
    fail(row.row, str(e))
    return 0
  _save_batch_row(out_dir, row.row, seeds, image, {}, finished)
  return 1


def _batch_summary(
  done: int, skipped: int, failures: list[tuple[int, str]], rows: int, me: distributed.Process
) -> int:
  """Prints a batch's last lines (counts, then the failures by row); returns the exit status."""
  failures.sort()
  who = "" if me.count == 1 else f" (process {me.index} of {me.count})"
  print(f"batch{who}: {done} edited, {skipped} already done, {len(failures)} failed (of {rows} rows)")
  if failures:
    print(batchdir.summarize_failures(failures))
  return 1 if failures else 0


def _check_batch_jobs(args, config, seeds, jobs, job_rows, kept, failures):
  """Drops (and reports as failed) the jobs whose inputs fail the checks that need no weights.

  Raises:
    io.InputError: the t range does not fit the model's schedule (every row would fail).
  """

  head = loading.load_model_head(args.model)
  args_lib.check_timesteps(config, head.schedule)
  keep = []
  for j, job in enumerate(jobs):
    try:
      if not os.path.isfile(job.image):
        raise io.InputError(f"image not found: {job.image}")
      pipeline.check_edit(
        head.tokenizer, head.schedule, job.source_prompt, job.target_prompt, job.seeds, config,
        job.edit_words, size=args.size, announce=lambda _note: None,
      )  # fmt: skip
    except io.InputError as e:
      failures.append((job_rows[j], str(e)))
      print(f"[row {job_rows[j]}] failed: {e}", file=sys.stderr)
      continue
    keep.append(j)
  return [jobs[j] for j in keep], [job_rows[j] for j in keep], [kept[j] for j in keep]


def _save_batch_seeds(result, model, args, out_dir, r: int) -> dict[int, dict]:
  """Writes each computed seed's strip (with --save-step), image, then record; returns the records.

  The record (`batchdir.split_run_record` of the run record, plus the seed's edit mask for the grid) is
  written last, so that its presence means the seed is finished (`batchdir.finished_seed_records`).
  """

  records = batchdir.split_run_record(pipeline.run_record(result, model, args.model))
  out = {}
  for i, s in enumerate(result.seeds):
    if result.snapshots is not None:
      strip = visual.snapshot_strip(
        result.input_image, list(result.snapshots[i]), list(result.snapshot_steps)
      )
      io.save_png(os.path.join(out_dir, batchdir.snapshot_name(r, s)), strip)
    io.save_png(
      os.path.join(out_dir, batchdir.output_name(r, s)), result.images[i], result.config.output_rounding
    )
    record = records[i]
    if result.mask is not None:
      record["mask"] = batchdir.array_to_json(result.mask[i])
    io.write_json_atomic(os.path.join(out_dir, batchdir.seed_record_name(r, s)), record)
    out[s] = record
  return out


def _save_batch_row(out_dir, r: int, seeds, input_image, images: dict, records: dict) -> None:
  """Writes a row's grid, then its run.json, over every requested seed.

  Args:
    out_dir: batch output folder.
    r: data-row index.
    seeds: the requested seeds, in order.
    input_image: the preprocessed input [H, W, 3].
    images: `{seed: image}` computed in this run; the others are read from their PNGs.
    records: `{seed: one-seed record}` of every requested seed.
  """

  edits = [
    images[s]
    if s in images
    else batchdir.read_output_image(os.path.join(out_dir, batchdir.output_name(r, s)))
    for s in seeds
  ]
  first = records[seeds[0]]
  mask = batchdir.array_from_json(first["mask"]) if "mask" in first else None
  title = f'{r:03d}: "{first["source_prompt"]}" -> "{first["target_prompt"]}"'
  grid = _edit_grid(input_image, edits, seeds, mask, title, bool(first.get("random_weights")))
  io.save_png(os.path.join(out_dir, batchdir.grid_name(r)), grid)
  io.write_json_atomic(
    os.path.join(out_dir, batchdir.run_record_name(r)),
    batchdir.merge_seed_records([records[s] for s in seeds]),
  )
