"""The DDPM noise schedule of a Stable Diffusion checkpoint and the DDIM updates, as pure functions.

Score distillation only needs the forward process: `abar_t` (diffusers' `alphas_cumprod`),
noising `z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`, and turning a v-prediction back into an
epsilon-prediction. DDIM sampling and inversion (`lusd_jax.inversion`) add the deterministic
(eta = 0) DDIM step, its inverse in Prompt-to-Prompt's convention, and diffusers' "leading" timesteps.
`Schedule` holds the keys of a diffusers `scheduler/scheduler_config.json` that define these;
every other key in that file is ignored.

Example:

  schedule = Schedule.from_json("sd15/scheduler/scheduler_config.json")
  abar_T = alphas_cumprod(schedule)
  z_t = add_noise(abar_T, z, eps, t)
  ts = ddim_timesteps(schedule, 50)  # 981, 961, ..., 1 for SD1.x
  z_prev = ddim_step(schedule, eps, ts[0], ts[0] - ddim_step_ratio(schedule, 50), z_t)
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
    steps_offset: added to every DDIM timestep ("leading" spacing); 1 in every SD checkpoint.
    set_alpha_to_one: whether the DDIM step that lands below t = 0 uses abar = 1 (True) or abar_0
      (False, every SD checkpoint); the same value starts the inversion (the clean latent's level).
    clip_sample: whether a DDIM step clips its predicted x_0 to [-clip_sample_range, clip_sample_range].
    clip_sample_range: the clipping bound.

  The defaults are SD1.x's values (not diffusers' class defaults), so a config that lacks a key reads
  as SD1.x; diffusers' DDIM/PNDM configs always carry these keys.
  """

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"
  steps_offset: int = 1
  set_alpha_to_one: bool = False
  clip_sample: bool = False
  clip_sample_range: float = 1.0

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
    if not 0 <= self.steps_offset < self.num_train_timesteps:
      raise ValueError(f"steps_offset must be in [0, {self.num_train_timesteps}), got {self.steps_offset}")
    if not self.clip_sample_range > 0:
      raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")

  @classmethod
  def from_dict(cls, config: dict[str, Any]) -> Schedule:
    """Builds a schedule from a diffusers scheduler config dict (other samplers' keys are ignored).

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
  return jnp.asarray(_alphas_cumprod_np(schedule))


def _alphas_cumprod_np(schedule: Schedule) -> np.ndarray:
  """`alphas_cumprod` as numpy: concrete also while tracing."""
  n = schedule.num_train_timesteps
  if schedule.beta_schedule == "scaled_linear":
    betas = np.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=np.float32) ** 2
  else:
    betas = np.linspace(schedule.beta_start, schedule.beta_end, n, dtype=np.float32)
  return np.cumprod(1.0 - betas, dtype=np.float32)


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


# ----------------------------------------------------------------------------- DDIM


def ddim_step_ratio(schedule: Schedule, num_inference_steps: int) -> int:
  """T // N: the distance between DDIM timesteps (diffusers' "leading" spacing and P2P)."""
  return schedule.num_train_timesteps // num_inference_steps


def ddim_timesteps(schedule: Schedule, num_inference_steps: int) -> np.ndarray:
  """The DDIM timesteps, high to low, as diffusers' `DDIMScheduler.set_timesteps` ("leading").

  Args:
    schedule: the schedule (`num_train_timesteps`, `steps_offset`).
    num_inference_steps: N, in [1, T].

  Returns:
    [N] int32: (N - 1 - k) * (T // N) + steps_offset for k = 0..N-1 (SD1.x, N = 50: 981, 961, ..., 1).

  Raises:
    ValueError: for N outside [1, T].
  """
  n, big_t = num_inference_steps, schedule.num_train_timesteps
  if not 1 <= n <= big_t:
    raise ValueError(f"num_inference_steps must be in [1, {big_t}], got {n}")
  ratio = ddim_step_ratio(schedule, n)
  return (np.arange(n - 1, -1, -1, dtype=np.int64) * ratio + schedule.steps_offset).astype(np.int32)


