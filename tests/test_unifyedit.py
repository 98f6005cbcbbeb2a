"""UnifyEdit in JAX against the eager float64 reference, hand-checkable losses, and torch autograd.

The reference (tests/unifyedit_reference.py) transcribes the issue's algorithm on diffusers' PyTorch
U-Net in float64; the package runs the same tiny random weights in float32. Every ablation, mask and
schedule form is a traced number, so the parity cases are runs of ONE compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lusd_jax import engine, inversion
from lusd_jax import schedule as sch
from lusd_jax.lusd import core as lusd_core
from lusd_jax.models import unet
from lusd_jax.unifyedit import UnifyEdit, UnifyEditConfig, UnifyInputs, UnifyState, losses, word_weights
from lusd_jax.unifyedit.pipeline import MAX_EDIT_WORDS
from tests import builders
from tests import unifyedit_reference as ref

# PyTorch references on one thread (tests/conftest.py: shared cores).
pytestmark = pytest.mark.usefixtures("torch_one_thread")

# 128 px (a 16x16 latent), T = 3 and B = 1 with the words padded to MAX_EDIT_WORDS: the shapes of
# `--model tiny-random --size 128 --num-steps 3` (test_evaluation's and test_unifyedit_cli's UnifyEdit
# runs), so the parity cases run the denoising program those tests compile (persistent cache).
H = 16  # latent side; the image (and the mask) is 8H
T = 3
WORDS = [[2], [3, 5]]  # two edit words, the second of two sub-tokens
# Parity: float32 JAX vs float64 torch. Each step adds a U-Net call's float32 error (about 1e-6 of
# the latent's scale here); the normalized gradients pass it on unchanged, and guidance 7.5 amplifies
# the difference of the two prompts' outputs. Measured: see the assertion messages.
LATENT_RTOL = 2e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  n = torch.get_num_threads()
  torch.set_num_threads(1)  # the tiny float64 U-Net is dispatch-bound: threads only compete
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
  torch_model = builders.tiny_unet("sd1", seed=3)
  cfg = unet.UNetConfig.from_dict(dict(torch_model.config))
  params = unet.params_from_torch(builders.torch_state_dict(torch_model), cfg)
  return torch_model.double(), lusd_core.FlaxUNet(cfg), params


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  z0 = rng.standard_normal((H, H, 4)).astype(np.float32)
  ctx_src, ctx_tgt, ctx_null = (rng.standard_normal((77, 32)).astype(np.float32) for _ in range(3))
  mask = np.zeros((8 * H, 8 * H), np.float32)
  mask[24:88, 40:112] = 1.0  # not aligned to the 4x4 cross-attention grid
  return dict(z0=z0, ctx_src=ctx_src, ctx_tgt=ctx_tgt, ctx_null=ctx_null, mask=mask)


def inputs_for(data, trajectory, mask: bool) -> UnifyInputs:
  ww, valid = word_weights(WORDS, 77, MAX_EDIT_WORDS)  # the pipeline's padding: its program
  return UnifyInputs(
    z_T=jnp.asarray(trajectory[-1]),
    trajectory=jnp.asarray(trajectory),
    null_embeddings=jnp.broadcast_to(jnp.asarray(data["ctx_null"]), (T, 77, 32)),
    ctx_src=jnp.asarray(data["ctx_src"]),
    ctx_tgt=jnp.asarray(data["ctx_tgt"]),
    word_weights=jnp.asarray(ww),
    word_valid=jnp.asarray(valid),
    mask=jnp.asarray(data["mask"] if mask else np.ones_like(data["mask"])),
    has_mask=jnp.bool_(mask),
  )


# Traced windows cut through the run (of T = 3): both terms at t = 3, L_SAP alone at t = 2 (the first
# step where it is not zero: z_src = z_tgt before it), neither at t = 1; blending from t = 2 on
# (T - int(0.4 T)).
BASE = dict(num_steps=T, tau1=3, tau2=2, k1=0.3, k2=0.2, beta1=3.0, beta2=4.0, blend_start=0.4)
CASES = {  # name: (config overrides, mask)
  "blc-mask-blend": (dict(), True),
  "blc-global": (dict(), False),
  "norm": (dict(gradient="norm", blend=False), True),
  "naive": (dict(gradient="naive", beta1=2e3, beta2=0.5, blend=False), True),
  "sap_only": (dict(gradient="sap_only"), True),
  "caa_only": (dict(gradient="caa_only"), False),
  "region_sap": (dict(region_sap=True), True),
  "algorithm1": (dict(schedule_form="algorithm1"), True),
  "beta0": (dict(beta1=0.0, beta2=0.0), False),  # lambda1 = lambda2 = 0: plain dual-branch sampling
}


def reference_cfg(config: UnifyEditConfig, h: int) -> dict:
  heights = config.static().sa_heights(h)
  return dict(
    num_steps=config.num_steps, guidance=config.guidance, beta1=config.beta1, beta2=config.beta2,
    k1=config.k1, k2=config.k2, tau1=config.tau1, tau2=config.tau2,
    sa_heights=None if heights == "all" else list(heights), cross_height=h // 4,
    region_sap=config.region_sap, gradient=config.gradient, schedule_form=config.schedule_form,
    max_it=config.max_it, blend=config.blend, blend_frac=config.blend_start,
    maps_from="source" if config.maps_from == "denoising" else "inversion",
  )  # fmt: skip


def run_package(model, data, configs, masks):
  """The trajectory and one `engine.run` per config, B = 1 each, stacked: `RunOutput` leaves [C, ...].

  One element per run (not one batch of C) is the program `unifyedit.pipeline.denoise` runs for one
  edit: the CLI tests compile it first, and each run here costs a T = 3 step loop only.
  """
  _, fn, params = model
  schedule = sch.Schedule()
  traj = inversion.ddim_invert(fn, params, schedule, data["z0"], data["ctx_src"], num_steps=T)
  method = UnifyEdit(fn, schedule, configs[0].static())
  outs = []
  for config, mask in zip(configs, masks, strict=True):
    assert config.static() == method.static
    inputs_B = jax.tree.map(lambda x: x[None], inputs_for(data, traj, mask))
    numeric_B = jax.tree.map(lambda x: jnp.asarray(x)[None], config.numeric())
    keys_B = jax.vmap(jax.random.key)(jnp.arange(1, dtype=jnp.uint32))
    outs.append(engine.run(method, params, inputs_B, keys_B, numeric_B))
  return np.asarray(traj), jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def run_reference(model, data, config, mask: bool):
  torch_model = model[0]
  f64 = {k: np.asarray(v, np.float64) for k, v in data.items()}
  return ref.reference_edit(
    torch_model, _sd1_abar(), f64["z0"], f64["ctx_src"],
    f64["ctx_tgt"], f64["ctx_null"], WORDS, f64["mask"] if mask else None, reference_cfg(config, H),
  )  # fmt: skip


def _sd1_abar() -> np.ndarray:
  return np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def assert_latent_close(got, want, what):
  err = np.abs(np.asarray(got, np.float64) - want).max()
  scale = np.abs(want).max()
  assert err <= LATENT_RTOL * scale, f"{what}: max |jax - ref| = {err:.3g} (scale {scale:.3g})"


@pytest.mark.slow
@pytest.mark.xdist_group("unifyedit-programs")  # after test_evaluation's CLI batch: its compiled program
def test_end_to_end_equals_the_float64_reference(model, data):
  names = list(CASES)
  configs = [UnifyEditConfig(**{**BASE, **CASES[n][0]}) for n in names]
  masks = [CASES[n][1] for n in names]
  traj, out = run_package(model, data, configs, masks)
  z_tgt_B, z_src_B = out.final
  moved = []
  for b, name in enumerate(names):
    want = run_reference(model, data, configs[b], masks[b])
    if b == 0:
      assert_latent_close(traj, want["trajectory"], "DDIM inversion")
    assert_latent_close(z_src_B[b], want["z_src"], f"{name}: source branch")
    assert_latent_close(z_tgt_B[b], want["z_tgt"], f"{name}: target branch")
    np.testing.assert_allclose(
      out.stats.lambda1[b], want["lambdas"][:, 0], rtol=1e-5, atol=1e-6, err_msg=name
    )
    np.testing.assert_allclose(
      out.stats.lambda2[b], want["lambdas"][:, 1], rtol=1e-5, atol=1e-6, err_msg=name
    )
    # The first len(WORDS) rows: the rest are the padding words' (MAX_EDIT_WORDS).
    np.testing.assert_allclose(out.stats.ratios[b][:, : len(WORDS)], want["ratios"], rtol=1e-3, err_msg=name)
    active = want["sap_grad_norm"] > 0
    np.testing.assert_allclose(out.stats.sap_grad_norm[b][active], want["sap_grad_norm"][active], rtol=1e-3)
    active = want["caa_grad_norm"] > 0
    np.testing.assert_allclose(out.stats.caa_grad_norm[b][active], want["caa_grad_norm"][active], rtol=1e-3)
    moved.append(np.abs(want["z_tgt"] - want["z_src"]).max())
  # The cases are different edits (a parity test of identical runs would prove little).
  assert len({round(float(m), 4) for m in moved}) == len(moved), moved
  # lambda1 = lambda2 = 0 (a global edit: no blending) is plain guided DDIM sampling of each prompt.
  _, fn, params = model
  b = names.index("beta0")
  nulls = jnp.broadcast_to(jnp.asarray(data["ctx_null"]), (T, 77, 32))
  for prompt, got in (("ctx_src", z_src_B[b]), ("ctx_tgt", z_tgt_B[b])):
    plain = inversion.guided_sample(fn, params, sch.Schedule(), traj[-1], data[prompt], nulls, 7.5)[0]
    assert_latent_close(got, np.asarray(plain, np.float64), f"beta = 0 vs guided sampling of {prompt}")


@pytest.mark.slow
def test_static_variants_equal_the_reference(model, data):
  # maps_from="inversion", MAX_IT = 2 and L_SAP on two self-attention levels only: a second program.
  config = UnifyEditConfig(**BASE, maps_from="inversion", max_it=2, sa_resolutions=(32, 16))
  assert config.static().sa_heights(H) == (8, 4)
  _, out = run_package(model, data, [config], [True])
  want = run_reference(model, data, config, True)
  assert_latent_close(out.final[0][0], want["z_tgt"], "target branch")
  assert_latent_close(out.final[1][0], want["z_src"], "source branch")


# ---------------------------------------------------------------------------------------------
# Losses on hand-checkable cases


def test_equal_maps_give_zero_sap_and_full_region_equals_sap():
  rng = np.random.default_rng(1)
  maps = [jax.nn.softmax(jnp.asarray(rng.standard_normal((n, n))), axis=-1) for n in (16, 4)]
  other = [jax.nn.softmax(jnp.asarray(rng.standard_normal((n, n))), axis=-1) for n in (16, 4)]
  assert float(losses.sap_loss(maps, maps)) == 0.0
  ones = [jnp.ones(16), jnp.ones(4)]
  plain = float(losses.sap_loss(maps, other))
  assert plain > 0
  assert float(losses.sap_loss(maps, other, ones)) == pytest.approx(plain, rel=1e-6)
  # A region mask keeps only the inside pairs: by hand on the 4-token layer.
  m = jnp.asarray([1.0, 0.0, 1.0, 0.0])
  want = float(np.sum((np.asarray(maps[1] - other[1])[np.ix_([0, 2], [0, 2])]) ** 2))
  assert float(losses.sap_loss(maps[1:], other[1:], [m])) == pytest.approx(want, rel=1e-6)


def test_uniform_cross_attention_gives_unit_ratios():
  n_layers, tokens = 3, 77
  cross = [jnp.full((16, tokens), 1.0 / tokens) for _ in range(n_layers)]
  ww, valid = word_weights([[2], [3, 5]], tokens)
  mask = jnp.asarray(np.r_[np.ones(5), np.zeros(11)], jnp.float32)
  r = losses.caa_ratios(cross, jnp.asarray(ww), mask, jnp.bool_(True))
  np.testing.assert_allclose(r, 1.0, rtol=1e-6)
  assert float(losses.caa_loss(r, jnp.asarray(valid))) == pytest.approx(-2 * n_layers**2, rel=1e-6)
  # A padding word (valid False) adds nothing.
  ww3, valid3 = word_weights([[2], [3, 5]], tokens, num_words=3)
  r3 = losses.caa_ratios(cross, jnp.asarray(ww3), mask, jnp.bool_(True))
  assert float(losses.caa_loss(r3, jnp.asarray(valid3))) == pytest.approx(-2 * n_layers**2, rel=1e-6)
  # Without a mask R_l is the mean attention of s*: 1/77 here.
  r_global = losses.caa_ratios(cross, jnp.asarray(ww), jnp.ones(16), jnp.bool_(False))
  np.testing.assert_allclose(r_global, 1.0 / tokens, rtol=1e-6)


def test_ratio_is_inside_mean_over_outside_mean():
  c = np.full((4, 77), 0.01, np.float32)
  c[:, 2] = [0.4, 0.2, 0.1, 0.1]  # word at token 2; inside = tokens 0 and 1
  r = losses.caa_ratios(
    [jnp.asarray(c)], jnp.asarray(word_weights([[2]], 77)[0]), jnp.asarray([1.0, 1, 0, 0]), True
  )
  assert float(r[0, 0]) == pytest.approx(0.3 / 0.1, rel=1e-6)


def numeric(**kw):
  return UnifyEditConfig(
    **{"num_steps": 50, "beta1": 5.0, "beta2": 5.0, "k1": 0.08, "k2": 0.08, **kw}
  ).numeric()


def test_scheduler_values_at_k_008():
  l1, l2 = losses.scheduler(50, 50, numeric())
  assert (float(l1), float(l2)) == (0.0, 5.0)
  l1, l2 = losses.scheduler(38, 50, numeric())
  # The issue prints (3.085, 1.910); 5 exp(-0.96) = 1.9145, so 1.910 is rounded down: 5e-3 covers it.
  assert float(l1) == pytest.approx(3.085, abs=1e-3)
  assert float(l2) == pytest.approx(1.910, abs=5e-3)
  # Algorithm 1's printed form at the same step.
  l1, l2 = losses.scheduler(38, 50, numeric(schedule_form="algorithm1"))
  assert float(l1) == pytest.approx(5 * np.exp(-0.08 * 38), rel=1e-6)
  assert float(l2) == pytest.approx(5 * (1 - np.exp(-0.08 * 38)), rel=1e-6)


def test_windows_and_families():
  n = numeric(tau1=30, tau2=40)
  assert [float(x) for x in losses.step_weights(40, 50, n)] == pytest.approx(
    [5 * (1 - np.exp(-0.8)), 5 * np.exp(-0.8)], rel=1e-6
  )
  assert float(losses.step_weights(39, 50, n)[0]) == 0.0  # L_SAP off below tau2 (inclusive at 40)
  assert float(losses.step_weights(29, 50, n)[1]) == 0.0
  assert [float(x) for x in losses.step_weights(45, 50, numeric(gradient="norm"))] == [5.0, 5.0]
  assert float(losses.step_weights(45, 50, numeric(gradient="sap_only"))[1]) == 0.0
  assert float(losses.step_weights(45, 50, numeric(gradient="caa_only"))[0]) == 0.0


def test_scaling_a_loss_leaves_the_balanced_update_unchanged():
  rng = np.random.default_rng(2)
  g1, g2 = (jnp.asarray(rng.standard_normal((8, 8, 4)), jnp.float32) for _ in range(2))
  base = losses.combine(g1, g2, 2.0, 3.0, jnp.bool_(True))
  scaled = losses.combine(7.5 * g1, 0.01 * g2, 2.0, 3.0, jnp.bool_(True))
  np.testing.assert_allclose(scaled, base, rtol=1e-5, atol=1e-7)
  assert float(jnp.linalg.norm(losses.combine(g1, g2, 2.0, 0.0, True))) == pytest.approx(2.0, rel=1e-5)
  # Raw gradients (naive) do scale, and a zero weight drops even a non-finite gradient.
  assert not np.allclose(
    losses.combine(7.5 * g1, g2, 2.0, 3.0, False), losses.combine(g1, g2, 2.0, 3.0, False)
  )
  assert np.isfinite(losses.combine(g1, g2 * jnp.nan, 2.0, 0.0, True)).all()


def test_nearest_mask_takes_cell_centers():
  m = np.zeros((16, 16), np.float32)
  m[2, 6] = 1.0  # the center (floor((i + 0.5) 4) = 4 i + 2) of cell (0, 1) of a 4x4 grid
  m[3, 3] = 1.0  # not a center
  got = np.asarray(losses.nearest_mask(jnp.asarray(m), 4, 4))
  want = np.zeros((4, 4))
  want[0, 1] = 1
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# One step of the package's method


@pytest.fixture(scope="module")
def one_step(model, data):
  _, fn, params = model
  schedule = sch.Schedule()
  traj = np.asarray(inversion.ddim_invert(fn, params, schedule, data["z0"], data["ctx_src"], num_steps=T))
  method = UnifyEdit(fn, schedule, UnifyEditConfig(num_steps=T).static())
  # Steps 1-6 of step k (one program for both tests below): z* after Eq. 16 and the first update's
  # (L_SAP, L_CAA, g_SAP, g_CAA, R, G).
  optimize = jax.jit(lambda inputs, numeric, state, k: method.optimize(params, inputs, numeric, state, k)[:2])
  return optimize, traj


def test_update_leaves_the_latent_outside_the_mask_untouched(one_step, data):
  optimize, traj = one_step
  inputs = inputs_for(data, traj, mask=True)
  config = UnifyEditConfig(**BASE, blend=False)
  state = UnifyState(jnp.asarray(traj[-1]), jnp.asarray(traj[-1]) + 0.1)
  z = np.asarray(optimize(inputs, config.numeric(), state, 0)[0])
  m = np.asarray(losses.nearest_mask(jnp.asarray(data["mask"]), H, H)) > 0
  before = np.asarray(state.z_tgt)
  np.testing.assert_array_equal(z[~m], before[~m])
  assert np.abs(z[m] - before[m]).max() > 1e-3  # and inside it moved


def test_gradients_equal_torch_autograd(model, one_step, data):
  optimize, traj = one_step
  torch_model = model[0]
  rng = np.random.default_rng(5)
  z_src = traj[-3]
  z_tgt = (traj[-3] + 0.2 * rng.standard_normal(traj[-3].shape)).astype(np.float32)
  k = 2
  t = int(sch.ddim_timesteps(sch.Schedule(), T)[k])
  for mask, region in ((True, True), (True, False), (False, False)):
    numeric = UnifyEditConfig(**BASE, region_sap=region).numeric()
    inputs = inputs_for(data, traj, mask)
    # The source maps come from the state's z_src (maps_from="denoising"), the gradients at its z*.
    state = UnifyState(jnp.asarray(z_src), jnp.asarray(z_tgt))
    l_sap, l_caa, g_sap, g_caa, _, _ = optimize(inputs, numeric, state, k)[1]
    f64 = lambda x: np.asarray(x, np.float64)
    want = ref.reference_losses(
      torch_model, f64(z_src), f64(z_tgt), t, f64(data["ctx_src"]), f64(data["ctx_tgt"]), WORDS,
      f64(data["mask"]) if mask else None, None, H // 4, region,
    )  # fmt: skip
    assert float(l_sap) == pytest.approx(want[0], rel=1e-4)
    assert float(l_caa) == pytest.approx(want[1], rel=1e-4)
    for got, ref_g in ((g_sap, want[2]), (g_caa, want[3])):
      got = np.asarray(got, np.float64)
      assert np.abs(got - ref_g).max() <= 1e-3 * np.abs(ref_g).max(), (mask, region)
