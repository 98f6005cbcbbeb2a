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
Score `lusd-jax batch` result folders (either method, ablations, sweeps) on a dataset with two papers'
protocols, side by side. Nothing is edited here; the dataset folder is the one `lusd-jax batch` read.

--protocol magicbrush (LUSD Sec. 4.2, MagicBrush conventions; CLIP ViT-B/32, --clip).
Per edit (x: result image, x_src: source image, x_gt: ground truth):
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
  missing   edits without a readable result image: failed, in every denominator

--protocol unifyedit (the UnifyEdit paper's; DINO ViT-B/8, --dino; CLIP ViT-L/14, --clip-l).
Per edit:
  DINO      structure distance between x_src and x (Splice): the mean squared difference of the
            token x token cosine self-similarity of the keys of DINO's last layer, images resized to
            224 x 224 (fidelity, lower is better; 0 for an unchanged image)
  CLIP-L    100 x cos(CLIP-L(x), CLIP-L(target_prompt)), as loveu-tgve's CLIP score (editability,
            higher is better)
  crops     local edit types (color, texture, object, face) with a mask_path: x_src and x are both
            cropped to the mask's bounding box before scoring (PFB-Diff); background, style, rows
            without edit_type or without mask_path are scored whole
Per results folder, overall (all) and per edit type:
  DINO, CLIP-L  means over the edits with a readable result image
  failed    edits without a readable result image: counted here, left out of the means
  cropped   edits scored on the mask's box
--protocol all runs both.

--dataset DIR/index.csv columns: img_path, target_prompt (required); source_prompt,
global_target_prompt, local_prompt (empty: target_prompt), gt_path (empty: no L1 / CLIP-I),
category, mask_path, edit_type. Results: {row:03d}_seed{seed}.png, row = index.csv row from 0.
A missing or unreadable result image is reported once and counts as a failed edit.

Writes to --out: report.md (the tables and pictures of the protocols run, the failed edits);
magicbrush: summary.md and summary.csv (the table, also printed), per_example.csv (every edit's
scores), success_rate.csv and success_rate.png (s(k) per results folder, LUSD Fig. 8);
unifyedit: unifyedit_summary.md / .csv (also printed), unifyedit_per_example.csv,
fidelity_editability.png (UnifyEdit Fig. 7: CLIP-L on x, DINO on y, one panel per edit type, one
marker per results folder; lower-right is better).
Wrong inputs, or no result image found at all, stop with one error line before any model loads.
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
    help="magicbrush's CLIP: transformers CLIPModel folder or hub id, or 'tiny-random' (meaningless "
    "scores, for a dry run) "
    "(default %(default)s)",
  )
  parser.add_argument(
    "--protocol",
    default="magicbrush",
    choices=evaluation.PROTOCOLS,
    help="magicbrush (CLIP-T, CLIP-AUC, L1*, CLIP-I*), unifyedit (DINO, CLIP-L per edit type) or all "
    "(default %(default)s)",
  )
  parser.add_argument(
    "--clip-l",
    default=evaluation.DEFAULT_CLIP_L,
    metavar="MODEL",
    help="unifyedit's CLIP ViT-L/14: transformers CLIPModel folder or hub id, or 'tiny-random' "
    "(default %(default)s)",
  )
  parser.add_argument(
    "--dino",
    default=evaluation.DEFAULT_DINO,
    metavar="MODEL",
    help="unifyedit's DINO ViT-B/8: transformers ViTModel folder or hub id, or 'tiny-random' "
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
    args.results,
    args.dataset,
    args.clip,
    args.out,
    protocol=args.protocol,
    clip_l_model=args.clip_l,
    dino_model=args.dino,
    seed=args.seed,
    names=args.names,
  )
  if report.unifyedit_summary:
    print(evaluation.markdown_table(report.unifyedit_summary, evaluation.UNIFYEDIT_DIGITS), end="")
  if report.summary:
    print(evaluation.markdown_table(report.summary), end="")
  for key in (
    "report", "summary_csv", "summary_md", "per_example", "plot", "unifyedit_summary_csv",
    "unifyedit_summary_md", "unifyedit_per_example", "scatter",
  ):  # fmt: skip
    if key in report.files:  # no plot without matplotlib
      print(f"wrote {report.files[key]}")
  return 0
