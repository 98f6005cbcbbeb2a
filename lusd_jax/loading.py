"""Loading Stable Diffusion: diffusers folders, hub ids, converted checkpoints, the tiny random model.

(Over 450 lines on purpose: every way a checkpoint arrives (three layouts, the hub, CLIP and DINO for the
evaluation, the weight-free model head) shares one error type and one set of file readers.)

`load_model` returns an `SDModel`: static configs (hashable: they select compiled programs) beside
a params pytree (traced). Weights are read from `.safetensors` without torch; `.bin` files need
torch. Every problem is a `ModelLoadError` that names the folder, file and key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lusd_jax import schedule as schedule_lib
from lusd_jax import tokenizer as tokenizer_lib
from lusd_jax.models import clip as clip_lib
from lusd_jax.models import clip_text, unet, vae
from lusd_jax.models import dino as dino_lib
from lusd_jax.weights import WeightsError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_RANDOM = "tiny-random"
CONVERTED_MARKER = "lusd_jax.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DtypePolicy(NamedTuple):
  """Params and activation dtypes of the three networks under one `--dtype` name."""

  unet: str  # U-Net params and activations
  encoders: str  # VAE and text encoder params and activations
  help: str  # one line for `--dtype`


# The official LUSD code runs the U-Net under torch fp16 autocast and the VAE and text encoder in
# fp32: that split is "mixed-float16". g and std(g) are float32 here under every policy.
DTYPE_POLICIES = {
  "float32": DtypePolicy("float32", "float32", "everything in float32 (the reference; default)"),
  "bfloat16": DtypePolicy("bfloat16", "bfloat16", "all three networks in bfloat16"),
  "float16": DtypePolicy("float16", "float16", "all three networks in float16"),
  "mixed-float16": DtypePolicy(
    "float16", "float32", "U-Net in float16, VAE and text encoder in float32 (the official code's split)"
  ),
  "mixed-bfloat16": DtypePolicy("bfloat16", "float32", "U-Net in bfloat16, VAE and text encoder in float32"),
}


# component -> (module, weight file stem, config file)
_COMPONENTS = {
  "unet": (unet, "diffusion_pytorch_model", "config.json"),
  "vae": (vae, "diffusion_pytorch_model", "config.json"),
  "text_encoder": (clip_text, "model", "config.json"),
}


class ModelLoadError(ValueError):
  """A model folder, file or key is missing or does not fit its config."""


class SDParams(NamedTuple):
  unet: Any
  vae: Any
  text_encoder: Any


@dataclasses.dataclass(frozen=True)
class SDConfigs:
  """Everything static about a model: changing any of it means a new compiled program."""

  unet: unet.UNetConfig
  vae: vae.VAEConfig
  text_encoder: clip_text.CLIPTextConfig
  schedule: schedule_lib.Schedule


@dataclasses.dataclass(frozen=True, eq=False)
class SDModel:
  """A loaded Stable Diffusion: configs, params (a pytree), tokenizer.

  Attributes:
    configs: static configs of the three networks and the noise schedule.
    params: `SDParams` pytree: the U-Net's leaves in `unet_dtype`, the VAE's and text encoder's in
      `compute_dtype`.
    tokenizer: transformers `CLIPTokenizer`.
    name: where it came from (folder, hub id or "tiny-random").
    dtype: the dtype policy, a key of `DTYPE_POLICIES` ("float32", "bfloat16", "float16",
      "mixed-float16", "mixed-bfloat16"); run.json records it.
  """

  configs: SDConfigs
  params: SDParams
  tokenizer: Any
  name: str
  dtype: str = "float32"

  @property
  def unet_dtype(self) -> str:
    """Name of the U-Net's params and activation dtype (what `core.FlaxUNet` takes)."""
    return DTYPE_POLICIES[self.dtype].unet

  @property
  def compute_dtype(self):
    """The VAE's and text encoder's dtype (a jnp dtype): images and latents enter them in it."""
    return DTYPES[DTYPE_POLICIES[self.dtype].encoders]

  @property
  def is_random(self) -> bool:
    return self.name == TINY_RANDOM


def _check_dtype(dtype) -> str:
  """The policy name of `dtype` (a policy name, or a jnp dtype meaning that dtype everywhere)."""
  if isinstance(dtype, str):
    name = dtype
  else:
    try:
      name = jnp.dtype(dtype).name
    except TypeError:
      name = repr(dtype)
  if name not in DTYPE_POLICIES:
    raise ModelLoadError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPE_POLICIES)}.")
  return name


