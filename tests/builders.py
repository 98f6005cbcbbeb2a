"""Tiny random Stable Diffusion checkpoints in the exact diffusers layout, built with PyTorch.

Real SD weights cannot be downloaded here, so the tests build checkpoints with diffusers /
transformers (CPU), perturb every parameter so that no layer is zero or one, and `save_pretrained`
them. The project then loads those folders exactly as it would load a real checkpoint.
"""

from __future__ import annotations

import os

import torch

from lusd_jax import tokenizer as tok

# SD1.x shape: 4 blocks like SD1.5 (attention at 1, 1/2, 1/4 of the latent; plain last block),
# `attention_head_dim` as a single int meaning the number of heads (diffusers' legacy naming).
TINY_SD1_UNET = dict(
  sample_size=16,
  in_channels=4,
  out_channels=4,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  block_out_channels=(32, 32, 64, 64),
  layers_per_block=1,
  norm_num_groups=8,
  cross_attention_dim=32,
  attention_head_dim=4,
)

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

# Four blocks: the latent is 1/8 of the image, as in every SD VAE.
TINY_VAE = dict(
  in_channels=3,
  out_channels=3,
  down_block_types=("DownEncoderBlock2D",) * 4,
  up_block_types=("UpDecoderBlock2D",) * 4,
  block_out_channels=(16, 32, 32, 32),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=8,
  sample_size=64,
)

TINY_SD1_TEXT = dict(
  vocab_size=49408,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  bos_token_id=49406,
  eos_token_id=49407,
  pad_token_id=1,
)
TINY_SD2_TEXT = dict(
  TINY_SD1_TEXT, hidden_size=48, intermediate_size=96, num_attention_heads=6, hidden_act="gelu"
)

SD1_SCHEDULER = dict(
  num_train_timesteps=1000,
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  steps_offset=1,
  skip_prk_steps=True,
  set_alpha_to_one=False,
)


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
  import shutil

  shutil.rmtree(tok_dir)
  return folder
