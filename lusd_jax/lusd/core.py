"""The LUSD optimization (paper Algorithm 1) on latents and text embeddings, as pure functions.

(Over 450 lines on purpose: Algorithm 1's step, the `LUSD` engine method that wraps it and the thin
batch builders over the engine belong together; splitting them would scatter one algorithm.)

One step k of Algorithm 1 for one seed:

  eta = eta_0; draw t                                    (official preset: t redrawn with eps)
  repeat: draw eps; z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
          one U-Net call -> g (SBP: eps_tgt - eps_src), attention maps of the target row
          accept if std(g) >= eta, else eta *= decay     (filtered resampling, at most max_attempts)
  M = attention mask of the accepted call (Alg. 2)       (official preset: of step k-1's call)
  M_k = (1 - alpha) M_{k-1} + alpha M;  M_hat = beta_k M_k + (1 - beta_k)
  d = (1 - lambda) M_hat * g + lambda (z - z_src)        (Eq. 5, spatial regularization)
  d = gamma_k d / std(d)                                 (Eq. 4, normalization and annealing)
  z <- optax.sgd(lr * 2000) step with gradient d / (h w)

Shape of the program: `run_steps` is a `lax.scan` over steps whose carry is an `EditState`; the
resampling loop is a `lax.while_loop`; both are `vmap`ped over seeds (each seed its own key; the
while loop runs until every seed has accepted). Prompts, edit-token weights, keys and every
numeric hyperparameter are traced, so one compiled program serves every edit of a model config,
latent size and number of seeds. `optimize` is the host-side driver: it runs the steps in chunks
(progress, snapshots), and raises `NonFiniteError` naming the step and seed of a NaN/inf.

Example:

  unet_fn = FlaxUNet(unet_config)
  inputs = EditInputs(z_src_HWC, ctx_src_LD, ctx_tgt_LD, edit_mask_L)
  keys_S = jax.vmap(jax.random.key)(jnp.arange(3))
  out = optimize(unet_fn, unet_params, inputs, keys_S, LUSDConfig(), schedule=schedule)
  out.z  # [3, h, w, 4]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lusd_jax import engine, sharding
from lusd_jax import schedule as schedule_lib
from lusd_jax.compiler import jit
from lusd_jax.lusd import gradients
from lusd_jax.lusd import mask as mask_lib
from lusd_jax.lusd.config import LUSDConfig, LUSDNumeric, LUSDStatic
from lusd_jax.models import unet as unet_lib

# unet_fn(params, sample_BHWC, timesteps_B, context_BLD, capture) -> (out_BHWC, AttentionMaps);
# a static (hashable) callable. out is what the checkpoint predicts (eps or v), with context's batch
# B; sample and timesteps have B rows, or one row shared by all B prompts (the SBP call).
UNetFn = Callable[..., tuple[jax.Array, unet_lib.AttentionMaps]]
# noise_fn(key, step, attempt) -> (t int32 [], eps float32 [h, w, c]); a static (hashable) callable.
NoiseFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class FlaxUNet:
  """`UNetFn` of the project's Flax U-Net: hashable, so equal configs share compiled programs.

  The output is in `dtype`; the loop casts it to float32 before computing g = eps_tgt - eps_src, so
  g and std(g) (the filter's statistic and Eq. 4's normalizer) are float32 under every dtype, whereas
  the official code, under fp16 autocast, computes them from fp16 outputs in fp16
  (`benchmarks/precision.py` measures what a half-precision U-Net changes).

  Attributes:
    config: the U-Net's config.
    dtype: activation dtype name ("float32", "bfloat16", "float16"); for a loaded model,
      `SDModel.unet_dtype` (a dtype policy such as "mixed-bfloat16" is not a dtype).
    attention_impl: `dot_product_attention` implementation for uncaptured layers.
  """

  config: unet_lib.UNetConfig
  dtype: str = "float32"
  attention_impl: str = "auto"

  def __call__(self, params, sample_BHWC, timesteps_B, context_BLD, capture):
    dtype = jnp.dtype(self.dtype)
    impl = self.attention_impl
    if impl == "auto" and dtype == jnp.float16 and jax.default_backend() == "cpu":
      # XLA:CPU cannot compile the float16 dots with float32 accumulation of jax.nn's attention
      # ("auto" picks it for short sequences); the chunked path runs, with float32 scores.
      impl = "chunked"
    model = unet_lib.UNet2DConditionModel(self.config, dtype, impl)
    return model.apply(
      {"params": params}, sample_BHWC.astype(dtype), timesteps_B, context_BLD.astype(dtype), capture=capture
    )


class EditInputs(NamedTuple):
  """What one edit optimizes (traced)."""

  z_src: jax.Array  # [h, w, c] float32: VAE posterior mean of x_src times scaling_factor
  ctx_src: jax.Array  # [L, D] text embeddings of the source prompt
  ctx_tgt: jax.Array  # [L, D] text embeddings of the target prompt
  edit_mask: jax.Array  # [L] float32: 1 at the edit tokens E of the target prompt, else 0


class EditState(NamedTuple):
  """The scan carry of one seed (batched over seeds: a leading [S] axis on every leaf)."""

  z: jax.Array  # [h, w, c] float32, the latent being optimized
  mask_ema: jax.Array  # [h, w] float32, M_k (ones until the first mask)
  mask_ready: jax.Array  # bool, M_k holds a mask (the moving average is initialised)
  prev_mask: jax.Array  # [h, w] float32, official preset: raw mask of the last accepted call
  prev_ready: jax.Array  # bool, prev_mask holds a mask
  opt_state: optax.OptState
  key: jax.Array  # PRNG key of this seed


class StepStats(NamedTuple):
  """Per-step record of one seed (stacked: [S, num_steps])."""

  t: jax.Array  # int32, the timestep of the used draw (-1 for an inactive padding step)
  rejections: jax.Array  # int32, draws rejected before the used one
  hit_max_attempts: jax.Array  # bool, no draw passed the filter within max_attempts
  finite: jax.Array  # bool, g and the updated z are free of NaN/inf
  grad_std: jax.Array  # float32, std(g) of the used draw
  threshold: jax.Array  # float32, eta when the loop ended
  zero_gradient: jax.Array  # bool, the used draw's g was exactly zero (redraws ended at once)


def default_noise(key, step, attempt, *, t_lo, t_hi, shape):
  """The default draw: t ~ U{t_lo, ..., t_hi - 1}, eps ~ N(0, I), from fold_in(key, step, attempt)."""
  k = jax.random.fold_in(jax.random.fold_in(key, step), attempt)
  k_t, k_eps = jax.random.split(k)
  t = jax.random.randint(k_t, (), t_lo, t_hi, dtype=jnp.int32)
  return t, jax.random.normal(k_eps, shape, jnp.float32)


def _optimizer(numeric: LUSDNumeric) -> optax.GradientTransformation:
  # The official code minimizes sum(d * z) / (h w) scaled by 2000 with SGD(lr): the gradient is
  # d / (h w) and the effective learning rate lr * 2000.
  return optax.sgd(numeric.lr * numeric.loss_scale)


def gamma_schedule(numeric: LUSDNumeric, k: jax.Array, num_steps: int) -> jax.Array:
  """Annealing gamma_k: gamma_low + (gamma_high - gamma_low) (1 - sigmoid(linspace(-s, s, N)[k]))."""
  frac = k / (num_steps - 1) if num_steps > 1 else jnp.zeros_like(k, jnp.float32)
  s_k = -numeric.speed + 2.0 * numeric.speed * frac
  return numeric.ds_low + (numeric.ds_high - numeric.ds_low) * (1.0 - jax.nn.sigmoid(s_k))


def beta_schedule(numeric: LUSDNumeric, k: jax.Array, num_steps: int) -> jax.Array:
  """Mask strength beta at step index k = 0..N-1.

  Paper (Alg. 1, steps numbered k = 1..N): beta_k = k / N, i.e. (k + 1) / N for the 0-based index,
  so the last step uses the full mask. Official code: linspace(0, 1, N)[k] = k / (N - 1).
  """
  linspace = k / (num_steps - 1) if num_steps > 1 else jnp.zeros_like(k, jnp.float32)
  return jnp.where(numeric.beta_linspace, linspace, (k + 1) / num_steps)


def capture_spec(static: LUSDStatic, latent_hw: tuple[int, int]) -> unet_lib.CaptureSpec:
  """Self maps at half the latent, cross maps at a quarter, from the target-prompt row."""
  row = gradients.target_row(static.gradient)
  return unet_lib.CaptureSpec(self_res=latent_hw[0] // 2, cross_res=latent_hw[0] // 4, batch=(row, row + 1))


def _std(x: jax.Array) -> jax.Array:
  """Bessel-corrected standard deviation over all elements (torch.std)."""
  return jnp.std(x, ddof=1)


class _Draw(NamedTuple):
  """The while-loop carry of the filtered resampling."""

  attempts: jax.Array  # int32, U-Net calls made
  eta: jax.Array  # float32, current threshold
  accepted: jax.Array  # bool
  t: jax.Array  # int32
  g: jax.Array  # [h, w, c] float32
  self_attn: jax.Array  # [N_s, N_s] float32
  cross_attn: jax.Array  # [N_c, L] float32
  grad_std: jax.Array  # float32
  zero_g: jax.Array  # bool, g is exactly zero


def _seed_step(
  state: EditState,
  k: jax.Array,
  *,
  unet_fn: UNetFn,
  params: Any,
  inputs: EditInputs,
  numeric: LUSDNumeric,
  static: LUSDStatic,
  abar_T: jax.Array,
  prediction_type: str,
  noise_fn: NoiseFn | None,
) -> tuple[EditState, StepStats]:
  """One step k of Algorithm 1 for one seed; a no-op when k >= num_steps (chunk padding)."""
  z, z_src = state.z, inputs.z_src.astype(jnp.float32)
  h, w = z.shape[:2]
  active = k < static.num_steps
  family = static.gradient
  capture = capture_spec(static, (h, w))
  # Table 4, "no spatial regularization": lambda = 0 and M = 1.
  lam = jnp.where(numeric.spatial_reg, numeric.reg_scale, 0.0)

  if noise_fn is None:
    # Official code: torch.randint(t_min, min(t_max, T) - 1); paper: t in {t_min, ..., t_max - 1}.
    t_hi = jnp.minimum(numeric.t_max, abar_T.shape[0]) - numeric.official_t_range.astype(jnp.int32)
    noise_fn = functools.partial(default_noise, t_lo=numeric.t_min, t_hi=t_hi, shape=z.shape)

  def evaluate(t, eps):
    sample_BHWC, t_B, ctx_BLD = gradients.unet_batch(
      family, abar_T, z, z_src, eps, t, inputs.ctx_src, inputs.ctx_tgt
    )
    out_BHWC, maps = unet_fn(params, sample_BHWC, t_B, ctx_BLD, capture)
    eps_BHWC = schedule_lib.eps_from_model_output(
      prediction_type, abar_T, sample_BHWC, out_BHWC.astype(jnp.float32), t_B
    )
    g = gradients.gradient(family, eps_BHWC, eps)
    return g, maps.self_attn[0].astype(jnp.float32), maps.cross_attn[0].astype(jnp.float32)

  # Filtered resampling (Alg. 1): redraw eps until std(g) >= eta, decaying eta on each rejection.
  def keep_drawing(d: _Draw):
    return active & ~d.accepted & (d.attempts < numeric.max_attempts)

  def draw(d: _Draw) -> _Draw:
    t_new, eps = noise_fn(state.key, k, d.attempts)
    # Paper: t is drawn once per step; official code: t is redrawn with eps.
    t = jnp.where(numeric.redraw_t_on_reject | (d.attempts == 0), jnp.asarray(t_new, jnp.int32), d.t)
    g, self_attn, cross_attn = evaluate(t, eps)
    std_g = _std(g)
    ok = ~numeric.filtering | (std_g >= d.eta)
    ok = ok | ~jnp.isfinite(std_g)  # a NaN never passes: stop drawing, report it after the step
    ok = ok | (numeric.accept_zero_direction & jnp.all((1.0 - lam) * g + lam * (z - z_src) == 0))
    # Safety net: g exactly 0 means the U-Net sees no difference between the prompts; every redraw
    # would give 0 again, so end the step's redraws now (counted in StepStats.zero_gradient).
    zero_g = jnp.all(g == 0)
    ok = ok | zero_g
    eta = jnp.where(ok, d.eta, d.eta * numeric.threshold_decay_rate)
    return _Draw(d.attempts + 1, eta, ok, t, g, self_attn, cross_attn, std_g, zero_g)

  n_self, n_cross = (h // 2) * (w // 2), (h // 4) * (w // 4)
  init = _Draw(
    attempts=jnp.int32(0),
    eta=numeric.threshold.astype(jnp.float32),
    accepted=jnp.bool_(False),
    t=jnp.int32(0),
    g=jnp.zeros_like(z),
    self_attn=jnp.zeros((n_self, n_self), jnp.float32),
    cross_attn=jnp.zeros((n_cross,) + inputs.edit_mask.shape, jnp.float32),
    grad_std=jnp.float32(0.0),
    zero_g=jnp.bool_(False),
  )
  d = jax.lax.while_loop(keep_drawing, draw, init)
  g = d.g

  # Attention mask (Alg. 2) of the accepted call; M = 1 without edit tokens.
  m_raw = mask_lib.attention_mask(d.self_attn, d.cross_attn, inputs.edit_mask, (h, w))
  # Official code: the mask of step k is built from step k-1's accepted call (none at step 0).
  lagged = numeric.mask_from_previous_step
  m_new = jnp.where(lagged, state.prev_mask, m_raw)
  m_new_ready = ~lagged | state.prev_ready
  update = (jnp.sum(inputs.edit_mask) > 0) & m_new_ready
  # Moving average M_k = (1 - alpha) M_{k-1} + alpha M, initialised by the first mask.
  alpha = numeric.cross_attn_momentum
  ema = jnp.where(state.mask_ready, (1.0 - alpha) * state.mask_ema + alpha * m_new, m_new)
  mask_ema = jnp.where(update, ema, state.mask_ema)
  mask_ready = state.mask_ready | update
  beta = beta_schedule(numeric, k, static.num_steps)
  m_hat = beta * jnp.where(mask_ready, mask_ema, 1.0) + (1.0 - beta)
  m_hat = jnp.where(numeric.spatial_reg, m_hat, 1.0)

  # LUSD Eq. 5: localized gradient plus the pull back to the source latent.
  direction = (1.0 - lam) * (m_hat[..., None] * g) + lam * (z - z_src)
  # LUSD Eq. 4: normalize by std (skipped for an all-zero update), anneal by gamma_k.
  nonzero = jnp.any(direction != 0)
  divide = numeric.normalize & nonzero
  direction = direction / jnp.where(divide, _std(direction), 1.0)
  gamma = gamma_schedule(numeric, k, static.num_steps)
  direction = jnp.where(numeric.anneal, gamma, 1.0) * direction

  optimizer = _optimizer(numeric)
  updates, opt_state = optimizer.update(direction / (h * w), state.opt_state, z)
  z_new = optax.apply_updates(z, updates)

  # Padding steps (k >= N) leave the carry as it was; the key never changes.
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
  new_state = EditState(
    z=keep(z_new, z),
    mask_ema=keep(mask_ema, state.mask_ema),
    mask_ready=keep(mask_ready, state.mask_ready),
    prev_mask=keep(m_raw, state.prev_mask),
    prev_ready=keep(jnp.bool_(True), state.prev_ready),
    opt_state=keep(opt_state, state.opt_state),
    key=state.key,
  )
  stats = StepStats(
    t=jnp.where(active, d.t, -1),
    rejections=jnp.maximum(d.attempts - 1, 0),
    hit_max_attempts=active & ~d.accepted,
    finite=~active | (jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(z_new))),
    grad_std=d.grad_std,
    threshold=d.eta,
    zero_gradient=active & d.zero_g,
  )
  return new_state, stats


def _init_one(inputs: EditInputs, key: jax.Array, numeric: LUSDNumeric) -> EditState:
  """The carry of one element before step 0: z = z_src, no mask yet."""
  z = inputs.z_src.astype(jnp.float32)
  ones = jnp.ones(z.shape[:2], jnp.float32)
  return EditState(z, ones, jnp.bool_(False), ones, jnp.bool_(False), _optimizer(numeric).init(z), key)


@dataclasses.dataclass(frozen=True)
class LUSD:
  """LUSD as an `engine.Method`: Algorithm 1 for one element, the engine vmaps and scans it.

  Hashable (a jit static argument): equal U-Nets, configs and schedules share compiled programs.

  Attributes:
    unet_fn: `UNetFn`, e.g. `FlaxUNet(config)`.
    static: `LUSDStatic` (num_steps, gradient family).
    schedule: the checkpoint's `Schedule`.
    noise_fn: optional replayable draw `noise_fn(key, step, attempt) -> (t, eps)`.
  """

  unet_fn: UNetFn
  static: LUSDStatic
  schedule: schedule_lib.Schedule
  noise_fn: NoiseFn | None = None

  watched: ClassVar[str] = "the gradient g or the latent z"

  @property
  def num_steps(self) -> int:
    return self.static.num_steps

  def init(self, inputs: EditInputs, key: jax.Array, numeric: LUSDNumeric) -> EditState:
    return _init_one(inputs, key, numeric)

  def step(self, params, inputs: EditInputs, numeric: LUSDNumeric, state: EditState, k: jax.Array):
    return _seed_step(
      state,
      k,
      unet_fn=self.unet_fn,
      params=params,
      inputs=inputs,
      numeric=numeric,
      static=self.static,
      abar_T=schedule_lib.alphas_cumprod(self.schedule),
      prediction_type=self.schedule.prediction_type,
      noise_fn=self.noise_fn,
    )

  def snapshot(self, state: EditState) -> tuple[jax.Array, jax.Array]:
    return state.z, state.mask_ema  # [h, w, c], M_k [h, w]

  def finish(self, state: EditState) -> tuple[jax.Array, jax.Array]:
    return state.z, state.mask_ema


@jit
def init_state(inputs: EditInputs, keys_S: jax.Array, numeric: LUSDNumeric) -> EditState:
  """The carry before step 0 of every seed of one edit: z = z_src, no mask yet.

  Args:
    inputs: `EditInputs` (shared by the seeds).
    keys_S: [S] PRNG keys, one per seed.
    numeric: `LUSDNumeric` (the learning rate sets up the optimizer state).

  Returns:
    `EditState` with a leading [S] axis.
  """
  return jax.vmap(lambda key: _init_one(inputs, key, numeric))(keys_S)


def run_steps(unet_fn, params, inputs, state_S, k0, numeric, *, static, schedule, num, noise_fn=None):
  """Runs steps k0, ..., k0 + num - 1 of Algorithm 1 for every seed of one edit (steps >= N: no-ops).

  The engine's program (`engine.run_chunk`) on the seeds as elements of a batch that shares the
  inputs and numerics: compiled once per (unet_fn, static, schedule, num, noise_fn, shapes); k0,
  prompts, edit mask, keys and numerics are traced.

  Args:
    unet_fn: `UNetFn` (static, hashable), e.g. `FlaxUNet(config)`.
    params: the U-Net params pytree.
    inputs: `EditInputs`.
    state_S: `EditState` [S] from `init_state` or a previous `run_steps`.
    k0: int, first step index (traced).
    numeric: `LUSDNumeric`.
    static: `LUSDStatic`.
    schedule: `Schedule`.
    num: steps to run (static).
    noise_fn: optional `NoiseFn` replacing the default draw of (t, eps).

  Returns:
    (state_S, StepStats with leaves [S, num]).
  """
  s = state_S.key.shape[0]
  return engine.run_chunk(
    LUSD(unet_fn, static, schedule, noise_fn), params, sharding.broadcast_batch(inputs, s), state_S, k0,
    sharding.broadcast_batch(numeric, s), num=num,
  )  # fmt: skip


def edit_latents(unet_fn, params, inputs, keys_S, numeric, *, static, schedule, noise_fn=None):
  """The whole optimization as one pure function (vmappable over a stacked `numeric` for sweeps).

  Args:
    unet_fn, params, inputs, numeric, static, schedule, noise_fn: as `run_steps`.
    keys_S: [S] PRNG keys.

  Returns:
    (final EditState [S], StepStats [S, N]). Non-finite steps are reported in `StepStats.finite`,
    not raised (use `optimize` for the checked host-side driver).
  """
  state_S = init_state(inputs, keys_S, numeric)
  return run_steps(
    unet_fn, params, inputs, state_S, 0, numeric, static=static, schedule=schedule, num=static.num_steps,
    noise_fn=noise_fn,
  )  # fmt: skip


NonFiniteError = engine.NonFiniteError


class EditOutput(NamedTuple):
  """Host-side result of `optimize` / `optimize_batch` (numpy; B elements, N steps, K snapshots)."""

  z: np.ndarray  # [B, h, w, c] final latents
  mask: np.ndarray  # [B, h, w] final moving-average mask M_N (ones without edit tokens)
  t: np.ndarray  # [B, N] timestep used at each step
  rejections: np.ndarray  # [B, N] rejected draws at each step
  hit_max_attempts: np.ndarray  # [B, N] bool
  grad_std: np.ndarray  # [B, N] std(g) of the used draw
  zero_gradient: np.ndarray  # [B, N] bool, g was exactly zero (redraws ended at once)
  snapshot_steps: tuple[int, ...]  # [K] steps completed at each snapshot
  z_snapshots: np.ndarray | None  # [B, K, h, w, c]
  mask_snapshots: np.ndarray | None  # [B, K, h, w] M_k at each snapshot


def optimize_batch(
  unet_fn: UNetFn,
  params: Any,
  inputs_B: EditInputs,
  keys_B: jax.Array,
  numeric_B: LUSDNumeric,
  *,
  static: LUSDStatic,
  schedule: schedule_lib.Schedule,
  mesh=None,
  batch_size: int | None = None,
  noise_fn: NoiseFn | None = None,
  snapshot_every: int | None = None,
  chunk_size: int | None = None,
  ids: Sequence[str] | None = None,
  on_chunk: Callable[[int, EditState, StepStats], None] | None = None,
) -> EditOutput:
  """Runs B LUSD edits (seeds, sweep cells, images: each element its own inputs, key and numerics).

  `engine.run` with the `LUSD` method; the arguments are `engine.run`'s, plus:

  Args:
    unet_fn: `UNetFn`, e.g. `FlaxUNet(config)`.
    inputs_B: `EditInputs` with leaves [B, ...] (`sharding.broadcast_batch` one shared input).
    numeric_B: `LUSDNumeric` with leaves [B] (`broadcast_batch(config.numeric(), B)`, or configs
      repeated per seed for a sweep).
    static: `LUSDStatic` shared by the batch.
    schedule: the checkpoint's `Schedule`.
    noise_fn: optional replayable draw `noise_fn(key, step, attempt) -> (t, eps)`.

  Returns:
    `EditOutput` with a leading [B] axis.

  Raises:
    NonFiniteError: naming the first step and element whose g or z holds NaN/inf.
  """
  out = engine.run(
    LUSD(unet_fn, static, schedule, noise_fn), params, inputs_B, keys_B, numeric_B, mesh=mesh,
    batch_size=batch_size, chunk_size=chunk_size, snapshot_every=snapshot_every, ids=ids, on_chunk=on_chunk,
  )  # fmt: skip
  z, mask = out.final
  z_snaps, mask_snaps = out.snapshots if out.snapshots is not None else (None, None)
  return EditOutput(
    z=z,
    mask=mask,
    t=out.stats.t,
    rejections=out.stats.rejections,
    hit_max_attempts=out.stats.hit_max_attempts,
    grad_std=out.stats.grad_std,
    zero_gradient=out.stats.zero_gradient,
    snapshot_steps=out.snapshot_steps,
    z_snapshots=z_snaps,
    mask_snapshots=mask_snaps,
  )


def optimize(
  unet_fn: UNetFn,
  params: Any,
  inputs: EditInputs,
  keys_S: jax.Array,
  config: LUSDConfig,
  *,
  schedule: schedule_lib.Schedule,
  mesh=None,
  numeric: LUSDNumeric | None = None,
  noise_fn: NoiseFn | None = None,
  snapshot_every: int | None = None,
  chunk_size: int | None = None,
  seed_ids: Sequence[Any] | None = None,
  on_chunk: Callable[[int, EditState, StepStats], None] | None = None,
) -> EditOutput:
  """Runs LUSD on the latents of one edit, once per seed, checking for NaN/inf after each chunk.

  The seeds are the elements of an `optimize_batch` that shares the inputs and the config.

  Args:
    unet_fn: `UNetFn`, e.g. `FlaxUNet(config)` (keep one object, or equal ones, to reuse programs).
    params: U-Net params.
    inputs: `EditInputs` (z_src [h, w, c], prompts' embeddings, edit-token mask [L]).
    keys_S: [S] PRNG keys, one per seed.
    config: `LUSDConfig`.
    schedule: the checkpoint's `Schedule`.
    mesh: optional `sharding.data_mesh()` to spread the seeds over devices (same program, same
      results to float rounding).
    numeric: overrides `config.numeric()` (e.g. already on device).
    noise_fn: optional replayable draw `noise_fn(key, step, attempt) -> (t, eps)`.
    snapshot_every: keep z and M_k after every this many steps (and at the end).
    chunk_size: steps per compiled call when no snapshots are asked (default: all N at once); the
      host regains control between chunks (`on_chunk`).
    seed_ids: labels of the seeds for error messages (default 0..S-1).
    on_chunk: called as on_chunk(steps_done, state_S, chunk_stats) after each chunk (progress bars);
      chunk_stats is the chunk's `StepStats` as numpy [S, chunk].

  Returns:
    `EditOutput` ([S] leading axis).

  Raises:
    NonFiniteError: naming the first step and seed whose g or z holds NaN/inf.
  """
  s = keys_S.shape[0]
  numeric = config.numeric() if numeric is None else numeric
  seed_ids = list(range(s)) if seed_ids is None else list(seed_ids)
  return optimize_batch(
    unet_fn, params, sharding.broadcast_batch(inputs, s), keys_S, sharding.broadcast_batch(numeric, s),
    static=config.static(), schedule=schedule, mesh=mesh, noise_fn=noise_fn, snapshot_every=snapshot_every,
    chunk_size=chunk_size, ids=[f"seed {i}" for i in seed_ids], on_chunk=on_chunk,
  )  # fmt: skip
