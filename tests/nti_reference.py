"""An eager PyTorch transcription of Prompt-to-Prompt's null-text inversion notebook, for parity tests.

Written from the paper (Mokady et al., "Null-text Inversion for Editing Real Images using Guided
Diffusion Models", CVPR 2023) and P2P's `null_text_w_ptp.ipynb` (`prev_step`, `next_step`,
`ddim_loop`, `null_optimization`), independent of `lusd_jax`: a diffusers `UNet2DConditionModel`,
a diffusers `DDIMScheduler` for the timesteps and alphas_cumprod as P2P uses it, torch.optim.Adam,
F.mse_loss. Latents are NCHW torch tensors, as in P2P; text embeddings [1, L, D].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from lusd_jax.tiny import SD1_SCHEDULER


def p2p_scheduler(num_steps: int) -> DDIMScheduler:
  """P2P's scheduler: SD1.x betas, clip_sample False, set_alpha_to_one False, steps_offset 1."""
  cfg = {k: v for k, v in SD1_SCHEDULER.items() if k != "skip_prk_steps"}
  scheduler = DDIMScheduler(**cfg, clip_sample=False)
  scheduler.set_timesteps(num_steps)
  return scheduler


def next_step_f64(abar: np.ndarray, final_abar: float, ratio: int, eps, t: int, x):
  """P2P `next_step` in float64 numpy: x at level t - ratio (final_abar below 0) -> level t."""
  t_lo, t_hi = min(t - ratio, len(abar) - 1), t
  a_lo = float(abar[t_lo]) if t_lo >= 0 else final_abar
  a_hi = float(abar[t_hi])
  eps, x = np.asarray(eps, np.float64), np.asarray(x, np.float64)
  x0 = (x - (1 - a_lo) ** 0.5 * eps) / a_lo**0.5
  return a_hi**0.5 * x0 + (1 - a_hi) ** 0.5 * eps


class NullInversion:
  """P2P's `NullInversion` with the U-Net as the only model (latents in, latents out)."""

  def __init__(self, unet, num_steps: int, guidance: float = 7.5, v_prediction: bool = False):
    self.unet = unet
    self.v_prediction = v_prediction
    self.scheduler = p2p_scheduler(num_steps)
    self.num_steps = num_steps
    self.guidance = guidance

  def prev_step(self, eps, t, x):
    s = self.scheduler
    t_prev = t - s.config.num_train_timesteps // s.num_inference_steps
    a_t = s.alphas_cumprod[t]
    a_prev = s.alphas_cumprod[t_prev] if t_prev >= 0 else s.final_alpha_cumprod
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps

  def next_step(self, eps, t, x):
    s = self.scheduler
    t_lo, t_hi = min(t - s.config.num_train_timesteps // s.num_inference_steps, 999), t
    a_lo = s.alphas_cumprod[t_lo] if t_lo >= 0 else s.final_alpha_cumprod
    a_hi = s.alphas_cumprod[t_hi]
    x0 = (x - (1 - a_lo) ** 0.5 * eps) / a_lo**0.5
    return a_hi**0.5 * x0 + (1 - a_hi) ** 0.5 * eps

  def as_eps(self, out, t, x):
    """P2P assumes an eps model; a v-prediction becomes eps = sqrt(abar_t) v + sqrt(1 - abar_t) x."""
    if not self.v_prediction:
      return out
    a_t = self.scheduler.alphas_cumprod[t]
    return a_t**0.5 * out + (1 - a_t) ** 0.5 * x

  def eps_single(self, x, t, ctx):
    return self.as_eps(self.unet(x, t, encoder_hidden_states=ctx).sample, t, x)

  def guided_step(self, x, t, uncond, cond):
    """P2P `get_noise_pred(..., is_forward=False)`: one call on [uncond, cond], then `prev_step`."""
    out = self.unet(torch.cat([x] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = self.as_eps(out, t, torch.cat([x] * 2)).chunk(2)
    return self.prev_step(eps_u + self.guidance * (eps_c - eps_u), t, x)

  @torch.no_grad()
  def ddim_loop(self, x, cond):
    latents = [x]
    for i in range(self.num_steps):
      t = self.scheduler.timesteps[len(self.scheduler.timesteps) - i - 1]
      x = self.next_step(self.eps_single(x, t, cond), t, x)
      latents.append(x)
    return latents

  @torch.no_grad()
  def sample(self, x, cond, uncond_per_step):
    latents = [x]
    for i, t in enumerate(self.scheduler.timesteps):
      x = self.guided_step(x, t, uncond_per_step[i], cond)
      latents.append(x)
    return latents

  def null_optimization(self, latents, cond, uncond, num_inner_steps: int, epsilon: float):
    """Returns (per-step null embeddings, per-step inner-step counts, per-step lists of inner losses)."""
    nulls, counts, losses = [], [], []
    x = latents[-1]
    for i in range(self.num_steps):
      uncond = uncond.clone().detach()
      uncond.requires_grad = True
      optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
      target = latents[len(latents) - i - 2]
      t = self.scheduler.timesteps[i]
      with torch.no_grad():
        eps_c = self.eps_single(x, t, cond)
      step_losses = []
      for _ in range(num_inner_steps):
        eps_u = self.eps_single(x, t, uncond)
        eps = eps_u + self.guidance * (eps_c - eps_u)
        loss = F.mse_loss(self.prev_step(eps, t, x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_losses.append(loss.item())
        if loss.item() < epsilon + i * 2e-5:
          break
      nulls.append(uncond[:1].detach())
      counts.append(len(step_losses))  # P2P's j + 1
      losses.append(step_losses)
      with torch.no_grad():
        x = self.guided_step(x, t, uncond, cond)
    return nulls, counts, losses
