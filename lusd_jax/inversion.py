"""DDIM sampling with classifier-free guidance, DDIM inversion and null-text inversion, as jitted scans.

Null-text inversion (Mokady et al., CVPR 2023) as Prompt-to-Prompt's code runs it: invert the photo's
latent z_0 with DDIM (guidance 1, source prompt) to a trajectory z_0 .. z_N; then, walking back from
z_N, optimize the unconditional ("null") text embedding of each step so that the guided DDIM step
lands on the inverted latent one level lower. Guided sampling from z_N with those per-step
embeddings then reconstructs z_0 closely. UnifyEdit starts its two branches from there.

Latents are one image's [h, w, c] (vmap for a batch); text embeddings are [L, D]. `unet_fn` is the
project's `UNetFn` (`lusd_jax.lusd.core.FlaxUNet`), static and hashable, as is the `Schedule`.

Example:

  unet_fn = core.FlaxUNet(model.unet_config)
  traj = ddim_invert(unet_fn, params, schedule, z0, ctx_src, num_steps=50)   # [51, h, w, c]
  nti = null_text_inversion(unet_fn, params, schedule, traj, ctx_src, ctx_empty)
  rec = guided_sample(unet_fn, params, schedule, traj[-1], ctx_src, nti.null_embeddings)[-1]
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lusd_jax import schedule as schedule_lib
from lusd_jax.compiler import jit

# Prompt-to-Prompt's null-text inversion defaults.
NTI_GUIDANCE = 7.5
NTI_INNER_STEPS = 10
NTI_EPSILON = 1e-5
NTI_LR = 1e-2


def _eps(unet_fn, params, schedule, z_hwc, t, ctx_BLD) -> jax.Array:
  """eps [B, h, w, c] float32 of one U-Net call: the one latent row is shared by the B contexts."""
  sample = z_hwc[None]
  t_1 = jnp.reshape(jnp.asarray(t, jnp.int32), (1,))
  out, _ = unet_fn(params, sample, t_1, ctx_BLD, None)
  abar_T = schedule_lib.alphas_cumprod(schedule)
  return schedule_lib.eps_from_model_output(
    schedule.prediction_type, abar_T, sample, out.astype(jnp.float32), t_1
  )


def guided_eps(
  unet_fn, params, schedule, z_hwc: jax.Array, t: jax.Array, ctx_cond_LD, ctx_uncond_LD, guidance
) -> jax.Array:
  """Classifier-free guidance: eps_u + w (eps_c - eps_u), from one U-Net call on [uncond, cond].

  Args:
    unet_fn: `UNetFn`.
    params: its parameters.
    schedule: the checkpoint's `Schedule` (a v-prediction is converted to eps).
    z_hwc: [h, w, c] latent at timestep t.
    t: scalar int timestep.
    ctx_cond_LD: [L, D] prompt embedding.
    ctx_uncond_LD: [L, D] unconditional (null) embedding.
    guidance: w (scalar, may be traced).

  Returns:
    [h, w, c] float32 guided epsilon.
  """
  ctx = jnp.stack([ctx_uncond_LD, ctx_cond_LD]).astype(jnp.float32)
  eps_u, eps_c = _eps(unet_fn, params, schedule, z_hwc, t, ctx)
  return eps_u + guidance * (eps_c - eps_u)


def _step_pairs(schedule, num_steps: int) -> tuple[jax.Array, jax.Array]:
  """(t, t - T // N) for each sampling step, high noise first: [N] int32 each."""
  ts = schedule_lib.ddim_timesteps(schedule, num_steps)
  ratio = schedule_lib.ddim_step_ratio(schedule, num_steps)
  return jnp.asarray(ts), jnp.asarray(ts - ratio)


@functools.partial(jit, static_argnames=("unet_fn", "schedule", "num_steps"))
def ddim_invert(unet_fn, params, schedule, z0_hwc: jax.Array, ctx_LD: jax.Array, *, num_steps: int):
  """DDIM inversion with guidance 1 (the source prompt only): P2P's `ddim_loop`.

  Step k evaluates the U-Net on z_k with the timestep of level k + 1 and moves with
  `ddim_inverse_step`.

  Args:
    unet_fn: `UNetFn` (static).
    params: its parameters.
    schedule: `Schedule` (static).
    z0_hwc: [h, w, c] clean latent (VAE mean times scaling_factor).
    ctx_LD: [L, D] source-prompt embedding.
    num_steps: N (static).

  Returns:
    [N + 1, h, w, c] float32: z_0 (the input), z_1, ..., z_N = z_T; z_k sits at the timestep
    `ddim_timesteps(schedule, N)[N - k]` for k >= 1.
  """
  t_hi, t_lo = _step_pairs(schedule, num_steps)
  z0 = z0_hwc.astype(jnp.float32)

  def body(z, ts):
    t_next, t = ts
    eps = _eps(unet_fn, params, schedule, z, t_next, ctx_LD[None].astype(jnp.float32))[0]
    z = schedule_lib.ddim_inverse_step(schedule, eps, t_next, t, z)
    return z, z

  _, zs = jax.lax.scan(body, z0, (t_hi[::-1], t_lo[::-1]))
  return jnp.concatenate([z0[None], zs])


@functools.partial(jit, static_argnames=("unet_fn", "schedule"))
def guided_sample(
  unet_fn, params, schedule, zT_hwc: jax.Array, ctx_cond_LD, null_LD: jax.Array, guidance=NTI_GUIDANCE
):
  """Guided DDIM sampling from z_T with a per-step (or one) unconditional embedding.

  The number of steps N is null_LD's leading axis when it is [N, L, D] (null-text inversion's
  embeddings); pass `jnp.broadcast_to(e, (N,) + e.shape)` for one embedding at every step.

  Args:
    unet_fn: `UNetFn` (static).
    params: its parameters.
    schedule: `Schedule` (static).
    zT_hwc: [h, w, c] the latent at the first (highest) DDIM timestep.
    ctx_cond_LD: [L, D] prompt embedding.
    null_LD: [N, L, D] the unconditional embedding of each step, high noise first.
    guidance: w (may be traced).

  Returns:
    [N + 1, h, w, c] float32 in the noise-level order of `ddim_invert`: index k is the latent at
    level k, so [0] is the sample and [N] is z_T.
  """
  num_steps = null_LD.shape[0]
  t_hi, t_lo = _step_pairs(schedule, num_steps)
  zT = zT_hwc.astype(jnp.float32)

  def body(z, xs):
    t, t_prev, null = xs
    eps = guided_eps(unet_fn, params, schedule, z, t, ctx_cond_LD, null, guidance)
    z = schedule_lib.ddim_step(schedule, eps, t, t_prev, z)
    return z, z

  _, zs = jax.lax.scan(body, zT, (t_hi, t_lo, null_LD))
  return jnp.concatenate([zs[::-1], zT[None]])


class NullTextInversion(NamedTuple):
  """What `null_text_inversion` returns."""

  null_embeddings: jax.Array  # [N, L, D] float32: the optimized null embedding of each step, high noise first
  inner_steps: jax.Array  # [N] int32: Adam steps taken at each step (1..num_inner_steps)
  losses: jax.Array  # [N] float32: the loss of the last inner step (computed before its update)


class _Inner(NamedTuple):
  null: jax.Array  # [L, D] float32
  opt_state: Any
  j: jax.Array  # int32: inner steps taken
  loss: jax.Array  # float32: the last inner step's loss
  stop: jax.Array  # bool: early stop reached


@functools.partial(jit, static_argnames=("unet_fn", "schedule"))
def null_text_inversion(
  unet_fn,
  params,
  schedule,
  trajectory: jax.Array,
  ctx_cond_LD: jax.Array,
  null_LD: jax.Array,
  num_inner_steps=NTI_INNER_STEPS,
  guidance=NTI_GUIDANCE,
  epsilon=NTI_EPSILON,
) -> NullTextInversion:
  """Null-text inversion (Mokady et al.), as Prompt-to-Prompt's `null_optimization`.

  At step i (timestep t_i, high noise first), from the current latent z (z_N at i = 0):
  Adam (fresh state, lr = 1e-2 (1 - i / 100)) on the null embedding, starting from step i - 1's
  result (from null_LD at i = 0), minimizes MSE(ddim_step(guided eps(z, t_i; null)), z*_{N-i-1}) with
  z* the inverted trajectory; each inner step applies its update, then stops early when its
  (pre-update) loss < epsilon + i * 2e-5, after at most num_inner_steps steps. Then z advances with
  the guided step and the final null embedding. The conditional eps is computed once per step.

  Args:
    unet_fn: `UNetFn` (static).
    params: its parameters (not differentiated).
    schedule: `Schedule` (static).
    trajectory: [N + 1, h, w, c] from `ddim_invert`.
    ctx_cond_LD: [L, D] source-prompt embedding.
    null_LD: [L, D] the "" prompt's embedding (the start).
    num_inner_steps: most Adam steps per step (may be traced).
    guidance: w (may be traced).
    epsilon: early-stop threshold at step 0 (may be traced).

  Returns:
    `NullTextInversion`.
  """
  num_steps = trajectory.shape[0] - 1
  t_hi, t_lo = _step_pairs(schedule, num_steps)
  traj = trajectory.astype(jnp.float32)
  ctx_cond = ctx_cond_LD.astype(jnp.float32)
  params = jax.lax.stop_gradient(params)

  def outer(carry, xs):
    z, null = carry
    i, t, t_prev, target = xs
    eps_c = _eps(unet_fn, params, schedule, z, t, ctx_cond[None])[0]

    def loss_fn(e):
      eps_u = _eps(unet_fn, params, schedule, z, t, e[None])[0]
      eps = eps_u + guidance * (eps_c - eps_u)
      return jnp.mean((schedule_lib.ddim_step(schedule, eps, t, t_prev, z) - target) ** 2)

    # P2P builds a new torch Adam each step; the traced lr lives in the closure, the state is fresh.
    opt = optax.adam(NTI_LR * (1.0 - i.astype(jnp.float32) / 100.0))
    threshold = epsilon + i.astype(jnp.float32) * 2e-5

    def inner(s: _Inner) -> _Inner:
      loss, g = jax.value_and_grad(loss_fn)(s.null)
      updates, opt_state = opt.update(g, s.opt_state, s.null)
      return _Inner(optax.apply_updates(s.null, updates), opt_state, s.j + 1, loss, loss < threshold)

    def keep_going(s: _Inner):
      return (s.j < num_inner_steps) & ~s.stop

    s0 = _Inner(null, opt.init(null), jnp.int32(0), jnp.float32(jnp.nan), jnp.bool_(False))
    s = jax.lax.while_loop(keep_going, inner, s0)
    eps = guided_eps(unet_fn, params, schedule, z, t, ctx_cond, s.null, guidance)
    z = schedule_lib.ddim_step(schedule, eps, t, t_prev, z)
    return (z, s.null), (s.null, s.j, s.loss)

  i_N = jnp.arange(num_steps, dtype=jnp.int32)
  targets = traj[:-1][::-1]  # step i lands on level N - 1 - i
  _, (nulls, counts, losses) = jax.lax.scan(
    outer, (traj[-1], null_LD.astype(jnp.float32)), (i_N, t_hi, t_lo, targets)
  )
  return NullTextInversion(nulls, counts, losses)
