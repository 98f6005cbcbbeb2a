"""Every `dot_product_attention` implementation against the explicit-softmax ground truth."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lusd_jax.models import attention

# Implementations that run on any backend ("cudnn" needs an NVIDIA GPU).
PORTABLE = ("xla", "reference", "chunked", "auto")


def _qkv(b, t, s, n, h, dtype=jnp.float32, seed=0):
  # numpy draws: no random program to compile per shape.
  rng = np.random.default_rng(seed)
  draw = lambda length: jnp.asarray(rng.standard_normal((b, length, n, h), np.float32), dtype)
  return draw(t), draw(s), draw(s)


def _expected(q, k, v, causal=False):
  return np.asarray(attention.attention_with_probs(q, k, v, causal=causal)[0])


@pytest.mark.parametrize("impl", PORTABLE)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("t", "s"), [(16, 16), (37, 37), (64, 77)])
def test_every_impl_equals_explicit_softmax(impl, causal, t, s):
  q, k, v = _qkv(2, t, s, 3, 8)
  fn = jax.jit(functools.partial(attention.dot_product_attention, causal=causal, impl=impl))
  np.testing.assert_allclose(np.asarray(fn(q, k, v)), _expected(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
  ("t", "s", "q_chunk", "kv_chunk"),
  [
    (37, 37, 8, 16),  # neither length divides its block: padded queries and keys
    (50, 77, 16, 32),  # cross-attention shape, S = 77 as CLIP's context
    (33, 5, 4, 2),  # more key blocks than keys per block
    (7, 300, 3, 64),  # one query block per few rows, many key blocks
    (64, 64, 64, 64),  # one block each way: no loop
    (10, 20, 1, 1),  # one query and one key per block
  ],
)
def test_chunked_equals_explicit_softmax_for_any_blocking(causal, t, s, q_chunk, kv_chunk):
  q, k, v = _qkv(2, t, s, 2, 16, seed=t + s)
  fn = jax.jit(
    functools.partial(attention.chunked_attention, causal=causal, q_chunk=q_chunk, kv_chunk=kv_chunk)
  )
  out = np.asarray(fn(q, k, v))
  assert out.shape == (2, t, 2, 16)
  np.testing.assert_allclose(out, _expected(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
  ("max_block_scores", "heads_per_block"),
  [
    (1, 1),  # below one head's tile: still one head per block
    (3 * 16 * 8, 3),  # exactly three heads' tiles
    (5 * 16 * 8, 3),  # five would fit, but blocks take a divisor of the 6 heads
    (10**9, 6),  # every head in one block
  ],
)
def test_chunked_head_groups_equal_explicit_softmax(causal, max_block_scores, heads_per_block):
  # B * N = 6 heads, tiles of 16 queries x 8 keys; padded queries and keys in every grouping.
  assert attention.heads_per_block(6, 16 * 8, max_block_scores) == heads_per_block
  q, k, v = _qkv(2, 37, 21, 3, 8, seed=11)
  fn = jax.jit(
    functools.partial(
      attention.chunked_attention, causal=causal, q_chunk=16, kv_chunk=8, max_block_scores=max_block_scores
    )
  )
  np.testing.assert_allclose(np.asarray(fn(q, k, v)), _expected(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_chunked_is_stable_for_large_logits():
  # Scores of several hundred overflow exp() without the running max.
  q, k, v = _qkv(1, 40, 40, 2, 8)
  q = q * 60.0
  fn = jax.jit(functools.partial(attention.chunked_attention, q_chunk=16, kv_chunk=8))
  out = np.asarray(fn(q, k, v))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, _expected(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_through_chunked_equal_explicit_softmax(causal):
  q, k, v = _qkv(2, 21, 21, 2, 8, seed=3)
  w = jnp.asarray(np.random.default_rng(9).standard_normal((2, 21, 2, 8), np.float32))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  chunked = functools.partial(attention.chunked_attention, causal=causal, q_chunk=8, kv_chunk=5)
  explicit = lambda q, k, v: attention.attention_with_probs(q, k, v, causal=causal)[0]
  got = jax.jit(jax.grad(functools.partial(loss, chunked), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(functools.partial(loss, explicit), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(got, want, strict=True):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5, rtol=1e-5)


def test_chunked_low_precision_matches_float32_softmax():
  # bf16 inputs, float32 scores and softmax: close to the float32 reference on the same bf16 values.
  q, k, v = _qkv(2, 70, 70, 2, 40, dtype=jnp.bfloat16)
  out = jax.jit(functools.partial(attention.chunked_attention, q_chunk=32, kv_chunk=32))(q, k, v)
  assert out.dtype == jnp.bfloat16
  want = _expected(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


def test_chunked_keeps_the_scores_out_of_memory():
  # The compiled program never holds a [B, N, T, S] array: its largest temporaries are blocks of at
  # most `max_block_scores` scores, whatever T is.
  b, n, h = 1, 2, 8

  def temp_bytes(t, **blocking):
    spec = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    compiled = jax.jit(functools.partial(attention.chunked_attention, **blocking)).lower(spec, spec, spec)
    stats = compiled.compile().memory_analysis()
    if stats is None:
      pytest.skip("this backend reports no memory analysis")
    return stats.temp_size_in_bytes

  full_bytes = lambda t: b * n * t * t * 4
  assert temp_bytes(4096) < full_bytes(4096) / 4  # default blocks: 4096 x 512 scores of one head
  small = {"q_chunk": 256, "kv_chunk": 256, "max_block_scores": 256 * 256}
  assert temp_bytes(2048, **small) < full_bytes(2048) / 16
  spec = jax.ShapeDtypeStruct((b, 2048, n, h), jnp.float32)
  xla = jax.jit(functools.partial(attention.dot_product_attention, impl="xla")).lower(spec, spec, spec)
  assert xla.compile().memory_analysis().temp_size_in_bytes >= full_bytes(2048)


def test_auto_resolves_by_backend_and_shape(monkeypatch):
  # resolve_impl reads shapes and dtypes only.
  spec = lambda t, dtype=jnp.float32, h=8: jax.ShapeDtypeStruct((1, t, 2, h), dtype)
  small = spec(64), spec(77)
  long = spec(1024), spec(1024)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert attention.resolve_impl(small[0], small[1]) == "xla"
  assert attention.resolve_impl(long[0], long[1]) == "chunked"
  assert attention.resolve_impl(long[0], long[1], "xla") == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 128)
  # float32, or a head dim that is not a multiple of 8, or too large, keeps XLA.
  assert attention.resolve_impl(long[0], long[1]) == "xla"
  half = lambda h: spec(64, jnp.bfloat16, h)
  assert attention.resolve_impl(half(40), half(40)) == "cudnn"
  assert attention.resolve_impl(half(36), half(36)) == "xla"
  assert attention.resolve_impl(half(160), half(160)) == "xla"
  monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 256)
  assert attention.resolve_impl(half(160), half(160)) == "cudnn"


def test_unknown_impl_is_rejected():
  q, k, v = _qkv(1, 4, 4, 1, 8)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    attention.dot_product_attention(q, k, v, impl="flash")


@pytest.mark.slow
def test_unet_output_and_maps_do_not_depend_on_the_implementation():
  from lusd_jax.models import unet
  from lusd_jax.tiny import TINY_SD1_UNET

  config = unet.UNetConfig.from_dict(TINY_SD1_UNET)
  params = unet.init_params(config, jax.random.key(0))
  ks = jax.random.split(jax.random.key(1), 2)
  sample_BHWC = jax.random.normal(ks[0], (2, 16, 16, 4))
  context_BLD = jax.random.normal(ks[1], (2, 77, config.cross_attention_dim))
  spec = unet.CaptureSpec(self_res=8, cross_res=4, batch=(1, 2))

  def run(impl):
    model = unet.UNet2DConditionModel(config, attention_impl=impl)
    fn = jax.jit(lambda p, x, c: model.apply({"params": p}, x, jnp.array([10, 500]), c, capture=spec))
    return jax.tree.map(np.asarray, fn(params, sample_BHWC, context_BLD))

  (want, want_maps), (got, got_maps) = run("xla"), run("chunked")
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got_maps.self_attn, want_maps.self_attn, atol=1e-6)
  np.testing.assert_allclose(got_maps.cross_attn, want_maps.cross_attn, atol=1e-6)
