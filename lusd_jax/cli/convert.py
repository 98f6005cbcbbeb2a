"""`lusd-jax convert`: a checkpoint into lusd-jax's fast-loading folder."""

from __future__ import annotations

import argparse


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `lusd-jax convert` arguments to `parser` (a subcommand parser)."""
  parser.description = (
    "Convert a Stable Diffusion 1.x/2.x checkpoint into lusd-jax's fast-loading folder (Flax "
    "param trees in safetensors plus configs and the tokenizer), then load it back and verify every "
    "parameter (round trip). Load the result with --model OUT."
  )
  parser.add_argument("src", help="diffusers folder, hub id, or single-file .ckpt/.safetensors (needs torch)")
  parser.add_argument("out", help="output folder (created; must not be a file)")
  parser.add_argument("--dtype", default="float32", help="dtype of the stored params (default %(default)s)")
  parser.add_argument(
    "--single-file-config",
    default=None,
    help="diffusers folder or hub id giving the architecture of a single-file SRC (default: inferred)",
  )


def cmd_convert(args) -> int:
  from convert import convert_checkpoint

  argv = [args.src, args.out, "--dtype", args.dtype]
  if args.single_file_config:
    argv += ["--single-file-config", args.single_file_config]
  return convert_checkpoint.main(argv)