def _cast(tree, dtype_name: str):
  dt = DTYPES[dtype_name]
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=dt), tree)


def _cast_params(params: SDParams, policy_name: str) -> SDParams:
  """Casts each network's params to its dtype under the policy."""
  policy = DTYPE_POLICIES[policy_name]
  return SDParams(
    _cast(params.unet, policy.unet),
    _cast(params.vae, policy.encoders),
    _cast(params.text_encoder, policy.encoders),
  )


# ----------------------------------------------------------------------------- reading files


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ModelLoadError(f"missing file {path}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  out = {}
  try:
    # framework="flax" reads bfloat16 too (numpy has no bfloat16); convert to float32 numpy.
    with safe_open(path, framework="flax") as f:
      for k in f.keys():
        out[k] = np.asarray(jnp.asarray(f.get_tensor(k), dtype=jnp.float32))
  except Exception as e:  # noqa: BLE001 - corrupt or truncated file: say which
    raise ModelLoadError(f"cannot read {path}: {e}") from None
  return out


def _read_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise ModelLoadError(
      f"{path} is a PyTorch .bin file; reading it needs torch (pip install torch), or convert the "
      "checkpoint to .safetensors."
    ) from None
  sd = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in sd.items()}


def read_state_dict(folder: str, stem: str) -> tuple[dict[str, np.ndarray], str]:
  """The state dict of one component folder; returns (state dict, the file it came from)."""
  if not os.path.isdir(folder):
    raise ModelLoadError(f"missing folder {folder}")
  candidates = [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
  for name in candidates:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return _read_safetensors(path), path
  index = os.path.join(folder, f"{stem}.safetensors.index.json")
  if os.path.isfile(index):
    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
    sd = {}
    for shard in shards:
      sd.update(_read_safetensors(os.path.join(folder, shard)))
    return sd, index
  for name in (f"{stem}.bin", f"{stem}.fp16.bin", "pytorch_model.bin"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return _read_bin(path), path
  raise ModelLoadError(f"no weights in {folder}: expected {stem}.safetensors (or a .bin file)")


def _component(root: str, name: str, dtype_name: str):
  module, stem, config_name = _COMPONENTS[name]
  folder = os.path.join(root, name)
  config_path = os.path.join(folder, config_name)
  raw = _read_json(config_path)
  config_cls = {"unet": unet.UNetConfig, "vae": vae.VAEConfig, "text_encoder": clip_text.CLIPTextConfig}[name]
  try:
    config = config_cls.from_dict(raw)
  except (ValueError, TypeError) as e:
    raise ModelLoadError(f"{config_path}: {e}") from None
  state_dict, source = read_state_dict(folder, stem)
  try:
    params = module.params_from_torch(state_dict, config, source=source)
  except WeightsError as e:
    raise ModelLoadError(str(e)) from None
  return config, _cast(params, dtype_name)


def _load_schedule(root: str) -> schedule_lib.Schedule:
  path = os.path.join(root, "scheduler", "scheduler_config.json")
  raw = _read_json(path)
  try:
    return schedule_lib.Schedule.from_dict(raw)
  except (ValueError, TypeError) as e:
    raise ModelLoadError(f"{path}: {e}") from None


def _load_tokenizer(root: str):
  folder = os.path.join(root, "tokenizer")
  has_bpe = all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt"))
  if not has_bpe and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
    raise ModelLoadError(f"missing file {os.path.join(folder, 'vocab.json')} (and no tokenizer.json)")
  return tokenizer_lib.load_tokenizer(folder)


def load_diffusers_folder(root: str, dtype: str = "float32") -> SDModel:
  """Loads a local diffusers Stable Diffusion folder (`unet/`, `vae/`, `text_encoder/`, ...)."""
  dtype_name = _check_dtype(dtype)
  root = os.fspath(root)
  index = os.path.join(root, "model_index.json")
  if os.path.isfile(index):
    cls = _read_json(index).get("_class_name", "")
    if cls and "StableDiffusion" not in cls:
      raise ModelLoadError(f"{index}: pipeline class {cls!r} is not a Stable Diffusion 1.x/2.x pipeline.")
  for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    if not os.path.isdir(os.path.join(root, sub)):
      raise ModelLoadError(
        f"missing folder {os.path.join(root, sub)} (expected a diffusers Stable Diffusion folder)"
      )
  policy = DTYPE_POLICIES[dtype_name]
  unet_cfg, unet_params = _component(root, "unet", policy.unet)
  vae_cfg, vae_params = _component(root, "vae", policy.encoders)
  text_cfg, text_params = _component(root, "text_encoder", policy.encoders)
  if text_cfg.hidden_size != unet_cfg.cross_attention_dim:
    raise ModelLoadError(
      f"{root}: text_encoder hidden_size {text_cfg.hidden_size} != unet cross_attention_dim "
      f"{unet_cfg.cross_attention_dim}"
    )
  configs = SDConfigs(unet_cfg, vae_cfg, text_cfg, _load_schedule(root))
  params = SDParams(unet_params, vae_params, text_params)
  return SDModel(configs, params, _load_tokenizer(root), name=root, dtype=dtype_name)


# ----------------------------------------------------------------------------- converted format


def _configs_to_json(configs: SDConfigs) -> dict:
  return {k: dataclasses.asdict(getattr(configs, k)) for k in ("unet", "vae", "text_encoder", "schedule")}


def save_converted(model: SDModel, folder: str) -> None:
  """Writes the project's fast-loading format: Flax param trees in safetensors plus configs."""
  from safetensors.numpy import save_file

  os.makedirs(folder, exist_ok=True)
  for name in ("unet", "vae", "text_encoder"):
    flat = traverse_util.flatten_dict(getattr(model.params, name), sep="/")
    arrays = {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in flat.items()}
    save_file(arrays, os.path.join(folder, f"{name}.safetensors"), metadata={"dtype": model.dtype})
  model.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
  meta = {"format": 1, "source": model.name, "dtype": model.dtype, "configs": _configs_to_json(model.configs)}
  with open(os.path.join(folder, CONVERTED_MARKER), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)


def load_converted(folder: str, dtype: str | None = None) -> SDModel:
  meta = _read_json(os.path.join(folder, CONVERTED_MARKER))
  dtype_name = _check_dtype(dtype or meta.get("dtype", "float32"))
  policy = DTYPE_POLICIES[dtype_name]
  cfg = meta["configs"]
  try:
    configs = SDConfigs(
      unet.UNetConfig.from_dict(cfg["unet"]),
      vae.VAEConfig.from_dict(cfg["vae"]),
      clip_text.CLIPTextConfig.from_dict(cfg["text_encoder"]),
      schedule_lib.Schedule.from_dict(cfg["schedule"]),
    )
  except (KeyError, ValueError, TypeError) as e:
    raise ModelLoadError(f"{os.path.join(folder, CONVERTED_MARKER)}: {e}") from None
  trees = []
  for name, module, config in (
    ("unet", unet, configs.unet),
    ("vae", vae, configs.vae),
    ("text_encoder", clip_text, configs.text_encoder),
  ):
    path = os.path.join(folder, f"{name}.safetensors")
    if not os.path.isfile(path):
      raise ModelLoadError(f"missing file {path}")
    flat = _read_safetensors(path)
    expected = traverse_util.flatten_dict(module.param_shapes(config), sep="/")
    for key, leaf in expected.items():
      if key not in flat:
        raise ModelLoadError(f"{path}: missing parameter '{key}'")
      if tuple(flat[key].shape) != tuple(leaf.shape):
        raise ModelLoadError(
          f"{path}: parameter '{key}' has shape {flat[key].shape}, expected {tuple(leaf.shape)}"
        )
    extra = sorted(set(flat) - set(expected))
    if extra:
      raise ModelLoadError(f"{path}: unexpected parameter '{extra[0]}' ({len(extra)} in all)")
    component_dtype = policy.unet if name == "unet" else policy.encoders
    trees.append(_cast(traverse_util.unflatten_dict(flat, sep="/"), component_dtype))
  tok = tokenizer_lib.load_tokenizer(os.path.join(folder, "tokenizer"))
  return SDModel(configs, SDParams(*trees), tok, name=meta.get("source", folder), dtype=dtype_name)


# ----------------------------------------------------------------------------- tiny random model


def tiny_random_model(seed: int = 0, dtype: str = "float32") -> SDModel:
  """A tiny SD1-shaped model with random weights and the real CLIP tokenizer (meaningless pixels)."""
  from lusd_jax import tiny

  dtype_name = _check_dtype(dtype)
  configs = SDConfigs(
    unet.UNetConfig.from_dict(tiny.TINY_SD1_UNET),
    vae.VAEConfig.from_dict(tiny.TINY_VAE),
    clip_text.CLIPTextConfig.from_dict(tiny.TINY_SD1_TEXT),
    schedule_lib.Schedule.from_dict(tiny.SD1_SCHEDULER),
  )
  k_unet, k_vae, k_text = jax.random.split(jax.random.key(seed), 3)
  params = SDParams(
    unet.init_params(configs.unet, k_unet),
    vae.init_params(configs.vae, k_vae),
    clip_text.init_params(configs.text_encoder, k_text),
  )
  return SDModel(
    configs, _cast_params(params, dtype_name), tokenizer_lib.bundled_tokenizer(), TINY_RANDOM, dtype_name
  )


# ----------------------------------------------------------------------------- entry point


def _looks_like_repo_id(s: str) -> bool:
  parts = s.split("/")
  return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def load_model(
  path_or_repo_id: str = DEFAULT_MODEL, dtype: str = "float32", *, revision: str | None = None
) -> SDModel:
  """Loads Stable Diffusion 1.x / 2.x for editing.

  Args:
    path_or_repo_id: a local diffusers folder, a folder written by `lusd_jax.convert` (has `lusd_jax.json`),
      a Hugging Face repo id (downloaded with `huggingface_hub` when a network is there), or
      "tiny-random" (a tiny random-weight model built in memory, for trying the tool).
    dtype: the dtype policy (`DTYPE_POLICIES`): "float32", "bfloat16" or "float16" for the params
      and activations of all three networks, or "mixed-float16" / "mixed-bfloat16" for a half
      precision U-Net beside a float32 VAE and text encoder (the official LUSD code's split is
      "mixed-float16"). g = eps_tgt - eps_src and std(g) are float32 under every policy (the U-Net
      output is cast first); the official code computes them in fp16.
    revision: hub revision, for repo ids.

  Returns:
    `SDModel` (configs, params, tokenizer).

  Raises:
    ModelLoadError: naming the missing folder / file / key or the unsupported setting.

  Example:
    >>> model = lusd_jax.load_model("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype="mixed-bfloat16")
    >>> model.unet_dtype, model.compute_dtype  # ("bfloat16", float32): U-Net, VAE and text encoder
  """
  if path_or_repo_id == TINY_RANDOM:
    return tiny_random_model(dtype=dtype)
  path = os.path.expanduser(os.fspath(path_or_repo_id))
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, CONVERTED_MARKER)):
      return load_converted(path, dtype)
    return load_diffusers_folder(path, dtype)
  if os.path.exists(path):
    raise ModelLoadError(
      f"{path} is a file; pass a diffusers folder, or convert a single-file checkpoint first "
      "(lusd-jax convert --help)."
    )
  local = _download(path_or_repo_id, revision, _HUB_PATTERNS)
  model = load_diffusers_folder(local, dtype)
  return dataclasses.replace(model, name=path_or_repo_id)


