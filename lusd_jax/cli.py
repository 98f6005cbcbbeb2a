"""The `lusd-jax` command: edit one image, run a batch folder, convert a checkpoint, evaluate.

Every user mistake ends in one line `error: ...` naming the file or argument, and exit code 2;
no raw traceback (set LUSD_JAX_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit code 2, like every other usage error
    self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


def _config_flag_name(field: str) -> str:
  return "--" + field.replace("_", "-")


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
  from lusd_jax.lusd.config import LUSDConfig

  g = p.add_argument_group("LUSD hyperparameters (default: the paper's values; see --preset)")
  for f in dataclasses.fields(LUSDConfig):
    default = f.default
    kind = type(default)
    help_text = f.metadata.get("help", "") if f.metadata else ""
    if kind is bool:
      g.add_argument(
        _config_flag_name(f.name),
        dest=f"cfg_{f.name}",
        default=None,
        action=argparse.BooleanOptionalAction,
        help=help_text,
      )
    elif kind in (int, float, str):
      g.add_argument(
        _config_flag_name(f.name),
        dest=f"cfg_{f.name}",
        default=None,
        type=kind,
        metavar=kind.__name__.upper(),
        help=f"{help_text} (default {default})".strip(),
      )


def _add_common_arguments(p: argparse.ArgumentParser) -> None:
  from lusd_jax import loading, sharding

  loading.add_model_arguments(p)
  p.add_argument(
    "--preset",
    default="paper",
    choices=["paper", "official"],
    help="paper: as the paper's text; official: as the public PyTorch code, bug-compatible "
    "(README, 'The algorithm and its two presets') (default %(default)s)",
  )
  p.add_argument(
    "--size",
    type=int,
    default=512,
    help="image side after center crop, a multiple of 64 (default %(default)s)",
  )
  p.add_argument(
    "--seeds",
    type=int,
    nargs="+",
    default=None,
    help="seeds to run (default: --init-seed .. --init-seed + --num-seed - 1)",
  )
  p.add_argument(
    "--init-seed", type=int, default=0, help="first seed when --seeds is not given (default %(default)s)"
  )
  p.add_argument(
    "--num-seed", type=int, default=1, help="number of seeds when --seeds is not given (default %(default)s)"
  )
  p.add_argument(
    "--save-step",
    type=int,
    default=0,
    help="save progress snapshots every N steps (0: off; default %(default)s)",
  )
  sharding.add_devices_argument(p)
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  _add_config_arguments(p)


def build_parser() -> argparse.ArgumentParser:
  from lusd_jax import __version__

  p = _Parser(prog="lusd-jax", description="LUSD text-guided image editing on Stable Diffusion, in JAX.")
  p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  e = sub.add_parser(
    "edit", help="edit one image", description="Edit one image: lusd-jax edit IMAGE --source ... --target ..."
  )
  e.add_argument("image", nargs="?", help="input image (any format PIL reads)")
  e.add_argument("--example", default=None, help="use a bundled example instead of IMAGE: cat, coffee")
  e.add_argument("--source", default=None, help="source prompt (describes the input; may be empty)")
  e.add_argument("--target", default=None, help="target prompt (describes the edit)")
  e.add_argument(
    "--edit-words", default=None, help='words of the target prompt to localize the edit on, e.g. "party hat"'
  )
  e.add_argument("--out", default="outputs", help="output folder (default %(default)s)")
  _add_common_arguments(e)

  b = sub.add_parser(
    "batch",
    help="edit every row of an index.csv",
    description="Edit every row of DIR/index.csv (img_path,source_prompt,target_prompt[,edit_words]).",
  )
  b.add_argument("--input-dir", required=True, help="folder with index.csv and images/ (required)")
  b.add_argument(
    "--output-dir",
    required=True,
    help="folder for {row:03d}_seed{seed}.png, grids and run records (required)",
  )
  _add_common_arguments(b)

  c = sub.add_parser(
    "convert",
    help="convert a checkpoint to the fast-loading format",
    description="Convert a Stable Diffusion 1.x/2.x checkpoint into lusd-jax's fast-loading folder (Flax "
    "param trees in safetensors plus configs and the tokenizer), then load it back and verify every "
    "parameter (round trip). Load the result with --model OUT.",
  )
  c.add_argument("src", help="diffusers folder, hub id, or single-file .ckpt/.safetensors (needs torch)")
  c.add_argument("out", help="output folder (created; must not be a file)")
  c.add_argument("--dtype", default="float32", help="dtype of the stored params (default %(default)s)")
  c.add_argument(
    "--single-file-config",
    default=None,
    help="diffusers folder or hub id giving the architecture of a single-file SRC (default: inferred)",
  )

  from lusd_jax.sweeps import add_sweep_arguments

  add_sweep_arguments(
    sub.add_parser(
      "sweep", help="edit one image over a grid of hyperparameters x seeds (one compiled program)"
    )
  )

  try:
    from lusd_jax import evaluation
  except ImportError:  # evaluation extras missing
    evaluation = None
  if evaluation is not None:
    ev = sub.add_parser("eval", help="score result folders (CLIP-T, CLIP-AUC, L1*, CLIP-I*)")
    evaluation.add_eval_arguments(ev)
  return p


# ----------------------------------------------------------------------------- helpers


# Arguments of the Python API whose flag is not "--" + the name with dashes.
_FLAGS = {
  "seeds": "--seeds",
  "source_prompt": "--source",
  "target_prompt": "--target",
}


def flag_name(name: str) -> str:
  """The command-line flag of an API argument or `LUSDConfig` field: "t_max" -> "--t-max"."""
  return _FLAGS.get(name, "--" + name.replace("_", "-"))


def config_from_flags(base, overrides: dict):
  """`base.replace(**overrides)`; an out-of-range value is an `InputError` naming its flag."""
  import re

  from lusd_jax.io import InputError
  from lusd_jax.lusd.config import ConfigError, LUSDConfig

  try:
    return base.replace(**overrides)  # validates (LUSDConfig.__post_init__)
  except ConfigError as e:
    fields = "|".join(f.name for f in dataclasses.fields(LUSDConfig))
    problem = re.sub(rf"\b({fields})\b", lambda m: flag_name(m.group()), e.problem)
    raise InputError(f"{flag_name(e.field)} {problem}") from None


def _seeds(args) -> tuple[int, ...]:
  from lusd_jax import io

  if args.seeds is not None:
    return io.check_seeds(args.seeds, "--seeds")
  if args.num_seed < 1:
    raise io.InputError(f"--num-seed must be >= 1, got {args.num_seed}")
  io.check_seeds([args.init_seed], "--init-seed")
  return io.check_seeds(range(args.init_seed, args.init_seed + args.num_seed), "--init-seed/--num-seed")


def _config(args):
  from lusd_jax import io
  from lusd_jax.lusd.config import LUSDConfig

  base = LUSDConfig.official() if args.preset == "official" else LUSDConfig()
  overrides = {
    f.name: getattr(args, f"cfg_{f.name}")
    for f in dataclasses.fields(LUSDConfig)
    if getattr(args, f"cfg_{f.name}", None) is not None
  }
  config = config_from_flags(base, overrides)
  if getattr(args, "save_step", 0) < 0:
    raise io.InputError(f"--save-step must be >= 0 (0: no snapshots), got {args.save_step}")
  return config


def check_before_load(args, configs, seeds, source, target, edit_words, out_flag: str = "--out"):
  """Every check of `edit`/`sweep` that needs no weights: output folder, devices, prompts, t range.

  Reads only the model's tokenizer and scheduler config (`loading.load_model_head`).

  Returns:
    The device mesh (`sharding.mesh_for`).

  Raises:
    io.InputError, loading.ModelLoadError: one line naming the flag.
  """
  from lusd_jax import io, loading, pipeline, sharding

  io.check_output_dir(args.out, out_flag)
  mesh = sharding.mesh_for(args.devices)
  head = loading.load_model_head(args.model)
  for config in configs[1:]:
    _check_timesteps(config, head.schedule)
  pipeline.check_edit(
    head.tokenizer, head.schedule, source, target, seeds, configs[0], edit_words,
    size=args.size, names=flag_name, announce=print,
  )  # fmt: skip
  return mesh


def _check_timesteps(config, schedule) -> None:
  from lusd_jax.io import InputError
  from lusd_jax.lusd.config import ConfigError

  try:
    config.check_timesteps(schedule.num_train_timesteps)
  except ConfigError as e:
    raise InputError(f"{flag_name(e.field)} {e.problem}") from None


def _load_model(args):
  from lusd_jax import loading

  if args.model == loading.TINY_RANDOM:
    print(
      "note: --model tiny-random has random weights: the pipeline runs end to end, but the pictures are meaningless.",
      file=sys.stderr,
    )
  return loading.load_model(args.model, dtype=args.dtype)


def _edit_grid(input_image, images, seeds, mask, title: str, random_weights: bool):
  """The picture of one edit: input | one edit per seed | the first seed's mask, captioned."""
  from lusd_jax import visual

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
  import numpy as np

  from lusd_jax import io, pipeline, visual

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


