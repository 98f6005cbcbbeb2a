"""DDIM sampling with classifier-free guidance, DDIM inversion and null-text inversion.

Null-text inversion (Mokady et al., CVPR 2023) as Prompt-to-Prompt's code runs it: invert the photo's
latent z_0 with DDIM (guidance 1, source prompt) to a trajectory z_0 .. z_N; then, walking back from
z_N, optimize the unconditional ("null") text embedding of each step so that the guided DDIM step
lands on the inverted latent one level lower. Guided sampling from z_N with those per-step
embeddings then reconstructs z_0 closely. UnifyEdit starts its two branches from there.

Each phase is an `engine.Method` over one element (`DDIMInversion`, `NullTextOptimization`,
`GuidedSampling`): `engine.run` runs a batch of them in chunks (progress bars, NaN/inf report, mesh).
The functions `ddim_invert`, `null_text_inversion` and `guided_sample` are the same methods' steps in
one jitted scan, for one element: one copy of the math.

Latents are one image's [h, w, c] (vmap for a batch); text embeddings are [L, D]. `unet_fn` is the
project's `UNetFn` (`lusd_jax.lusd.core.FlaxUNet`), static and hashable, as is the `Schedule`.

Example:

  unet_fn = core.FlaxUNet(model.unet_config)
  traj = ddim_invert(unet_fn, params, schedule, z0, ctx_src, num_steps=50)   # [51, h, w, c]
  nti = null_text_inversion(unet_fn, params, schedule, traj, ctx_src, ctx_empty)
  rec = guided_sample(unet_fn, params, schedule, traj[-1], ctx_src, nti.null_embeddings)[0]

  # The same, batched through the engine (inputs with a leading [B] axis):
  out = engine.run(DDIMInversion(unet_fn, schedule, 50), params, InversionInputs(z0_B, ctx_B), keys_B, ())
  traj_B = out.final                                                          # [B, 51, h, w, c]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

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


def _run_whole(method, params, inputs, numeric):
  """One element's `method` over all its steps in one scan: the functional API (no engine, no vmap)."""
  state = method.init(inputs, None, numeric)
  step = functools.partial(method.step, params, inputs, numeric)
  state, _ = jax.lax.scan(step, state, jnp.arange(method.num_steps, dtype=jnp.int32))
  return method.finish(state)


def _all_finite(*xs) -> jax.Array:
  return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in xs])


class StepStats(NamedTuple):
  """Per-step stats of `DDIMInversion` and `GuidedSampling`."""

  finite: jax.Array  # bool: the new latent is finite


class Trajectory(NamedTuple):
  """The carry of `DDIMInversion` and `GuidedSampling`."""

  z: jax.Array  # [h, w, c] float32: the current latent
  trajectory: jax.Array  # [N + 1, h, w, c] float32: the latents by noise level (unvisited levels 0)


class InversionInputs(NamedTuple):
  """One element's inputs of `DDIMInversion`."""

  z0: jax.Array  # [h, w, c] clean latent (VAE mean times scaling_factor)
  ctx: jax.Array  # [L, D] source-prompt embedding


@dataclasses.dataclass(frozen=True)
class DDIMInversion:
  """DDIM inversion with guidance 1 as an `engine.Method` (P2P's `ddim_loop`), one element.

  Step k evaluates the U-Net on z_k with the timestep of level k + 1 and moves with
  `ddim_inverse_step`. Inputs: `InversionInputs`; numeric: unused (pass `()`); carry: `Trajectory`;
  stats: `StepStats`; `finish` returns the [N + 1, h, w, c] trajectory z_0 .. z_N (as `ddim_invert`).

  Attributes:
    unet_fn: `UNetFn` (hashable).
    schedule: `Schedule`.
    num_steps: N.
  """

  unet_fn: Any
  schedule: schedule_lib.Schedule
  num_steps: int

  watched: ClassVar[str] = "the inverted latent"

  def init(self, inputs: InversionInputs, key, numeric) -> Trajectory:
    del key, numeric
    z0 = inputs.z0.astype(jnp.float32)
    traj = jnp.zeros((self.num_steps + 1,) + z0.shape, jnp.float32).at[0].set(z0)
    return Trajectory(z0, traj)

  def step(self, params, inputs: InversionInputs, numeric, state: Trajectory, k):
    del numeric
    t_hi, t_lo = _step_pairs(self.schedule, self.num_steps)
    j = self.num_steps - 1 - k  # inversion walks the sampling steps backwards
    t_next, t = t_hi[j], t_lo[j]
    ctx = inputs.ctx[None].astype(jnp.float32)
    eps = _eps(self.unet_fn, params, self.schedule, state.z, t_next, ctx)[0]
    z = schedule_lib.ddim_inverse_step(self.schedule, eps, t_next, t, state.z)
    return Trajectory(z, state.trajectory.at[k + 1].set(z)), StepStats(_all_finite(z))

  def snapshot(self, state: Trajectory) -> jax.Array:
    return state.z

  def finish(self, state: Trajectory) -> jax.Array:
    return state.trajectory


