"""Building blocks shared by the U-Net and the VAE (diffusers `resnet.py` semantics, NHWC)."""

from __future__ import annotations

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


def random_params(shapes, key: jax.Array, dtype=jnp.float32):
  """Random params with the structure of `shapes` (a tree of `jax.ShapeDtypeStruct`), from one draw.

  Kernels ~ N(0, 1 / fan_in); norm scales ~ 1 + N(0, 0.02^2); biases and embeddings ~ N(0, 0.02^2),
  so no parameter is constant. One normal draw for the whole tree: Flax's per-layer initialisers
  compile one RNG kernel per parameter, which takes about a minute on CPU even for a tiny VAE.
  Needs a concrete key (not for use under `jit`).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
  flat = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
  out, offset = [], 0
  for (path, leaf), n in zip(leaves, sizes, strict=True):
    x = flat[offset : offset + n].reshape(leaf.shape)
    offset += n
    name = getattr(path[-1], "key", None)
    if name == "kernel":
      x = x / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "scale":
      x = 1.0 + 0.02 * x
    else:
      x = 0.02 * x
    out.append(jnp.asarray(x, dtype))
  return jax.tree_util.tree_unflatten(treedef, out)
