"""`lusd-jax convert-magicbrush`: MagicBrush's released test split into a dataset folder."""

from __future__ import annotations

import argparse

from lusd_jax import datasets


def add_convert_magicbrush_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `lusd-jax convert-magicbrush` arguments to `parser` (a subcommand parser)."""
  parser.description = (
    "Convert MagicBrush's test split (edit_sessions.json, global_descriptions.json, "
    "local_descriptions.json, images/<id>/...) into a dataset folder for `lusd-jax batch` and `lusd-jax "
    "eval`: one index.csv row per edit turn (a later turn starts from the previous turn's ground truth, "
    "MagicBrush's single-turn setting), prompts from the global descriptions, the local description "
    "as local_prompt, the turn's output as gt_path, masks converted to white = edit (see "
    "lusd_jax/datasets.py)."
  )
  parser.add_argument("src", help="the unzipped MagicBrush test split (the folder with edit_sessions.json)")
  parser.add_argument("out", help="the new dataset folder (must not exist, or be empty)")
  parser.add_argument(
    "--turns",
    default="all",
    choices=list(datasets.TURNS),
    help="all: every edit turn; first: the first turn of each session (the real photos) (default %(default)s)",
  )
  parser.add_argument(
    "--prompts",
    default=None,
    metavar="CSV",
    help="editing prompts and categories keyed by idx (e.g. LUSD's magicbrush/MagicBrush_reformat.csv): "
    "they replace source_prompt/target_prompt of the turns they name; the global descriptions stay "
    "the evaluation's",
  )


def cmd_convert_magicbrush(args) -> int:
  """Converts SRC into OUT (errors reach the one handler in `cli`)."""
  summary = datasets.convert_magicbrush(args.src, args.out, turns=args.turns, prompts_csv=args.prompts)
  print(datasets.summary_line(summary, args.src))
  return 0