class SamplingInputs(NamedTuple):
  """One element's inputs of `GuidedSampling`."""

  z_T: jax.Array  # [h, w, c] the latent at the first (highest) DDIM timestep
  ctx_cond: jax.Array  # [L, D] prompt embedding
  null_embeddings: jax.Array  # [N, L, D] the unconditional embedding of each step, high noise first


@dataclasses.dataclass(frozen=True)
class GuidedSampling:
  """Guided DDIM sampling from z_T with per-step null embeddings as an `engine.Method`, one element.

  Inputs: `SamplingInputs`; numeric: the guidance w (a scalar); carry: `Trajectory` (level N holds
  z_T); stats: `StepStats`; `finish` returns [N + 1, h, w, c] in noise-level order (as `guided_sample`:
  [0] is the sample).

  Attributes:
    unet_fn: `UNetFn` (hashable).
    schedule: `Schedule`.
    num_steps: N.
  """

  unet_fn: Any
  schedule: schedule_lib.Schedule
  num_steps: int

  watched: ClassVar[str] = "the sampled latent"

  def init(self, inputs: SamplingInputs, key, numeric) -> Trajectory:
    del key, numeric
    z_T = inputs.z_T.astype(jnp.float32)
    traj = jnp.zeros((self.num_steps + 1,) + z_T.shape, jnp.float32).at[self.num_steps].set(z_T)
    return Trajectory(z_T, traj)

  def step(self, params, inputs: SamplingInputs, guidance, state: Trajectory, k):
    t_hi, t_lo = _step_pairs(self.schedule, self.num_steps)
    t, t_prev = t_hi[k], t_lo[k]
    null = inputs.null_embeddings[k]
    eps = guided_eps(self.unet_fn, params, self.schedule, state.z, t, inputs.ctx_cond, null, guidance)
    z = schedule_lib.ddim_step(self.schedule, eps, t, t_prev, state.z)
    return Trajectory(z, state.trajectory.at[self.num_steps - 1 - k].set(z)), StepStats(_all_finite(z))

  def snapshot(self, state: Trajectory) -> jax.Array:
    return state.z

  def finish(self, state: Trajectory) -> jax.Array:
    return state.trajectory


@functools.partial(jit, static_argnames=("unet_fn", "schedule", "num_steps"))
def ddim_invert(unet_fn, params, schedule, z0_hwc: jax.Array, ctx_LD: jax.Array, *, num_steps: int):
  """DDIM inversion with guidance 1 (the source prompt only): P2P's `ddim_loop` (`DDIMInversion`).

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
  method = DDIMInversion(unet_fn, schedule, num_steps)
  return _run_whole(method, params, InversionInputs(z0_hwc, ctx_LD), ())


@functools.partial(jit, static_argnames=("unet_fn", "schedule"))
def guided_sample(
  unet_fn, params, schedule, zT_hwc: jax.Array, ctx_cond_LD, null_LD: jax.Array, guidance=NTI_GUIDANCE
):
  """Guided DDIM sampling from z_T with a per-step (or one) unconditional embedding (`GuidedSampling`).

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
  method = GuidedSampling(unet_fn, schedule, null_LD.shape[0])
  return _run_whole(method, params, SamplingInputs(zT_hwc, ctx_cond_LD, null_LD), guidance)


class NullTextInversion(NamedTuple):
  """What `null_text_inversion` (and `NullTextOptimization.finish`) returns."""

  null_embeddings: jax.Array  # [N, L, D] float32: the optimized null embedding of each step, high noise first
  inner_steps: jax.Array  # [N] int32: Adam steps taken at each step (1..num_inner_steps)
  losses: jax.Array  # [N] float32: the loss of the last inner step (computed before its update)


class NullTextInputs(NamedTuple):
  """One element's inputs of `NullTextOptimization`."""

  trajectory: jax.Array  # [N + 1, h, w, c] from `ddim_invert`
  ctx_cond: jax.Array  # [L, D] source-prompt embedding
  null: jax.Array  # [L, D] the "" prompt's embedding (the start)


class NullTextNumeric(NamedTuple):
  """One element's numeric settings of `NullTextOptimization` (all traced)."""

  guidance: jax.Array  # w
  num_inner_steps: jax.Array  # int: most Adam steps per step
  epsilon: jax.Array  # early-stop threshold at step 0 (negative: never stop early)

  @classmethod
  def of(cls, guidance=NTI_GUIDANCE, num_inner_steps=NTI_INNER_STEPS, epsilon=NTI_EPSILON):
    """Scalars with the dtypes the compiled program expects (one element; stack for a batch)."""
    return cls(jnp.float32(guidance), jnp.int32(num_inner_steps), jnp.float32(epsilon))


class NullTextState(NamedTuple):
  """The carry of `NullTextOptimization`."""

  z: jax.Array  # [h, w, c] float32: the current (reconstructed) latent
  null: jax.Array  # [L, D] float32: the last step's optimized null embedding
  null_embeddings: jax.Array  # [N, L, D] float32: per-step results so far (0 for steps not run)
  inner_steps: jax.Array  # [N] int32
  losses: jax.Array  # [N] float32


