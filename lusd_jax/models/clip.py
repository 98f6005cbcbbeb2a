"""OpenAI CLIP (transformers `CLIPModel`) in Flax: ViT image tower, text tower, projections.

The evaluation metrics (LUSD Sec. 4.2, MagicBrush conventions) need CLIP ViT-B/32 image and text
embeddings. transformers 5 ships no Flax CLIP, so this file holds one:

- image tower: patch conv (no bias) + class token + learned positions -> `pre_layrnorm` ->
  `num_hidden_layers` pre-LN layers (bidirectional attention) -> `post_layernorm` of the class
  token -> `visual_projection` (no bias);
- text tower: the Stable Diffusion text encoder of `clip_text` (same transformer, causal) -> the
  hidden state of the first end-of-text token -> `text_projection` (no bias).

Param tree = the `CLIPModel` state dict through `weights.conversion_table`: `text_model/...`,
`vision_model/...` (`vision_model.embeddings.class_embedding` is a raw `nn.Parameter` and is copied
by name), `visual_projection/kernel`, `text_projection/kernel`. `logit_scale` is not needed for
cosine similarities and is not kept.

Preprocessing is OpenAI's `clip.load(...)[1]` recipe (torchvision on PIL images): resize the
shortest side to 224 with PIL bicubic (the long side is `int(224 * long / short)`), center crop
224 x 224 with the offset `round((size - 224) / 2)`, scale to [0, 1], normalise with CLIP's
mean / std. transformers' `CLIPImageProcessor` computes the same pixels except for its crop offset
`(size - 224) // 2`, which is one pixel smaller when `size - 224` is 3 mod 4.

Files are read by `lusd_jax.loading.load_clip` (models import no loader); this file turns what
was read into a `CLIP` (`clip_from_state_dict`).

Example:

  clip = lusd_jax.loading.load_clip("openai/clip-vit-base-patch32")
  img_NP = clip.embed_images([Image.open("cat.png")])     # [1, 512]
  txt_NP = clip.embed_texts(["a photo of a cat"])           # [1, 512]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lusd_jax import tokenizer as tokenizer_lib
from lusd_jax import weights
from lusd_jax.compiler import jit
from lusd_jax.configs import config_kwargs
from lusd_jax.models import clip_text, layers

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_CLIP_L = "openai/clip-vit-large-patch14"  # the UnifyEdit protocol's CLIP score (loveu-tgve)
TINY_RANDOM = "tiny-random"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# openai/clip-vit-large-patch14's architecture (its config.json's architecture keys): the CLIP of
# loveu-tgve's and UnifyEdit's CLIP score. Text: Stable Diffusion 1.x's text encoder, projected.
CLIP_VIT_L14 = dict(
  projection_dim=768,
  text_config=dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0,
    eos_token_id=2, pad_token_id=1,
  ),
  vision_config=dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
  ),
)  # fmt: skip


class CLIPLoadError(ValueError):
  """A CLIP folder, file or key is missing or does not fit its config."""


# ----------------------------------------------------------------------------- configs


# CLIPModel configs carry many bookkeeping keys in each tower (generation defaults, init settings,
# dropouts) that change nothing at inference: unknown keys are dropped, not errors, and the weight
# table checks every shape the architecture keys imply.


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The architecture keys of `config.json["vision_config"]` (ViT-B/32 defaults)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.hidden_act not in clip_text.ACTIVATIONS:
      raise ValueError(f"vision config: hidden_act={self.hidden_act!r} is not supported.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"vision config: hidden_size={self.hidden_size} is not divisible by "
        f"num_attention_heads={self.num_attention_heads}."
      )
    if self.image_size % self.patch_size:
      raise ValueError(
        f"vision config: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}."
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
    return cls(**config_kwargs(cls, d, name="vision config", strict=False))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """transformers' `CLIPConfig` (`config.json` of a `CLIPModel` folder): two towers + projection."""

  text_config: clip_text.CLIPTextConfig = clip_text.CLIPTextConfig()
  vision_config: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
    """Builds the config from `config.json` contents (unknown bookkeeping keys are ignored)."""
    text = d.get("text_config") or {}
    vision = d.get("vision_config") or {}
    return cls(
      text_config=clip_text.CLIPTextConfig(
        **config_kwargs(
          clip_text.CLIPTextConfig, text, name="text config", strict=False, convert=clip_text.first_token_id
        )
      ),
      vision_config=CLIPVisionConfig.from_dict(vision),
      projection_dim=int(d.get("projection_dim", 512)),
    )

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> CLIPConfig:
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))


# ----------------------------------------------------------------------------- image tower


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels_BHWC):
    cfg = self.config
    p = cfg.patch_size
    patches_BGGD = nn.Conv(
      cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embedding"
    )(pixels_BHWC)
    b = patches_BGGD.shape[0]
    patches_BPD = patches_BGGD.reshape(b, -1, cfg.hidden_size)  # row-major grid, as torch's flatten(2)
    cls_D = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,))
    x_BTD = jnp.concatenate([jnp.broadcast_to(cls_D, (b, 1, cfg.hidden_size)), patches_BPD], axis=1)
    pos_TD = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, name="position_embedding")(
      jnp.arange(cfg.num_patches + 1)
    )
    return x_BTD + pos_TD[None]


