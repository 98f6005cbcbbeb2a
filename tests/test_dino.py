"""Flax DINO ViT against transformers' PyTorch `ViTModel`, and the DINO structure distance (Splice)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from lusd_jax import loading, weights
from lusd_jax.models import clip_text, layers
from lusd_jax.models import dino as dino_lib
from tests.builders import perturb_, torch_state_dict

# PyTorch references on one thread (tests/conftest.py: shared cores).
pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Keys missing from a config mean ViTConfig's defaults: TINY leaves layer_norm_eps (1e-12),
# hidden_act and qkv_bias out, as `save_pretrained` does for facebook/dino-vitb8's values.
TINY = dict(
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  image_size=32,
  patch_size=8,
)
TINY_NO_QKV_BIAS = dict(TINY, qkv_bias=False, layer_norm_eps=1e-6, patch_size=4)
MEAN, STD = np.asarray(dino_lib.IMAGENET_MEAN, np.float32), np.asarray(dino_lib.IMAGENET_STD, np.float32)


def _torch_vit(config: dict, seed: int):
  from transformers import ViTConfig, ViTModel

  torch.manual_seed(seed)
  cfg = ViTConfig(**{k: v for k, v in config.items() if k != "model_type"})
  return perturb_(ViTModel(cfg), seed + 1)


def _torch_forward(model, images_BHWC01):
  """(last_hidden_state, the last layer's keys) of ImageNet-normalised images, keys from a forward hook."""
  got = {}
  hook = model.layers[-1].attention.k_proj.register_forward_hook(lambda m, i, o: got.setdefault("keys", o))
  try:
    pixels_BCHW = torch.from_numpy(((images_BHWC01 - MEAN) / STD).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
      hidden = model(pixel_values=pixels_BCHW).last_hidden_state
  finally:
    hook.remove()
  return hidden.numpy(), got["keys"].numpy()


def _splice_distance(keys_a_TD, keys_b_TD):
  """Splice's `attn_cosine_sim` on both key sets, then `F.mse_loss` (transcribed from omerbt/Splice)."""

  def attn_cosine_sim(x, eps=1e-08):
    norm1 = x.norm(dim=2, keepdim=True)
    factor = torch.clamp(norm1 @ norm1.permute(0, 2, 1), min=eps)
    return (x @ x.permute(0, 2, 1)) / factor

  a = attn_cosine_sim(torch.from_numpy(keys_a_TD).double()[None])
  b = attn_cosine_sim(torch.from_numpy(keys_b_TD).double()[None])
  return torch.nn.functional.mse_loss(a, b).item()


def _photo(name: str, size: int | tuple[int, int]) -> np.ndarray:
  """A real photo in [0, 1], `[H, W, 3]`, resized (PIL bilinear) to `size` (w, h)."""
  size = (size, size) if isinstance(size, int) else size
  im = Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.BILINEAR)
  return np.asarray(im, np.float32) / np.float32(255.0)


@pytest.fixture(scope="module", params=["dino_like", "no_qkv_bias"])
def tiny_vit(request, tmp_path_factory):
  """(PyTorch ViTModel, its save_pretrained folder, the config dict) with perturbed random weights."""
  config = TINY if request.param == "dino_like" else TINY_NO_QKV_BIAS
  folder = tmp_path_factory.mktemp(f"vit_{request.param}")
  model = _torch_vit(config, seed=5 if request.param == "dino_like" else 7)
  model.save_pretrained(folder)
  return model, str(folder), config


def test_hidden_state_and_keys_match_transformers(tiny_vit):
  ref, folder, _ = tiny_vit
  dino = loading.load_dino(folder)
  images = np.stack([_photo("astronaut", 32), _photo("chelsea", 32), _photo("coffee", 32)])
  ref_hidden, ref_keys = _torch_forward(ref, images)
  assert ref_keys.shape == (3, dino.config.num_tokens, 32)

  pixels = dino_lib.preprocess(images, dino.config.image_size)  # the model's size: no resize
  np.testing.assert_allclose(pixels, (images - MEAN) / STD, atol=1e-6, rtol=0)
  hidden, keys = dino_lib.DinoViT(dino.config).apply({"params": dino.params}, pixels)
  np.testing.assert_allclose(hidden, ref_hidden, atol=1e-5, rtol=0)
  np.testing.assert_allclose(keys, ref_keys, atol=1e-5, rtol=0)
  np.testing.assert_allclose(dino_lib.structure_keys(dino.params, images, dino.config), ref_keys, atol=1e-5)

  # The distance against Splice's formula on transformers' keys (pairs 0-1, 1-2; float64 reference).
  d = dino.structure_distance(images[:2], images[1:])
  ref_d = [_splice_distance(ref_keys[0], ref_keys[1]), _splice_distance(ref_keys[1], ref_keys[2])]
  np.testing.assert_allclose(d, ref_d, rtol=1e-4, atol=0)
  assert min(ref_d) > 1e-4  # different photos: the comparison is not between zeros


def test_both_key_layouts_fill_the_same_params(tiny_vit):
  # save_pretrained writes the hub layout (encoder.layer.0.attention.attention.key); the module's own
  # state dict has transformers 5's names (layers.0.attention.k_proj).
  ref, folder, config = tiny_vit
  v5 = torch_state_dict(ref)
  assert "layers.0.attention.k_proj.weight" in v5
  hub, _ = loading.read_state_dict(folder, "model")
  assert "encoder.layer.0.attention.attention.key.weight" in hub
  cfg = dino_lib.DinoConfig.from_dict(config)
  a, b = dino_lib.params_from_torch(v5, cfg), dino_lib.params_from_torch(hub, cfg)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # Every tensor but the pooler's fills exactly one parameter.
  flat = weights.flax_shapes_of(a)
  assert flat == weights.flax_shapes_of(dino_lib.param_shapes(cfg))
  assert len(flat) == len([k for k in v5 if not k.startswith("pooler.")])
  np.testing.assert_array_equal(a["embeddings"]["cls_token"], v5["embeddings.cls_token"])


def test_weight_table_errors_name_the_key():
  cfg = dino_lib.DinoConfig.from_dict(TINY)
  state = torch_state_dict(_torch_vit(TINY, seed=0))
  bad = dict(state)
  bad["layers.1.attention.k_proj.weight"] = bad["layers.1.attention.k_proj.weight"][:, :-1]
  with pytest.raises(weights.WeightsError, match=r"layers\.1\.attention\.k_proj\.weight"):
    dino_lib.params_from_torch(bad, cfg)
  bad = {k: v for k, v in state.items() if k != "embeddings.position_embeddings"}
  with pytest.raises(weights.WeightsError, match="position_embeddings"):
    dino_lib.params_from_torch(bad, cfg)
  bad = {k: v for k, v in state.items() if k != "layers.0.mlp.fc2.bias"}
  with pytest.raises(weights.WeightsError, match="missing"):
    dino_lib.params_from_torch(bad, cfg)
  bad = dict(state, **{"layers.0.attention.bogus.weight": state["layers.0.attention.k_proj.weight"]})
  with pytest.raises(weights.WeightsError, match="bogus"):
    dino_lib.params_from_torch(bad, cfg)
  # A ViT-B/16 checkpoint is not a B/8 one: the position table has the wrong length.
  with pytest.raises(weights.WeightsError, match="position_embeddings"):
    dino_lib.params_from_torch(state, dino_lib.DinoConfig.from_dict(dict(TINY, patch_size=4)))


def test_layer_is_clips_encoder_layer():
  # The reuse claim: with DINO's qkv biases a DinoLayer is CLIP's bidirectional encoder layer.
  cfg = dino_lib.DinoConfig.from_dict(TINY)
  x_BTD = jax.random.normal(jax.random.key(0), (2, cfg.num_tokens, cfg.hidden_size))
  layer = dino_lib.DinoLayer(cfg)
  params = layers.random_params(jax.eval_shape(layer.init, jax.random.key(0), x_BTD)["params"], 3)
  ours, keys = layer.apply({"params": params}, x_BTD)
  clip = clip_text.CLIPEncoderLayer(cfg, causal=False).apply({"params": params}, x_BTD)
  np.testing.assert_allclose(ours, clip, atol=1e-6, rtol=0)
  assert keys.shape == x_BTD.shape and np.std(keys) > 0.1


def test_self_similarity_by_hand():
  keys = jnp.asarray([[[3.0, 4.0], [4.0, 3.0], [0.0, 0.0], [-3.0, -4.0]]])
  expected = np.asarray([[1, 24 / 25, 0, -1], [24 / 25, 1, 0, -24 / 25], [0, 0, 0, 0], [-1, -24 / 25, 0, 1]])
  np.testing.assert_allclose(dino_lib.self_similarity(keys)[0], expected, atol=1e-6)
  # Permuting tokens permutes rows and columns.
  perm = np.asarray([2, 0, 3, 1])
  np.testing.assert_allclose(dino_lib.self_similarity(keys[:, perm])[0], expected[perm][:, perm], atol=1e-6)


def _permute_patches(image_HWC, patch: int, perm):
  g = image_HWC.shape[0] // patch
  tiles = image_HWC.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, patch, patch, 3)
  return tiles[perm].reshape(g, g, patch, patch, 3).transpose(0, 2, 1, 3, 4).reshape(image_HWC.shape)


