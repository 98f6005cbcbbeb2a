"""Converters from published editing benchmarks to the project's dataset folder (`batchdir`'s format).

MagicBrush (Zhang et al., NeurIPS 2023 Datasets and Benchmarks), the test split as released (a zip
from the authors; the LUSD paper evaluates on it):

  SRC/
    edit_sessions.json        {image_id: [{"input", "output", "mask", "instruction"}, ...]}, one entry
                              per turn, in order; turn k's input is "<id>-input.png" for k = 1 and
                              turn k-1's ground truth "<id>-output{k-1}.png" after
    global_descriptions.json  {image_id: {file name: global description of that image}} for the
                              input and every output
    local_descriptions.json   {image_id: {output file name: local description of the edit}}
                              (optional here: without it local_prompt stays empty)
    images/<id>/<id>-input.png, <id>-output1.png, <id>-mask1.png, ...   (or <id>/... beside the jsons)

`convert_magicbrush` writes one index.csv row per edit turn (`turns="all"`), or per first turn only
(`turns="first"`: the real photos). A later turn edits the previous turn's *ground truth*, as the
session lists it: MagicBrush's single-turn setting, which scores every turn independently (the LUSD
paper's MagicBrush rows include these turns). MagicBrush's multi-turn setting chains a method's own
outputs and cannot be a fixed dataset folder. Columns written:

  img_path              <id>/<input file>, under OUT/images/
  source_prompt         global description of the input (the editing prompt pair of a batch)
  target_prompt         global description of the turn's output
  global_source_prompt  the same as source_prompt: the protocol's descriptions
  global_target_prompt  the same as target_prompt: y_tgt of CLIP-R
  local_prompt          local description of the output: y_local of CLIP-T ("" when none)
  gt_path               <id>/<output file>: the ground truth of L1 / CLIP-I
  mask_path             masks/<id>-mask{k}.png, converted (below); "" when the mask is empty or full
  edit_words, edit_type empty (MagicBrush has no edit words and no Unify-Bench types)
  category              "" or, with `prompts_csv`, the CSV's category (LUSD's add / change / remove)
  idx, instruction      "<input stem>" (LUSD's key for a turn, e.g. "368667-output1") and the
                        instruction; the readers ignore both

`prompts_csv` takes the editing prompts (and categories) from a CSV keyed by `idx`, as the LUSD
repository's `magicbrush/MagicBrush_reformat.csv` and `magicbrush_category.csv` are: short prompt
pairs ("a seat" -> "a cat sitting on a seat") that replace source_prompt / target_prompt of the
turns they name; the global descriptions stay the evaluation's.

Masks. MagicBrush's masks were drawn in DALL-E 2's editor ("free-form mask image (white region)",
says its dataset card). A mask file is read as: its alpha channel when it has one that is not fully
opaque, where *transparent* marks the edit (DALL-E 2's convention, the reverse of this project's
alpha rule); otherwise the pixels white in every channel (>= 250 of 255) mark it. The result is
written as a black-and-white PNG (white = edit), the convention of `io.load_mask`. An empty or full
region is written as no mask (`load_mask` rejects both; a full mask is a global edit).

Images are hard-linked into OUT/images/ when OUT is on the same file system, else copied. Nothing is
written until every input has been checked, and OUT appears at once (built in a temporary folder
beside it, then renamed).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from lusd_jax.batchdir import IMAGES_DIR, INDEX_FILE
from lusd_jax.io import InputError

MAGICBRUSH_SESSIONS = "edit_sessions.json"
MAGICBRUSH_GLOBAL = "global_descriptions.json"
MAGICBRUSH_LOCAL = "local_descriptions.json"
MASKS_DIR = "masks"
WHITE_LEVEL = 250  # a mask pixel without alpha marks the edit when every channel is at least this
MAGICBRUSH_COLUMNS = (
  "img_path", "source_prompt", "target_prompt", "edit_words", "mask_path", "edit_type",
  "global_source_prompt", "global_target_prompt", "local_prompt", "gt_path", "category", "idx", "instruction",
)  # fmt: skip
TURNS = ("all", "first")


class MagicBrushTurn(NamedTuple):
  """One edit turn of a MagicBrush session, as edit_sessions.json lists it."""

  image_id: str  # the COCO id that names the session
  turn: int  # 1-based position in the session
  input: str  # file names inside images/<image_id>/
  output: str
  mask: str
  instruction: str


class ConvertSummary(NamedTuple):
  """What `convert_magicbrush` wrote."""

  out: Path
  rows: int  # index.csv rows (edit turns)
  sessions: int
  masks: int  # rows with a mask
  global_masks: int  # rows whose mask was empty or full, written without one
  prompts_replaced: int  # rows whose editing prompts came from `prompts_csv`


def _read_json(path: Path, what: str) -> Any:
  if not path.is_file():
    raise InputError(f"SRC: {path} not found (the MagicBrush test split's {what})")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"SRC: {path} is not readable JSON ({e})") from None


def read_magicbrush_sessions(src: str | os.PathLike) -> list[MagicBrushTurn]:
  """The edit turns of MagicBrush's `edit_sessions.json`, sessions in file order, turns in order.

  Args:
    src: the folder holding edit_sessions.json.

  Returns:
    One `MagicBrushTurn` per turn.

  Raises:
    InputError: the file is missing, not JSON, or not `{id: [{input, output, mask, instruction}]}`
      (the message names the file and the session).
  """
  path = Path(src) / MAGICBRUSH_SESSIONS
  sessions = _read_json(path, "edit sessions")
  if not isinstance(sessions, dict) or not sessions:
    raise InputError(f"SRC: {path}: expected a non-empty object {{image_id: [turns]}}")
  turns = []
  for image_id, session in sessions.items():
    if not isinstance(session, list) or not session:
      raise InputError(f"SRC: {path}: session {image_id!r} is not a non-empty list of turns")
    for k, t in enumerate(session, start=1):
      if not isinstance(t, dict) or not all(
        isinstance(t.get(key), str) for key in ("input", "output", "mask")
      ):
        raise InputError(f"SRC: {path}: session {image_id!r} turn {k} lacks input/output/mask file names")
      turns.append(
        MagicBrushTurn(str(image_id), k, t["input"], t["output"], t["mask"], str(t.get("instruction", "")))
      )
  return turns


def magicbrush_mask(im: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
  """The edit region of a MagicBrush mask image, bool [H, W] (see the module docstring).

  MagicBrush's masks may be of another resolution than their images (its maintainers, in the
  dataset's issue #10: resize the mask to the image, then binarize): with `size`, the channel read
  is resized (bilinear) to it before the threshold.

  Args:
    im: the mask file, opened.
    size: (width, height) of the input image, or None to keep the mask's own.

  Returns:
    True where the mask marks the edit: alpha < 128 when the image has a not fully opaque alpha
    channel (transparent = edit, DALL-E 2's convention), else every channel >= `WHITE_LEVEL`.
  """

  def at_size(channel: Image.Image) -> np.ndarray:
    if size is not None and channel.size != tuple(size):
      channel = channel.resize(tuple(size), Image.BILINEAR)
    return np.asarray(channel)

  if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
    alpha = im.convert("RGBA").getchannel("A")
    if np.asarray(alpha).min() < 255:
      return at_size(alpha) < 128
  rgb = im.convert("RGB")
  return np.all(np.stack([at_size(c) for c in rgb.split()], axis=-1) >= WHITE_LEVEL, axis=-1)


def _find_image(src: Path, image_id: str, name: str, what: str) -> Path:
  """Where a session's file is: images/<id>/<name> (the release), <id>/<name>, or images/<name>."""
  candidates = [src / IMAGES_DIR / image_id / name, src / image_id / name, src / IMAGES_DIR / name]
  for c in candidates:
    if c.is_file():
      return c
  raise InputError(
    f"SRC: session {image_id} {what} {name} not found (looked for {candidates[0]} and {candidates[1]})"
  )


def _description(table: Mapping, path: Path, image_id: str, name: str, required: bool) -> str:
  entry = table.get(image_id, {}) if isinstance(table, Mapping) else {}
  value = entry.get(name) if isinstance(entry, Mapping) else None
  if value is None:
    if required:
      raise InputError(f"SRC: {path}: no description of session {image_id} image {name}")
    return ""
  return " ".join(str(value).split())  # one line: index.csv rows stay one line each


def _read_prompts_csv(path: str | os.PathLike) -> dict[str, dict[str, str]]:
  """`{idx: {column: value}}` of a LUSD-style prompts CSV (idx and any of source_prompt,
  target_prompt, category); an idx written with ".png" names the same turn."""
  path = Path(path)
  if not path.is_file():
    raise InputError(f"--prompts: {path} not found")
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f)
      fields = [(n or "").strip() for n in reader.fieldnames or []]
      reader.fieldnames = fields
      if "idx" not in fields or not {"source_prompt", "target_prompt", "category"} & set(fields):
        raise InputError(
          f"--prompts: {path} needs a column idx and one of source_prompt, target_prompt, category"
        )
      table = {}
      for record in reader:
        idx = (record.get("idx") or "").strip().removesuffix(".png")
        if idx:
          table[idx] = {
            k: (record.get(k) or "").strip() for k in ("source_prompt", "target_prompt", "category")
          }
  except (UnicodeDecodeError, csv.Error) as e:
    raise InputError(f"--prompts: {path} is not a readable UTF-8 CSV ({e})") from None
  return table


