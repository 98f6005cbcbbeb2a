"""DDIM inversion, guided sampling and null-text inversion against eager PyTorch loops.

The references (tests/nti_reference.py) transcribe Prompt-to-Prompt's notebook on diffusers' PyTorch
U-Net with the same (tiny, random) weights as the Flax one. Every jitted function here compiles once
per module (the NTI program takes about a minute on a busy CPU); the cases differ only in traced
numbers (inner steps, epsilon, guidance), so they reuse it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from lusd_jax import engine
from lusd_jax import inversion as inv
from lusd_jax import schedule as sch
from lusd_jax.lusd import core
from lusd_jax.models import unet
from tests import builders
from tests import nti_reference as ref_lib

N = 5
HW = 16
# Trajectory parity: max |jax - torch| <= k * STEP_RTOL * max |torch| for a latent k U-Net steps from
# the start (each step adds one U-Net call's float32 error to the carry). Measured on the 4-block tiny U-Net:
# 1.3e-7 per inversion step and 2.7e-6 after the first w = 7.5 sampling step.
STEP_RTOL = 1e-5
# Null embeddings, relative to the move Adam made (max |torch - start|): the 99th percentile of
# |jax - torch| <= NULL_Q99_RTOL (measured <= 1e-4: a wrong lr or a missed step moves every entry by
# percents), the max <= NULL_MAX_RTOL (4-block U-Net: <= 1.7e-2, at 2-4 of 2464 entries: Adam divides by
# sqrt(v), so float32 differences in tiny gradients show where the gradient nearly vanishes).
NULL_Q99_RTOL = 1e-3
NULL_MAX_RTOL = 1e-1

# The torch references on one thread (conftest.py: many threads on a shared machine are far slower).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny():
  # A two-block U-Net: the inversion math does not depend on the depth; the programs that vmap and
  # differentiate it compile in less time.
  torch_model = builders.two_block_unet()
  cfg = unet.UNetConfig.from_dict(dict(torch_model.config))
  params = unet.params_from_torch(builders.torch_state_dict(torch_model), cfg)
  rng = np.random.default_rng(0)
  z0 = rng.standard_normal((HW, HW, 4)).astype(np.float32)
  cond = rng.standard_normal((77, cfg.cross_attention_dim)).astype(np.float32)
  null = rng.standard_normal((77, cfg.cross_attention_dim)).astype(np.float32)
  return torch_model, core.FlaxUNet(cfg), params, z0, cond, null


def to_torch(x_hwc):
  return torch.from_numpy(np.asarray(x_hwc)).permute(2, 0, 1)[None].contiguous()


def from_torch(x):
  return x[0].permute(1, 2, 0).numpy()


def assert_trajectory_close(got_KHWC, want_KHWC, order):
  """`order[j]` is how many U-Net steps produced row j (the tolerance grows with it)."""
  got, want = np.asarray(got_KHWC), np.asarray(want_KHWC)
  assert got.shape == want.shape
  for j, k in enumerate(order):
    err = np.abs(got[j] - want[j]).max()
    assert err <= k * STEP_RTOL * np.abs(want[j]).max() + 1e-7, (j, k, err)


@pytest.fixture(scope="module")
def inverted(tiny):
  torch_model, fn, params, z0, cond, _ = tiny
  traj = inv.ddim_invert(fn, params, sch.Schedule(), z0, cond, num_steps=N)
  ref = ref_lib.NullInversion(torch_model, N).ddim_loop(to_torch(z0), torch.from_numpy(cond)[None])
  return traj, np.stack([from_torch(x) for x in ref])


def test_ddim_inversion_matches_torch(inverted, tiny):
  traj, want = inverted
  assert traj.shape == (N + 1, HW, HW, 4) and traj.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(traj[0]), tiny[3])
  assert_trajectory_close(traj, want, order=range(N + 1))
  # Each level really moved (an identity loop would pass the parity check with a broken reference).
  assert all(np.abs(want[k + 1] - want[k]).max() > 1e-2 for k in range(N))


@pytest.mark.slow
def test_ddim_inversion_of_a_v_prediction_model_matches_torch():
  """SD2-shaped tiny U-Net (linear projections, upcast attention) read as a v-prediction model."""
  torch_model = builders.tiny_unet("sd2")
  cfg = unet.UNetConfig.from_dict(dict(torch_model.config))
  params = unet.params_from_torch(builders.torch_state_dict(torch_model), cfg)
  rng = np.random.default_rng(1)
  z0 = rng.standard_normal((8, 8, 4)).astype(np.float32)
  cond = rng.standard_normal((77, cfg.cross_attention_dim)).astype(np.float32)
  s = sch.Schedule(prediction_type="v_prediction")
  got = inv.ddim_invert(core.FlaxUNet(cfg), params, s, z0, cond, num_steps=N)
  ref = ref_lib.NullInversion(torch_model, N, v_prediction=True)
  want = np.stack([from_torch(x) for x in ref.ddim_loop(to_torch(z0), torch.from_numpy(cond)[None])])
  assert_trajectory_close(got, want, order=range(N + 1))
  # The conversion mattered: the same outputs read as eps (the reference without it, eager torch
  # rather than a second compiled program) end far from where the JAX inversion matched.
  eps_read = ref_lib.NullInversion(torch_model, N).ddim_loop(to_torch(z0), torch.from_numpy(cond)[None])
  assert np.abs(from_torch(eps_read[-1]) - want[-1]).max() > 1e-2


def test_guided_sampling_matches_torch(tiny):
  """Per-step null embeddings (all different) and w = 7.5 from a random z_T."""
  torch_model, fn, params, z0, cond, null = tiny
  nulls = np.stack([null * (1 + 0.3 * k) for k in range(N)]).astype(np.float32)
  got = inv.guided_sample(fn, params, sch.Schedule(), z0, cond, nulls, 7.5)
  ref = ref_lib.NullInversion(torch_model, N, guidance=7.5).sample(
    to_torch(z0), torch.from_numpy(cond)[None], [torch.from_numpy(e)[None] for e in nulls]
  )
  want = np.stack([from_torch(x) for x in ref])[::-1]  # noise-level order, as guided_sample returns
  assert_trajectory_close(got, want, order=range(N, -1, -1))
  # The embeddings matter: one embedding for every step gives another sample.
  same = inv.guided_sample(fn, params, sch.Schedule(), z0, cond, np.broadcast_to(null, nulls.shape), 7.5)
  assert np.abs(np.asarray(same[0]) - want[0]).max() > 1e-2


def test_optax_adam_matches_torch_adam():
  """The optimizer alone: same gradients in, same parameters out, over 10 steps with two lrs."""
  rng = np.random.default_rng(3)
  p0 = rng.standard_normal((7, 5)).astype(np.float32)
  a = rng.standard_normal((7, 5)).astype(np.float32)
  grad = lambda p: np.cos(p) * a + 0.1 * p  # noqa: E731 (a non-constant gradient field)
  for lr in (1e-2, 3e-3):
    p_t = torch.tensor(p0.copy(), requires_grad=True)
    opt_t = torch.optim.Adam([p_t], lr=lr)
    opt = optax.adam(lr)
    p_j = jnp.asarray(p0)
    s = opt.init(p_j)
    for _ in range(10):
      p_t.grad = torch.from_numpy(grad(p_t.detach().numpy()))
      opt_t.step()
      u, s = opt.update(jnp.asarray(grad(np.asarray(p_j))), s, p_j)
      p_j = optax.apply_updates(p_j, u)
    # float32 in different operation orders: compare the displacements (each step moves about lr).
    np.testing.assert_allclose(np.asarray(p_j) - p0, p_t.detach().numpy() - p0, rtol=1e-4, atol=1e-5 * lr)
    assert np.abs(np.asarray(p_j) - p0).max() > 5 * lr  # it moved


def _reference_nti(tiny, inverted, num_inner, epsilon):
  torch_model, *_, cond, null = tiny
  ref = ref_lib.NullInversion(torch_model, N, guidance=7.5)
  latents = [to_torch(x) for x in inverted[1]]
  return ref.null_optimization(
    latents, torch.from_numpy(cond)[None], torch.from_numpy(null)[None], num_inner, epsilon
  )


@pytest.fixture(scope="module")
def never_stops(tiny, inverted):
  return _reference_nti(tiny, inverted, 3, -1.0)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["never", "first", "second"])
def test_null_text_inversion_matches_torch(tiny, inverted, never_stops, case):
  """Three inner steps at most; epsilon picked so that the stops are known and far from the threshold:
  never (epsilon < 0), after the first inner step (epsilon huge), and at step 0 after the second inner
  step (epsilon between the reference's first two losses of step 0; later steps have larger losses)."""
  _, fn, params, _, cond, null = tiny
  losses0 = never_stops[2][0]
  assert losses0[1] < 0.97 * losses0[0], losses0  # the first Adam step lowers the loss (by ~7%)
  epsilon = {"never": -1.0, "first": 1e3, "second": (losses0[0] + losses0[1]) / 2}[case]
  nulls_ref, counts_ref, losses_ref = (
    never_stops if case == "never" else _reference_nti(tiny, inverted, 3, epsilon)
  )
  # Guard against a flaky stop: every loss is far (relative 1%) from its step's threshold.
  for i, step_losses in enumerate(losses_ref):
    for loss in step_losses:
      assert abs(loss - (epsilon + i * 2e-5)) > 0.01 * abs(loss), (case, i, loss)
  want_counts = {"never": [3] * N, "first": [1] * N, "second": [2] + [3] * (N - 1)}[case]
  assert counts_ref == want_counts, counts_ref

  got = inv.null_text_inversion(fn, params, sch.Schedule(), inverted[0], cond, null, 3, 7.5, epsilon)
  assert got.null_embeddings.shape == (N, 77, null.shape[-1]) and got.inner_steps.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got.inner_steps), counts_ref)
  np.testing.assert_allclose(np.asarray(got.losses), [s[-1] for s in losses_ref], rtol=1e-4)
  want = np.stack([e[0].numpy() for e in nulls_ref])
  for i in range(N):
    moved = np.abs(want[i] - null).max()
    err = np.abs(np.asarray(got.null_embeddings[i]) - want[i])
    assert np.quantile(err, 0.99) <= NULL_Q99_RTOL * moved, (i, np.quantile(err, 0.99), moved)
    assert err.max() <= NULL_MAX_RTOL * moved, (i, err.max(), moved)


