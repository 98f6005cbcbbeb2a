"""Stable Diffusion's U-Net (diffusers `UNet2DConditionModel`, SD 1.x / 2.x) in Flax, NHWC.

(Over 450 lines on purpose: one model in one file that reads top to bottom, as big_vision keeps its
models; the attention capture is part of the blocks it flows out of.)

Reads top to bottom as diffusers builds it (`unets/unet_2d_condition.py`, `unets/unet_2d_blocks.py`,
`transformers/transformer_2d.py`, `attention.py`):

  timesteps -> sinusoidal embedding (c0) -> time_embedding: linear_1, SiLU, linear_2 (4 * c0)
  conv_in -> down_blocks (CrossAttnDownBlock2D / DownBlock2D: [resnet, transformer] x layers,
             stride-2 downsampler) -> mid_block (resnet, transformer, resnet)
          -> up_blocks (CrossAttnUpBlock2D / UpBlock2D: [concat skip, resnet, transformer] x
             (layers + 1), nearest 2x upsampler) -> GroupNorm -> SiLU -> conv_out
  transformer (Transformer2DModel): GroupNorm(eps 1e-6) -> proj_in -> BasicTransformerBlock x n
             (LayerNorm -> self-attention, LayerNorm -> cross-attention, LayerNorm -> GEGLU MLP,
             each residual) -> proj_out -> + input

Attention maps leave the U-Net as values, not through hooks (big_vision style): every transformer
returns the head-averaged softmax probabilities of the layers that a static `CaptureSpec` selects,
and the U-Net averages them over those layers. Every layer computes its output through
`attention.attend` with the implementation `attention_impl` names, or the one "auto" picks for it
(`attention.select`). A captured layer either gets its head-mean map from the same call (the
"pallas" map kernel of `lusd_jax.kernels`: forced, or "auto" on GPU / TPU; it never holds the
per-head probabilities) or recomputes its probabilities on the side, for the selected batch rows
only (every other implementation, on CPU under "auto", and per-head maps). With one implementation
for every layer, capturing never changes the noise prediction (the kernel's map is a second pass
beside an unchanged output); under "auto" on GPU / TPU a captured layer's output comes from the map
kernel instead of cuDNN / XLA, which changes it by float rounding. LUSD reads the cross-attention map
of the edited token to localize the update.
The per-layer mode (`CaptureSpec.per_layer_maps`) returns each selected layer's maps instead, in
U-Net order, head-averaged or per head; `map_layers` says which layer each entry is.

Example:

  config = UNetConfig.from_json("sd15/unet/config.json")
  params = params_from_torch(state_dict, config)
  model = UNet2DConditionModel(config)
  spec = CaptureSpec(self_res=32, cross_res=16)
  eps_BHWC, maps = model.apply({"params": params}, latents_BHWC, t, context_BLD, capture=spec)
  maps.cross_attn  # [B, 16 * 16, 77] float32, rows sum to 1

  spec = CaptureSpec.per_layer_maps(cross_res=16, batch=(1, 2))  # every self layer, 16x16 cross
  _, maps = model.apply({"params": params}, latents_BHWC, t, context_BLD, capture=spec)
  map_layers(config, (64, 64), spec).cross_layers[0].name  # 'down_blocks.2.attentions.0....attn2'
  maps.cross_layers[0]  # [1, 256, 77]; heads="all" gives [1, 8, 256, 77]

Under `jax.jit`, pass `capture` as a static argument (it is hashable), e.g. close over it with
`functools.partial`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lusd_jax import weights
from lusd_jax.configs import config_kwargs
from lusd_jax.models import attention
from lusd_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, group_norm, random_params

CROSS_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"

# diffusers' Transformer2DModel normalizes its input with eps 1e-6 whatever the U-Net's norm_eps;
# BasicTransformerBlock's LayerNorms use nn.LayerNorm's default 1e-5.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5

# `config.json` keys this implementation accepts only at diffusers' default value (every one of them
# adds or changes layers that SD 1.x / 2.x do not have).
_DEFAULT_ONLY: dict[str, Any] = {
  "only_cross_attention": False,
  "mid_block_only_cross_attention": None,
  "dual_cross_attention": False,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "class_embed_type": None,
  "num_class_embeds": None,
  "class_embeddings_concat": False,
  "projection_class_embeddings_input_dim": None,
  "addition_embed_type": None,
  "addition_time_embed_dim": None,
  "time_cond_proj_dim": None,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "resnet_time_scale_shift": "default",
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "attention_type": "default",
  "cross_attention_norm": None,
  "reverse_transformer_layers_per_block": None,
}
# Keys that hold no weight and change nothing at inference (dropout), or only matter for a feature
# rejected above (the additional embedding's head count).
_IGNORED = ("dropout", "addition_embed_type_num_heads")


def _per_block(value, n: int, key: str) -> tuple:
  """An int-or-list config value as one entry per block (diffusers broadcasts ints)."""
  if isinstance(value, tuple):
    if len(value) != n:
      raise ValueError(f"UNet config: {key} has {len(value)} entries but there are {n} down blocks.")
    return value
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The keys of a diffusers `unet/config.json` that SD 1.x / 2.x use (diffusers' defaults).

  `attention_head_dim` is diffusers' legacy name for the number of heads per block (SD1.5's 8 means
  8 heads of 40, 80, 160 channels); `num_attention_heads`, when set, takes precedence. Both are an
  int or one entry per down block; up blocks read the reversed list.

  `upcast_attention` (SD2.1) asks for attention scores and softmax in float32. Every attention path
  here already does that (`jax.nn.dot_product_attention` accumulates logits in float32, cuDNN flash
  attention and the Pallas kernel keep their softmax in float32, captured maps are float32), so the
  flag selects nothing.
  """

  sample_size: int | tuple[int, ...] | None = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN)
  mid_block_type: str | None = MID
  up_block_types: tuple[str, ...] = (UP, CROSS_UP, CROSS_UP, CROSS_UP)
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int | None = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  only_cross_attention: bool = False

  def __post_init__(self):
    n = len(self.block_out_channels)
    for key in ("down_block_types", "up_block_types"):
      if len(getattr(self, key)) != n:
        raise ValueError(
          f"UNet config: {key} has {len(getattr(self, key))} entries; block_out_channels has {n}."
        )
    for t in self.down_block_types:
      if t not in (CROSS_DOWN, DOWN):
        raise ValueError(
          f"UNet config: down_block_types entry {t!r} is not supported ({CROSS_DOWN}, {DOWN})."
        )
    for t in self.up_block_types:
      if t not in (CROSS_UP, UP):
        raise ValueError(f"UNet config: up_block_types entry {t!r} is not supported ({CROSS_UP}, {UP}).")
    if self.mid_block_type != MID:
      raise ValueError(f"UNet config: mid_block_type={self.mid_block_type!r} is not supported (only {MID}).")
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"UNet config: act_fn={self.act_fn!r} is not supported (only 'silu').")
    if self.only_cross_attention is not False:
      raise ValueError(f"UNet config: only_cross_attention={self.only_cross_attention!r} is not supported.")
    if not isinstance(self.cross_attention_dim, int):
      raise ValueError(
        f"UNet config: cross_attention_dim={self.cross_attention_dim!r}; only one int is supported."
      )
    if not isinstance(self.norm_num_groups, int):
      raise ValueError(f"UNet config: norm_num_groups={self.norm_num_groups!r}; an int is required.")
    if self.downsample_padding not in (0, 1):
      raise ValueError(
        f"UNet config: downsample_padding={self.downsample_padding!r} is not supported (0 or 1)."
      )
    for key in (
      "layers_per_block",
      "transformer_layers_per_block",
      "attention_head_dim",
      "num_attention_heads",
    ):
      value = getattr(self, key)
      if value is not None and any(not isinstance(v, int) for v in _per_block(value, n, key)):
        raise ValueError(f"UNet config: {key}={value!r}; an int or one int per block is supported.")
    for c, heads in zip(self.block_out_channels, self.heads, strict=True):
      if c % heads:
        raise ValueError(f"UNet config: block channels {c} are not divisible by {heads} attention heads.")
      if c % self.norm_num_groups:
        raise ValueError(
          f"UNet config: block channels {c} are not divisible by norm_num_groups={self.norm_num_groups}."
        )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
    """Builds the config from `config.json` contents; `_` keys are metadata and ignored.

    Raises:
      ValueError: naming a key this implementation does not know, or does not implement with the
        value given.
    """
    return cls(**config_kwargs(cls, d, name="UNet config", ignore=_IGNORED, default_only=_DEFAULT_ONLY))

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> UNetConfig:
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))

  @property
  def heads(self) -> tuple[int, ...]:
    """Attention heads per down block (diffusers: `num_attention_heads or attention_head_dim`)."""
    n = len(self.block_out_channels)
    return _per_block(self.num_attention_heads or self.attention_head_dim, n, "attention_head_dim")

  @property
  def layers(self) -> tuple[int, ...]:
    return _per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

  @property
  def transformer_layers(self) -> tuple[int, ...]:
    n = len(self.block_out_channels)
    return _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")


