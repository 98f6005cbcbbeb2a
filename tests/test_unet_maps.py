"""Per-layer attention maps (`CaptureSpec(per_layer=True)`) against diffusers' PyTorch U-Net.

The reference is a recording attention processor installed on every attention layer: diffusers'
`AttnProcessor` math that keeps each layer's softmax probabilities (`attn.get_attention_scores`)
per head, with the layer's module path, in the order the layers run. Gradients of a loss on the
maps are compared with torch autograd through that same processor, and with central finite
differences of a float64 copy of the tiny U-Net.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lusd_jax.models import attention, unet
from tests import builders
from tests.test_unet import MAPS_ATOL, assert_parity, inputs, make

# PyTorch references on one thread (tests/conftest.py: shared cores).
pytestmark = pytest.mark.usefixtures("torch_one_thread")

# max |jax grad - torch grad| <= GRAD_RTOL * max |torch grad|, both float32. Both sides round
# differently in every layer (conv and matmul orders, GroupNorm variance); the maps' gradients go
# through softmax Jacobians of the whole U-Net above the layer, so the float32 noise grows to ~1e-4.
GRAD_RTOL = 2e-3
# A single head's probabilities carry the float32 drift of the activations that the head mean
# averages down. Measured on SD1.5 at a 32x32 latent (random weights, t = 981): per-head maps differ
# from PyTorch's by at most 4.1e-5 (peaked heads, p ~ 0.99, at the 8x8 and 4x4 levels), their head
# means by at most 7.2e-6 (within `MAPS_ATOL`); the tiny model stays below 1e-6.
PER_HEAD_ATOL = 1e-4


class LayerRecorder:
  """diffusers `AttnProcessor` math for one layer; appends (name, probs [B, heads, T, S]) to `records`.

  The probabilities keep their autograd graph, so a loss on them backpropagates to the latent.
  """

  def __init__(self, name: str, records: list):
    self.name, self.records = name, records

  def __call__(
    self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
  ):
    probs, out = builders.attention_with_probs(attn, hidden_states, encoder_hidden_states)
    self.records.append((self.name, probs))
    return out


def record_layers(model) -> list:
  """Installs a `LayerRecorder` on every attention layer; returns the list they append to."""
  records = []
  model.set_attn_processor(
    {key: LayerRecorder(key.removesuffix(".processor"), records) for key in model.attn_processors}
  )
  return records


def torch_run(model, x_BHWC, t, ctx_BLD, grad: bool = False):
  """(eps NHWC, records, latent tensor) of one PyTorch forward; with `grad`, the graph is kept (the
  latent is the only leaf that requires a gradient: no parameter gradients are stored)."""
  model.requires_grad_(False)
  records = record_layers(model)
  x = torch.from_numpy(x_BHWC.transpose(0, 3, 1, 2).copy()).requires_grad_(grad)
  with torch.set_grad_enabled(grad):
    out = model(x, torch.as_tensor(t), torch.from_numpy(ctx_BLD)).sample
  return out.detach().numpy().transpose(0, 2, 3, 1), records, x


def expected(records, layers, heads: str, rows):
  """The recorded maps of `layers` (`unet.LayerInfo`s), in their order, as numpy."""
  by_name = dict(records)
  assert len(by_name) == len(records)  # every layer runs once
  maps = []
  for info in layers:
    probs = by_name[info.name][rows[0] : rows[1]].detach()
    maps.append((probs.mean(1) if heads == "mean" else probs).numpy())
  return maps


def assert_layers_match(got, layers, records, heads, rows):
  want = expected(records, layers, heads, rows)
  assert len(got) == len(want) == len(layers)
  for g, w, info in zip(got, want, layers, strict=True):
    assert g.shape == w.shape and g.dtype == jnp.float32, (info.name, g.shape, w.shape)
    assert w.shape[-2] == info.hw[0] * info.hw[1]
    atol = PER_HEAD_ATOL if heads == "all" else MAPS_ATOL
    np.testing.assert_allclose(np.asarray(g), w, atol=atol, rtol=0, err_msg=info.name)
    np.testing.assert_allclose(np.asarray(g).sum(-1), 1.0, atol=1e-5, err_msg=info.name)


def forward(cfg, capture, **kw):
  model = unet.UNet2DConditionModel(cfg, **kw)
  return jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c, capture=capture))


@pytest.fixture(scope="module")
def sd1():
  return make("sd1")


# ----------------------------------------------------------------------------- spec


def test_capture_spec_modes_are_static_and_checked():
  spec = unet.CaptureSpec.per_layer_maps(self_res=[8, 32, 8], cross_res=16, batch=[1, 2])
  assert spec == unet.CaptureSpec(self_res=(32, 8), cross_res=(16,), batch=(1, 2), per_layer=True)
  assert hash(spec) == hash(unet.CaptureSpec.per_layer_maps(self_res=(8, 32), cross_res=(16,), batch=(1, 2)))
  assert spec.selects("self", 32) and not spec.selects("self", 16) and spec.selects("cross", 16)
  every = unet.CaptureSpec.per_layer_maps()
  assert every.selects("self", 3) and every.selects("cross", 64)
  assert unet.CaptureSpec(self_res=32).selects("self", 32)  # the averaged mode: one resolution
  with pytest.raises(ValueError, match="heads"):
    unet.CaptureSpec(self_res=32, heads="all")  # averaged maps are head means
  with pytest.raises(ValueError, match="heads"):
    unet.CaptureSpec.per_layer_maps(heads="max")
  with pytest.raises(ValueError, match="self_res"):
    unet.CaptureSpec(self_res=(32, 16))
  with pytest.raises(ValueError, match="cross_res"):
    unet.CaptureSpec.per_layer_maps(cross_res="some")
  with pytest.raises(ValueError, match="selects no layer"):
    unet.CaptureSpec(per_layer=True)


def test_map_layers_follow_diffusers_module_order():
  """SD1.5 at a 64x64 latent: the attention layers diffusers runs, in its order, by level."""
  cfg = unet.UNetConfig()  # diffusers' defaults are SD1.5's U-Net
  layers = unet.map_layers(cfg, (64, 64), unet.CaptureSpec.per_layer_maps())
  assert len(layers.self_layers) == len(layers.cross_layers) == 16  # 6 down, 1 mid, 9 up
  assert [i.name.removesuffix(".attn1") for i in layers.self_layers] == [
    i.name.removesuffix(".attn2") for i in layers.cross_layers
  ]
  assert [i.hw[0] for i in layers.self_layers] == [
    64,
    64,
    32,
    32,
    16,
    16,
    8,
    16,
    16,
    16,
    32,
    32,
    32,
    64,
    64,
    64,
  ]
  assert layers.self_layers[6] == unet.LayerInfo(
    "mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block", (8, 8), 8
  )
  assert layers.cross_layers[-1].name == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
  # A non-square latent with odd sides: levels round up as the stride-2 convs do.
  narrow = unet.map_layers(cfg, (12, 10), unet.CaptureSpec.per_layer_maps(self_res=None, cross_res=(3, 2)))
  assert narrow.self_layers == ()
  assert [(i.block, i.hw) for i in narrow.cross_layers] == [
    ("down_blocks.2", (3, 3)),
    ("down_blocks.2", (3, 3)),
    ("mid_block", (2, 2)),
    ("up_blocks.1", (3, 3)),
    ("up_blocks.1", (3, 3)),
    ("up_blocks.1", (3, 3)),
  ]


def test_head_mean_keeps_one_head_live():
  """The head mean of a 64x64 level (4096 tokens, SD1.5's 8 heads of 40) and its gradient hold
  about two heads' [T, S] maps, not eight (compiled memory, nothing runs)."""
  t, n, h = 4096, 8, 40
  q = jax.ShapeDtypeStruct((2, t, n, h), jnp.float32)
  one_head = t * t * 4

  def temp_bytes(heads):
    loss = lambda q, k: jnp.sum(unet._layer_probs(q, k, (1, 2), heads) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  mean, every = temp_bytes("mean"), temp_bytes("all")
  assert mean <= 3 * one_head, mean / one_head
  assert every >= n * one_head  # the per-head maps do exist when asked for


# ----------------------------------------------------------------------------- tiny SD1


@pytest.mark.parametrize(
  "spec",
  [
    unet.CaptureSpec.per_layer_maps(heads="all", batch=(1, 2)),
    unet.CaptureSpec.per_layer_maps(self_res=(16, 4), cross_res=(8, 2)),
  ],
  ids=["all-layers-per-head", "some-layers-head-mean"],
)
def test_tiny_per_layer_maps_match_recording_processor(sd1, spec):
  """Every selected layer's map equals the recorded one, layer by layer, in U-Net order; the names
  `map_layers` gives are the modules diffusers ran, in the order it ran them; eps is unchanged."""
  torch_model, cfg, params = sd1
  x, ctx = inputs(cfg, 2, 16, 16, seed=11)
  t = np.array([10, 700])
  ref, records, _ = torch_run(torch_model, x, t, ctx)
  out, maps = forward(cfg, spec)(params, x, t, ctx)
  plain, _ = forward(cfg, None)(params, x, t, ctx)

  assert np.array_equal(np.asarray(out), np.asarray(plain))
  assert_parity(out, ref)
  assert maps.self_attn is None and maps.cross_attn is None
  layers = unet.map_layers(cfg, (16, 16), spec)
  run_order = [name for name, _ in records]
  for kind, got, infos in (
    ("1", maps.self_layers, layers.self_layers),
    ("2", maps.cross_layers, layers.cross_layers),
  ):
    names = [i.name for i in infos]
    assert names == [n for n in run_order if n in names]  # U-Net order
    if spec.self_res == "all":  # every attn{kind} layer diffusers has, none missing
      assert names == [n for n in run_order if n.endswith(f"attn{kind}")]
    assert_layers_match(got, infos, records, spec.heads, spec.batch or (0, 2))
  if spec.heads == "all":
    assert maps.self_layers[0].shape == (1, cfg.heads[0], 256, 256)
  else:
    assert [i.hw[0] for i in layers.self_layers] == [16, 4, 4, 4, 16, 16]
    assert [i.hw[0] for i in layers.cross_layers] == [8, 2, 8, 8]


def test_shared_sample_per_layer_maps_equal_the_repeated_sample(sd1):
  """A [1, ...] sample under 2 prompts (LUSD's SBP call) with the first level captured per layer and
  per head: the maps equal those of the sample repeated twice."""
  _, cfg, params = sd1
  x, ctx = inputs(cfg, 2, 16, 16, seed=19)
  spec = unet.CaptureSpec.per_layer_maps(self_res=16, cross_res=16, heads="all", batch=(1, 2))
  _, shared = forward(cfg, spec)(params, x[:1], 321, ctx)
  _, repeated = forward(cfg, spec)(params, np.repeat(x[:1], 2, axis=0), np.array([321, 321]), ctx)
  assert len(shared.self_layers) == len(shared.cross_layers) == 3  # down_blocks.0, up_blocks.3 x 2
  for got, want in zip(
    shared.self_layers + shared.cross_layers, repeated.self_layers + repeated.cross_layers, strict=True
  ):
    assert got.shape == want.shape == (1, cfg.heads[0], 256, want.shape[-1])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=MAPS_ATOL, rtol=0)


def test_per_layer_resolution_without_layers_raises(sd1):
  _, cfg, params = sd1
  x, ctx = inputs(cfg, 1, 16, 16)
  model = unet.UNet2DConditionModel(cfg)
  spec = unet.CaptureSpec.per_layer_maps(self_res=(16, 5))
  with pytest.raises(ValueError, match="self_res=.*height 5"):
    jax.eval_shape(lambda: model.apply({"params": params}, x, 1, ctx, capture=spec))
  with pytest.raises(ValueError, match="batch"):
    jax.eval_shape(
      lambda: model.apply(
        {"params": params}, x, 1, ctx, capture=unet.CaptureSpec.per_layer_maps(batch=(1, 3))
      )
    )
  # bfloat16 activations keep float32 maps.
  bf16 = unet.UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
  _, maps = jax.eval_shape(
    lambda: bf16.apply({"params": params}, x, 1, ctx, capture=unet.CaptureSpec.per_layer_maps(heads="all"))
  )
  assert {m.dtype for m in maps.self_layers + maps.cross_layers} == {jnp.dtype(jnp.float32)}


# Two layers at different levels and kinds; a loss of weighted squares (random weights, so no
# symmetry of the maps hides a wrong gradient). Indices are into the spec's self / cross layers.
GRAD_SPEC = unet.CaptureSpec.per_layer_maps(self_res=8, cross_res=(16, 4), batch=(1, 2))


def map_loss(self_maps, cross_maps, w_self, w_cross, xp=jnp):
  """0.7 * sum(w_s * S**2) + 1.3 * sum(w_c * C**2) over the second self and the last cross layer."""
  return 0.7 * xp.sum(w_self * self_maps[1] ** 2) + 1.3 * xp.sum(w_cross * cross_maps[-1] ** 2)


def loss_weights(layers, seed, heads_dim=()):
  rng = np.random.default_rng(seed)
  s, c = layers.self_layers[1], layers.cross_layers[-1]
  shape_s = (1, *heads_dim, s.hw[0] * s.hw[1], s.hw[0] * s.hw[1])
  shape_c = (1, *heads_dim, c.hw[0] * c.hw[1], 77)
  return rng.uniform(0.5, 1.5, shape_s).astype(np.float32), rng.uniform(0.5, 1.5, shape_c).astype(np.float32)


def jax_value_and_grad(cfg, params, spec, ctx, t, w_self, w_cross, **kw):
  """x -> ((loss, maps), d loss / dx), jitted; params are an argument, not constants baked into the
  program (SD1.5's would be copied into it)."""
  model = unet.UNet2DConditionModel(cfg, **kw)

  def loss(x, p):
    _, maps = model.apply({"params": p}, x, t, ctx, capture=spec)
    return map_loss(maps.self_layers, maps.cross_layers, w_self, w_cross), maps

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return lambda x: value_and_grad(x, params)


def torch_value_and_grad(torch_model, x, t, ctx, layers, heads, rows, w_self, w_cross):
  _, records, x_t = torch_run(torch_model, x, t, ctx, grad=True)
  by_name = dict(records)
  pick = lambda info: by_name[info.name][rows[0] : rows[1]]
  reduce = (lambda p: p.mean(1)) if heads == "mean" else (lambda p: p)
  self_maps = [reduce(pick(i)) for i in layers.self_layers]
  cross_maps = [reduce(pick(i)) for i in layers.cross_layers]
  loss = map_loss(self_maps, cross_maps, torch.from_numpy(w_self), torch.from_numpy(w_cross), xp=torch)
  loss.backward()
  records = [(name, p.detach()) for name, p in records]  # drop the graph
  return float(loss.detach()), x_t.grad.numpy().transpose(0, 2, 3, 1), records


@pytest.mark.slow
@pytest.mark.parametrize("heads", ["mean", "all"])
def test_tiny_grad_through_layer_maps_matches_torch_autograd(sd1, heads):
  torch_model, cfg, params = sd1
  spec = dataclasses.replace(GRAD_SPEC, heads=heads)
  layers = unet.map_layers(cfg, (16, 16), spec)
  assert [i.block for i in layers.self_layers] == ["down_blocks.1", "up_blocks.2", "up_blocks.2"]
  assert [i.block for i in layers.cross_layers] == [
    "down_blocks.0",
    "down_blocks.2",
    "up_blocks.1",
    "up_blocks.1",
  ] + ["up_blocks.3"] * 2
  x, ctx = inputs(cfg, 2, 16, 16, seed=12)
  t = np.array([999, 400])
  w_self, w_cross = loss_weights(layers, 13, () if heads == "mean" else (cfg.heads[1],))
  if heads == "all":
    assert cfg.heads[1] == cfg.heads[0]  # the two layers (8x8 and 16x16 levels) have as many heads

  (value, maps), g = jax_value_and_grad(cfg, params, spec, ctx, t, w_self, w_cross)(jnp.asarray(x))
  ref_value, ref_g, records = torch_value_and_grad(
    torch_model, x, t, ctx, layers, heads, (1, 2), w_self, w_cross
  )

  assert_layers_match(maps.self_layers, layers.self_layers, records, heads, (1, 2))
  assert_layers_match(maps.cross_layers, layers.cross_layers, records, heads, (1, 2))
  np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
  g = np.asarray(g)
  assert np.abs(ref_g[1]).max() > 0 and not np.asarray(g[0]).any()  # row 0's maps are not captured
  err = np.abs(g - ref_g).max()
  assert err <= GRAD_RTOL * np.abs(ref_g).max(), (err, np.abs(ref_g).max())


@pytest.mark.slow
def test_tiny_pallas_layer_maps_and_grad_equal_the_default_path(sd1, monkeypatch):
  """UnifyEdit's per-layer head-mean maps through the Pallas kernel (`attention_impl="pallas"`,
  interpreted on CPU: output and map in one call per captured layer, its custom backward): the maps,
  the map loss and its gradient w.r.t. the latent equal the default path's (the maps beside the fast
  output; the program of the torch-autograd test above, served by the compilation cache)."""
  _, cfg, params = sd1
  layers = unet.map_layers(cfg, (16, 16), GRAD_SPEC)
  x, ctx = inputs(cfg, 2, 16, 16, seed=12)
  t = np.array([999, 400])
  w_self, w_cross = loss_weights(layers, 13)
  (want_value, want_maps), want_g = jax_value_and_grad(cfg, params, GRAD_SPEC, ctx, t, w_self, w_cross)(
    jnp.asarray(x)
  )
  map_rows, kernel = [], attention.kernels.attention_with_map

  def record(q, k, v, **kw):  # traced once per layer
    map_rows.append(kw.get("map_rows"))
    return kernel(q, k, v, **kw)

  monkeypatch.setattr(attention.kernels, "attention_with_map", record)
  (value, maps), g = jax_value_and_grad(
    cfg, params, GRAD_SPEC, ctx, t, w_self, w_cross, attention_impl="pallas"
  )(jnp.asarray(x))
  # Every captured layer's map came from the kernel (rows [1, 2)); the other layers ran it without.
  assert map_rows.count((1, 2)) == len(layers.self_layers) + len(layers.cross_layers) == 9
  assert set(map_rows) == {None, (1, 2)}
  pairs = zip(
    maps.self_layers + maps.cross_layers, want_maps.self_layers + want_maps.cross_layers, strict=True
  )
  for got, want in pairs:
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=MAPS_ATOL, rtol=0)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  g, want_g = np.asarray(g), np.asarray(want_g)
  assert np.abs(want_g[1]).max() > 0 and not g[0].any()  # row 0's maps are not captured
  err = np.abs(g - want_g).max()
  assert err <= 1e-4 * np.abs(want_g).max(), (err, np.abs(want_g).max())


