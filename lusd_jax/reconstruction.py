"""Invert a photo and reconstruct it: DDIM inversion, optionally null-text inversion, guided sampling.

`invert(model, image, source)` encodes the photo, inverts its latent with DDIM (guidance 1, the source
prompt), optimizes the per-step null embeddings (null-text inversion, Prompt-to-Prompt's defaults)
and samples back from z_T with guidance w, so that the reconstruction shows what the inversion
keeps. The result holds what UnifyEdit's two branches start from (z_T and the null embeddings),
and `lusd-jax invert` writes it to an `.npz` record that later commands can reuse.

Each phase is an `engine.Method` of `lusd_jax.inversion`, run by `engine.run` on a batch of one, in
chunks of steps under a progress bar when `progress` is on (the NaN/inf report comes with it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax import engine, inversion, io, prepare
from lusd_jax import schedule as schedule_lib
from lusd_jax.loading import SDModel
from lusd_jax.lusd import core
from lusd_jax.pipeline import progress_chunk_size


class Inversion(NamedTuple):
  """What `invert` returns (N = DDIM steps; h, w = latent size; L, D = text tokens and width)."""

  input_image: np.ndarray  # [H, W, 3] float32 in [0, 1], preprocessed
  source_prompt: str
  timesteps: np.ndarray  # [N] int: the DDIM timesteps, high noise first
  trajectory: np.ndarray  # [N + 1, h, w, 4]: z_0 (the photo's latent) .. z_T
  null_embeddings: np.ndarray  # [N, L, D]: per-step null embeddings ("" repeated without null-text)
  inner_steps: np.ndarray | None  # [N] Adam steps per step (None without null-text inversion)
  losses: np.ndarray | None  # [N] last inner loss per step
  reconstruction: np.ndarray  # [H, W, 3] float32: guided sampling from z_T, decoded
  latent_error: float  # mean squared error of the reconstructed latent against z_0
  psnr_db: float  # PSNR of the reconstruction against the input image
  timings: dict


def invert(
  model: SDModel,
  image,
  source_prompt: str,
  *,
  num_steps: int = 50,
  null_text: bool = True,
  guidance: float = inversion.NTI_GUIDANCE,
  inner_steps: int = inversion.NTI_INNER_STEPS,
  size: int = 512,
  announce=None,
  progress: bool = False,
) -> Inversion:
  """Inverts `image` under `source_prompt` and reconstructs it.

  Args:
    model: from `lusd_jax.load_model`.
    image: a path, a PIL image or an [H, W, 3] array (center-cropped and resized as `edit` does).
    source_prompt: describes the photo.
    num_steps: N, DDIM steps (50 in Prompt-to-Prompt and UnifyEdit).
    null_text: optimize the per-step null embeddings (else the "" embedding at every step).
    guidance: w of the reconstruction (and of null-text inversion).
    inner_steps: most Adam steps per step of null-text inversion.
    size: image side, a multiple of 64.
    announce: where to print one line per phase (default: nowhere).
    progress: a progress bar per phase (DDIM inversion, null-text inversion with the mean Adam steps
      per step so far, reconstruction), each run in chunks of about a tenth of its steps.

  Returns:
    `Inversion`.
  """
  check_inversion(num_steps, guidance, inner_steps, model.configs.schedule.num_train_timesteps)
  announce = announce or (lambda _msg: None)
  schedule = model.configs.schedule
  unet_fn = core.FlaxUNet(model.configs.unet, model.unet_dtype)
  params = model.params.unet
  timings = {}
  t0 = time.perf_counter()
  x = prepare.preprocess_image(image, size)
  ctx_src, ctx_empty = prepare.encode_prompts(model, [source_prompt, ""])
  z0 = prepare.encode_image(model, x)
  timings["encode_s"] = time.perf_counter() - t0

  inv = invert_latent(
    model, z0, ctx_src, ctx_empty, num_steps=num_steps, null_text=null_text, guidance=guidance,
    inner_steps=inner_steps, progress=progress, announce=announce, timings=timings,
  )  # fmt: skip
  trajectory, nulls = inv.trajectory, inv.null_embeddings
  announce(f"reconstruction: {num_steps} guided DDIM steps (w = {guidance:g})")
  t3 = time.perf_counter()
  z_rec = _run_phase(
    inversion.GuidedSampling(unet_fn, schedule, num_steps), params,
    inversion.SamplingInputs(trajectory[-1], ctx_src, nulls), jnp.float32(guidance), "reconstruction",
    progress,
  )[0]  # fmt: skip
  rec = prepare.decode_latents(model, jnp.asarray(z_rec)[None])[0]
  timings["reconstruction_s"] = time.perf_counter() - t3
  mse_image = float(np.mean((rec - x) ** 2))
  return Inversion(
    input_image=x,
    source_prompt=source_prompt,
    timesteps=schedule_lib.ddim_timesteps(schedule, num_steps),
    trajectory=np.asarray(trajectory),
    null_embeddings=np.asarray(nulls),
    inner_steps=inv.inner_steps,
    losses=inv.losses,
    reconstruction=rec,
    latent_error=float(np.mean((z_rec - np.asarray(z0)) ** 2)),
    psnr_db=float(10 * np.log10(1.0 / max(mse_image, 1e-12))),
    timings=timings,
  )


class LatentInversion(NamedTuple):
  """DDIM inversion and (optionally) null-text inversion of one latent (NumPy)."""

  trajectory: np.ndarray  # [N + 1, h, w, 4]: z_0 .. z_T
  null_embeddings: np.ndarray  # [N, L, D]: optimized, or the "" embedding repeated
  inner_steps: np.ndarray | None  # [N] Adam steps per step (None without null-text inversion)
  losses: np.ndarray | None  # [N] the last inner loss per step


def invert_latent(
  model: SDModel, z0, ctx_src, ctx_empty, *, num_steps: int, null_text: bool = True,
  guidance: float = inversion.NTI_GUIDANCE, inner_steps: int = inversion.NTI_INNER_STEPS,
  progress: bool = False, announce=None, timings: dict | None = None,
) -> LatentInversion:  # fmt: skip
  """The inversion phases of `invert` (and of UnifyEdit): DDIM inversion, then null-text inversion.

  Args:
    model: the loaded model.
    z0: [h, w, 4] the photo's latent.
    ctx_src, ctx_empty: [L, D] the source prompt's and "" embeddings.
    num_steps, null_text, guidance, inner_steps, progress: as `invert`.
    announce: where one line per phase goes.
    timings: a dict that receives "ddim_inversion_s" and "null_text_s".
  """
  announce = announce or (lambda _msg: None)
  timings = {} if timings is None else timings
  schedule = model.configs.schedule
  unet_fn = core.FlaxUNet(model.configs.unet, model.unet_dtype)
  params = model.params.unet
  announce(f"DDIM inversion: {num_steps} steps")
  t1 = time.perf_counter()
  trajectory = _run_phase(
    inversion.DDIMInversion(unet_fn, schedule, num_steps), params, inversion.InversionInputs(z0, ctx_src),
    (), "DDIM inversion", progress,
  )  # fmt: skip
  timings["ddim_inversion_s"] = time.perf_counter() - t1
  if not null_text:
    nulls = np.broadcast_to(np.asarray(ctx_empty), (num_steps,) + tuple(ctx_empty.shape))
    return LatentInversion(np.asarray(trajectory), nulls, None, None)
  announce(f"null-text inversion: {num_steps} steps x at most {inner_steps} Adam steps")
  t2 = time.perf_counter()
  nti = _run_phase(
    inversion.NullTextOptimization(unet_fn, schedule, num_steps),
    params,
    inversion.NullTextInputs(trajectory, ctx_src, ctx_empty),
    inversion.NullTextNumeric.of(guidance, inner_steps),
    "null-text inversion",
    progress,
    postfix=_mean_inner_steps(),
  )
  timings["null_text_s"] = time.perf_counter() - t2
  return LatentInversion(
    np.asarray(trajectory),
    np.asarray(nti.null_embeddings),
    np.asarray(nti.inner_steps),
    np.asarray(nti.losses),
  )


def check_inversion(
  num_steps, guidance, inner_steps, num_train_timesteps: int, flag=lambda name: name
) -> None:
  """The settings of an inversion, checked before any weights load; `flag` names them (CLI: "--steps")."""
  if (
    isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps
  ):
    raise io.InputError(
      f"{flag('num_steps')} must be an int in [1, {num_train_timesteps}], got {num_steps!r}"
    )
  if not np.isfinite(guidance) or guidance < 0:
    raise io.InputError(f"{flag('guidance')} must be a finite number >= 0, got {guidance!r}")
  if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
    raise io.InputError(f"{flag('inner_steps')} must be an int >= 1, got {inner_steps!r}")


def record(result: Inversion) -> dict:
  """The arrays of an inversion for `np.savez` (what UnifyEdit reuses: z_T and the null embeddings)."""
  out = {
    "z_T": result.trajectory[-1],
    "trajectory": result.trajectory,
    "null_embeddings": result.null_embeddings,
    "timesteps": result.timesteps,
  }
  if result.inner_steps is not None:
    out |= {"inner_steps": result.inner_steps, "losses": result.losses}
  return out


def _run_phase(method, params, inputs, numeric, desc: str, progress: bool, postfix=None):
  """`method.finish` of one element (NumPy): `engine.run` on a batch of one, in chunks under a bar."""
  one = lambda tree: jax.tree.map(lambda a: jnp.asarray(a)[None], tree)  # noqa: E731
  n = method.num_steps
  chunk = progress_chunk_size(n) if progress else None
  with engine.progress(n, desc, enabled=progress, postfix=postfix) as on_chunk:
    out = engine.run(
      method, params, one(inputs), jax.random.split(jax.random.key(0), 1), one(numeric),
      chunk_size=chunk, ids=["the photo"], on_chunk=on_chunk,
    )  # fmt: skip
  return jax.tree.map(lambda a: a[0], out.final)


def _mean_inner_steps() -> Callable[[Any], dict]:
  """An `engine.progress` postfix: Adam steps per step of null-text inversion, averaged so far."""
  seen = []

  def postfix(stats):
    seen.extend(np.asarray(stats.inner_steps).ravel().tolist())
    return {"inner_steps": f"{np.mean(seen):.1f}"}

  return postfix
