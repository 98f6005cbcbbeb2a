"""`--mask auto`: LUSD's attention mask of the edit words as the region of a local UnifyEdit edit.

Beyond the paper (issue 16): UnifyEdit's localized edits need a user-drawn mask M. Without one, we
offer the mask LUSD builds for itself (LUSD Alg. 2, `lusd_jax.lusd.mask.attention_mask`): the
cross-attention of the edit words, refined by self-attention, min-max normalized. The steps:

  1. z_t: the DDIM inversion's latent of the photo at the trajectory level whose timestep is closest
     to `timestep` (default 500, mid noise: coarse enough to show the object's layout, fine enough
     to keep its outline). The inversion is deterministic and already computed, so the mask is too.
  2. ONE conditional U-Net call on (z_t, target prompt P*, that level's timestep), capturing the
     head-and-layer-averaged self map at latent/2 and cross map at latent/4 (LUSD's maps).
  3. `attention_mask` -> [h, w] in [0, 1]; nearest upsampling to the image (each latent pixel
     becomes an 8x8 block, so `losses.nearest_mask` gives back exactly the latent-level mask that
     UnifyEdit uses for Eq. 9, 16 and blending; bilinear would only smooth the picture);
     binarize at `> threshold`.

Degenerate attention (an edit-token cross map without location, or a mask that comes out empty or
full) raises `io.InputError` starting with the flag and suggesting a drawn mask.

Example:

  k, t = trajectory_level(model.configs.schedule, num_steps)
  m = auto_mask(model, trajectory[k], t, ctx_tgt, edit_tokens.token_mask(77), 512)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax import io
from lusd_jax import schedule as schedule_lib
from lusd_jax.lusd.core import FlaxUNet
from lusd_jax.lusd.mask import attention_mask
from lusd_jax.models import unet as unet_lib

DEFAULT_TIMESTEP = 500  # mid noise (of 1000 training timesteps)
DEFAULT_THRESHOLD = 0.5
# An edit-token cross map whose spread (max - min) is below this fraction of its max carries no
# location: min-max normalization would blow its rounding noise up to a [0, 1] pattern.
FLAT_TOLERANCE = 1e-3


class AutoMask(NamedTuple):
  """The auto mask and what it was made from."""

  binary: jax.Array  # [S, S] float32 in {0, 1}: the mask at image size
  soft: jax.Array  # [h, w] float32 in [0, 1]: LUSD's attention mask at the latent size
  flat: jax.Array  # bool: the edit tokens' cross map has no location (degenerate attention)


def trajectory_level(schedule, num_steps: int, timestep: int = DEFAULT_TIMESTEP) -> tuple[int, int]:
  """The DDIM inversion trajectory level k >= 1 whose timestep is closest to `timestep`.

  `inversion.ddim_invert` returns z_0 .. z_N with z_k at `ddim_timesteps(schedule, N)[N - k]`; ties
  go to the less noisy level.

  Args:
    schedule: the checkpoint's `Schedule`.
    num_steps: N, the inversion's DDIM steps.
    timestep: the wanted DDPM timestep.

  Returns:
    (k, the timestep of z_k).
  """
  ts = schedule_lib.ddim_timesteps(schedule, num_steps)  # high to low
  level_ts = np.asarray(ts[::-1], np.int64)  # level k = 1 .. N
  i = int(np.argmin(np.abs(level_ts - int(timestep))))
  return i + 1, int(level_ts[i])


def upsample_nearest(m_hw: jax.Array, size: int) -> jax.Array:
  """[h, w] -> [size, size] by nearest (center) sampling: pixel i reads floor((i + 0.5) h / size)."""
  h, w = m_hw.shape
  rows = np.floor((np.arange(size) + 0.5) * h / size).astype(np.int32)
  cols = np.floor((np.arange(size) + 0.5) * w / size).astype(np.int32)
  return m_hw[rows][:, cols]


def mask_from_maps(
  self_attn_NN: jax.Array,
  cross_attn_NL: jax.Array,
  edit_mask_L: jax.Array,
  latent_hw: tuple[int, int],
  image_size: int,
  threshold=DEFAULT_THRESHOLD,
) -> AutoMask:
  """The auto mask from averaged attention maps (the part after the U-Net call; jit-friendly).

  Args:
    self_attn_NN: [N_s, N_s] self-attention at latent/2, averaged over heads and layers.
    cross_attn_NL: [N_c, L] cross-attention at latent/4, averaged likewise.
    edit_mask_L: [L] 1 at the edit tokens.
    latent_hw: (h, w).
    image_size: S, the side of the returned mask (static).
    threshold: the binarization level of the [0, 1] attention mask (on where > threshold).

  Returns:
    `AutoMask` (binary [S, S], soft [h, w], flat).
  """
  soft = attention_mask(self_attn_NN, cross_attn_NL, edit_mask_L, latent_hw)
  weights_L = edit_mask_L.astype(jnp.float32) / jnp.maximum(jnp.sum(edit_mask_L), 1e-12)
  cross_N = cross_attn_NL.astype(jnp.float32) @ weights_L
  spread, top = jnp.max(cross_N) - jnp.min(cross_N), jnp.max(jnp.abs(cross_N))
  flat = ~(spread > FLAT_TOLERANCE * top)  # also True for NaN maps
  binary = (upsample_nearest(soft, image_size) > threshold).astype(jnp.float32)
  return AutoMask(binary, soft, flat)


@functools.partial(jax.jit, static_argnames=("unet_fn", "image_size"))
def auto_mask_program(unet_fn, params, z_hwc, timestep, ctx_LD, edit_mask_L, threshold, image_size: int):
  """ONE conditional U-Net call capturing LUSD's averaged maps, then `mask_from_maps` (one program).

  Args:
    unet_fn: `FlaxUNet` (static).
    params: its parameters.
    z_hwc: [h, w, c] the noisy latent.
    timestep: its DDPM timestep (traced).
    ctx_LD: [L, D] the target prompt's embedding.
    edit_mask_L: [L] 1 at the edit tokens.
    threshold: binarization level (traced).
    image_size: S (static).

  Returns:
    `AutoMask`.
  """
  h, w = z_hwc.shape[:2]
  spec = unet_lib.CaptureSpec(self_res=h // 2, cross_res=h // 4)
  t_1 = jnp.reshape(timestep, (1,)).astype(jnp.int32)
  _, maps = unet_fn(params, z_hwc[None].astype(jnp.float32), t_1, ctx_LD[None], spec)
  return mask_from_maps(
    maps.self_attn[0].astype(jnp.float32), maps.cross_attn[0].astype(jnp.float32), edit_mask_L,
    (h, w), image_size, threshold,
  )  # fmt: skip


def checked(m: AutoMask, *, flag: str = "--mask", what: str = "the edit words") -> np.ndarray:
  """The binary mask as NumPy, or `io.InputError` (one line starting with `flag`) if degenerate."""
  binary = np.asarray(m.binary, np.float32)
  if bool(m.flat) or not binary.any() or binary.all():
    why = (
      "has no location" if bool(m.flat) else ("is empty" if not binary.any() else "covers the whole image")
    )
    raise io.InputError(
      f"{flag}: the automatic mask from the attention of {what} {why}; draw a mask of the region to "
      f"edit (white on black, the photo's size) and pass its file"
    )
  return binary


def auto_mask(
  model,
  z_t_hwc,
  timestep,
  ctx_tgt_LD,
  edit_token_mask_L,
  image_size: int,
  threshold: float = DEFAULT_THRESHOLD,
  *,
  flag: str = "--mask",
  what: str = "the edit words",
) -> np.ndarray:
  """LUSD's attention mask of the edit tokens, at image size and binary (`--mask auto`).

  Args:
    model: an `SDModel` (its U-Net).
    z_t_hwc: [h, w, c] a latent of the photo at `timestep` (a DDIM inversion level).
    timestep: its DDPM timestep.
    ctx_tgt_LD: [L, D] the target prompt's embedding.
    edit_token_mask_L: [L] 1 at the edit tokens (`EditTokens.token_mask`).
    image_size: S, the image side.
    threshold: on where the [0, 1] attention mask is > threshold; in (0, 1).
    flag: the flag or argument named in errors.
    what: the edit words as the error message names them.

  Returns:
    [S, S] float32 with values exactly 0.0 and 1.0.

  Raises:
    io.InputError: degenerate attention (no location, an empty or a full mask), or a threshold
      outside (0, 1).
  """
  if not 0.0 < float(threshold) < 1.0:
    raise io.InputError(f"{flag}: the auto mask threshold must be in (0, 1), got {threshold}")
  m = auto_mask_program(
    FlaxUNet(model.configs.unet, model.unet_dtype), model.params.unet, jnp.asarray(z_t_hwc),
    jnp.asarray(timestep, jnp.int32), jnp.asarray(ctx_tgt_LD), jnp.asarray(edit_token_mask_L, jnp.float32),
    jnp.float32(threshold), int(image_size),
  )  # fmt: skip
  return checked(m, flag=flag, what=what)


def mask_from_inversion(
  model,
  prep,
  trajectory,
  num_steps: int,
  *,
  timestep: int = DEFAULT_TIMESTEP,
  threshold: float = DEFAULT_THRESHOLD,
  flag: str = "--mask",
  announce=None,
) -> np.ndarray:
  """`auto_mask` of a prepared UnifyEdit edit from its inversion trajectory (the pipeline's hook).

  Args:
    model: the `SDModel`.
    prep: the edit's `PreparedUnifyEdit` (image, edit tokens, target embedding).
    trajectory: [N + 1, h, w, c] the DDIM inversion z_0 .. z_N.
    num_steps: N.
    timestep: the wanted noise level (the closest trajectory level is used).
    threshold: see `auto_mask`.
    flag: see `auto_mask`.
    announce: gets one line, e.g. "mask: auto from the attention of 'dog' (23% of the image)".

  Returns:
    [S, S] float32 binary, S the prepared image's side.
  """
  k, t = trajectory_level(model.configs.schedule, num_steps, timestep)
  tokens = prep.edit_tokens
  what = ", ".join(repr(w) for w in tokens.edit_words) or f"tokens {list(tokens.positions)}"
  ctx_tgt = prep.ctx[1]
  mask = auto_mask(
    model, trajectory[k], t, ctx_tgt, tokens.token_mask(ctx_tgt.shape[0]), prep.image.shape[0], threshold,
    flag=flag, what=what,
  )  # fmt: skip
  if announce is not None:
    announce(f"mask: auto from the attention of {what} ({100 * mask.mean():.0f}% of the image; t = {t})")
  return mask
