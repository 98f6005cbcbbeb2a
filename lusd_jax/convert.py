"""Converts a Stable Diffusion checkpoint into lusd-jax's fast-loading format, and verifies it.

    convert(src, out, dtype="float32")      (the command line: lusd-jax convert SRC OUT)

SRC is a local diffusers folder, a Hugging Face repo id, or (with torch and diffusers installed) a
single-file SD `.ckpt` / `.safetensors`, read with diffusers' `from_single_file` (pass
`--single-file-config` with a diffusers folder or repo id of the same architecture when offline).
OUT gets `lusd_jax.json` (configs), `unet.safetensors`, `vae.safetensors`,
`text_encoder.safetensors` (Flax param trees, '/'-joined paths) and `tokenizer/`. After writing,
the output is loaded back and every parameter compared with the converted one (round trip).

It lives inside the package (it was a top-level `convert/` package that imported back into
`lusd_jax`, and installed a module named `convert` into site-packages).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from flax import traverse_util

from lusd_jax import loading


def _single_file_to_diffusers(path: str, out_dir: str, config: str | None) -> str:
  try:
    from diffusers import StableDiffusionPipeline
  except ImportError:
    raise loading.ModelLoadError(
      f"{path}: converting a single-file checkpoint needs torch and diffusers (pip install 'lusd-jax[test]')."
    ) from None
  kwargs = {"config": config} if config else {}
  try:
    pipe = StableDiffusionPipeline.from_single_file(path, safety_checker=None, **kwargs)
  except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; report one line
    raise loading.ModelLoadError(
      f"{path}: diffusers could not read it as a Stable Diffusion checkpoint: {e}"
    ) from None
  pipe.save_pretrained(out_dir, safe_serialization=True)
  return out_dir


class RoundTripError(ValueError):
  """The converted folder does not load back to the same configs and parameters."""


def verify_round_trip(model: loading.SDModel, folder: str) -> int:
  """Loads `folder` back and checks every parameter equals `model`'s. Returns the number checked."""
  back = loading.load_converted(folder, model.dtype)
  if back.configs != model.configs:
    raise RoundTripError(f"{folder}: configs differ after the round trip")
  n = 0
  for name in ("unet", "vae", "text_encoder"):
    a = traverse_util.flatten_dict(getattr(model.params, name), sep="/")
    b = traverse_util.flatten_dict(getattr(back.params, name), sep="/")
    if set(a) != set(b):
      raise RoundTripError(f"{folder}/{name}: parameter names differ after the round trip")
    for k in a:
      if not np.array_equal(np.asarray(a[k]), np.asarray(b[k])):
        raise RoundTripError(f"{folder}/{name}: parameter {k} differs after the round trip")
      n += 1
  return n


def convert(
  src: str, out: str, dtype: str = "float32", single_file_config: str | None = None
) -> loading.SDModel:
  """Converts `src` into `out` and verifies the round trip. Returns the loaded model."""
  with tempfile.TemporaryDirectory() as tmp:
    if os.path.isfile(src):
      src = _single_file_to_diffusers(src, tmp, single_file_config)
    model = loading.load_model(src, dtype=dtype)
    loading.save_converted(model, out)
  verify_round_trip(model, out)
  return model
