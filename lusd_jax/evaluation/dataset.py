"""The evaluation's inputs: a dataset folder, result folders, and every check that needs no model.

Dataset layout (mirrors MagicBrush's test split; the first three columns are `lusd-jax batch`'s
input, so one folder feeds both the editing and the evaluation):

  dataset/
    index.csv
    images/...

  A relative path in index.csv names `dataset/images/<path>` if that file exists, else
  `dataset/<path>` (the rule of `lusd-jax batch`, so `img_path` may be `cat.png` or `images/cat.png`).

  index.csv columns:
    img_path              source image x_src                                       (required)
    source_prompt         editing prompt for the source (used by `lusd-jax batch`)
    target_prompt         editing prompt for the target (`lusd-jax batch`; the UnifyEdit protocol's
                          CLIP score text)                                           (required)
    global_target_prompt  global description of the target image: y_tgt of CLIP-R
                          (empty or absent: target_prompt)
    global_source_prompt  global description of the source image (kept in the per-example CSV)
    local_prompt          local description of the edit: y_local of CLIP-T (empty or absent: target_prompt)
    gt_path               ground-truth edited image x_gt (empty or absent: no L1 / CLIP-I for that row)
    category              optional; "add" is reported as "add", any other value as "other"
    mask_path             optional; the edit's region (white = on), as `lusd-jax batch --method
                          unifyedit` reads it; "auto" or empty: no mask
    edit_type             optional; color, texture, object, background, style or face (Unify-Bench)

Results layout: a `lusd-jax batch` output folder (either method), `{row:03d}_seed{seed}.png` with `row`
the index.csv row (from 0). `seed=None` (default) takes the smallest seed present in the folder (0 for
a default batch run, and always 0 for UnifyEdit); `seed=N` takes that seed; `seed="all"` counts every
(row, seed) image as one edit. A row without a result image, or with an unreadable one, is reported
once and counted as an edit that failed. Wrong inputs, and results folders without one result image
for the dataset's rows, raise `InputError` before any model loads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from lusd_jax.batchdir import INDEX_FILE, image_path_candidates, parse_output_name, read_index_records
from lusd_jax.io import InputError, check_output_dir, check_seeds


class DatasetError(InputError):
  """The dataset or results folder does not have the documented layout (one line; CLI exit 2)."""


# ----------------------------------------------------------------------------- dataset and results


@dataclasses.dataclass(frozen=True)
class EditExample:
  """One row of the dataset's index.csv (paths resolved against the dataset folder)."""

  row: int
  source_path: str
  source_prompt: str
  target_prompt: str
  global_source_prompt: str
  global_target_prompt: str  # y_tgt of CLIP-R
  local_prompt: str  # y_local of CLIP-T
  gt_path: str | None
  category: str  # as written in index.csv ("" when absent)
  # The UnifyEdit protocol's columns: the mask's path (the first place looked at when no file is
  # there: the protocol's check names it), None when empty or "auto"; the edit type, lower-cased.
  mask_path: str | None = None
  edit_type: str = ""


def load_dataset(dataset_dir: str | os.PathLike) -> list[EditExample]:
  """Reads `dataset_dir/index.csv` (layout in this module's docstring) with `batchdir.read_index_records`.

  Raises:
    DatasetError: naming the file, the row and the column when something is missing.
  """
  dataset_dir = os.fspath(dataset_dir)
  index = os.path.join(dataset_dir, INDEX_FILE)
  if not os.path.isfile(index):
    raise DatasetError(f"missing file {index} (a dataset folder holds index.csv and the images it names)")
  try:
    records = read_index_records(index, ("img_path", "target_prompt"))
  except InputError as e:
    raise DatasetError(str(e)) from None

  def resolve(path: str, row: int, column: str) -> str:
    # `lusd-jax batch`'s rule: images/<path> (the official layout), else <path> beside index.csv.
    candidates = image_path_candidates(Path(dataset_dir), path)
    for full in candidates:
      if full.is_file():
        return str(full)
    raise DatasetError(
      f"{index}: row {row}: {column} '{path}' does not exist (looked for {' and '.join(map(str, candidates))})"
    )

  def mask(path: str) -> str | None:
    if not path or path == "auto":  # "auto": LUSD's attention mask, no region given in advance
      return None
    candidates = image_path_candidates(Path(dataset_dir), path)
    return str(next((c for c in candidates if c.is_file()), candidates[0]))

  examples = []
  for r in records:
    get = r.fields.__getitem__
    if not get("img_path"):
      raise DatasetError(f"{index}: row {r.row}: empty img_path")
    target = get("target_prompt")
    examples.append(
      EditExample(
        row=r.row,
        source_path=resolve(get("img_path"), r.row, "img_path"),
        source_prompt=get("source_prompt"),
        target_prompt=target,
        global_source_prompt=get("global_source_prompt"),
        global_target_prompt=get("global_target_prompt") or target,
        local_prompt=get("local_prompt") or target,
        gt_path=resolve(get("gt_path"), r.row, "gt_path") if get("gt_path") else None,
        category=get("category"),
        mask_path=mask(get("mask_path")),
        edit_type=get("edit_type").strip().lower(),
      )
    )
  return examples


