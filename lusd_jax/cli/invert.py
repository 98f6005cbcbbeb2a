"""`lusd-jax invert`: invert a photo (DDIM, optionally null-text) and reconstruct it."""

from __future__ import annotations

import argparse
import os
import time

from lusd_jax import inversion, io, loading, reconstruction, visual
from lusd_jax.cli import args as args_lib


def add_invert_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `lusd-jax invert` arguments to `parser` (a subcommand parser)."""
  parser.description = (
    "Invert a photo into Stable Diffusion's noise with DDIM (guidance 1, the source prompt), optionally "
    "optimize the per-step null-text embeddings (null-text inversion, Prompt-to-Prompt's defaults), and "
    "sample it back with classifier-free guidance. Writes grid.png (input | reconstruction), "
    "inversion.npz (z_T, the trajectory, the null embeddings, the timesteps) and inversion.json "
    "(settings, reconstruction error, timings)."
  )
  parser.add_argument("image", nargs="?", help="input image (any format PIL reads)")
  parser.add_argument("--example", default=None, help="use a bundled example instead of IMAGE: cat, coffee")
  parser.add_argument(
    "--source", default=None, help="prompt describing the photo (default: the example's, or '')"
  )
  parser.add_argument(
    "--null-text",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="optimize the null embeddings of every step (default: on; --no-null-text: DDIM inversion only)",
  )
  parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default %(default)s)")
  parser.add_argument(
    "--guidance", type=float, default=inversion.NTI_GUIDANCE, help="guidance w (default %(default)s)"
  )
  parser.add_argument(
    "--inner-steps",
    type=int,
    default=inversion.NTI_INNER_STEPS,
    help="most Adam steps per DDIM step of null-text inversion (default %(default)s)",
  )
  parser.add_argument("--out", default="outputs/invert", help="output folder (default %(default)s)")
  args_lib.add_model_arguments(parser)
  args_lib.add_size_argument(parser)
  args_lib.add_quiet_argument(parser)


_FLAGS = {"num_steps": "--steps", "guidance": "--guidance", "inner_steps": "--inner-steps"}


def cmd_invert(args: argparse.Namespace) -> int:
  """Every check before the weights load, the inversion, then its files."""
  io.validate_size(args.size)
  io.check_output_dir(args.out, "--out")
  head = loading.load_model_head(args.model)
  reconstruction.check_inversion(
    args.steps, args.guidance, args.inner_steps, head.schedule.num_train_timesteps, _FLAGS.get
  )
  if args.example is not None:
    if args.image is not None:
      raise io.InputError("give either IMAGE or --example, not both")
    from lusd_jax import examples

    ex = examples.get_example(args.example)
    image, source = ex.image(args.size), ex.source if args.source is None else args.source
  elif args.image is None:
    raise io.InputError("give an IMAGE (or --example cat)")
  else:
    image, source = io.load_image(args.image, args.size), args.source or ""
  model = args_lib.load_model(args)
  t0 = time.time()
  result = reconstruction.invert(
    model, image, source, num_steps=args.steps, null_text=args.null_text, guidance=args.guidance,
    inner_steps=args.inner_steps, size=args.size, announce=print, progress=not args.quiet,
  )  # fmt: skip
  title = f'"{source}": {"null-text" if args.null_text else "DDIM"} inversion, {args.steps} steps'
  if model.is_random:
    title += " (random weights)"
  grid = visual.grid([result.input_image, result.reconstruction], ["input", "reconstruction"], title=title)
  io.save_png(os.path.join(args.out, "grid.png"), grid)
  io.save_png(os.path.join(args.out, "reconstruction.png"), result.reconstruction)
  io.atomic_write_npz(os.path.join(args.out, "inversion.npz"), reconstruction.record(result))
  io.write_json_atomic(
    os.path.join(args.out, "inversion.json"),
    {
      "source_prompt": source,
      "model": args.model,
      "dtype": model.dtype,
      "random_weights": model.is_random,
      "image_size": list(result.input_image.shape[:2]),
      "null_text": args.null_text,
      "steps": args.steps,
      "guidance": args.guidance,
      "inner_steps": args.inner_steps,
      "latent_mse": result.latent_error,
      "psnr_db": result.psnr_db,
      "inner_steps_per_step": None if result.inner_steps is None else result.inner_steps.tolist(),
      "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
    },
  )
  print(
    f"wrote {args.out}/grid.png, inversion.npz and inversion.json in {time.time() - t0:.1f} s "
    f"(reconstruction: latent MSE {result.latent_error:.4g}, PSNR {result.psnr_db:.1f} dB)"
  )
  return 0