@pytest.mark.slow
def test_null_text_inversion_reconstructs_better_than_ddim_inversion(tiny, inverted):
  """NTI's promise: guided sampling (w = 7.5) from z_T with the optimized embeddings lands much nearer
  the inverted latent z_0 than with the "" embedding at every step. The tiny random U-Net reacts weakly
  to its context, so this uses 50 inner steps (P2P: 10) and early stopping off."""
  _, fn, params, z0, cond, null = tiny
  traj = inverted[0]
  s = sch.Schedule()
  nti = inv.null_text_inversion(fn, params, s, traj, cond, null, 50, 7.5, -1.0)
  rec = inv.guided_sample(fn, params, s, traj[-1], cond, nti.null_embeddings, 7.5)
  plain = inv.guided_sample(fn, params, s, traj[-1], cond, jnp.broadcast_to(null, (N,) + null.shape), 7.5)
  err_nti = float(jnp.mean((rec[0] - z0) ** 2))
  err_plain = float(jnp.mean((plain[0] - z0) ** 2))
  assert err_nti < 0.5 * err_plain, (err_nti, err_plain)
  # The last inner loss of each step is the squared error of that step's landing before the update.
  assert np.all(np.isfinite(np.asarray(nti.losses))) and np.all(np.asarray(nti.inner_steps) == 50)


