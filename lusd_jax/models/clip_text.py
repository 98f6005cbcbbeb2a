"""CLIP text encoder (transformers `CLIPTextModel`) in Flax, as Stable Diffusion uses it.

Token + position embeddings -> `num_hidden_layers` pre-LN layers (LayerNorm -> causal multi-head
self-attention -> residual; LayerNorm -> fc1 -> activation -> fc2 -> residual) -> final LayerNorm.
Stable Diffusion conditions the U-Net on that `last_hidden_state` for prompts padded to 77 tokens,
without a padding attention mask; the causal mask alone keeps padding from leaking backwards.

Submodule names mirror transformers' keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`
-> `text_model/encoder/layers_0/self_attn/q_proj/kernel`). transformers >= 5 saves the same model
without the `text_model.` prefix; `params_from_torch` accepts both.

Example:

  config = CLIPTextConfig.from_json("sd15/text_encoder/config.json")
  params = params_from_torch(state_dict, config)
  ids_BL = tokenizer.tokenize(tokenizer.bundled_tokenizer(), ["a photo of a cat"])
  context_BLD = encode_text(params, config, ids_BL)   # [1, 77, 768] for SD1.5
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
from lusd_jax.models.layers import random_params

# hidden_act -> activation, with transformers' `ACT2FN` meanings.
ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # SD1.x (OpenAI CLIP ViT-L/14)
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # SD2.x (OpenCLIP ViT-H/14): exact erf gelu
  "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Keys transformers writes into every config.json (generic `PretrainedConfig` fields, generation
# defaults from older versions, dropout and init settings) that do not change inference.
_IGNORED_KEYS = frozenset(
  """
  architectures model_type dtype torch_dtype transformers_version projection_dim initializer_range
  initializer_factor attention_dropout dropout id2label label2id problem_type return_dict
  output_attentions output_hidden_states chunk_size_feed_forward is_encoder_decoder is_decoder
  add_cross_attention cross_attention_hidden_size tie_encoder_decoder tie_word_embeddings torchscript
  use_bfloat16 pruned_heads finetuning_task tokenizer_class prefix sep_token_id decoder_start_token_id
  task_specific_params tf_legacy_loss bad_words_ids begin_suppress_tokens suppress_tokens diversity_penalty
  do_sample early_stopping encoder_no_repeat_ngram_size exponential_decay_length_penalty forced_bos_token_id
  forced_eos_token_id length_penalty max_length min_length no_repeat_ngram_size num_beam_groups num_beams
  num_return_sequences output_scores remove_invalid_values repetition_penalty return_dict_in_generate
  temperature top_k top_p typical_p
  """.split()
)


def first_token_id(key: str, value: Any) -> Any:
  # Some configs list several special-token ids; the first is the one the tokenizer uses.
  if key in ("bos_token_id", "eos_token_id", "pad_token_id") and isinstance(value, tuple):
    return value[0] if value else None
  return value


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The architecture keys of transformers' `text_encoder/config.json` (CLIPTextConfig)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int | None = 49407

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
        f"text encoder config: hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}."
      )
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"text encoder config: hidden_size={self.hidden_size} is not divisible by"
        f" num_attention_heads={self.num_attention_heads}."
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
    """Builds the config from `config.json` contents.

    `_` keys and transformers' generic bookkeeping keys are ignored.

    Raises:
      ValueError: naming a key this architecture does not know, or an unsupported value.
    """
    return cls(
      **config_kwargs(cls, d, name="text encoder config", ignore=_IGNORED_KEYS, convert=first_token_id)
    )

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> CLIPTextConfig:
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))


def layer_norm(name: str, config: CLIPTextConfig, dtype=jnp.float32) -> nn.LayerNorm:
  """CLIP's LayerNorm (either tower's config): two-pass variance, as PyTorch computes it."""
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BL):
    cfg = self.config
    length = input_ids_BL.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"{length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}.")
    tokens_BLD = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(
      input_ids_BL
    )
    pos_LD = nn.Embed(
      cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding"
    )(jnp.arange(length))
    return tokens_BLD + pos_LD[None]


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections (causal for text, not for images).

  The encoder modules read only the config's sizes (`hidden_size`, `num_attention_heads`,
  `head_dim`, `intermediate_size`, `hidden_act`, `layer_norm_eps`, `num_hidden_layers`), which the
  vision config has too: `clip.py`'s image tower uses `CLIPEncoder(..., causal=False)`.
  """

  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"
  causal: bool = True

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.config
    b, length, d = x_BLD.shape
    n, h = cfg.num_attention_heads, cfg.head_dim
    q_BLNH, k_BLNH, v_BLNH = (
      nn.Dense(d, dtype=self.dtype, name=name)(x_BLD).reshape(b, length, n, h)
      for name in ("q_proj", "k_proj", "v_proj")
    )
    out_BLNH = attention.dot_product_attention(
      q_BLNH, k_BLNH, v_BLNH, causal=self.causal, impl=self.attention_impl
    )
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(out_BLNH.reshape(b, length, d))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.config
    x_BLF = ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x_BLD))
    return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(x_BLF)


