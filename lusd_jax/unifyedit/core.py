"""UnifyEdit's denoising phase (paper Sec. 4, Algorithm 1) as the engine's `UnifyEdit` method.

After the inversion phase (`lusd_jax.inversion`: DDIM inversion, then null-text inversion), both
branches start from the inverted z_T. Denoising step k = 0 .. T-1 (step index t = T - k, DDPM
timestep ts[k]) of one element:

  1. A^l   <- U-Net(z_t, P, ts[k]) self-attention maps (conditional only; cached for the step);
             maps_from="inversion": U-Net(z^inv_{T-k-1}, P, ts[k]), the inversion's call at ts[k]
  repeat MAX_IT times:
  2. A*^l, C^l <- U-Net(z*_t, P*, ts[k]) self maps and cross maps at latent/4
  3-4. L_SAP (Eq. 7/8), R_l and L_CAA (Eq. 9-10); g_SAP and g_CAA from ONE forward and one
             backward pass vmapped over the two cotangents
  5-6. G from the scheduler's weights (Eq. 14-15);  z*_t <- z*_t - M (.) G     (Eq. 16)
  7. one 4-row U-Net call [null, P] x z_t, [null, P*] x z*_t: classifier-free guided DDIM steps
  8. localized edits: z* <- z + M_b (.) (z* - z) from t <= T - int(blend_start T) on

Everything an element needs is in `UnifyInputs` (a global edit is an all-ones mask with
`has_mask` False), and every hyperparameter but the layer choice, T and MAX_IT is traced, so one
compiled program serves every edit type, ablation and mask of a model config and latent size.

Example:

  method = UnifyEdit(FlaxUNet(unet_config), schedule, config.static())
  out = engine.run(method, params, inputs_B, keys_B, numeric_B)
  z_tgt_B, z_src_B = out.final
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax import schedule as schedule_lib
from lusd_jax.models import unet as unet_lib
from lusd_jax.unifyedit import losses
from lusd_jax.unifyedit.config import UnifyEditNumeric, UnifyEditStatic


class UnifyInputs(NamedTuple):
  """What one element's denoising reads (traced; T steps, h x w latent, H x W image)."""

  z_T: jax.Array  # [h, w, c] float32: the inverted latent both branches start from
  trajectory: jax.Array  # [T + 1, h, w, c]: the DDIM inversion z_0 .. z_T (maps_from="inversion")
  null_embeddings: jax.Array  # [T, L, D]: the unconditional embedding of each step, high noise first
  ctx_src: jax.Array  # [L, D] source prompt P
  ctx_tgt: jax.Array  # [L, D] target prompt P*
  word_weights: jax.Array  # [W, L] float32: row w averages edit word w's sub-token columns
  word_valid: jax.Array  # [W] bool: False for padding rows (which must still be finite)
  mask: jax.Array  # [H, W] float32 binary mask at image resolution (all ones for a global edit)
  has_mask: jax.Array  # bool: a localized edit (M in Eq. 9, 16, blending) or a global one


class UnifyState(NamedTuple):
  """The scan carry of one element."""

  z_src: jax.Array  # [h, w, c] float32: the source branch z_t
  z_tgt: jax.Array  # [h, w, c] float32: the target branch z*_t


class UnifyStats(NamedTuple):
  """Per-step record of one element (stacked: [B, T]); losses and gradients of the first update."""

  lambda1: jax.Array  # float32: the weight of g_SAP actually used (0 outside its window)
  lambda2: jax.Array  # float32: the weight of g_CAA actually used
  sap_loss: jax.Array  # float32
  caa_loss: jax.Array  # float32
  sap_grad_norm: jax.Array  # float32: ||g_SAP||_2
  caa_grad_norm: jax.Array  # float32: ||g_CAA||_2
  sap_grad_mean: jax.Array  # float32: mean |g_SAP|
  caa_grad_mean: jax.Array  # float32: mean |g_CAA|
  ratios: jax.Array  # [W, L_cross] float32: R_l per edit word and cross-attention layer
  finite: jax.Array  # bool: G and both new latents are free of NaN/inf


