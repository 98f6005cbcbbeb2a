"""The batch folder format: `index.csv` and `images/` in, one file per (row, seed) out, resumable.

The input layout is the official LUSD code's (`samples/index.csv` with `img_path,source_prompt,
target_prompt`), extended with optional columns (`edit_words`, and the evaluation's
`global_target_prompt`, `local_prompt`, `gt_path`, `category`): one folder feeds `lusd-jax batch`
and `lusd-jax eval`, and one reader (`read_index_records`) parses it for both. Results are named
`{row:03d}_seed{seed}.png` (`output_name` / `parse_output_name`), with per-seed records and per-row
grids and run records that make a killed batch resumable (see "How a batch resumes" below).
Problems with the folder raise `io.InputError` naming index.csv and the line.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from lusd_jax.io import InputError

INDEX_FILE = "index.csv"
IMAGES_DIR = "images"
REQUIRED_COLUMNS = ("img_path", "source_prompt", "target_prompt")  # of a batch (`read_index`)
# Every column any reader uses: the batch's, then the evaluation's (`evaluation.load_dataset`).
INDEX_COLUMNS = (
  *REQUIRED_COLUMNS,
  "edit_words",
  "mask_path",  # UnifyEdit: the row's mask (a path like img_path, or "auto")
  "edit_type",  # UnifyEdit: the row's preset (color, texture, object, background, style, face)
  "global_source_prompt",
  "global_target_prompt",
  "local_prompt",
  "gt_path",
  "category",
)


# ----------------------------------------------------------------------------------------------
# Batch input: <input_dir>/images/*, <input_dir>/index.csv


class BatchRow(NamedTuple):
  """One edit request of a batch.

  `row` numbers data rows from 0 in file order (blank lines skipped, as pandas does in the
  official code), and names the outputs. `problem` is set when the row itself is unusable
  (empty image path or target prompt, a wrong number of fields); the batch runner reports such
  rows as failed and goes on.
  """

  row: int  # 0-based data-row index, used in output names
  line: int  # line in index.csv where the row ends, for messages
  img_path: Path  # resolved against input_dir/images/, then input_dir
  source_prompt: str  # may be empty (the official samples have one)
  target_prompt: str
  edit_words: str | None  # optional column; None when absent or empty
  problem: str | None = None
  mask_path: Path | str | None = None  # UnifyEdit's optional column: a resolved path, "auto", or None
  edit_type: str | None = None  # UnifyEdit's optional column


def image_path_candidates(input_dir: Path, name: str) -> list[Path]:
  """Where an index.csv path may be, in order: `images/<name>` (the official layout), `<name>`
  beside index.csv; an absolute path (after `~` expansion) is itself only."""
  p = Path(name).expanduser()
  if p.is_absolute():
    return [p]
  return [input_dir / IMAGES_DIR / p, input_dir / p]


def _resolve_image_path(input_dir: Path, name: str) -> Path:
  """The first of `image_path_candidates` that exists, else the first (named in "not found" errors)."""
  candidates = image_path_candidates(input_dir, name)
  return next((c for c in candidates if c.exists()), candidates[0])


def _mask_path(input_dir: Path, name: str) -> Path | str | None:
  """A row's mask_path: resolved like img_path; "auto" (LUSD's attention mask) kept; "" -> None."""
  if not name:
    return None
  return "auto" if name == "auto" else _resolve_image_path(input_dir, name)


def _row_problem(fields: dict, extra: Sequence[str], csv_path: Path, line: int) -> str | None:
  """Describes what makes one CSV row unusable, or None."""
  if extra:
    return f"{csv_path} line {line}: more fields than columns (quote prompts that contain commas)"
  if not fields["img_path"]:
    return f"{csv_path} line {line}: empty img_path"
  if not fields["target_prompt"]:
    return f"{csv_path} line {line}: empty target_prompt"
  return None


class IndexRecord(NamedTuple):
  """One data row of an index.csv, as read: every `INDEX_COLUMNS` value, no meaning attached yet."""

  row: int  # 0-based data-row index (blank lines skipped)
  line: int  # line in index.csv where the row ends, for messages
  fields: dict[str, str]  # each of INDEX_COLUMNS, stripped; "" when the column is absent or empty
  extra: tuple[str, ...]  # fields beyond the header (an unquoted comma in a prompt)


def read_index_records(csv_path: str | os.PathLike, required: Sequence[str]) -> list[IndexRecord]:
  """Reads an index.csv: the one parser of the batch input and the evaluation dataset.

  The file is read with the `csv` module as UTF-8 with or without a BOM (as Excel writes it);
  header names and values are stripped of surrounding spaces; columns come in any order, and
  columns outside `INDEX_COLUMNS` are ignored. Rows are returned as read (checking them is the
  caller's job).

  Args:
    csv_path: the index.csv file (it must exist).
    required: columns the header must have.

  Returns:
    One `IndexRecord` per data row, in file order.

  Raises:
    InputError: naming the file: not UTF-8, malformed CSV, empty (no header), a required column
      missing, or no data rows.
  """
  csv_path = Path(csv_path)
  try:
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames:
        raise InputError(f"{csv_path} is empty; expected a header line {','.join(required)}")
      # Tolerate "img_path, source_prompt" style headers.
      reader.fieldnames = [(name or "").strip() for name in reader.fieldnames]
      for column in required:
        if column not in reader.fieldnames:
          raise InputError(
            f"{csv_path}: missing column '{column}' (header must include {','.join(required)})"
          )
      # Short rows give None for the missing fields; extra fields land under the key None.
      records = [
        IndexRecord(
          row=i,
          line=reader.line_num,
          fields={c: (record.get(c) or "").strip() for c in INDEX_COLUMNS},
          extra=tuple(record.get(None) or ()),
        )
        for i, record in enumerate(reader)
      ]
  except UnicodeDecodeError as e:
    raise InputError(f"{csv_path} is not valid UTF-8 text (byte {e.start})") from e
  except csv.Error as e:
    raise InputError(f"{csv_path}: malformed CSV ({e})") from e
  if not records:
    raise InputError(f"{csv_path} has a header but no rows")
  return records


def read_index(input_dir: str | os.PathLike) -> list[BatchRow]:
  """Reads a batch folder in the official LUSD format.

  `index.csv` has a header with `img_path,source_prompt,target_prompt` and optionally
  `edit_words` (and, for UnifyEdit, `mask_path` and `edit_type`), in any order; extra columns are
  ignored. It is read by `read_index_records`.

  Args:
    input_dir: folder holding `index.csv` and usually `images/`.

  Returns:
    One `BatchRow` per data row, in file order, including unusable rows (with `problem` set).

  Raises:
    InputError: `input_dir` or `index.csv` missing, file not UTF-8, no header, a required
      column missing, or no data rows. The message names index.csv.
  """
  input_dir = Path(input_dir)
  if not input_dir.is_dir():
    raise InputError(f"--input-dir is not a directory: {input_dir}")
  csv_path = input_dir / INDEX_FILE
  if not csv_path.is_file():
    raise InputError(f"{INDEX_FILE} not found in {input_dir} (expected {csv_path})")
  return [
    BatchRow(
      row=r.row,
      line=r.line,
      img_path=_resolve_image_path(input_dir, r.fields["img_path"]),
      source_prompt=r.fields["source_prompt"],
      target_prompt=r.fields["target_prompt"],
      edit_words=r.fields["edit_words"] or None,
      problem=_row_problem(r.fields, r.extra, csv_path, r.line),
      mask_path=_mask_path(input_dir, r.fields["mask_path"]),
      edit_type=r.fields["edit_type"] or None,
    )
    for r in read_index_records(csv_path, REQUIRED_COLUMNS)
  ]


def output_name(row: int, seed: int) -> str:
  """File name of one edited image, as the official code: `{row:03d}_seed{seed}.png`."""
  return f"{row:03d}_seed{seed}.png"


# `output_name`'s inverse; the row may have fewer or more than 3 digits (the official code's files).
_OUTPUT_NAME = re.compile(r"([0-9]+)_seed([0-9]+)\.png")


def parse_output_name(name: str) -> tuple[int, int] | None:
  """(row, seed) of an `output_name` file name (`"007_seed1.png"` -> (7, 1)); None for other names."""
  m = _OUTPUT_NAME.fullmatch(name)
  return (int(m.group(1)), int(m.group(2))) if m else None


def seed_record_name(row: int, seed: int) -> str:
  """File name of one seed's record (`split_run_record`), written right after its image."""
  return f"{row:03d}_seed{seed}.json"


def snapshot_name(row: int, seed: int) -> str:
  """File name of one seed's progress strip (`--save-step`), written right before its image."""
  return f"{row:03d}_snapshots_seed{seed}.png"


def grid_name(row: int) -> str:
  """File name of a row's grid (input | every seed | edit mask)."""
  return f"{row:03d}_grid.png"


def run_record_name(row: int) -> str:
  """File name of a row's run record (`pipeline.run_record` over every seed), written last."""
  return f"{row:03d}_run.json"


def is_done(path: str | os.PathLike) -> bool:
  """Whether an output file is finished: it exists and is non-empty (writes are atomic)."""
  p = Path(path)
  return p.is_file() and p.stat().st_size > 0


def pending_seeds(out_dir: str | os.PathLike, row: int, seeds: Iterable[int]) -> list[int]:
  """The seeds of `row` whose output image is not written yet.

  This looks at the images only; `lusd-jax batch` resumes with `finished_seed_records`, which also
  needs each seed's record.

  Args:
    out_dir: batch output folder (may not exist yet).
    row: data-row index.
    seeds: the seeds the run asks for.

  Returns:
    Seeds without a finished `output_name(row, seed)` in `out_dir`, in the given order.
  """
  out_dir = Path(out_dir)
  return [s for s in seeds if not is_done(out_dir / output_name(row, s))]


# How a batch resumes. Each row is written in this order, every file atomically (`_atomic_write`):
#   for each computed seed: [snapshots_seed{s}.png], seed{s}.png, seed{s}.json
#   then grid.png, then run.json (built from the records of ALL requested seeds).
# A kill leaves a prefix of that sequence (plus perhaps one `.{name}.*.tmp`), so a seed is finished
# when its record exists (its image and strip were written before it), and a row is done when its
# run.json, written last, lists every requested seed. A rerun computes the unfinished seeds only and
# rebuilds the row's grid and run.json, reading the finished seeds' images and records back.

# The entries of `pipeline.run_record` that hold one value per seed, in the order of "seeds".
PER_SEED_KEYS = (
  "rejections_per_step",
  "timestep_per_step",
  "total_rejections",
  "hit_max_attempts",
  "zero_gradient_steps",
)


def split_run_record(record: dict) -> list[dict]:
  """Splits a run record over S seeds into S one-seed records (the inverse of `merge_seed_records`).

  Args:
    record: a `pipeline.run_record`, with "seeds" and the `PER_SEED_KEYS` lists in seed order.

  Returns:
    One dict per seed, in order: the shared entries as they are, "seed" in place of "seeds", and
    that seed's entry of each `PER_SEED_KEYS` list.
  """
  seeds = record["seeds"]
  out = []
  for i, seed in enumerate(seeds):
    one = {}
    for k, v in record.items():
      if k == "seeds":
        one["seed"] = seed
      elif k in PER_SEED_KEYS:
        one[k] = v[i]
      else:
        one[k] = v
    out.append(one)
  return out


def merge_seed_records(records: Sequence[dict]) -> dict:
  """One run record over several seeds from their one-seed records (see `split_run_record`).

  Args:
    records: one-seed records, in the order the merged "seeds" should list them.

  Returns:
    A record in the format of `pipeline.run_record`: the shared entries (prompts, edit tokens,
    config, model, timings, versions) are the first record's, "seeds" and the `PER_SEED_KEYS`
    entries list every record's value in order; a record's "mask" (grid only) is left out.
  """
  if not records:
    raise ValueError("merge_seed_records: no records")
  merged = {}
  for k, v in records[0].items():
    if k == "seed":
      merged["seeds"] = [r["seed"] for r in records]
    elif k in PER_SEED_KEYS:
      merged[k] = [r[k] for r in records]
    elif k != "mask":
      merged[k] = v
  return merged


def array_to_json(x: Any) -> dict:
  """A float array as JSON, exactly: `{"shape", "dtype": "float32", "base64"}` of little-endian bytes."""
  x = np.ascontiguousarray(np.asarray(x, dtype="<f4"))
  return {"shape": list(x.shape), "dtype": "float32", "base64": base64.b64encode(x.tobytes()).decode("ascii")}


def array_from_json(obj: dict) -> np.ndarray:
  """The float32 array that `array_to_json` wrote."""
  return np.frombuffer(base64.b64decode(obj["base64"]), dtype="<f4").reshape(obj["shape"]).astype(np.float32)


def read_json(path: str | os.PathLike) -> Any:
  """A JSON file's data, or None when it is missing or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    return None


def read_output_image(path: str | os.PathLike) -> np.ndarray:
  """An image this package wrote, as uint8 [H, W, 3], without resizing."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def finished_seed_records(
  out_dir: str | os.PathLike, row: int, seeds: Iterable[int], snapshots: bool = False
) -> dict[int, dict]:
  """The finished seeds of a batch row and their records, for resuming.

  A seed is finished when its image and its record `seed_record_name(row, seed)` are both written
  (and its progress strip, when `snapshots`). An image without a record (a run killed between the
  two) does not count: its statistics are lost, so the seed is computed again.

  Args:
    out_dir: batch output folder (may not exist yet).
    row: data-row index.
    seeds: the seeds the run asks for.
    snapshots: whether the run writes progress strips (`--save-step`).

  Returns:
    `{seed: one-seed record}` of the finished seeds, in the given order.
  """
  out_dir = Path(out_dir)
  done = {}
  for s in seeds:
    if not is_done(out_dir / output_name(row, s)):
      continue
    if snapshots and not is_done(out_dir / snapshot_name(row, s)):
      continue
    record = read_json(out_dir / seed_record_name(row, s))
    if isinstance(record, dict) and record.get("seed") == s:
      done[s] = record
  return done


