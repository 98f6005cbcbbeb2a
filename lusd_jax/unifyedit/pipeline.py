"""UnifyEdit edits as a user asks for them: `edit` (one config) and `edit_configs` (a sweep's cells).

An edit has two phases. The inversion (`lusd_jax.inversion`: DDIM inversion with the source prompt,
then null-text inversion unless `inversion="ddim"`) depends only on the photo, the source prompt and
T, so configs that share them share one inversion (a saved one can be passed in). The denoising
phase (`core.UnifyEdit`) then runs every config as one element of one engine batch: one compiled
program, vmapped over configs, sharded over a mesh's devices.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax import engine, io, prepare, reconstruction
from lusd_jax import schedule as schedule_lib
from lusd_jax.loading import SDModel
from lusd_jax.lusd.core import FlaxUNet
from lusd_jax.pipeline import EditResult, progress_chunk_size, step_progress
from lusd_jax.prompts import word_token_positions
from lusd_jax.unifyedit import automask, losses
from lusd_jax.unifyedit.config import UnifyEditConfig, stack_numeric
from lusd_jax.unifyedit.core import UnifyEdit, UnifyInputs, word_weights


class InversionRecord(NamedTuple):
  """What the denoising phase starts from (`reconstruction.record` writes the same arrays)."""

  trajectory: np.ndarray  # [T + 1, h, w, 4]: z_0 .. z_T
  null_embeddings: np.ndarray  # [T, L, D]
  inner_steps: np.ndarray | None  # [T] Adam steps per step (null-text inversion only)


class PreparedUnifyEdit(NamedTuple):
  """An edit's checked and encoded inputs, before the inversion."""

  image: np.ndarray  # [H, W, 3] float32 in [0, 1]
  mask: np.ndarray | None  # [H, W] float32 binary, None for a global edit
  edit_tokens: Any  # prompts.EditTokens
  word_groups: tuple[tuple[int, ...], ...]  # token positions of each edit word
  z0: jax.Array  # [h, w, 4]
  ctx: jax.Array  # [3, L, D]: source, target, ""


# Edit words are padded to this many rows, so that edits with 1..4 words share one compiled program.
MAX_EDIT_WORDS = 4


def edit_word_groups(tokenizer, target_prompt: str, positions: Sequence[int]) -> tuple[tuple[int, ...], ...]:
  """The edit-token positions grouped by the target word they belong to (s* per word, Eq. 9-10)."""
  words = word_token_positions(tokenizer, target_prompt)
  marked = set(positions)
  groups = [tuple(p for p in word if p in marked) for word in words]
  found = {p for g in groups for p in g}
  groups += [(p,) for p in sorted(marked - found)]  # a position given by hand that no word holds
  return tuple(g for g in groups if g)


def check_unifyedit(
  tokenizer, schedule, source_prompt, target_prompt, config: UnifyEditConfig, edit_words=None, *,
  token_positions=None, mask=None, image_size=None, size: int = 512, names=None, announce=None,
):  # fmt: skip
  """Every check of a UnifyEdit edit that needs no weights: prompts, edit words, mask, size, T.

  Returns:
    (edit tokens, word groups, the mask as float32 [size, size], "auto" (made after the inversion)
    or None).

  Raises:
    io.InputError: naming the argument (the CLI's flags through `names`).
  """
  name = names or (lambda arg: arg)
  _, edit_tokens = prepare.check_edit(
    tokenizer, schedule, source_prompt, target_prompt, (0,), config, edit_words,
    token_positions=token_positions, size=size, names=names, announce=announce,
  )  # fmt: skip
  if edit_tokens.uniform:
    raise io.InputError(
      f"{name('edit_words')}: UnifyEdit's cross-attention constraint needs the edit token s*, and none "
      f"was found in {target_prompt!r}; name it (e.g. the new word)"
    )
  groups = edit_word_groups(tokenizer, target_prompt, edit_tokens.positions)
  if len(groups) > MAX_EDIT_WORDS:
    raise io.InputError(
      f"{name('edit_words')}: {len(groups)} edit words; UnifyEdit takes at most {MAX_EDIT_WORDS} (L_CAA sums over them)"
    )
  for term, tau in (("L_CAA", "tau1"), ("L_SAP", "tau2")):
    if getattr(config, tau) > config.num_steps and announce is not None:
      announce(
        f"note: {name(tau)} {getattr(config, tau)} > {name('num_steps')} {config.num_steps}: {term} never acts "
        "(the presets' tau are step indices of a 50-step run)"
      )
  if isinstance(mask, str) and mask == "auto":
    pass  # LUSD's attention mask, made after the inversion (edit_configs, automask.py)
  elif mask is not None:
    if isinstance(mask, str) or hasattr(mask, "__fspath__"):
      mask = io.load_mask(mask, size, image_size, flag=name("mask"))
    else:
      mask = io.mask_from_array(mask, size, image_size, flag=name("mask"))
  return edit_tokens, groups, mask


