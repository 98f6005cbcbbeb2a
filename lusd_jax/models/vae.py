"""Stable Diffusion's VAE (diffusers `AutoencoderKL`) in Flax, NHWC.

Reads top to bottom as diffusers builds it (`autoencoders/vae.py`, `unets/unet_2d_blocks.py`):

  Encoder: conv_in -> down_blocks (DownEncoderBlock2D: resnets, asymmetric stride-2 downsampler)
           -> mid_block (resnet, single-head self-attention, resnet) -> GroupNorm -> SiLU -> conv_out
  quant_conv (1x1) -> (mean, logvar)
  post_quant_conv (1x1) -> Decoder: conv_in -> mid_block -> up_blocks (UpDecoderBlock2D:
           layers_per_block + 1 resnets, nearest 2x upsampler) -> GroupNorm -> SiLU -> conv_out

Every norm in the VAE uses eps 1e-6. Images are in [-1, 1]; latents are *not* multiplied by
`scaling_factor` here (the pipeline does that), exactly as `AutoencoderKL.encode/decode`.

Example:

  config = VAEConfig.from_json("sd15/vae/config.json")
  params = params_from_torch(state_dict, config)
  mean_BhwC = encode_mean(params, config, image_BHWC)
  image_BHWC = decode(params, config, mean_BhwC)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax import weights
from lusd_jax.compiler import jit
from lusd_jax.configs import config_kwargs
from lusd_jax.models import attention
from lusd_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv3x3, group_norm, random_params

# diffusers builds every VAE resnet, attention and output norm with this eps.
VAE_EPS = 1e-6
# `DiagonalGaussianDistribution` clamps the log-variance before using it.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The keys of a diffusers `vae/config.json` (AutoencoderKL)."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
      raise ValueError(
        f"VAE config: down_block_types={self.down_block_types}; only DownEncoderBlock2D is supported."
      )
    if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
      raise ValueError(
        f"VAE config: up_block_types={self.up_block_types}; only UpDecoderBlock2D is supported."
      )
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
        f"VAE config: block_out_channels has {n} entries but down_block_types has {len(self.down_block_types)}"
        f" and up_block_types {len(self.up_block_types)}."
      )
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"VAE config: act_fn={self.act_fn!r} is not supported (only 'silu').")
    if self.latents_mean is not None or self.latents_std is not None:
      raise ValueError(
        "VAE config: latents_mean/latents_std (per-channel latent normalisation) are not supported."
      )
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"VAE config: block_out_channels entry {c} is not divisible by norm_num_groups={self.norm_num_groups}."
        )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
    """Builds the config from `config.json` contents; `_` keys are metadata and ignored.

    Raises:
      ValueError: naming a key this architecture does not know, or an unsupported value.
    """
    return cls(**config_kwargs(cls, d, name="VAE config"))

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> VAEConfig:
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))

  @property
  def downsample_factor(self) -> int:
    """Image size / latent size (8 for every SD VAE)."""
    return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(nn.Module):
  """The VAE mid-block's spatial self-attention (diffusers `Attention`, `_from_deprecated_attn_block`).

  One head over all channels (`heads = C // attention_head_dim` with `attention_head_dim = C`),
  GroupNorm in front, biased projections, residual connection, no output rescale.
  """

  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    b, h, w, c = x_BHWC.shape
    x_BTC = group_norm("group_norm", self.groups, VAE_EPS, self.dtype)(x_BHWC).reshape(b, h * w, c)
    q_BTNH, k_BTNH, v_BTNH = (
      nn.Dense(c, dtype=self.dtype, name=name)(x_BTC)[:, :, None, :] for name in ("to_q", "to_k", "to_v")
    )
    out_BTNH = attention.dot_product_attention(q_BTNH, k_BTNH, v_BTNH)
    out_BTC = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out_BTNH.reshape(b, h * w, c))
    return out_BTC.reshape(b, h, w, c) + x_BHWC


class UNetMidBlock2D(nn.Module):
  """resnet -> (attention -> resnet); the attention is dropped with `mid_block_add_attention=False`."""

  channels: int
  groups: int
  add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    x_BHWC = ResnetBlock2D(self.channels, self.groups, VAE_EPS, dtype=self.dtype, name="resnets_0")(x_BHWC)
    if self.add_attention:
      x_BHWC = VAEAttention(self.groups, dtype=self.dtype, name="attentions_0")(x_BHWC)
    return ResnetBlock2D(self.channels, self.groups, VAE_EPS, dtype=self.dtype, name="resnets_1")(x_BHWC)


class DownEncoderBlock2D(nn.Module):
  """`num_layers` resnets, then a stride-2 conv padded only right/bottom (`downsample_padding=0`)."""

  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    for j in range(self.num_layers):
      x_BHWC = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype, name=f"resnets_{j}")(
        x_BHWC
      )
    if self.add_downsample:
      x_BHWC = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x_BHWC)
    return x_BHWC


class UpDecoderBlock2D(nn.Module):
  """`num_layers` resnets, then nearest 2x upsampling and a 3x3 conv."""

  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    for j in range(self.num_layers):
      x_BHWC = ResnetBlock2D(self.out_channels, self.groups, VAE_EPS, dtype=self.dtype, name=f"resnets_{j}")(
        x_BHWC
      )
    if self.add_upsample:
      x_BHWC = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x_BHWC)
    return x_BHWC


class Encoder(nn.Module):
  """Image `[B, H, W, in_channels]` -> moments `[B, H/f, W/f, 2 * latent_channels]` (before quant_conv)."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    cfg = self.config
    chans = cfg.block_out_channels
    g = cfg.norm_num_groups
    h = conv3x3(chans[0], "conv_in", self.dtype)(x_BHWC)
    for i, c in enumerate(chans):
      h = DownEncoderBlock2D(
        c,
        cfg.layers_per_block,
        g,
        add_downsample=i < len(chans) - 1,
        dtype=self.dtype,
        name=f"down_blocks_{i}",
      )(h)
    h = UNetMidBlock2D(chans[-1], g, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(h)
    h = nn.silu(group_norm("conv_norm_out", g, VAE_EPS, self.dtype)(h))
    return conv3x3(2 * cfg.latent_channels, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
  """Latent `[B, h, w, latent_channels]` -> image `[B, h*f, w*f, out_channels]`."""

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z_BhwC):
    cfg = self.config
    chans = cfg.block_out_channels
    g = cfg.norm_num_groups
    h = conv3x3(chans[-1], "conv_in", self.dtype)(z_BhwC)
    h = UNetMidBlock2D(chans[-1], g, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(h)
    for i, c in enumerate(reversed(chans)):
      h = UpDecoderBlock2D(
        c,
        cfg.layers_per_block + 1,
        g,
        add_upsample=i < len(chans) - 1,
        dtype=self.dtype,
        name=f"up_blocks_{i}",
      )(h)
    h = nn.silu(group_norm("conv_norm_out", g, VAE_EPS, self.dtype)(h))
    return conv3x3(cfg.out_channels, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL`: `encode` -> (mean, logvar), `decode` latents -> image.

  Attributes:
    config: the checkpoint's `vae/config.json`.
    dtype: computation dtype (params keep their own dtype).
  """

  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    lat = self.config.latent_channels
    self.encoder = Encoder(self.config, self.dtype)
    self.decoder = Decoder(self.config, self.dtype)
    if self.config.use_quant_conv:
      self.quant_conv = nn.Conv(2 * lat, (1, 1), dtype=self.dtype)
    if self.config.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(lat, (1, 1), dtype=self.dtype)

  def encode(self, x_BHWC):
    """Images in [-1, 1] `[B, H, W, in_channels]` -> (mean, logvar), each `[B, H/8, W/8, latent_channels]`.

    The log-variance is clamped to [-30, 20] as `DiagonalGaussianDistribution` does.
    """
    moments_BhwC = self.encoder(x_BHWC)
    if self.config.use_quant_conv:
      moments_BhwC = self.quant_conv(moments_BhwC)
    mean_BhwC, logvar_BhwC = jnp.split(moments_BhwC, 2, axis=-1)
    return mean_BhwC, jnp.clip(logvar_BhwC, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z_BhwC):
    """Unscaled latents `[B, h, w, latent_channels]` -> images `[B, 8h, 8w, out_channels]` (about [-1, 1])."""
    if self.config.use_post_quant_conv:
      z_BhwC = self.post_quant_conv(z_BhwC)
    return self.decoder(z_BhwC)

  def __call__(self, x_BHWC):
    """Reconstruction through the posterior mean (also what `init` traces to create every param)."""
    return self.decode(self.encode(x_BHWC)[0])


def param_shapes(config: VAEConfig):
  """The param tree of `config` as `jax.ShapeDtypeStruct`s (float32; nothing is computed)."""
  f = config.downsample_factor
  x_BHWC = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x_BHWC)["params"]


def init_params(config: VAEConfig, key: jax.Array, dtype=jnp.float32):
  """Random params for `config` (see `layers.random_params`), as float `dtype`."""
  return random_params(param_shapes(config), key, dtype)


def params_from_torch(
  state_dict: Mapping[str, np.ndarray],
  config: VAEConfig,
  source: str = "vae/diffusion_pytorch_model.safetensors",
  dtype=np.float32,
):
  """A diffusers `AutoencoderKL` state dict (numpy arrays) -> Flax params.

  Old checkpoints whose mid-block attention is named `query/key/value/proj_attn` (and stores 1x1
  convs instead of linears) load as well.

  Raises:
    weights.WeightsError: naming the key when a key does not fit `config`, a shape differs, or a
      parameter is missing.
  """
  return weights.convert_state_dict(
    state_dict, param_shapes(config), renames=weights.legacy_vae_renames, dtype=dtype, source=source
  )


# `encode_moments` and `decode` are jitted (config and dtype static): one compilation per input
# shape instead of op-by-op dispatch, and they still work inside a caller's own `jit`.
_jit = functools.partial(jit, static_argnames=("config", "dtype"))


def _apply(params, config: VAEConfig, dtype, method, *args):
  return AutoencoderKL(config, dtype).apply({"params": params}, *args, method=method)


@_jit
def encode_moments(params, config: VAEConfig, x_BHWC, *, dtype=jnp.float32):
  """Images in [-1, 1] `[B, H, W, C]` -> (mean, clamped logvar), each `[B, H/8, W/8, latent_channels]`."""
  return _apply(params, config, dtype, AutoencoderKL.encode, x_BHWC)


def encode_mean(params, config: VAEConfig, x_BHWC, *, dtype=jnp.float32):
  """Posterior mean `[B, H/8, W/8, latent_channels]` (unscaled), i.e. `latent_dist.mode()`."""
  return encode_moments(params, config, x_BHWC, dtype=dtype)[0]


@_jit
def decode(params, config: VAEConfig, z_BhwC, *, dtype=jnp.float32):
  """Unscaled latents `[B, h, w, latent_channels]` -> images `[B, 8h, 8w, out_channels]`."""
  return _apply(params, config, dtype, AutoencoderKL.decode, z_BhwC)
