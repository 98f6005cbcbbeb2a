"""Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL with the same weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lusd_jax import weights
from lusd_jax.models import vae
from tests import builders

# PyTorch references on one thread (tests/conftest.py: shared cores).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def assert_parity(ours, ref, rtol=1e-4):
  """max |ours - ref| <= rtol * max |ref| (the project's parity criterion)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= rtol * np.abs(ref).max(), f"max abs err {err:.3g} vs max |ref| {np.abs(ref).max():.3g}"


def nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def torch_vae():
  return builders.tiny_vae(seed=0)


@pytest.fixture(scope="module")
def config(torch_vae):
  return vae.VAEConfig.from_dict(dict(torch_vae.config))


@pytest.fixture(scope="module")
def state_dict(torch_vae):
  return builders.torch_state_dict(torch_vae)


@pytest.fixture(scope="module")
def params(state_dict, config):
  return vae.params_from_torch(state_dict, config)


@pytest.fixture(scope="module")
def images_NCHW():
  return np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_posterior(torch_vae, images_NCHW):
  with torch.no_grad():
    dist = torch_vae.encode(torch.from_numpy(images_NCHW)).latent_dist
  return dist.mean.numpy(), dist.logvar.numpy()


# --- config -----------------------------------------------------------------------------------


def test_config_from_json_matches_diffusers_config(torch_vae, config, tmp_path):
  # As diffusers writes it: lists, `_class_name` / `_diffusers_version` metadata.
  torch_vae.save_config(tmp_path)
  assert "_class_name" in json.loads((tmp_path / "config.json").read_text())
  from_file = vae.VAEConfig.from_json(tmp_path / "config.json")
  assert from_file == config
  assert from_file.block_out_channels == builders.TINY_VAE["block_out_channels"]
  assert isinstance(from_file.down_block_types, tuple)
  assert from_file.downsample_factor == 8
  assert (from_file.scaling_factor, from_file.shift_factor) == (0.18215, None)


def test_full_size_sd_vae_maps_key_for_key():
  # SD1.5's vae/config.json predates scaling_factor & co.: everything else takes diffusers' defaults.
  sd15 = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
  }
  cfg = vae.VAEConfig.from_dict(sd15)
  assert cfg.scaling_factor == 0.18215 and cfg.use_quant_conv and cfg.mid_block_add_attention
  from diffusers import AutoencoderKL

  with torch.device("meta"):  # shapes only, no memory
    model = AutoencoderKL(**{k: v for k, v in sd15.items() if not k.startswith("_")})
  torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  rows = weights.conversion_table(torch_shapes, weights.flax_shapes_of(vae.param_shapes(cfg)))
  assert len(rows) == len(torch_shapes)


@pytest.mark.parametrize(
  "bad, key",
  [
    ({"latents_mean": [0.1] * 4}, "latents_mean"),
    ({"latents_std": [1.0] * 4}, "latents_std"),
    ({"down_block_types": ["AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpBlock2D"]}, "up_block_types"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"block_out_channels": [64, 64]}, "block_out_channels"),
  ],
)
def test_config_errors_name_the_key(bad, key):
  with pytest.raises(ValueError, match=key):
    vae.VAEConfig.from_dict({"block_out_channels": [64], **bad})


# --- parity -----------------------------------------------------------------------------------


def test_encode_parity(params, config, images_NCHW, torch_posterior):
  mean, logvar = vae.encode_moments(params, config, nchw_to_nhwc(images_NCHW))
  assert mean.shape == (2, 8, 8, 4)
  assert_parity(mean, nchw_to_nhwc(torch_posterior[0]))
  assert_parity(logvar, nchw_to_nhwc(torch_posterior[1]))
  np.testing.assert_array_equal(vae.encode_mean(params, config, nchw_to_nhwc(images_NCHW)), mean)


def test_decode_parity(torch_vae, params, config):
  z_NCHW = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    ref = torch_vae.decode(torch.from_numpy(z_NCHW)).sample.numpy()
  out = vae.decode(params, config, nchw_to_nhwc(z_NCHW))
  assert out.shape == (2, 64, 64, 3)
  assert_parity(out, nchw_to_nhwc(ref))


def test_reconstruction_parity_without_quant_convs_or_mid_attention():
  # The config switches of newer VAEs (e.g. no quant convs, no mid-block attention), at 32x32.
  from diffusers import AutoencoderKL

  kwargs = dict(
    builders.TINY_VAE,
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=2,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
  )
  torch.manual_seed(3)
  model = builders.perturb_(AutoencoderKL(**kwargs), 4)
  config = vae.VAEConfig.from_dict(dict(model.config))
  params = vae.params_from_torch(builders.torch_state_dict(model), config)
  assert "quant_conv" not in params and "attentions_0" not in params["encoder"]["mid_block"]
  x_NCHW = np.random.default_rng(2).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x_NCHW), sample_posterior=False).sample.numpy()
  out = vae.decode(params, config, vae.encode_mean(params, config, nchw_to_nhwc(x_NCHW)))
  assert_parity(out, nchw_to_nhwc(ref))


