"""The command line's argument groups, each defined once, and what they mean.

A group is an `add_*` function over an argparse parser; its reader (`seeds_from_args`,
`config_from_args`, `inputs_from_args`, `mesh_from_args`, `load_model`) turns the parsed values into
library arguments and raises `io.InputError` naming the flag. `flag_name` / `config_from_flags` are
the one table between `LUSDConfig` fields (and API argument names) and flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any, NamedTuple

from lusd_jax import distributed, examples, io, loading, methods, pipeline, sharding
from lusd_jax.configs import ConfigError
from lusd_jax.lusd.config import LUSDConfig
from lusd_jax.unifyedit import pipeline as unifyedit_pipeline
from lusd_jax.unifyedit.config import EDIT_TYPES, UnifyEditConfig

EXIT_USAGE = 2

# The editing methods `--method` accepts: the registry's names.
METHODS = tuple(methods.METHODS)


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit code 2, like every other usage error
    self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


# ----------------------------------------------------------------------------- flag <-> field

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
  """`base.replace(**overrides)` (an `LUSDConfig` or `UnifyEditConfig`); an out-of-range value is an
  `InputError` naming its flag."""
  try:
    return base.replace(**overrides)  # validates (__post_init__)
  except ConfigError as e:
    fields = "|".join(f.name for f in dataclasses.fields(type(base)))
    problem = re.sub(rf"\b({fields})\b", lambda m: flag_name(m.group()), e.problem)
    raise io.InputError(f"{flag_name(e.field)} {problem}") from None


def check_timesteps(config, schedule) -> None:
  """`config.check_timesteps` against the model's schedule; an `InputError` naming the flag."""
  try:
    config.check_timesteps(schedule.num_train_timesteps)
  except ConfigError as e:
    raise io.InputError(f"{flag_name(e.field)} {e.problem}") from None


# ----------------------------------------------------------------------------- groups


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds `--model` and `--dtype` (the arguments of `loading.load_model`)."""
  parser.add_argument(
    "--model",
    default=loading.DEFAULT_MODEL,
    help="diffusers folder, converted folder, hub id, or tiny-random (default %(default)s)",
  )
  dtypes = "; ".join(f"{k}: {v.help}" for k, v in loading.DTYPE_POLICIES.items())
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=list(loading.DTYPE_POLICIES),
    help=f"params and activations: {dtypes}",
  )


def add_method_argument(parser: argparse.ArgumentParser) -> None:
  """Adds `--method` (one of `METHODS`)."""
  parser.add_argument(
    "--method",
    default=METHODS[0],
    choices=METHODS,
    help="editing method: "
    + "; ".join(f"{name}: {entry.summary}" for name, entry in methods.METHODS.items())
    + " (default %(default)s)",
  )


def add_preset_argument(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
  """Adds `--preset paper|official` (LUSD's base config) and `--edit-type` (UnifyEdit's preset)."""
  parser.add_argument(
    "--preset",
    default=None,
    choices=["paper", "official"],
    help=(
      help_text
      or "LUSD: paper: as the paper's text; official: as the public PyTorch code, bug-compatible "
      "(README, 'The algorithm and its two presets')"
    )
    + " (default paper)",
  )
  parser.add_argument(
    "--edit-type",
    default=None,
    choices=EDIT_TYPES,
    help="UnifyEdit: the paper's settings for this edit type (Sec. 5.2; README, 'UnifyEdit'); "
    "default: UnifyEditConfig()'s (texture's k = 0.08)",
  )


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds UnifyEdit's `--mask PATH|auto` and `--reuse-inversion PATH`."""
  parser.add_argument(
    "--mask",
    default=None,
    metavar="PATH|auto",
    help="UnifyEdit: the region of a local edit, an image at the photo's size (white = edit), cropped "
    "and resized like it; auto: LUSD's attention mask of the edit words; omit for a global edit",
  )
  parser.add_argument(
    "--reuse-inversion",
    default=None,
    metavar="NPZ",
    help="UnifyEdit: start from `lusd-jax invert`'s inversion.npz (same photo, source prompt, --size, "
    "--num-steps) instead of inverting again",
  )


def add_size_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--size",
    type=int,
    default=512,
    help="image side after center crop, a multiple of 64 (default %(default)s)",
  )


