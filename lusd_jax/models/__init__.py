"""Flax models of Stable Diffusion: U-Net (with attention capture), VAE and CLIP text encoder."""