def final_alpha_cumprod(schedule: Schedule) -> float:
  """abar "below" t = 0: 1 when `set_alpha_to_one`, else abar_0 (diffusers' `final_alpha_cumprod`)."""
  return 1.0 if schedule.set_alpha_to_one else float(_alphas_cumprod_np(schedule)[0])


def alpha_bar_at(schedule: Schedule, t: jax.Array) -> jax.Array:
  """abar_t for an int timestep, `final_alpha_cumprod` where t < 0; t is clipped to T - 1 above.

  Returns:
    float32 shaped like t.
  """
  abar_T = alphas_cumprod(schedule)
  t = jnp.asarray(t)
  inside = abar_T[jnp.clip(t, 0, schedule.num_train_timesteps - 1)]
  return jnp.where(t >= 0, inside, jnp.float32(final_alpha_cumprod(schedule)))


def _ddim_move(a_from: jax.Array, a_to: jax.Array, eps: jax.Array, x: jax.Array, clip: float | None):
  """x at level abar = a_from -> level a_to along the predicted x_0 and eps (DDIM Eq. 12, eta = 0)."""
  a_from, a_to = a_from.astype(x.dtype), a_to.astype(x.dtype)
  x0 = (x - jnp.sqrt(1.0 - a_from) * eps) / jnp.sqrt(a_from)
  if clip is not None:
    x0 = jnp.clip(x0, -clip, clip)
  return jnp.sqrt(a_to) * x0 + jnp.sqrt(1.0 - a_to) * eps


def ddim_step(
  schedule: Schedule, eps: jax.Array, t: jax.Array, t_prev: jax.Array, x_t: jax.Array
) -> jax.Array:
  """One deterministic DDIM step x_t -> x_{t_prev} (diffusers' `DDIMScheduler.step`, eta = 0).

  UnifyEdit Eq. 3 (alpha meaning abar). The step that lands below t = 0 (t_prev < 0, the last one of
  a "leading" schedule) uses `final_alpha_cumprod`, as diffusers does. The predicted x_0 is clipped
  when `schedule.clip_sample`; eps is not re-derived from the clipped x_0 (diffusers' default).

  Args:
    schedule: the schedule.
    eps: the epsilon-prediction at (x_t, t), shaped like x_t (convert a v-prediction first with
      `eps_from_model_output`).
    t: scalar int timestep of x_t.
    t_prev: scalar int timestep to step to, t - T // N (may be negative).
    x_t: the latent at t.

  Returns:
    x_{t_prev} shaped like x_t.
  """
  clip = schedule.clip_sample_range if schedule.clip_sample else None
  return _ddim_move(alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_prev), eps, x_t, clip)


def ddim_inverse_step(
  schedule: Schedule, eps: jax.Array, t_next: jax.Array, t: jax.Array, x_t: jax.Array
) -> jax.Array:
  """One DDIM inversion step x_t -> x_{t_next}, in Prompt-to-Prompt's convention (`next_step`).

  UnifyEdit Eq. 4. eps is the U-Net evaluated on x_t (the lower noise level) with the higher timestep
  t_next; t = t_next - T // N, and for the first step (t < 0) the clean latent's level is
  `final_alpha_cumprod`. Never clips (as P2P; diffusers' `DDIMInverseScheduler` clips when
  `clip_sample`).

  Args:
    schedule: the schedule.
    eps: the epsilon-prediction at (x_t, t_next), shaped like x_t.
    t_next: scalar int timestep to step to (the U-Net's timestep).
    t: scalar int timestep of x_t, t_next - T // N (negative for the first step).
    x_t: the latent at t.

  Returns:
    x_{t_next} shaped like x_t.
  """
  return _ddim_move(alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_next), eps, x_t, None)
