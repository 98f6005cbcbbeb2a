"""An eager float64 PyTorch/NumPy transcription of UnifyEdit, for parity tests of `lusd_jax.unifyedit`.

Written from the specification in issue 16 ("The algorithm", paper: Mao et al., *Tuning-Free Image
Editing with Fidelity and Editability via Unified Latent Diffusion Model*, Sec. 3-5), independently
of the package: a Python loop over steps, a diffusers `UNet2DConditionModel` (float64, eval mode) as
the network, a recording attention processor (`tests.builders.attention_with_probs`) for the maps,
torch autograd for the gradients and numpy float64 for the DDIM arithmetic. Latents are NHWC for one
image ([h, w, 4]); text embeddings [L, D].

Conventions this file fixes (the ones the package must share):
  - DDIM, T steps, "leading" spacing with steps_offset 1: ts = arange(T)[::-1] * (1000 // T) + 1;
    set_alpha_to_one False (below timestep 0 the alpha_bar is alphas_cumprod[0]); eta 0; epsilon
    prediction; no sample clipping (SD's scheduler config has clip_sample False).
  - Inversion: Prompt-to-Prompt's `ddim_loop` (guidance 1, source prompt, `next_step`).
  - Denoising step i = 0..T-1 runs at timestep ts[i] with paper step index t = T - i.
  - Maps are per-layer head means of the softmax probabilities, for the batch's single row: self maps
    [N, N] (attn1), cross maps [N, L_text] (attn2), N = h_l * w_l tokens in diffusers' row-major order.
    A layer's height h_l is ceil(h / 2^d) (diffusers' stride-2 convolutions), found from its N.
  - Masks: the image-resolution mask [H, W] is resized to every size it is used at (layer, cross,
    latent) by `F.interpolate(mode="nearest-exact")` and then binarized with > 0.
  - An empty or full mask at the cross resolution makes R_l a 0/0 or x/0 (nan / inf): the package
    rejects such masks before editing; the reference does not guard against them.

`reference_edit` installs its own recording processors on `unet` and restores the previous ones
before it returns (also on errors), so the caller's model is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tests import builders
from tests.nti_reference import next_step_f64

GRADIENTS = ("blc", "norm", "naive", "sap_only", "caa_only")
SCHEDULE_FORMS = ("eq14", "algorithm1")
NORM_EPS = 1e-12  # Eq. 15's guard against a zero gradient


# ----------------------------------------------------------------------------- schedule, DDIM


def scheduler(t: float, T: int, beta1: float, beta2: float, k1: float, k2: float, form: str = "eq14"):
  """UnifyEdit's adaptive time-step scheduler.

  Args:
    t: the paper's step index (T at the first denoising step, 1 at the last).
    T: number of denoising steps.
    beta1, beta2, k1, k2: the scheduler's weights and rates.
    form: "eq14" (Eq. 14, the spec's default) or "algorithm1" (Algorithm 1's printed form).

  Returns:
    (lambda1, lambda2) as Python floats: the weights of the SAP and CAA gradients.
  """
  if form == "eq14":
    return beta1 * (1.0 - math.exp(-k1 * (T - t))), beta2 * math.exp(-k2 * (T - t))
  if form == "algorithm1":
    return beta1 * math.exp(-k1 * t), beta2 * (1.0 - math.exp(-k2 * t))
  raise ValueError(f"schedule_form {form!r} is not one of {SCHEDULE_FORMS}")


def ddim_timesteps(num_steps: int, num_train: int = 1000) -> np.ndarray:
  """diffusers DDIM "leading" spacing with steps_offset 1: [T] int, descending (981, ..., 1 for T = 50)."""
  return np.arange(num_steps)[::-1] * (num_train // num_steps) + 1


def prev_step_f64(abar: np.ndarray, ratio: int, eps: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
  """diffusers `DDIMScheduler.step` (eta 0, epsilon, no clipping, set_alpha_to_one False) in float64."""
  t_prev = t - ratio
  a_t = float(abar[t])
  a_prev = float(abar[t_prev]) if t_prev >= 0 else float(abar[0])
  x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
  return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


# ----------------------------------------------------------------------------- U-Net with maps


class _Store:
  """What the recording processors write into during one U-Net call."""

  def __init__(self):
    self.on = False
    self.records = []  # (name, kind "self" | "cross", tokens N, head-mean probs [B, N, S] torch)


class _Recorder:
  """diffusers `AttnProcessor` math of one layer, recording its head-averaged probabilities."""

  def __init__(self, name: str, kind: str, store: _Store):
    self.name, self.kind, self.store = name, kind, store

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
    probs, out = builders.attention_with_probs(attn, hidden_states, encoder_hidden_states)
    if self.store.on:
      self.store.records.append((self.name, self.kind, hidden_states.shape[1], probs.mean(1)))
    return out


class _Recording:
  """Context manager: recording processors on every attention layer, the old ones restored on exit."""

  def __init__(self, unet):
    self.unet, self.store = unet, _Store()

  def __enter__(self) -> _Store:
    self.saved = dict(self.unet.attn_processors)
    procs = {}
    for key in self.saved:
      name = key.removesuffix(".processor")
      kind = "self" if name.endswith("attn1") else "cross" if name.endswith("attn2") else None
      if kind is None:
        raise ValueError(f"unet: attention layer {name} is neither attn1 nor attn2")
      procs[key] = _Recorder(name, kind, self.store)
    self.unet.set_attn_processor(procs)
    return self.store

  def __exit__(self, *exc):
    self.unet.set_attn_processor(dict(self.saved))  # diffusers pops from the dict it is given
    return False


def layer_hw(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
  """The (height, width) of a layer's feature map with `tokens` positions: (ceil(h/2^d), ceil(w/2^d))."""
  h, w = latent_hw
  for d in range(16):
    hd, wd = -(-h // 2**d), -(-w // 2**d)
    if hd * wd == tokens:
      return hd, wd
  raise ValueError(f"no U-Net level of a {h}x{w} latent has {tokens} tokens")


def _nchw(z_hwc) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(z_hwc, np.float64).transpose(2, 0, 1)[None]))


