"""`lusd-jax eval`: its arguments and the command; the metrics are `lusd_jax.evaluation`'s."""

from __future__ import annotations

import argparse

from lusd_jax import evaluation


def _seed_arg(value: str) -> int | str:
  if value == "all":
    return value
  try:
    return int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--seed takes an integer or 'all', not {value!r}") from None


EVAL_DESCRIPTION = """\
Score `lusd-jax batch` result folders on a dataset with the metrics of LUSD Sec. 4.2 (MagicBrush
conventions). Nothing is edited here; the dataset folder is the one `lusd-jax batch` read.

Per edit (x: result image, x_src: source image, x_gt: ground truth; CLIP ViT-B/32 embeddings):
  CLIP-T    cos(CLIP(x), CLIP(local_prompt)): does the result show the edit
  CLIP-R    cos(CLIP(x), CLIP(global_target_prompt)) / cos(CLIP(x_src), CLIP(global_target_prompt));
            > 1: the edit moved the image towards the target; doing nothing gives exactly 1
  L1        mean |x - x_gt| over pixels in [0, 1] (x resized to x_gt's size)
  CLIP-I    cos(CLIP(x), CLIP(x_gt))
Per results folder and category (all, and add / other from index.csv's category column):
  CLIP-T    mean over the result images that exist
  CLIP-AUC  area under the success rate s(k) = share of edits with CLIP-R > k, k = 1.00 .. 1.40
            (0 .. 0.4, higher is better; doing nothing scores 0)
  L1*       area under the mean L1 of the edits with CLIP-R > k, k = 1.00 .. 1.22 (lower is better)
  CLIP-I*   the same for CLIP-I (higher is better); L1* / CLIP-I* are n/a when some k has no success
A missing or unreadable result image is reported once and counts as a failed edit.

--dataset DIR/index.csv columns: img_path, target_prompt (required); source_prompt,
global_target_prompt, local_prompt (empty: target_prompt), gt_path (empty: no L1 / CLIP-I),
category. Results: {row:03d}_seed{seed}.png, row = index.csv row from 0.

Writes to --out: summary.md and summary.csv (the table, also printed), per_example.csv (every edit's
scores), success_rate.csv and success_rate.png (s(k) per results folder, LUSD Fig. 8).
Wrong inputs, or no result image found at all, stop with one error line before CLIP loads.
"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the `lusd-jax eval` options, description and help layout to `parser` (a subcommand parser)."""
  parser.description = EVAL_DESCRIPTION
  # Keeps the metric definitions one per line (the default formatter refills them into one paragraph).
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.add_argument(
    "--results",
    nargs="+",
    action="extend",
    required=True,
    metavar="DIR",
    help="one or more `lusd-jax batch` output folders ({row:03d}_seed{seed}.png), compared side by "
    "side; repeatable (required, no default)",
  )
  parser.add_argument(
    "--dataset",
    required=True,
    metavar="DIR",
    help="dataset folder with index.csv and the images it names (required, no default)",
  )
  parser.add_argument(
    "--clip",
    default="openai/clip-vit-base-patch32",
    metavar="MODEL",
    help="transformers CLIPModel folder or hub id, or 'tiny-random' (meaningless scores, for a dry run) "
    "(default %(default)s)",
  )
  parser.add_argument(
    "--out", default="eval", metavar="DIR", help="output folder for the tables and plot (default %(default)s)"
  )
  parser.add_argument(
    "--seed",
    type=_seed_arg,
    default=None,
    metavar="N|all",
    help="which result image per row: seed N, or 'all' (every seed is an edit) "
    "(default: the smallest seed present in each folder)",
  )
  parser.add_argument(
    "--names",
    nargs="+",
    metavar="NAME",
    help="method names for the tables, one per --results folder (default: the folder names)",
  )
  return parser


def cmd_eval(args: argparse.Namespace) -> int:
  """`lusd-jax eval`: scores the results folders (`evaluation.run_eval`) and prints the summary table."""
  report = evaluation.run_eval(
    args.results, args.dataset, args.clip, args.out, seed=args.seed, names=args.names
  )
  print(evaluation.markdown_table(report.summary), end="")
  for key in ("summary_csv", "summary_md", "per_example", "plot"):
    if key in report.files:  # no plot without matplotlib
      print(f"wrote {report.files[key]}")
  return 0
