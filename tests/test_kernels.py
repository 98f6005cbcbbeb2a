"""The Pallas attention-with-map kernel against its plain-jnp reference, in interpret mode on CPU.

Shapes are tiny (interpret mode runs every grid step as a step of an XLA loop) but cover what the
kernel must get right: several head counts and head dims, lengths that are not multiples of the
blocks (padded queries, masked keys), cross-attention (S != T), causal masks, map rows at the start,
middle and end of the batch, and gradients through the output, the map, or both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lusd_jax.kernels import attention_with_map, block_sizes, reference_attention_with_map


def _qkv(b, t, s, n, h, seed=0):
  # numpy draws: no random program to compile per shape. q scaled up so the softmax is peaked, not
  # near-uniform (a uniform map would hide a wrong normalization).
  rng = np.random.default_rng(seed)
  draw = lambda length, scale: jnp.asarray(scale * rng.standard_normal((b, length, n, h), np.float32))
  return draw(t, 2.0), draw(s, 1.0), draw(s, 1.0)


# (B, T, S, N, H, block_q, block_k, map_rows, causal)
FORWARD_CASES = [
  (2, 16, 16, 1, 8, 8, 8, (0, 2), False),  # exact multiples, one head, several blocks per axis
  (2, 40, 77, 4, 16, 16, 16, (1, 2), False),  # cross-attention shape, both lengths padded, last row
  (3, 40, 40, 4, 8, 16, 8, (1, 2), True),  # causal, padded queries, a middle row
  (2, 16, 40, 4, 8, 8, 16, None, False),  # no map: plain flash attention
]


@pytest.mark.parametrize(("b", "t", "s", "n", "h", "bq", "bk", "rows", "causal"), FORWARD_CASES)
def test_forward_equals_reference(b, t, s, n, h, bq, bk, rows, causal):
  q, k, v = _qkv(b, t, s, n, h)
  fn = jax.jit(functools.partial(attention_with_map, map_rows=rows, causal=causal, block_q=bq, block_k=bk))
  out, probs = fn(q, k, v)
  want_out, want_map = reference_attention_with_map(q, k, v, map_rows=rows, causal=causal)
  assert out.shape == (b, t, n, h) and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-6, rtol=1e-5)
  if rows is None:
    assert probs is None
    return
  assert probs.shape == (rows[1] - rows[0], t, s) and probs.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(probs), np.asarray(want_map), atol=1e-6, rtol=1e-5)
  # A probability map: rows sum to 1 over the real keys (padded keys got no weight).
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)


# (B, T, S, N, H, block_q, block_k, map_rows, causal, out_weight, map_weight)
GRADIENT_CASES = [
  (2, 40, 77, 4, 8, 16, 16, (1, 2), False, 1.0, 1.0),  # output and map; rows with and without the map
  (3, 40, 40, 2, 16, 16, 8, (0, 2), True, 1.0, 1.0),  # causal, padded
  (2, 16, 40, 4, 8, 8, 16, (0, 2), False, 0.0, 1.0),  # the map alone (UnifyEdit's losses)
]


@pytest.mark.parametrize(
  ("b", "t", "s", "n", "h", "bq", "bk", "rows", "causal", "w_out", "w_map"), GRADIENT_CASES
)
def test_gradients_through_output_and_map_equal_reference(b, t, s, n, h, bq, bk, rows, causal, w_out, w_map):
  q, k, v = _qkv(b, t, s, n, h, seed=1)
  rng = np.random.default_rng(2)
  # Random cotangents: a loss whose gradient only a correct backward reproduces.
  c_out = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))
  c_map = jnp.asarray(rng.standard_normal((rows[1] - rows[0], t, s), np.float32))

  def loss(fn, q, k, v):
    out, probs = fn(q, k, v, map_rows=rows, causal=causal)
    return w_out * jnp.sum(out * c_out) + w_map * 100.0 * jnp.sum(probs * c_map)

  kernel = functools.partial(attention_with_map, block_q=bq, block_k=bk)
  got = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(functools.partial(loss, reference_attention_with_map), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want, strict=True):
    w = np.asarray(w)
    if name == "v" and w_out == 0.0:  # the map does not depend on v
      assert not np.any(np.asarray(g)) and not np.any(w)
      continue
    assert np.abs(w).max() > 1e-3, f"d{name}: the reference gradient is ~0, the check would be empty"
    np.testing.assert_allclose(np.asarray(g), w, atol=2e-5 * np.abs(w).max(), rtol=1e-4, err_msg=f"d{name}")


def test_gradient_without_map_equals_reference():
  q, k, v = _qkv(2, 16, 24, 2, 8, seed=3)
  c_out = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 2, 8), np.float32))
  loss = lambda fn, q, k, v: jnp.sum(fn(q, k, v)[0] * c_out)
  kernel = functools.partial(attention_with_map, block_q=8, block_k=16)
  got = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(functools.partial(loss, reference_attention_with_map), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want, strict=True):
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(w), atol=2e-5 * np.abs(w).max(), rtol=1e-4, err_msg=name
    )


def test_bfloat16_inputs_stay_close_to_float32_reference():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, 24, 16, 2, 16, seed=5))
  out, probs = attention_with_map(q, k, v, map_rows=(0, 1), block_q=8, block_k=8)
  want_out, want_map = reference_attention_with_map(q, k, v, map_rows=(0, 1))
  assert out.dtype == jnp.bfloat16 and probs.dtype == jnp.float32
  # Scores and softmax are float32 in both; the value product differs by bf16 rounding only.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32), atol=3e-2)
  np.testing.assert_allclose(np.asarray(probs), np.asarray(want_map), atol=1e-5)


@pytest.mark.parametrize("backend", ["gpu", "tpu", "cpu"])
@pytest.mark.parametrize("length", [1, 8, 40, 77, 129, 4096])
def test_block_sizes_fit_each_backend(backend, length):
  tiles = block_sizes(backend)
  block, padded = tiles.fit(length, tiles.block_q)
  assert padded >= length and padded % block == 0 and padded - length < block
  assert block % tiles.min_block == 0 and block <= max(tiles.block_q, tiles.min_block)
  if backend == "gpu":  # Triton: power-of-two tensors, tl.dot needs 16
    assert block & (block - 1) == 0 and block >= 16
    assert all(
      tiles.head_dim(h) >= max(h, 16) and tiles.head_dim(h) & (tiles.head_dim(h) - 1) == 0
      for h in (8, 40, 64, 80, 160)
    )
  if backend == "tpu":  # Mosaic: map tiles are 128 lanes wide, or the whole (padded) key length
    assert block % 128 == 0 or block == padded
    assert all(tiles.head_dim(h) % 128 == 0 for h in (8, 40, 64, 80, 160))


def test_bad_inputs_raise():
  q, k, v = _qkv(2, 8, 8, 1, 8)
  with pytest.raises(ValueError, match="map_rows"):
    attention_with_map(q, k, v, map_rows=(1, 3))
  with pytest.raises(ValueError, match="map_rows"):
    attention_with_map(q, k, v, map_rows=(1, 1))
  with pytest.raises(ValueError, match="interpret=True"):
    attention_with_map(q, k, v, interpret=False, backend="cpu")
  with pytest.raises(ValueError, match="do not match"):
    attention_with_map(q, k[:, :, :, :4], v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
  ("platform", "marker"), [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_forward_and_backward_lower_for_gpu_and_tpu(platform, marker, causal):
  # Cross-platform lowering runs Pallas' Triton (GPU) and Mosaic (TPU) lowerings on this CPU: every
  # primitive, block shape and loop in the seven kernels must be one the backend accepts. (Triton's
  # PTX compile and Mosaic's layout passes run only on the device.) SD1.5-like head dim 40, a padded
  # cross-attention length and self-attention, several key blocks with each backend's tiles, bf16.
  backend = "gpu" if platform == "cuda" else platform

  def loss(q, k, v):
    out, probs = attention_with_map(q, k, v, map_rows=(1, 2), causal=causal, backend=backend, interpret=False)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(probs**2)

  q = jnp.ones((2, 300, 8, 40), jnp.bfloat16)
  for s in (77, 300):  # cross- and self-attention lengths
    kv = jnp.ones((2, s, 8, 40), jnp.bfloat16)
    lowered = (
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=(platform,))
    )
    # fwd, map, map delta, then dq and dk/dv for the rows without and with the map
    assert lowered.as_text().count(marker) == 7


def test_map_equals_the_unet_capture():
  # The kernel is meant to replace the U-Net's captured-layer maps: same scores, same head mean.
  from lusd_jax.models import attention, unet

  q, k, v = _qkv(3, 24, 77, 4, 8, seed=6)
  out, probs = jax.jit(functools.partial(attention_with_map, map_rows=(1, 3), block_q=8, block_k=16))(q, k, v)
  np.testing.assert_allclose(np.asarray(probs), np.asarray(unet._head_mean_probs(q, k, (1, 3))), atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(probs), np.asarray(unet._layer_probs(q, k, (1, 3), "mean")), atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(out), np.asarray(attention.attention_with_probs(q, k, v)[0]), atol=2e-6
  )
