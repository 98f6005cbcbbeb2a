"""The Flax U-Net against diffusers' PyTorch `UNet2DConditionModel` with the same weights.

Reference attention maps come from a diffusers attention processor installed with
`set_attn_processor`: it computes every layer's probabilities with `attn.get_attention_scores` and
records them with the layer's token count, so the test selects layers by feature-map size exactly
as `CaptureSpec` promises. Each jitted forward compiles once (about 10 s for the tiny U-Net on CPU),
so every test checks several properties on one compiled call.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lusd_jax import weights
from lusd_jax.models import unet
from tests import builders

# PyTorch references on one thread (tests/conftest.py: shared cores).
pytestmark = pytest.mark.usefixtures("torch_one_thread")

PARITY_RTOL = 1e-4  # max |jax - torch| <= PARITY_RTOL * max |torch|
MAPS_ATOL = 1e-5


class RecordingProcessor:
  """diffusers `AttnProcessor` math that also records head-averaged probabilities per layer."""

  def __init__(self):
    self.records: list[tuple[str, int, np.ndarray]] = []  # (kind, query tokens, [B, T, S])

  def __call__(
    self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
  ):
    kind = "self" if encoder_hidden_states is None else "cross"
    probs, out = builders.attention_with_probs(attn, hidden_states, encoder_hidden_states)
    self.records.append((kind, hidden_states.shape[1], probs.mean(1).float().numpy()))
    return out


def level_sizes(h: int, w: int, n_blocks: int) -> list[tuple[int, int]]:
  """Feature-map sizes of the U-Net levels (stride-2, padding-1 convs round up)."""
  sizes = [(h, w)]
  for _ in range(n_blocks - 1):
    h, w = sizes[-1]
    sizes.append(((h + 1) // 2, (w + 1) // 2))
  return sizes


def reference_maps(records, kind: str, res: int, hw: tuple[int, int], n_blocks: int) -> np.ndarray:
  """Mean of the recorded maps of `kind` layers on the level whose height is `res`."""
  (tokens,) = [h * w for h, w in level_sizes(*hw, n_blocks) if h == res]
  maps = [m for k, t, m in records if k == kind and t == tokens]
  assert maps, (kind, res)
  return np.mean(np.stack(maps), axis=0)


def torch_forward(model, x_BHWC, t, ctx_BLD):
  """eps (NHWC numpy) and the recorded maps of one PyTorch forward."""
  rec = RecordingProcessor()
  model.set_attn_processor(rec)
  t = torch.as_tensor(t)
  with torch.no_grad():
    out = model(torch.from_numpy(x_BHWC.transpose(0, 3, 1, 2)), t, torch.from_numpy(ctx_BLD)).sample
  return out.numpy().transpose(0, 2, 3, 1), rec.records


def assert_parity(out, ref):
  out = np.asarray(out)
  assert out.shape == ref.shape
  err = np.abs(out - ref).max()
  assert err <= PARITY_RTOL * np.abs(ref).max(), (err, np.abs(ref).max())


def inputs(cfg: unet.UNetConfig, b: int, h: int, w: int, seed: int = 0, tokens: int = 77):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, h, w, cfg.in_channels)).astype(np.float32)
  ctx = rng.standard_normal((b, tokens, cfg.cross_attention_dim)).astype(np.float32)
  return x, ctx


def make(style: str):
  torch_model = builders.tiny_unet(style)
  cfg = unet.UNetConfig.from_dict(dict(torch_model.config))
  params = unet.params_from_torch(builders.torch_state_dict(torch_model), cfg)
  return torch_model, cfg, params


@pytest.fixture(scope="module")
def sd1():
  return make("sd1")


def jitted(cfg, capture=None, **kw):
  model = unet.UNet2DConditionModel(cfg, **kw)
  return jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c, capture=capture))


# ----------------------------------------------------------------------------- timestep embedding


@pytest.mark.parametrize("flip, shift, dim", [(True, 0, 32), (False, 1, 32), (True, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
  from diffusers.models.embeddings import get_timestep_embedding

  for t in (np.array([0, 1, 999]), np.array([0.5, 261.25, 998.9], np.float32)):
    ref = get_timestep_embedding(
      torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    ).numpy()
    out = unet.timestep_embedding(jnp.asarray(t), dim, flip, shift)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6 * max(1.0, np.abs(t).max()), rtol=0)


@pytest.mark.parametrize("n_in, n_out", [(2, 3), (3, 5), (4, 7), (8, 15), (3, 7), (4, 8)])
def test_forced_upsample_size_matches_torch_nearest(n_in, n_out):
  """`Upsample2D(output_hw)` picks the rows torch's `F.interpolate(size=..., mode="nearest")` picks."""
  from lusd_jax.models import layers

  x = np.arange(n_in * (n_in + 1), dtype=np.float32).reshape(1, 1, n_in, n_in + 1)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out, n_out + 2), mode="nearest").numpy()
  rows, cols = layers._nearest_indices(n_in, n_out), layers._nearest_indices(n_in + 1, n_out + 2)
  np.testing.assert_array_equal(x[:, :, rows][:, :, :, cols], ref)


