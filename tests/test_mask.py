"""Bicubic resizing and the LUSD attention mask against PyTorch transcriptions of the official code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lusd_jax.lusd import mask as mk
from tests.lusd_reference import official_mask

# PyTorch references on one thread (tests/conftest.py: shared cores).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def torch_bicubic(x_HWC: np.ndarray, out_hw) -> np.ndarray:
  t = torch.from_numpy(x_HWC).permute(2, 0, 1)[None]
  return F.interpolate(t, size=tuple(out_hw), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
  "in_hw, out_hw",
  [
    ((16, 16), (32, 32)),
    ((4, 4), (8, 8)),
    ((32, 32), (64, 64)),
    ((5, 7), (13, 6)),
    ((12, 9), (4, 3)),
    ((8, 8), (8, 8)),
  ],
)
def test_bicubic_matches_torch(in_hw, out_hw):
  x = np.random.default_rng(0).random((*in_hw, 3), dtype=np.float32)
  got = np.asarray(jax.jit(mk.bicubic_resize, static_argnums=1)(jnp.asarray(x), out_hw))
  np.testing.assert_allclose(got, torch_bicubic(x, out_hw), atol=1e-5, rtol=0)
  # A 2-D map resizes like a single channel.
  got_2d = np.asarray(mk.bicubic_resize(jnp.asarray(x[..., 0]), out_hw))
  np.testing.assert_allclose(got_2d, got[..., 0], atol=1e-6)


def test_bicubic_overshoots_and_differs_from_jax_image_resize():
  """Keys' a = -0.75 kernel rings past the data range; jax.image.resize (a = -0.5) is not torch's."""
  x = np.zeros((8, 8, 1), np.float32)
  x[3:5, 3:5] = 1.0
  ours = np.asarray(mk.bicubic_resize(jnp.asarray(x), (16, 16)))
  assert ours.min() < -1e-3  # negative lobes, as in torch
  theirs = np.asarray(jax.image.resize(jnp.asarray(x), (16, 16, 1), "bicubic"))
  assert np.abs(ours - theirs).max() > 1e-3


def random_maps(rng, n_self, n_cross, length=77):
  a_s = rng.random((n_self, n_self), dtype=np.float32) ** 4
  a_c = rng.random((n_cross, length), dtype=np.float32) ** 4
  return a_s / a_s.sum(-1, keepdims=True), a_c / a_c.sum(-1, keepdims=True)


@pytest.mark.parametrize("latent, index", [(16, [3]), (16, [2, 5, 6]), (32, [1, 9])])
def test_attention_mask_matches_official(latent, index):
  rng = np.random.default_rng(latent + len(index))
  a_s, a_c = random_maps(rng, (latent // 2) ** 2, (latent // 4) ** 2)
  edit = np.zeros(77, np.float32)
  edit[index] = 1.0
  fn = jax.jit(mk.attention_mask, static_argnums=3)
  got = np.asarray(fn(jnp.asarray(a_s), jnp.asarray(a_c), jnp.asarray(edit), (latent, latent)))
  want = official_mask(a_s, a_c, index, (latent, latent))
  assert got.shape == (latent, latent)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Min-max normalization: exactly 0 at the minimum; the maximum within a few ulps of 1 (XLA:CPU may
  # multiply by the reciprocal of (max - min) instead of dividing). A wrong normalization is far off.
  assert got.min() == 0.0
  np.testing.assert_allclose(got.max(), 1.0, rtol=0, atol=4 * np.finfo(np.float32).eps)


def test_attention_mask_depends_on_the_edit_tokens():
  rng = np.random.default_rng(3)
  a_s, a_c = random_maps(rng, 64, 16)
  e1, e2 = np.zeros(77, np.float32), np.zeros(77, np.float32)
  e1[2], e2[7] = 1.0, 1.0
  m1 = np.asarray(mk.attention_mask(a_s, a_c, e1, (16, 16)))
  m2 = np.asarray(mk.attention_mask(a_s, a_c, e2, (16, 16)))
  assert np.abs(m1 - m2).max() > 0.1


def test_empty_or_constant_maps_give_the_uniform_mask():
  rng = np.random.default_rng(4)
  a_s, a_c = random_maps(rng, 64, 16)
  empty = np.asarray(mk.attention_mask(a_s, a_c, np.zeros(77, np.float32), (16, 16)))
  np.testing.assert_array_equal(empty, np.ones((16, 16), np.float32))
  const = np.asarray(mk.minmax_normalize(jnp.full((4, 4), 0.3)))
  np.testing.assert_array_equal(const, np.ones((4, 4), np.float32))


def test_attention_mask_rejects_maps_of_the_wrong_resolution():
  a_s, a_c = random_maps(np.random.default_rng(5), 16, 16)
  with pytest.raises(ValueError, match="do not fit latent"):
    mk.attention_mask(a_s, a_c, np.ones(77, np.float32), (16, 16))
