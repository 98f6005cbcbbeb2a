"""The noise schedule against diffusers' DDPM / DDIM schedulers."""

import json

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
  assert s == sch.Schedule(**CONFIGS[0], prediction_type="v_prediction")
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
  ],
)
def test_unsupported_configs_raise(bad, word):
  with pytest.raises(ValueError, match=word):
    sch.Schedule.from_dict({**CONFIGS[0], **bad})