# What `load_model` downloads from the hub; `load_model_head` takes the first three only.
_HUB_PATTERNS = (
  "model_index.json",
  "scheduler/*.json",
  "tokenizer/*",
  "*/config.json",
  "unet/diffusion_pytorch_model.safetensors",
  "vae/diffusion_pytorch_model.safetensors",
  "text_encoder/model.safetensors",
)


def _download(repo_id: str, revision: str | None, patterns) -> str:
  """A hub repo's files matching `patterns`, as a local folder (huggingface_hub's cache)."""
  if not _looks_like_repo_id(repo_id):
    raise ModelLoadError(f"model {repo_id!r}: no such folder, and not a Hugging Face repo id (owner/name).")
  try:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns))
  except Exception as e:  # noqa: BLE001 - network, auth, unknown repo: one clear line
    raise ModelLoadError(
      f"model {repo_id!r}: not a local folder, and downloading it from the Hugging Face hub failed "
      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Pass a local diffusers folder, or "
      "--model tiny-random to try the tool."
    ) from None


class ModelHead(NamedTuple):
  """What the input checks need from a model, read without its weights (milliseconds, not minutes)."""

  name: str
  tokenizer: Any  # transformers CLIPTokenizer
  schedule: schedule_lib.Schedule
  is_random: bool


