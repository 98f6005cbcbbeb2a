"""Tiny random Stable Diffusion checkpoints in the exact diffusers layout, built with PyTorch.

Real SD weights cannot be downloaded here, so the tests build checkpoints with diffusers /
transformers (CPU), perturb every parameter so that no layer is zero or one, and `save_pretrained`
them. The project then loads those folders exactly as it would load a real checkpoint.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from lusd_jax import tokenizer as tok
from lusd_jax.tiny import SD1_SCHEDULER, TINY_SD1_TEXT, TINY_SD1_UNET, TINY_VAE  # noqa: E402

# SD2.x shape: linear projections, per-block head counts, upcast attention, v-prediction schedule.
TINY_SD2_UNET = dict(
  TINY_SD1_UNET,
  cross_attention_dim=48,
  attention_head_dim=(2, 4, 8, 8),
  use_linear_projection=True,
  upcast_attention=True,
  layers_per_block=2,
)

# SD1.5's real U-Net architecture (used with random weights at a 32x32 latent).
SD15_UNET = dict(
  sample_size=64,
  in_channels=4,
  out_channels=4,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  block_out_channels=(320, 640, 1280, 1280),
  layers_per_block=2,
  cross_attention_dim=768,
  attention_head_dim=8,
)

TINY_SD2_TEXT = dict(
  TINY_SD1_TEXT, hidden_size=48, intermediate_size=96, num_attention_heads=6, hidden_act="gelu"
)


def torch_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
  """A PyTorch module's state dict as float32 numpy arrays (what `params_from_torch` takes)."""
  return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
  """Adds noise to every parameter so that no weight is a constant (ones, zeros)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
  return module.eval()


def tiny_unet(style: str = "sd1", seed: int = 0):
  from diffusers import UNet2DConditionModel

  cfg = {"sd1": TINY_SD1_UNET, "sd2": TINY_SD2_UNET, "sd15": SD15_UNET}[style]
  torch.manual_seed(seed)
  return perturb_(UNet2DConditionModel(**cfg), seed + 1)


# Two blocks (one cross-attention level down and up, plus the middle block): about half the ops of
# TINY_SD1_UNET, so programs that differentiate or vmap it compile in less time. For tests of the
# math around the U-Net (inversion, sampling), which does not depend on its depth.
TWO_BLOCK_UNET = dict(
  TINY_SD1_UNET,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  block_out_channels=(32, 32),
)


def two_block_unet(seed: int = 0):
  """`tiny_unet` with `TWO_BLOCK_UNET`'s config (perturbed random weights)."""
  from diffusers import UNet2DConditionModel

  torch.manual_seed(seed)
  return perturb_(UNet2DConditionModel(**TWO_BLOCK_UNET), seed + 1)


def tiny_vae(seed: int = 0):
  from diffusers import AutoencoderKL

  torch.manual_seed(seed)
  return perturb_(AutoencoderKL(**TINY_VAE), seed + 1)


def tiny_text_encoder(style: str = "sd1", seed: int = 0):
  from transformers import CLIPTextConfig, CLIPTextModel

  torch.manual_seed(seed)
  cfg = CLIPTextConfig(**(TINY_SD1_TEXT if style == "sd1" else TINY_SD2_TEXT))
  return perturb_(CLIPTextModel(cfg), seed + 1)


def build_tiny_pipeline_folder(folder: str | os.PathLike, style: str = "sd1", seed: int = 0) -> str:
  """Writes a complete diffusers SD folder (model_index.json, unet/, vae/, text_encoder/, ...)."""
  from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

  folder = os.fspath(folder)
  tok_dir = os.path.join(folder, "_tok_src")
  tok.write_tokenizer_files(tok_dir, pad_token="<|endoftext|>" if style == "sd1" else "!")
  tokenizer = tok.load_tokenizer(tok_dir)
  if style == "sd1":
    scheduler = PNDMScheduler(**SD1_SCHEDULER)
  else:
    sched = {k: v for k, v in SD1_SCHEDULER.items() if k != "skip_prk_steps"}
    scheduler = DDIMScheduler(**sched, prediction_type="v_prediction", clip_sample=False)
  pipe = StableDiffusionPipeline(
    vae=tiny_vae(seed),
    text_encoder=tiny_text_encoder(style, seed),
    tokenizer=tokenizer,
    unet=tiny_unet(style, seed),
    scheduler=scheduler,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.save_pretrained(folder, safe_serialization=True)
  if style == "sd1":
    _as_published_sd_layout(folder, tok_dir)
  shutil.rmtree(tok_dir)
  return folder


def _as_published_sd_layout(folder: str, tok_dir: str) -> None:
  """Rewrites what transformers 5 saves into the layout of the checkpoints published on the hub.

  transformers 5 writes `tokenizer/tokenizer.json` and text-encoder keys without the `text_model.`
  prefix; the published SD folders hold `vocab.json` + `merges.txt` and prefixed keys. The SD1 test
  folder uses the published layout, the SD2 one keeps transformers 5's, so both are loaded in tests.
  """
  from safetensors.numpy import load_file, save_file

  tok_out = os.path.join(folder, "tokenizer")
  os.remove(os.path.join(tok_out, "tokenizer.json"))
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(tok_dir, name), os.path.join(tok_out, name))
  path = os.path.join(folder, "text_encoder", "model.safetensors")
  sd = load_file(path)
  save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}, path)


def attention_with_probs(attn, hidden_states, encoder_hidden_states=None):
  """diffusers `AttnProcessor` math of one attention layer, with its softmax probabilities.

  Returns:
    (probs [B, heads, T, S] torch, keeping the autograd graph; the layer's output [B, T, C]).
  """
  context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
  b, t, _ = hidden_states.shape
  q = attn.head_to_batch_dim(attn.to_q(hidden_states))
  k = attn.head_to_batch_dim(attn.to_k(context))
  v = attn.head_to_batch_dim(attn.to_v(context))
  probs = attn.get_attention_scores(q, k, None)  # [B * heads, T, S]
  out = attn.batch_to_head_dim(torch.bmm(probs, v))
  return probs.reshape(b, attn.heads, t, -1), attn.to_out[1](attn.to_out[0](out))