# ----------------------------------------------------------------------------- the engine's phases

CHUNK = 2  # N = 5 in three chunks, the last one with a padding step past N
# The engine vmaps the U-Net over the batch: float32 rounding differs from the one-element function's,
# not exactly equal. Measured: about 3e-7 (relative to max |z|) per inversion step, 5e-6 after the first
# w = 7.5 sampling step; `assert_trajectory_close`'s per-step bound covers both.


def _two_elements(tiny):
  """Two different photos' (z0, cond): the second scaled and rolled so that every step differs."""
  _, _, _, z0, cond, _ = tiny
  z0_B = np.stack([z0, 0.5 * np.roll(z0, 3, axis=0)])
  cond_B = np.stack([cond, np.roll(cond, 1, axis=0)])
  return z0_B, cond_B


def _engine_run(method, params, inputs_B, numeric_B):
  b = jax.tree.leaves(inputs_B)[0].shape[0]
  done = []
  out = engine.run(
    method, params, inputs_B, jax.random.split(jax.random.key(0), b), numeric_B, chunk_size=CHUNK,
    on_chunk=lambda k, _state, _stats: done.append(k),
  )  # fmt: skip
  assert done == [2, 4, 5]  # chunked as asked
  return out


def test_engine_ddim_inversion_and_sampling_equal_the_functions(tiny):
  """A batch of two elements in chunks of 2 steps gives each element's `ddim_invert` / `guided_sample`."""
  _, fn, params, _, _, null = tiny
  s = sch.Schedule()
  z0_B, cond_B = _two_elements(tiny)
  out = _engine_run(inv.DDIMInversion(fn, s, N), params, inv.InversionInputs(z0_B, cond_B), ())
  assert out.final.shape == (2, N + 1, HW, HW, 4) and out.stats.finite.shape == (2, N)
  assert out.stats.finite.all()
  nulls = np.stack([null * (1 + 0.3 * k) for k in range(N)]).astype(np.float32)
  nulls_B = np.stack([nulls, nulls[::-1]])
  guidance_B = np.array([7.5, 3.0], np.float32)
  sampled = _engine_run(
    inv.GuidedSampling(fn, s, N), params, inv.SamplingInputs(out.final[:, -1], cond_B, nulls_B), guidance_B
  )
  for b in range(2):
    want = inv.ddim_invert(fn, params, s, z0_B[b], cond_B[b], num_steps=N)
    assert_trajectory_close(out.final[b], want, order=range(N + 1))
    want = inv.guided_sample(fn, params, s, out.final[b, -1], cond_B[b], nulls_B[b], guidance_B[b])
    assert_trajectory_close(sampled.final[b], want, order=range(N, -1, -1))
  assert np.abs(out.final[0] - out.final[1]).max() > 1e-2  # the elements are different runs