Resolutions = int | tuple[int, ...] | str | None
HEADS_MODES = ("mean", "all")


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
  """Which attention maps the U-Net returns (static: part of the compiled program).

  Two modes. Averaged (the default, what LUSD reads): one self map and one cross map, each the
  mean over heads and over every layer at one resolution. Per layer (`per_layer=True`, or
  `CaptureSpec.per_layer_maps(...)`): one map per selected layer, in the order the U-Net runs
  them (down blocks, mid block, up blocks), each averaged over heads (`heads="mean"`) or per head
  (`heads="all"`); `map_layers` names them.

  Attributes:
    self_res: which self-attention (attn1) layers, by the height of their feature map, e.g. 32 for
      a 64x64 latent's 32x32 level (for a non-square latent a map covers that level's h * w
      tokens). Averaged mode: one int, or None for no self map. Per-layer mode: None, an int, a
      tuple of ints or "all" (every attn1 layer).
    cross_res: the same for cross-attention (attn2) layers.
    batch: `(start, stop)` of the batch rows whose maps are returned; None for all rows.
    per_layer: return each selected layer's maps instead of their mean.
    heads: per-layer mode only: "mean" ([B', T, S] per layer; the per-head maps are never
      materialized together) or "all" ([B', heads, T, S] per layer).
  """

  self_res: Resolutions = None
  cross_res: Resolutions = None
  batch: tuple[int, int] | None = None
  per_layer: bool = False
  heads: str = "mean"

  def __post_init__(self):
    if self.heads not in HEADS_MODES:
      raise ValueError(f"CaptureSpec.heads={self.heads!r}; expected one of {HEADS_MODES}.")
    if self.batch is not None:
      object.__setattr__(self, "batch", tuple(self.batch))  # a list would not hash
    for kind in ("self", "cross"):
      res = getattr(self, f"{kind}_res")
      if not self.per_layer:
        if res is not None and not isinstance(res, int):
          raise ValueError(
            f"CaptureSpec.{kind}_res={res!r}: the averaged mode takes one int (per_layer=True takes several)."
          )
        continue
      if isinstance(res, int):
        res = (res,)
      elif res is not None and res != "all":
        if isinstance(res, str) or not all(isinstance(r, int) for r in res):
          raise ValueError(f"CaptureSpec.{kind}_res={res!r}: expected None, an int, ints or 'all'.")
        res = tuple(sorted(set(res), reverse=True))  # equal selections hash equal
      object.__setattr__(self, f"{kind}_res", res)
    if not self.per_layer and self.heads != "mean":
      raise ValueError("CaptureSpec.heads='all' needs per_layer=True (the averaged maps are head means).")
    if self.per_layer and self.self_res is None and self.cross_res is None:
      raise ValueError("CaptureSpec(per_layer=True) selects no layer: set self_res and/or cross_res.")

  @classmethod
  def per_layer_maps(
    cls,
    self_res: Resolutions = "all",
    cross_res: Resolutions = "all",
    heads: str = "mean",
    batch: tuple[int, int] | None = None,
  ) -> CaptureSpec:
    """A per-layer spec; every layer of both kinds unless narrowed.

    Example:
      >>> CaptureSpec.per_layer_maps(cross_res=16, batch=(1, 2))
      CaptureSpec(self_res='all', cross_res=(16,), batch=(1, 2), per_layer=True, heads='mean')
    """
    return cls(self_res, cross_res, batch, per_layer=True, heads=heads)

  def selects(self, kind: str, height: int) -> bool:
    """Whether the `kind` ("self" / "cross") layers on feature maps of this height are captured."""
    res = getattr(self, f"{kind}_res")
    if res is None:
      return False
    if res == "all":
      return True
    return height in res if self.per_layer else height == res


