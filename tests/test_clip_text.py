"""Flax CLIP text encoder against transformers' PyTorch CLIPTextModel with the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lusd_jax import tokenizer as tok
from lusd_jax import weights
from lusd_jax.models import clip_text
from tests import builders

# PyTorch references on one thread (tests/conftest.py: shared cores).
pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = [
  "a photo of a cat sitting on a wooden bench",
  # Longer than 77 tokens: truncated to 76 + end-of-text, as SD pipelines do.
  "a highly detailed oil painting of an astronaut riding a white horse across a misty valley, " * 6,
  "",
]


def assert_parity(ours, ref, rtol=1e-4):
  """max |ours - ref| <= rtol * max |ref| (the project's parity criterion)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= rtol * np.abs(ref).max(), f"max abs err {err:.3g} vs max |ref| {np.abs(ref).max():.3g}"


class Encoder:
  """One tiny transformers text encoder, its config and its converted params."""

  def __init__(self, style):
    self.torch = builders.tiny_text_encoder(style, seed=0 if style == "sd1" else 1)
    self.config = clip_text.CLIPTextConfig.from_dict(self.torch.config.to_dict())
    self.state_dict = builders.torch_state_dict(self.torch)
    self.params = clip_text.params_from_torch(self.state_dict, self.config)

  def reference(self, ids_BL):
    with torch.no_grad():
      return self.torch(torch.from_numpy(np.asarray(ids_BL, np.int64))).last_hidden_state.numpy()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def enc(request):
  return Encoder(request.param)


@pytest.fixture(scope="module")
def ids_BL(tmp_path_factory):
  """The prompts as SD1 tokenizes them (padded with end-of-text), then the first as SD2 does ("!")."""
  sd2_dir = tmp_path_factory.mktemp("sd2_tokenizer")
  tok.write_tokenizer_files(sd2_dir, pad_token="!")
  sd2_ids = tok.tokenize(tok.load_tokenizer(sd2_dir), PROMPTS[:1])
  return np.concatenate([tok.tokenize(tok.bundled_tokenizer(), PROMPTS), sd2_ids])


def test_prompts_exercise_padding_and_truncation(ids_BL):
  full = tok.bundled_tokenizer()(PROMPTS[1])["input_ids"]
  assert len(full) > tok.MAX_LENGTH
  assert ids_BL.shape == (4, tok.MAX_LENGTH)
  assert ids_BL[1, -1] == tok.EOS_ID and list(ids_BL[1, :-1]) == full[:76]
  assert (ids_BL[0] == tok.EOS_ID).sum() > 30  # SD1 pads with end-of-text
  assert (ids_BL[3] == 0).sum() > 30 and (ids_BL[3] == tok.EOS_ID).sum() == 1  # SD2 pads with "!"


# --- parity -----------------------------------------------------------------------------------


def test_hidden_state_parity(enc, ids_BL):
  out = clip_text.encode_text(enc.params, enc.config, ids_BL)
  assert out.shape == (4, 77, enc.config.hidden_size)
  assert_parity(out, enc.reference(ids_BL))


def test_hidden_state_parity_on_short_unpadded_ids(enc, ids_BL):
  ids = ids_BL[:1, :12]
  assert_parity(clip_text.encode_text(enc.params, enc.config, ids), enc.reference(ids))


def test_reference_attention_matches_xla(enc, ids_BL):
  xla = clip_text.encode_text(enc.params, enc.config, ids_BL[:1])
  ref = clip_text.encode_text(enc.params, enc.config, ids_BL[:1], attention_impl="reference")
  np.testing.assert_allclose(ref, xla, rtol=1e-5, atol=1e-5)


def test_attention_is_causal(enc, ids_BL):
  # Changing token 8 leaves positions 0..7 untouched and changes position 8 onwards.
  ids = np.array(ids_BL[:1])
  changed = ids.copy()
  changed[0, 8] = 1000 if ids[0, 8] != 1000 else 1001
  a = np.asarray(clip_text.encode_text(enc.params, enc.config, ids))
  b = np.asarray(clip_text.encode_text(enc.params, enc.config, changed))
  np.testing.assert_array_equal(a[:, :8], b[:, :8])
  assert np.abs(a[:, 8:] - b[:, 8:]).max(axis=-1).min() > 0


@pytest.mark.parametrize("name", sorted(clip_text.ACTIVATIONS))
def test_activations_match_transformers(name):
  from transformers.activations import ACT2FN

  x = np.linspace(-6, 6, 1001, dtype=np.float32)
  ref = ACT2FN[name](torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(clip_text.ACTIVATIONS[name](jnp.asarray(x)), ref, rtol=1e-5, atol=1e-6)


def test_jit_and_bfloat16(enc, ids_BL):
  eager = clip_text.encode_text(enc.params, enc.config, ids_BL[:1])
  jitted = jax.jit(clip_text.encode_text, static_argnums=1)(enc.params, enc.config, ids_BL[:1])
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), enc.params)
  low = clip_text.encode_text(bf16, enc.config, ids_BL[:1], dtype=jnp.bfloat16)
  assert low.dtype == jnp.bfloat16
  assert float(jnp.abs(low.astype(jnp.float32) - eager).max()) <= 0.05 * float(jnp.abs(eager).max())


