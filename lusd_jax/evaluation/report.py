"""The evaluation's files: CSV and Markdown tables, and `report.md`, which embeds the tables and pictures."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any


def _fmt(v, digits: int = 3) -> str:
  if isinstance(v, float):
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
  return str(v)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """Writes dict rows (the union of their keys, in first-seen order) to `path`."""
  keys: list[str] = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
      w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})


def markdown_table(rows: Sequence[Mapping[str, Any]], digits: Mapping[str, int] | None = None) -> str:
  """A GitHub Markdown table of dict rows (floats to 3 decimals unless `digits[column]` says, NaN as n/a)."""
  digits = digits or {}
  keys = list(rows[0]) if rows else []
  lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
  lines += ["| " + " | ".join(_fmt(r.get(k, ""), digits.get(k, 3)) for k in keys) + " |" for r in rows]
  return "\n".join(lines) + "\n"


# DINO distances of real edits are a few hundredths: four decimals keep methods apart.
UNIFYEDIT_DIGITS = {"DINO": 4, "CLIP-L": 2}

_UNIFYEDIT_TEXT = """\
Per edit: **DINO** = DINO ViT-B/8 structure distance between the source and the result (mean squared
difference of the cosine self-similarity of the last layer's keys; fidelity, lower is better);
**CLIP-L** = 100 x cos(CLIP ViT-L/14 image, target_prompt) (editability, higher is better). Local edit
types (color, texture, object, face) with a mask are scored on the mask's bounding box (`cropped`),
the others whole. `failed`: no readable result image; left out of the means.
"""

_MAGICBRUSH_TEXT = """\
LUSD Table 2 (CLIP ViT-B/32): CLIP-T = mean cos(result, local_prompt); CLIP-AUC = area under the
success rate s(k) (share of edits with CLIP-R > k, k = 1.00 .. 1.40; higher is better); L1* / CLIP-I* =
area under the mean L1 / CLIP-I to the ground truth over the edits with CLIP-R > k, k = 1.00 .. 1.22
(n/a without ground truth or without a success). `missing`: no readable result image, a failed edit.
"""


def write_report(
  path: str,
  *,
  dataset: str,
  num_rows: int,
  folders: Mapping[str, tuple[str, str]],
  models: Mapping[str, str],
  random_weights: bool,
  failures: Mapping[str, Sequence[str]],
  unifyedit: Sequence[Mapping[str, Any]] | None = None,
  scatter: str | None = None,
  magicbrush: Sequence[Mapping[str, Any]] | None = None,
  success_plot: str | None = None,
) -> None:
  """Writes `report.md`: what was compared, each protocol's table and picture, the failed edits.

  Args:
    path: the file to write; pictures are linked by name, relative to its folder.
    dataset: the dataset folder; num_rows: its index.csv rows.
    folders: method -> (results folder, the seed rule used).
    models: role ("CLIP-L", "DINO", "CLIP (MagicBrush)") -> model name.
    random_weights: says so at the top (the numbers are then meaningless).
    failures: method -> the failed edits' result names (missing or unreadable).
    unifyedit, magicbrush: each protocol's summary rows (None: the protocol did not run).
    scatter, success_plot: the pictures' paths (None: not drawn).
  """
  here = os.path.dirname(os.path.abspath(path))
  link = lambda p: os.path.relpath(os.path.abspath(p), here)
  lines = ["# lusd-jax eval report", ""]
  if random_weights:
    lines += ["**Random weights**: some model here is `tiny-random`; the numbers are meaningless.", ""]
  lines += [
    f"Dataset: `{dataset}` ({num_rows} rows).",
    "",
    "| method | results folder | seed |",
    "|---|---|---|",
  ]
  lines += [f"| {m} | `{folder}` | {rule} |" for m, (folder, rule) in folders.items()]
  lines += ["", "Models: " + "; ".join(f"{role} `{name}`" for role, name in models.items()) + ".", ""]
  if unifyedit is not None:
    lines += ["## UnifyEdit protocol (fidelity and editability per edit type)", "", _UNIFYEDIT_TEXT]
    lines += [markdown_table(unifyedit, UNIFYEDIT_DIGITS)]
    if scatter:
      lines += [f"![fidelity against editability, one panel per edit type]({link(scatter)})", ""]
  if magicbrush is not None:
    lines += ["## MagicBrush protocol (LUSD Sec. 4.2)", "", _MAGICBRUSH_TEXT, markdown_table(magicbrush)]
    if success_plot:
      lines += [f"![success rate s(k) against the CLIP-R threshold k]({link(success_plot)})", ""]
  lines += ["## Failed edits", ""]
  failed = {m: f for m, f in failures.items() if f}
  lines += [f"- {m}: {len(f)} ({', '.join(f)})" for m, f in failed.items()] or ["None."]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