# --- sampling, jit, dtype ---------------------------------------------------------------------


def test_logvar_is_clamped_as_diffusers_does(torch_vae, params, config, images_NCHW):
  # Push the log-variance channels of quant_conv far beyond [-30, 20], in both frameworks.
  lat = config.latent_channels
  bias = np.asarray(params["quant_conv"]["bias"]).copy()
  bias[lat:] = np.array([100.0, -100.0, 100.0, -100.0])
  shifted = {**params, "quant_conv": {**params["quant_conv"], "bias": jnp.asarray(bias)}}
  _, logvar = vae.encode_moments(shifted, config, nchw_to_nhwc(images_NCHW))
  np.testing.assert_array_equal(np.asarray(logvar)[..., 0], 20.0)
  np.testing.assert_array_equal(np.asarray(logvar)[..., 1], -30.0)
  with torch.no_grad():
    old = torch_vae.quant_conv.bias.clone()
    torch_vae.quant_conv.bias[lat:] = torch.from_numpy(bias[lat:])
    try:
      ref = torch_vae.encode(torch.from_numpy(images_NCHW)).latent_dist.logvar.numpy()
    finally:
      torch_vae.quant_conv.bias.copy_(old)
  np.testing.assert_allclose(logvar, nchw_to_nhwc(ref), atol=1e-3)


def test_jit_matches_eager(params, config, images_NCHW):
  x = jnp.asarray(nchw_to_nhwc(images_NCHW))
  eager = vae.encode_mean(params, config, x)
  jitted = jax.jit(vae.encode_mean, static_argnums=1)(params, config, x)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_stays_close(params, config):
  z = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  ref = vae.decode(params, config, z)
  out = vae.decode(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), config, z, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
  assert err <= 0.05 * float(jnp.abs(ref).max())


def test_init_params_has_the_checkpoint_structure(config, params):
  fresh = vae.init_params(config, jax.random.key(0), jnp.bfloat16)
  assert jax.tree.structure(fresh) == jax.tree.structure(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fresh), jax.tree.leaves(params), strict=True):
    assert a.shape == b.shape and a.dtype == jnp.bfloat16, path
    assert np.ptp(np.asarray(a, np.float32)) > 0, path  # no constant parameter
  out = vae.decode(jax.tree.map(lambda p: p.astype(jnp.float32), fresh), config, jnp.zeros((2, 8, 8, 4)))
  assert out.shape == (2, 64, 64, 3) and bool(jnp.isfinite(out).all())


# --- weight loading ---------------------------------------------------------------------------


def _legacy(key: str) -> str:
  for new, old in (
    (".to_q.", ".query."),
    (".to_k.", ".key."),
    (".to_v.", ".value."),
    (".to_out.0.", ".proj_attn."),
  ):
    key = key.replace(new, old)
  return key


def test_legacy_attention_names_load(state_dict, config, params):
  # Old checkpoints: query/key/value/proj_attn, stored as 1x1 convs when converted from the LDM .ckpt.
  legacy = {}
  for k, v in state_dict.items():
    name = _legacy(k)
    legacy[name] = (
      v[:, :, None, None] if name != k and name.endswith(("query.weight", "proj_attn.weight")) else v
    )
  assert any(k.endswith("query.weight") for k in legacy)
  loaded = vae.params_from_torch(legacy, config)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_wrong_shape_names_the_key(state_dict, config):
  bad = dict(state_dict)
  bad["decoder.conv_in.weight"] = np.zeros((16, 4, 3, 3), np.float32)
  with pytest.raises(weights.WeightsError, match=r"decoder\.conv_in\.weight"):
    vae.params_from_torch(bad, config)


def test_missing_key_names_the_parameter(state_dict, config):
  bad = {k: v for k, v in state_dict.items() if k != "encoder.mid_block.attentions.0.to_k.bias"}
  with pytest.raises(weights.WeightsError, match="encoder/mid_block/attentions_0/to_k/bias"):
    vae.params_from_torch(bad, config)


def test_unknown_key_names_the_key(state_dict, config):
  bad = {**state_dict, "encoder.down_blocks.0.attentions.0.to_q.weight": np.zeros((16, 16), np.float32)}
  with pytest.raises(weights.WeightsError, match=r"encoder\.down_blocks\.0\.attentions\.0\.to_q\.weight"):
    vae.params_from_torch(bad, config)
