"""A plain, step-by-step transcription of LUSD (paper Algorithm 1 and the official PyTorch code).

Written for the tests, independently of `lusd_jax.lusd`: a Python loop over steps and draws,
float64 numpy arithmetic, and PyTorch's own `F.interpolate(mode="bicubic")` for the mask, in the
official code's order of operations (upsample all 77 cross maps, pick the edit tokens, average,
multiply by the self-attention matrix). The U-Net is the only shared piece: `unet_call` runs it
on one batch of two rows, [(x0, y_src), (x1, y_tgt)], and returns both rows' outputs and the
target row's maps; every gradient family is read from that one call:

  sbp  rows (z_t, z_t)        g = eps[1] - eps[0]
  dds  rows (z_src,t, z_t)    g = eps[1] - eps[0]
  sds  rows (z_t, z_t)        g = eps[1] - eps_noise

Config switches are followed literally:
  - paper: t drawn once per step, eps redrawn on rejection; mask from this step's accepted call;
    beta_k = k / N for steps numbered k = 1..N.
  - official (`LUSDConfig.official()`): t and eps redrawn together; the mask of step k comes from
    the maps stored after step k-1's optimizer step (`latest_store`), so step 0 uses M = 1;
    beta_k = np.linspace(0, 1, N)[k]; t < min(t_max, T) - 1; an all-zero direction is accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class ReferenceRun(NamedTuple):
  z_steps: np.ndarray  # [N, h, w, c] latent after each step
  mask_steps: np.ndarray  # [N, h, w] moving-average mask M_k after each step (ones if none yet)
  t: np.ndarray  # [N] timestep used at each step
  rejections: np.ndarray  # [N]
  hit_max_attempts: np.ndarray  # [N] bool
  margins: np.ndarray  # relative |std(g) - eta| / eta of every filtering decision


def official_mask(self_attn, cross_attn, index, latent_hw):
  """The official `merge_attention` and mask normalization, in PyTorch float64 (any latent size)."""
  h, w = latent_hw
  cross = torch.tensor(np.asarray(cross_attn), dtype=torch.float64)
  cross = cross.reshape(1, h // 4, w // 4, -1).permute(0, 3, 1, 2)
  cross = F.interpolate(cross, (h // 2, w // 2), mode="bicubic")
  c_map = cross[0, list(index)].mean(axis=0)
  self_map = torch.tensor(np.asarray(self_attn), dtype=torch.float64)
  c_map = (self_map @ c_map.reshape(-1, 1)).reshape(h // 2, w // 2)
  c_map = F.interpolate(c_map[None, None], (h, w), mode="bicubic").squeeze()
  c_map = (c_map - c_map.min()) / (c_map.max() - c_map.min())
  return torch.clamp(c_map, 0, 1).numpy()


def std(x):
  return float(np.std(x, ddof=1))


def run_reference(
  unet_call: Callable,
  z_src: np.ndarray,
  ctx_src: np.ndarray,
  ctx_tgt: np.ndarray,
  edit_index: list[int],
  config,
  abar: np.ndarray,
  draw: Callable[[int, int], tuple[int, np.ndarray]],
  prediction_type: str = "epsilon",
) -> ReferenceRun:
  """Runs LUSD step by step.

  Args:
    unet_call: (sample [2, h, w, c], t [2], ctx [2, L, D]) -> (out [2, h, w, c], self [N_s, N_s],
      cross [N_c, L]), the maps of row 1.
    z_src: [h, w, c].
    ctx_src, ctx_tgt: [L, D].
    edit_index: positions of the edit tokens in the target prompt.
    config: an `LUSDConfig` (read as plain attributes).
    abar: [T] alphas_cumprod.
    draw: (step, attempt) -> (t, eps [h, w, c]), the replayed noise.
    prediction_type: "epsilon" or "v_prediction".
  """
  c = config
  n = c.num_steps
  z_src = np.asarray(z_src, np.float64)
  z = z_src.copy()
  h, w = z.shape[:2]
  ema = None  # M_k
  latest_maps = None  # official: maps of the previous step's accepted call
  z_steps, mask_steps, ts, rejections, hits, margins = [], [], [], [], [], []
  lam = c.reg_scale if c.spatial_reg else 0.0

  for k in range(n):
    eta = c.threshold
    attempt = 0
    hit = False
    t = None
    while True:
      t_draw, eps = draw(k, attempt)
      if t is None or c.redraw_t_on_reject:
        t = int(t_draw)
      eps = np.asarray(eps, np.float64)
      a = abar[t]
      z_t = np.sqrt(a) * z + np.sqrt(1 - a) * eps
      row0 = np.sqrt(a) * z_src + np.sqrt(1 - a) * eps if c.gradient == "dds" else z_t
      sample = np.stack([row0, z_t]).astype(np.float32)
      out, self_attn, cross_attn = unet_call(sample, np.array([t, t], np.int32), np.stack([ctx_src, ctx_tgt]))
      out = np.asarray(out, np.float64)
      if prediction_type == "v_prediction":
        out = np.sqrt(a) * out + np.sqrt(1 - a) * sample.astype(np.float64)
      g = out[1] - (eps if c.gradient == "sds" else out[0])
      attempt += 1
      s = std(g)
      accept = (not c.filtering) or s >= eta
      if c.filtering:
        margins.append(abs(s - eta) / eta)
      if c.accept_zero_direction and np.all((1 - lam) * g + lam * (z - z_src) == 0):
        accept = True
      if np.all(g == 0):  # safety net: no redraw can help when the prompts are equal to the U-Net
        accept = True
      if accept:
        break
      if attempt >= c.max_attempts:
        hit = True
        break
      eta *= c.threshold_decay_rate

    # Attention mask and its moving average.
    maps = (self_attn, cross_attn)
    if c.spatial_reg and edit_index:
      source = latest_maps if c.mask_from_previous_step else maps
      if source is not None:
        m = official_mask(*source, edit_index, (h, w))
        ema = m if ema is None else (1 - c.cross_attn_momentum) * ema + c.cross_attn_momentum * m
    # Paper: beta_k = k / N over steps numbered 1..N (k here counts from 0).
    beta = np.linspace(0, 1, n)[k] if c.beta_linspace else (k + 1) / n
    m_used = ema if ema is not None else np.ones((h, w))
    m_hat = beta * m_used + (1 - beta) if c.spatial_reg else np.ones((h, w))

    d = (1 - lam) * m_hat[..., None] * g + lam * (z - z_src)
    if c.normalize and not np.all(d == 0):
      d = d / std(d)
    if c.anneal:
      sched = 1 / (1 + np.exp(-np.linspace(-c.speed, c.speed, n)))
      d = d * ((1 - sched[k]) * (c.ds_high - c.ds_low) + c.ds_low)
    # loss = sum(d * z) / (h w); backward of loss_scale * loss; SGD(lr).
    z = z - c.lr * c.loss_scale * d / (h * w)
    latest_maps = maps  # official: update_attn_state() after the optimizer step

    z_steps.append(z.copy())
    mask_steps.append(ema.copy() if ema is not None else np.ones((h, w)))
    ts.append(t)
    rejections.append(attempt - 1)
    hits.append(hit)

  return ReferenceRun(
    np.stack(z_steps),
    np.stack(mask_steps),
    np.array(ts),
    np.array(rejections),
    np.array(hits),
    np.array(margins),
  )
