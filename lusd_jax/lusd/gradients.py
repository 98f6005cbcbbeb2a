"""Score-distillation gradients g(z) from one U-Net call: SBP (LUSD's default), DDS and SDS.

Each family names the batch the U-Net sees and how g is read from its epsilon-predictions:

  sbp  [z_t | y_src, z_t | y_tgt]            g = eps_tgt - eps_src     (LUSD Eq. 3, omega = 0)
  dds  [z_src,t | y_src, z_t | y_tgt]        g = eps_tgt - eps_src     (DDS, LUSD Eq. 6 / App. 14)
  sds  [z_t | y_tgt]                         g = eps_tgt - eps

with z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps and z_src,t the source latent noised with the
same (t, eps). The target-prompt row is the one whose attention maps build the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lusd_jax import schedule as schedule_lib
from lusd_jax.lusd.config import GRADIENTS


def _check(family: str) -> None:
  if family not in GRADIENTS:
    raise ValueError(f"unknown gradient family {family!r}; expected one of {GRADIENTS}")


def batch_size(family: str) -> int:
  """Rows of the U-Net batch of one gradient evaluation."""
  _check(family)
  return 1 if family == "sds" else 2


def target_row(family: str) -> int:
  """Index of the (z_t, y_tgt) row, whose attention maps feed the mask."""
  return batch_size(family) - 1


def unet_batch(
  family: str,
  abar_T: jax.Array,
  z_HWC: jax.Array,
  z_src_HWC: jax.Array,
  eps_HWC: jax.Array,
  t: jax.Array,
  ctx_src_LD: jax.Array,
  ctx_tgt_LD: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The U-Net inputs of one gradient evaluation.

  Args:
    family: "sbp", "dds" or "sds".
    abar_T: [T] alphas_cumprod.
    z_HWC: the latent being optimized.
    z_src_HWC: the source latent (used by "dds" only).
    eps_HWC: the noise draw.
    t: int32 scalar timestep.
    ctx_src_LD, ctx_tgt_LD: text embeddings of the source and target prompts.

  Returns:
    (sample_BHWC, timesteps_B, context_BLD), context with B = `batch_size(family)` rows; for "sbp"
    the sample and timestep have one row, shared by both prompts.
  """
  _check(family)
  z_t = schedule_lib.add_noise(abar_T, z_HWC, eps_HWC, t)
  if family == "sds":
    return z_t[None], jnp.reshape(t, (1,)), ctx_tgt_LD[None]
  ctx_BLD = jnp.stack([ctx_src_LD, ctx_tgt_LD.astype(ctx_src_LD.dtype)])
  if family == "sbp":  # one noisy latent under both prompts: a shared sample (UNetFn)
    return z_t[None], jnp.reshape(t, (1,)), ctx_BLD
  z_src_t = schedule_lib.add_noise(abar_T, z_src_HWC, eps_HWC, t)
  return jnp.stack([z_src_t, z_t]), jnp.broadcast_to(t, (2,)), ctx_BLD


def gradient(family: str, eps_pred_BHWC: jax.Array, eps_HWC: jax.Array) -> jax.Array:
  """g from the batch's epsilon-predictions (float32).

  Args:
    family: "sbp", "dds" or "sds".
    eps_pred_BHWC: epsilon-predictions of the `unet_batch` rows (v-predictions already converted).
    eps_HWC: the noise draw (used by "sds").
  """
  _check(family)
  eps_pred_BHWC = eps_pred_BHWC.astype(jnp.float32)
  if family == "sds":
    return eps_pred_BHWC[0] - eps_HWC.astype(jnp.float32)
  return eps_pred_BHWC[1] - eps_pred_BHWC[0]