def add_seed_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds `--seeds`, `--init-seed`, `--num-seed` (read by `seeds_from_args`)."""
  parser.add_argument(
    "--seeds",
    type=int,
    nargs="+",
    default=None,
    help="seeds to run (default: --init-seed .. --init-seed + --num-seed - 1)",
  )
  parser.add_argument(
    "--init-seed", type=int, default=0, help="first seed when --seeds is not given (default %(default)s)"
  )
  parser.add_argument(
    "--num-seed", type=int, default=1, help="number of seeds when --seeds is not given (default %(default)s)"
  )


def add_devices_argument(parser: argparse.ArgumentParser) -> None:
  """Adds `--devices N` (read by `mesh_from_args`)."""
  parser.add_argument(
    "--devices",
    type=int,
    default=None,
    metavar="N",
    help="spread the edits over the first N devices (default: all of them; with --distributed, this "
    "process's)",
  )


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds `--distributed`, `--coordinator`, `--num-processes`, `--process-id` (`process_from_args`)."""
  g = parser.add_argument_group("several processes (hosts): start every one with the same command")
  g.add_argument(
    "--distributed",
    action="store_true",
    help="join the other processes (jax.distributed.initialize) and run only this process's share, "
    "writing only its files (README, 'Sweeps and many devices')",
  )
  g.add_argument(
    "--coordinator", default=None, metavar="HOST:PORT",
    help="process 0's address and a free port (default: found on Cloud TPU, SLURM, Open MPI)",
  )  # fmt: skip
  g.add_argument("--num-processes", type=int, default=None, metavar="N", help="how many processes")
  g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 .. N-1")


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds IMAGE, `--example`, `--source`, `--target`, `--edit-words` (read by `inputs_from_args`)."""
  parser.add_argument("image", nargs="?", help="input image (any format PIL reads)")
  parser.add_argument("--example", default=None, help="use a bundled example instead of IMAGE: cat, coffee")
  parser.add_argument("--source", default=None, help="source prompt (describes the input; may be empty)")
  parser.add_argument("--target", default=None, help="target prompt (describes the edit)")
  parser.add_argument(
    "--edit-words", default=None, help='words of the target prompt to localize the edit on, e.g. "party hat"'
  )


def _config_flag_help(f) -> str:
  return f.metadata.get("help", "") if f.metadata else ""


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds one flag per field of every method's config (`flag_name`), read by `config_from_args`.

  A field both configs have (num_steps, gradient, ...) is one flag; it sets the --method's field.
  """
  seen = set()
  for method, entry in methods.METHODS.items():
    g = parser.add_argument_group(f"{method} hyperparameters (--method {method})")
    for f in dataclasses.fields(entry.config):
      if f.name in seen:
        continue
      seen.add(f.name)
      kind = type(f.default)
      others = [m for m, e in methods.METHODS.items() if m != method and f.name in _field_names(e.config)]
      defaults = ", ".join(
        f"{getattr(e.config(), f.name)} ({m})"
        for m, e in methods.METHODS.items()
        if f.name in _field_names(e.config)
      )
      help_text = _config_flag_help(f) + (f"; also {', '.join(others)}'s" if others else "")
      if kind is bool:
        g.add_argument(
          flag_name(f.name), dest=f"cfg_{f.name}", default=None, action=argparse.BooleanOptionalAction,
          help=help_text,
        )  # fmt: skip
      elif kind in (int, float, str):
        g.add_argument(
          flag_name(f.name), dest=f"cfg_{f.name}", default=None, type=kind, metavar=kind.__name__.upper(),
          help=f"{help_text} (default {defaults})".strip(),
        )  # fmt: skip


def _field_names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
  """The groups of `edit` and `batch`: model, method, preset, size, seeds, snapshots, devices, config."""
  add_model_arguments(parser)
  add_method_argument(parser)
  add_preset_argument(parser)
  add_mask_arguments(parser)
  add_size_argument(parser)
  add_seed_arguments(parser)
  parser.add_argument(
    "--save-step",
    type=int,
    default=0,
    help="save progress snapshots every N steps (0: off; default %(default)s)",
  )
  add_devices_argument(parser)
  add_quiet_argument(parser)
  add_config_arguments(parser)


# ----------------------------------------------------------------------------- readers