# --- config -----------------------------------------------------------------------------------


def test_config_from_transformers_json(enc, tmp_path):
  enc.torch.config.to_json_file(tmp_path / "config.json")
  cfg = clip_text.CLIPTextConfig.from_json(tmp_path / "config.json")
  assert cfg == enc.config
  assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size


def test_config_accepts_sd2_style_json_and_maps_key_for_key():
  # stabilityai/stable-diffusion-2-1 text_encoder/config.json (transformers 4.25 era, with metadata).
  sd2 = {
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float32",
    "transformers_version": "4.25.0.dev0",
    "vocab_size": 49408,
  }
  cfg = clip_text.CLIPTextConfig.from_dict(sd2)
  assert (cfg.hidden_act, cfg.num_hidden_layers, cfg.head_dim) == ("gelu", 23, 64)
  from transformers import CLIPTextConfig, CLIPTextModel

  with torch.device("meta"):  # shapes only, no memory
    model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in sd2.items() if not k.startswith("_")}))
  torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  rows = weights.conversion_table(
    torch_shapes, weights.flax_shapes_of(clip_text.param_shapes(cfg)), renames=clip_text._with_prefix
  )
  assert len(rows) == len(torch_shapes) == 2 + 23 * 16 + 2  # embeddings, 23 layers, final LN


@pytest.mark.parametrize(
  "bad, key",
  [
    ({"hidden_act": "swiglu"}, "hidden_act"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"use_rotary_embeddings": True}, "use_rotary_embeddings"),
  ],
)
def test_config_errors_name_the_key(bad, key):
  with pytest.raises(ValueError, match=key):
    clip_text.CLIPTextConfig.from_dict({"hidden_size": 32, "num_attention_heads": 4, **bad})


# --- weight loading ---------------------------------------------------------------------------


def test_prefixed_keys_and_position_ids_buffer_load(enc):
  # Stable Diffusion checkpoints (transformers 4) store `text_model.`-prefixed keys and position_ids.
  sd = {"text_model." + k: v for k, v in enc.state_dict.items()}
  sd["text_model.embeddings.position_ids"] = np.arange(77)[None]
  jax.tree.map(np.testing.assert_array_equal, clip_text.params_from_torch(sd, enc.config), enc.params)


def test_init_params_has_the_checkpoint_structure(enc):
  fresh = clip_text.init_params(enc.config, jax.random.key(0))
  assert jax.tree.structure(fresh) == jax.tree.structure(enc.params)
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(enc.params), strict=True):
    assert a.shape == b.shape and np.ptp(np.asarray(a)) > 0


def test_wrong_shape_names_the_key(enc):
  bad = dict(enc.state_dict)
  bad["encoder.layers.1.mlp.fc1.weight"] = np.zeros((7, enc.config.hidden_size), np.float32)
  with pytest.raises(weights.WeightsError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
    clip_text.params_from_torch(bad, enc.config)


def test_missing_key_names_the_parameter(enc):
  bad = {k: v for k, v in enc.state_dict.items() if k != "final_layer_norm.bias"}
  with pytest.raises(weights.WeightsError, match="text_model/final_layer_norm/bias"):
    clip_text.params_from_torch(bad, enc.config)


def test_unknown_key_names_the_key(enc):
  # e.g. a CLIPTextModelWithProjection checkpoint: not the architecture SD conditions on.
  bad = {**enc.state_dict, "text_projection.weight": np.zeros((8, enc.config.hidden_size), np.float32)}
  with pytest.raises(weights.WeightsError, match=r"text_projection\.weight"):
    clip_text.params_from_torch(bad, enc.config)