def _eps(unet, store: _Store, x_nchw: torch.Tensor, t: int, ctx_BLD: np.ndarray, record: bool):
  """One U-Net call; returns (eps [B, 4, h, w] torch, records of the call)."""
  store.records, store.on = [], record
  try:
    out = unet(x_nchw, torch.tensor(int(t)), encoder_hidden_states=torch.from_numpy(ctx_BLD)).sample
  finally:
    store.on = False
  return out, store.records


def _maps(records, latent_hw, sa_heights, cross_height):
  """Splits one call's records (row 0) into (self maps, cross maps), each a list of (hw, map)."""
  self_maps, cross_maps = [], []
  for _, kind, tokens, probs in records:
    hw = layer_hw(tokens, latent_hw)
    if kind == "self" and (sa_heights is None or hw[0] in sa_heights):
      self_maps.append((hw, probs[0]))
    if kind == "cross" and hw[0] == cross_height:
      cross_maps.append((hw, probs[0]))
  return self_maps, cross_maps


def resize_mask(mask_HW, hw: tuple[int, int]) -> torch.Tensor:
  """The image-resolution mask at `hw` by nearest-exact (center) sampling, then > 0: [h, w] float64 0/1."""
  m = torch.as_tensor(np.asarray(mask_HW, np.float64))[None, None]
  return (F.interpolate(m, size=hw, mode="nearest-exact")[0, 0] > 0).to(torch.float64)


# ----------------------------------------------------------------------------- losses


def sap_loss(src_maps, tgt_maps, mask_HW, region: bool) -> torch.Tensor:
  """Eq. 7 (Eq. 8 with `region` and a mask): sum over layers and elements of (A - A*)^2."""
  if len(src_maps) != len(tgt_maps):
    raise ValueError("source and target calls recorded different self-attention layers")
  loss = torch.zeros((), dtype=torch.float64)
  for (hw, a), (hw_t, a_t) in zip(src_maps, tgt_maps, strict=True):
    assert hw == hw_t
    a, a_t = a.detach(), a_t  # the source branch is a constant of the optimization
    if region and mask_HW is not None:
      m = resize_mask(mask_HW, hw).reshape(-1)
      mm = m[:, None] * m[None, :]  # M M^T
      a, a_t = a * mm, a_t * mm
    loss = loss + ((a - a_t) ** 2).sum()
  return loss