# ----------------------------------------------------------------------------- tiny SD1 / SD2


def test_sd1_capture_keeps_eps_and_matches_reference(sd1):
  """Per-batch int timesteps. Capturing (8x8 self maps, the mid block's 2x2 cross maps, batch rows
  [1, 2)) leaves eps bit-identical; both match PyTorch, the maps match the recorded ones."""
  torch_model, cfg, params = sd1
  x, ctx = inputs(cfg, 2, 16, 16)
  t = np.array([10, 700])
  ref, records = torch_forward(torch_model, x, t, ctx)
  spec = unet.CaptureSpec(self_res=8, cross_res=2, batch=(1, 2))
  out, maps = jitted(cfg, spec)(params, x, t, ctx)
  out_plain, no_maps = jitted(cfg)(params, x, t, ctx)

  assert no_maps == unet.AttentionMaps(None, None)
  assert np.array_equal(np.asarray(out), np.asarray(out_plain))
  assert_parity(out_plain, ref)
  assert maps.self_attn.shape == (1, 64, 64) and maps.self_attn.dtype == jnp.float32
  assert maps.cross_attn.shape == (1, 4, 77) and maps.cross_attn.dtype == jnp.float32
  for kind, res, got in (("self", 8, maps.self_attn), ("cross", 2, maps.cross_attn)):
    want = reference_maps(records, kind, res, (16, 16), 4)[1:2]
    np.testing.assert_allclose(np.asarray(got), want, atol=MAPS_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-5)
  # Self maps at 8x8 average three layers: one in down_blocks.1, two in up_blocks.2.
  assert sum(k == "self" and tt == 64 for k, tt, _ in records) == 3


@pytest.mark.slow
@pytest.mark.parametrize("capture", [None, (8, 2, (1, 2)), (16, 16, None)])
def test_shared_sample_equals_the_repeated_sample(sd1, capture):
  """A [1, ...] sample under a batch of 2 prompts (LUSD's SBP call) is the sample repeated twice: the
  same eps (PyTorch parity on the repeated batch) and maps, also when the first layers are captured
  (16x16); and the layers before the first cross-attention really run once (batch 1)."""
  torch_model, cfg, params = sd1
  x, ctx = inputs(cfg, 2, 16, 16)
  x1 = x[:1]
  spec = None if capture is None else unet.CaptureSpec(*capture)
  shared, shared_maps = jitted(cfg, spec)(params, x1, 321, ctx)
  repeated, repeated_maps = jitted(cfg, spec)(params, np.repeat(x1, 2, axis=0), np.array([321, 321]), ctx)
  ref, _ = torch_forward(torch_model, np.repeat(x1, 2, axis=0), np.array([321, 321]), ctx)

  assert shared.shape == repeated.shape == (2, 16, 16, cfg.out_channels)
  assert_parity(shared, ref)
  np.testing.assert_allclose(np.asarray(shared), np.asarray(repeated), rtol=0, atol=1e-5 * np.abs(ref).max())
  for got, want in zip(shared_maps, repeated_maps, strict=True):
    assert (got is None) == (want is None)
    if got is not None:
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=MAPS_ATOL, rtol=0)

  model = unet.UNet2DConditionModel(cfg)
  jaxpr = jax.make_jaxpr(lambda x: model.apply({"params": params}, x, 321, ctx, capture=spec))(x1)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  batches = [e.invars[0].aval.shape[0] for e in convs]
  # conv_in, the first ResNet's two convs and the first transformer's proj_in (a 1x1 conv) see the one
  # shared row; everything after the first cross-attention sees both. A captured first transformer
  # takes both rows from its start.
  shared_convs = 3 if capture == (16, 16, None) else 4
  assert batches == [1] * shared_convs + [2] * (len(batches) - shared_convs), batches


