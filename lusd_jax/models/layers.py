"""Building blocks shared by the U-Net and the VAE (diffusers `resnet.py` semantics, NHWC)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    b, h, w, c = x_BHWC.shape
    x_BHWC = jax.image.resize(x_BHWC, (b, 2 * h, 2 * w, c), method="nearest")
    return conv3x3(self.out_channels, "conv", self.dtype)(x_BHWC)
