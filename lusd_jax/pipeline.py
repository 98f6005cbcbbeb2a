"""The edits a user asks for, as batches for the engine: `edit`, `edit_many` (and `sweeps.sweep`).

Each is a small batch builder: it prepares its inputs (`prepare`), lays (image, seed, config)
elements out as one flat batch (`prepare.stack_elements`), runs it with `run_batch` (the engine,
with a progress bar and timings) and decodes the results (`_result`); `run_record` writes what a
run did. Prompts, edit words, keys and numeric hyperparameters are traced: a second edit of the same
shape compiles nothing.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from lusd_jax import engine, io, sharding
from lusd_jax.loading import SDModel
from lusd_jax.lusd import core
from lusd_jax.lusd.config import LUSDConfig
from lusd_jax.prepare import (  # noqa: F401  (re-exported: the pipeline's public helpers)
  MAX_NOTE_CHARS,
  PreparedEdit,
  check_edit,
  decode_latents,
  encode_image,
  encode_prompts,
  prepare_edit,
  stack_elements,
)
from lusd_jax.version import __version__


class EditResult(NamedTuple):
  """What one `edit` returns (S = number of seeds, N = steps)."""

  images: np.ndarray  # [S, H, W, 3] float32 in [0, 1]
  latents: np.ndarray  # [S, h, w, 4] final latents (scaled)
  input_image: np.ndarray  # [H, W, 3] the preprocessed input
  source_prompt: str
  target_prompt: str
  seeds: tuple[int, ...]
  rejections: np.ndarray  # [S, N] redraws before acceptance at each step
  timesteps: np.ndarray  # [S, N] accepted t at each step
  hit_max_attempts: np.ndarray  # [S] bool: some step accepted after max_attempts draws
  mask: np.ndarray | None  # [S, h, w] final moving-average mask (None: no edit words)
  snapshots: np.ndarray | None  # [S, K, H, W, 3] decoded snapshots every `snapshot_every` steps
  latent_snapshots: np.ndarray | None  # [S, K, h, w, 4] latents at the snapshots
  mask_snapshots: np.ndarray | None  # [S, K, h, w] moving-average mask M_k at the snapshots
  snapshot_steps: tuple[int, ...]
  edit_tokens: Any  # prompts.EditTokens
  config: Any  # LUSDConfig
  timings: dict
  zero_gradient_steps: np.ndarray | None = None  # [S] int: steps whose g was exactly 0 (no redraws)
  method: str = "lusd"  # "lusd" or "unifyedit"
  # UnifyEdit only (S = 1):
  reconstruction: np.ndarray | None = None  # [S, H, W, 3] the source branch, decoded
  step_stats: dict | None = None  # name -> [S, N, ...]: lambda1, lambda2, gradient norms, R_l (UnifyStats)
  inversion_inner_steps: np.ndarray | None = None  # [N] Adam steps of null-text inversion per step
  user_mask: np.ndarray | None = None  # [H, W] the mask given (None: a global edit)


def progress_chunk_size(num_steps: int, chunk_size: int | None = None) -> int:
  """Steps per compiled call under a progress bar: about a tenth of the run, at most 25."""
  return chunk_size or max(1, min(25, num_steps // 10 or 1))


def step_progress(num_steps: int, desc: str, enabled: bool = True):
  """`engine.progress` over optimization steps; for LUSD its postfix counts the redraws so far
  (`StepStats.rejections`, summed over the batch). Yields the `on_chunk` callback (None if off)."""
  rejected = 0

  def postfix(stats):
    nonlocal rejected
    if not hasattr(stats, "rejections"):
      return {}
    rejected += int(np.asarray(stats.rejections).sum())
    return {"rejections": rejected}

  return engine.progress(num_steps, desc, enabled=enabled, postfix=postfix)


def edit(
  model: SDModel,
  image,
  source_prompt: str,
  target_prompt: str,
  seeds=(0,),
  config=None,
  edit_words: str | None = None,
  noise_fn=None,
  snapshot_every: int | None = None,
  *,
  token_positions=None,
  size: int = 512,
  progress: bool = False,
  announce=None,
  chunk_size: int | None = None,
  mesh=None,
  method: str | None = None,
  mask=None,
) -> EditResult:
  """Edits `image` from `source_prompt` to `target_prompt` with LUSD, once per seed (vmapped).

  With `method="unifyedit"` or a `UnifyEditConfig`, the edit is UnifyEdit's instead
  (`lusd_jax.unifyedit.edit`, which also takes `mask=`); same arguments, same result type.

  Args:
    model: from `lusd_jax.load_model`.
    image: a path, a PIL image, or an `[H, W, 3]` array (uint8, or float in [0, 1]); center-cropped
      to a square and resized to `size` as the official code does.
    source_prompt: describes the input ("" is allowed).
    target_prompt: describes the wanted edit.
    seeds: one edit per seed, all in one compiled program (`jax.random.key(seed)` each).
    config: `LUSDConfig` (default: the paper's values; `LUSDConfig.official()` for the public code).
    edit_words: words of the target prompt to build the attention mask from (default: inferred,
      `prompts.find_edit_tokens`).
    noise_fn: optional replayable draw `noise_fn(key, step, attempt) -> (t, eps)`.
    snapshot_every: also return decoded images every this many steps.
    token_positions: explicit edit-token positions in the target prompt (instead of edit_words).
    size: image side, a multiple of 64.
    progress: show a progress bar over the optimization steps.
    announce: where to print the one-line notes (edit tokens, long prompts); default: nowhere.
    chunk_size: steps per compiled call (the progress bar moves between chunks).
    mesh: a `sharding.data_mesh()` to spread the seeds over devices (params replicated).
    method: "lusd" (default) or "unifyedit" (implied by a `UnifyEditConfig`).
    mask: UnifyEdit only: the region of a local edit (see `lusd_jax.unifyedit.edit`).

  Returns:
    `EditResult`.

  Example:
    >>> model = lusd_jax.load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> res = lusd_jax.edit(model, "cat.png", "a cat", "a cat wearing a party hat", seeds=[0, 1, 2])
    >>> res.images.shape
    (3, 512, 512, 3)
  """
  if method == "unifyedit" or type(config).__name__ == "UnifyEditConfig":
    if noise_fn is not None or snapshot_every is not None:
      raise ValueError("noise_fn and snapshot_every are LUSD's; UnifyEdit is deterministic DDIM")
    from lusd_jax.unifyedit.pipeline import edit as unifyedit_edit  # same floor; lazy: no import cycle

    return unifyedit_edit(
      model, image, source_prompt, target_prompt, config, mask=mask, edit_words=edit_words,
      token_positions=token_positions, size=size, progress=progress, announce=announce,
      chunk_size=chunk_size, mesh=mesh, seeds=seeds,
    )  # fmt: skip
  if method not in (None, "lusd"):
    raise ValueError(f"unknown method {method!r}; choose lusd or unifyedit")
  if mask is not None:
    raise ValueError("mask= is UnifyEdit's (LUSD finds its mask from attention): pass method='unifyedit'")
  config = LUSDConfig() if config is None else config
  t0 = time.perf_counter()
  prep = prepare_edit(
    model, image, source_prompt, target_prompt, seeds, config, edit_words,
    token_positions=token_positions, size=size, announce=announce,
  )  # fmt: skip
  numeric = config.numeric()
  batch = stack_elements([(prep.inputs, key, numeric) for key in prep.keys])
  jax.block_until_ready(batch)
  timings = {"encode_s": time.perf_counter() - t0}
  out, timings["optimize_s"] = run_batch(
    model, config, batch, ids=[f"seed {s}" for s in prep.seeds], desc=f"LUSD {len(prep.seeds)} seed(s)",
    mesh=mesh, noise_fn=noise_fn, snapshot_every=snapshot_every, chunk_size=chunk_size, progress=progress,
  )  # fmt: skip
  return _result(model, prep, source_prompt, target_prompt, config, out, timings)


def run_batch(
  model: SDModel,
  config: LUSDConfig,
  batch: tuple[Any, jax.Array, Any],
  *,
  ids: Sequence[str],
  desc: str,
  mesh=None,
  batch_size: int | None = None,
  noise_fn=None,
  snapshot_every: int | None = None,
  chunk_size: int | None = None,
  progress: bool = False,
  params=None,
) -> tuple[core.EditOutput, float]:
  """Runs a flat batch of LUSD edits through the engine, with a progress bar; the one runner.

  Args:
    model: the loaded model (its U-Net, dtype policy and schedule).
    config: the `LUSDConfig` whose static part (num_steps, gradient) the batch shares.
    batch: (inputs_B, keys_B, numeric_B) from `stack_elements`.
    ids: [B] names of the elements for error messages.
    desc: the progress bar's label.
    mesh, batch_size, noise_fn, snapshot_every, chunk_size: as `engine.run`.
    progress: show a progress bar (chunks of about a tenth of the run).
    params: the U-Net params when already placed on `mesh` (default: the model's).

  Returns:
    (`core.EditOutput` [B], seconds spent).
  """
  inputs_B, keys_B, numeric_B = batch
  n = config.num_steps
  if progress:
    chunk_size = progress_chunk_size(n, chunk_size)
  t0 = time.perf_counter()
  with step_progress(n, desc, enabled=progress) as on_chunk:
    out = core.optimize_batch(
      core.FlaxUNet(model.configs.unet, model.unet_dtype),
      model.params.unet if params is None else params, inputs_B, keys_B, numeric_B,
      static=config.static(), schedule=model.configs.schedule, mesh=mesh, batch_size=batch_size,
      noise_fn=noise_fn, snapshot_every=snapshot_every, chunk_size=chunk_size, ids=ids, on_chunk=on_chunk,
    )  # fmt: skip
  return out, time.perf_counter() - t0


class EditJob(NamedTuple):
  """One image's edit in `edit_many`: the arguments of `edit` that differ between images."""

  image: Any  # a path, a PIL image or an [H, W, 3] array (loaded when the job's turn comes)
  source_prompt: str
  target_prompt: str
  seeds: tuple[int, ...]
  edit_words: str | None = None
  label: str | None = None  # announced when the job starts, and names it in error messages


def edit_many(
  model: SDModel,
  jobs: Sequence[EditJob],
  config=None,
  *,
  size: int = 512,
  mesh=None,
  batch_size: int | None = None,
  snapshot_every: int | None = None,
  progress: bool = False,
  announce=None,
  chunk_size: int | None = None,
) -> Iterator[tuple[int, EditResult | Exception]]:
  """Edits many images, their seeds packed into batches that fill every device of `mesh`.

  The (job, seed) pairs are taken in order and run `batch_size` at a time through
  `core.optimize_batch` (the engine): one compiled program for every batch (the last is padded), each element
  with its own image latent, prompts and key, the batch split over the devices along "data". Each
  job is prepared (image loaded, prompts encoded) when its first seed's batch is assembled, and
  yielded as soon as its last seed finishes, so callers can write results while the rest runs.
  Every element computes what `edit` computes for that image and seed, to float rounding.

  Args:
    model: from `lusd_jax.load_model`.
    jobs: the edits, in order.
    config: `LUSDConfig` shared by all jobs (default: the paper's values).
    size: image side, a multiple of 64.
    mesh: a `sharding.data_mesh()` (None: one device).
    batch_size: (job, seed) pairs per program call (default: the devices times ceil(seeds of the
      largest job / devices), so one device runs one job's seeds at a time, as `edit` does); rounded
      up to a multiple of the devices.
    snapshot_every: also decode the latents every this many steps (as `edit`).
    progress: a progress bar per batch.
    announce: where to print each job's label and its edit-token note (default: nowhere).
    chunk_size: steps per compiled call.

  Yields:
    (job index, `EditResult`) when a job is done, or (job index, exception) when it failed: bad
    inputs (`io.InputError`, `ValueError`) fail only their job; NaN/inf (`core.NonFiniteError`)
    fails every job with a seed in that batch. Jobs come in order of completion.
  """
  config = LUSDConfig() if config is None else config
  announce = announce or (lambda _msg: None)
  devices = sharding.num_devices(mesh)
  if batch_size is None:
    most = max((len(job.seeds) for job in jobs), default=1)
    batch_size = devices * math.ceil(max(1, most) / devices)
  batch_size = sharding.padded_size(batch_size, devices)
  # For the progress bars: calls expected if no job fails (a failed job only makes it fewer).
  expected_calls = math.ceil(sum(len(job.seeds) for job in jobs) / batch_size)
  calls = 0
  numeric = config.numeric()
  # Placed once for every call (the engine would copy them to the devices on each).
  params = sharding.replicate(model.params.unet, mesh) if mesh is not None else model.params.unet

  prepared: dict[int, PreparedEdit] = {}
  timings: dict[int, dict] = {}
  outputs: dict[int, dict[int, Any]] = {}  # job -> seed position -> EditOutput of one element
  queue: list[tuple[int, int]] = []  # (job, seed position) waiting for a batch
  label = lambda j: jobs[j].label or f"job {j}"

  def prepare(j):
    job = jobs[j]
    if job.label:
      announce(job.label)
    t0 = time.perf_counter()
    prep = prepare_edit(
      model, job.image, job.source_prompt, job.target_prompt, job.seeds, config, job.edit_words,
      size=size, announce=announce,
    )  # fmt: skip
    jax.block_until_ready(prep.inputs)
    prepared[j], timings[j], outputs[j] = prep, {"encode_s": time.perf_counter() - t0}, {}
    queue.extend((j, i) for i in range(len(prep.seeds)))

  def run(items):
    """Runs one batch; yields the jobs it finished."""
    nonlocal calls
    calls += 1
    jobs_in = sorted({j for j, _ in items})
    desc = f"LUSD call {calls}/{max(calls, expected_calls)}: {len(items)} edit(s) of {len(jobs_in)} image(s)"
    batch = stack_elements([(prepared[j].inputs, prepared[j].keys[i], numeric) for j, i in items])
    ids = [f"{label(j)} seed {prepared[j].seeds[i]}" for j, i in items]
    try:
      out, seconds = run_batch(
        model, config, batch, ids=ids, desc=desc, mesh=mesh, batch_size=batch_size, params=params,
        snapshot_every=snapshot_every, chunk_size=chunk_size, progress=progress,
      )  # fmt: skip
    except core.NonFiniteError as e:
      queue[:] = [item for item in queue if item[0] not in jobs_in]  # their other seeds too
      for j in jobs_in:
        prepared.pop(j), outputs.pop(j)
        yield j, e
      return
    for b, (j, i) in enumerate(items):
      outputs[j][i] = _element(out, b)
    for j in jobs_in:
      timings[j]["optimize_s"] = timings[j].get("optimize_s", 0.0) + seconds
      prep = prepared[j]
      if len(outputs[j]) == len(prep.seeds):
        merged = _concat([outputs[j][i] for i in range(len(prep.seeds))])
        job = jobs[j]
        yield j, _result(model, prep, job.source_prompt, job.target_prompt, config, merged, timings[j])
        prepared.pop(j), outputs.pop(j)

  for j in range(len(jobs)):
    try:
      prepare(j)
    except (io.InputError, ValueError) as e:
      yield j, e
      continue
    while len(queue) >= batch_size:
      items, queue[:] = queue[:batch_size], queue[batch_size:]
      yield from run(items)
  while queue:
    items, queue[:] = queue[:batch_size], queue[batch_size:]
    yield from run(items)


def _element(out, b: int):
  """Element b of a batched `core.EditOutput`, keeping a leading axis of 1."""
  return jax.tree.map(lambda x: x[b : b + 1] if isinstance(x, np.ndarray) else x, out)


def _concat(outs):
  """`core.EditOutput`s concatenated along their leading axis (the inverse of `_element`)."""
  return jax.tree.map(lambda *xs: np.concatenate(xs) if isinstance(xs[0], np.ndarray) else xs[0], *outs)


def _result(model, prep: PreparedEdit, source_prompt, target_prompt, config, out, timings) -> EditResult:
  """Decodes an `EditOutput` (leading axis: the prepared edit's seeds) into an `EditResult`."""
  t2 = time.perf_counter()
  images = decode_latents(model, out.z)
  snapshots = None
  if out.z_snapshots is not None:
    s, k = out.z_snapshots.shape[:2]
    flat = decode_latents(model, out.z_snapshots.reshape((s * k,) + out.z_snapshots.shape[2:]))
    snapshots = flat.reshape((s, k) + flat.shape[1:])
  timings = dict(timings, decode_s=time.perf_counter() - t2)
  return EditResult(
    images=images,
    latents=out.z,
    input_image=prep.image,
    source_prompt=source_prompt,
    target_prompt=target_prompt,
    seeds=prep.seeds,
    rejections=out.rejections,
    timesteps=out.t,
    hit_max_attempts=out.hit_max_attempts.any(axis=1),
    mask=None if prep.edit_tokens.uniform else out.mask,
    snapshots=snapshots,
    latent_snapshots=out.z_snapshots,
    mask_snapshots=out.mask_snapshots,
    snapshot_steps=out.snapshot_steps,
    edit_tokens=prep.edit_tokens,
    config=config,
    timings=timings,
    zero_gradient_steps=out.zero_gradient.sum(axis=1),
  )


def run_record(result: EditResult, model: SDModel, model_id: str | None = None) -> dict:
  """The JSON run record of an edit: inputs, resolved edit tokens, config, statistics, versions."""
  import dataclasses

  import flax

  et = result.edit_tokens
  return {
    "source_prompt": result.source_prompt,
    "target_prompt": result.target_prompt,
    "image_size": list(result.input_image.shape[:2]),
    "model": model_id or model.name,
    "dtype": model.dtype,
    "random_weights": model.is_random,
    "seeds": list(result.seeds),
    "edit_tokens": {
      "differing_words": list(et.differing_words),
      "edit_words": list(et.edit_words),
      "positions": list(et.positions),
      "dropped_words": list(et.dropped_words),
      "source": et.source,
      "explanation": et.explanation,
    },
    "config": dataclasses.asdict(result.config),
    **(_unifyedit_record(result) if result.method == "unifyedit" else _lusd_record(result)),
    "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
    "versions": {
      "lusd_jax": __version__,
      "jax": jax.__version__,
      "flax": flax.__version__,
      "python": platform.python_version(),
      "backend": jax.default_backend(),
    },
  }


def _lusd_record(result: EditResult) -> dict:
  return {
    "rejections_per_step": result.rejections.tolist(),
    "timestep_per_step": result.timesteps.tolist(),
    "total_rejections": [int(r.sum()) for r in result.rejections],
    "hit_max_attempts": [bool(h) for h in result.hit_max_attempts],
    # Steps whose g was exactly 0 (the prompts look identical to the U-Net): redraws ended at once.
    "zero_gradient_steps": [
      int(z) for z in (result.zero_gradient_steps if result.zero_gradient_steps is not None else [])
    ],
  }


def _unifyedit_record(result: EditResult) -> dict:
  """UnifyEdit's per-step record (one edit: S = 1), step index t = T first."""
  stats = {k: np.asarray(v)[0] for k, v in result.step_stats.items()}
  mask = result.user_mask
  return {
    "method": "unifyedit",
    "mask": None if mask is None else {"fraction": round(float(np.mean(mask)), 4), "shape": list(mask.shape)},
    "timestep_per_step": result.timesteps[0].tolist(),
    "per_step": {
      name: stats[name].tolist()
      for name in (
        "lambda1",
        "lambda2",
        "sap_loss",
        "caa_loss",
        "sap_grad_norm",
        "caa_grad_norm",
        "sap_grad_mean",
        "caa_grad_mean",
      )
    },  # fmt: skip
    "cross_attention_ratio_per_step": stats["ratios"].tolist(),  # [T, words, layers]: R_l
    "null_text_inner_steps": None
    if result.inversion_inner_steps is None
    else np.asarray(result.inversion_inner_steps).tolist(),
  }
