"""The compiled LUSD optimization against a step-by-step eager transcription, on the tiny U-Net.

Every run here goes through few compiled programs (module-scoped fixtures; switches and numbers
are traced): single-seed chunks of one step for SBP (reused by the reference, ablation and
recompilation tests), one for each of DDS and SDS with a replayed noise table, and one vmapped
sweep over stacked configs and seeds.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lusd_jax import engine
from lusd_jax import schedule as schedule_lib
from lusd_jax.lusd import core
from lusd_jax.lusd.config import LUSDConfig, stack_numeric
from lusd_jax.models import layers
from lusd_jax.models import unet as unet_lib
from tests import builders
from tests import lusd_reference as ref

H = W = 16  # tiny SD1 U-Net latent: self maps at 8x8, cross maps at 4x4
EDIT_INDEX = [2, 5]
N = 6
# SD's per-element step is lr * 2000 / (64 * 64); lr = 1/16 keeps it on this 16x16 latent.
LR = 1 / 16
SCHEDULE = schedule_lib.Schedule()
ABAR = np.asarray(schedule_lib.alphas_cumprod(SCHEDULE), np.float64)
UNET = core.FlaxUNet(unet_lib.UNetConfig.from_dict(builders.TINY_SD1_UNET))


def random_params(config, seed):
  """Random U-Net params; larger query/key weights sharpen the attention maps (near-uniform maps
  would leave the min-max-normalized mask at the mercy of float32 rounding)."""
  return layers.random_params(
    unet_lib.param_shapes(config), seed, bias_std=0.1, scale_std=0.1, kernel_gain={"to_q": 1.5, "to_k": 1.5}
  )


def edit_mask(index):
  return jnp.zeros(77, jnp.float32).at[jnp.asarray(index, jnp.int32)].set(1.0) if index else jnp.zeros(77)


def make_inputs(seed, index=EDIT_INDEX):
  rng = np.random.default_rng(seed)
  return core.EditInputs(
    z_src=jnp.asarray(rng.standard_normal((H, W, 4)), jnp.float32),
    ctx_src=jnp.asarray(rng.standard_normal((77, 32)), jnp.float32),
    ctx_tgt=jnp.asarray(rng.standard_normal((77, 32)), jnp.float32),
    edit_mask=edit_mask(index),
  )


def keys(*seeds):
  return jax.vmap(jax.random.key)(jnp.asarray(seeds))


@pytest.fixture(scope="module")
def params():
  return random_params(UNET.config, 0)


@pytest.fixture(scope="module")
def inputs():
  return make_inputs(0)


@pytest.fixture(scope="module")
def unet_call(params):
  """The reference's U-Net: one eager call on [(x0, y_src), (x1, y_tgt)], maps of row 1."""
  spec = unet_lib.CaptureSpec(self_res=H // 2, cross_res=H // 4, batch=(1, 2))
  fn = jax.jit(lambda p, x, t, c: UNET(p, x, t, c, spec))

  def call(sample, t, ctx):
    out, maps = fn(params, jnp.asarray(sample), jnp.asarray(t), jnp.asarray(ctx, jnp.float32))
    return np.asarray(out), np.asarray(maps.self_attn[0]), np.asarray(maps.cross_attn[0])

  return call


_default_noise = jax.jit(core.default_noise, static_argnames="shape")


def replay_default_noise(key, config):
  """The reference's draws: the default noise function, called eagerly with the paper's/official t range."""
  t_hi = min(config.t_max, len(ABAR)) - (1 if config.official_t_range else 0)

  def draw(step, attempt):
    t, eps = _default_noise(key, step, attempt, t_lo=config.t_min, t_hi=t_hi, shape=(H, W, 4))
    return int(t), np.asarray(eps)

  return draw


def run_compiled(
  params,
  inputs,
  config,
  seeds=(0,),
  noise_fn=None,
  schedule=SCHEDULE,
  snapshot_every=1,
  on_chunk=None,
  unet=UNET,
):
  """Single-seed chunks of `snapshot_every` steps (default 1: every step's latent and mask)."""
  return core.optimize(
    unet,
    params,
    inputs,
    keys(*seeds),
    config,
    schedule=schedule,
    noise_fn=noise_fn,
    snapshot_every=snapshot_every,
    on_chunk=on_chunk,
  )


def run_reference(unet_call, inputs, config, draw, index=EDIT_INDEX, prediction_type="epsilon"):
  return ref.run_reference(
    unet_call,
    np.asarray(inputs.z_src),
    np.asarray(inputs.ctx_src),
    np.asarray(inputs.ctx_tgt),
    index,
    config,
    ABAR,
    draw,
    prediction_type,
  )


def assert_matches_reference(out, want, atol=1e-5):
  """Per-step draws and decisions agree exactly; latents and masks at every snapshot to atol."""
  assert want.margins.size == 0 or want.margins.min() > 1e-4, "a filtering decision is too close to call"
  np.testing.assert_array_equal(out.t[0], want.t)
  np.testing.assert_array_equal(out.rejections[0], want.rejections)
  np.testing.assert_array_equal(out.hit_max_attempts[0], want.hit_max_attempts)
  assert out.snapshot_steps[-1] == len(want.t)
  for j, done in enumerate(out.snapshot_steps):
    msg = f"after step {done - 1}"
    np.testing.assert_allclose(out.z_snapshots[0, j], want.z_steps[done - 1], atol=atol, rtol=0, err_msg=msg)
    np.testing.assert_allclose(
      out.mask_snapshots[0, j], want.mask_steps[done - 1], atol=atol, rtol=0, err_msg=msg
    )


@pytest.fixture(scope="module")
def grad_std_quantiles(unet_call, inputs):
  """Quantiles of std(g) at z_src over random draws, to set thresholds that reject some draws."""
  rng = np.random.default_rng(1)
  stds = []
  for _ in range(12):
    t = int(rng.integers(50, 950))
    eps = rng.standard_normal((H, W, 4))
    z_t = np.sqrt(ABAR[t]) * np.asarray(inputs.z_src) + np.sqrt(1 - ABAR[t]) * eps
    out, _, _ = unet_call(
      np.stack([z_t, z_t]).astype(np.float32), np.array([t, t]), np.stack([inputs.ctx_src, inputs.ctx_tgt])
    )
    stds.append(np.std(out[1] - out[0], ddof=1))
  return np.quantile(stds, [0.25, 0.5, 0.75, 1.0])


def test_paper_algorithm_matches_reference(params, inputs, unet_call, grad_std_quantiles):
  # eta_0 above most std(g): rejections (eps redrawn, t kept) until eta has decayed enough.
  config = LUSDConfig(
    num_steps=N, lr=LR, threshold=float(grad_std_quantiles[2]), threshold_decay_rate=0.9, max_attempts=40
  )
  out = run_compiled(params, inputs, config)
  want = run_reference(unet_call, inputs, config, replay_default_noise(keys(0)[0], config))
  assert want.rejections.sum() > 0
  assert_matches_reference(out, want)
  assert not np.allclose(want.mask_steps[-1], 1.0)  # the mask localizes


def test_official_preset_matches_reference(params, inputs, unet_call, grad_std_quantiles):
  # eta_0 above every std(g) seen and few attempts: some steps end at max_attempts.
  config = LUSDConfig.official(
    num_steps=N,
    lr=LR,
    threshold=1.2 * float(grad_std_quantiles[3]),
    threshold_decay_rate=0.85,
    max_attempts=3,
  )
  out = run_compiled(params, inputs, config, seeds=(3,))
  want = run_reference(unet_call, inputs, config, replay_default_noise(keys(3)[0], config))
  assert want.rejections.sum() > 0 and want.hit_max_attempts.any()
  assert_matches_reference(out, want)
  # Official behaviour (2): no mask at step 0, the first mask comes from step 0's maps.
  np.testing.assert_array_equal(out.mask_snapshots[0, 0], 1.0)
  assert (out.t[0] <= config.t_max - 2).all()


class ReplayTable:
  """A fixed table of draws: noise_fn(key, step, attempt) -> table[step, attempt] (hashable by id)."""

  def __init__(self, seed, steps, attempts):
    rng = np.random.default_rng(seed)
    self.t = rng.integers(50, 950, size=(steps, attempts)).astype(np.int32)
    self.eps = rng.standard_normal((steps, attempts, H, W, 4)).astype(np.float32)

  def __call__(self, key, step, attempt):
    del key
    return jnp.asarray(self.t)[step, attempt], jnp.asarray(self.eps)[step, attempt]

  def draw(self, step, attempt):
    return int(self.t[step, attempt]), self.eps[step, attempt]


@pytest.mark.parametrize(
  "gradient, prediction_type", [("dds", "epsilon"), ("sds", "v_prediction")], ids=["dds", "sds-v"]
)
def test_gradient_families_match_reference(
  params, inputs, unet_call, grad_std_quantiles, gradient, prediction_type
):
  """DDS and SDS (the latter on a v-prediction schedule) with a replayed table of draws.

  Snapshots every 3 of 4 steps: the second chunk runs two padding steps past N, which must be no-ops.
  """
  table = ReplayTable(seed=5, steps=4, attempts=8)
  threshold = float(grad_std_quantiles[1]) * (0.5 if gradient == "sds" else 1.0)
  config = LUSDConfig(
    num_steps=4, lr=LR, gradient=gradient, threshold=threshold, threshold_decay_rate=0.8, max_attempts=8
  )
  schedule = dataclasses.replace(SCHEDULE, prediction_type=prediction_type)
  out = run_compiled(params, inputs, config, noise_fn=table, schedule=schedule, snapshot_every=3)
  assert out.snapshot_steps == (3, 4) and out.t.shape == (1, 4)
  want = run_reference(unet_call, inputs, config, table.draw, prediction_type=prediction_type)
  assert want.rejections.sum() > 0
  assert_matches_reference(out, want)
  # The families really differ: the same draws under SBP give other latents.
  sbp = run_reference(
    unet_call, inputs, config.replace(gradient="sbp"), table.draw, prediction_type=prediction_type
  )
  assert np.abs(sbp.z_steps[-1] - want.z_steps[-1]).max() > 1e-2


def step_sizes(out, z_src):
  """std over elements of each step's update z_k - z_{k-1}: [N]."""
  z = np.concatenate([np.asarray(z_src)[None], out.z_snapshots[0]])
  return np.std(np.diff(z, axis=0).reshape(len(z) - 1, -1), axis=1, ddof=1)


def test_normalization_and_annealing_set_the_step_size(params, inputs):
  base = LUSDConfig(num_steps=N, lr=LR, spatial_reg=False)
  lr_per_pixel = base.lr * base.loss_scale / (H * W)
  gamma = base.ds_low + (base.ds_high - base.ds_low) * (1 - 1 / (1 + np.exp(-np.linspace(-5, 5, N))))
  # Without spatial regularization d = g, so each step moves z by lr * gamma_k * g / std(g).
  normalized = step_sizes(run_compiled(params, inputs, base), inputs.z_src)
  np.testing.assert_allclose(normalized, lr_per_pixel * gamma, rtol=1e-4)
  # No annealing: gamma = 1.
  flat = step_sizes(run_compiled(params, inputs, base.replace(anneal=False)), inputs.z_src)
  np.testing.assert_allclose(flat, np.full(N, lr_per_pixel), rtol=1e-4)
  # No normalization: the step follows std(g), not gamma_k alone.
  raw = step_sizes(run_compiled(params, inputs, base.replace(normalize=False)), inputs.z_src)
  ratio = raw / (lr_per_pixel * gamma)
  assert np.abs(ratio - 1).min() > 0.05 and np.ptp(ratio) > 1e-3


def test_without_spatial_regularization_edit_tokens_do_not_matter(params, inputs):
  config = LUSDConfig(num_steps=N, lr=LR)
  other = inputs._replace(edit_mask=edit_mask([7]))
  # With the mask, other edit tokens give another edit ...
  a = run_compiled(params, inputs, config)
  b = run_compiled(params, other, config)
  assert np.abs(a.z - b.z).max() > 1e-3
  assert np.abs(a.mask - b.mask).max() > 1e-2
  # ... without it (lambda = 0, M = 1) they cannot.
  off = config.replace(spatial_reg=False)
  c = run_compiled(params, inputs, off)
  d = run_compiled(params, other, off)
  np.testing.assert_array_equal(c.z, d.z)
  # lambda = 0 and no edit tokens (M = 1) is the same normalized SBP.
  e = run_compiled(params, inputs._replace(edit_mask=jnp.zeros(77)), config.replace(reg_scale=0.0))
  np.testing.assert_allclose(e.z, c.z, atol=1e-5)
  np.testing.assert_array_equal(e.mask, 1.0)


def test_regularization_pulls_towards_the_source(params, inputs):
  config = LUSDConfig(num_steps=N, lr=LR)
  far = run_compiled(params, inputs, config.replace(reg_scale=0.0))
  near = run_compiled(params, inputs, config.replace(reg_scale=0.5))
  dist = lambda out: np.linalg.norm(out.z[0] - np.asarray(inputs.z_src))
  assert dist(near) < dist(far)


def test_filtering_switch(params, inputs):
  strict = LUSDConfig(num_steps=N, threshold=1e3, threshold_decay_rate=0.5, max_attempts=3)
  out = run_compiled(params, inputs, strict)
  np.testing.assert_array_equal(out.rejections, 2)
  assert out.hit_max_attempts.all()
  # No filtering accepts the first draw, as eta_0 = 0 does.
  unfiltered = run_compiled(params, inputs, strict.replace(filtering=False))
  np.testing.assert_array_equal(unfiltered.rejections, 0)
  assert not unfiltered.hit_max_attempts.any()
  zero = run_compiled(params, inputs, strict.replace(threshold=0.0))
  np.testing.assert_array_equal(unfiltered.z, zero.z)


def test_paper_keeps_t_on_rejection_official_redraws_it(params, inputs):
  config = LUSDConfig(num_steps=N, threshold=1e3, max_attempts=3)
  draw = replay_default_noise(keys(0)[0], config)
  kept = run_compiled(params, inputs, config)
  np.testing.assert_array_equal(kept.t[0], [draw(k, 0)[0] for k in range(N)])
  redrawn = run_compiled(params, inputs, config.replace(redraw_t_on_reject=True))
  np.testing.assert_array_equal(redrawn.t[0], [draw(k, 2)[0] for k in range(N)])
  assert (kept.t != redrawn.t).any()


def test_nonfinite_values_stop_with_the_step_and_seed(params, inputs):
  bad = inputs._replace(ctx_tgt=inputs.ctx_tgt.at[3, 0].set(jnp.nan))
  with pytest.raises(core.NonFiniteError, match=r"step 0 for seed 7"):
    core.optimize(
      UNET,
      params,
      bad,
      keys(0),
      LUSDConfig(num_steps=N, lr=LR),
      schedule=SCHEDULE,
      seed_ids=[7],
      snapshot_every=1,
    )


def test_changing_prompts_edit_words_and_numbers_does_not_recompile(params):
  config = LUSDConfig(num_steps=N, lr=LR)
  run_compiled(params, make_inputs(0), config)
  before = engine.run_chunk._cache_size()
  variants = [
    (make_inputs(1), config),
    (make_inputs(2, index=[1, 3, 4]), config.replace(reg_scale=0.1, lr=0.5, t_min=100, t_max=800)),
    (make_inputs(3, index=[]), LUSDConfig.official(num_steps=N, lr=LR, ds_high=0.3, cross_attn_momentum=0.5)),
    (make_inputs(4), config.replace(normalize=False, anneal=False, filtering=False, spatial_reg=False)),
  ]
  for inp, cfg in variants:
    run_compiled(params, inp, cfg)
  assert engine.run_chunk._cache_size() == before


@pytest.mark.slow
def test_vmapped_seeds_and_stacked_configs_equal_single_runs(params, inputs):
  configs = [
    LUSDConfig(num_steps=N, lr=LR),
    LUSDConfig.official(num_steps=N, lr=LR, reg_scale=0.1, speed=3.0),
  ]
  numeric_C = stack_numeric(configs)
  seeds = (0, 1)
  sweep = jax.jit(
    jax.vmap(
      functools.partial(core.edit_latents, UNET, static=configs[0].static(), schedule=SCHEDULE),
      in_axes=(None, None, None, 0),
    )
  )
  state_CS, stats_CS = sweep(params, inputs, keys(*seeds), numeric_C)
  assert state_CS.z.shape == (2, 2, H, W, 4)
  assert not np.allclose(state_CS.z[0, 0], state_CS.z[0, 1])  # seeds differ
  assert not np.allclose(state_CS.z[0, 0], state_CS.z[1, 0])  # configs differ
  for c, config in enumerate(configs):
    for s, seed in enumerate(seeds):
      single = run_compiled(params, inputs, config, seeds=(seed,))
      np.testing.assert_allclose(state_CS.z[c, s], single.z[0], atol=1e-5, rtol=1e-5)
      np.testing.assert_array_equal(stats_CS.t[c, s], single.t[0])
      np.testing.assert_array_equal(stats_CS.rejections[c, s], single.rejections[0])


def test_config_validation_names_the_field():
  for bad, field in [
    (dict(t_min=500, t_max=400), "t_max"),
    (dict(lr=-1.0), "lr"),
    (dict(gradient="csd"), "gradient"),
    (dict(num_steps=0), "num_steps"),
    (dict(threshold_decay_rate=1.5), "threshold_decay_rate"),
    (dict(cross_attn_momentum=0.0), "cross_attn_momentum"),
    (dict(max_attempts=0), "max_attempts"),
    (dict(reg_scale=2.0), "reg_scale"),
  ]:
    with pytest.raises(ValueError, match=f"LUSDConfig.{field} "):
      LUSDConfig(**bad)
  with pytest.raises(ValueError, match="static"):
    stack_numeric([LUSDConfig(num_steps=3), LUSDConfig(num_steps=4)])


@dataclasses.dataclass(frozen=True)
class RowsAgreeUNet:
  """UNET with every row's prediction taken from the last row.

  With identical prompts the batch rows have identical inputs, but a batched XLA:CPU convolution
  need not give them identical bits; this U-Net makes g = eps_tgt - eps_src exactly zero.
  """

  def __call__(self, params, sample_BHWC, timesteps_B, context_BLD, capture):
    out_BHWC, maps = UNET(params, sample_BHWC, timesteps_B, context_BLD, capture)
    return jnp.broadcast_to(out_BHWC[-1:], out_BHWC.shape), maps


def test_identical_prompts_end_the_redraws_at_once(params, inputs):
  same = inputs._replace(ctx_tgt=inputs.ctx_src)
  unet = RowsAgreeUNet()
  # g = 0 exactly: std 0 never passes the paper's filter, and no redraw can change that. The safety
  # net ends each step's redraws at the first draw (not after max_attempts U-Net calls) and counts it.
  config = LUSDConfig(num_steps=N, max_attempts=1000)
  paper = run_compiled(params, same, config, unet=unet)
  np.testing.assert_array_equal(paper.rejections, 0)
  assert paper.zero_gradient.all() and not paper.hit_max_attempts.any()
  np.testing.assert_array_equal(paper.z[0], inputs.z_src)  # z = z_src, so the L2 pull is 0 as well
  # The official code accepts the all-zero direction at once too, and z never moves.
  official = run_compiled(params, same, LUSDConfig.official(num_steps=N, max_attempts=3), unet=unet)
  np.testing.assert_array_equal(official.rejections, 0)
  np.testing.assert_array_equal(official.z[0], inputs.z_src)
  # Different prompts: g is never exactly zero.
  assert not run_compiled(params, inputs, config.replace(lr=LR)).zero_gradient.any()


def test_beta_schedule_paper_reaches_one_official_starts_at_zero():
  paper, official = LUSDConfig(num_steps=4).numeric(), LUSDConfig.official(num_steps=4).numeric()
  ks = jnp.arange(4)
  # Paper Alg. 1 numbers the steps k = 1..N: beta_k = k / N, the last step uses the whole mask.
  np.testing.assert_allclose(core.beta_schedule(paper, ks, 4), [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(core.beta_schedule(official, ks, 4), [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-6)


def test_optimize_reports_progress_and_snapshots(params, inputs):
  seen = []
  out = run_compiled(
    params, inputs, LUSDConfig(num_steps=N, lr=LR), on_chunk=lambda done, state, stats: seen.append(done)
  )
  assert seen == list(range(1, N + 1)) and out.snapshot_steps == tuple(seen)
  assert out.z_snapshots.shape == (1, N, H, W, 4) and out.mask_snapshots.shape == (1, N, H, W)
  np.testing.assert_array_equal(out.z_snapshots[:, -1], out.z)
  np.testing.assert_array_equal(out.mask_snapshots[:, -1], out.mask)
  assert out.t.shape == out.rejections.shape == out.grad_std.shape == (1, N)
  assert ((out.t >= 50) & (out.t < 950)).all()