def scan_results(results_dir: str | os.PathLike) -> dict[int, dict[int, str]]:
  """`{row: {seed: path}}` of the `{row:03d}_seed{seed}.png` files (`batchdir.output_name`) in a batch folder."""
  results_dir = os.fspath(results_dir)
  if not os.path.isdir(results_dir):
    raise DatasetError(f"results folder {results_dir} does not exist")
  try:
    names = sorted(os.listdir(results_dir))
  except OSError as e:
    raise DatasetError(f"cannot read results folder {results_dir} ({e.strerror or e})") from None
  found: dict[int, dict[int, str]] = {}
  for name in names:
    parsed = parse_output_name(name)
    if parsed:
      row, seed = parsed
      found.setdefault(row, {})[seed] = os.path.join(results_dir, name)
  return found


class ResultImage(NamedTuple):
  row: int
  seed: int | None  # None: no image of this row was found
  path: str | None  # None: missing


def select_results(found: Mapping[int, Mapping[int, str]], num_rows: int, seed: int | str | None = None):
  """Pairs dataset rows with result images; returns (list of `ResultImage`, the seed rule used).

  Args:
    found: `scan_results` output.
    num_rows: rows in the dataset (result files for other rows are ignored).
    seed: None (the smallest seed present), an int, or "all" (every seed of every row).
  """
  if seed == "all":
    out = []
    for row in range(num_rows):
      seeds = sorted(found.get(row, {}))
      out += [ResultImage(row, s, found[row][s]) for s in seeds] or [ResultImage(row, None, None)]
    return out, "all"
  if seed is None:
    present = sorted({s for row in range(num_rows) for s in found.get(row, {})})
    seed = present[0] if present else 0
  seed = int(seed)
  out = [ResultImage(row, seed, found.get(row, {}).get(seed)) for row in range(num_rows)]
  return out, str(seed)


def readable(path: str) -> bool:
  """Whether PIL can open and decode `path` (a truncated, corrupt or non-image file is a failed edit).

  Decodes the pixels (`load`): `verify` checks a PNG's chunk checksums only, so a PNG whose
  compressed data is damaged would pass it and fail later, when scored.
  """
  try:
    with Image.open(path) as im:
      im.load()
    return True
  except Exception:  # noqa: BLE001 - truncated or not an image: the edit failed
    return False


def open_rgb(path: str) -> Image.Image:
  """The image at `path` as RGB, read into memory (the file is closed)."""
  with Image.open(path) as im:
    return im.convert("RGB")


def method_names(results_dirs: Sequence[str]) -> list[str]:
  """The tables' method names: the folders' names, made unique with `_2`, `_3`, ..."""
  names = []
  for d in results_dirs:
    base = os.path.basename(os.path.normpath(d)) or d
    name, i = base, 2
    while name in names:
      name, i = f"{base}_{i}", i + 1
    names.append(name)
  return names


def _check_folder(path: str, flag: str) -> None:
  if not os.path.exists(path):
    raise InputError(f"{flag}: folder {path} does not exist")
  if not os.path.isdir(path):
    raise InputError(f"{flag}: {path} is a file, not a folder")