@dataclasses.dataclass(frozen=True)
class UnifyEdit:
  """UnifyEdit's denoising as an `engine.Method` (frozen, hashable: part of the compiled program).

  Attributes:
    unet_fn: the `UNetFn` (`lusd_jax.lusd.core.FlaxUNet`).
    schedule: the checkpoint's `Schedule` (DDIM timesteps, eps/v conversion).
    static: `UnifyEditConfig.static()`.
  """

  unet_fn: object
  schedule: schedule_lib.Schedule
  static: UnifyEditStatic

  watched = "the target latent z* or its update G"

  @property
  def num_steps(self) -> int:
    return self.static.num_steps

  def init(self, inputs: UnifyInputs, key, numeric) -> UnifyState:
    del key, numeric  # deterministic
    z_T = inputs.z_T.astype(jnp.float32)
    return UnifyState(z_src=z_T, z_tgt=z_T)

  def specs(self, latent_h: int) -> tuple[unet_lib.CaptureSpec, unet_lib.CaptureSpec]:
    """(source spec: self maps of L_SAP's layers; target spec: those and the cross maps at latent/4)."""
    sa = self.static.sa_heights(latent_h)
    return (
      unet_lib.CaptureSpec.per_layer_maps(self_res=sa, cross_res=None),
      unet_lib.CaptureSpec.per_layer_maps(self_res=sa, cross_res=latent_h // 4),
    )

  def _maps(self, params, z_hwc, t, ctx_LD, spec):
    _, maps = self.unet_fn(params, z_hwc[None], jnp.reshape(t, (1,)), ctx_LD[None], spec)
    self_maps = tuple(m[0].astype(jnp.float32) for m in maps.self_layers or ())
    cross_maps = tuple(m[0].astype(jnp.float32) for m in maps.cross_layers or ())
    return self_maps, cross_maps

  def _timesteps(self, k):
    """(DDPM timestep ts[k], the next lower one, the paper's step index t = T - k)."""
    n = self.num_steps
    ts = jnp.asarray(schedule_lib.ddim_timesteps(self.schedule, n), jnp.int32)
    return ts[k], ts[k] - schedule_lib.ddim_step_ratio(self.schedule, n), n - k

  def source_maps(self, params, inputs: UnifyInputs, state: UnifyState, k) -> tuple[jax.Array, ...]:
    """Step 1: the source self-attention maps A^l of L_SAP's layers, per layer [N, N] (constants)."""
    n = self.num_steps
    t, _, _ = self._timesteps(k)
    h, w = state.z_src.shape[:2]
    z_maps = state.z_src if self.static.maps_from == "denoising" else inputs.trajectory[n - 1 - k]
    src_self, _ = self._maps(params, z_maps, t, inputs.ctx_src, self.specs(h)[0])
    if not src_self:
      raise ValueError(f"no self-attention layer at {self.static.sa_heights(h)} for a {h}x{w} latent")
    return src_self

  def gradients(self, params, inputs: UnifyInputs, numeric: UnifyEditNumeric, src_self, z_tgt, t):
    """Steps 2-4: (L_SAP, L_CAA, g_SAP, g_CAA, R [W, L_cross]) at the target latent z*.

    One forward pass; one backward pass vmapped over the cotangents (1, 0) and (0, 1).
    """
    h, w = z_tgt.shape[:2]
    tgt_spec = self.specs(h)[1]
    mask_at = lambda mh, mw: jnp.where(inputs.has_mask, losses.nearest_mask(inputs.mask, mh, mw), 1.0)
    region_on = inputs.has_mask & numeric.region_sap
    layers = unet_lib.map_layers(self.unet_fn.config, (h, w), tgt_spec).self_layers
    region = tuple(
      jnp.where(region_on, losses.nearest_mask(inputs.mask, *info.hw).reshape(-1), 1.0) for info in layers
    )
    c_mask = mask_at(h // 4, w // 4).reshape(-1)

    def objectives(z):
      tgt_self, cross = self._maps(params, z, t, inputs.ctx_tgt, tgt_spec)
      if not cross:
        raise ValueError(f"no cross-attention layer at latent/4 = {h // 4} for a {h}x{w} latent")
      ratios = losses.caa_ratios(cross, inputs.word_weights, c_mask, inputs.has_mask)
      l_sap = losses.sap_loss(src_self, tgt_self, region)
      return (l_sap, losses.caa_loss(ratios, inputs.word_valid)), ratios

    (l_sap, l_caa), pullback, ratios = jax.vjp(objectives, z_tgt, has_aux=True)
    eye = jnp.eye(2, dtype=jnp.float32)
    (g_2hwc,) = jax.vmap(pullback)((eye[:, 0], eye[:, 1]))
    return l_sap, l_caa, g_2hwc[0], g_2hwc[1], ratios

  def optimize(self, params, inputs: UnifyInputs, numeric: UnifyEditNumeric, state: UnifyState, k):
    """Steps 1-6: z*_t after MAX_IT updates z* <- z* - M (.) G, and the first update's record.

    Returns:
      (z*_t [h, w, c], (L_SAP, L_CAA, g_SAP, g_CAA, R, G) of the first update, (lambda1, lambda2)).
    """
    t, _, t_index = self._timesteps(k)
    h, w = state.z_tgt.shape[:2]
    src_self = self.source_maps(params, inputs, state, k)
    w_sap, w_caa = losses.step_weights(t_index, self.num_steps, numeric)
    m_latent = jnp.where(inputs.has_mask, losses.nearest_mask(inputs.mask, h, w), 1.0)[..., None]
    z_tgt, first = state.z_tgt, None
    for _ in range(self.static.max_it):  # MAX_IT (static, usually 1)
      l_sap, l_caa, g_sap, g_caa, ratios = self.gradients(params, inputs, numeric, src_self, z_tgt, t)
      update = losses.combine(g_sap, g_caa, w_sap, w_caa, numeric.normalized)  # Eq. 15
      z_tgt = z_tgt - m_latent * update  # Eq. 16
      first = first or (l_sap, l_caa, g_sap, g_caa, ratios, update)
    return z_tgt, first, (w_sap, w_caa)

  def step(self, params, inputs: UnifyInputs, numeric: UnifyEditNumeric, state: UnifyState, k):
    n = self.num_steps
    t, t_prev, t_index = self._timesteps(k)
    h, w = state.z_tgt.shape[:2]
    z_tgt, first, (w_sap, w_caa) = self.optimize(params, inputs, numeric, state, k)
    # 7. Guided DDIM steps of both branches from one 4-row call.
    z_src_new, z_tgt_new = self._guided_steps(params, inputs, numeric, state.z_src, z_tgt, t, t_prev, k)
    # 8. Localized edits: blend the target into the source outside the mask.
    m_latent = jnp.where(inputs.has_mask, losses.nearest_mask(inputs.mask, h, w), 1.0)[..., None]
    blend_from = n - jnp.floor(numeric.blend_start * n).astype(jnp.int32)
    blend_on = inputs.has_mask & numeric.blend & (t_index <= blend_from)
    z_tgt_new = jnp.where(blend_on, z_src_new + m_latent * (z_tgt_new - z_src_new), z_tgt_new)

    l_sap, l_caa, g_sap, g_caa, ratios, update = first
    norm = lambda g: jnp.sqrt(jnp.sum(g**2))
    finite = (
      jnp.all(jnp.isfinite(update)) & jnp.all(jnp.isfinite(z_tgt_new)) & jnp.all(jnp.isfinite(z_src_new))
    )
    stats = UnifyStats(
      lambda1=w_sap,
      lambda2=w_caa,
      sap_loss=l_sap,
      caa_loss=l_caa,
      sap_grad_norm=norm(g_sap),
      caa_grad_norm=norm(g_caa),
      sap_grad_mean=jnp.mean(jnp.abs(g_sap)),
      caa_grad_mean=jnp.mean(jnp.abs(g_caa)),
      ratios=ratios,
      finite=finite,
    )
    return UnifyState(z_src=z_src_new, z_tgt=z_tgt_new), stats

  def _guided_steps(self, params, inputs, numeric, z_src, z_tgt, t, t_prev, k):
    """Classifier-free guided DDIM steps (eta 0) of the source (P) and target (P*) branches."""
    null = inputs.null_embeddings[k]
    sample = jnp.stack([z_src, z_src, z_tgt, z_tgt])
    ctx = jnp.stack([null, inputs.ctx_src, null, inputs.ctx_tgt]).astype(jnp.float32)
    t_4 = jnp.full((4,), t, jnp.int32)
    out, _ = self.unet_fn(params, sample, t_4, ctx, None)
    abar_T = schedule_lib.alphas_cumprod(self.schedule)
    eps = schedule_lib.eps_from_model_output(
      self.schedule.prediction_type, abar_T, sample, out.astype(jnp.float32), t_4
    )
    w = numeric.guidance
    eps_src = eps[0] + w * (eps[1] - eps[0])
    eps_tgt = eps[2] + w * (eps[3] - eps[2])
    return (
      schedule_lib.ddim_step(self.schedule, eps_src, t, t_prev, z_src),
      schedule_lib.ddim_step(self.schedule, eps_tgt, t, t_prev, z_tgt),
    )

  def snapshot(self, state: UnifyState):
    return state.z_tgt

  def finish(self, state: UnifyState):
    return state.z_tgt, state.z_src


def word_weights(groups, length: int, num_words: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(word_weights [W, length], word_valid [W]) from each edit word's token positions.

  Row w averages word w's sub-token columns (1/n at its n positions). Rows past the words (padding
  to `num_words`, for a batch of edits with different word counts) repeat the first word's row so
  that they stay finite; `word_valid` drops them.
  """
  groups = [tuple(g) for g in groups]
  if not groups or not all(groups):
    raise ValueError("UnifyEdit needs at least one edit word with at least one token")
  num_words = len(groups) if num_words is None else num_words
  if num_words < len(groups):
    raise ValueError(f"num_words={num_words} < {len(groups)} edit words")
  weights = np.zeros((num_words, length), np.float32)
  for i in range(num_words):
    g = groups[i] if i < len(groups) else groups[0]
    weights[i, list(g)] = 1.0 / len(g)
  return weights, np.arange(num_words) < len(groups)