def row_is_done(out_dir: str | os.PathLike, row: int, seeds: Iterable[int], snapshots: bool = False) -> bool:
  """Whether a batch row is complete for `seeds`: nothing to compute or write.

  Args:
    out_dir: batch output folder (may not exist yet).
    row: data-row index.
    seeds: the seeds the run asks for.
    snapshots: whether the run writes progress strips (`--save-step`).

  Returns:
    True when the row's grid and run.json exist, run.json lists every seed of `seeds`, and every
    seed's image (and strip, when `snapshots`) exists.
  """
  out_dir = Path(out_dir)
  seeds = list(seeds)
  record = read_json(out_dir / run_record_name(row))
  if not (is_done(out_dir / grid_name(row)) and isinstance(record, dict)):
    return False
  listed = record.get("seeds")
  if not isinstance(listed, list) or not set(seeds) <= set(listed):
    return False
  names = [output_name(row, s) for s in seeds] + ([snapshot_name(row, s) for s in seeds] if snapshots else [])
  return all(is_done(out_dir / name) for name in names)


# `_atomic_write`'s temp files of batch outputs: `.{row:03d}_...{.png,.json}.{mkstemp letters}.tmp`.
_BATCH_TEMP = re.compile(r"^\.(\d{3,}_[^/\\]*\.(?:png|json))\.[a-z0-9_]+\.tmp$")