@pytest.mark.slow
def test_tiny_grad_through_layer_maps_matches_finite_differences(sd1):
  """float64 U-Net (params, activations, attention, maps): `jax.grad` of the map loss against central
  finite differences along three random directions, to 1e-6 relative. With h = 1e-3 the O(h^2)
  truncation and the rounding (|loss| * 1e-16 / h) each leave ~1e-8 relative; float32 would leave
  ~1e-2 (the existing averaged-map test's tolerance), so this pins the gradient 10^4 times tighter."""
  _, cfg, params = sd1
  spec = GRAD_SPEC
  layers = unet.map_layers(cfg, (16, 16), spec)
  x, ctx = inputs(cfg, 2, 16, 16, seed=14)
  w_self, w_cross = loss_weights(layers, 15)
  with jax.enable_x64(True):
    to64 = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, jnp.float64))
    params64, x64, ctx64, w_self64, w_cross64 = to64((params, x, ctx, w_self, w_cross))
    # "reference" attention: the other kernels keep their softmax in float32 by design.
    value_and_grad = jax_value_and_grad(
      cfg, params64, spec, ctx64, 500, w_self64, w_cross64, dtype=jnp.float64, attention_impl="reference"
    )
    (value, maps), g = value_and_grad(x64)
    assert g.dtype == jnp.float64 and maps.self_layers[1].dtype == jnp.float64
    f = lambda y: float(value_and_grad(y)[0][0])
    rng = np.random.default_rng(16)
    h = 1e-3
    for _ in range(3):
      v = rng.standard_normal(x.shape)
      v /= np.linalg.norm(v)
      fd = (f(x64 + h * v) - f(x64 - h * v)) / (2 * h)
      directional = float(jnp.sum(g * v))
      assert abs(directional - fd) <= 1e-6 * abs(fd), (directional, fd)
    assert abs(float(value)) > 0