# ----------------------------------------------------------------------------- commands


def cmd_edit(args) -> int:
  from lusd_jax import examples, pipeline

  seeds = _seeds(args)
  config = _config(args)
  image, source, target, edit_words = examples.inputs_from_args(args)
  mesh = check_before_load(args, [config], seeds, source, target, edit_words)
  model = _load_model(args)
  t0 = time.time()
  result = pipeline.edit(
    model,
    image,
    source,
    target,
    seeds=seeds,
    config=config,
    edit_words=edit_words,
    snapshot_every=args.save_step or None,
    size=args.size,
    progress=not args.quiet,
    announce=lambda _note: None,  # check_before_load printed the notes
    mesh=mesh,
  )
  _save_result(result, model, args, args.out, lambda s: "" if s is None else f"edit_seed{s}.png")
  print(f"wrote {args.out}/grid.png and {len(seeds)} edited image(s) in {time.time() - t0:.1f} s")
  return 0


def cmd_batch(args) -> int:
  """Edits every unfinished (row, seed) of index.csv; on several devices, several rows run at once.

  Resume is per seed and per row (see the comment above `io.PER_SEED_KEYS`): each seed's image is
  followed by its record `{row:03d}_seed{s}.json`; a rerun keeps the seeds that have both, computes
  the others, and then rebuilds the row's grid and run.json from every requested seed, reading the
  finished ones back. Rows already complete are skipped, and when no seed is left to compute the
  model is not loaded.
  """
  from lusd_jax import io, pipeline, sharding

  rows = io.read_index(args.input_dir)
  seeds = _seeds(args)
  config = _config(args)
  io.validate_size(args.size)
  out_dir = io.check_output_dir(args.output_dir, flag="--output-dir")
  mesh = sharding.mesh_for(args.devices)
  snapshots = bool(args.save_step)
  stale = io.remove_stale_temp_files(out_dir)
  if stale:
    print(f"batch: removed {len(stale)} temporary file(s) left by an interrupted run", file=sys.stderr)
  failures: list[tuple[int, str]] = []
  jobs, job_rows, kept = [], [], []  # kept[j]: the finished seeds' records of job j's row
  rebuild = []  # (row, records): every seed finished, the row's grid or run.json missing
  skipped = 0
  for row in rows:
    if io.row_is_done(out_dir, row.row, seeds, snapshots):
      skipped += 1
      continue
    if row.problem:
      failures.append((row.row, f"index.csv row {row.row}: {row.problem}"))
      print(f"[row {row.row}] failed: {failures[-1][1]}", file=sys.stderr)
      continue
    finished = io.finished_seed_records(out_dir, row.row, seeds, snapshots)
    todo = [s for s in seeds if s not in finished]
    if not todo:
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
    try:
      image = io.load_image(row.img_path, args.size)
    except io.InputError as e:
      failures.append((row.row, str(e)))
      print(f"[row {row.row}] failed: {e}", file=sys.stderr)
      continue
    _save_batch_row(out_dir, row.row, seeds, image, {}, finished)
    done += 1
  if jobs:
    model = _load_model(args)
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
        failures.append((r, str(result)))
        print(f"[row {r}] failed: {result}", file=sys.stderr)
        continue
      new = _save_batch_seeds(result, model, args, out_dir, r)
      images = {s: result.images[i] for i, s in enumerate(result.seeds)}
      _save_batch_row(out_dir, r, seeds, result.input_image, images, {**kept[j], **new})
      done += 1
  failures.sort()
  print(f"batch: {done} edited, {skipped} already done, {len(failures)} failed (of {len(rows)} rows)")
  if failures:
    print(io.summarize_failures(failures))
  return 1 if failures else 0


