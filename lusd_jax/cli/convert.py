"""`lusd-jax convert`: a checkpoint into lusd-jax's fast-loading folder."""

from __future__ import annotations

import argparse

from lusd_jax import loading


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `lusd-jax convert` arguments to `parser` (a subcommand parser)."""
  parser.description = (
    "Convert a Stable Diffusion 1.x/2.x checkpoint into lusd-jax's fast-loading folder (Flax "
    "param trees in safetensors plus configs and the tokenizer), then load it back and verify every "
    "parameter (round trip). Load the result with --model OUT."
  )
  parser.add_argument("src", help="diffusers folder, hub id, or single-file .ckpt/.safetensors (needs torch)")
  parser.add_argument("out", help="output folder (created; must not be a file)")
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=list(loading.DTYPE_POLICIES),
    help="dtype policy of the stored params (default %(default)s)",
  )
  parser.add_argument(
    "--single-file-config",
    default=None,
    help="diffusers folder or hub id giving the architecture of a single-file SRC (default: inferred)",
  )


def cmd_convert(args) -> int:
  """Converts SRC into OUT and verifies the round trip (errors reach the one handler in `cli`)."""
  import jax

  from lusd_jax import convert, io

  io.check_output_dir(args.out, "OUT")  # before minutes of loading
  model = convert.convert(args.src, args.out, args.dtype, args.single_file_config)
  n = sum(x.size for x in jax.tree.leaves(model.params))
  print(f"converted {args.src} -> {args.out} ({n / 1e6:.1f}M parameters, {model.dtype}); round trip verified")
  return 0
