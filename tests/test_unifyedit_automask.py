"""`--mask auto`: LUSD's attention mask of the edit words as UnifyEdit's mask (automask.py).

Fast cases share one compile of the auto-mask program on the tiny random model (16x16 latent, 128 px
image); the end-to-end `edit_configs(mask="auto")` case compiles the denoising program (slow).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lusd_jax
from lusd_jax import io
from lusd_jax import schedule as sch
from lusd_jax.lusd import core as lusd_core
from lusd_jax.lusd.mask import attention_mask
from lusd_jax.models import unet
from lusd_jax.unifyedit import UnifyEditConfig, automask, pipeline

H = 16  # latent side
S = 8 * H  # image side
L = 77
EDIT_POS = 5


@pytest.fixture(scope="module")
def model():
  return lusd_jax.load_model("tiny-random")


@pytest.fixture(scope="module")
def data(model):
  rng = np.random.default_rng(7)
  z = rng.standard_normal((H, H, 4)).astype(np.float32)
  ctx = rng.standard_normal((L, model.configs.unet.cross_attention_dim)).astype(np.float32)
  edit = np.zeros(L, np.float32)
  edit[EDIT_POS] = 1.0
  return dict(z=z, ctx=ctx, edit=edit, t=501)


def test_trajectory_level_picks_the_closest_inversion_timestep(model):
  schedule = model.configs.schedule
  # ddim_invert: z_k sits at ddim_timesteps(N)[N - k]; with leading spacing and offset 1 the levels
  # of N = 10 are 1, 101, ..., 901 and those of N = 2 are 1, 501.
  offset = sch.ddim_timesteps(schedule, 10)[-1]
  assert automask.trajectory_level(schedule, 10, 500) == (6, 500 + offset)
  assert automask.trajectory_level(schedule, 2, 500) == (2, 500 + offset)
  assert automask.trajectory_level(schedule, 10, 0) == (1, offset)  # never z_0 (the clean latent)
  assert automask.trajectory_level(schedule, 10, 10**4) == (10, 900 + offset)
  # A tie (50 from 400 + offset and from 500 + offset) goes to the less noisy level.
  assert automask.trajectory_level(schedule, 10, 450 + offset) == (5, 400 + offset)
  for n in (2, 10, 50):
    k, t = automask.trajectory_level(schedule, n, 500)
    assert t == sch.ddim_timesteps(schedule, n)[n - k]


def test_auto_mask_equals_the_hand_computation(model, data):
  got = automask.auto_mask(model, data["z"], data["t"], data["ctx"], data["edit"], S)
  # The same steps by hand: one U-Net call capturing the averaged maps (jitted alone: faster than
  # eager here), LUSD's mask, 8x8 pixel repetition, > 0.5.
  unet_fn = lusd_core.FlaxUNet(model.configs.unet, model.unet_dtype)
  spec = unet.CaptureSpec(self_res=H // 2, cross_res=H // 4)
  _, maps = jax.jit(unet_fn, static_argnums=4)(
    model.params.unet,
    jnp.asarray(data["z"])[None],
    jnp.array([data["t"]]),
    jnp.asarray(data["ctx"])[None],
    spec,
  )
  soft = np.asarray(attention_mask(maps.self_attn[0], maps.cross_attn[0], jnp.asarray(data["edit"]), (H, H)))
  soft_img = np.repeat(np.repeat(soft, 8, axis=0), 8, axis=1)
  want = (soft_img > 0.5).astype(np.float32)
  assert got.shape == (S, S) and got.dtype == np.float32
  assert set(np.unique(got)) == {0.0, 1.0}
  # jit and eager may round differently: compare away from the threshold.
  clear = np.abs(soft_img - 0.5) > 1e-4
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(got[clear], want[clear])
  # Another threshold is another mask, from the same compiled program.
  got_hi = automask.auto_mask(model, data["z"], data["t"], data["ctx"], data["edit"], S, threshold=0.8)
  clear = np.abs(soft_img - 0.8) > 1e-4
  np.testing.assert_array_equal(got_hi[clear], (soft_img > 0.8)[clear].astype(np.float32))
  assert got_hi.sum() < got.sum()


def _block_cross(hot_cells) -> np.ndarray:
  """[N_c, L] cross map at latent/4 (4x4): the edit token attends strongly to `hot_cells`."""
  c = np.full((H // 4, H // 4, L), 1.0 / L, np.float32)
  c[..., EDIT_POS] = 0.002
  for i, j in hot_cells:
    c[i, j, EDIT_POS] = 0.5
  return c.reshape(-1, L)


def _edit_mask() -> jnp.ndarray:
  e = np.zeros(L, np.float32)
  e[EDIT_POS] = 1.0
  return jnp.asarray(e)


def test_mask_follows_the_attention():
  hs = H // 2
  n = hs * hs
  cross = _block_cross([(0, 2), (0, 3), (1, 2), (1, 3)])  # top-right quadrant
  q = S // 2
  m = automask.mask_from_maps(jnp.eye(n), jnp.asarray(cross), _edit_mask(), (H, H), S)
  binary = np.asarray(m.binary)
  assert binary.shape == (S, S) and set(np.unique(binary)) == {0.0, 1.0}
  assert not bool(m.flat)
  assert binary[8 : q - 8, q + 8 : S - 8].all()  # inside the hot quadrant (bicubic blurs its edge)
  assert not binary[q + 8 :, :].any() and not binary[:, : q - 8].any()
  # Self-attention refines it: let the bottom-left quadrant's pixels attend to the hot region's
  # pixels; they then gather its cross-attention and join the mask.
  grid = np.arange(n).reshape(hs, hs)
  self_nn = np.eye(n, dtype=np.float32)
  for i in range(hs // 2, hs):
    for j in range(hs // 2):
      self_nn[grid[i, j]] = 0.0
      self_nn[grid[i, j], grid[i - hs // 2, j + hs // 2]] = 1.0  # its mirror in the top-right
  m2 = automask.mask_from_maps(jnp.asarray(self_nn), jnp.asarray(cross), _edit_mask(), (H, H), S)
  b2 = np.asarray(m2.binary)
  assert b2[q + 8 : S - 8, 8 : q - 8].all()
  assert not b2[q + 8 :, q + 8 :].any()
  np.testing.assert_array_equal(b2[: q - 8], binary[: q - 8])  # the top half is unchanged


def test_degenerate_attention_raises_naming_the_flag(model, data):
  n = (H // 2) ** 2
  uniform = automask.mask_from_maps(
    jnp.full((n, n), 1.0 / n), jnp.full(((H // 4) ** 2, L), 1.0 / L), _edit_mask(), (H, H), S
  )
  assert bool(uniform.flat)
  with pytest.raises(io.InputError, match=r"^--mask: .*'dog' has no location; draw a mask"):
    automask.checked(uniform, what="'dog'")
  # A U-Net with zero weights attends uniformly: the whole program reports it.
  zeros = jax.tree.map(jnp.zeros_like, model.params.unet)
  zero_model = dataclasses.replace(model, params=model.params._replace(unet=zeros))
  with pytest.raises(io.InputError, match=r"^--mask: "):
    automask.auto_mask(zero_model, data["z"], data["t"], data["ctx"], data["edit"], S)
  # A full or an empty binary mask is degenerate too, even when the cross map has a location.
  located = automask.mask_from_maps(jnp.eye(n), jnp.asarray(_block_cross([(0, 0)])), _edit_mask(), (H, H), S)
  for binary, why in ((jnp.ones((S, S)), "covers the whole image"), (jnp.zeros((S, S)), "is empty")):
    with pytest.raises(io.InputError, match=f"^--mask: .*{why}"):
      automask.checked(located._replace(binary=binary))
  with pytest.raises(io.InputError, match=r"^--mask: .*threshold"):
    automask.auto_mask(model, data["z"], data["t"], data["ctx"], data["edit"], S, threshold=1.0)


def test_check_unifyedit_accepts_auto(model):
  tokens, groups, mask = pipeline.check_unifyedit(
    model.tokenizer, model.configs.schedule, "a photo of a cat", "a photo of a dog",
    UnifyEditConfig(num_steps=2), mask="auto", size=S,
  )  # fmt: skip
  assert mask == "auto" and tokens.edit_words == ("dog",) and groups


@pytest.mark.slow
@pytest.mark.xdist_group("unifyedit-programs")  # one worker: each compiled program is reused from the cache
def test_edit_configs_with_auto_mask(model):
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(S, S, 3)).astype(np.float32)
  config = UnifyEditConfig(num_steps=3, inversion="ddim")  # the program of the other end-to-end tests
  src, tgt = "a photo of a cat", "a photo of a dog"
  prep = pipeline.prepare_unifyedit(model, image, src, tgt, config, size=S)
  inv = pipeline.invert_prepared(model, prep, config)
  k, t = automask.trajectory_level(model.configs.schedule, config.num_steps)
  want = automask.auto_mask(model, inv.trajectory[k], t, prep.ctx[1], prep.edit_tokens.token_mask(L), S)
  notes = []
  (result,) = pipeline.edit_configs(
    model, image, src, tgt, [config], mask="auto", size=S, inversion_record=inv, announce=notes.append
  )
  np.testing.assert_array_equal(result.user_mask, want)
  # It acted as a user mask: the latent-level mask of Eq. 9/16 and blending is its nearest resize.
  assert result.mask is not None
  np.testing.assert_array_equal(result.mask[0], want[4::8, 4::8])
  pct = round(100 * want.mean())
  assert any(n.startswith(f"mask: auto from the attention of 'dog' ({pct}% of the image") for n in notes), (
    notes
  )
  # The same edit with the mask given by hand is the same edit.
  (by_hand,) = pipeline.edit_configs(
    model, image, src, tgt, [config], mask=want, size=S, inversion_record=inv
  )
  np.testing.assert_array_equal(result.latents, by_hand.latents)