@pytest.mark.slow
def test_engine_null_text_inversion_equals_the_function(tiny):
  """Two elements with different early stops (never; after one inner step) in chunks of 2 steps: the
  vmapped while loop runs until both stop, each element keeps its own count, embeddings and losses."""
  _, fn, params, _, _, null = tiny
  s = sch.Schedule()
  z0_B, cond_B = _two_elements(tiny)
  traj_B = np.stack(
    [np.asarray(inv.ddim_invert(fn, params, s, z, c, num_steps=N)) for z, c in zip(z0_B, cond_B, strict=True)]
  )
  null_B = np.stack([null, null])
  numeric_B = jax.tree.map(
    lambda *x: jnp.stack(x), inv.NullTextNumeric.of(7.5, 3, -1.0), inv.NullTextNumeric.of(7.5, 3, 1e3)
  )
  out = _engine_run(
    inv.NullTextOptimization(fn, s, N), params, inv.NullTextInputs(traj_B, cond_B, null_B), numeric_B
  )
  np.testing.assert_array_equal(out.stats.inner_steps, [[3] * N, [1] * N])
  np.testing.assert_array_equal(out.final.inner_steps, out.stats.inner_steps)
  np.testing.assert_array_equal(out.final.losses, out.stats.loss)
  for b, epsilon in enumerate([-1.0, 1e3]):
    want = inv.null_text_inversion(fn, params, s, traj_B[b], cond_B[b], null_B[b], 3, 7.5, epsilon)
    np.testing.assert_array_equal(out.final.inner_steps[b], np.asarray(want.inner_steps))
    np.testing.assert_allclose(out.final.losses[b], np.asarray(want.losses), rtol=1e-4)
    for i in range(N):  # the parity test's tolerances (Adam divides by sqrt(v): rounding shows)
      moved = np.abs(np.asarray(want.null_embeddings[i]) - null).max()
      err = np.abs(out.final.null_embeddings[b, i] - np.asarray(want.null_embeddings[i]))
      assert moved > 1e-4 and np.quantile(err, 0.99) <= NULL_Q99_RTOL * moved, (b, i, moved)
      assert err.max() <= NULL_MAX_RTOL * moved, (b, i, err.max(), moved)