def test_shared_sample_batch_must_be_one(sd1):
  _, cfg, params = sd1
  x, ctx = inputs(cfg, 3, 16, 16)
  with pytest.raises(ValueError, match="sample batch 3 and context batch 2"):
    jitted(cfg)(params, x, 1, ctx[:2])


@pytest.mark.slow
def test_vmap_and_grad_through_captured_maps(sd1):
  """`jax.vmap` over latents (int scalar timestep, all batch rows captured) matches the batched
  PyTorch forward; the gradient of a function of the maps w.r.t. the latent is finite, non-zero and
  agrees with a central finite difference."""
  torch_model, cfg, params = sd1
  x, ctx = inputs(cfg, 2, 16, 16, seed=2)
  ref, records = torch_forward(torch_model, x, 999, ctx)
  model = unet.UNet2DConditionModel(cfg)
  spec = unet.CaptureSpec(self_res=16, cross_res=4)
  rng = np.random.default_rng(4)
  w_self, w_cross = (jnp.asarray(rng.standard_normal(n).astype(np.float32)) for n in (256, 16))

  def one(x_HWC, ctx_LD):
    out, maps = model.apply({"params": params}, x_HWC[None], 999, ctx_LD[None], capture=spec)
    return out[0], maps.self_attn[0], maps.cross_attn[0]

  def loss(x_BHWC):
    out, self_BNN, cross_BNL = jax.vmap(one)(x_BHWC, ctx)
    # LUSD-like objective: a weighted cross map of one token plus a self map column.
    value = jnp.sum(cross_BNL[:, :, 5] * w_cross) + jnp.sum(self_BNN[:, :, 3] * w_self)
    return value, (out, self_BNN, cross_BNL)

  loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, (out, self_maps, cross_maps)), g = loss_and_grad(jnp.asarray(x))
  assert_parity(out, ref)
  np.testing.assert_allclose(
    np.asarray(self_maps), reference_maps(records, "self", 16, (16, 16), 4), atol=MAPS_ATOL
  )
  np.testing.assert_allclose(
    np.asarray(cross_maps), reference_maps(records, "cross", 4, (16, 16), 4), atol=MAPS_ATOL
  )

  g = np.asarray(g)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  v = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
  v /= np.linalg.norm(v)
  h = 1e-2
  f = lambda y: float(loss_and_grad(jnp.asarray(y))[0][0])
  fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
  directional = float(np.sum(g * v))
  assert abs(directional - fd) <= 2e-2 * abs(fd) + 1e-5, (directional, fd)


@pytest.mark.slow
def test_sd2_parity_nonsquare_odd_latent():
  """SD2 shape (linear projections, per-block heads, upcast) on a 12x10 latent: odd levels (3x3),
  forced upsample sizes, per-batch float timesteps, capture on a non-square latent."""
  torch_model, cfg, params = make("sd2")
  assert cfg.heads == (2, 4, 8, 8) and cfg.use_linear_projection and cfg.upcast_attention
  x, ctx = inputs(cfg, 2, 12, 10, seed=6)
  t = np.array([3.5, 250.0], np.float32)
  ref, records = torch_forward(torch_model, x, t, ctx)
  out, maps = jitted(cfg, unet.CaptureSpec(self_res=6, cross_res=3))(params, x, t, ctx)
  assert_parity(out, ref)
  assert maps.self_attn.shape == (2, 30, 30) and maps.cross_attn.shape == (2, 9, 77)
  for kind, res, got in (("self", 6, maps.self_attn), ("cross", 3, maps.cross_attn)):
    np.testing.assert_allclose(
      np.asarray(got), reference_maps(records, kind, res, (12, 10), 4), atol=MAPS_ATOL
    )


def test_capture_resolution_without_layers_raises(sd1):
  _, cfg, params = sd1
  x, ctx = inputs(cfg, 1, 16, 16)
  model = unet.UNet2DConditionModel(cfg)
  with pytest.raises(ValueError, match="cross_res=32"):
    jax.eval_shape(lambda: model.apply({"params": params}, x, 1, ctx, capture=unet.CaptureSpec(cross_res=32)))
  # bfloat16 activations: eps in bfloat16, maps still float32 (tracing only, nothing compiles).
  bf16 = unet.UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
  out, maps = jax.eval_shape(
    lambda: bf16.apply({"params": params}, x, 1, ctx, capture=unet.CaptureSpec(self_res=8, cross_res=4))
  )
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  assert maps.self_attn.dtype == maps.cross_attn.dtype == jnp.float32
  with pytest.raises(ValueError, match="batch"):
    jax.eval_shape(
      lambda: model.apply({"params": params}, x, 1, ctx, capture=unet.CaptureSpec(self_res=8, batch=(0, 2)))
    )


