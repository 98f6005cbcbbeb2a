"""Building blocks shared by the U-Net and the VAE (diffusers `resnet.py` semantics, NHWC)."""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def group_norm(name: str, groups: int, eps: float, dtype) -> nn.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits that the PyTorch reference keeps.
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv3x3(features: int, name: str, dtype, stride: int = 1) -> nn.Conv:
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (pre-norm, SiLU, optional time embedding, 1x1 conv shortcut)."""

  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, temb_BD=None):
    h = nn.silu(group_norm("norm1", self.groups, self.eps, self.dtype)(x_BHWC))
    h = conv3x3(self.out_channels, "conv1", self.dtype)(h)
    if temb_BD is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb_BD))
      h = h + t[:, None, None, :]
    h = nn.silu(group_norm("norm2", self.groups, self.eps, self.dtype)(h))
    h = conv3x3(self.out_channels, "conv2", self.dtype)(h)
    if x_BHWC.shape[-1] != self.out_channels:
      x_BHWC = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x_BHWC)
    return (x_BHWC + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `padding=0` is the VAE's asymmetric variant (pad right/bottom by one)."""

  out_channels: int
  padding: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    if self.padding == 0:
      x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
      pad = ((0, 0), (0, 0))
    else:
      pad = ((self.padding, self.padding),) * 2
    return nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, name="conv")(
      x_BHWC
    )


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv.

  `output_hw` forces the upsampled size, as diffusers' `upsample_size` does in the U-Net when the
  latent side is not a multiple of 2**num_upsamplers (a skip of odd size 2n-1 meets a 2n upsample).
  """

  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, output_hw: tuple[int, int] | None = None):
    b, h, w, c = x_BHWC.shape
    if output_hw is None or tuple(output_hw) == (2 * h, 2 * w):
      x_BHWC = jax.image.resize(x_BHWC, (b, 2 * h, 2 * w, c), method="nearest")
    else:
      # torch `F.interpolate(size=..., mode="nearest")`: source index floor(i * in / out), float32.
      rows = _nearest_indices(h, output_hw[0])
      cols = _nearest_indices(w, output_hw[1])
      x_BHWC = x_BHWC[:, rows][:, :, cols]
    return conv3x3(self.out_channels, "conv", self.dtype)(x_BHWC)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32)
  return np.minimum(idx, n_in - 1)


def random_params(
  shapes,
  key: jax.Array | int,
  dtype=jnp.float32,
  *,
  bias_std: float = 0.02,
  scale_std: float = 0.02,
  kernel_gain: Mapping[str, float] | None = None,
):
  """Random params with the structure of `shapes` (a tree of `jax.ShapeDtypeStruct`): the one random init.

  Kernels ~ N(0, gain^2 / fan_in) (LeCun normal, fan_in = every axis but the last); norm scales ~
  1 + N(0, scale_std^2); every other leaf (biases, embeddings, raw parameters) ~ N(0, bias_std^2).
  The defaults leave no parameter constant (a weight table bug cannot hide behind zeros or ones);
  `bias_std = scale_std = 0` gives Flax's default biases (zero) and scales (one).

  Drawn leaf by leaf, in tree order, with numpy: no XLA program is compiled (Flax's initialisers
  compile one RNG kernel per parameter, a minute on CPU even for a tiny VAE) and the peak memory is
  the params themselves (one `jax.random` draw for all of SD1.5's U-Net peaked at 13 GiB of RSS).

  Args:
    shapes: the param tree as `jax.ShapeDtypeStruct`s (a model's `param_shapes`).
    key: a concrete PRNG key (not for use under `jit`) or an int seed for numpy's generator.
    dtype: the dtype of every returned leaf.
    bias_std, scale_std: standard deviations of the non-kernel leaves, as above.
    kernel_gain: module name -> gain for the kernels of modules of that name (e.g.
      `{"to_q": 1.5, "to_k": 1.5}` sharpens attention maps); 1 for every other kernel.

  Returns:
    The tree of `shapes` with `jnp` arrays of `dtype`.
  """
  if not isinstance(key, int | np.integer):
    key = np.asarray(jax.random.key_data(key)).ravel().tolist()  # the key's bits seed numpy
  rng = np.random.default_rng(key)
  gains = dict(kernel_gain or {})

  def leaf(path, shape):
    name = getattr(path[-1], "key", None)
    x = rng.standard_normal(shape.shape, np.float32)
    if name == "kernel":
      module = getattr(path[-2], "key", None) if len(path) > 1 else None
      x = gains.get(module, 1.0) * x / np.sqrt(np.prod(shape.shape[:-1]))
    elif name == "scale":
      x = 1.0 + scale_std * x if scale_std else np.ones_like(x)
    else:
      x = bias_std * x if bias_std else np.zeros_like(x)  # no -0.0
    return jnp.asarray(x, dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)