def prepare_unifyedit(model: SDModel, image, source_prompt, target_prompt, config, edit_words=None, *,
                      token_positions=None, mask=None, size=512, announce=None) -> PreparedUnifyEdit:  # fmt: skip
  """Checks, preprocesses and encodes an edit's photo, prompts and mask."""
  image_size = io.image_original_size(image) if _is_path(image) else None
  edit_tokens, groups, mask = check_unifyedit(
    model.tokenizer, model.configs.schedule, source_prompt, target_prompt, config, edit_words,
    token_positions=token_positions, mask=mask, image_size=image_size, size=size, announce=announce,
  )  # fmt: skip
  x = prepare.preprocess_image(image, size)
  ctx = prepare.encode_prompts(model, [source_prompt, target_prompt, ""])
  return PreparedUnifyEdit(x, mask, edit_tokens, groups, prepare.encode_image(model, x), ctx)


def _is_path(x) -> bool:
  return isinstance(x, str | bytes) or hasattr(x, "__fspath__")


def invert_prepared(
  model: SDModel, prep: PreparedUnifyEdit, config: UnifyEditConfig, *, progress: bool = False, announce=None
) -> InversionRecord:
  """The inversion phase: DDIM inversion, then null-text inversion (config.inversion == "nti")."""
  inv = reconstruction.invert_latent(
    model, prep.z0, prep.ctx[0], prep.ctx[2], num_steps=config.num_steps, null_text=config.inversion == "nti",
    guidance=config.guidance, inner_steps=config.nti_inner_steps, progress=progress, announce=announce,
  )  # fmt: skip
  return InversionRecord(inv.trajectory, inv.null_embeddings, inv.inner_steps)


def load_inversion(
  path, num_steps: int, latent_shape, embedding_shape, flag: str = "--inversion"
) -> InversionRecord:
  """A saved `lusd-jax invert` record (`inversion.npz`), checked against the edit's shapes.

  With `latent_shape` / `embedding_shape` None (the command line's check before the model loads),
  only the number of steps is checked.
  """
  try:
    with np.load(path) as f:
      traj, nulls = f["trajectory"], f["null_embeddings"]
      inner = f["inner_steps"] if "inner_steps" in f else None
  except (OSError, KeyError, ValueError) as e:
    raise io.InputError(f"{flag}: cannot read an inversion record from {path}: {e}") from None
  if latent_shape is None or embedding_shape is None:  # before the model loads: the step count only
    if traj.shape[:1] != (num_steps + 1,) or nulls.shape[:1] != (num_steps,):
      raise io.InputError(
        f"{flag}: {path} holds {traj.shape[0] - 1} inversion steps (`invert --steps`); this edit runs "
        f"--num-steps {num_steps}"
      )
    return InversionRecord(traj.astype(np.float32), nulls.astype(np.float32), inner)
  want_traj = (num_steps + 1, *latent_shape)
  want_nulls = (num_steps, *embedding_shape)
  if traj.shape != want_traj or nulls.shape != want_nulls:
    raise io.InputError(
      f"{flag}: {path} holds a trajectory {traj.shape} and null embeddings {nulls.shape}; this edit needs "
      f"{want_traj} and {want_nulls} (same --steps, --size and model as the inversion)"
    )
  return InversionRecord(traj.astype(np.float32), nulls.astype(np.float32), inner)


def _inputs(prep: PreparedUnifyEdit, inv: InversionRecord) -> UnifyInputs:
  ww, valid = word_weights(prep.word_groups, prep.ctx.shape[1], MAX_EDIT_WORDS)
  size = prep.image.shape[:2]
  mask = np.ones(size, np.float32) if prep.mask is None else prep.mask
  return UnifyInputs(
    z_T=jnp.asarray(inv.trajectory[-1]),
    trajectory=jnp.asarray(inv.trajectory),
    null_embeddings=jnp.asarray(inv.null_embeddings),
    ctx_src=prep.ctx[0],
    ctx_tgt=prep.ctx[1],
    word_weights=jnp.asarray(ww),
    word_valid=jnp.asarray(valid),
    mask=jnp.asarray(mask),
    has_mask=jnp.bool_(prep.mask is not None),
  )


