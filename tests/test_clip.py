"""Flax CLIP against transformers' PyTorch `CLIPModel`, and OpenAI preprocessing on real photos."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from lusd_jax import loading, weights
from lusd_jax import tokenizer as tokenizer_lib
from lusd_jax.models import clip as clip_lib
from tests.builders import perturb_, torch_state_dict

# PyTorch references on one thread (tests/conftest.py: shared cores).
pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Two text configs: openai/clip-* configs predate transformers PR #24773 and say eos_token_id=2
# (pooling = argmax of the ids); newer ones name the real end-of-text id (first match).
TEXT_LEGACY = dict(
  vocab_size=49408,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=77,
  bos_token_id=0,
  eos_token_id=2,
  pad_token_id=1,
)
TEXT_NEW = dict(TEXT_LEGACY, bos_token_id=49406, eos_token_id=49407, hidden_act="gelu")
VISION = dict(
  hidden_size=48,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=224,
  patch_size=32,
)
PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "hubble_deep_field")  # camera: grayscale
TEXTS = ["a photo of a cat", "an astronaut riding a horse", "a " + "very " * 90 + "long prompt", ""]


def _photo(name: str) -> Image.Image:
  return Image.fromarray(getattr(data, name)())


def _build(folder, text_config, seed) -> torch.nn.Module:
  from transformers import CLIPConfig, CLIPModel

  torch.manual_seed(seed)
  model = perturb_(
    CLIPModel(CLIPConfig(text_config=text_config, vision_config=VISION, projection_dim=24)), seed + 1
  )
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module", params=["legacy_eos", "new_eos"])
def tiny_clip(request, tmp_path_factory):
  """(PyTorch CLIPModel, its save_pretrained folder) with perturbed random weights."""
  folder = tmp_path_factory.mktemp(f"clip_{request.param}")
  text = TEXT_LEGACY if request.param == "legacy_eos" else TEXT_NEW
  return _build(folder, text, seed=3 if request.param == "legacy_eos" else 4), str(folder)


def test_embeddings_match_transformers(tiny_clip):
  ref, folder = tiny_clip
  model = loading.load_clip(folder)
  # The folder has no vocab.json: the bundled CLIP tokenizer is used.
  assert model.tokenizer("a cat")["input_ids"] == [49406, 320, 2368, 49407]

  images = [_photo(n) for n in PHOTOS]
  img_NP = model.embed_images(images, batch_size=4)  # 5 images: a full and a padded batch
  pixels_NCHW = np.stack([clip_lib.preprocess_image(im) for im in images]).transpose(0, 3, 1, 2)
  with torch.no_grad():
    ref_img_NP = ref.get_image_features(pixel_values=torch.from_numpy(pixels_NCHW)).pooler_output.numpy()
  assert img_NP.shape == (5, 24)
  np.testing.assert_allclose(img_NP, ref_img_NP, atol=1e-4, rtol=0)

  txt_NP = model.embed_texts(TEXTS)
  ids_NL = tokenizer_lib.tokenize(model.tokenizer, TEXTS)
  assert ids_NL.shape == (4, 77) and ids_NL[2, -1] == tokenizer_lib.EOS_ID  # truncated at 77 tokens
  mask_NL = torch.from_numpy((np.cumsum(ids_NL == tokenizer_lib.EOS_ID, axis=1) <= 1).astype(np.int64))
  with torch.no_grad():
    ref_txt = ref.get_text_features(input_ids=torch.from_numpy(ids_NL).long()).pooler_output.numpy()
    # The causal mask alone keeps padding out of the end-of-text state: a padding mask changes nothing.
    ref_txt_masked = ref.get_text_features(
      input_ids=torch.from_numpy(ids_NL).long(), attention_mask=mask_NL
    ).pooler_output.numpy()
  np.testing.assert_allclose(txt_NP, ref_txt, atol=1e-4, rtol=0)
  np.testing.assert_allclose(txt_NP, ref_txt_masked, atol=1e-4, rtol=0)
  # Different inputs give different embeddings (the comparison is not between constants).
  assert np.max(np.abs(img_NP[0] - img_NP[1])) > 1e-2
  assert np.max(np.abs(txt_NP[0] - txt_NP[1])) > 1e-2


def test_every_checkpoint_key_fills_one_param(tiny_clip):
  ref, folder = tiny_clip
  config = clip_lib.CLIPConfig.from_json(os.path.join(folder, "config.json"))
  state = torch_state_dict(ref)
  params = clip_lib.params_from_torch(state, config)
  flat = weights.flax_shapes_of(params)
  assert flat == weights.flax_shapes_of(clip_lib.param_shapes(config))
  # Every PyTorch tensor except logit_scale is used, once.
  assert len(flat) == len([k for k in state if k != "logit_scale"])
  np.testing.assert_array_equal(
    params["vision_model"]["embeddings"]["class_embedding"], state["vision_model.embeddings.class_embedding"]
  )
  bad = dict(state)
  bad["visual_projection.weight"] = bad["visual_projection.weight"][:, :-1]
  with pytest.raises(weights.WeightsError, match="visual_projection.weight"):
    clip_lib.params_from_torch(bad, config)
  del bad["vision_model.embeddings.class_embedding"]
  with pytest.raises(weights.WeightsError, match="class_embedding"):
    clip_lib.params_from_torch(bad, config)


def test_preprocessing_matches_openai_recipe_on_photos():
  from transformers import CLIPImageProcessorPil

  processor = CLIPImageProcessorPil()  # do_resize shortest_edge 224 bicubic, crop 224, CLIP mean/std
  for name in PHOTOS:
    im = _photo(name)
    ours = clip_lib.preprocess_image(im)
    ref = processor(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    # Same PIL bicubic resize and float32 arithmetic: equal to rounding.
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0, err_msg=name)


def test_center_crop_offset_rounds_like_torchvision():
  # rocket: 427 x 640 -> 224 x 335; 111 extra columns. torchvision's CenterCrop (OpenAI) starts at
  # round(55.5) = 56, transformers' image processor at 111 // 2 = 55: the same pixels, one column apart.
  from transformers import CLIPImageProcessorPil

  im = _photo("rocket")
  ours = clip_lib.preprocess_image(im)
  resized = CLIPImageProcessorPil(do_center_crop=False)(images=im, return_tensors="np")["pixel_values"][0]
  resized = resized.transpose(1, 2, 0)
  assert resized.shape == (224, 335, 3)
  np.testing.assert_allclose(ours, resized[:, 56 : 56 + 224], atol=1e-6, rtol=0)
  ref = CLIPImageProcessorPil()(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(ours[:, :-1], ref[:, 1:], atol=1e-6, rtol=0)
  assert np.max(np.abs(ours - ref)) > 0.1


def test_tiny_random_clip_has_no_constant_param():
  model = clip_lib.tiny_random_clip(seed=1)
  for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
    assert np.std(leaf) > 0, jax.tree_util.keystr(path)
  img = model.embed_images([_photo("astronaut"), _photo("chelsea")])
  txt = model.embed_texts(["a cat", "a dog", "a horse"])
  assert img.shape == (2, 32) and txt.shape == (3, 32)
  assert np.all(np.isfinite(img)) and np.all(np.isfinite(txt))


def test_load_errors_name_the_problem(tmp_path, tiny_clip):
  _, folder = tiny_clip
  with pytest.raises(clip_lib.CLIPLoadError, match="config.json"):
    loading.load_clip(str(tmp_path))
  (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  with pytest.raises(clip_lib.CLIPLoadError, match="no weights"):
    loading.load_clip(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
  with pytest.raises(clip_lib.CLIPLoadError, match="not a CLIPModel"):
    loading.load_clip(str(tmp_path))
  with pytest.raises(clip_lib.CLIPLoadError, match="not a transformers CLIPModel folder"):
    loading.load_clip("no/such/clip/folder")


@pytest.mark.slow
def test_vit_l14_matches_transformers():
  """openai/clip-vit-large-patch14's architecture (random weights): embeddings and the CLIP score.

  The UnifyEdit protocol's editability is loveu-tgve's `logits_per_image` of this model, with OpenAI's
  logit scale exp(ln 100) = 100: 100 x cos(image, text). One photo and one prompt keep it cheap.
  """
  from transformers import CLIPConfig, CLIPModel

  arch = clip_lib.CLIP_VIT_L14
  torch.manual_seed(21)
  ref = CLIPModel(CLIPConfig(**arch)).eval()
  g = torch.Generator().manual_seed(22)
  with torch.no_grad():
    # The init leaves LayerNorms at 1 / 0 and biases at 0: perturb those (cheap; the matrices are random).
    for p in ref.parameters():
      if p.ndim == 1:
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref.logit_scale.fill_(np.log(100.0))  # OpenAI's trained value (random init says 1 / 0.07)
  pixels_1HWC = clip_lib.preprocess_image(_photo("astronaut"))[None]
  tok = tokenizer_lib.bundled_tokenizer()
  ids_1L = tokenizer_lib.tokenize(tok, ["an astronaut riding a horse"])
  with torch.no_grad():
    out = ref(
      input_ids=torch.from_numpy(ids_1L).long(),
      pixel_values=torch.from_numpy(pixels_1HWC.transpose(0, 3, 1, 2).copy()),
    )
  ref_img, ref_txt = out.image_embeds.numpy(), out.text_embeds.numpy()  # L2-normalised projections
  ref_score = float(out.logits_per_image[0, 0])
  model = clip_lib.clip_from_state_dict(dict(arch), torch_state_dict(ref), tok, "vit-l14-random")
  del ref, out  # the PyTorch copy of the 428M parameters
  assert model.config.vision_config.num_patches == 256 and model.config.projection_dim == 768

  img_1P = model.embed_images([_photo("astronaut")])
  txt_1P = model.embed_texts(["an astronaut riding a horse"])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(unit(img_1P), ref_img, atol=1e-4, rtol=0)
  np.testing.assert_allclose(unit(txt_1P), ref_txt, atol=1e-4, rtol=0)
  from lusd_jax.evaluation import clip_score

  assert clip_score(img_1P, txt_1P)[0] == pytest.approx(ref_score, abs=1e-3)
  assert abs(ref_score) > 0.1  # the tolerance is under 1% of the score
  assert np.std(img_1P) > 1e-3 and np.std(txt_1P) > 1e-3