def test_distance_zero_symmetric_and_sees_patch_order():
  dino = loading.load_dino("tiny-random")
  assert dino.name == "tiny-random" and dino.config.patch_size == 8
  a, b = _photo("astronaut", 32), _photo("chelsea", 32)
  perm = np.random.default_rng(0).permutation(16)
  assert not np.array_equal(perm, np.arange(16))
  shuffled = _permute_patches(a, 8, perm)
  assert sorted(
    map(bytes, shuffled.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1))
  ) == sorted(
    map(bytes, a.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1))
  )  # the same patches, moved
  src = np.stack([a, a, a, b])
  edit = np.stack([a, shuffled, b, a])
  d = dino.structure_distance(src, edit)
  assert d.shape == (4,) and d.dtype == np.float32
  assert abs(d[0]) < 1e-9  # identical images
  assert d[1] > 1e-4  # the same patches in another order: the structure changed
  assert d[2] > 1e-4
  np.testing.assert_allclose(d[2], d[3], rtol=1e-6)  # symmetric
  # A source and an edit of different sizes compare (both are resized to the model's size).
  big = dino.structure_distance(np.stack([_photo("astronaut", 96)]), np.stack([a]))
  assert 0 < big[0] < d[2]


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("size", [(512, 384), (100, 150)])  # shrink (the filter matters), enlarge
def test_preprocess_matches_torch_bilinear(size, antialias):
  image = _photo("astronaut", size)
  ours = np.asarray(dino_lib.preprocess(image[None], 224, antialias=antialias))[0]
  x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
  ref = torch.nn.functional.interpolate(
    x, (224, 224), mode="bilinear", align_corners=False, antialias=antialias
  )
  ref = (ref[0].numpy().transpose(1, 2, 0) - MEAN) / STD
  assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_load_errors_name_the_problem(tmp_path, tiny_vit):
  _, folder, _ = tiny_vit
  with pytest.raises(dino_lib.DinoLoadError, match="config.json"):
    loading.load_dino(str(tmp_path))
  (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
  with pytest.raises(dino_lib.DinoLoadError, match="no weights"):
    loading.load_dino(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  with pytest.raises(dino_lib.DinoLoadError, match="not a ViTModel"):
    loading.load_dino(str(tmp_path))
  with pytest.raises(dino_lib.DinoLoadError, match="not a transformers ViTModel folder"):
    loading.load_dino("no/such/dino/folder")
  with pytest.raises(dino_lib.DinoLoadError, match="dtype"):
    loading.load_dino(folder, dtype="int8")


def test_half_precision_params():
  images = np.stack([_photo("astronaut", 32), _photo("chelsea", 32)])
  f32 = dino_lib.tiny_random_dino(seed=2)
  bf16 = dino_lib.Dino(
    f32.config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32.params), "bf16", "bfloat16"
  )
  d32 = f32.structure_distance(images[:1], images[1:])
  d16 = bf16.structure_distance(images[:1], images[1:])
  assert d16.dtype == np.float32
  np.testing.assert_allclose(d16, d32, rtol=0.1)


@pytest.mark.slow
def test_full_vit_b8_matches_transformers():
  """facebook/dino-vitb8's architecture (random weights) at 224 x 224: 785 tokens, 12 layers."""
  ref = _torch_vit(dino_lib.DINO_VITB8, seed=11)
  config = dino_lib.DinoConfig.from_dict(dino_lib.DINO_VITB8)
  assert config.num_tokens == 785
  params = dino_lib.params_from_torch(torch_state_dict(ref), config)
  images = _photo("astronaut", 224)[None]
  ref_hidden, ref_keys = _torch_forward(ref, images)
  hidden, keys = jax.jit(lambda p, x: dino_lib.DinoViT(config).apply({"params": p}, x))(
    params, dino_lib.preprocess(images)
  )
  assert keys.shape == (1, 785, 768)
  np.testing.assert_allclose(hidden, ref_hidden, atol=2e-5 * np.abs(ref_hidden).max(), rtol=0)
  np.testing.assert_allclose(keys, ref_keys, atol=2e-5 * np.abs(ref_keys).max(), rtol=0)
