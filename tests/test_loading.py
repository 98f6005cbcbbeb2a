"""load_model on real diffusers folder layouts, its errors, and the `lusd-jax convert` round trip."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from lusd_jax import cli, convert, loading
from lusd_jax.compiler import jit
from lusd_jax.models import unet as unet_lib

# The torch references on one thread (conftest.py: many threads on a shared machine are far slower).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@functools.cache
def _jitted_apply(cfg: unet_lib.UNetConfig):
  """One compiled forward per config: op-by-op (eager) dispatch of the U-Net costs far more time."""
  model = unet_lib.UNet2DConditionModel(cfg)
  return jit(lambda params, z, t, ctx: model.apply({"params": params}, z, t, ctx))


def _unet_forward(model: loading.SDModel, seed=0):
  cfg = model.configs.unet
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((1, 16, 16, cfg.in_channels)).astype(np.float32)
  ctx = rng.standard_normal((1, 77, cfg.cross_attention_dim)).astype(np.float32)
  eps, _ = _jitted_apply(cfg)(model.params.unet, z, jnp.array([500]), ctx)
  return z, ctx, np.asarray(eps)


@pytest.mark.slow
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


@pytest.mark.slow
def test_convert_round_trip(tiny_sd1_dir, tmp_path, capsys):
  out = tmp_path / "converted"
  assert cli.main(["convert", tiny_sd1_dir, str(out)]) == 0
  assert "round trip verified" in capsys.readouterr().out
  original = loading.load_model(tiny_sd1_dir)
  converted = loading.load_model(str(out))
  assert converted.configs == original.configs
  assert convert.verify_round_trip(original, str(out)) == len(jax.tree.leaves(original.params))
  np.testing.assert_array_equal(_unet_forward(converted)[2], _unet_forward(original)[2])
  assert converted.tokenizer("a cat")["input_ids"] == [49406, 320, 2368, 49407]


def test_convert_runs_as_a_module(tmp_path):
  """`python -m lusd_jax.cli convert SRC OUT`: the command line without the installed script."""
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(convert.__file__))}
  res = subprocess.run(
    [sys.executable, "-m", "lusd_jax.cli", "convert", str(tmp_path / "nothing_here"), str(tmp_path / "out")],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  assert res.returncode == 2, res.stderr
  assert res.stderr.startswith("error: ") and "nothing_here" in res.stderr


def test_converted_folder_errors(tiny_sd1_dir, tmp_path, capsys):
  out = tmp_path / "converted"
  convert.convert(tiny_sd1_dir, str(out))
  flat = load_file(out / "vae.safetensors")
  key = sorted(flat)[0]
  del flat[key]
  save_file(flat, out / "vae.safetensors")
  with pytest.raises(loading.ModelLoadError, match=rf"vae.safetensors: missing parameter '{key}'"):
    loading.load_model(str(out))
  assert cli.main(["convert", str(tmp_path / "nothing_here"), str(tmp_path / "o2")]) == 2
  assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_random_model_runs_without_torch_weights():
  model = loading.load_model("tiny-random")
  assert model.is_random
  _, _, eps = _unet_forward(model)
  assert eps.shape == (1, 16, 16, 4) and np.all(np.isfinite(eps))


# ----------------------------------------------------------------------------- dtype policies

HALF = {"mixed-float16": jnp.float16, "mixed-bfloat16": jnp.bfloat16}


def _leaf_dtypes(tree):
  return {x.dtype for x in jax.tree.leaves(tree)}


@pytest.fixture(scope="module")
def converted_sd1_dir(tiny_sd1_dir, tmp_path_factory):
  """The tiny SD1 folder converted once for the module's readers (they do not modify it)."""
  out = str(tmp_path_factory.mktemp("converted_sd1") / "converted")
  convert.convert(tiny_sd1_dir, out)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("policy", sorted(HALF))
def test_mixed_policy_keeps_the_encoders_in_float32(policy, tiny_sd1_dir, converted_sd1_dir):
  half = jnp.dtype(HALF[policy])
  folder = loading.load_model(tiny_sd1_dir, dtype=policy)
  converted = loading.load_model(converted_sd1_dir, dtype=policy)
  for model in (loading.load_model("tiny-random", dtype=policy), folder, converted):
    assert model.dtype == policy and model.unet_dtype == half.name
    assert jnp.dtype(model.compute_dtype) == jnp.float32
    assert _leaf_dtypes(model.params.unet) == {half}
    assert (
      _leaf_dtypes(model.params.vae) == _leaf_dtypes(model.params.text_encoder) == {jnp.dtype(jnp.float32)}
    )
  # The encoders hold the checkpoint's float32 values, not half-precision roundings of them.
  full = loading.load_model(tiny_sd1_dir)
  assert jax.tree.all(
    jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), folder.params.vae, full.params.vae)
  )