def denoise(
  model: SDModel, inputs: UnifyInputs, configs: Sequence[UnifyEditConfig], *, mesh=None,
  progress: bool = False, chunk_size: int | None = None, ids=None, desc: str = "UnifyEdit",
  batch_size: int | None = None,
) -> engine.RunOutput:  # fmt: skip
  """The denoising phase of one element per config (all sharing `inputs` and a static part)."""
  method = UnifyEdit(
    FlaxUNet(model.configs.unet, model.unet_dtype), model.configs.schedule, configs[0].static()
  )
  numeric_B = stack_numeric(configs)
  inputs_B = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(configs),) + x.shape), inputs)
  keys_B = jax.vmap(jax.random.key)(jnp.arange(len(configs), dtype=jnp.uint32))  # unused: deterministic
  n = method.num_steps
  if progress:
    chunk_size = progress_chunk_size(n, chunk_size)
  with step_progress(n, desc, enabled=progress) as on_chunk:
    return engine.run(
      method, model.params.unet, inputs_B, keys_B, numeric_B, mesh=mesh, chunk_size=chunk_size,
      ids=ids or [f"config {c}" for c in range(len(configs))], on_chunk=on_chunk, batch_size=batch_size,
    )  # fmt: skip


def edit_configs(
  model: SDModel,
  image,
  source_prompt: str,
  target_prompt: str,
  configs: Sequence[UnifyEditConfig],
  *,
  mask=None,
  edit_words=None,
  token_positions=None,
  size: int = 512,
  inversion_record: InversionRecord | str | None = None,
  progress: bool = False,
  announce=None,
  chunk_size: int | None = None,
  mesh=None,
  batch_size: int | None = None,
) -> list[EditResult]:
  """One UnifyEdit edit per config, sharing one inversion and one compiled denoising program.

  The configs must share their static part (T, sa_resolutions, maps_from, max_it) and inversion
  settings (inversion, nti_inner_steps, guidance of the inversion); numeric fields may differ.

  Returns:
    One `EditResult` per config (S = 1: UnifyEdit is deterministic).
  """
  configs = list(configs)
  first = configs[0]
  for c in configs[1:]:
    if (c.inversion, c.nti_inner_steps, c.num_steps) != (
      first.inversion,
      first.nti_inner_steps,
      first.num_steps,
    ):
      raise ValueError("configs of one edit_configs call must share inversion, nti_inner_steps and num_steps")
    if c.inversion == "nti" and c.guidance != first.guidance:
      raise ValueError("null-text inversion is optimized for one guidance: configs must share it")
  announce = announce or (lambda _msg: None)
  timings = {}
  t0 = time.perf_counter()
  prep = prepare_unifyedit(
    model, image, source_prompt, target_prompt, first, edit_words,
    token_positions=token_positions, mask=mask, size=size, announce=announce,
  )  # fmt: skip
  timings["encode_s"] = time.perf_counter() - t0
  t1 = time.perf_counter()
  if isinstance(inversion_record, InversionRecord):
    inv = inversion_record
  elif inversion_record is not None:
    inv = load_inversion(
      inversion_record, first.num_steps, prep.z0.shape, prep.ctx.shape[1:], "--reuse-inversion"
    )
  else:
    inv = invert_prepared(model, prep, first, progress=progress, announce=announce)
  if isinstance(prep.mask, str):  # mask="auto": from the inversion trajectory (automask.py)
    prep = prep._replace(
      mask=automask.mask_from_inversion(model, prep, inv.trajectory, first.num_steps, announce=announce)
    )
  timings["inversion_s"] = time.perf_counter() - t1
  t2 = time.perf_counter()
  out = denoise(
    model,
    _inputs(prep, inv),
    configs,
    mesh=mesh,
    progress=progress,
    chunk_size=chunk_size,
    batch_size=batch_size,
  )
  timings["denoise_s"] = time.perf_counter() - t2
  z_tgt_B, z_src_B = out.final
  t3 = time.perf_counter()
  images = prepare.decode_latents(model, z_tgt_B)
  recs = prepare.decode_latents(model, z_src_B)
  timings["decode_s"] = time.perf_counter() - t3
  h, w = z_tgt_B.shape[1:3]
  latent_mask = None
  if prep.mask is not None:
    latent_mask = np.asarray(losses.nearest_mask(jnp.asarray(prep.mask), h, w))[None]
  ts = schedule_lib.ddim_timesteps(model.configs.schedule, first.num_steps)
  results = []
  for b, config in enumerate(configs):
    stats = {name: np.asarray(getattr(out.stats, name))[b : b + 1] for name in out.stats._fields}
    stats["ratios"] = stats["ratios"][:, :, : len(prep.word_groups)]  # drop the padding words' rows
    results.append(
      EditResult(
        images=images[b : b + 1],
        latents=z_tgt_B[b : b + 1],
        input_image=prep.image,
        source_prompt=source_prompt,
        target_prompt=target_prompt,
        seeds=(0,),
        rejections=np.zeros((1, first.num_steps), np.int32),
        timesteps=np.asarray(ts)[None],
        hit_max_attempts=np.zeros(1, bool),
        mask=latent_mask,
        snapshots=None,
        latent_snapshots=None,
        mask_snapshots=None,
        snapshot_steps=(),
        edit_tokens=prep.edit_tokens,
        config=config,
        timings=timings,
        method="unifyedit",
        reconstruction=recs[b : b + 1],
        step_stats=stats,
        inversion_inner_steps=inv.inner_steps,
        user_mask=prep.mask,
      )
    )
  return results