def load_model_head(path_or_repo_id: str = DEFAULT_MODEL, *, revision: str | None = None) -> ModelHead:
  """The tokenizer and noise schedule of a model, without loading (or downloading) any weights.

  The command line checks prompts, edit words and the t range with these before `load_model`.

  Args:
    path_or_repo_id: as `load_model`.
    revision: hub revision, for repo ids.

  Returns:
    `ModelHead`.

  Raises:
    ModelLoadError: as `load_model`, for the tokenizer and scheduler files.
  """
  if path_or_repo_id == TINY_RANDOM:
    from lusd_jax import tiny

    schedule = schedule_lib.Schedule.from_dict(tiny.SD1_SCHEDULER)
    return ModelHead(TINY_RANDOM, tokenizer_lib.bundled_tokenizer(), schedule, True)
  path = os.path.expanduser(os.fspath(path_or_repo_id))
  if os.path.isfile(os.path.join(path, CONVERTED_MARKER)):
    meta = _read_json(os.path.join(path, CONVERTED_MARKER))
    try:
      schedule = schedule_lib.Schedule.from_dict(meta["configs"]["schedule"])
    except (KeyError, ValueError, TypeError) as e:
      raise ModelLoadError(f"{os.path.join(path, CONVERTED_MARKER)}: {e}") from None
    tok = tokenizer_lib.load_tokenizer(os.path.join(path, "tokenizer"))
    return ModelHead(path_or_repo_id, tok, schedule, False)
  if not os.path.isdir(path):
    if os.path.exists(path):
      return load_model(path_or_repo_id)  # raises the file error of load_model
    path = _download(path_or_repo_id, revision, _HUB_PATTERNS[:3])
  for sub in ("tokenizer", "scheduler"):
    if not os.path.isdir(os.path.join(path, sub)):
      raise ModelLoadError(
        f"missing folder {os.path.join(path, sub)} (expected a diffusers Stable Diffusion folder)"
      )
  return ModelHead(path_or_repo_id, _load_tokenizer(path), _load_schedule(path), False)


