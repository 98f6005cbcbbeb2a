"""PyTorch state dicts -> Flax param trees, through an explicit key table.

The Flax modules in `lusd_jax.models` name their submodules after the diffusers / transformers
attribute paths, with list indices joined by "_" (`down_blocks.0.attentions.1.proj_in.weight` ->
`down_blocks_0/attentions_1/proj_in/kernel`). `conversion_table` turns that naming rule into an
explicit table, one row per PyTorch key, and checks it against the Flax param shapes of the model
the config describes: every PyTorch key maps to exactly one Flax leaf, every Flax leaf is filled
exactly once, and every shape agrees after the layout change. No name is guessed against a random
init: a key without its leaf, or a leaf without its key, is an error naming both.

Layout changes (PyTorch -> Flax): linear `[out, in]` -> kernel `[in, out]`; conv `[O, I, kh, kw]`
-> kernel `[kh, kw, I, O]`; a 1x1 conv stored where the Flax model has a Dense (old VAE attention
checkpoints) is squeezed; norm `weight` -> `scale`; embedding `weight` -> `embedding`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np
from flax import traverse_util


class WeightsError(ValueError):
  """A checkpoint does not fit the architecture its config describes."""


@dataclasses.dataclass(frozen=True)
class Row:
  torch_key: str
  flax_path: tuple[str, ...]
  transform: str  # "copy" | "linear" | "conv" | "conv1x1_to_linear"


def torch_key_to_flax_module_path(key: str) -> tuple[tuple[str, ...], str]:
  """`a.b.0.c.weight` -> (("a", "b_0", "c"), "weight")."""
  parts = key.split(".")
  leaf = parts[-1]
  out: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out), leaf


def _leaf_and_transform(module_leaves: Mapping[str, tuple[int, ...]], leaf: str, shape: tuple[int, ...]):
  """Which Flax leaf a PyTorch leaf fills, and how its layout changes."""
  if leaf == "bias":
    return "bias", "copy"
  if leaf != "weight":
    return None, None
  if "kernel" in module_leaves:
    kshape = module_leaves["kernel"]
    if len(shape) == 4 and len(kshape) == 4:
      return "kernel", "conv"
    if len(shape) == 2 and len(kshape) == 2:
      return "kernel", "linear"
    if len(shape) == 4 and len(kshape) == 2 and shape[2:] == (1, 1):
      return "kernel", "conv1x1_to_linear"
    return "kernel", None
  if "scale" in module_leaves:
    return "scale", "copy"
  if "embedding" in module_leaves:
    return "embedding", "copy"
  return None, None


def apply_transform(x: np.ndarray, transform: str) -> np.ndarray:
  if transform == "copy":
    return x
  if transform == "linear":
    return x.T
  if transform == "conv":
    return np.transpose(x, (2, 3, 1, 0))
  if transform == "conv1x1_to_linear":
    return x[:, :, 0, 0].T
  raise ValueError(transform)


def conversion_table(
  torch_shapes: Mapping[str, tuple[int, ...]],
  flax_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
  *,
  renames: Callable[[str], str] | None = None,
  ignore: Callable[[str], bool] | None = None,
  source: str = "checkpoint",
) -> list[Row]:
  """Builds and checks the PyTorch-key -> Flax-path table.

  Args:
    torch_shapes: PyTorch key -> shape, as stored in the checkpoint.
    flax_shapes: flattened Flax param path -> shape, from `jax.eval_shape` of the model's init.
    renames: optional legacy-name rewrite applied to a key before the naming rule.
    ignore: keys that hold no parameter (buffers such as `position_ids`).
    source: the file name used in error messages.

  Returns:
    One `Row` per PyTorch key that fills a Flax leaf.

  Raises:
    WeightsError: naming the file and key when a key has no leaf, a leaf has no key, or a shape differs.
  """
  modules: dict[tuple[str, ...], dict[str, tuple[int, ...]]] = {}
  for path, shape in flax_shapes.items():
    modules.setdefault(path[:-1], {})[path[-1]] = tuple(shape)

  rows: list[Row] = []
  filled: dict[tuple[str, ...], str] = {}
  for key, shape in torch_shapes.items():
    shape = tuple(shape)
    if ignore is not None and ignore(key):
      continue
    module_path, leaf = torch_key_to_flax_module_path(renames(key) if renames else key)
    leaves = modules.get(module_path)
    if leaves is None:
      raise WeightsError(
        f"{source}: key '{key}' does not belong to this architecture (no module {'/'.join(module_path)})."
      )
    flax_leaf, transform = _leaf_and_transform(leaves, leaf, shape)
    if flax_leaf is None or flax_leaf not in leaves:
      raise WeightsError(
        f"{source}: key '{key}' has no parameter '{leaf}' in module {'/'.join(module_path)}."
      )
    path = module_path + (flax_leaf,)
    if transform is None:
      raise WeightsError(
        f"{source}: key '{key}' has shape {shape}, which cannot fill {'/'.join(path)} of shape {leaves[flax_leaf]}."
      )
    converted = apply_transform(np.empty(shape, dtype=np.bool_), transform).shape
    if tuple(converted) != leaves[flax_leaf]:
      raise WeightsError(
        f"{source}: key '{key}' has shape {shape}; the config expects {_expected_torch_shape(leaves[flax_leaf], transform)}"
        f" (Flax {'/'.join(path)} {leaves[flax_leaf]})."
      )
    if path in filled:
      raise WeightsError(f"{source}: keys '{filled[path]}' and '{key}' both map to {'/'.join(path)}.")
    filled[path] = key
    rows.append(Row(key, path, transform))

  missing = [p for p in flax_shapes if p not in filled]
  if missing:
    names = ", ".join("/".join(p) for p in missing[:5])
    raise WeightsError(
      f"{source}: {len(missing)} parameter(s) of the architecture are missing from the checkpoint, e.g. {names}."
    )
  return rows


def _expected_torch_shape(flax_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  if transform == "linear":
    return tuple(reversed(flax_shape))
  if transform == "conv":
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if transform == "conv1x1_to_linear":
    i, o = flax_shape
    return (o, i, 1, 1)
  return tuple(flax_shape)


def flax_shapes_of(param_shapes) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened path -> shape of a (possibly abstract) param tree."""
  flat = traverse_util.flatten_dict(param_shapes)
  return {k: tuple(v.shape) for k, v in flat.items()}


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray],
  param_shapes,
  *,
  renames: Callable[[str], str] | None = None,
  ignore: Callable[[str], bool] | None = None,
  dtype=np.float32,
  source: str = "checkpoint",
  raw: Mapping[str, tuple[str, ...]] | None = None,
):
  """PyTorch state dict (numpy arrays) -> nested Flax params, checked against `param_shapes`.

  `raw` maps keys copied as they are (no rename, no transpose; e.g. a ViT's class embedding) to
  their Flax paths; a missing raw key or a shape that differs is a `WeightsError` naming it.
  """
  target = flax_shapes_of(param_shapes)
  flat = {}
  for key, path in (raw or {}).items():
    if key not in state_dict:
      raise WeightsError(f"{source}: missing key '{key}'.")
    if tuple(np.shape(state_dict[key])) != target[path]:
      raise WeightsError(
        f"{source}: key '{key}' has shape {tuple(np.shape(state_dict[key]))}; the config expects {target[path]}."
      )
    flat[path] = np.asarray(state_dict[key], dtype=dtype)
  rest = {k: tuple(np.shape(v)) for k, v in state_dict.items() if k not in (raw or {})}
  rest_target = {p: s for p, s in target.items() if p not in flat}
  for row in conversion_table(rest, rest_target, renames=renames, ignore=ignore, source=source):
    x = np.asarray(state_dict[row.torch_key])
    flat[row.flax_path] = np.ascontiguousarray(apply_transform(x, row.transform), dtype=dtype)
  return traverse_util.unflatten_dict(flat)


_LEGACY_VAE_ATTENTION = [
  (re.compile(r"\.query\.(weight|bias)$"), r".to_q.\1"),
  (re.compile(r"\.key\.(weight|bias)$"), r".to_k.\1"),
  (re.compile(r"\.value\.(weight|bias)$"), r".to_v.\1"),
  (re.compile(r"\.proj_attn\.(weight|bias)$"), r".to_out.0.\1"),
]


def legacy_vae_renames(key: str) -> str:
  """Old diffusers VAE attention names (query/key/value/proj_attn) -> current ones."""
  for pattern, repl in _LEGACY_VAE_ATTENTION:
    key = pattern.sub(repl, key)
  return key