def remove_stale_temp_files(out_dir: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
  """Deletes the temp files that a killed batch left in `out_dir` (`_atomic_write`'s, nothing else).

  Run it before a batch starts writing: a temp file of a running write in the same folder (a second
  batch writing there at the same time) would be deleted too, unless `names` leaves it out.

  Args:
    out_dir: batch output folder (may not exist yet).
    names: only the temp files of these outputs (e.g. `output_name(0, 1)`), the ones this process
      writes when several share the folder (`lusd-jax batch --distributed`); None: every batch output.

  Returns:
    The files deleted, sorted.
  """
  out_dir = Path(out_dir)
  if not out_dir.is_dir():
    return []
  names = None if names is None else set(names)
  stale = sorted(
    p
    for p in out_dir.iterdir()
    if (m := _BATCH_TEMP.match(p.name)) and (names is None or m.group(1) in names) and p.is_file()
  )
  for p in stale:
    p.unlink(missing_ok=True)
  return stale


def summarize_failures(failures: Sequence[tuple[int, str]]) -> str:
  """The end-of-batch summary lines for failed rows.

  Args:
    failures: `(row, one-line reason)` pairs.

  Returns:
    "all rows succeeded" or a header line followed by one `  row NNN: reason` line per failure.
  """
  if not failures:
    return "all rows succeeded"
  lines = [f"{len(failures)} row(s) failed:"]
  lines += [f"  row {row:03d}: {reason}" for row, reason in failures]
  return "\n".join(lines)