# ----------------------------------------------------------------------------- full SD1.5 architecture


@pytest.mark.slow
@pytest.mark.xdist_group("sd15-memory")  # ~10 GB each: never two at once on a 24 GB machine
def test_sd15_architecture_parity_and_maps(monkeypatch):
  """SD1.5's real U-Net (random weights) at a 32x32 latent: eps and the LUSD maps (16x16 self, 8x8 cross).

  Then the same with the captured layers through the Pallas maps kernel (interpreted here): "auto"
  as it chooses on a GPU or TPU, where the kernel is compiled (`REGISTRY["pallas"]` declared
  compiled on CPU for the test): the captured layers, and only they, take output and map from one
  kernel call; eps and maps equal the default path's and diffusers'.
  """
  import dataclasses
  import gc

  from lusd_jax import kernels
  from lusd_jax.models import attention

  torch_model = builders.tiny_unet("sd15")
  cfg = unet.UNetConfig.from_dict(dict(torch_model.config))
  assert cfg.heads == (8, 8, 8, 8) and cfg.layers == (2, 2, 2, 2)
  x, ctx = inputs(cfg, 1, 32, 32, seed=7)
  ref, records = torch_forward(torch_model, x, 981, ctx)
  state_dict = builders.torch_state_dict(torch_model)
  del torch_model
  gc.collect()
  params = unet.params_from_torch(state_dict, cfg)
  del state_dict
  gc.collect()

  spec = unet.CaptureSpec(self_res=16, cross_res=8)
  out, maps = jitted(cfg, spec)(params, x, 981, ctx)
  assert_parity(out, ref)
  want_maps = {"self": reference_maps(records, "self", 16, (32, 32), 4)}
  want_maps["cross"] = reference_maps(records, "cross", 8, (32, 32), 4)
  for kind, got in (("self", maps.self_attn), ("cross", maps.cross_attn)):
    np.testing.assert_allclose(np.asarray(got), want_maps[kind], atol=MAPS_ATOL)

  calls, kernel = [], kernels.attention_with_map

  def recording(q, k, v, **kw):  # traced once per layer that runs the kernel
    calls.append((kw.get("map_rows"), q.shape[1], k.shape[1]))
    return kernel(q, k, v, **kw)

  monkeypatch.setattr(attention.kernels, "attention_with_map", recording)
  pallas = dataclasses.replace(attention.REGISTRY["pallas"], compiled=None)
  monkeypatch.setitem(attention.REGISTRY, "pallas", pallas)
  out_p, maps_p = jitted(cfg, spec)(params, x, 981, ctx)
  captured = unet.map_layers(cfg, (32, 32), spec)
  want_calls = [((0, 1), 256, 256)] * len(captured.self_layers) + [((0, 1), 64, 77)] * len(
    captured.cross_layers
  )
  assert sorted(calls) == sorted(want_calls) and len(calls) == 10  # 5 self at 16x16, 5 cross at 8x8
  assert_parity(out_p, ref)
  assert np.abs(np.asarray(out_p) - np.asarray(out)).max() <= PARITY_RTOL * np.abs(np.asarray(out)).max()
  for kind, got, default in (
    ("self", maps_p.self_attn, maps.self_attn),
    ("cross", maps_p.cross_attn, maps.cross_attn),
  ):
    np.testing.assert_allclose(np.asarray(got), want_maps[kind], atol=MAPS_ATOL)
    np.testing.assert_allclose(np.asarray(got), np.asarray(default), atol=MAPS_ATOL)


# ----------------------------------------------------------------------------- config


SD21_CONFIG = {
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.10.0.dev0",
  "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": False,
  "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "dual_cross_attention": False,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_class_embeds": None,
  "only_cross_attention": False,
  "out_channels": 4,
  "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "upcast_attention": True,
  "use_linear_projection": True,
}