def _looked_for(num_rows: int, seed: int | str | None) -> str:
  s = "*" if seed is None or seed == "all" else seed
  first = f"000_seed{s}.png"
  return first if num_rows == 1 else f"{first} ... {num_rows - 1:03d}_seed{s}.png"


def _no_results_error(
  results_dirs: Sequence[str], found: Sequence[Mapping[int, Mapping[int, str]]], num_rows: int, seed
) -> InputError:
  """The one-line error when not one result image of any dataset row was found."""
  seeds_present = sorted({s for f in found for row, by_seed in f.items() if row < num_rows for s in by_seed})
  looked = _looked_for(num_rows, seed)
  if seeds_present:  # images for these rows exist, under other seeds
    return InputError(
      f"--seed {seed}: no result image with seed {seed} in {' '.join(results_dirs)} (looked for {looked}; "
      f"seeds present: {', '.join(map(str, seeds_present))}); check --results and --seed"
    )
  hints = []
  other_rows = sum(len(by_seed) for f in found for row, by_seed in f.items() if row >= num_rows)
  if other_rows:
    hints.append(
      f"{other_rows} result images are for rows beyond the {num_rows} rows of --dataset's index.csv"
    )
  pngs = sum(
    1 for d in results_dirs for n in os.listdir(d) if n.lower().endswith(".png") and not parse_output_name(n)
  )
  if pngs:
    hints.append(f"{pngs} .png files with other names")
  hint = f"; {'; '.join(hints)}" if hints else ""
  return InputError(
    f"--results {' '.join(results_dirs)}: no result images found (looked for {looked}{hint}); "
    "check --results and --seed"
  )


class Selection(NamedTuple):
  folder: str
  results: list[ResultImage]  # unreadable images have path None (failed edits)
  rule: str  # the seed rule used, for the log


def check_and_select(
  results_dirs: Sequence[str],
  dataset_dir: str,
  out_dir: str,
  seed: int | str | None,
  names: Sequence[str],
  log: Callable[[str], None],
) -> tuple[list[EditExample], list[Selection]]:
  """Every check of `run_eval` that needs no model: bad inputs stop here, before CLIP's weights load.

  Also reports each unreadable and each missing result image once (both are failed edits).
  """
  if seed is not None and seed != "all":
    check_seeds([seed], flag="--seed")
  if not results_dirs:
    raise InputError("--results: give at least one results folder")
  if len(names) != len(results_dirs):
    raise InputError(f"--names: {len(names)} names for {len(results_dirs)} --results folders")
  _check_folder(dataset_dir, "--dataset")
  for d in results_dirs:
    _check_folder(d, "--results")
  check_output_dir(out_dir, flag="--out")
  try:
    examples = load_dataset(dataset_dir)
  except DatasetError as e:
    raise DatasetError(f"--dataset: {e}") from None
  try:
    found = [scan_results(d) for d in results_dirs]
  except DatasetError as e:
    raise DatasetError(f"--results: {e}") from None
  selections = []
  for folder, fnd in zip(results_dirs, found, strict=True):
    results, rule = select_results(fnd, len(examples), seed)
    selections.append(Selection(folder, results, rule))
  if all(r.path is None for sel in selections for r in sel.results):
    raise _no_results_error(results_dirs, found, len(examples), seed)

  checked = []
  for folder, results, rule in selections:
    missing = [r for r in results if r.path is None]
    unreadable = [r for r in results if r.path is not None and not readable(r.path)]
    if unreadable:  # reported here by path, and not again among the missing ones
      log(
        f"eval: {folder}: {len(unreadable)} unreadable result images, counted as failed edits: "
        f"{', '.join(r.path for r in unreadable)}"
      )
    if missing:
      shown = ", ".join(f"{r.row:03d}_seed{'*' if r.seed is None else r.seed}.png" for r in missing[:10])
      more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
      log(
        f"eval: {folder}: {len(missing)} of {len(results)} result images missing, counted as failed edits: "
        f"{shown}{more}"
      )
    bad = set(unreadable)
    checked.append(Selection(folder, [r._replace(path=None) if r in bad else r for r in results], rule))
  return examples, checked