class CLIPEncoderLayer(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"
  causal: bool = True

  @nn.compact
  def __call__(self, x_BLD):
    h_BLD = layer_norm("layer_norm1", self.config, self.dtype)(x_BLD)
    x_BLD = x_BLD + CLIPAttention(
      self.config, self.dtype, self.attention_impl, self.causal, name="self_attn"
    )(h_BLD)
    h_BLD = layer_norm("layer_norm2", self.config, self.dtype)(x_BLD)
    return x_BLD + CLIPMLP(self.config, self.dtype, name="mlp")(h_BLD)


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"
  causal: bool = True

  @nn.compact
  def __call__(self, x_BLD):
    for i in range(self.config.num_hidden_layers):
      x_BLD = CLIPEncoderLayer(self.config, self.dtype, self.attention_impl, self.causal, name=f"layers_{i}")(
        x_BLD
      )
    return x_BLD


class _TextModel(nn.Module):
  """The `text_model` scope of transformers' checkpoints."""

  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, input_ids_BL):
    x_BLD = CLIPTextEmbeddings(self.config, self.dtype, name="embeddings")(input_ids_BL)
    x_BLD = CLIPEncoder(self.config, self.dtype, self.attention_impl, name="encoder")(x_BLD)
    return layer_norm("final_layer_norm", self.config, self.dtype)(x_BLD)


class CLIPTextTransformer(nn.Module):
  """transformers' `CLIPTextModel`, returning `last_hidden_state`.

  Attributes:
    config: the checkpoint's `text_encoder/config.json`.
    dtype: computation dtype.
    attention_impl: `attention.dot_product_attention` implementation: "auto" (the fastest for the backend,
      `attention.resolve_impl`), "xla", "cudnn", "chunked" or "reference".
  """

  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, input_ids_BL):
    """Token ids `[B, L]` (L <= 77, int) -> last hidden state `[B, L, hidden_size]`."""
    return _TextModel(self.config, self.dtype, self.attention_impl, name="text_model")(input_ids_BL)


def param_shapes(config: CLIPTextConfig):
  """The param tree of `config` as `jax.ShapeDtypeStruct`s (float32; nothing is computed)."""
  ids_BL = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(CLIPTextTransformer(config).init, jax.random.key(0), ids_BL)["params"]


def init_params(config: CLIPTextConfig, key: jax.Array, dtype=jnp.float32):
  """Random params for `config` (see `layers.random_params`), as float `dtype`."""
  return random_params(param_shapes(config), key, dtype)


def _with_prefix(key: str) -> str:
  # transformers >= 5 saves `CLIPTextModel` without its `text_model.` scope; SD checkpoints have it.
  return key if key.startswith("text_model.") else "text_model." + key


def _is_buffer(key: str) -> bool:
  return key.endswith("position_ids")


def params_from_torch(
  state_dict: Mapping[str, np.ndarray],
  config: CLIPTextConfig,
  source: str = "text_encoder/model.safetensors",
  dtype=np.float32,
):
  """A transformers `CLIPTextModel` state dict (numpy arrays) -> Flax params.

  Keys may carry the `text_model.` prefix (Stable Diffusion checkpoints) or not (transformers >= 5);
  the `position_ids` buffer is ignored.

  Raises:
    weights.WeightsError: naming the key when a key does not fit `config`, a shape differs, or a
      parameter is missing.
  """
  return weights.convert_state_dict(
    state_dict, param_shapes(config), renames=_with_prefix, ignore=_is_buffer, dtype=dtype, source=source
  )


@functools.partial(jit, static_argnames=("config", "dtype", "attention_impl"))
def encode_text(
  params, config: CLIPTextConfig, input_ids_BL, *, dtype=jnp.float32, attention_impl: str = "auto"
):
  """Token ids `[B, L]` -> `last_hidden_state` `[B, L, hidden_size]` (the U-Net's text context)."""
  model = CLIPTextTransformer(config, dtype, attention_impl)
  return model.apply({"params": params}, jnp.asarray(input_ids_BL, jnp.int32))