def base_config(args: argparse.Namespace):
  """The --method's base config: LUSD's `--preset`, UnifyEdit's `--edit-type` preset.

  Raises:
    io.InputError: a preset flag of the other method.
  """
  method = getattr(args, "method", "lusd")
  preset, edit_type = getattr(args, "preset", None), getattr(args, "edit_type", None)
  if method == "unifyedit":
    if preset is not None:
      raise io.InputError(
        f"--preset {preset} is LUSD's; UnifyEdit's presets are --edit-type {'|'.join(EDIT_TYPES)}"
      )
    return UnifyEditConfig.preset(edit_type) if edit_type else UnifyEditConfig()
  if edit_type is not None:
    raise io.InputError(f"--edit-type {edit_type} is UnifyEdit's: add --method unifyedit")
  return LUSDConfig.official() if preset == "official" else LUSDConfig()


def seeds_from_args(args: argparse.Namespace) -> tuple[int, ...]:
  """`--seeds`, or `--init-seed` .. `--init-seed + --num-seed - 1`, checked (`io.check_seeds`)."""
  if args.seeds is not None:
    return io.check_seeds(args.seeds, "--seeds")
  if args.num_seed < 1:
    raise io.InputError(f"--num-seed must be >= 1, got {args.num_seed}")
  io.check_seeds([args.init_seed], "--init-seed")
  return io.check_seeds(range(args.init_seed, args.init_seed + args.num_seed), "--init-seed/--num-seed")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
  """The hyperparameter flags given, {field: value}; a flag of the other method's config is an error."""
  method = getattr(args, "method", "lusd")
  mine = _field_names(methods.get(method).config)
  given = {
    name: getattr(args, f"cfg_{name}")
    for entry in methods.METHODS.values()
    for name in _field_names(entry.config)
    if getattr(args, f"cfg_{name}", None) is not None
  }
  for name in given:
    if name not in mine:
      owner = next(m for m, e in methods.METHODS.items() if name in _field_names(e.config))
      raise io.InputError(f"{flag_name(name)} is a {owner} hyperparameter; this run's --method is {method}")
  return given


def config_from_args(args: argparse.Namespace):
  """The --method's base config with every given hyperparameter flag applied, and the flags of the
  other method (and LUSD's `--save-step`, UnifyEdit's `--mask`) refused."""
  method = getattr(args, "method", "lusd")
  config = config_from_flags(base_config(args), config_overrides(args))
  if getattr(args, "save_step", 0) < 0:
    raise io.InputError(f"--save-step must be >= 0 (0: no snapshots), got {args.save_step}")
  if method == "unifyedit" and getattr(args, "save_step", 0):
    raise io.InputError(
      "--save-step is LUSD's (snapshots of its optimization); UnifyEdit saves its scheduler plot"
    )
  if method != "unifyedit":
    for flag in ("mask", "reuse_inversion"):
      if getattr(args, flag, None) is not None:
        raise io.InputError(f"{flag_name(flag)} is UnifyEdit's: add --method unifyedit")
  return config


def inputs_from_args(args: argparse.Namespace):
  """(image [size, size, 3], source, target, edit_words) of `lusd-jax edit` / `sweep` arguments.

  Either IMAGE with --target (--source and --edit-words optional) or --example NAME, whose prompts
  --source / --target / --edit-words override.

  Raises:
    io.InputError: both or neither of IMAGE and --example, no --target, a bad --size or image.
  """
  io.validate_size(args.size)
  if args.example is not None:
    if args.image is not None:
      raise io.InputError("give either IMAGE or --example, not both")
    ex = examples.get_example(args.example)
    source = ex.source if args.source is None else args.source
    target = ex.target if args.target is None else args.target
    edit_words = ex.edit_words if args.edit_words is None else args.edit_words
    return ex.image(args.size), source, target, edit_words
  if args.image is None:
    raise io.InputError("give an IMAGE (or --example cat)")
  if args.target is None:
    raise io.InputError("--target is required")
  return io.load_image(args.image, args.size), args.source or "", args.target, args.edit_words


def process_from_args(args: argparse.Namespace) -> distributed.Process:
  """This process's place: `Process(0, 1)` alone; with `--distributed`, joins the others first.

  Call it before anything starts JAX (`jax.distributed.initialize` must come first).

  Raises:
    io.InputError: a bad flag of the group (`distributed.check_flags`), or the others did not join.
  """
  flags = (args.coordinator, args.num_processes, args.process_id)
  distributed.check_flags(args.distributed, *flags)
  if not args.distributed:
    return distributed.Process(0, 1)
  try:
    return distributed.initialize(*flags)
  except RuntimeError as e:  # a timeout, a port in use: JAX's message is many lines
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise io.InputError(f"--distributed: could not join the other processes: {first}") from None


