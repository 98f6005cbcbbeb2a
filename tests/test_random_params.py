"""`layers.random_params`: the one random init of every model, the benchmark and the tests."""

import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax.models import layers

SHAPES = {
  "attn": {
    "to_q": {"kernel": jax.ShapeDtypeStruct((256, 64), jnp.float32)},
    "to_v": {
      "kernel": jax.ShapeDtypeStruct((256, 64), jnp.float32),
      "bias": jax.ShapeDtypeStruct((64,), jnp.float32),
    },
  },
  "norm": {
    "scale": jax.ShapeDtypeStruct((4096,), jnp.float32),
    "bias": jax.ShapeDtypeStruct((4096,), jnp.float32),
  },
}


def test_distributions_and_gain():
  p = layers.random_params(SHAPES, 0, bias_std=0.1, scale_std=0.2, kernel_gain={"to_q": 2.0})
  std = lambda x: float(np.std(np.asarray(x)))
  assert abs(std(p["attn"]["to_v"]["kernel"]) * 16 - 1.0) < 0.05  # LeCun: 1 / sqrt(256)
  assert abs(std(p["attn"]["to_q"]["kernel"]) * 16 - 2.0) < 0.1  # the gain applies to to_q only
  assert abs(std(p["norm"]["scale"]) - 0.2) < 0.02 and abs(float(np.mean(p["norm"]["scale"])) - 1.0) < 0.02
  assert abs(std(p["norm"]["bias"]) - 0.1) < 0.01


def test_flax_defaults_keys_and_dtype():
  p = layers.random_params(SHAPES, jax.random.key(3), jnp.bfloat16, bias_std=0.0, scale_std=0.0)
  assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(np.asarray(p["norm"]["scale"], np.float32), 1.0)
  assert not np.signbit(np.asarray(p["norm"]["bias"], np.float32)).any()  # zeros, not -0.0
  same = layers.random_params(SHAPES, jax.random.key(3), jnp.bfloat16, bias_std=0.0, scale_std=0.0)
  other = layers.random_params(SHAPES, jax.random.key(4), jnp.bfloat16, bias_std=0.0, scale_std=0.0)
  k = lambda t: np.asarray(t["attn"]["to_q"]["kernel"], np.float32)
  assert np.array_equal(k(p), k(same)) and not np.array_equal(k(p), k(other))