def caa_ratios(cross_maps, word_tokens: Sequence[Sequence[int]], mask_HW) -> torch.Tensor:
  """Eq. 9 for every edit word and cross layer: R [words, layers] torch float64 (with graph).

  C^l[s*] is the mean over the word's token positions of the head-averaged probability columns;
  without a mask R_l is the mean of C^l[s*] over all positions.
  """
  rows = []
  for positions in word_tokens:
    ratios = []
    for hw, c in cross_maps:
      col = c[:, list(positions)].mean(1)  # [N]
      if mask_HW is None:
        ratios.append(col.mean())
      else:
        m = resize_mask(mask_HW, hw).reshape(-1) > 0
        ratios.append(col[m].mean() / col[~m].mean())
    rows.append(torch.stack(ratios) if ratios else torch.zeros(0, dtype=torch.float64))
  if not rows:
    return torch.zeros((0, len(cross_maps)), dtype=torch.float64)
  return torch.stack(rows)


def caa_loss(ratios: torch.Tensor) -> torch.Tensor:
  """Eq. 10 summed over edit words: sum_words -(sum_l sqrt(R_l))^2."""
  return -(ratios.sqrt().sum(1) ** 2).sum()


def reference_losses(
  unet,
  z_src_hwc,
  z_tgt_hwc,
  timestep: int,
  ctx_src_LD,
  ctx_tgt_LD,
  word_tokens,
  mask_HW,
  sa_heights,
  cross_height: int,
  region_sap: bool,
):
  """L_SAP and L_CAA at one timestep and their gradients with respect to the target latent.

  Args:
    unet: diffusers `UNet2DConditionModel`, float64, eval mode (its processors are restored on return).
    z_src_hwc, z_tgt_hwc: [h, w, 4] source and target latents.
    timestep: DDPM timestep of both calls.
    ctx_src_LD, ctx_tgt_LD: [L, D] source and target prompt embeddings.
    word_tokens: per edit word, its token positions in the target prompt.
    mask_HW: [8h, 8w] image-resolution mask, or None (global edit).
    sa_heights: None (every self-attention layer) or the feature-map heights of the SAP layers.
    cross_height: feature-map height of the CAA layers.
    region_sap: Eq. 8 instead of Eq. 7 when a mask is given.

  Returns:
    (L_sap float, L_caa float, g_sap [h, w, 4], g_caa [h, w, 4]) numpy float64.
  """
  latent_hw = np.shape(z_tgt_hwc)[:2]
  ctx_src = np.asarray(ctx_src_LD, np.float64)[None]
  ctx_tgt = np.asarray(ctx_tgt_LD, np.float64)[None]
  with _Recording(unet) as store:
    with torch.no_grad():
      _, rec = _eps(unet, store, _nchw(z_src_hwc), timestep, ctx_src, True)
    src_maps, _ = _maps(rec, latent_hw, sa_heights, cross_height)
    x = _nchw(z_tgt_hwc).requires_grad_(True)
    with torch.enable_grad():
      _, rec = _eps(unet, store, x, timestep, ctx_tgt, True)
      tgt_maps, cross = _maps(rec, latent_hw, sa_heights, cross_height)
      l_sap = sap_loss(src_maps, tgt_maps, mask_HW, region_sap)
      l_caa = caa_loss(caa_ratios(cross, word_tokens, mask_HW))
      g_sap = _grad(l_sap, x)
      g_caa = _grad(l_caa, x)
  return float(l_sap.detach()), float(l_caa.detach()), _hwc(g_sap), _hwc(g_caa)


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
  if not loss.requires_grad:  # e.g. no edit words: a constant loss
    return torch.zeros_like(x)
  return torch.autograd.grad(loss, x, retain_graph=True)[0]


def _hwc(x_nchw: torch.Tensor) -> np.ndarray:
  return x_nchw.detach()[0].permute(1, 2, 0).numpy().copy()


# ----------------------------------------------------------------------------- the edit


def _check_cfg(cfg) -> None:
  if cfg["gradient"] not in GRADIENTS:
    raise ValueError(f"gradient {cfg['gradient']!r} is not one of {GRADIENTS}")
  if cfg["schedule_form"] not in SCHEDULE_FORMS:
    raise ValueError(f"schedule_form {cfg['schedule_form']!r} is not one of {SCHEDULE_FORMS}")
  if cfg.get("inversion", "ddim") != "ddim":
    raise ValueError("the reference implements inversion='ddim' only")
  if cfg["maps_from"] not in ("source", "inversion"):
    raise ValueError(f"maps_from {cfg['maps_from']!r} is not 'source' or 'inversion'")


