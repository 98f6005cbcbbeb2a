"""tokenize -> encode -> edit -> decode: `lusd_jax.edit`, the whole LUSD edit of one image.

The jitted pieces are module-level pure functions keyed on static configs (`functools.partial`
over hashable dataclasses), so a second edit with the same model and image size reuses every
compiled program: prompts, edit words, seeds' keys and numeric hyperparameters are traced.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax import io, prompts
from lusd_jax import tokenizer as tokenizer_lib
from lusd_jax.compiler import jit
from lusd_jax.loading import SDModel
from lusd_jax.models import clip_text, vae
from lusd_jax.version import __version__


@functools.partial(jit, static_argnames=("config",))
def _encode_text(params, ids_BL, *, config):
  return clip_text.encode_text(params, config, ids_BL)


@functools.partial(jit, static_argnames=("config",))
def _encode_image(params, x_BHWC01, *, config):
  """Image in [0, 1] -> scaled latent (posterior mean times scaling_factor, LUSD Alg. 1 line 1)."""
  mean = vae.encode_mean(params, config, x_BHWC01 * 2.0 - 1.0)
  return mean * config.scaling_factor


@functools.partial(jit, static_argnames=("config",))
def _decode(params, z_BHWC, *, config):
  x = vae.decode(params, config, z_BHWC / config.scaling_factor)
  return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def encode_prompts(model: SDModel, prompt_list: list[str]):
  """CLIP text embeddings `[B, 77, D]` of prompts (padded/truncated to 77 tokens)."""
  ids = tokenizer_lib.tokenize(model.tokenizer, prompt_list)
  return _encode_text(model.params.text_encoder, jnp.asarray(ids), config=model.configs.text_encoder)


def encode_image(model: SDModel, image_HWC01):
  x = jnp.asarray(image_HWC01, model.compute_dtype)[None]
  return _encode_image(model.params.vae, x, config=model.configs.vae)[0].astype(jnp.float32)


def decode_latents(model: SDModel, z_SHWC):
  out = [
    _decode(model.params.vae, z[None].astype(model.compute_dtype), config=model.configs.vae)[0]
    for z in z_SHWC
  ]
  return np.stack([np.asarray(x, np.float32) for x in out])


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


def _prepare_image(image, size: int) -> np.ndarray:
  io.validate_size(size)
  if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
    return io.load_image(image, size)
  return io.image_from_array(image, size)


# Longest explanation line printed before an edit (a 77-token prompt can make it very long).
MAX_NOTE_CHARS = 240


def _short(text: str, limit: int = MAX_NOTE_CHARS) -> str:
  return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def check_edit(
  tokenizer,
  schedule,
  source_prompt: str,
  target_prompt: str,
  seeds,
  config,
  edit_words=None,
  *,
  token_positions=None,
  size: int = 512,
  names: Callable[[str], str] | None = None,
  announce=None,
) -> tuple[tuple[int, ...], prompts.EditTokens]:
  """Every check of an edit's inputs that needs no weights; run before a model loads.

  Args:
    tokenizer: the model's CLIP tokenizer (`SDModel.tokenizer` or `loading.load_model_head`).
    schedule: the model's `Schedule` (its `num_train_timesteps` bounds the t range).
    source_prompt, target_prompt, seeds, config, edit_words, token_positions, size: as `edit`.
    names: how messages name an argument or `LUSDConfig` field (the CLI passes its flags,
      "t_max" -> "--t-max"); default: the Python names.
    announce: where the one-line notes go (long prompts, the edit tokens); None: `warnings`.

  Returns:
    (seeds as ints, `prompts.EditTokens`).

  Raises:
    io.InputError: naming the argument: bad seeds or size, an empty target, prompts that tokenize
      identically (nothing to edit), a t range beyond the model's schedule, edit words that are
      not in the target prompt, bad token positions.
  """
  from lusd_jax.lusd.config import ConfigError

  name = names or (lambda arg: arg)
  seeds = io.check_seeds(seeds, name("seeds"))
  io.validate_size(size)
  for arg, p in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
    if not isinstance(p, str):
      raise io.InputError(f"{name(arg)}: expected a string, got {type(p).__name__}")
  if not target_prompt.strip():
    raise io.InputError(f"{name('target_prompt')}: the target prompt is empty")
  ids = tokenizer_lib.tokenize(tokenizer, [source_prompt, target_prompt])
  if np.array_equal(ids[0], ids[1]):
    raise io.InputError(
      f"{name('source_prompt')} {source_prompt!r} and {name('target_prompt')} {target_prompt!r} are the "
      "same prompt to CLIP (it lower-cases and ignores spacing and the words after 77 tokens): "
      "there is nothing to edit"
    )
  try:
    config.check_timesteps(schedule.num_train_timesteps)
  except ConfigError as e:
    raise io.InputError(f"{name(e.field)} {e.problem}") from None
  notes = []
  for what, p in (("source", source_prompt), ("target", target_prompt)):
    n = len(tokenizer(p, truncation=False, verbose=False)["input_ids"])
    if n > tokenizer_lib.MAX_LENGTH:
      notes.append(
        f"warning: the {what} prompt has {n} tokens; CLIP reads the first {tokenizer_lib.MAX_LENGTH}, "
        "the rest is cut"
      )
  with warnings.catch_warnings(record=True):  # the explanation below carries the same notice
    warnings.simplefilter("always")
    try:
      edit_tokens = prompts.find_edit_tokens(
        tokenizer,
        source_prompt,
        target_prompt,
        edit_words=edit_words,
        token_positions=token_positions,
        subtokens="last" if config.edit_token_last_subtoken else "all",
        rule=config.edit_token_rule,
      )
    except (ValueError, TypeError) as e:
      arg = "token_positions" if token_positions is not None else "edit_words"
      raise io.InputError(f"{name(arg)}: {e}") from None
  notes.append(_short(edit_tokens.explanation))
  for note in notes:
    if announce is not None:
      announce(note)
    elif note.startswith("warning:") or edit_tokens.uniform or edit_tokens.dropped_words:
      warnings.warn(note.removeprefix("warning: "), UserWarning, stacklevel=3)
  return seeds, edit_tokens


class PreparedEdit(NamedTuple):
  """An edit's checked, preprocessed and encoded inputs (shared by `edit` and `sweep`)."""

  seeds: tuple[int, ...]
  image: np.ndarray  # [H, W, 3] float32 in [0, 1], preprocessed
  edit_tokens: Any  # prompts.EditTokens
  inputs: Any  # core.EditInputs
  keys: jax.Array  # [S] PRNG keys, jax.random.key(seed)