# ----------------------------------------------------------------------------- CLIP (evaluation)

# The evaluator's CLIP is read here, beside the Stable Diffusion files, so that `models/clip.py`
# imports no loader (models sit below loading); it turns what is read into a model.
CLIPLoadError = clip_lib.CLIPLoadError
DEFAULT_CLIP = clip_lib.DEFAULT_CLIP


def load_clip_folder(folder: str | os.PathLike, name: str | None = None) -> clip_lib.CLIP:
  """Loads a transformers `CLIPModel` folder (`config.json`, `model.safetensors`, tokenizer files).

  The tokenizer comes from the folder's `vocab.json` / `merges.txt`, else the bundled CLIP BPE.

  Raises:
    CLIPLoadError: naming the missing file or the key that does not fit.
  """
  folder = os.fspath(folder)
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise CLIPLoadError(f"missing file {config_path} (expected a transformers CLIPModel folder)")
  try:
    with open(config_path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise CLIPLoadError(f"{config_path} is not valid JSON: {e}") from None
  if raw.get("model_type", "clip") != "clip":  # before reading (maybe gigabytes of) weights
    raise CLIPLoadError(f"{config_path}: model_type {raw.get('model_type')!r} is not a CLIPModel ('clip').")
  try:
    state_dict, source = read_state_dict(folder, "model")
  except ModelLoadError as e:
    raise CLIPLoadError(str(e)) from None
  has_vocab = all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt"))
  tok = tokenizer_lib.load_tokenizer(folder) if has_vocab else tokenizer_lib.bundled_tokenizer()
  return clip_lib.clip_from_state_dict(
    raw, state_dict, tok, name or folder, config_source=config_path, source=source
  )


def load_clip(path_or_repo_id: str = DEFAULT_CLIP, *, revision: str | None = None) -> clip_lib.CLIP:
  """Loads CLIP for the evaluation metrics.

  Args:
    path_or_repo_id: a local transformers `CLIPModel` folder, a Hugging Face repo id (downloaded with
      `huggingface_hub` when a network is there; default OpenAI's ViT-B/32), or "tiny-random".
    revision: hub revision, for repo ids.

  Returns:
    `CLIP` (`lusd_jax.models.clip`) with `embed_images` / `embed_texts`.

  Raises:
    CLIPLoadError: naming the missing folder / file / key.

  Example:
    >>> clip = load_clip("openai/clip-vit-base-patch32")
    >>> clip.embed_texts(["a photo of a cat"]).shape  # (1, 512)
  """
  if path_or_repo_id == clip_lib.TINY_RANDOM:
    return clip_lib.tiny_random_clip()
  path = os.path.expanduser(os.fspath(path_or_repo_id))
  if os.path.isdir(path):
    return load_clip_folder(path)
  if os.path.exists(path) or not _looks_like_repo_id(path_or_repo_id):
    raise CLIPLoadError(
      f"CLIP model {path_or_repo_id!r}: not a transformers CLIPModel folder, and not a Hugging Face repo id (owner/name)."
    )
  try:
    from huggingface_hub import snapshot_download

    files = ["config.json", "vocab.json", "merges.txt", "tokenizer_config.json"]
    local = snapshot_download(
      path_or_repo_id, revision=revision, allow_patterns=[*files, "model.safetensors"]
    )
    if not os.path.isfile(os.path.join(local, "model.safetensors")):
      # Older repos hold only PyTorch pickles (reading them needs torch).
      local = snapshot_download(
        path_or_repo_id, revision=revision, allow_patterns=[*files, "pytorch_model.bin"]
      )
  except Exception as e:  # noqa: BLE001 - network, auth, unknown repo: one clear line
    first = str(e).splitlines()[0] if str(e) else ""
    raise CLIPLoadError(
      f"CLIP model {path_or_repo_id!r}: not a local folder, and downloading it from the Hugging Face hub failed "
      f"({type(e).__name__}: {first}). Pass a local CLIPModel folder (config.json + model.safetensors), or "
      "--clip tiny-random to try the evaluator."
    ) from None
  return load_clip_folder(local, name=path_or_repo_id)


# ----------------------------------------------------------------------------- DINO (evaluation)

DinoLoadError = dino_lib.DinoLoadError


def load_dino(
  name_or_path: str = dino_lib.DEFAULT_DINO, dtype: str = "float32", *, revision: str | None = None
) -> dino_lib.Dino:
  """Loads DINO ViT for the structure distance (`lusd_jax.models.dino.structure_distance`).

  Args:
    name_or_path: a local transformers `ViTModel` folder (`config.json` + `model.safetensors` or
      `pytorch_model.bin`), a Hugging Face repo id (default facebook/dino-vitb8; downloaded when a
      network is there), or "tiny-random".
    dtype: "float32" (default), "bfloat16" or "float16".
    revision: hub revision, for repo ids.

  Raises:
    DinoLoadError: naming the missing folder / file / key.
  """
  if name_or_path == dino_lib.TINY_RANDOM:
    return dino_lib.tiny_random_dino()
  path = os.path.expanduser(os.fspath(name_or_path))
  name = name_or_path
  if not os.path.isdir(path):
    if os.path.exists(path) or not _looks_like_repo_id(name_or_path):
      raise DinoLoadError(
        f"DINO model {name_or_path!r}: not a transformers ViTModel folder, and not a Hugging Face repo id (owner/name)."
      )
    try:
      from huggingface_hub import snapshot_download

      path = snapshot_download(
        name_or_path, revision=revision, allow_patterns=["config.json", "model.safetensors"]
      )
      if not os.path.isfile(os.path.join(path, "model.safetensors")):  # older repos: PyTorch pickles only
        path = snapshot_download(
          name_or_path, revision=revision, allow_patterns=["config.json", "pytorch_model.bin"]
        )
    except Exception as e:  # noqa: BLE001 - network, auth, unknown repo: one clear line
      first = str(e).splitlines()[0] if str(e) else ""
      raise DinoLoadError(
        f"DINO model {name_or_path!r}: not a local folder, and downloading it from the Hugging Face hub failed "
        f"({type(e).__name__}: {first}). Pass a local ViTModel folder, or tiny-random."
      ) from None
  config_path = os.path.join(path, "config.json")
  try:
    raw = _read_json(config_path)
    if raw.get("model_type", "vit") != "vit":  # before reading the weights
      raise DinoLoadError(f"{config_path}: model_type {raw.get('model_type')!r} is not a ViTModel ('vit').")
    state_dict, source = read_state_dict(path, "model")
  except ModelLoadError as e:
    raise DinoLoadError(str(e)) from None
  return dino_lib.dino_from_state_dict(
    raw, state_dict, name, dtype=dtype, config_source=config_path, source=source
  )