def edit(
  model: SDModel,
  image,
  source_prompt: str,
  target_prompt: str,
  config: UnifyEditConfig | None = None,
  *,
  mask=None,
  edit_words=None,
  token_positions=None,
  size: int = 512,
  inversion_record: InversionRecord | str | None = None,
  progress: bool = False,
  announce=None,
  chunk_size: int | None = None,
  mesh=None,
  seeds=(0,),
  batch_size: int | None = None,
) -> EditResult:
  """Edits `image` from `source_prompt` to `target_prompt` with UnifyEdit.

  Args:
    model: from `lusd_jax.load_model` (SD 1.x; UnifyEdit's settings are the paper's for 512 px).
    image: a path, PIL image or [H, W, 3] array (center-cropped and resized like LUSD's input).
    source_prompt: describes the photo (the inversion's prompt P).
    target_prompt: describes the edit (P*).
    config: `UnifyEditConfig` (default: `UnifyEditConfig()`; `UnifyEditConfig.preset("color")` etc.).
    mask: the region to edit (a path or an array at the photo's size, cropped and resized like it);
      None for a global edit (style): R_l is then the mean attention of s*, nothing is blended;
      "auto": LUSD's attention mask of the edit words (`automask.py`, beyond the paper).
    edit_words: the target words whose tokens are s* (default: inferred as LUSD does).
    token_positions: explicit s* token positions instead.
    size: image side, a multiple of 64.
    inversion_record: a saved inversion (`lusd-jax invert`'s inversion.npz, or an `InversionRecord`)
      made with the same source prompt, T and size, instead of inverting again.
    progress: a progress bar over the denoising steps.
    announce: where the one-line notes go.
    chunk_size: denoising steps per compiled call.
    mesh: a `sharding.data_mesh()` (several configs spread over its devices).
    seeds: accepted for symmetry with LUSD; UnifyEdit is deterministic (DDIM, eta 0): one seed.
    batch_size: pad the denoising batch to this size (so that it shares a sweep's compiled program).

  Returns:
    `EditResult` with `images` [1, H, W, 3] (the edit), `reconstruction` (the source branch),
    `latents` (the final target latent) and `step_stats` (per-step lambda1, lambda2, gradient norms
    and means, losses and R_l; arrays [1, T, ...]).
  """
  if len(tuple(seeds)) != 1:
    raise io.InputError("seeds: UnifyEdit is deterministic (DDIM inversion and sampling): give one seed")
  config = UnifyEditConfig() if config is None else config
  return edit_configs(
    model, image, source_prompt, target_prompt, [config], mask=mask, edit_words=edit_words,
    token_positions=token_positions, size=size, inversion_record=inversion_record, progress=progress,
    announce=announce, chunk_size=chunk_size, mesh=mesh, batch_size=batch_size,
  )[0]  # fmt: skip