class AttentionMaps(NamedTuple):
  """Attention probabilities, float32 (float64 for a float64 U-Net), rows sum to 1.

  Tokens are the feature map's pixels flattened row-major over (h, w), as diffusers does. The
  averaged mode fills `self_attn` / `cross_attn`, the per-layer mode `self_layers` / `cross_layers`
  (`map_layers` says which layer each entry is); the rest are None.
  """

  self_attn: jax.Array | None  # [B', N_s, N_s], N_s = self_res ** 2 (h * w if not square)
  cross_attn: jax.Array | None  # [B', N_c, L_text], N_c = cross_res ** 2 (h * w if not square)
  self_layers: tuple[jax.Array, ...] | None = None  # of [B', N, N] or [B', heads, N, N]
  cross_layers: tuple[jax.Array, ...] | None = None  # of [B', N, L] or [B', heads, N, L]


class LayerInfo(NamedTuple):
  """Which attention layer a per-layer map comes from."""

  name: str  # diffusers' module path, e.g. "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
  block: str  # "down_blocks.1", "mid_block" or "up_blocks.1"
  hw: tuple[int, int]  # feature map size; the map's query tokens are h * w
  heads: int


class MapLayers(NamedTuple):
  """The layers of `AttentionMaps.self_layers` / `cross_layers`, entry by entry."""

  self_layers: tuple[LayerInfo, ...]
  cross_layers: tuple[LayerInfo, ...]


class _Capture(NamedTuple):
  """What one transformer layer records: batch rows per kind (None when not captured) and how."""

  self_rows: tuple[int, int] | None
  cross_rows: tuple[int, int] | None
  mode: str = "average"  # "average" (head mean, averaged over layers later), "mean" or "all"


def _capture_for(spec: CaptureSpec | None, height: int, batch: int) -> _Capture:
  if spec is None:
    return _Capture(None, None)
  rows = spec.batch if spec.batch is not None else (0, batch)
  pick = lambda kind: rows if spec.selects(kind, height) else None
  return _Capture(pick("self"), pick("cross"), spec.heads if spec.per_layer else "average")