@pytest.mark.parametrize("policy", ["float32", "bfloat16", "float16"])
def test_plain_policies_use_one_dtype_everywhere(policy):
  model = loading.load_model("tiny-random", dtype=policy)
  assert model.unet_dtype == policy and jnp.dtype(model.compute_dtype) == jnp.dtype(policy)
  assert _leaf_dtypes(model.params) == {jnp.dtype(policy)}


def test_unknown_policy_lists_the_choices():
  with pytest.raises(loading.ModelLoadError, match=r"'mixed-float32' is not supported.*mixed-bfloat16"):
    loading.load_model("tiny-random", dtype="mixed-float32")


def test_dtype_argument_lists_every_policy(capsys):
  import argparse

  from lusd_jax import cli

  parser = argparse.ArgumentParser()
  cli.add_model_arguments(parser)
  assert parser.parse_args(["--dtype", "mixed-bfloat16"]).dtype == "mixed-bfloat16"
  with pytest.raises(SystemExit):
    parser.parse_args(["--dtype", "mixed-float32"])
  capsys.readouterr()
  parser.print_help()
  # argparse wraps lines, at hyphens too: compare without whitespace.
  text = "".join(capsys.readouterr().out.split())
  for name, policy in loading.DTYPE_POLICIES.items():
    assert "".join(f"{name}: {policy.help}".split()) in text


@pytest.mark.slow
def test_mixed_bfloat16_unet_computes_in_bfloat16():
  from lusd_jax.lusd import core

  model = loading.load_model("tiny-random", dtype="mixed-bfloat16")
  rng = np.random.default_rng(0)
  z = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 77, model.configs.unet.cross_attention_dim)).astype(np.float32)
  t = jnp.array([500])
  # Compiled (an eager U-Net dispatches op by op: far slower than compiling it).
  forward = lambda fn: jit(lambda p, z, t, c: fn(p, z, t, c, None))  # noqa: E731
  half, _ = forward(core.FlaxUNet(model.configs.unet, model.unet_dtype))(model.params.unet, z, t, ctx)
  # The same (bfloat16-valued) params with float32 activations: what only rounding the params gives.
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), model.params.unet)
  full, _ = forward(core.FlaxUNet(model.configs.unet, "float32"))(params32, z, t, ctx)
  assert half.dtype == jnp.bfloat16
  half, full = np.asarray(half, np.float32), np.asarray(full)
  err = np.linalg.norm(half - full) / np.linalg.norm(full)
  assert 0 < err < 0.05, err


def _tiny_edit(dtype):
  from lusd_jax import pipeline
  from lusd_jax.lusd.config import LUSDConfig

  # No filtering: both runs use the same draws, so only the U-Net's rounding separates them. On
  # CPU, float16 runs through FlaxUNet's chunked-attention fallback.
  config = LUSDConfig(num_steps=2, lr=1 / 64, threshold=0.0)
  image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  model = loading.load_model("tiny-random", dtype=dtype)
  return model, pipeline.edit(model, image, "a photo of a cat", "a photo of a dog", config=config, size=64)


@pytest.fixture(scope="module")
def float32_edit():
  """The float32 edit both policies are compared with (run once per module, not once per policy)."""
  return _tiny_edit("float32")


@pytest.mark.slow
@pytest.mark.parametrize("policy", sorted(HALF))
def test_mixed_edit_runs_close_to_float32(policy, float32_edit):
  from lusd_jax import pipeline

  model32, full = float32_edit
  _, half = _tiny_edit(policy)
  assert np.all(np.isfinite(half.latents)) and np.all(np.isfinite(half.images))
  np.testing.assert_array_equal(half.timesteps, full.timesteps)
  # The VAE is float32 under both policies: the source latent is the same.
  z_src = pipeline.encode_image(model32, full.input_image)
  step_full, step_half = full.latents[0] - z_src, half.latents[0] - z_src
  err = np.linalg.norm(step_half - step_full) / np.linalg.norm(step_full)
  assert 0 < err < 0.2, err