def test_config_from_json_sd21(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(SD21_CONFIG))
  cfg = unet.UNetConfig.from_json(path)
  hash(cfg)  # static: usable as a jit argument
  assert cfg.block_out_channels == (320, 640, 1280, 1280) and cfg.heads == (5, 10, 20, 20)
  assert cfg == unet.UNetConfig.from_dict(SD21_CONFIG)
  # diffusers names the per-block head count `attention_head_dim`; `num_attention_heads` wins when set.
  assert unet.UNetConfig.from_dict({**SD21_CONFIG, "num_attention_heads": 10}).heads == (10,) * 4


@pytest.mark.parametrize(
  "key, value",
  [
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 1000),
    ("addition_embed_type", "text_time"),
    ("time_cond_proj_dim", 256),
    ("encoder_hid_dim", 768),
    ("dual_cross_attention", True),
    ("only_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("conv_in_kernel", 7),
    ("attention_type", "gated"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("mid_block_type", None),
    (
      "down_block_types",
      ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    ),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    ("act_fn", "gelu"),
    ("cross_attention_dim", [768, 768, 768, 768]),
    ("transformer_layers_per_block", [[1, 2], 1, 1, 1]),
    ("some_future_key", 3),
  ],
)
def test_config_rejects_unsupported(key, value):
  with pytest.raises(ValueError, match=key):
    unet.UNetConfig.from_dict({**SD21_CONFIG, key: value})


def test_config_ignores_inference_only_keys():
  cfg = unet.UNetConfig.from_dict({**SD21_CONFIG, "dropout": 0.1, "addition_embed_type_num_heads": 64})
  assert cfg == unet.UNetConfig.from_dict(SD21_CONFIG)


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_conversion_table_is_a_bijection(style):
  torch_model = builders.tiny_unet(style)
  cfg = unet.UNetConfig.from_dict(dict(torch_model.config))
  state_dict = builders.torch_state_dict(torch_model)
  flax_shapes = weights.flax_shapes_of(unet.param_shapes(cfg))
  rows = weights.conversion_table({k: v.shape for k, v in state_dict.items()}, flax_shapes)
  assert sorted(r.torch_key for r in rows) == sorted(state_dict)
  assert sorted(r.flax_path for r in rows) == sorted(flax_shapes)
  # Every converted leaf holds the PyTorch numbers in the Flax layout.
  params = unet.params_from_torch(state_dict, cfg)
  key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  np.testing.assert_array_equal(
    params["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"],
    state_dict[key].T,
  )
  expected_proj = (32, 32) if style == "sd2" else (1, 1, 32, 32)
  assert params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == expected_proj


def test_conversion_errors_name_the_key(sd1):
  torch_model, cfg, _ = sd1
  state_dict = builders.torch_state_dict(torch_model)

  missing = dict(state_dict)
  del missing["up_blocks.1.attentions.1.proj_out.bias"]
  with pytest.raises(weights.WeightsError, match="up_blocks_1/attentions_1/proj_out/bias"):
    unet.params_from_torch(missing, cfg)

  key = "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"
  wrong = {**state_dict, key: np.zeros((3, 3), np.float32)}
  with pytest.raises(weights.WeightsError, match=key.replace(".", r"\.")):
    unet.params_from_torch(wrong, cfg, source="my.safetensors")

  extra = {**state_dict, "class_embedding.weight": np.zeros((10, 128), np.float32)}
  with pytest.raises(weights.WeightsError, match="class_embedding.weight"):
    unet.params_from_torch(extra, cfg)


def test_init_params_matches_param_shapes(sd1):
  """Shapes and dtype follow `param_shapes`; kernels are LeCun-normal, biases 0, scales 1."""
  _, cfg, _ = sd1
  params = unet.init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16)
  shapes = unet.param_shapes(cfg)
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes), strict=True):
    assert p.shape == s.shape and p.dtype == jnp.bfloat16
  ff = np.asarray(
    params["mid_block"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_2"]["kernel"], np.float32
  )
  # LeCun normal: std 1 / sqrt(fan_in), mean 0 (the U-Net's own, as `layers.random_params` draws it).
  assert (
    abs(ff.std() * math.sqrt(ff.shape[0]) - 1.0) < 0.05 and abs(ff.mean()) * math.sqrt(ff.size) < 5 * ff.std()
  )
  assert not np.asarray(params["conv_in"]["bias"], np.float32).any()
  np.testing.assert_array_equal(np.asarray(params["conv_norm_out"]["scale"], np.float32), 1.0)
  other = unet.init_params(cfg, jax.random.key(1))
  assert not np.allclose(
    np.asarray(other["conv_in"]["kernel"]), np.asarray(params["conv_in"]["kernel"], np.float32)
  )