def timestep_embedding(
  timesteps_B: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
  """diffusers `get_timestep_embedding`: [B] (int or float, may be fractional) -> [B, dim] float32.

  Frequencies exp(-log(max_period) * i / (dim / 2 - freq_shift)), i < dim / 2; [sin, cos], or
  [cos, sin] with `flip_sin_to_cos`; an odd `dim` is zero-padded.
  """
  half = dim // 2
  exponent_K = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args_BK = timesteps_B.astype(jnp.float32)[:, None] * jnp.exp(exponent_K)[None, :]
  emb_BD = jnp.concatenate([jnp.sin(args_BK), jnp.cos(args_BK)], axis=-1)
  if flip_sin_to_cos:
    emb_BD = jnp.concatenate([emb_BD[:, half:], emb_BD[:, :half]], axis=-1)
  if dim % 2:
    emb_BD = jnp.pad(emb_BD, ((0, 0), (0, 1)))
  return emb_BD


def _head_mean_probs(q_BTNH: jax.Array, k_BSNH: jax.Array, rows: tuple[int, int]) -> jax.Array:
  """Softmax attention probabilities of batch rows [start, stop), averaged over heads, float32.

  The same scores (scale 1/sqrt(head dim), float32 as `upcast_attention` asks) as
  `attention_with_probs`, without the value product the caller already has.
  """
  start, stop = rows
  q_BTNH = q_BTNH[start:stop].astype(jnp.float32)
  k_BSNH = k_BSNH[start:stop].astype(jnp.float32)
  scores_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH) * q_BTNH.shape[-1] ** -0.5
  return jnp.mean(jax.nn.softmax(scores_BNTS, axis=-1), axis=1)


def _layer_probs(q_BTNH: jax.Array, k_BSNH: jax.Array, rows: tuple[int, int], heads: str) -> jax.Array:
  """Per-layer probabilities of batch rows [start, stop): [B', N, T, S] (`heads="all"`) or their head
  mean [B', T, S] (`heads="mean"`), in float32 or wider.

  The head mean sums the heads one at a time under `lax.scan`, each head rematerialized
  (`jax.checkpoint`), so forward and backward hold one head's [B', T, S] probabilities, not N of
  them: 64 MiB instead of 512 MiB per row for SD1.5's 8 heads at a 64x64 level.
  """
  start, stop = rows
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  q_BTNH = q_BTNH[start:stop].astype(dtype)
  k_BSNH = k_BSNH[start:stop].astype(dtype)
  scale = q_BTNH.shape[-1] ** -0.5
  if heads == "all":
    return jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH) * scale, axis=-1)

  @jax.checkpoint
  def add_head(sum_BTS, qk):
    q_BTH, k_BSH = qk
    return sum_BTS + jax.nn.softmax(jnp.einsum("BTH,BSH->BTS", q_BTH, k_BSH) * scale, axis=-1), None

  b, t, n, _ = q_BTNH.shape
  sum_BTS = jnp.zeros((b, t, k_BSNH.shape[1]), dtype)
  sum_BTS, _ = jax.lax.scan(add_head, sum_BTS, (q_BTNH.transpose(2, 0, 1, 3), k_BSNH.transpose(2, 0, 1, 3)))
  return sum_BTS / n


class Attention(nn.Module):
  """diffusers `Attention` as SD uses it: bias-free to_q/to_k/to_v, biased to_out.0, no residual.

  Returns (out_BTC, probs): the probabilities of the `rows` batch rows (None when `rows` is None),
  head-averaged ([B', T, S]) unless `mode` is "all" ([B', N, T, S]).
  """

  heads: int
  head_dim: int
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x_BTC, context_BSD=None, rows: tuple[int, int] | None = None, mode: str = "average"):
    context_BSD = x_BTC if context_BSD is None else context_BSD
    if x_BTC.shape[0] != context_BSD.shape[0]:  # one shared sample meets B prompts (UNet docstring)
      x_BTC = jnp.broadcast_to(x_BTC, (context_BSD.shape[0], *x_BTC.shape[1:]))
    b, t, c = x_BTC.shape
    s = context_BSD.shape[1]
    inner = self.heads * self.head_dim
    dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)
    q_BTNH = dense("to_q")(x_BTC).reshape(b, t, self.heads, self.head_dim)
    k_BSNH = dense("to_k")(context_BSD).reshape(b, s, self.heads, self.head_dim)
    v_BSNH = dense("to_v")(context_BSD).reshape(b, s, self.heads, self.head_dim)
    # A map kernel ("pallas": forced, or "auto" on GPU / TPU) returns the head-mean map with the
    # output; otherwise the map is computed beside the output. grad: the U-Net may be differentiated
    # (UnifyEdit's map losses), so only differentiable implementations qualify.
    out_BTNH, probs = attention.attend(
      q_BTNH,
      k_BSNH,
      v_BSNH,
      map_rows=rows,
      heads="all" if mode == "all" else "mean",
      impl=self.impl,
      grad=True,
    )
    out_BTC = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out_BTNH.reshape(b, t, inner))
    if rows is None or probs is not None:
      return out_BTC, probs
    if mode == "average":  # LUSD's maps: kept exactly as they were before the per-layer mode
      return out_BTC, _head_mean_probs(q_BTNH, k_BSNH, rows)
    return out_BTC, _layer_probs(q_BTNH, k_BSNH, rows, mode)


