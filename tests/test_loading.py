"""load_model on real diffusers folder layouts, its errors, and the convert/ round trip."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from convert import convert_checkpoint
from lusd_jax import loading
from lusd_jax.models import unet as unet_lib


def _unet_forward(model: loading.SDModel, seed=0):
  cfg = model.configs.unet
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((1, 16, 16, cfg.in_channels)).astype(np.float32)
  ctx = rng.standard_normal((1, 77, cfg.cross_attention_dim)).astype(np.float32)
  eps, _ = unet_lib.UNet2DConditionModel(cfg).apply({"params": model.params.unet}, z, jnp.array([500]), ctx)
  return z, ctx, np.asarray(eps)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_loaded_folder_matches_diffusers_loading_the_same_files(style, tiny_sd1_dir, tiny_sd2_dir):
  from diffusers import UNet2DConditionModel

  folder = tiny_sd1_dir if style == "sd1" else tiny_sd2_dir
  model = loading.load_model(folder)
  z, ctx, eps = _unet_forward(model)
  ref = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
  with torch.no_grad():
    out = ref(torch.from_numpy(z).permute(0, 3, 1, 2), 500, torch.from_numpy(ctx)).sample
  out = out.permute(0, 2, 3, 1).numpy()
  assert np.max(np.abs(eps - out)) <= 1e-4 * np.max(np.abs(out))
  expected_pred = "epsilon" if style == "sd1" else "v_prediction"
  assert model.configs.schedule.prediction_type == expected_pred
  assert model.tokenizer("a cat")["input_ids"] == [49406, 320, 2368, 49407]


def test_bfloat16_params(tiny_sd1_dir):
  model = loading.load_model(tiny_sd1_dir, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}


def test_bin_weights_load_like_safetensors(tiny_sd1_dir, tmp_path):
  folder = tmp_path / "bin"
  shutil.copytree(tiny_sd1_dir, folder)
  st = folder / "unet" / "diffusion_pytorch_model.safetensors"
  torch.save(
    {k: torch.from_numpy(v) for k, v in load_file(st).items()},
    folder / "unet" / "diffusion_pytorch_model.bin",
  )
  st.unlink()
  a = loading.load_model(tiny_sd1_dir).params.unet
  b = loading.load_model(str(folder)).params.unet
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def _copy(src, tmp_path, name="broken"):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


def test_missing_unet_weights_names_the_folder(tiny_sd1_dir, tmp_path):
  folder = _copy(tiny_sd1_dir, tmp_path)
  (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
  with pytest.raises(loading.ModelLoadError, match=r"no weights in .*unet"):
    loading.load_model(str(folder))


def test_missing_component_folder(tiny_sd1_dir, tmp_path):
  folder = _copy(tiny_sd1_dir, tmp_path)
  shutil.rmtree(folder / "vae")
  with pytest.raises(loading.ModelLoadError, match=r"missing folder .*vae"):
    loading.load_model(str(folder))


def test_wrong_shape_names_file_and_key(tiny_sd1_dir, tmp_path):
  folder = _copy(tiny_sd1_dir, tmp_path)
  path = folder / "unet" / "diffusion_pytorch_model.safetensors"
  sd = load_file(path)
  key = "down_blocks.1.attentions.0.proj_in.weight"
  sd[key] = np.zeros((7,) + sd[key].shape[1:], np.float32)
  save_file(sd, path)
  with pytest.raises(loading.ModelLoadError, match=rf"diffusion_pytorch_model.safetensors.*{key}"):
    loading.load_model(str(folder))


def test_missing_key_names_the_parameter(tiny_sd1_dir, tmp_path):
  folder = _copy(tiny_sd1_dir, tmp_path)
  path = folder / "text_encoder" / "model.safetensors"
  sd = load_file(path)
  del sd["text_model.final_layer_norm.weight"]  # the SD1 test folder has the published (prefixed) keys
  save_file(sd, path)
  with pytest.raises(loading.ModelLoadError, match=r"final_layer_norm/scale"):
    loading.load_model(str(folder))


def test_unsupported_architecture_names_the_key(tiny_sd1_dir, tmp_path):
  folder = _copy(tiny_sd1_dir, tmp_path)
  cfg_path = folder / "unet" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["class_embed_type"] = "timestep"
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(loading.ModelLoadError, match=r"unet/config.json.*class_embed_type"):
    loading.load_model(str(folder))


@pytest.mark.parametrize(
  "arg, pattern",
  [("./no/such/folder", "no such folder"), ("float32", "no such folder"), ("a/b/c", "no such folder")],
)
def test_unknown_model_path(arg, pattern):
  with pytest.raises(loading.ModelLoadError, match=pattern):
    loading.load_model(arg)


def test_bad_dtype(tiny_sd1_dir):
  with pytest.raises(loading.ModelLoadError, match="dtype"):
    loading.load_model(tiny_sd1_dir, dtype="int8")


def test_convert_round_trip(tiny_sd1_dir, tmp_path, capsys):
  out = tmp_path / "converted"
  assert convert_checkpoint.main([tiny_sd1_dir, str(out)]) == 0
  assert "round trip verified" in capsys.readouterr().out
  original = loading.load_model(tiny_sd1_dir)
  converted = loading.load_model(str(out))
  assert converted.configs == original.configs
  assert convert_checkpoint.verify_round_trip(original, str(out)) == len(jax.tree.leaves(original.params))
  np.testing.assert_array_equal(_unet_forward(converted)[2], _unet_forward(original)[2])
  assert converted.tokenizer("a cat")["input_ids"] == [49406, 320, 2368, 49407]


def test_converted_folder_errors(tiny_sd1_dir, tmp_path, capsys):
  out = tmp_path / "converted"
  convert_checkpoint.convert(tiny_sd1_dir, str(out))
  flat = load_file(out / "vae.safetensors")
  key = sorted(flat)[0]
  del flat[key]
  save_file(flat, out / "vae.safetensors")
  with pytest.raises(loading.ModelLoadError, match=rf"vae.safetensors: missing parameter '{key}'"):
    loading.load_model(str(out))
  assert convert_checkpoint.main([str(tmp_path / "nothing_here"), str(tmp_path / "o2")]) == 2
  assert "error:" in capsys.readouterr().err


def test_tiny_random_model_runs_without_torch_weights():
  model = loading.load_model("tiny-random")
  assert model.is_random
  _, _, eps = _unet_forward(model)
  assert eps.shape == (1, 16, 16, 4) and np.all(np.isfinite(eps))
