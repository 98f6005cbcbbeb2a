"""Many images at once: `pipeline.edit_many` and `lusd-jax batch` over one and four devices.

In-process runs use the tiny random model (8x8 latent, 3 steps) and compile two LUSD programs:
the batch of 3 (job, seed) pairs and `pipeline.edit`'s program for 2 seeds, both with snapshots
every 2 steps. The four-device check runs `lusd-jax batch` in a subprocess (XLA_FLAGS must be set
before JAX starts) and compares its files with the same batch run here on one device.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lusd_jax import batchdir, cli, engine, io, loading, pipeline
from lusd_jax.lusd import core
from lusd_jax.lusd.config import LUSDConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
# lr = 1/64: SD's per-element step on an 8x8 latent; threshold 0.1 makes the tiny model redraw.
CONFIG = LUSDConfig(num_steps=3, lr=1 / 64, threshold=0.1, threshold_decay_rate=0.9)


@pytest.fixture(scope="module")
def model():
  return loading.load_model("tiny-random")


def _image(seed):
  return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  missing = str(tmp_path_factory.mktemp("imgs") / "missing.png")
  return [
    pipeline.EditJob(_image(0), "a photo of a cat", "a photo of a dog", (0, 1), label="first"),
    pipeline.EditJob(missing, "a cat", "a dog", (0, 1), label="missing"),
    pipeline.EditJob(_image(1), "a bowl of fruit", "a bowl of red apples", (5, 6), "red apples"),
    pipeline.EditJob(_image(0), "a photo of a cat", "a photo of a cat wearing a hat", (2, 3)),
  ]


@pytest.fixture(scope="module")
def many(model, jobs):
  notes = []
  programs = engine.run_chunk._cache_size()
  # Batches of 3 pairs: (job 0, 0) (job 0, 1) (job 2, 5) | (job 2, 6) (job 3, 2) (job 3, 3): job 2
  # spans both batches.
  out = list(
    pipeline.edit_many(model, jobs, CONFIG, size=SIZE, batch_size=3, snapshot_every=2, announce=notes.append)
  )
  return out, notes, engine.run_chunk._cache_size() - programs


def test_calls_with_other_images_and_prompts_share_one_program(many):
  # Two calls: at most one new program (none if another test already made this shape).
  assert many[2] <= 1


def test_every_job_is_yielded_once_as_it_finishes(many):
  out, notes, _ = many
  # The missing image fails at once; job 0 is done after the first batch, jobs 2 and 3 after the second.
  assert [j for j, _ in out] == [1, 0, 2, 3]
  failed = dict(out)[1]
  assert isinstance(failed, io.InputError) and "missing.png" in str(failed)
  assert notes[0] == "first" and "edit words" in notes[1]  # the label, then the edit-token note
  assert "missing" in notes


@pytest.mark.slow
def test_results_equal_single_edits(model, jobs, many):
  results = dict(many[0])
  for j in (0, 2, 3):
    job, got = jobs[j], results[j]
    want = pipeline.edit(
      model, job.image, job.source_prompt, job.target_prompt, seeds=job.seeds, config=CONFIG,
      edit_words=job.edit_words, snapshot_every=2, size=SIZE,
    )  # fmt: skip
    assert got.seeds == job.seeds and got.edit_tokens == want.edit_tokens
    np.testing.assert_array_equal(got.input_image, want.input_image)
    np.testing.assert_array_equal(got.timesteps, want.timesteps)
    np.testing.assert_array_equal(got.rejections, want.rejections)
    np.testing.assert_allclose(got.latents, want.latents, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got.images, want.images, atol=1e-4)
    np.testing.assert_allclose(got.mask, want.mask, atol=1e-4)  # min-max of near-uniform maps
    assert got.snapshot_steps == want.snapshot_steps == (2, 3)
    np.testing.assert_allclose(got.latent_snapshots, want.latent_snapshots, atol=1e-5, rtol=1e-5)
    assert got.snapshots.shape == (2, 2, SIZE, SIZE, 3)
    assert set(got.timings) == {"encode_s", "optimize_s", "decode_s"}
  assert results[0].rejections.sum() > 0  # the threshold really redraws
  assert not np.allclose(results[0].latents, results[3].latents)  # jobs differ


def test_nonfinite_batch_fails_its_jobs_and_the_rest_go_on(model, jobs, many):
  # lr 1e37 overflows z at step 0. Same shapes and static config as `many`'s calls (which compiled
  # the batch program in this process): the program is reused.
  good, bad = jobs[0], jobs[3]
  diverging = CONFIG.replace(lr=1e37)
  programs = engine.run_chunk._cache_size()
  out = list(pipeline.edit_many(model, [good, bad], diverging, size=SIZE, batch_size=3, snapshot_every=2))
  # (job 0: 0, 1), (job 1: 2) in the first batch: both jobs fail; job 1's second seed never runs.
  assert [j for j, _ in out] == [0, 1]
  assert engine.run_chunk._cache_size() == programs  # lr is traced: no new program
  for _, e in out:
    assert isinstance(e, core.NonFiniteError) and "step 0" in str(e)


# ----------------------------------------------------------------------------- lusd-jax batch


def _write_index(d):
  (d / "images").mkdir(parents=True)
  for name, seed in (("a.png", 0), ("b.png", 1)):
    Image.fromarray(_image(seed)).save(d / "images" / name)
  with open(d / "index.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["img_path", "source_prompt", "target_prompt"])
    w.writerows(
      [
        ("a.png", "a photo of a cat", "a photo of a dog"),
        ("b.png", "a bowl of fruit", "a bowl of red apples"),
        ("a.png", "a photo of a cat", "a photo of a cat wearing a hat"),
      ]
    )
  return d


ARGS = ["--model", "tiny-random", "--size", str(SIZE), "--num-steps", "3", "--lr", "0.015625"]
ARGS += ["--threshold", "0.1", "--threshold-decay-rate", "0.9", "--seeds", "0", "1", "--quiet"]


@pytest.mark.slow
def test_cli_batch_over_four_devices_equals_one_device(tmp_path, capsys):
  in_dir = _write_index(tmp_path / "in")
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
    "LUSD_JAX_NO_CACHE": "1",
    "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }
  four = tmp_path / "four"
  argv = ["batch", "--input-dir", str(in_dir), "--output-dir", str(four), *ARGS]
  code = "import sys; from lusd_jax import cli; sys.exit(cli.main(sys.argv[1:]))"
  proc = subprocess.run(
    [sys.executable, "-c", code, *argv], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  # 3 rows x 2 seeds: one call runs 4 edits (one per device), the next the last 2 (padded to 4).
  assert "batch: 6 edits over 4 devices" in proc.stdout
  assert "3 edited, 0 already done, 0 failed" in proc.stdout

  one = tmp_path / "one"
  assert cli.main(["batch", "--input-dir", str(in_dir), "--output-dir", str(one), *ARGS]) == 0
  assert "over" not in capsys.readouterr().out  # one device here
  for row in range(3):
    a = json.loads((four / f"{row:03d}_run.json").read_text())
    b = json.loads((one / f"{row:03d}_run.json").read_text())
    assert a["timestep_per_step"] == b["timestep_per_step"]
    assert a["rejections_per_step"] == b["rejections_per_step"]
    for seed in (0, 1):
      name = batchdir.output_name(row, seed)
      x = np.asarray(Image.open(four / name), np.int16)
      y = np.asarray(Image.open(one / name), np.int16)
      assert np.abs(x - y).max() <= 1, name  # equal up to a rounding step of the 8-bit PNG
  x0 = np.asarray(Image.open(one / batchdir.output_name(0, 0)), np.int16)
  x2 = np.asarray(Image.open(one / batchdir.output_name(2, 0)), np.int16)
  assert np.abs(x0 - x2).max() > 1  # rows really differ
