"""Evaluation of text-guided edits with two papers' protocols, side by side on one dataset folder.

- `magicbrush`: LUSD's (Sec. 4.2, MagicBrush conventions): CLIP-T, CLIP-R, CLIP-AUC, L1*, CLIP-I*
  with CLIP ViT-B/32, per category all / add / other (`lusd_jax.evaluation.magicbrush`);
- `unifyedit`: UnifyEdit's: DINO ViT-B/8 structure distance (fidelity) and CLIP ViT-L/14 score
  (editability) per edit, mask-box crops for local edit types, overall and per edit type
  (`lusd_jax.evaluation.unifyedit`), with the paper's Fig. 7 scatter.

The dataset and results layouts are `lusd_jax.evaluation.dataset`'s; `run_eval` scores one or
several `lusd-jax batch` result folders (either method, ablations, sweeps) and writes, in `out_dir`:

  magicbrush: per_example.csv, summary.csv, summary.md, success_rate.csv, success_rate.png
  unifyedit:  unifyedit_per_example.csv, unifyedit_summary.csv, unifyedit_summary.md,
              fidelity_editability.png
  both:       report.md (what was compared, the tables, the pictures, the failed edits)

Pictures need matplotlib (imported only to draw them); without it the tables are still written.
Every input check (folders, seeds, the dataset's columns, edit types and masks, the model flags)
runs before any model loads, and stops with an `InputError` naming the `lusd-jax eval` flag.

Example:

  report = run_eval(["out/lusd", "out/unifyedit"], "bench", out_dir="eval", protocol="all")
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lusd_jax.evaluation.dataset import (
  DatasetError,
  EditExample,
  ResultImage,
  check_and_select,
  load_dataset,
  method_names,
  scan_results,
  select_results,
)
from lusd_jax.evaluation.magicbrush import (
  BACKGROUND_THRESHOLDS,
  CATEGORIES,
  SUCCESS_THRESHOLDS,
  DatasetEmbeddings,
  ImageEmbedder,
  category_group,
  clip_r,
  clip_t,
  cosine_similarity,
  embed_dataset,
  l1_distance,
  plot_success_rate,
  score_results,
  simpson,
  success_rate,
  summarize,
  thresholded_auc,
  thresholded_means,
)
from lusd_jax.evaluation.report import UNIFYEDIT_DIGITS, markdown_table, write_csv, write_report
from lusd_jax.evaluation.unifyedit import (
  CLIP_SCORE_SCALE,
  GLOBAL_EDIT_TYPES,
  LOCAL_EDIT_TYPES,
  box_pixels,
  clip_score,
  crop_to_box,
  mask_box,
  row_regions,
  score_unifyedit,
  summarize_unifyedit,
)
from lusd_jax.io import InputError
from lusd_jax.models.clip import DEFAULT_CLIP, DEFAULT_CLIP_L
from lusd_jax.models.dino import DEFAULT_DINO

__all__ = [
  "BACKGROUND_THRESHOLDS", "CATEGORIES", "CLIP_SCORE_SCALE", "DEFAULT_CLIP", "DEFAULT_CLIP_L", "DEFAULT_DINO",
  "GLOBAL_EDIT_TYPES", "LOCAL_EDIT_TYPES", "PROTOCOLS", "SUCCESS_THRESHOLDS", "UNIFYEDIT_DIGITS",
  "DatasetEmbeddings", "DatasetError", "EditExample", "EvalReport", "ImageEmbedder", "ResultImage",
  "box_pixels", "category_group", "clip_r", "clip_score", "clip_t", "cosine_similarity", "crop_to_box",
  "embed_dataset", "l1_distance", "load_dataset", "markdown_table", "mask_box", "plot_success_rate",
  "row_regions", "run_eval", "scan_results", "score_results", "score_unifyedit", "select_results", "simpson",
  "success_rate", "summarize", "summarize_unifyedit", "thresholded_auc", "thresholded_means", "write_csv",
  "write_report",
]  # fmt: skip

PROTOCOLS = ("magicbrush", "unifyedit", "all")
TINY_RANDOM = "tiny-random"


class EvalReport(NamedTuple):
  summary: list[dict[str, Any]]  # magicbrush: summary.csv rows (method x category)
  per_example: list[dict[str, Any]]  # magicbrush: per_example.csv rows
  curves: dict[str, np.ndarray]  # magicbrush: method -> s(k) over all edits, [41]
  files: dict[str, str]  # what was written: key -> path (see `run_eval`)
  unifyedit_summary: list[dict[str, Any]] = []  # unifyedit_summary.csv rows (method x edit type)
  unifyedit_per_example: list[dict[str, Any]] = []  # unifyedit_per_example.csv rows


def _check_model(spec: Any, flag: str, kind: str) -> None:
  """A model flag that cannot name a model stops here, before any model loads (loaded objects pass)."""
  from lusd_jax import loading

  if not isinstance(spec, str | os.PathLike):
    return
  spec = os.fspath(spec)
  if spec == TINY_RANDOM:
    return
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise InputError(f"{flag}: folder {path} has no config.json (expected a transformers {kind} folder)")
  elif os.path.exists(path):
    raise InputError(f"{flag}: {path} is a file; pass a transformers {kind} folder or a hub id")
  elif not loading._looks_like_repo_id(spec):
    raise InputError(f"{flag}: {spec!r} is no folder and no Hugging Face hub id (owner/name)")


def _load(spec: Any, flag: str, load: Callable[[str], Any], attr: str):
  """`spec` when it is a loaded model (has `attr`), else `load(spec)`, load errors naming `flag`."""
  if hasattr(spec, attr):
    return spec
  try:
    return load(os.fspath(spec))
  except InputError:
    raise
  except ValueError as e:  # CLIPLoadError, DinoLoadError: a file or key that does not fit
    raise InputError(f"{flag}: {e}") from None


def _is_random(model) -> bool:
  return getattr(model, "name", "") == TINY_RANDOM


def run_eval(
  results_dirs: str | os.PathLike | Sequence[str | os.PathLike],
  dataset_dir: str | os.PathLike,
  clip_model: Any = DEFAULT_CLIP,
  out_dir: str | os.PathLike = "eval",
  *,
  protocol: str = "magicbrush",
  clip_l_model: Any = DEFAULT_CLIP_L,
  dino_model: Any = DEFAULT_DINO,
  seed: int | str | None = None,
  names: Sequence[str] | None = None,
  extra_embedders: Mapping[str, ImageEmbedder] | None = None,
  log: Callable[[str], None] | None = None,
) -> EvalReport:
  """Scores one or several `lusd-jax batch` results folders on a dataset and writes the tables and plots.

  Args:
    results_dirs: one folder or a list (compared side by side).
    dataset_dir: dataset folder (index.csv layout in `lusd_jax.evaluation.dataset`).
    clip_model: the MagicBrush protocol's CLIP: a `CLIP` (`lusd_jax.models.clip`), or what
      `loading.load_clip` takes (folder, hub id, "tiny-random").
    out_dir: where the files are written (this package's docstring lists them).
    protocol: "magicbrush", "unifyedit" or "all" (both).
    clip_l_model: the UnifyEdit protocol's CLIP (ViT-L/14), as `clip_model`.
    dino_model: the UnifyEdit protocol's DINO: a `lusd_jax.models.dino.Dino`, or what
      `loading.load_dino` takes (ViTModel folder, hub id, "tiny-random").
    seed: which result image per row: None (smallest seed present), an int, or "all".
    names: method names for the tables (default: the folder names).
    extra_embedders: magicbrush: more image similarities behind the CLIP-I interface; each adds a
      `{name}_i` column and a `{NAME}-I*` summary column.
    log: where warnings (missing images) and progress go (default: stderr).

  Returns:
    `EvalReport`; its `files` maps "per_example", "summary_csv", "summary_md", "curves_csv", "plot"
    (magicbrush), "unifyedit_per_example", "unifyedit_summary_csv", "unifyedit_summary_md", "scatter"
    (unifyedit) and "report" to the paths written (a picture is absent without matplotlib).

  Raises:
    InputError: before any model loads, naming the `lusd-jax eval` flag: an unknown protocol, a bad
      seed, a missing dataset or results folder (or a file there), an output folder that cannot be
      written, a dataset error (`DatasetError`: also an unknown edit type, a local row's missing or
      empty mask), a model flag naming no folder or hub id, or not one result image found.

  Example:
    >>> report = run_eval(["out/lusd", "out/unifyedit"], "bench", out_dir="eval", protocol="all")
  """
  from lusd_jax import io, loading, visual  # jax and the models load only when a run needs them

  log = log or (lambda msg: print(msg, file=sys.stderr))
  if protocol not in PROTOCOLS:
    raise InputError(f"--protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
  run_mb, run_ue = protocol in ("magicbrush", "all"), protocol in ("unifyedit", "all")
  if isinstance(results_dirs, str | os.PathLike):
    results_dirs = [results_dirs]
  results_dirs = [os.fspath(d) for d in results_dirs]
  names = list(names) if names is not None else method_names(results_dirs)
  examples, selections = check_and_select(
    results_dirs, os.fspath(dataset_dir), os.fspath(out_dir), seed, names, log
  )
  regions = row_regions(examples, log) if run_ue else None
  if run_mb:
    _check_model(clip_model, "--clip", "CLIPModel")
  if run_ue:
    _check_model(clip_l_model, "--clip-l", "CLIPModel")
    _check_model(dino_model, "--dino", "ViTModel")

  out_dir = os.fspath(out_dir)
  files: dict[str, str] = {}
  path = lambda key, name: files.setdefault(key, os.path.join(out_dir, name))
  models: dict[str, str] = {}
  random_weights = False
  summary, per_example, curves = [], [], {}
  ue_summary, ue_per_example = [], []

  if run_mb:
    clip = _load(clip_model, "--clip", loading.load_clip, "embed_texts")
    models["CLIP (MagicBrush)"], random_weights = getattr(clip, "name", ""), _is_random(clip)
    embedders = {"clip": clip, **dict(extra_embedders or {})}
    log(f"eval: magicbrush: embedding {len(examples)} dataset rows with CLIP {getattr(clip, 'name', '')}")
    dataset_emb = embed_dataset(examples, clip, embedders)
    for name, (folder, results, rule) in zip(names, selections, strict=True):
      log(f"eval: magicbrush: scoring {folder} ({len(results)} edits, seed {rule})")
      scores = score_results(examples, results, clip, dataset_emb, embedders)
      for s, r in zip(scores, results, strict=True):
        ex = examples[r.row]
        per_example.append(
          {
            "method": name,
            **s,
            "source_path": ex.source_path,
            "gt_path": ex.gt_path or "",
            "global_source_prompt": ex.global_source_prompt,
            "global_target_prompt": ex.global_target_prompt,
            "local_prompt": ex.local_prompt,
          }
        )
      rows, cat_curves = summarize(scores, name, list(embedders))
      summary += rows
      curves[name] = cat_curves["all"]
    del clip, embedders, dataset_emb  # CLIP-L and DINO may need the memory

  if run_ue:
    clip_l = _load(clip_l_model, "--clip-l", loading.load_clip, "embed_texts")
    dino = _load(dino_model, "--dino", loading.load_dino, "structure_distance")
    models["CLIP-L"], models["DINO"] = getattr(clip_l, "name", ""), getattr(dino, "name", "")
    random_weights = random_weights or _is_random(clip_l) or _is_random(dino)
    log(f"eval: unifyedit: embedding {len(examples)} target prompts with CLIP {models['CLIP-L']}")
    target_text_NP = np.asarray(clip_l.embed_texts([ex.target_prompt for ex in examples]), np.float64)
    for name, (folder, results, rule) in zip(names, selections, strict=True):
      log(f"eval: unifyedit: scoring {folder} ({len(results)} edits, seed {rule})")
      scores = score_unifyedit(examples, results, regions, clip_l, dino, target_text_NP)
      for s in scores:
        ex = examples[s["row"]]
        ue_per_example.append(
          {
            "method": name,
            **s,
            "source_path": ex.source_path,
            "mask_path": ex.mask_path or "",
            "target_prompt": ex.target_prompt,
          }
        )
      ue_summary += summarize_unifyedit(scores, name)

  os.makedirs(out_dir, exist_ok=True)
  if run_mb:
    write_csv(path("per_example", "per_example.csv"), per_example)
    write_csv(path("summary_csv", "summary.csv"), summary)
    with open(path("summary_md", "summary.md"), "w", encoding="utf-8") as f:
      f.write(markdown_table(summary))
    write_csv(
      path("curves_csv", "success_rate.csv"),
      [
        {"k": round(float(k), 2), **{n: float(c[i]) for n, c in curves.items()}}
        for i, k in enumerate(SUCCESS_THRESHOLDS)
      ],
    )
    try:
      plot_success_rate(curves, path("plot", "success_rate.png"))
    except ImportError as e:  # the tables are written; losing them to a missing plotting library is worse
      log(f"eval: {files.pop('plot')} not written ({e}; pip install matplotlib)")
  if run_ue:
    write_csv(path("unifyedit_per_example", "unifyedit_per_example.csv"), ue_per_example)
    write_csv(path("unifyedit_summary_csv", "unifyedit_summary.csv"), ue_summary)
    with open(path("unifyedit_summary_md", "unifyedit_summary.md"), "w", encoding="utf-8") as f:
      f.write(markdown_table(ue_summary, UNIFYEDIT_DIGITS))
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for r in ue_summary:
      points.setdefault(r["edit_type"], {})[r["method"]] = (r["CLIP-L"], r["DINO"])
    title = "random weights: meaningless numbers" if random_weights else None
    try:
      io.save_png(
        path("scatter", "fidelity_editability.png"), visual.fidelity_editability_plot(points, title)
      )
    except ImportError as e:
      log(f"eval: {files.pop('scatter')} not written ({e}; pip install matplotlib)")

  failures = {
    name: [os.path.basename(r.path) if r.path else f"{r.row:03d}_seed{'*' if r.seed is None else r.seed}.png"
           for r in results if r.path is None]
    for name, (_, results, _) in zip(names, selections, strict=True)
  }  # fmt: skip
  write_report(
    path("report", "report.md"),
    dataset=os.fspath(dataset_dir),
    num_rows=len(examples),
    folders={name: (folder, rule) for name, (folder, _, rule) in zip(names, selections, strict=True)},
    models=models,
    random_weights=random_weights,
    failures=failures,
    unifyedit=ue_summary if run_ue else None,
    scatter=files.get("scatter"),
    magicbrush=summary if run_mb else None,
    success_plot=files.get("plot"),
  )
  return EvalReport(summary, per_example, curves, files, ue_summary, ue_per_example)
