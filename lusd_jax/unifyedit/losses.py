"""UnifyEdit's two attention constraints and the adaptive time-step scheduler (paper Sec. 4).

Pure functions of attention maps and scalars, for ONE element (the engine vmaps them):

  L_SAP = sum_l sum (A^l - A*^l)^2                                       (Eq. 7, self-attention)
        = sum_l sum (A^l (.) M M^T - A*^l (.) M M^T)^2                   (Eq. 8, region variant)
  R_l   = mean_{j in M} C^l_j[s*] / mean_{j not in M} C^l_j[s*]          (Eq. 9, cross-attention)
  L_CAA = -(sum_l sqrt(R_l))^2                                           (Eq. 10, summed over words)
  lambda1 = beta1 (1 - exp(-k1 (T - t))), lambda2 = beta2 exp(-k2 (T - t))        (Eq. 14)
  G = lambda1 g_SAP / (||g_SAP|| + 1e-12) + lambda2 g_CAA / (||g_CAA|| + 1e-12)   (Eq. 15)

t is the step index T, ..., 1 (not the DDPM timestep). Maps are the U-Net's per-layer head means
(`CaptureSpec.per_layer_maps`): self [N, N], cross [N, L_text], tokens row-major over (h, w).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax.unifyedit.config import UnifyEditNumeric

NORM_EPS = 1e-12  # Eq. 15's denominator guard


def nearest_mask(mask_HW: jax.Array, h: int, w: int) -> jax.Array:
  """A binary mask at h x w by nearest (center) sampling, then > 0: [h, w] float32.

  Output pixel i reads input row floor((i + 0.5) H / h) (torch's "nearest-exact", PIL's NEAREST),
  so a mask downsampled by an integer factor f keeps the pixel at the center of each f x f cell.
  """
  big_h, big_w = mask_HW.shape
  rows = np.floor((np.arange(h) + 0.5) * big_h / h).astype(np.int32)
  cols = np.floor((np.arange(w) + 0.5) * big_w / w).astype(np.int32)
  return (mask_HW[rows][:, cols] > 0).astype(jnp.float32)


def sap_loss(src_maps, tgt_maps, region_masks=None) -> jax.Array:
  """L_SAP (Eq. 7), or Eq. 8 when `region_masks` gives each layer's flattened mask.

  Args:
    src_maps: per layer [N, N] source self-attention maps A^l (constants of the step).
    tgt_maps: per layer [N, N] target maps A*^l.
    region_masks: None, or per layer [N] float mask M at that layer's resolution.

  Returns:
    scalar float32: the sum over layers and elements of the squared differences.
  """
  total = jnp.float32(0.0)
  for i, (a, b) in enumerate(zip(src_maps, tgt_maps, strict=True)):
    diff = a - b
    if region_masks is not None:
      m = region_masks[i]
      diff = diff * (m[:, None] * m[None, :])  # (A - A*) (.) M M^T
    total = total + jnp.sum(diff.astype(jnp.float32) ** 2)
  return total


def caa_ratios(cross_maps, word_weights_WL: jax.Array, mask_N: jax.Array, has_mask: jax.Array) -> jax.Array:
  """R_l (Eq. 9) of every edit word at every captured cross-attention layer: [W, L_layers].

  Args:
    cross_maps: per layer [N, L_text] cross-attention probabilities (the same resolution for all).
    word_weights_WL: [W, L_text], row w the mean over word w's sub-token columns (1/n at its n
      positions). Padding rows must be finite weights too (e.g. a copy of a real word's row);
      `caa_loss` drops them.
    mask_N: the [N] binary mask at that resolution (all ones for a global edit).
    has_mask: bool; False: a global edit, R_l = mean_j C^l_j[s*] (the ratio has no outside).

  Returns:
    [W, L_layers] float32.
  """
  ratios = []
  for c_NL in cross_maps:
    col_NW = c_NL.astype(jnp.float32) @ word_weights_WL.T  # C^l[s*], the word's sub-token mean
    inside = jnp.sum(col_NW * mask_N[:, None], axis=0) / jnp.sum(mask_N)
    # max(., 1): a full mask (global edit) has no outside; its ratio is not taken, and 0 / 1
    # keeps the unused branch (and its gradient) finite.
    outside = jnp.sum(col_NW * (1.0 - mask_N)[:, None], axis=0) / jnp.maximum(jnp.sum(1.0 - mask_N), 1.0)
    ratios.append(inside / jnp.where(has_mask, outside, 1.0))
  return jnp.stack(ratios, axis=-1)


def caa_loss(ratios_WL: jax.Array, word_valid_W: jax.Array) -> jax.Array:
  """L_CAA (Eq. 10) summed over the valid words: sum_w -(sum_l sqrt(R_l))^2, scalar float32."""
  per_word = -(jnp.sum(jnp.sqrt(ratios_WL), axis=-1) ** 2)
  return jnp.sum(jnp.where(word_valid_W, per_word, 0.0))


def scheduler(t: jax.Array, num_steps: int, numeric: UnifyEditNumeric) -> tuple[jax.Array, jax.Array]:
  """(lambda1, lambda2) at step index t: Eq. 14, or Algorithm 1's printed form when selected."""
  t = jnp.asarray(t, jnp.float32)
  elapsed = num_steps - t
  eq14 = (
    numeric.beta1 * (1.0 - jnp.exp(-numeric.k1 * elapsed)),
    numeric.beta2 * jnp.exp(-numeric.k2 * elapsed),
  )
  alg1 = (numeric.beta1 * jnp.exp(-numeric.k1 * t), numeric.beta2 * (1.0 - jnp.exp(-numeric.k2 * t)))
  return tuple(jnp.where(numeric.algorithm1_form, a, e) for e, a in zip(eq14, alg1, strict=True))


def step_weights(t: jax.Array, num_steps: int, numeric: UnifyEditNumeric) -> tuple[jax.Array, jax.Array]:
  """The weights of the two gradients at step index t: the family's lambdas, 0 outside a window.

  blc / sap_only / caa_only: the scheduler's lambdas; norm and naive: beta1, beta2 (static). L_SAP
  acts while t >= tau2, L_CAA while t >= tau1 (inclusive).
  """
  l1, l2 = scheduler(t, num_steps, numeric)
  l1 = jnp.where(numeric.scheduled, l1, numeric.beta1)
  l2 = jnp.where(numeric.scheduled, l2, numeric.beta2)
  sap_on = numeric.use_sap & (t >= numeric.tau2)
  caa_on = numeric.use_caa & (t >= numeric.tau1)
  return jnp.where(sap_on, l1, 0.0), jnp.where(caa_on, l2, 0.0)


def combine(g_sap, g_caa, w_sap, w_caa, normalized) -> jax.Array:
  """G (Eq. 15; Eq. 12 with raw gradients when not `normalized`); a zero weight drops its term.

  A term with weight 0 contributes exactly 0 even if its gradient is not finite.
  """

  def term(g, w):
    unit = g / (jnp.sqrt(jnp.sum(g**2)) + NORM_EPS)
    return jnp.where(w != 0, w * jnp.where(normalized, unit, g), 0.0)

  return term(g_sap, w_sap) + term(g_caa, w_caa)
