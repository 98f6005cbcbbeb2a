"""DINO ViT (transformers `ViTModel`) in Flax, and the DINO structure distance built on its keys.

The structure distance (Tumanyan et al., "Splicing ViT Features", CVPR 2022; the UnifyEdit paper's
"DINO similarity", lower = structure kept) compares two images through DINO ViT-B/8:

1. `preprocess`: both images are resized to 224 x 224 and normalised with ImageNet's mean / std;
2. `structure_keys`: the keys of the last block's self-attention (layer 11 of ViT-B/8), every token
   (the class token first, then the 28 x 28 patches row by row) with the heads concatenated:
   `[B, 785, 768]` (Splice's `VitExtractor.get_keys_from_input` + `transpose(0, 1).reshape(t, h * d)`);
3. `self_similarity`: the token x token cosine similarity of those keys, `[B, 785, 785]`, the class
   token included (Splice's `attn_cosine_sim`, norm product clamped at 1e-8);
4. `structure_distance`: the mean squared difference of the two matrices (`F.mse_loss`), `[B]`.

The network: patch conv (with bias) + class token + learned positions -> `num_hidden_layers` pre-LN
layers -> final LayerNorm. No LayerNorm before the encoder (CLIP's image tower has one). Each layer
is CLIP's encoder layer (`clip_text.CLIPEncoderLayer`, bidirectional): the same LayerNorm (two-pass
variance), MLP (`clip_text.CLIPMLP`, exact erf GELU for `hidden_act="gelu"`), q/k/v/out projections
and param names; `DinoLayer` differs only in returning its keys and in `qkv_bias`. The pooler of
`ViTModel` is not used and its weights are not read.

Param tree (`params_from_torch`, one explicit table): `embeddings/{cls_token, position_embeddings}`
(raw params, torch shapes `[1, 1, D]`, `[1, T, D]`), `embeddings/patch_embedding/{kernel, bias}`,
`encoder/layers_{i}/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1, fc2}}`,
`layernorm`. Both transformers key layouts are read: the hub's (transformers < 5, and what
`save_pretrained` writes: `encoder.layer.0.attention.attention.key`) and transformers 5's module
names (`layers.0.attention.k_proj`).

Files are read by `lusd_jax.loading.load_dino` (models import no loader).

Example:

  dino = lusd_jax.loading.load_dino("facebook/dino-vitb8")
  d_B = structure_distance(dino.params, source_BHWC, edited_BHWC, dino.config)  # pixels in [0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax import weights
from lusd_jax.compiler import jit
from lusd_jax.configs import config_kwargs
from lusd_jax.models import attention, clip_text, layers

DEFAULT_DINO = "facebook/dino-vitb8"
TINY_RANDOM = "tiny-random"
# torchvision's ImageNet statistics, as Splice normalises DINO's input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
# Splice's `attn_cosine_sim` clamps the product of the two norms from below.
COSINE_EPS = 1e-8

# facebook/dino-vitb8's architecture (its config.json, converted from DINO's `vit_base` with patch 8).
DINO_VITB8 = dict(
  model_type="vit",
  hidden_size=768,
  num_hidden_layers=12,
  num_attention_heads=12,
  intermediate_size=3072,
  hidden_act="gelu",
  layer_norm_eps=1e-12,
  image_size=224,
  patch_size=8,
  num_channels=3,
  qkv_bias=True,
)
# `load_dino("tiny-random")`: the same architecture, tiny (meaningless distances, no download).
TINY_DINO = dict(
  DINO_VITB8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32
)


class DinoLoadError(ValueError):
  """A DINO folder, file or key is missing or does not fit its config."""


# ----------------------------------------------------------------------------- config


def _square(key: str, value: Any) -> Any:
  # ViTConfig allows [h, w] image and patch sizes; square ones are the same model.
  if (
    key in ("image_size", "patch_size")
    and isinstance(value, tuple)
    and len(value) == 2
    and value[0] == value[1]
  ):
    return value[0]
  return value


@dataclasses.dataclass(frozen=True)
class DinoConfig:
  """The architecture keys of a transformers `ViTModel` `config.json`.

  Defaults are `ViTConfig`'s (not DINO's: `save_pretrained` leaves out keys that hold
  `ViTConfig`'s defaults, so a missing key means that default); `DINO_VITB8` is DINO ViT-B/8.
  """

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True

  def __post_init__(self):
    if self.hidden_act not in clip_text.ACTIVATIONS:
      raise ValueError(f"ViT config: hidden_act={self.hidden_act!r} is not supported.")
    for key in ("image_size", "patch_size"):
      if not isinstance(getattr(self, key), int):
        raise ValueError(f"ViT config: {key}={getattr(self, key)!r} is not supported (only square sizes).")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"ViT config: hidden_size={self.hidden_size} is not divisible by "
        f"num_attention_heads={self.num_attention_heads}."
      )
    if self.image_size % self.patch_size:
      raise ValueError(
        f"ViT config: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}."
      )
    if self.num_channels != 3:
      raise ValueError(f"ViT config: num_channels={self.num_channels} is not supported (RGB only).")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_tokens(self) -> int:
    """Patches plus the class token."""
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DinoConfig:
    """Builds the config from `config.json` contents (bookkeeping keys such as dropouts are ignored)."""
    return cls(**config_kwargs(cls, d, name="ViT config", strict=False, convert=_square))

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> DinoConfig:
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))


# ----------------------------------------------------------------------------- network


class DinoEmbeddings(nn.Module):
  config: DinoConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels_BHWC):
    cfg = self.config
    p, d = cfg.patch_size, cfg.hidden_size
    patches_BGGD = nn.Conv(
      d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embedding"
    )(pixels_BHWC)
    b = patches_BGGD.shape[0]
    patches_BPD = patches_BGGD.reshape(b, -1, d)  # row-major grid, as torch's flatten(2)
    # Raw params in torch's shapes, copied as they are stored.
    cls_11D = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
    pos_1TD = self.param("position_embeddings", nn.initializers.normal(0.02), (1, cfg.num_tokens, d))
    x_BTD = jnp.concatenate([jnp.broadcast_to(cls_11D, (b, 1, d)).astype(patches_BPD.dtype), patches_BPD], 1)
    return x_BTD + pos_1TD.astype(x_BTD.dtype)


class DinoAttention(nn.Module):
  """`clip_text.CLIPAttention` (bidirectional) that also returns its keys `[B, T, D]` (heads concatenated)."""

  config: DinoConfig
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.config
    b, t, d = x_BTD.shape
    n, h = cfg.num_attention_heads, cfg.head_dim
    q_BTD, k_BTD, v_BTD = (
      nn.Dense(d, use_bias=cfg.qkv_bias, dtype=self.dtype, name=name)(x_BTD)
      for name in ("q_proj", "k_proj", "v_proj")
    )
    out_BTNH = attention.dot_product_attention(
      q_BTD.reshape(b, t, n, h),
      k_BTD.reshape(b, t, n, h),
      v_BTD.reshape(b, t, n, h),
      impl=self.attention_impl,
    )
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(out_BTNH.reshape(b, t, d)), k_BTD


class DinoLayer(nn.Module):
  """`clip_text.CLIPEncoderLayer` (same params and output when `qkv_bias`) returning (x, keys)."""

  config: DinoConfig
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BTD):
    h_BTD = clip_text.layer_norm("layer_norm1", self.config, self.dtype)(x_BTD)
    attn_BTD, keys_BTD = DinoAttention(self.config, self.dtype, self.attention_impl, name="self_attn")(h_BTD)
    x_BTD = x_BTD + attn_BTD
    h_BTD = clip_text.layer_norm("layer_norm2", self.config, self.dtype)(x_BTD)
    return x_BTD + clip_text.CLIPMLP(self.config, self.dtype, name="mlp")(h_BTD), keys_BTD


class DinoEncoder(nn.Module):
  config: DinoConfig
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BTD):
    keys_BTD = None
    for i in range(self.config.num_hidden_layers):
      x_BTD, keys_BTD = DinoLayer(self.config, self.dtype, self.attention_impl, name=f"layers_{i}")(x_BTD)
    return x_BTD, keys_BTD


class DinoViT(nn.Module):
  """transformers' `ViTModel` without its pooler; returns (last_hidden_BTD, last_keys_BTD).

  Input: normalised pixels `[B, image_size, image_size, 3]` (NHWC; `preprocess` makes them).
  `last_keys_BTD` is the last layer's key projection (the output of its `k_proj`), `[B, T,
  hidden_size]`, heads concatenated in order; tokens are the class token, then the patches row by row.
  """

  config: DinoConfig
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, pixels_BHWC):
    cfg = self.config
    x_BTD = DinoEmbeddings(cfg, self.dtype, name="embeddings")(pixels_BHWC.astype(self.dtype))
    x_BTD, keys_BTD = DinoEncoder(cfg, self.dtype, self.attention_impl, name="encoder")(x_BTD)
    return clip_text.layer_norm("layernorm", cfg, self.dtype)(x_BTD), keys_BTD


# ----------------------------------------------------------------------------- params


def param_shapes(config: DinoConfig):
  """The param tree of `config` as `jax.ShapeDtypeStruct`s (float32; nothing is computed)."""
  pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  return jax.eval_shape(lambda k, x: DinoViT(config).init(k, x)["params"], jax.random.key(0), pixels)


def init_params(config: DinoConfig, key: jax.Array | int, dtype=jnp.float32):
  """Random params for `config` (`layers.random_params`: no parameter is constant)."""
  return layers.random_params(param_shapes(config), key, dtype)


# Raw `nn.Parameter`s (not a weight / bias of a layer): copied by name, shape-checked.
_RAW_PARAMS = {
  "embeddings.cls_token": ("embeddings", "cls_token"),
  "embeddings.position_embeddings": ("embeddings", "position_embeddings"),
}

# The weight table of one encoder layer: (hub / transformers < 5 name, transformers 5 name, the
# name of the Flax module, as a torch key for `weights.conversion_table`'s naming rule).
_LAYER_TABLE = (
  ("layernorm_before", "layernorm_before", "layer_norm1"),
  ("attention.attention.query", "attention.q_proj", "self_attn.q_proj"),
  ("attention.attention.key", "attention.k_proj", "self_attn.k_proj"),
  ("attention.attention.value", "attention.v_proj", "self_attn.v_proj"),
  ("attention.output.dense", "attention.o_proj", "self_attn.out_proj"),
  ("layernorm_after", "layernorm_after", "layer_norm2"),
  ("intermediate.dense", "mlp.fc1", "mlp.fc1"),
  ("output.dense", "mlp.fc2", "mlp.fc2"),
)
_LAYER_RENAMES = {old: new for hub, v5, new in _LAYER_TABLE for old in (hub, v5)}
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_EMBEDDING_RENAMES = {"embeddings.patch_embeddings.projection.": "embeddings.patch_embedding."}


def _rename(key: str) -> str:
  """A `ViTModel` key (either layout) -> the torch-style name of its Flax param (unknown keys unchanged)."""
  m = _LAYER_KEY.match(key)
  if m and m.group(2) in _LAYER_RENAMES:
    return f"encoder.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.{m.group(3)}"
  for old, new in _EMBEDDING_RENAMES.items():
    if key.startswith(old):
      return new + key[len(old) :]
  return key


def _is_unused(key: str) -> bool:
  # The pooler (ViTModel's default `add_pooling_layer=True`) and the masked-image-modeling token
  # change neither the last hidden state nor the keys.
  return key.startswith("pooler.") or key == "embeddings.mask_token"


def params_from_torch(
  state_dict: Mapping[str, np.ndarray],
  config: DinoConfig,
  source: str = "model.safetensors",
  dtype=np.float32,
):
  """A transformers `ViTModel` state dict (numpy arrays, either key layout) -> Flax params for `config`.

  Args:
    state_dict: PyTorch key -> array, as the hub stores it (`encoder.layer.0.attention.attention.key.weight`)
      or as transformers 5 names it (`layers.0.attention.k_proj.weight`).
    config: the folder's `DinoConfig`.
    source: the file name used in error messages.
    dtype: the dtype of the returned leaves.

  Returns:
    The param tree of `param_shapes(config)`.

  Raises:
    weights.WeightsError: naming the key when a key does not fit `config`, a shape differs, or a
      parameter is missing (every key fills exactly one parameter; pooler weights are skipped).
  """
  return weights.convert_state_dict(
    state_dict,
    param_shapes(config),
    renames=_rename,
    ignore=_is_unused,
    dtype=dtype,
    source=source,
    raw=_RAW_PARAMS,
  )


# ----------------------------------------------------------------------------- structure distance


def preprocess(images_BHWC01, size: int = INPUT_SIZE, antialias: bool = True):
  """Images in [0, 1] `[B, H, W, 3]` (any H, W) -> DINO's input `[B, size, size, 3]` float32.

  Bilinear resize to `size` x `size` (half-pixel centres; `antialias=True` widens the filter when
  shrinking, as PIL and torchvision >= 0.17 do, `False` is plain bilinear, as torchvision 0.11 under
  Splice resized tensors), then ImageNet normalisation. Splice resizes the shorter side to 224
  instead; for square images (the benchmarks' 512 x 512) the two agree, and a fixed 224 x 224 gives
  every image the same token grid, so that a source and an edit of different sizes compare.
  """
  x_BHWC = jnp.asarray(images_BHWC01, jnp.float32)
  if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3]; got shape {tuple(x_BHWC.shape)}.")
  if x_BHWC.shape[1:3] != (size, size):
    x_BHWC = jax.image.resize(x_BHWC, (x_BHWC.shape[0], size, size, 3), "linear", antialias=antialias)
  return (x_BHWC - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def structure_keys(
  params,
  images_BHWC01,
  config: DinoConfig,
  *,
  dtype=jnp.float32,
  attention_impl: str = "auto",
  antialias: bool = True,
):
  """The last layer's keys of `images` (in [0, 1], any size): `[B, num_tokens, hidden_size]` float32.

  Tokens are the class token, then the patches row by row (Splice keeps the class token).
  """
  pixels_BHWC = preprocess(images_BHWC01, config.image_size, antialias)
  _, keys_BTD = DinoViT(config, dtype, attention_impl).apply({"params": params}, pixels_BHWC)
  return keys_BTD.astype(jnp.float32)


def self_similarity(keys_BTD, eps: float = COSINE_EPS):
  """Token x token cosine similarity `[B, T, T]` (Splice's `attn_cosine_sim`).

  `k_i . k_j / max(|k_i| |k_j|, eps)`, in float32 at full matmul precision (TF32 would be
  the largest error of the metric on GPUs).
  """
  k_BTD = jnp.asarray(keys_BTD, jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  norm_BT = jnp.sqrt(jnp.einsum("btd,btd->bt", k_BTD, k_BTD, precision=hi))
  dots_BTS = jnp.einsum("btd,bsd->bts", k_BTD, k_BTD, precision=hi)
  return dots_BTS / jnp.maximum(norm_BT[:, :, None] * norm_BT[:, None, :], eps)


@functools.partial(jit, static_argnames=("config", "dtype", "attention_impl", "antialias"))
def structure_distance(
  params,
  source_images_BHWC01,
  edited_images_BHWC01,
  config: DinoConfig,
  *,
  dtype=jnp.float32,
  attention_impl: str = "auto",
  antialias: bool = True,
):
  """DINO structure distance (Splice's global self-similarity loss) per image pair; lower = structure kept.

  mean over (i, j) of `(S_src[i, j] - S_edit[i, j])^2`, S the cosine self-similarity of the last
  layer's keys (`structure_keys`, `self_similarity`). Symmetric; 0 for identical images.

  Args:
    params: `DinoViT` params (`params_from_torch`, `lusd_jax.loading.load_dino`).
    source_images_BHWC01: `[B, H, W, 3]` source images in [0, 1].
    edited_images_BHWC01: `[B, H', W', 3]` edited images in [0, 1] (any size: both become 224 x 224).
    config: the model's `DinoConfig` (static).
    dtype: the network's computation dtype (static); similarities are float32.
    attention_impl: `attention.dot_product_attention` implementation (static).
    antialias: `preprocess`'s resize filter (static).

  Returns:
    `[B]` float32 distances.
  """
  if source_images_BHWC01.shape[0] != edited_images_BHWC01.shape[0]:
    raise ValueError(
      f"structure_distance: {source_images_BHWC01.shape[0]} source images but "
      f"{edited_images_BHWC01.shape[0]} edited ones."
    )
  keys = functools.partial(
    structure_keys, params, config=config, dtype=dtype, attention_impl=attention_impl, antialias=antialias
  )
  sim_src_BTT = self_similarity(keys(source_images_BHWC01))
  sim_edit_BTT = self_similarity(keys(edited_images_BHWC01))
  return jnp.mean(jnp.square(sim_src_BTT - sim_edit_BTT), axis=(1, 2))


# ----------------------------------------------------------------------------- loaded model


@dataclasses.dataclass(frozen=True, eq=False)
class Dino:
  """A loaded DINO ViT: config, params (leaves in `dtype`), where it came from."""

  config: DinoConfig
  params: Any
  name: str
  dtype: str = "float32"

  def structure_distance(self, source_images_BHWC01, edited_images_BHWC01, **kwargs) -> np.ndarray:
    """`structure_distance` with this model's params: `[B]` float32 numpy."""
    out = structure_distance(
      self.params,
      jnp.asarray(source_images_BHWC01, jnp.float32),
      jnp.asarray(edited_images_BHWC01, jnp.float32),
      self.config,
      dtype=jnp.dtype(self.dtype),
      **kwargs,
    )
    return np.asarray(out)


def tiny_random_dino(seed: int = 0) -> Dino:
  """A tiny random-weight DINO (`TINY_DINO`): meaningless distances, no download."""
  config = DinoConfig.from_dict(TINY_DINO)
  return Dino(config, init_params(config, seed), TINY_RANDOM)


def dino_from_state_dict(
  config_dict: Mapping[str, Any],
  state_dict: Mapping[str, np.ndarray],
  name: str,
  *,
  dtype: str = "float32",
  config_source: str = "config.json",
  source: str = "model.safetensors",
) -> Dino:
  """A `Dino` from a `ViTModel` folder's contents, already read (`lusd_jax.loading.load_dino` reads them).

  Args:
    config_dict: the `config.json` contents.
    state_dict: the transformers `ViTModel` state dict (numpy arrays).
    name: where the model came from (shown in reports).
    dtype: "float32", "bfloat16" or "float16": params and activations (similarities stay float32).
    config_source, source: the file names used in error messages.

  Raises:
    DinoLoadError: naming the file when the config is not a `ViTModel` one, or a key or shape of the
      state dict does not fit it.
  """
  if config_dict.get("model_type", "vit") != "vit":
    raise DinoLoadError(
      f"{config_source}: model_type {config_dict.get('model_type')!r} is not a ViTModel ('vit')."
    )
  if dtype not in ("float32", "bfloat16", "float16"):
    raise DinoLoadError(f"dtype {dtype!r} is not supported; choose float32, bfloat16 or float16.")
  try:
    config = DinoConfig.from_dict(config_dict)
  except (ValueError, TypeError) as e:
    raise DinoLoadError(f"{config_source}: {e}") from None
  try:
    params = params_from_torch(state_dict, config, source=source)
  except weights.WeightsError as e:
    raise DinoLoadError(str(e)) from None
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), params)
  return Dino(config, params, name, dtype)
