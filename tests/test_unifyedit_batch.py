"""UnifyEdit's batches: a sweep's cells equal single edits, and 4 emulated devices equal one.

Every run here is `--model tiny-random` at 128 px (a 16x16 latent: L_CAA reads the 4x4 cross-attention
level), T = 3, DDIM inversion: the denoising program compiles once per batch size and mesh.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import lusd_jax
from lusd_jax import sweeps
from lusd_jax.unifyedit import UnifyEditConfig
from lusd_jax.unifyedit import pipeline as ue

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 128  # T = 3 at 128 px: the programs of the CLI tests and the notebook (persistent cache)
BASE = dict(num_steps=3, tau1=1, tau2=1, inversion="ddim")
GRID = {"beta1": [2.0, 5.0], "k2": [0.1, 0.4]}


def photo_and_mask():
  rng = np.random.default_rng(0)
  image = rng.random((SIZE, SIZE, 3)).astype(np.float32)
  mask = np.zeros((SIZE, SIZE), bool)
  mask[32:96, 16:80] = True
  return image, mask


@pytest.mark.xdist_group("unifyedit-programs")  # one worker: each compiled program is reused from the cache
def test_a_sweep_of_four_configs_equals_four_single_edits():
  model = lusd_jax.load_model("tiny-random")
  image, mask = photo_and_mask()
  base = UnifyEditConfig(**BASE)
  res = sweeps.sweep(model, image, "a cat", "a dog", GRID, base_config=base, mask=mask, size=SIZE)
  assert res.images.shape == (4, 1, SIZE, SIZE, 3) and len(res.labels) == 4
  for c, config in enumerate(res.configs):
    # Padded to the sweep's batch of 4: the same compiled program, run for one config.
    single = ue.edit(model, image, "a cat", "a dog", config, mask=mask, size=SIZE, batch_size=4)
    np.testing.assert_allclose(res.latents[c], single.latents, rtol=0, atol=1e-5, err_msg=res.labels[c])
    cell = res.cell(c)
    np.testing.assert_allclose(cell.step_stats["lambda1"], single.step_stats["lambda1"], atol=1e-6)
  # The cells differ (the check above can fail).
  assert np.abs(res.latents[0] - res.latents[3]).max() > 1e-3


SCRIPT = f"""
import sys
import numpy as np
sys.path.insert(0, {REPO!r})
import jax, lusd_jax
from lusd_jax import sharding
from lusd_jax.unifyedit import UnifyEditConfig, UnifyInputs
from lusd_jax.unifyedit import pipeline as ue
from tests.test_unifyedit_batch import BASE, CONFIGS

assert jax.device_count() == 4, jax.devices()
model = lusd_jax.load_model("tiny-random")
inputs = UnifyInputs(**dict(np.load(sys.argv[1])))
configs = [UnifyEditConfig(**BASE, **c) for c in CONFIGS]
out = ue.denoise(model, inputs, configs, mesh=sharding.data_mesh())
np.save(sys.argv[2], out.final[0])
"""
# Three configs over four devices: one padding element, dropped.
CONFIGS = [dict(beta1=2.0, k2=0.1), dict(beta1=2.0, k2=0.4), dict(beta1=5.0, k2=0.1)]


@pytest.mark.xdist_group("unifyedit-programs")  # after the sweep test, on its worker: its program
def test_four_emulated_devices_equal_one(tmp_path):
  # Only the denoising phase is sharded (`edit_configs` passes the mesh to `denoise` alone): both
  # processes run `denoise` on the same inputs (the photo's encoding and DDIM inversion, made here),
  # so the subprocess compiles the sharded program only.
  model = lusd_jax.load_model("tiny-random")
  image, mask = photo_and_mask()
  configs = [UnifyEditConfig(**BASE, **c) for c in CONFIGS]
  prep = ue.prepare_unifyedit(model, image, "a cat", "a dog", configs[0], mask=mask, size=SIZE)
  inputs = ue._inputs(prep, ue.invert_prepared(model, prep, configs[0]))
  np.savez(tmp_path / "inputs.npz", **{k: np.asarray(v) for k, v in inputs._asdict().items()})
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }
  out = tmp_path / "four.npy"
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(tmp_path / "inputs.npz"), str(out)],
    env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-4000:]
  four = np.load(out)
  # One device, here: padded to 4 elements, the program of the sweep test above (already compiled).
  one = ue.denoise(model, inputs, configs, batch_size=4).final[0]
  assert four.shape == one.shape == (3, SIZE // 8, SIZE // 8, 4)
  # A different program (shard_map over blocks of one): float32 rounding differs, and the guided
  # steps amplify it as in the reference parity test (same relative tolerance, tests/test_unifyedit.py).
  assert np.abs(four - one).max() <= 2e-4 * np.abs(one).max()
  assert np.abs(one[0] - one[2]).max() > 1e-3  # the configs differ: the check can fail