def mesh_from_args(args: argparse.Namespace):
  """`sharding.mesh_for(--devices)`; its ValueError becomes an `InputError` naming `--devices`."""
  try:
    return sharding.mesh_for(args.devices)
  except ValueError as e:
    raise io.InputError(f"--devices: {e}") from None


def check_before_load(args, configs, seeds, source, target, edit_words, out_flag: str = "--out"):
  """Every check of `edit`/`sweep` that needs no weights: output folder, devices, prompts, t range,
  and for UnifyEdit the mask (loaded, cropped and resized like the photo) and a reused inversion.

  Reads only the model's tokenizer and scheduler config (`loading.load_model_head`).

  Returns:
    (the device mesh (`mesh_from_args`), UnifyEdit's mask: [size, size] float32, "auto" or None).

  Raises:
    io.InputError, loading.ModelLoadError: one line naming the flag.
  """
  io.check_output_dir(args.out, out_flag)
  mesh = mesh_from_args(args)
  head = loading.load_model_head(args.model)
  for config in configs[1:]:
    check_timesteps(config, head.schedule)
  if not isinstance(configs[0], UnifyEditConfig):
    pipeline.check_edit(
      head.tokenizer, head.schedule, source, target, seeds, configs[0], edit_words,
      size=args.size, names=flag_name, announce=print,
    )  # fmt: skip
    return mesh, None
  if len(seeds) != 1:
    raise io.InputError("--seeds: UnifyEdit is deterministic (DDIM inversion and sampling): give one seed")
  image_size = io.image_original_size(args.image) if getattr(args, "image", None) else None
  _, _, mask = unifyedit_pipeline.check_unifyedit(
    head.tokenizer, head.schedule, source, target, configs[0], edit_words, mask=getattr(args, "mask", None),
    image_size=image_size, size=args.size, names=flag_name, announce=print,
  )  # fmt: skip
  _check_unifyedit_configs(configs)
  reuse = getattr(args, "reuse_inversion", None)
  if reuse is not None:
    if not os.path.isfile(reuse):
      raise io.InputError(f"--reuse-inversion: no such file: {reuse}")
    # Readable, and made with this --num-steps; the latent and embedding shapes (which need the
    # model's configs) are checked again once the model is loaded.
    unifyedit_pipeline.load_inversion(reuse, configs[0].num_steps, None, None, "--reuse-inversion")
  return mesh, mask


def _check_unifyedit_configs(configs) -> None:
  """One guidance for every config under null-text inversion (its null embeddings are optimized for
  one guidance; `unifyedit.pipeline.edit_configs` refuses it too, but only after the model loads).
  The other shared fields (inversion, steps) are static and cannot be gridded."""
  first = configs[0]
  if first.inversion == "nti" and any(c.guidance != first.guidance for c in configs[1:]):
    raise io.InputError(
      "--grid guidance: null-text inversion is optimized for one guidance; sweep it with "
      "--inversion ddim, or run one sweep per guidance"
    )


class CheckedRun(NamedTuple):
  """What `edit` and `sweep` run on, every input checked before the model loaded."""

  image: Any  # [size, size, 3] float32 in [0, 1]
  source: str
  target: str
  edit_words: str | None
  mesh: Any  # sharding.data_mesh or None
  model: loading.SDModel
  mask: Any = None  # UnifyEdit: [size, size] float32, "auto", or None (a global edit)


def check_then_load(args: argparse.Namespace, configs, seeds) -> CheckedRun:
  """The photo and prompts of `edit`/`sweep`; every check that needs no weights; then the model."""
  image, source, target, edit_words = inputs_from_args(args)
  mesh, mask = check_before_load(args, configs, seeds, source, target, edit_words)
  return CheckedRun(image, source, target, edit_words, mesh, load_model(args), mask)


def load_model(args: argparse.Namespace) -> loading.SDModel:
  """`loading.load_model(--model, --dtype)`, saying once that tiny-random's pictures are meaningless."""
  if args.model == loading.TINY_RANDOM:
    print(
      "note: --model tiny-random has random weights: the pipeline runs end to end, but the pictures are meaningless.",
      file=sys.stderr,
    )
  return loading.load_model(args.model, dtype=args.dtype)
