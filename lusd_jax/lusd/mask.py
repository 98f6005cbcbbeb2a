"""LUSD's attention-based editing mask (paper Sec. 4.1, Algorithm 2) and torch-exact bicubic resizing.

The mask says where the edit happens. From the target-prompt half of a U-Net call we read
  - A_S, the self-attention probabilities at half the latent resolution ([N_s, N_s], N_s = h/2 * w/2),
  - A_C, the cross-attention probabilities at a quarter of it ([N_c, 77]),
both averaged over heads and layers. The edit tokens' cross maps, upsampled to the self-attention
grid and averaged, are propagated by the self-attention matrix (A_hat = A_S @ A_C, "self-attention
exponentiation"), upsampled to the latent, and min-max normalized to [0, 1].

Bicubic resizing reproduces `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`
(Keys' cubic convolution with a = -0.75, taps clamped at the borders, no antialiasing), which the
official code uses; `jax.image.resize` uses a = -0.5 and renormalizes weights at the borders.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # torch's bicubic coefficient


def _cubic_weights(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
  """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fraction t: [n, 4]."""

  def near(x):  # |x| <= 1
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

  return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The [out, in] matrix of torch's 1-D bicubic resampling (align_corners=False).

  Source coordinate of output i: (i + 0.5) * in / out - 0.5 (not clamped at 0, as torch's cubic
  path); the 4 taps around it get Keys' weights and indices clamped to [0, in - 1], so border taps
  pile onto the edge pixel.
  """
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  # torch's guard_index_and_lambda: floor capped at in - 1, fraction clamped to [0, 1].
  base = np.minimum(np.floor(src), in_size - 1)
  frac = np.clip(src - base, 0.0, 1.0)
  weights = _cubic_weights(frac)
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
  mat = np.zeros((out_size, in_size), dtype=np.float64)
  np.add.at(mat, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
  mat.setflags(write=False)
  return mat


def bicubic_resize(x_HW: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Resizes the two leading (spatial) axes exactly as torch's bicubic interpolate.

  Separable: out = M_h @ x @ M_w^T with the constant matrices of `bicubic_matrix`.

  Args:
    x_HW: [H, W, ...] (trailing axes, e.g. channels or tokens, are resized independently).
    out_hw: (H', W').

  Returns:
    [H', W', ...] in x's dtype.
  """
  h, w = x_HW.shape[:2]
  mh = jnp.asarray(bicubic_matrix(h, out_hw[0]), dtype=x_HW.dtype)
  mw = jnp.asarray(bicubic_matrix(w, out_hw[1]), dtype=x_HW.dtype)
  hi = jax.lax.Precision.HIGHEST
  y = jnp.tensordot(mh, x_HW, axes=(1, 0), precision=hi)  # [H', W, ...]
  y = jnp.tensordot(mw, y, axes=(1, 1), precision=hi)  # [W', H', ...]
  return jnp.swapaxes(y, 0, 1)


def minmax_normalize(x: jax.Array) -> jax.Array:
  """(x - min) / (max - min), clamped to [0, 1].

  A constant map carries no location, so it normalizes to all ones (no localization) rather
  than the official code's 0 / 0.
  """
  lo, hi = jnp.min(x), jnp.max(x)
  span = hi - lo
  y = (x - lo) / jnp.where(span > 0, span, 1.0)
  return jnp.where(span > 0, jnp.clip(y, 0.0, 1.0), jnp.ones_like(x))


def attention_mask(
  self_attn_NN: jax.Array,
  cross_attn_NL: jax.Array,
  edit_mask_L: jax.Array,
  latent_hw: tuple[int, int],
) -> jax.Array:
  """The raw LUSD mask M of one U-Net call (Algorithm 2), before the moving average.

  Args:
    self_attn_NN: [N_s, N_s] self-attention probabilities at (h/2, w/2), rows = queries,
      averaged over heads and layers.
    cross_attn_NL: [N_c, L] cross-attention probabilities at (h/4, w/4), averaged likewise.
    edit_mask_L: [L] weights of the edit tokens E (1 at edit positions, 0 elsewhere).
    latent_hw: (h, w), the latent size.

  Returns:
    M_hw: [h, w] float32 in [0, 1]. Callers must handle an empty E themselves (the token average
    is then all zero, and this returns the all-ones map).
  """
  h, w = latent_hw
  hs, ws = h // 2, w // 2
  hc, wc = h // 4, w // 4
  if self_attn_NN.shape != (hs * ws, hs * ws) or cross_attn_NL.shape[0] != hc * wc:
    raise ValueError(
      f"attention maps {self_attn_NN.shape}, {cross_attn_NL.shape} do not fit latent {latent_hw}: "
      f"expected self [{hs * ws}, {hs * ws}] and cross [{hc * wc}, L]"
    )
  hi = jax.lax.Precision.HIGHEST
  # Average of the edit tokens' cross maps (bicubic is linear: averaging before upsampling the
  # 77 maps gives the same map as the official upsample-then-average, for 1/77 of the work).
  weights_L = edit_mask_L.astype(jnp.float32)
  weights_L = weights_L / jnp.maximum(jnp.sum(weights_L), 1e-12)
  cross_hw = jnp.einsum("NL,L->N", cross_attn_NL.astype(jnp.float32), weights_L, precision=hi)
  cross_hw = bicubic_resize(cross_hw.reshape(hc, wc), (hs, ws))
  # Alg. 2: A_hat = A_S @ A_C, each query pixel gathers the edit tokens' attention of the
  # pixels it attends to.
  refined = jnp.einsum("QK,K->Q", self_attn_NN.astype(jnp.float32), cross_hw.reshape(-1), precision=hi)
  up_hw = bicubic_resize(refined.reshape(hs, ws), (h, w))
  return minmax_normalize(up_hw)