class CLIPVisionTransformer(nn.Module):
  """transformers' `CLIPVisionModel` (the `vision_model` scope); returns (pooled_BD, last_hidden_BTD).

  Input: normalised pixels `[B, image_size, image_size, 3]` (NHWC; `preprocess_image` makes them).
  """

  config: CLIPVisionConfig
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, pixels_BHWC):
    cfg = self.config
    x_BTD = CLIPVisionEmbeddings(cfg, name="embeddings")(pixels_BHWC)
    x_BTD = clip_text.layer_norm("pre_layrnorm", cfg)(x_BTD)  # sic: transformers' key
    # The text tower's encoder, bidirectional: same layers, names and layer norms.
    x_BTD = clip_text.CLIPEncoder(cfg, jnp.float32, self.attention_impl, causal=False, name="encoder")(x_BTD)
    pooled_BD = clip_text.layer_norm("post_layernorm", cfg)(x_BTD[:, 0])
    return pooled_BD, x_BTD


# ----------------------------------------------------------------------------- params


def param_shapes(config: CLIPConfig):
  """The param tree of `config` (the `CLIPModel` layout) as `jax.ShapeDtypeStruct`s (nothing is computed)."""
  vc, tc = config.vision_config, config.text_config
  pixels = jax.ShapeDtypeStruct((1, vc.image_size, vc.image_size, vc.num_channels), jnp.float32)
  vision = jax.eval_shape(
    lambda k, x: CLIPVisionTransformer(vc).init(k, x)["params"], jax.random.key(0), pixels
  )
  projection = lambda d_in: {"kernel": jax.ShapeDtypeStruct((d_in, config.projection_dim), jnp.float32)}
  return {
    "text_model": clip_text.param_shapes(tc)["text_model"],
    "vision_model": vision,
    "visual_projection": projection(vc.hidden_size),
    "text_projection": projection(tc.hidden_size),
  }


def init_params(config: CLIPConfig, key: jax.Array):
  """Random float32 params for `config` (`layers.random_params`: no parameter is constant)."""
  return layers.random_params(param_shapes(config), key)


# Raw `nn.Parameter`s (not a weight / bias of a layer): copied by name, shape-checked.
_RAW_PARAMS = {"vision_model.embeddings.class_embedding": ("vision_model", "embeddings", "class_embedding")}


def _is_unused(key: str) -> bool:
  return key.endswith("position_ids") or key == "logit_scale"


def params_from_torch(
  state_dict: Mapping[str, np.ndarray],
  config: CLIPConfig,
  source: str = "model.safetensors",
  dtype=np.float32,
):
  """A transformers `CLIPModel` state dict (numpy arrays) -> Flax params for `config`.

  Every key goes through `weights.conversion_table` except the raw `class_embedding` parameter;
  `logit_scale` and `position_ids` buffers are not used.

  Raises:
    weights.WeightsError: naming the key when a key does not fit `config`, a shape differs, or a
      parameter is missing.
  """
  return weights.convert_state_dict(
    state_dict, param_shapes(config), ignore=_is_unused, dtype=dtype, source=source, raw=_RAW_PARAMS
  )


# ----------------------------------------------------------------------------- features


@functools.partial(jit, static_argnames=("config", "attention_impl"))
def image_features(params, config: CLIPConfig, pixels_BHWC, attention_impl: str = "auto"):
  """`CLIPModel.get_image_features`: normalised pixels `[B, S, S, 3]` -> `[B, projection_dim]`.

  Not L2-normalised (cosine similarities normalise).
  """
  pooled_BD, _ = CLIPVisionTransformer(config.vision_config, attention_impl).apply(
    {"params": params["vision_model"]}, jnp.asarray(pixels_BHWC, jnp.float32)
  )
  return pooled_BD @ params["visual_projection"]["kernel"]


def eos_positions(config: clip_text.CLIPTextConfig, input_ids_BL):
  """Where each sequence's text embedding is read: its first end-of-text token.

  transformers' rule: configs written before its PR #24773 say `eos_token_id = 2` (openai/clip-*),
  and then the position is the argmax of the ids (end-of-text, 49407, is the largest id);
  otherwise it is the first position holding `eos_token_id`.
  """
  ids_BL = jnp.asarray(input_ids_BL, jnp.int32)
  if config.eos_token_id == 2:
    return jnp.argmax(ids_BL, axis=-1)
  return jnp.argmax((ids_BL == config.eos_token_id).astype(jnp.int32), axis=-1)