def prepare_edit(
  model: SDModel,
  image,
  source_prompt: str,
  target_prompt: str,
  seeds,
  config,
  edit_words: str | None = None,
  *,
  token_positions=None,
  size: int = 512,
  announce=None,
) -> PreparedEdit:
  """Checks the inputs, preprocesses the image, finds the edit tokens and encodes image and prompts.

  Raises:
    io.InputError: see `check_edit`; a bad image.
  """
  from lusd_jax.lusd import core

  seeds, edit_tokens = check_edit(
    model.tokenizer, model.configs.schedule, source_prompt, target_prompt, seeds, config, edit_words,
    token_positions=token_positions, size=size, announce=announce,
  )  # fmt: skip
  x = _prepare_image(image, size)
  ctx = encode_prompts(model, [source_prompt, target_prompt])
  z_src = encode_image(model, x)
  inputs = core.EditInputs(z_src, ctx[0], ctx[1], jnp.asarray(edit_tokens.token_mask()))
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  return PreparedEdit(seeds, x, edit_tokens, inputs, keys)


def progress_chunk_size(num_steps: int, chunk_size: int | None = None) -> int:
  """Steps per compiled call under a progress bar: about a tenth of the run, at most 25."""
  return chunk_size or max(1, min(25, num_steps // 10 or 1))


@contextlib.contextmanager
def step_progress(num_steps: int, desc: str, enabled: bool = True):
  """A tqdm bar over optimization steps; yields the `on_chunk` callback that moves it (None if off).

  The bar's postfix counts the redraws so far (`StepStats.rejections`, summed over the batch).
  """
  if not enabled:
    yield None
    return
  from tqdm.auto import tqdm

  bar = tqdm(total=num_steps, desc=desc, unit="step", dynamic_ncols=True)
  # The first chunk compiles the program (seconds to a minute; later runs read XLA's cache).
  bar.set_postfix_str("compiling", refresh=True)
  rejected = 0

  def on_chunk(done, _state, stats):
    nonlocal rejected
    rejected += int(np.asarray(stats.rejections)[:, : done - bar.n].sum())
    bar.set_postfix(rejections=rejected, refresh=False)
    bar.update(done - bar.n)

  try:
    yield on_chunk
  finally:
    bar.close()


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
) -> EditResult:
  """Edits `image` from `source_prompt` to `target_prompt` with LUSD, once per seed (vmapped).

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

  Returns:
    `EditResult`.

  Example:
    >>> model = lusd_jax.load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> res = lusd_jax.edit(model, "cat.png", "a cat", "a cat wearing a party hat", seeds=[0, 1, 2])
    >>> res.images.shape
    (3, 512, 512, 3)
  """
  from lusd_jax.lusd import core
  from lusd_jax.lusd.config import LUSDConfig

  config = LUSDConfig() if config is None else config
  announce = announce or (lambda _msg: None)
  timings = {}
  t0 = time.perf_counter()
  prep = prepare_edit(
    model, image, source_prompt, target_prompt, seeds, config, edit_words,
    token_positions=token_positions, size=size, announce=announce,
  )  # fmt: skip
  seeds, inputs, keys = prep.seeds, prep.inputs, prep.keys
  jax.block_until_ready(inputs)
  timings["encode_s"] = time.perf_counter() - t0

  n = config.num_steps
  if progress:
    chunk_size = progress_chunk_size(n, chunk_size)
  t1 = time.perf_counter()
  optimize = core.optimize
  if mesh is not None:
    from lusd_jax import sharding

    optimize = functools.partial(sharding.sharded_optimize, mesh=mesh)
  with step_progress(n, f"LUSD {len(seeds)} seed(s)", enabled=progress) as on_chunk:
    out = optimize(
      core.FlaxUNet(model.configs.unet, model.unet_dtype),
      model.params.unet,
      inputs,
      keys,
      config,
      schedule=model.configs.schedule,
      noise_fn=noise_fn,
      snapshot_every=snapshot_every,
      chunk_size=chunk_size,
      seed_ids=seeds,
      on_chunk=on_chunk,
    )
  timings["optimize_s"] = time.perf_counter() - t1

  return _result(model, prep, source_prompt, target_prompt, config, out, timings)


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
  `sharding.optimize_batch`: one compiled program for every batch (the last is padded), each element
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
  from lusd_jax import sharding
  from lusd_jax.lusd import core
  from lusd_jax.lusd.config import LUSDConfig

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
  n = config.num_steps
  if progress:
    chunk_size = progress_chunk_size(n, chunk_size)
  unet_fn = core.FlaxUNet(model.configs.unet, model.unet_dtype)
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
    inputs_B = jax.tree.map(lambda *xs: jnp.stack(xs), *(prepared[j].inputs for j, _ in items))
    keys_B = jnp.stack([prepared[j].keys[i] for j, i in items])
    ids = [f"{label(j)} seed {prepared[j].seeds[i]}" for j, i in items]
    t1 = time.perf_counter()
    try:
      with step_progress(n, desc, progress) as on_chunk:
        out = sharding.optimize_batch(
          unet_fn, params, inputs_B, keys_B, sharding.broadcast_batch(config.numeric(), len(items)),
          static=config.static(), schedule=model.configs.schedule, mesh=mesh, batch_size=batch_size,
          snapshot_every=snapshot_every, chunk_size=chunk_size, ids=ids, on_chunk=on_chunk,
        )  # fmt: skip
    except core.NonFiniteError as e:
      queue[:] = [item for item in queue if item[0] not in jobs_in]  # their other seeds too
      for j in jobs_in:
        prepared.pop(j), outputs.pop(j)
        yield j, e
      return
    seconds = time.perf_counter() - t1
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
    "rejections_per_step": result.rejections.tolist(),
    "timestep_per_step": result.timesteps.tolist(),
    "total_rejections": [int(r.sum()) for r in result.rejections],
    "hit_max_attempts": [bool(h) for h in result.hit_max_attempts],
    # Steps whose g was exactly 0 (the prompts look identical to the U-Net): redraws ended at once.
    "zero_gradient_steps": [
      int(z) for z in (result.zero_gradient_steps if result.zero_gradient_steps is not None else [])
    ],
    "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
    "versions": {
      "lusd_jax": __version__,
      "jax": jax.__version__,
      "flax": flax.__version__,
      "python": platform.python_version(),
      "backend": jax.default_backend(),
    },
  }
