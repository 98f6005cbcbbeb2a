"""The noise schedule against diffusers' DDPM / DDIM schedulers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lusd_jax import schedule as sch

CONFIGS = [
  dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
  dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
  dict(num_train_timesteps=500, beta_start=0.001, beta_end=0.03, beta_schedule="scaled_linear"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_alphas_cumprod_matches_diffusers(cfg, scheduler_cls):
  ref = scheduler_cls(**cfg).alphas_cumprod.numpy()
  ours = np.asarray(sch.alphas_cumprod(sch.Schedule.from_dict(cfg)))
  assert ours.shape == ref.shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


def _batch(seed, shape=(3, 8, 8, 4)):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal(shape).astype(np.float32)
  eps = rng.standard_normal(shape).astype(np.float32)
  t = rng.integers(0, 1000, size=shape[0])
  return z, eps, t


def test_add_noise_and_velocity_match_diffusers():
  cfg = CONFIGS[0]
  ref = DDPMScheduler(**cfg)
  abar = sch.alphas_cumprod(sch.Schedule.from_dict(cfg))
  z, eps, t = _batch(0)
  # diffusers works in NCHW; the formulas are elementwise, so the layout only moves axes.
  to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  from_t = lambda a: a.permute(0, 2, 3, 1).numpy()
  want = from_t(ref.add_noise(to_t(z), to_t(eps), torch.from_numpy(t)))
  np.testing.assert_allclose(np.asarray(sch.add_noise(abar, z, eps, t)), want, rtol=1e-5, atol=1e-6)
  want_v = from_t(ref.get_velocity(to_t(z), to_t(eps), torch.from_numpy(t)))
  np.testing.assert_allclose(np.asarray(sch.velocity(abar, z, eps, t)), want_v, rtol=1e-5, atol=1e-6)


def test_v_to_eps_inverts_velocity():
  abar = sch.alphas_cumprod(sch.Schedule())
  z, eps, t = _batch(1)
  z_t = sch.add_noise(abar, z, eps, t)
  v = sch.velocity(abar, z, eps, t)
  np.testing.assert_allclose(np.asarray(sch.v_to_eps(abar, z_t, v, t)), eps, atol=2e-5)
  got = sch.eps_from_model_output("v_prediction", abar, z_t, v, t)
  np.testing.assert_allclose(np.asarray(got), eps, atol=2e-5)
  assert sch.eps_from_model_output("epsilon", abar, z_t, v, t) is v


def test_scalar_timestep_broadcasts():
  abar = sch.alphas_cumprod(sch.Schedule())
  z, eps, _ = _batch(2, shape=(8, 8, 4))
  got = np.asarray(sch.add_noise(abar, z, eps, jnp.int32(700)))
  a = float(abar[700])
  np.testing.assert_allclose(got, np.sqrt(a) * z + np.sqrt(1 - a) * eps, rtol=1e-6, atol=1e-6)


def test_from_json_reads_a_diffusers_scheduler_folder(tmp_path):
  DDIMScheduler(**CONFIGS[0], prediction_type="v_prediction", clip_sample=False).save_pretrained(tmp_path)
  s = sch.Schedule.from_json(tmp_path)
  # DDIMScheduler's own defaults for the sampler keys: steps_offset 0, set_alpha_to_one True.
  want = sch.Schedule(**CONFIGS[0], prediction_type="v_prediction", steps_offset=0, set_alpha_to_one=True)
  assert s == want
  with open(tmp_path / "scheduler_config.json") as f:
    assert sch.Schedule.from_dict(json.load(f)) == s


@pytest.mark.parametrize(
  "bad, word",
  [
    (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    (dict(beta_schedule="squaredcos_cap_v2"), "beta_schedule"),
    (dict(prediction_type="sample"), "prediction_type"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(beta_start=0.02, beta_end=0.01), "beta_start"),
    (dict(steps_offset=1000), "steps_offset"),
    (dict(clip_sample_range=0.0), "clip_sample_range"),
  ],
)
def test_unsupported_configs_raise(bad, word):
  with pytest.raises(ValueError, match=word):
    sch.Schedule.from_dict({**CONFIGS[0], **bad})


# ----------------------------------------------------------------------------- DDIM

SD1 = dict(CONFIGS[0], steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def test_sd1_scheduler_config_keeps_the_ddim_keys():
  from lusd_jax.tiny import SD1_SCHEDULER  # a PNDM config, as SD1.x checkpoints ship it

  s = sch.Schedule.from_dict({**SD1_SCHEDULER, "clip_sample": False, "_class_name": "PNDMScheduler"})
  assert (s.steps_offset, s.set_alpha_to_one, s.clip_sample) == (1, False, False)
  flipped = sch.Schedule.from_dict(
    {**SD1_SCHEDULER, "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": True}
  )
  assert (flipped.steps_offset, flipped.set_alpha_to_one, flipped.clip_sample) == (0, True, True)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [1, 5, 7, 50, 333, 1000])
def test_ddim_timesteps_match_diffusers(n, offset):
  ref = DDIMScheduler(**{**SD1, "steps_offset": offset})
  ref.set_timesteps(n)
  got = sch.ddim_timesteps(sch.Schedule.from_dict({**SD1, "steps_offset": offset}), n)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, ref.timesteps.numpy())


def test_ddim_timesteps_sd1_50_steps():
  ts = sch.ddim_timesteps(sch.Schedule.from_dict(SD1), 50)
  assert ts[0] == 981 and ts[1] == 961 and ts[-1] == 1 and len(ts) == 50


@pytest.mark.parametrize("n", [0, 1001])
def test_ddim_timesteps_reject_bad_counts(n):
  with pytest.raises(ValueError, match="num_inference_steps"):
    sch.ddim_timesteps(sch.Schedule(), n)


@pytest.mark.parametrize(
  "extra",
  [
    {},  # SD1.x: the final step lands on abar_0
    {"set_alpha_to_one": True},  # the final step lands on abar = 1
    {"clip_sample": True, "clip_sample_range": 1.5},
    {"prediction_type": "v_prediction"},
    {"steps_offset": 0, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
  ],
)
def test_ddim_step_matches_diffusers_at_every_step(extra):
  cfg = {**SD1, **extra}
  ref = DDIMScheduler(**cfg)
  n = 10
  ref.set_timesteps(n)
  s = sch.Schedule.from_dict(cfg)
  abar = sch.alphas_cumprod(s)
  ratio = sch.ddim_step_ratio(s, n)
  step = jax.jit(sch.ddim_step, static_argnums=0)
  rng = np.random.default_rng(4)
  for t in ref.timesteps.numpy():
    x = rng.standard_normal((8, 8, 4)).astype(np.float32) * 2
    out = rng.standard_normal((8, 8, 4)).astype(np.float32) * 2  # what the U-Net predicts
    # diffusers' step is elementwise, so the array layout does not matter.
    want = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x), eta=0.0).prev_sample.numpy()
    eps = sch.eps_from_model_output(s.prediction_type, abar, x, out, int(t))
    got = np.asarray(step(s, eps, jnp.int32(t), jnp.int32(t - ratio), x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * np.abs(want).max(), err_msg=f"t={t}")
  if cfg.get("clip_sample"):  # the clipping really happened at the noisiest step
    x = np.full((2, 2, 4), 10.0, np.float32)
    assert not np.allclose(
      step(s, jnp.zeros_like(x), 901, 801, x), step(sch.Schedule(), jnp.zeros_like(x), 901, 801, x)
    )


def _next_step_f64(s: sch.Schedule, n: int, eps, t_next: int, x):
  """Prompt-to-Prompt's `next_step`, transcribed in float64 numpy from its notebook."""
  abar = DDPMScheduler(
    **{k: getattr(s, k) for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
  ).alphas_cumprod.numpy()
  final = 1.0 if s.set_alpha_to_one else float(abar[0])
  t = min(t_next - s.num_train_timesteps // n, s.num_train_timesteps - 1)
  a_t = float(abar[t]) if t >= 0 else final
  a_next = float(abar[t_next])
  eps, x = np.float64(eps), np.float64(x)
  x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
  return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


@pytest.mark.parametrize("extra", [{}, {"set_alpha_to_one": True}, {"clip_sample": True}])
def test_ddim_inverse_step_matches_p2p_and_diffusers_inverse(extra):
  """Against P2P's `next_step` (float64) always; against diffusers' `DDIMInverseScheduler` when
  clip_sample is False: it clips the predicted x_0 when clip_sample is True, P2P (and we) never do.
  Its timesteps are ours reversed ("leading" + steps_offset) and its first step starts from
  `initial_alpha_cumprod`, which is P2P's `final_alpha_cumprod` (abar_0, or 1 with set_alpha_to_one)."""
  from diffusers import DDIMInverseScheduler

  cfg = {**SD1, **extra}
  s = sch.Schedule.from_dict(cfg)
  n = 10
  ratio = sch.ddim_step_ratio(s, n)
  inv_ref = DDIMInverseScheduler(**cfg)
  inv_ref.set_timesteps(n)
  ts = sch.ddim_timesteps(s, n)
  np.testing.assert_array_equal(inv_ref.timesteps.numpy(), ts[::-1])
  step = jax.jit(sch.ddim_inverse_step, static_argnums=0)
  rng = np.random.default_rng(5)
  disagree = []
  for t_next in ts[::-1]:
    x = rng.standard_normal((8, 8, 4)).astype(np.float32) * 3  # large enough for clipping to bite
    eps = rng.standard_normal((8, 8, 4)).astype(np.float32)
    got = np.asarray(step(s, eps, jnp.int32(t_next), jnp.int32(t_next - ratio), x))
    want = _next_step_f64(s, n, eps, int(t_next), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"t={t_next}")
    diffusers_out = inv_ref.step(torch.from_numpy(eps), int(t_next), torch.from_numpy(x)).prev_sample.numpy()
    disagree.append(not np.allclose(got, diffusers_out, rtol=1e-5, atol=1e-5 * np.abs(want).max()))
  # Without clipping diffusers agrees at every step; with it, it clips |x_0| > 1 and departs from P2P.
  assert any(disagree) if s.clip_sample else not any(disagree), disagree


def test_inverse_step_undoes_the_step():
  """With the same eps, DDIM's step from the higher level returns the latent the inverse step started from."""
  s = sch.Schedule()
  rng = np.random.default_rng(6)
  x = rng.standard_normal((4, 4, 4)).astype(np.float32)
  eps = rng.standard_normal((4, 4, 4)).astype(np.float32)
  for t_next, t in ((1, -19), (501, 481), (981, 961)):
    up = sch.ddim_inverse_step(s, eps, t_next, t, x)
    np.testing.assert_allclose(np.asarray(sch.ddim_step(s, eps, t_next, t, up)), x, atol=1e-4)
    assert np.abs(np.asarray(up) - x).max() > 1e-3