class _GEGLU(nn.Module):
  """diffusers `GEGLU`: one projection to 2 * dim_out, value * exact-gelu(gate)."""

  dim_out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTC):
    h_BTF = nn.Dense(2 * self.dim_out, dtype=self.dtype, name="proj")(x_BTC)
    value_BTF, gate_BTF = jnp.split(h_BTF, 2, axis=-1)
    return value_BTF * nn.gelu(gate_BTF, approximate=False)


class FeedForward(nn.Module):
  """diffusers `FeedForward` (GEGLU, 4x): net.0 = GEGLU, net.1 = dropout, net.2 = Linear."""

  dim: int
  mult: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTC):
    h_BTF = _GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x_BTC)
    return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h_BTF)


class _Maps(NamedTuple):
  """Maps of the captured layers, in the order the U-Net runs them."""

  self_maps: tuple = ()  # of [B', N, N] (or [B', heads, N, N]) float32
  cross_maps: tuple = ()  # of [B', N, L] (or [B', heads, N, L]) float32

  def merge(self, other: _Maps) -> _Maps:
    return _Maps(self.self_maps + other.self_maps, self.cross_maps + other.cross_maps)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU MLP, each with a residual."""

  heads: int
  head_dim: int
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x_BTC, context_BSD, capture: _Capture):
    def norm(name):
      return nn.LayerNorm(
        epsilon=TRANSFORMER_LAYER_NORM_EPS, dtype=self.dtype, use_fast_variance=False, name=name
      )

    attn = lambda name: Attention(self.heads, self.head_dim, dtype=self.dtype, impl=self.impl, name=name)
    h_BTC, self_BTT = attn("attn1")(norm("norm1")(x_BTC), None, capture.self_rows, capture.mode)
    x_BTC = x_BTC + h_BTC
    h_BTC, cross_BTS = attn("attn2")(norm("norm2")(x_BTC), context_BSD, capture.cross_rows, capture.mode)
    x_BTC = x_BTC + h_BTC
    x_BTC = x_BTC + FeedForward(x_BTC.shape[-1], dtype=self.dtype, name="ff")(norm("norm3")(x_BTC))
    maps = _Maps(() if self_BTT is None else (self_BTT,), () if cross_BTS is None else (cross_BTS,))
    return x_BTC, maps


@dataclasses.dataclass(frozen=True)
class _BlockArgs:
  """Settings every block of one U-Net shares."""

  groups: int
  eps: float
  use_linear_projection: bool
  dtype: Any
  impl: str


class Transformer2DModel(nn.Module):
  """diffusers `Transformer2DModel` on continuous input: norm, proj_in, blocks, proj_out, residual.

  Heads have `channels // heads` dims. `use_linear_projection` (SD2) makes proj_in / proj_out
  Linear layers instead of 1x1 convs: the same per-pixel map, only the weight layout differs.
  Returns (out_BHWC, maps) with the maps of this transformer's captured layers.
  """

  heads: int
  num_layers: int
  args: _BlockArgs

  @nn.compact
  def __call__(self, x_BHWC, context_BSD, spec: CaptureSpec | None):
    a = self.args
    b, h, w, c = x_BHWC.shape
    head_dim = c // self.heads

    def proj(name):
      if a.use_linear_projection:
        return nn.Dense(c, dtype=a.dtype, name=name)
      return nn.Conv(c, (1, 1), dtype=a.dtype, name=name)

    batch = context_BSD.shape[0]
    capture = _capture_for(spec, h, batch)
    captured = capture.self_rows is not None or capture.cross_rows is not None
    if captured and b != batch:  # captured rows index the prompts' batch
      x_BHWC = jnp.broadcast_to(x_BHWC, (batch, h, w, c))
      b = batch
    h_BHWC = group_norm("norm", a.groups, TRANSFORMER_GROUP_NORM_EPS, a.dtype)(x_BHWC)
    h_BTC = proj("proj_in")(h_BHWC).reshape(b, h * w, c)
    maps = _Maps()
    for i in range(self.num_layers):
      block = BasicTransformerBlock(
        self.heads, head_dim, dtype=a.dtype, impl=a.impl, name=f"transformer_blocks_{i}"
      )
      h_BTC, block_maps = block(h_BTC, context_BSD, capture)
      maps = maps.merge(block_maps)
    h_BHWC = proj("proj_out")(h_BTC.reshape(h_BTC.shape[0], h, w, c))
    return h_BHWC + x_BHWC, maps


class DownBlock(nn.Module):
  """diffusers `CrossAttnDownBlock2D` (`cross_attention=True`) or `DownBlock2D`.

  Returns (out_BHWC, skips, maps): skips are the features the up blocks consume in reverse order
  ([resnet (+ transformer) output] x layers, then the downsampled map).
  """

  out_channels: int
  num_layers: int
  cross_attention: bool
  heads: int
  transformer_layers: int
  add_downsample: bool
  downsample_padding: int
  args: _BlockArgs

  @nn.compact
  def __call__(self, x_BHWC, temb_BD, context_BSD, spec: CaptureSpec | None):
    a = self.args
    skips, maps = [], _Maps()
    for i in range(self.num_layers):
      x_BHWC = ResnetBlock2D(self.out_channels, a.groups, a.eps, dtype=a.dtype, name=f"resnets_{i}")(
        x_BHWC, temb_BD
      )
      if self.cross_attention:
        attn = Transformer2DModel(self.heads, self.transformer_layers, a, name=f"attentions_{i}")
        x_BHWC, layer_maps = attn(x_BHWC, context_BSD, spec)
        maps = maps.merge(layer_maps)
      skips.append(x_BHWC)
    if self.add_downsample:
      x_BHWC = Downsample2D(self.out_channels, self.downsample_padding, dtype=a.dtype, name="downsamplers_0")(
        x_BHWC
      )
      skips.append(x_BHWC)
    return x_BHWC, skips, maps


class UNetMidBlock2DCrossAttn(nn.Module):
  """resnet -> transformer -> resnet, the resnets scaled by `mid_block_scale_factor`."""

  heads: int
  transformer_layers: int
  output_scale_factor: float
  args: _BlockArgs

  @nn.compact
  def __call__(self, x_BHWC, temb_BD, context_BSD, spec: CaptureSpec | None):
    a = self.args
    c = x_BHWC.shape[-1]
    resnet = lambda name: ResnetBlock2D(
      c, a.groups, a.eps, self.output_scale_factor, dtype=a.dtype, name=name
    )
    x_BHWC = resnet("resnets_0")(x_BHWC, temb_BD)
    attn = Transformer2DModel(self.heads, self.transformer_layers, a, name="attentions_0")
    x_BHWC, maps = attn(x_BHWC, context_BSD, spec)
    return resnet("resnets_1")(x_BHWC, temb_BD), maps


class UpBlock(nn.Module):
  """diffusers `CrossAttnUpBlock2D` (`cross_attention=True`) or `UpBlock2D`.

  Each layer concatenates (on channels, current features first) the latest remaining skip. The
  upsampler is sized to the next block's skip (`upsample_hw`), diffusers' `upsample_size`, so odd
  latent sides come back to their size.
  """

  out_channels: int
  num_layers: int
  cross_attention: bool
  heads: int
  transformer_layers: int
  add_upsample: bool
  args: _BlockArgs

  @nn.compact
  def __call__(self, x_BHWC, skips, temb_BD, context_BSD, spec: CaptureSpec | None, upsample_hw=None):
    a = self.args
    skips, maps = list(skips), _Maps()
    for i in range(self.num_layers):
      x_BHWC = _concat_channels(x_BHWC, skips.pop())
      x_BHWC = ResnetBlock2D(self.out_channels, a.groups, a.eps, dtype=a.dtype, name=f"resnets_{i}")(
        x_BHWC, temb_BD
      )
      if self.cross_attention:
        attn = Transformer2DModel(self.heads, self.transformer_layers, a, name=f"attentions_{i}")
        x_BHWC, layer_maps = attn(x_BHWC, context_BSD, spec)
        maps = maps.merge(layer_maps)
    if self.add_upsample:
      x_BHWC = Upsample2D(self.out_channels, dtype=a.dtype, name="upsamplers_0")(x_BHWC, upsample_hw)
    return x_BHWC, maps


def _concat_channels(x_BHWC, skip_BHWC):
  """Channel concat; a skip saved before the first cross-attention may still hold the one shared row."""
  b = max(x_BHWC.shape[0], skip_BHWC.shape[0])
  widen = lambda a: jnp.broadcast_to(a, (b, *a.shape[1:]))
  return jnp.concatenate([widen(x_BHWC), widen(skip_BHWC)], axis=-1)


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t_BD):
    h_BF = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(t_BD))
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(h_BF)


def _check_capture(spec: CaptureSpec, batch: int) -> None:
  if spec.batch is not None:
    start, stop = spec.batch
    if not 0 <= start < stop <= batch:
      raise ValueError(f"CaptureSpec.batch={spec.batch} does not select rows of a batch of {batch}.")


def _average(maps: tuple, res: int | None, kind: str, resolutions: list[int]) -> jax.Array | None:
  if res is None:
    return None
  if not maps:
    raise ValueError(
      f"CaptureSpec.{kind}_res={res}: no attention layer runs on a feature map of that height "
      f"(this latent's attention layers run at {sorted(set(resolutions), reverse=True)})."
    )
  return sum(maps[1:], maps[0]) / len(maps)


def _per_layer(maps: tuple, res: Resolutions, kind: str, resolutions: list[int]) -> tuple | None:
  if res is None:
    return None
  missing = [] if res == "all" else [r for r in res if r not in resolutions]
  if missing:
    raise ValueError(
      f"CaptureSpec.{kind}_res={res}: no attention layer runs on a feature map of height {missing[0]} "
      f"(this latent's attention layers run at {sorted(set(resolutions), reverse=True)})."
    )
  return maps


def _level_sizes(config: UNetConfig, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
  """Feature-map size of each down block's level (`Downsample2D`: padding 1 rounds up, 0 down)."""
  sizes = [tuple(latent_hw)]
  for _ in range(len(config.block_out_channels) - 1):
    h, w = sizes[-1]
    half = (lambda n: (n + 1) // 2) if config.downsample_padding == 1 else (lambda n: n // 2)
    sizes.append((half(h), half(w)))
  return sizes


def map_layers(config: UNetConfig, latent_hw: tuple[int, int], spec: CaptureSpec) -> MapLayers:
  """Which layer each map of `AttentionMaps.self_layers` / `cross_layers` comes from (static).

  Walks the blocks as `UNet2DConditionModel` runs them, without tracing it. For an averaged spec it
  lists the layers that the average takes.

  Args:
    config: the U-Net's config.
    latent_hw: (h, w) of the latent the U-Net is called on.
    spec: the capture spec.

  Returns:
    `MapLayers` with one `LayerInfo` per returned map, in the same order.

  Example:
    >>> cfg = UNetConfig()  # SD1.5
    >>> spec = CaptureSpec.per_layer_maps(self_res=None, cross_res=16)
    >>> [i.name for i in map_layers(cfg, (64, 64), spec).cross_layers][:2]
    ['down_blocks.2.attentions.0.transformer_blocks.0.attn2', \
'down_blocks.2.attentions.1.transformer_blocks.0.attn2']
  """
  sizes = _level_sizes(config, latent_hw)
  n = len(sizes)
  # (block name, level, heads, transformers, blocks per transformer), in the U-Net's order.
  blocks = [
    (f"down_blocks.{i}", i, config.heads[i], config.layers[i], config.transformer_layers[i])
    for i, t in enumerate(config.down_block_types)
    if t == CROSS_DOWN
  ]
  blocks.append(("mid_block", n - 1, config.heads[-1], 1, config.transformer_layers[-1]))
  blocks += [
    (f"up_blocks.{i}", n - 1 - i, config.heads[n - 1 - i], config.layers[n - 1 - i] + 1,
     config.transformer_layers[n - 1 - i])
    for i, t in enumerate(config.up_block_types)
    if t == CROSS_UP
  ]  # fmt: skip
  found = {"self": [], "cross": []}
  for block, level, heads, transformers, depth in blocks:
    hw = sizes[level]
    for a in range(transformers):
      for d in range(depth):
        for kind, attn in (("self", "attn1"), ("cross", "attn2")):
          if spec.selects(kind, hw[0]):
            name = f"{block}.attentions.{a}.transformer_blocks.{d}.{attn}"
            found[kind].append(LayerInfo(name, block, hw, heads))
  return MapLayers(tuple(found["self"]), tuple(found["cross"]))


class UNet2DConditionModel(nn.Module):
  """diffusers `UNet2DConditionModel` for SD 1.x / 2.x, NHWC, returning captured attention maps.

  Attributes:
    config: the checkpoint's `unet/config.json`.
    dtype: activation dtype (params may be in any dtype; they are cast per layer).
    attention_impl: the `attention.REGISTRY` implementation of every attention layer ("xla",
      "cudnn", "chunked", "pallas", "reference"), or "auto": `attention.select` per layer (captured
      head-mean layers take the "pallas" map kernel on GPU / TPU; the rest, and every layer on CPU,
      cudnn / chunked / xla as the backend and shapes suit). With "pallas", a captured head-mean
      layer computes its output and map in one `kernels.attention_with_map` call (interpreted on
      CPU); per-head maps ("all") are computed beside the output whatever the implementation. A name
      that cannot compute a layer (e.g. "cudnn" on CPU) raises a ValueError when traced.
  """

  config: UNetConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, sample_BHWC, timesteps, context_BLD, capture: CaptureSpec | None = None):
    """Predicts the noise (or v, whatever the checkpoint predicts) of a noisy latent.

    A sample of batch 1 with a context of batch B is one noisy latent under B prompts (LUSD's SBP
    call: both rows noise the same latent at the same t). The layers before the first cross-attention
    (conv_in, the first ResNet, the first self-attention) then run once instead of B times; the result
    equals that of the sample repeated B times, up to float rounding.

    Args:
      sample_BHWC: [B, H, W, in_channels] noisy latents, or [1, H, W, in_channels] shared by all B.
      timesteps: scalar or [B], int or float (fractional timesteps are fine); scalar or [1] for a
        shared sample.
      context_BLD: [B, L, cross_attention_dim] text encoder hidden states.
      capture: which attention maps to return (static); None returns none.

    Returns:
      (out_BHWC [B, H, W, out_channels] in `dtype`, AttentionMaps).
    """
    cfg = self.config
    b, bs = context_BLD.shape[0], sample_BHWC.shape[0]
    if bs not in (1, b):
      raise ValueError(f"sample batch {bs} and context batch {b} differ (a shared sample has batch 1)")
    if capture is not None:
      _check_capture(capture, b)
    args = _BlockArgs(
      cfg.norm_num_groups, cfg.norm_eps, cfg.use_linear_projection, self.dtype, self.attention_impl
    )
    channels, heads, layers, t_layers = (
      cfg.block_out_channels,
      cfg.heads,
      cfg.layers,
      cfg.transformer_layers,
    )
    n = len(channels)

    # diffusers broadcasts a scalar timestep over the batch and embeds it in float32.
    t_B = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (bs,))
    t_BD = timestep_embedding(t_B, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
    temb_BD = TimestepEmbedding(4 * channels[0], dtype=self.dtype, name="time_embedding")(t_BD)

    x_BHWC = sample_BHWC.astype(self.dtype)
    if cfg.center_input_sample:
      x_BHWC = 2 * x_BHWC - 1.0
    x_BHWC = nn.Conv(channels[0], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv_in")(x_BHWC)

    skips, maps, resolutions = [x_BHWC], _Maps(), []
    for i, block_type in enumerate(cfg.down_block_types):
      block = DownBlock(
        channels[i],
        layers[i],
        block_type == CROSS_DOWN,
        heads[i],
        t_layers[i],
        add_downsample=i < n - 1,
        downsample_padding=cfg.downsample_padding,
        args=args,
        name=f"down_blocks_{i}",
      )
      if block_type == CROSS_DOWN:
        resolutions.append(x_BHWC.shape[1])
      x_BHWC, block_skips, block_maps = block(x_BHWC, temb_BD, context_BLD, capture)
      skips += block_skips
      maps = maps.merge(block_maps)

    resolutions.append(x_BHWC.shape[1])
    mid = UNetMidBlock2DCrossAttn(heads[-1], t_layers[-1], cfg.mid_block_scale_factor, args, name="mid_block")
    x_BHWC, block_maps = mid(x_BHWC, temb_BD, context_BLD, capture)
    maps = maps.merge(block_maps)

    rev_channels, rev_heads, rev_layers, rev_t_layers = (
      tuple(reversed(v)) for v in (channels, heads, layers, t_layers)
    )
    for i, block_type in enumerate(cfg.up_block_types):
      num_layers = rev_layers[i] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      is_final = i == n - 1
      block = UpBlock(
        rev_channels[i],
        num_layers,
        block_type == CROSS_UP,
        rev_heads[i],
        rev_t_layers[i],
        add_upsample=not is_final,
        args=args,
        name=f"up_blocks_{i}",
      )
      if block_type == CROSS_UP:
        resolutions.append(x_BHWC.shape[1])
      upsample_hw = None if is_final else skips[-1].shape[1:3]
      x_BHWC, block_maps = block(x_BHWC, block_skips, temb_BD, context_BLD, capture, upsample_hw)
      maps = maps.merge(block_maps)

    x_BHWC = nn.silu(group_norm("conv_norm_out", cfg.norm_num_groups, cfg.norm_eps, self.dtype)(x_BHWC))
    out_BHWC = nn.Conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv_out")(
      x_BHWC
    )

    out_BHWC = jnp.broadcast_to(out_BHWC, (b, *out_BHWC.shape[1:]))  # no cross-attention: still shared
    if capture is None:
      return out_BHWC, AttentionMaps(None, None)
    if capture.per_layer:
      return out_BHWC, AttentionMaps(
        None,
        None,
        _per_layer(maps.self_maps, capture.self_res, "self", resolutions),
        _per_layer(maps.cross_maps, capture.cross_res, "cross", resolutions),
      )
    return out_BHWC, AttentionMaps(
      _average(maps.self_maps, capture.self_res, "self", resolutions),
      _average(maps.cross_maps, capture.cross_res, "cross", resolutions),
    )


def _dummy_inputs(config: UNetConfig):
  side = 2 ** (len(config.block_out_channels) - 1)
  return (
    jnp.zeros((1, side, side, config.in_channels), jnp.float32),
    jnp.zeros((1,), jnp.float32),
    jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32),
  )


