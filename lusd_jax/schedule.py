"""The DDPM noise schedule of a Stable Diffusion checkpoint, as pure functions.

Score distillation only needs the forward process: `abar_t` (diffusers' `alphas_cumprod`),
noising `z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`, and turning a v-prediction back into an
epsilon-prediction. `Schedule` holds the keys of a diffusers `scheduler/scheduler_config.json`
that define the schedule; everything else in that file (the sampler's settings) is ignored.

Example:

  schedule = Schedule.from_json("sd15/scheduler/scheduler_config.json")
  abar_T = alphas_cumprod(schedule)
  z_t = add_noise(abar_T, z, eps, t)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax.configs import config_kwargs

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The training noise schedule (diffusers scheduler config keys).

  Attributes:
    num_train_timesteps: T, the number of training timesteps.
    beta_start: beta_0.
    beta_end: beta_{T-1}.
    beta_schedule: "scaled_linear" (betas linear in sqrt space, every SD checkpoint) or "linear".
    prediction_type: what the U-Net predicts: "epsilon" (SD1.x, SD2-base) or "v_prediction" (SD2-768).
  """

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"

  def __post_init__(self):
    if self.num_train_timesteps < 2:
      raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
    if not 0.0 < self.beta_start <= self.beta_end < 1.0:
      raise ValueError(
        f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
      )
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}; expected one of {BETA_SCHEDULES}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(
        f"unsupported prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}"
      )

  @classmethod
  def from_dict(cls, config: dict[str, Any]) -> Schedule:
    """Builds a schedule from a diffusers scheduler config dict (sampler-only keys are ignored).

    Raises:
      ValueError: for `trained_betas` or `rescale_betas_zero_snr`, which are not supported.
    """
    if config.get("trained_betas") is not None:
      raise ValueError("trained_betas is not supported: use a beta_schedule (scaled_linear or linear)")
    if config.get("rescale_betas_zero_snr", False):
      raise ValueError("rescale_betas_zero_snr is not supported")
    return cls(**config_kwargs(cls, config, name="scheduler config", strict=False))

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> Schedule:
    """Reads `scheduler_config.json` (or a folder holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "scheduler_config.json")
    with open(path) as f:
      return cls.from_dict(json.load(f))


def alphas_cumprod(schedule: Schedule) -> jax.Array:
  """abar_t = prod_{s <= t} (1 - beta_s), as diffusers computes it (float32 cumulative product).

  Returns:
    abar_T: [T] float32.
  """
  n = schedule.num_train_timesteps
  if schedule.beta_schedule == "scaled_linear":
    betas = np.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=np.float32) ** 2
  else:
    betas = np.linspace(schedule.beta_start, schedule.beta_end, n, dtype=np.float32)
  return jnp.asarray(np.cumprod(1.0 - betas, dtype=np.float32))


def _coef(values_T: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
  """values[t], shaped to broadcast against `like`: t is a scalar or indexes like's leading axes."""
  t = jnp.asarray(t)
  c = values_T[t].astype(like.dtype)
  return c.reshape(c.shape + (1,) * (like.ndim - c.ndim))


def add_noise(abar_T: jax.Array, z: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """Forward process: z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps (diffusers `add_noise`).

  Args:
    abar_T: [T] from `alphas_cumprod`.
    z: [B, ...] or [...] clean latents.
    eps: noise shaped like z.
    t: int timestep, scalar or [B].

  Returns:
    z_t shaped like z.
  """
  abar = _coef(abar_T, t, z)
  return jnp.sqrt(abar) * z + jnp.sqrt(1.0 - abar) * eps


def velocity(abar_T: jax.Array, z: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """v = sqrt(abar_t) eps - sqrt(1 - abar_t) z (diffusers `get_velocity`); shapes as `add_noise`."""
  abar = _coef(abar_T, t, z)
  return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * z


def v_to_eps(abar_T: jax.Array, z_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """Epsilon from a v-prediction: eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t.

  Follows from z_t = sqrt(abar) z0 + sqrt(1 - abar) eps and v = sqrt(abar) eps - sqrt(1 - abar) z0.
  Shapes as `add_noise`.
  """
  abar = _coef(abar_T, t, z_t)
  return jnp.sqrt(abar) * v + jnp.sqrt(1.0 - abar) * z_t


def eps_from_model_output(
  prediction_type: str, abar_T: jax.Array, z_t: jax.Array, model_output: jax.Array, t: jax.Array
) -> jax.Array:
  """The U-Net's output as an epsilon-prediction, whatever the checkpoint predicts.

  Args:
    prediction_type: "epsilon" (returned as is) or "v_prediction" (converted with `v_to_eps`).
    abar_T: [T].
    z_t: [B, ...] the noisy latents the U-Net saw.
    model_output: shaped like z_t.
    t: scalar or [B].
  """
  if prediction_type == "epsilon":
    return model_output
  if prediction_type == "v_prediction":
    return v_to_eps(abar_T, z_t, model_output, t)
  raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