class NullTextStats(NamedTuple):
  """Per-step stats of `NullTextOptimization`."""

  inner_steps: jax.Array  # int32: Adam steps taken
  loss: jax.Array  # float32: the last inner step's loss
  finite: jax.Array  # bool: latent, embedding and loss finite


class _Inner(NamedTuple):
  null: jax.Array  # [L, D] float32
  opt_state: Any
  j: jax.Array  # int32: inner steps taken
  loss: jax.Array  # float32: the last inner step's loss
  stop: jax.Array  # bool: early stop reached


@dataclasses.dataclass(frozen=True)
class NullTextOptimization:
  """Null-text inversion's optimization (P2P's `null_optimization`) as an `engine.Method`, one element.

  Step i is one outer step of `null_text_inversion` (see there). Inputs: `NullTextInputs`; numeric:
  `NullTextNumeric`; carry: `NullTextState`; stats: `NullTextStats`; `finish` returns
  `NullTextInversion`.

  Attributes:
    unet_fn: `UNetFn` (hashable).
    schedule: `Schedule`.
    num_steps: N (the trajectory holds N + 1 latents).
  """

  unet_fn: Any
  schedule: schedule_lib.Schedule
  num_steps: int

  watched: ClassVar[str] = "the null-text embedding, its loss or the latent"

  def init(self, inputs: NullTextInputs, key, numeric) -> NullTextState:
    del key, numeric
    n = self.num_steps
    if inputs.trajectory.shape[0] != n + 1:
      raise ValueError(f"a trajectory of {n + 1} latents is needed, got {inputs.trajectory.shape[0]}")
    null = inputs.null.astype(jnp.float32)
    return NullTextState(
      z=inputs.trajectory[-1].astype(jnp.float32),
      null=null,
      null_embeddings=jnp.zeros((n,) + null.shape, jnp.float32),
      inner_steps=jnp.zeros((n,), jnp.int32),
      losses=jnp.zeros((n,), jnp.float32),
    )

  def step(self, params, inputs: NullTextInputs, numeric: NullTextNumeric, state: NullTextState, i):
    unet_fn, schedule = self.unet_fn, self.schedule
    t_hi, t_lo = _step_pairs(schedule, self.num_steps)
    t, t_prev = t_hi[i], t_lo[i]
    target = inputs.trajectory[self.num_steps - 1 - i].astype(jnp.float32)  # level N - 1 - i
    ctx_cond = inputs.ctx_cond.astype(jnp.float32)
    guidance, z = numeric.guidance, state.z
    params = jax.lax.stop_gradient(params)
    eps_c = _eps(unet_fn, params, schedule, z, t, ctx_cond[None])[0]

    def loss_fn(e):
      eps_u = _eps(unet_fn, params, schedule, z, t, e[None])[0]
      eps = eps_u + guidance * (eps_c - eps_u)
      return jnp.mean((schedule_lib.ddim_step(schedule, eps, t, t_prev, z) - target) ** 2)

    # P2P builds a new torch Adam each step; the traced lr lives in the closure, the state is fresh.
    opt = optax.adam(NTI_LR * (1.0 - i.astype(jnp.float32) / 100.0))
    threshold = numeric.epsilon + i.astype(jnp.float32) * 2e-5

    def inner(s: _Inner) -> _Inner:
      loss, g = jax.value_and_grad(loss_fn)(s.null)
      updates, opt_state = opt.update(g, s.opt_state, s.null)
      return _Inner(optax.apply_updates(s.null, updates), opt_state, s.j + 1, loss, loss < threshold)

    def keep_going(s: _Inner):
      return (s.j < numeric.num_inner_steps) & ~s.stop

    s0 = _Inner(state.null, opt.init(state.null), jnp.int32(0), jnp.float32(jnp.nan), jnp.bool_(False))
    s = jax.lax.while_loop(keep_going, inner, s0)
    eps = guided_eps(unet_fn, params, schedule, z, t, ctx_cond, s.null, guidance)
    z = schedule_lib.ddim_step(schedule, eps, t, t_prev, z)
    state = NullTextState(
      z=z,
      null=s.null,
      null_embeddings=state.null_embeddings.at[i].set(s.null),
      inner_steps=state.inner_steps.at[i].set(s.j),
      losses=state.losses.at[i].set(s.loss),
    )
    return state, NullTextStats(s.j, s.loss, _all_finite(z, s.null, s.loss))

  def snapshot(self, state: NullTextState) -> jax.Array:
    return state.null

  def finish(self, state: NullTextState) -> NullTextInversion:
    return NullTextInversion(state.null_embeddings, state.inner_steps, state.losses)


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
  (`NullTextOptimization` is the same step as an engine method.)

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
  method = NullTextOptimization(unet_fn, schedule, trajectory.shape[0] - 1)
  inputs = NullTextInputs(trajectory, ctx_cond_LD, null_LD)
  return _run_whole(method, params, inputs, NullTextNumeric.of(guidance, num_inner_steps, epsilon))