def init_params(config: UNetConfig, key: jax.Array | int, dtype=jnp.float32):
  """Random params for `config`, in `dtype`: LeCun-normal kernels, zero biases, unit norm scales.

  `layers.random_params` with Flax's default biases and scales (numpy draws, leaf by leaf: no
  compiled init, peak memory = the params).
  """
  return random_params(param_shapes(config), key, dtype, bias_std=0.0, scale_std=0.0)


def param_shapes(config: UNetConfig):
  """The params tree of `config` as `jax.ShapeDtypeStruct`s (float32), without allocating it."""
  # Tracing the U-Net's init takes seconds; a config is hashable, so trace it once. The copy keeps
  # the cached dicts out of the caller's hands.
  return jax.tree.map(lambda s: s, _param_shapes(config))


@functools.lru_cache(maxsize=8)
def _param_shapes(config: UNetConfig):
  model = UNet2DConditionModel(config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *_dummy_inputs(config))["params"])


def params_from_torch(
  state_dict: Mapping[str, Any], config: UNetConfig, source: str = "unet/diffusion_pytorch_model.safetensors"
):
  """A diffusers U-Net state dict (str -> numpy array) as Flax params (float32 numpy arrays).

  Raises:
    lusd_jax.weights.WeightsError: naming `source` and the key that is missing, unknown or misshaped.
  """
  return weights.convert_state_dict(state_dict, param_shapes(config), source=source)