def step_weights(cfg, t: int) -> tuple[float, float]:
  """(lambda1, lambda2) actually used at step index t: the gradient variant's weights, 0 outside windows."""
  T, kind = cfg["num_steps"], cfg["gradient"]
  if kind in ("blc", "sap_only", "caa_only"):
    lam1, lam2 = scheduler(t, T, cfg["beta1"], cfg["beta2"], cfg["k1"], cfg["k2"], cfg["schedule_form"])
  else:  # "norm" (Eq. 13) and "naive" (Eq. 12): static weights
    lam1, lam2 = float(cfg["beta1"]), float(cfg["beta2"])
  return (lam1 if _on(cfg, t, "sap") else 0.0), (lam2 if _on(cfg, t, "caa") else 0.0)


def reference_edit(
  unet, alphas_cumprod, z0_hwc, ctx_src_LD, ctx_tgt_LD, ctx_null_LD, word_tokens, mask_HW, cfg
) -> dict:
  """UnifyEdit end to end: DDIM inversion, then T dual-branch denoising steps with latent optimization.

  Args:
    unet: diffusers `UNet2DConditionModel`, float64, eval mode (its processors are restored on return).
    alphas_cumprod: [1000] float64.
    z0_hwc: [h, w, 4] clean source latent.
    ctx_src_LD, ctx_tgt_LD, ctx_null_LD: [L, D] source, target and unconditional ("") embeddings.
    word_tokens: per edit word, its token positions in the target prompt.
    mask_HW: [8h, 8w] image-resolution mask, or None (global edit).
    cfg: dict with num_steps, guidance, beta1, beta2, k1, k2, tau1, tau2, sa_heights, cross_height,
      region_sap, gradient, schedule_form, max_it, blend, blend_frac, maps_from (and optionally
      inversion, which must be "ddim").

  Returns:
    dict of numpy float64 arrays:
      z_tgt [h, w, 4], z_src [h, w, 4]: final latents of both branches;
      trajectory [T+1, h, w, 4]: the inversion, trajectory[0] = z0, trajectory[T] = z_T;
      tgt_steps, src_steps [T+1, h, w, 4]: both branches after each step (index 0: z_T);
      z_opt [T, h, w, 4]: the target latent after Eq. 16 (before the DDIM step) at each step;
      lambdas [T, 2]: (lambda1, lambda2) used (0 for an inactive term);
      sap_grad_norm, caa_grad_norm [T]: ||g|| at the first iteration (0 when inactive);
      sap_loss, caa_loss [T]: the losses at the first iteration (0 when inactive);
      ratios [T, words, layers]: R_l at the first iteration (computed at every step, inside the CAA
        window or not).
  """
  _check_cfg(cfg)
  T = int(cfg["num_steps"])
  abar = np.asarray(alphas_cumprod, np.float64)
  ratio = len(abar) // T
  ts = ddim_timesteps(T, len(abar))
  z0 = np.asarray(z0_hwc, np.float64)
  latent_hw = z0.shape[:2]
  ctx_src, ctx_tgt, ctx_null = (
    np.asarray(c, np.float64)[None] for c in (ctx_src_LD, ctx_tgt_LD, ctx_null_LD)
  )
  sa_heights, cross_height = cfg["sa_heights"], cfg["cross_height"]
  m_lat = np.ones(latent_hw) if mask_HW is None else resize_mask(mask_HW, latent_hw).numpy()
  blend = bool(cfg["blend"]) and mask_HW is not None
  blend_from = T - int(cfg["blend_frac"] * T)

  with _Recording(unet) as store:

    def eps_of(z_hwc, t, ctx):
      with torch.no_grad():
        return (
          _eps(unet, store, _nchw(z_hwc), t, ctx, False)[0][0].permute(1, 2, 0).numpy().astype(np.float64)
        )

    # Prompt-to-Prompt `ddim_loop`: guidance 1, source prompt; trajectory[k] = z_k.
    traj = [z0]
    for k in range(T):
      t = int(ts[T - 1 - k])
      traj.append(next_step_f64(abar, float(abar[0]), ratio, eps_of(traj[-1], t, ctx_src), t, traj[-1]))

    z_src, z_tgt = traj[-1].copy(), traj[-1].copy()
    out = {
      k: [] for k in ("z_opt", "lambdas", "sap_grad_norm", "caa_grad_norm", "sap_loss", "caa_loss", "ratios")
    }
    src_steps, tgt_steps = [z_src.copy()], [z_tgt.copy()]
    for i in range(T):
      t_idx, t = T - i, int(ts[i])
      lam1, lam2 = step_weights(cfg, t_idx)
      sap_on, caa_on = _on(cfg, t_idx, "sap"), _on(cfg, t_idx, "caa")
      out["lambdas"].append((lam1, lam2))

      # 1. Source self maps, once per step (only needed when SAP is active). "inversion": the call the
      # DDIM inversion made at this timestep (z_k, k = T-1-i, source prompt), recomputed: eager
      # float64 PyTorch gives the same maps as caching them during the inversion.
      src_maps = None
      if sap_on:
        z_maps = traj[T - 1 - i] if cfg["maps_from"] == "inversion" else z_src
        with torch.no_grad():
          _, rec = _eps(unet, store, _nchw(z_maps), t, ctx_src, True)
        src_maps, _ = _maps(rec, latent_hw, sa_heights, cross_height)

      # 2-6. Target maps, losses, G and Eq. 16, MAX_IT times (with MAX_IT 0 the first iteration still
      # runs for its statistics, without the update).
      first = dict(sap_grad_norm=0.0, caa_grad_norm=0.0, sap_loss=0.0, caa_loss=0.0)
      max_it = int(cfg["max_it"])
      for it in range(max(max_it, 1)):
        x = _nchw(z_tgt).requires_grad_(True)
        with torch.enable_grad():
          _, rec = _eps(unet, store, x, t, ctx_tgt, True)
          tgt_maps, cross = _maps(rec, latent_hw, sa_heights, cross_height)
          ratios = caa_ratios(cross, word_tokens, mask_HW)
          g = torch.zeros_like(x)
          if sap_on:
            l_sap = sap_loss(src_maps, tgt_maps, mask_HW, cfg["region_sap"])
            g_sap = _grad(l_sap, x)
            g = g + _weighted(cfg, g_sap, lam1)
          if caa_on:
            l_caa = caa_loss(ratios)
            g_caa = _grad(l_caa, x)
            g = g + _weighted(cfg, g_caa, lam2)
        if it == 0:
          first["ratios"] = ratios.detach().numpy().copy()
          if sap_on:
            first.update(sap_grad_norm=float(g_sap.norm()), sap_loss=float(l_sap.detach()))
          if caa_on:
            first.update(caa_grad_norm=float(g_caa.norm()), caa_loss=float(l_caa.detach()))
        if it < max_it:
          z_tgt = z_tgt - m_lat[..., None] * _hwc(g)  # Eq. 16
      for key, v in first.items():
        out[key].append(v)
      out["z_opt"].append(z_tgt.copy())

      # 7. CFG DDIM step of both branches, the "" embedding as the unconditional one.
      w = float(cfg["guidance"])
      new = []
      for z, ctx in ((z_tgt, ctx_tgt), (z_src, ctx_src)):
        e_u, e_c = eps_of(z, t, ctx_null), eps_of(z, t, ctx)
        new.append(prev_step_f64(abar, ratio, e_u + w * (e_c - e_u), t, z))
      z_tgt, z_src = new

      # 8. Prompt-to-Prompt LocalBlend-style blending from step index T - int(blend_frac T) on.
      if blend and t_idx <= blend_from:
        z_tgt = z_src + m_lat[..., None] * (z_tgt - z_src)
      src_steps.append(z_src.copy())
      tgt_steps.append(z_tgt.copy())

  result = {k: np.asarray(v, np.float64) for k, v in out.items()}
  result.update(
    z_tgt=z_tgt,
    z_src=z_src,
    trajectory=np.stack(traj),
    src_steps=np.stack(src_steps),
    tgt_steps=np.stack(tgt_steps),
  )
  return result


def _on(cfg, t: int, term: str) -> bool:
  """Whether a term is inside its window and not removed by the ablation (its weight may be 0)."""
  if term == "sap":
    return t >= cfg["tau2"] and cfg["gradient"] != "caa_only"
  return t >= cfg["tau1"] and cfg["gradient"] != "sap_only"


def _weighted(cfg, g: torch.Tensor, lam: float) -> torch.Tensor:
  """One term of G: lambda g / (||g|| + 1e-12) (Eq. 13, 15), or the raw beta g for "naive" (Eq. 12)."""
  if cfg["gradient"] == "naive":
    return lam * g
  return lam * g / (g.norm() + NORM_EPS)