def _check_batch_jobs(args, config, seeds, jobs, job_rows, kept, failures):
  """Drops (and reports as failed) the jobs whose inputs fail the checks that need no weights.

  Raises:
    io.InputError: the t range does not fit the model's schedule (every row would fail).
  """
  from lusd_jax import io, loading, pipeline

  head = loading.load_model_head(args.model)
  _check_timesteps(config, head.schedule)
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

  The record (`io.split_run_record` of the run record, plus the seed's edit mask for the grid) is
  written last, so that its presence means the seed is finished (`io.finished_seed_records`).
  """
  from lusd_jax import io, pipeline, visual

  records = io.split_run_record(pipeline.run_record(result, model, args.model))
  out = {}
  for i, s in enumerate(result.seeds):
    if result.snapshots is not None:
      strip = visual.snapshot_strip(
        result.input_image, list(result.snapshots[i]), list(result.snapshot_steps)
      )
      io.save_png(os.path.join(out_dir, io.snapshot_name(r, s)), strip)
    io.save_png(os.path.join(out_dir, io.output_name(r, s)), result.images[i], result.config.output_rounding)
    record = records[i]
    if result.mask is not None:
      record["mask"] = io.array_to_json(result.mask[i])
    io.write_json_atomic(os.path.join(out_dir, io.seed_record_name(r, s)), record)
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
  from lusd_jax import io

  edits = [
    images[s] if s in images else io.read_output_image(os.path.join(out_dir, io.output_name(r, s)))
    for s in seeds
  ]
  first = records[seeds[0]]
  mask = io.array_from_json(first["mask"]) if "mask" in first else None
  title = f'{r:03d}: "{first["source_prompt"]}" -> "{first["target_prompt"]}"'
  grid = _edit_grid(input_image, edits, seeds, mask, title, bool(first.get("random_weights")))
  io.save_png(os.path.join(out_dir, io.grid_name(r)), grid)
  io.write_json_atomic(
    os.path.join(out_dir, io.run_record_name(r)), io.merge_seed_records([records[s] for s in seeds])
  )


def cmd_convert(args) -> int:
  from lusd_jax import convert

  argv = [args.src, args.out, "--dtype", args.dtype]
  if args.single_file_config:
    argv += ["--single-file-config", args.single_file_config]
  return convert.main(argv)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
  """`warnings.showwarning` for the command line: `warning: ...`, no file path or source line."""
  del category, filename, lineno, line
  text = " ".join(str(message).split())
  print(f"warning: {text[:300]}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
  # transformers prints a line about PyTorch on import when torch is absent; lusd-jax never needs it.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  parser = build_parser()
  args = parser.parse_args(argv)
  import warnings

  warnings.showwarning = _one_line_warning
  from lusd_jax import io, loading
  from lusd_jax.compilation_cache import enable_compilation_cache

  # Compiled programs persist across runs (~/.cache/lusd_jax/xla; LUSD_JAX_NO_CACHE=1 turns it off).
  enable_compilation_cache()
  handlers = {"edit": cmd_edit, "batch": cmd_batch, "convert": cmd_convert}
  if args.command == "sweep":
    from lusd_jax.sweeps import sweep_command

    handlers["sweep"] = sweep_command
  if args.command == "eval":
    from lusd_jax import evaluation

    handlers["eval"] = evaluation.eval_command
  try:
    return handlers[args.command](args)
  except (io.InputError, loading.ModelLoadError, ValueError) as e:
    if os.environ.get("LUSD_JAX_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except FloatingPointError as e:  # core.NonFiniteError: the run diverged; no usage error
    if os.environ.get("LUSD_JAX_DEBUG"):
      raise
    print(f"error: {e} (try a smaller --lr or --dtype float32)", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