# ----------------------------------------------------------------------------- full SD1.5 architecture


@pytest.mark.slow
@pytest.mark.xdist_group("sd15-memory")  # ~10 GB each: never two at once on a 24 GB machine
def test_sd15_architecture_per_layer_maps_and_grad():
  """SD1.5's real U-Net (random weights) at a 32x32 latent: every layer's per-head maps equal the
  recorded ones; the head-mean maps of a loss over two layers and its gradient equal torch autograd."""
  import gc

  # One batch row (slices are tested on the tiny model) and one copy of the weights at a time.

  torch_model = builders.tiny_unet("sd15")
  cfg = unet.UNetConfig.from_dict(dict(torch_model.config))
  x, ctx = inputs(cfg, 1, 32, 32, seed=17)
  t = np.array([981])
  spec_all = unet.CaptureSpec.per_layer_maps(heads="all")
  layers_all = unet.map_layers(cfg, (32, 32), spec_all)
  grad_spec = unet.CaptureSpec.per_layer_maps(self_res=(32, 8), cross_res=16)
  layers = unet.map_layers(cfg, (32, 32), grad_spec)
  w_self, w_cross = loss_weights(layers, 18)
  ref, records, _ = torch_run(torch_model, x, t, ctx)
  ref_value, ref_g, grad_records = torch_value_and_grad(
    torch_model, x, t, ctx, layers, "mean", (0, 1), w_self, w_cross
  )
  ref_all = {n: p.numpy() for n, p in records}
  state_dict = builders.torch_state_dict(torch_model)
  del torch_model, records
  gc.collect()
  params = unet.params_from_torch(state_dict, cfg)
  del state_dict
  params = jax.tree.map(jnp.asarray, params)  # one copy of the weights, on the device
  gc.collect()

  out, maps = forward(cfg, spec_all)(params, x, t, ctx)
  assert_parity(out, ref)
  assert len(maps.self_layers) == len(maps.cross_layers) == 16
  for got, infos in (
    (maps.self_layers, layers_all.self_layers),
    (maps.cross_layers, layers_all.cross_layers),
  ):
    for g, info in zip(got, infos, strict=True):
      assert g.shape == ref_all[info.name].shape == (1, 8, info.hw[0] * info.hw[1], g.shape[-1])
      np.testing.assert_allclose(
        np.asarray(g), ref_all[info.name], atol=PER_HEAD_ATOL, rtol=0, err_msg=info.name
      )
      # The head mean of the same maps meets the head-mean tolerance.
      np.testing.assert_allclose(
        np.asarray(g).mean(1), ref_all[info.name].mean(1), atol=MAPS_ATOL, rtol=0, err_msg=info.name
      )
  del maps, ref_all
  gc.collect()

  (value, maps), g = jax_value_and_grad(cfg, params, grad_spec, ctx, t, w_self, w_cross)(jnp.asarray(x))
  assert [i.hw[0] for i in layers.self_layers] == [32, 32, 8, 8, 8, 8, 8, 32, 32, 32]
  assert_layers_match(maps.self_layers, layers.self_layers, grad_records, "mean", (0, 1))
  assert_layers_match(maps.cross_layers, layers.cross_layers, grad_records, "mean", (0, 1))
  np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
  err = np.abs(np.asarray(g) - ref_g).max()
  assert err <= GRAD_RTOL * np.abs(ref_g).max(), (err, np.abs(ref_g).max())
