"""The attention registry: what each implementation declares, what "auto" picks per layer, and the
U-Net's captured layers through the Pallas map kernel (interpreted on CPU) against the reference path.

Selection tests pass the platform explicitly (`AttentionLayer.of(..., backend=...)`): they decide for
GPU and TPU on this CPU, nothing runs. The U-Net tests compare `attention_impl="pallas"` (output and
head-mean map in one `kernels.attention_with_map` call per captured layer) with the default path
(the fast output, the maps recomputed beside it); their reference programs are the ones
tests/test_unet.py and tests/test_unet_maps.py compile, so the persistent cache serves them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lusd_jax import kernels
from lusd_jax.models import attention, unet
from tests import builders
from tests.test_unet import MAPS_ATOL, PARITY_RTOL, inputs, jitted


def _layer(t, s, h, dtype="float32", backend="cpu", maps=None, grad=False):
  q = jax.ShapeDtypeStruct((2, t, 8, h), jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct((2, s, 8, h), jnp.dtype(dtype))
  return attention.AttentionLayer.of(q, k, maps=maps, grad=grad, backend=backend)


# (backend, dtype, T, S, H, maps) -> what "auto" picks. SD1.5 shapes: a 64x64 self layer (4096
# tokens, head dim 40), a 64x64 cross layer (S = 77), an 8x8 self layer (64 tokens, head dim 160).
AUTO_CASES = [
  # CPU: Pallas only interprets there, so captured layers keep the fast path (maps beside it).
  ("cpu", "float32", 4096, 4096, 40, None, "chunked"),
  ("cpu", "float32", 4096, 4096, 40, "mean", "chunked"),
  ("cpu", "bfloat16", 4096, 77, 40, "mean", "chunked"),
  ("cpu", "float32", 64, 64, 160, "mean", "xla"),  # short: XLA
  ("cpu", "float32", 64, 64, 160, "all", "xla"),
  # GPU: cuDNN for layers without maps where it applies, else XLA; the map kernel for head means.
  ("gpu", "bfloat16", 4096, 4096, 40, None, "cudnn"),
  ("gpu", "float16", 4096, 77, 40, None, "cudnn"),
  ("gpu", "float32", 4096, 4096, 40, None, "xla"),  # cuDNN takes fp16 / bf16 only
  ("gpu", "bfloat16", 64, 64, 160, None, "xla"),  # over cuDNN's 128 before Hopper
  ("gpu", "bfloat16", 4096, 4096, 40, "mean", "pallas"),
  ("gpu", "float32", 4096, 77, 40, "mean", "pallas"),
  ("gpu", "float16", 64, 64, 160, "mean", "pallas"),
  ("gpu", "bfloat16", 4096, 4096, 40, "all", "cudnn"),  # no kernel returns per-head maps
  ("gpu", "bfloat16", 64, 64, 320, "mean", "xla"),  # over the kernel's head-dim limit
  # TPU: as CPU without maps (chunked for long sequences), the Mosaic kernel for head means.
  ("tpu", "bfloat16", 4096, 4096, 40, None, "chunked"),
  ("tpu", "bfloat16", 64, 77, 40, None, "xla"),
  ("tpu", "bfloat16", 4096, 4096, 40, "mean", "pallas"),
  ("tpu", "float16", 4096, 4096, 40, "mean", "chunked"),  # Mosaic: no float16 matmuls
  ("tpu", "float32", 4096, 4096, 40, "all", "chunked"),
]


def test_auto_picks_per_platform_dtype_and_maps(monkeypatch):
  monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 128)  # an Ampere GPU
  got = [
    attention.select(_layer(t, s, h, dtype, backend, maps)).name
    for backend, dtype, t, s, h, maps, _ in AUTO_CASES
  ]
  assert got == [case[-1] for case in AUTO_CASES]
  # Another backend (Apple's METAL): the implementations that declare no platform list.
  assert attention.select(_layer(64, 64, 40, backend="METAL", maps="mean")).name == "xla"
  # Hopper: cuDNN takes head dim 160; per-layer capture (grad) changes nothing, all are differentiable.
  monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 256)
  assert attention.select(_layer(64, 64, 160, "bfloat16", "gpu", grad=True)).name == "cudnn"
  assert attention.select(_layer(64, 64, 160, "bfloat16", "cuda", "mean", grad=True)).name == "pallas"


def test_registry_declarations():
  assert attention.IMPLEMENTATIONS == ("xla", "cudnn", "chunked", "pallas", "reference", "auto")
  assert tuple(attention.REGISTRY) == attention.IMPLEMENTATIONS[:-1]
  assert [name for name, impl in attention.REGISTRY.items() if impl.maps] == ["pallas"]
  assert all(impl.differentiable for impl in attention.REGISTRY.values())
  pallas = attention.REGISTRY["pallas"]
  assert pallas.platforms == ("cpu", "gpu", "tpu") and pallas.compiled == ("gpu", "tpu")
  cudnn = attention.REGISTRY["cudnn"]
  assert cudnn.platforms == cudnn.compiled == ("gpu",)
  assert pallas.serves_maps(_layer(64, 64, 40, maps="mean"))
  assert not pallas.serves_maps(_layer(64, 64, 40, maps="all"))
  assert not attention.REGISTRY["xla"].serves_maps(_layer(64, 64, 40, maps="mean"))


@pytest.mark.parametrize(
  ("impl", "layer", "reason"),
  [
    ("cudnn", _layer(64, 64, 40, "bfloat16", "cpu"), "runs on gpu, not cpu"),
    ("cudnn", _layer(64, 64, 40, "float32", "gpu"), "takes float16/bfloat16 on gpu, not float32"),
    ("cudnn", _layer(64, 64, 36, "bfloat16", "gpu"), "head dim 36 is not a multiple of 8"),
    ("pallas", _layer(64, 64, 40, "float64", "cpu", maps="mean"), "not float64"),
    ("pallas", _layer(64, 64, 320, "float32", "gpu", maps="mean"), "over its limit of 256"),
    ("pallas", _layer(64, 64, 40, "float16", "tpu"), "float32/bfloat16 on tpu, not float16"),
  ],
)
def test_named_impl_that_cannot_compute_the_layer_raises(impl, layer, reason):
  with pytest.raises(ValueError, match=f"'{impl}' cannot compute this layer.*{reason}"):
    attention.select(layer, impl)


def test_named_impls_serve_layers_they_support():
  # A named implementation need not return maps: the caller computes them beside its output.
  assert attention.select(_layer(64, 64, 40, maps="all"), "pallas").name == "pallas"
  assert attention.select(_layer(64, 77, 40, maps="mean"), "xla").name == "xla"
  assert (
    attention.select(_layer(64, 64, 40, "float64", maps="all", grad=True), "reference").name == "reference"
  )
  assert attention.select(_layer(64, 64, 40), "pallas").name == "pallas"  # CPU: interpreted


def test_unknown_and_reserved_names_are_rejected():
  q = jnp.ones((1, 4, 1, 8))
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    attention.attend(q, q, q, map_rows=(0, 1), impl="flash")
  with pytest.raises(ValueError, match="already registered"):
    attention.register(attention.REGISTRY["xla"])
  with pytest.raises(ValueError, match='"auto" is not an implementation'):
    attention.register(attention.AttentionImpl("auto", attention.REGISTRY["xla"].fn))
  with pytest.raises(ValueError, match="maps"):
    _layer(4, 4, 8, maps="max")
  # The U-Net rejects them when traced (one line, before any compile).
  cfg = unet.UNetConfig.from_dict(builders.TINY_SD1_UNET)
  x, ctx = inputs(cfg, 1, 8, 8)
  params = unet.param_shapes(cfg)
  for impl, match in (("flash", "unknown attention implementation 'flash'"), ("cudnn", "runs on gpu")):
    model = unet.UNet2DConditionModel(cfg, attention_impl=impl)
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda p, model=model: model.apply({"params": p}, x, 1, ctx), params)


def test_auto_takes_the_first_compiled_differentiable_map_kernel(monkeypatch):
  # A forward-only map kernel compiled on CPU (registered after "pallas"): "auto" picks it for a
  # head-mean layer that is not differentiated, and skips it (for the fast path) when it is.
  fake = attention.AttentionImpl(
    "forward-only",
    attention.REGISTRY["reference"].fn,
    with_map=kernels.reference_attention_with_map,
    differentiable=False,
  )
  monkeypatch.setitem(attention.REGISTRY, fake.name, fake)
  assert attention.select(_layer(64, 64, 40, maps="mean")).name == "forward-only"
  assert attention.select(_layer(64, 64, 40, maps="mean", grad=True)).name == "xla"
  assert attention.select(_layer(64, 64, 40, maps="all")).name == "xla"
  assert attention.select(_layer(64, 64, 40, "bfloat16", "gpu", "mean")).name == "pallas"  # first
  with pytest.raises(ValueError, match="not differentiable"):
    attention.select(_layer(64, 64, 40, grad=True), "forward-only")


def test_attend_returns_the_map_only_from_a_map_kernel():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((3, n, 2, 8), np.float32)) for n in (24, 40, 40))
  want_out, want_map = kernels.reference_attention_with_map(q, k, v, map_rows=(1, 3))
  attend = jax.jit(attention.attend, static_argnames=("map_rows", "heads", "impl"))
  out, probs = attend(q, k, v, map_rows=(1, 3), impl="pallas")
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-6)
  np.testing.assert_allclose(np.asarray(probs), np.asarray(want_map), atol=1e-6)
  for impl, heads in (("pallas", "all"), ("auto", "mean")):
    out, probs = attend(q, k, v, map_rows=(1, 3), heads=heads, impl=impl)
    assert probs is None, (impl, heads)  # the caller computes these maps beside the output
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-6)


# ----------------------------------------------------------------------------- the U-Net


def _record_kernel_calls(monkeypatch) -> list:
  """Records (map_rows, T, S) of every `kernels.attention_with_map` call the models trace."""
  calls, kernel = [], attention.kernels.attention_with_map

  def recording(q, k, v, **kw):
    calls.append((kw.get("map_rows"), q.shape[1], k.shape[1]))
    return kernel(q, k, v, **kw)

  monkeypatch.setattr(attention.kernels, "attention_with_map", recording)
  return calls


def _assert_kernel_calls(calls, cfg, latent_hw, spec, rows):
  """One kernel call per attention layer; the captured ones (and only they) with the map rows."""
  every = unet.map_layers(cfg, latent_hw, unet.CaptureSpec.per_layer_maps())
  captured = unet.map_layers(cfg, latent_hw, spec)
  assert len(calls) == len(every.self_layers) + len(every.cross_layers)
  with_map = sorted((t, s) for r, t, s in calls if r is not None)
  assert {r for r, _, _ in calls} == {None, rows}
  want = [(i.hw[0] * i.hw[1],) * 2 for i in captured.self_layers]
  want += [(i.hw[0] * i.hw[1], 77) for i in captured.cross_layers]  # CLIP's 77 tokens
  assert with_map == sorted(want)


def _assert_close(out, maps, want_out, want_maps):
  want_out = np.asarray(want_out)
  err = np.abs(np.asarray(out) - want_out).max()
  assert err <= PARITY_RTOL * np.abs(want_out).max(), err
  for got, want in zip(maps, want_maps, strict=True):
    assert (got is None) == (want is None)
    if got is not None:
      assert got.dtype == jnp.float32
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=MAPS_ATOL, rtol=0)


@pytest.mark.slow  # ~10 s: the U-Net with interpreted kernels compiles (the reference is test_unet's)
def test_tiny_unet_pallas_capture_equals_reference_capture(monkeypatch):
  """LUSD's averaged capture (8x8 self, 2x2 cross, row 1 of 2) with every layer through the Pallas
  kernel: eps and maps equal the default path's (test_unet's program)."""
  cfg = unet.UNetConfig.from_dict(builders.TINY_SD1_UNET)
  params = unet.init_params(cfg, 3)
  x, ctx = inputs(cfg, 2, 16, 16, seed=5)
  t = np.array([10, 700])
  spec = unet.CaptureSpec(self_res=8, cross_res=2, batch=(1, 2))
  want_out, want_maps = jitted(cfg, spec)(params, x, t, ctx)
  calls = _record_kernel_calls(monkeypatch)
  out, maps = jitted(cfg, spec, attention_impl="pallas")(params, x, t, ctx)
  _assert_kernel_calls(calls, cfg, (16, 16), spec, (1, 2))
  assert maps.self_attn.shape == (1, 64, 64) and maps.cross_attn.shape == (1, 4, 77)
  _assert_close(out, maps, want_out, want_maps)


# SD1.5's architecture with the Pallas capture (the captured layers only, as "auto" picks on GPU /
# TPU): tests/test_unet.py::test_sd15_architecture_parity_and_maps, which already holds its params.