def _mask_png(region: np.ndarray) -> bytes:
  """A bool mask as a black-and-white PNG (white = edit), encoded."""
  buf = io.BytesIO()
  Image.fromarray(np.where(region, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
  return buf.getvalue()


def _place(src: Path, dst: Path) -> None:
  """Hard-links `src` at `dst` (no copy on one file system), else copies it."""
  dst.parent.mkdir(parents=True, exist_ok=True)
  try:
    os.link(src, dst)
  except OSError:
    shutil.copyfile(src, dst)


def _check_out(out: Path) -> None:
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise InputError(f"OUT: {out} exists and is not an empty folder (choose a new one)")


def convert_magicbrush(
  src: str | os.PathLike,
  out: str | os.PathLike,
  *,
  turns: str = "all",
  prompts_csv: str | os.PathLike | None = None,
) -> ConvertSummary:
  """Converts MagicBrush's released test split into a dataset folder (layout in the module docstring).

  Args:
    src: the unzipped test split (edit_sessions.json, global_descriptions.json, images/).
    out: the new dataset folder; it must not exist, or be empty.
    turns: "all" (one row per turn; later turns start from the previous ground truth) or "first"
      (the real photos only).
    prompts_csv: optional LUSD-style CSV keyed by idx (e.g. "242679-input"): its source_prompt /
      target_prompt replace the editing prompts, its category fills category.

  Returns:
    A `ConvertSummary`.

  Raises:
    InputError: one line naming the input: a missing or malformed json, a missing image or mask, a
      missing global description, an unusable
      prompts CSV, an OUT that exists and is not empty.

  Example:
    >>> convert_magicbrush("MagicBrush/test", "data/magicbrush")  # doctest: +SKIP
    ConvertSummary(out=PosixPath('data/magicbrush'), rows=..., ...)
  """
  if turns not in TURNS:
    raise InputError(f"--turns: {turns!r} is not one of {', '.join(TURNS)}")
  src, out = Path(src).expanduser(), Path(out).expanduser()
  if not src.is_dir():
    raise InputError(f"SRC: {src} is not a folder")
  all_turns = read_magicbrush_sessions(src)
  global_path, local_path = src / MAGICBRUSH_GLOBAL, src / MAGICBRUSH_LOCAL
  global_desc = _read_json(global_path, "global descriptions")
  local_desc = _read_json(local_path, "local descriptions") if local_path.is_file() else {}
  overrides = _read_prompts_csv(prompts_csv) if prompts_csv is not None else {}
  chosen = [t for t in all_turns if turns == "all" or t.turn == 1]
  _check_out(out)

  # Every input checked (and every mask converted, in memory) before anything is written.
  rows, files, masks = [], {}, {}
  n_global_masks = n_replaced = 0
  for t in chosen:
    inp = _find_image(src, t.image_id, t.input, "input image")
    gt = _find_image(src, t.image_id, t.output, "output image")
    mask_file = _find_image(src, t.image_id, t.mask, "mask")
    try:
      with Image.open(inp) as im:
        size = im.size
      with Image.open(mask_file) as im:
        region = magicbrush_mask(im, size)  # resized to the input's size when it differs
    except OSError as e:
      raise InputError(f"SRC: session {t.image_id} turn {t.turn}: unreadable image ({e})") from None
    mask_name = ""
    if region.any() and not region.all():
      mask_name = f"{MASKS_DIR}/{Path(t.mask).stem}.png"
      masks[mask_name] = _mask_png(region)  # a few kB, not 256 kB per 512x512 turn
    else:
      n_global_masks += 1
    img_rel, gt_rel = f"{t.image_id}/{t.input}", f"{t.image_id}/{t.output}"
    files[img_rel], files[gt_rel] = inp, gt
    source = _description(global_desc, global_path, t.image_id, t.input, required=True)
    target = _description(global_desc, global_path, t.image_id, t.output, required=True)
    idx = Path(t.input).stem
    edit_source, edit_target, category = source, target, ""
    if idx in overrides:
      o = overrides[idx]
      edit_source, edit_target = o["source_prompt"] or source, o["target_prompt"] or target
      category = o["category"]
      n_replaced += 1
    rows.append(
      dict(
        img_path=img_rel, source_prompt=edit_source, target_prompt=edit_target, edit_words="", mask_path=mask_name,
        edit_type="", global_source_prompt=source, global_target_prompt=target,
        local_prompt=_description(local_desc, local_path, t.image_id, t.output, required=False), gt_path=gt_rel,
        category=category, idx=idx, instruction=" ".join(t.instruction.split()),
      )
    )  # fmt: skip

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
  try:
    for rel, path in files.items():
      _place(path, tmp / IMAGES_DIR / rel)
    for rel, data in masks.items():
      (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
      (tmp / rel).write_bytes(data)
    with open(tmp / INDEX_FILE, "w", encoding="utf-8", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=MAGICBRUSH_COLUMNS, lineterminator="\n")
      writer.writeheader()
      writer.writerows(rows)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
    if out.exists():
      out.rmdir()  # checked empty above
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return ConvertSummary(
    out, len(rows), len({t.image_id for t in chosen}), len(masks), n_global_masks, n_replaced
  )


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def summary_line(summary: ConvertSummary, src: str | os.PathLike, extra: Sequence[str] = ()) -> str:
  """One line for the command line: what was converted where."""
  parts = [
    f"{summary.rows} edit turns of {summary.sessions} sessions",
    f"{summary.masks} with a mask",
    *(
      [f"{summary.global_masks} with an empty or full mask written as global"] if summary.global_masks else []
    ),
    *([f"{summary.prompts_replaced} with prompts from --prompts"] if summary.prompts_replaced else []),
    *extra,
  ]
  return f"converted {src} -> {summary.out}: {', '.join(parts)}"
