"""The `lusd-jax` command: edit one image, run a batch folder, sweep, convert a checkpoint, evaluate.

One module per command (`edit` also holds `batch`; `sweep`, `evaluate`, `convert`) over the
argument groups of `args`, each defined once. Commands raise; `run_command` is the one place that
turns an exception into what the user sees: every user mistake (`io.InputError`,
`loading.ModelLoadError`, any ValueError) ends in one line `error: ...` naming the file or flag and
exit code 2, a diverged run in one line and exit code 1; no raw traceback (set LUSD_JAX_DEBUG=1 to
see one).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from lusd_jax.cli.args import (
  EXIT_USAGE,
  METHODS,
  add_devices_argument,
  add_model_arguments,
  check_before_load,
  config_from_flags,
  flag_name,
  inputs_from_args,
)
from lusd_jax.cli.args import (
  _Parser as _Parser,  # the tests build sub-parsers with it
)
from lusd_jax.cli.convert import add_convert_arguments, cmd_convert
from lusd_jax.cli.datasets import add_convert_magicbrush_arguments, cmd_convert_magicbrush
from lusd_jax.cli.edit import _save_result as _save_result  # the tests write a result with it
from lusd_jax.cli.edit import add_batch_arguments, add_edit_arguments, cmd_batch, cmd_edit
from lusd_jax.cli.evaluate import add_eval_arguments, cmd_eval
from lusd_jax.cli.invert import add_invert_arguments, cmd_invert
from lusd_jax.cli.sweep import add_sweep_arguments, cmd_sweep, write_sweep

__all__ = [
  "EXIT_USAGE",
  "METHODS",
  "add_devices_argument",
  "add_eval_arguments",
  "add_model_arguments",
  "add_sweep_arguments",
  "build_parser",
  "check_before_load",
  "config_from_flags",
  "eval_command",
  "flag_name",
  "inputs_from_args",
  "main",
  "run_command",
  "sweep_command",
  "write_sweep",
]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
  "edit": cmd_edit,
  "batch": cmd_batch,
  "sweep": cmd_sweep,
  "convert": cmd_convert,
  "eval": cmd_eval,
  "invert": cmd_invert,
  "convert-magicbrush": cmd_convert_magicbrush,
}


def build_parser() -> argparse.ArgumentParser:
  from lusd_jax.version import __version__

  p = _Parser(prog="lusd-jax", description="LUSD text-guided image editing on Stable Diffusion, in JAX.")
  p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  add_edit_arguments(sub.add_parser("edit", help="edit one image"))
  add_batch_arguments(sub.add_parser("batch", help="edit every row of an index.csv"))
  add_convert_arguments(sub.add_parser("convert", help="convert a checkpoint to the fast-loading format"))
  add_sweep_arguments(
    sub.add_parser(
      "sweep", help="edit one image over a grid of hyperparameters x seeds (one compiled program)"
    )
  )
  add_eval_arguments(
    sub.add_parser(
      "eval",
      help="score result folders side by side (MagicBrush: CLIP-T, CLIP-AUC, L1*, CLIP-I*; UnifyEdit: DINO, CLIP-L)",
    )
  )
  add_invert_arguments(sub.add_parser("invert", help="invert a photo (null-text) and reconstruct it"))
  add_convert_magicbrush_arguments(
    sub.add_parser("convert-magicbrush", help="convert MagicBrush's test split into a dataset folder")
  )
  return p


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
  """Runs one command; the one error handler of the command line.

  Args:
    command: one of `COMMANDS`; it raises on any problem and returns its exit status otherwise.
    args: its parsed arguments.

  Returns:
    The command's exit status; 2 after one `error: ...` line for a user mistake (`io.InputError`,
    `loading.ModelLoadError`, ValueError); 1 for a diverged run (FloatingPointError); 130 when
    interrupted. With LUSD_JAX_DEBUG=1 the exceptions propagate (a traceback). A process of a
    `--distributed` run that stops on one of these errors ends at once (`distributed.end_on_error`).
  """
  from lusd_jax import distributed

  debug = bool(os.environ.get("LUSD_JAX_DEBUG"))
  try:
    return command(args)
  except ValueError as e:  # io.InputError, loading.ModelLoadError, clip.CLIPLoadError are ValueErrors
    if debug:
      _end_distributed_with_traceback(1)
      raise
    print(f"error: {e}", file=sys.stderr)
    code = EXIT_USAGE
  except FloatingPointError as e:  # core.NonFiniteError: the run diverged; no usage error
    if debug:
      _end_distributed_with_traceback(1)
      raise
    print(f"error: {e} (try a smaller --lr or --dtype float32)", file=sys.stderr)
    code = 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    code = 130
  except BaseException:  # anything else (OSError writing a file, out of memory): a traceback
    _end_distributed_with_traceback(1)
    raise
  distributed.end_on_error(code)  # `--distributed`: no waiting for the other processes
  return code


def _end_distributed_with_traceback(code: int) -> None:
  """In a `--distributed` run, prints the exception being handled and ends the process at once
  (`distributed.end_on_error`: a normal exit would wait for the others, which wait for this one, at
  JAX's shutdown barrier); otherwise does nothing, and the caller re-raises."""
  from lusd_jax import distributed

  if distributed.joined():
    traceback.print_exc()
    distributed.end_on_error(code)


def sweep_command(args: argparse.Namespace) -> int:
  """`lusd-jax sweep` from arguments parsed by `add_sweep_arguments`, as `main` runs it."""
  return run_command(cmd_sweep, args)


def eval_command(args: argparse.Namespace) -> int:
  """`lusd-jax eval` from arguments parsed by `add_eval_arguments`, as `main` runs it."""
  return run_command(cmd_eval, args)


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
  from lusd_jax.compilation_cache import enable_compilation_cache

  # Compiled programs persist across runs (~/.cache/lusd_jax/xla; LUSD_JAX_NO_CACHE=1 turns it off).
  enable_compilation_cache()
  return run_command(COMMANDS[args.command], args)