@functools.partial(jit, static_argnames=("config", "attention_impl"))
def text_features(params, config: CLIPConfig, input_ids_BL, attention_impl: str = "auto"):
  """`CLIPModel.get_text_features`: token ids `[B, L]` -> `[B, projection_dim]` (not normalised)."""
  tc = config.text_config
  hidden_BLD = clip_text.CLIPTextTransformer(tc, attention_impl=attention_impl).apply(
    {"params": {"text_model": params["text_model"]}}, jnp.asarray(input_ids_BL, jnp.int32)
  )
  pooled_BD = jnp.take_along_axis(hidden_BLD, eos_positions(tc, input_ids_BL)[:, None, None], axis=1)[:, 0]
  return pooled_BD @ params["text_projection"]["kernel"]


# ----------------------------------------------------------------------------- preprocessing


def preprocess_image(image: Image.Image, size: int = 224) -> np.ndarray:
  """OpenAI CLIP preprocessing of one image -> normalised pixels `[size, size, 3]` float32.

  Resize the shortest side to `size` (PIL bicubic; long side `int(size * long / short)`, as
  torchvision's `Resize(size)`), center crop `size` x `size` at offset `round((side - size) / 2)`
  (torchvision's `CenterCrop`), `/ 255` in float32, `(x - mean) / std`.
  """
  image = image.convert("RGB")
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  x_HWC = np.asarray(image, dtype=np.float32)[top : top + size, left : left + size] / np.float32(255.0)
  return (x_HWC - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)


# ----------------------------------------------------------------------------- loaded model


def _batched(fn, inputs_N, batch_size: int):
  """Runs `fn` over batches padded to a power of two (at most `batch_size`): few compiled shapes."""
  n = inputs_N.shape[0]
  outs = []
  for start in range(0, n, batch_size):
    chunk = inputs_N[start : start + batch_size]
    m = chunk.shape[0]
    padded = min(batch_size, 1 << (m - 1).bit_length())
    if padded > m:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], padded - m, axis=0)])
    outs.append(np.asarray(fn(chunk))[:m])
  return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class CLIP:
  """A loaded CLIP: config, float32 params, transformers `CLIPTokenizer`, where it came from."""

  config: CLIPConfig
  params: Any
  tokenizer: Any
  name: str
  attention_impl: str = "auto"

  def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
    """PIL images -> image embeddings `[N, projection_dim]` float32 (OpenAI preprocessing)."""
    size = self.config.vision_config.image_size
    pixels_NHWC = (
      np.stack([preprocess_image(im, size) for im in images]) if images else np.zeros((0, size, size, 3))
    )
    fn = lambda x: image_features(self.params, self.config, x, self.attention_impl)
    out = _batched(fn, pixels_NHWC.astype(np.float32), batch_size)
    return out.reshape(len(images), self.config.projection_dim)

  def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Strings -> text embeddings `[N, projection_dim]` float32 (truncated at 77 tokens)."""
    ids_NL = tokenizer_lib.tokenize(self.tokenizer, list(texts)) if texts else np.zeros((0, 77), np.int32)
    fn = lambda x: text_features(self.params, self.config, x, self.attention_impl)
    return _batched(fn, ids_NL, batch_size).reshape(len(texts), self.config.projection_dim)


def tiny_random_clip(seed: int = 0) -> CLIP:
  """A tiny random-weight CLIP (`TINY_CLIP`) with the bundled tokenizer: meaningless scores, no download."""
  from lusd_jax.tiny import TINY_CLIP

  config = CLIPConfig.from_dict(TINY_CLIP)
  params = init_params(config, jax.random.key(seed))
  return CLIP(config, params, tokenizer_lib.bundled_tokenizer(), TINY_RANDOM)


def clip_from_state_dict(
  config_dict: Mapping[str, Any],
  state_dict: Mapping[str, np.ndarray],
  tokenizer: Any,
  name: str,
  *,
  config_source: str = "config.json",
  source: str = "model.safetensors",
) -> CLIP:
  """A `CLIP` from a `CLIPModel` folder's contents, already read (`lusd_jax.loading.load_clip` reads them).

  Args:
    config_dict: the `config.json` contents.
    state_dict: the transformers `CLIPModel` state dict (numpy arrays).
    tokenizer: a transformers `CLIPTokenizer`.
    name: where the model came from (shown in reports).
    config_source, source: the file names used in error messages.

  Returns:
    `CLIP` with float32 params.

  Raises:
    CLIPLoadError: naming the file when the config is not a `CLIPModel` one, or a key or shape of the
      state dict does not fit it.
  """
  if config_dict.get("model_type", "clip") != "clip":
    raise CLIPLoadError(
      f"{config_source}: model_type {config_dict.get('model_type')!r} is not a CLIPModel ('clip')."
    )
  try:
    config = CLIPConfig.from_dict(config_dict)
  except (ValueError, TypeError) as e:
    raise CLIPLoadError(f"{config_source}: {e}") from None
  try:
    params = params_from_torch(state_dict, config, source=source)
  except weights.WeightsError as e:
    raise CLIPLoadError(str(e)) from None
  return CLIP(config, params, tokenizer, name)
