"""Pallas kernels, each with a plain-jnp reference beside it.

`attention_with_map`: flash attention that also returns the head-mean probability map of a batch
slice, differentiable through both (`attention.py`). `block_sizes` picks tiles per backend (Triton on
GPU, Mosaic on TPU); on CPU the kernels run in Pallas' interpreter.

`lusd_jax.models.attention` registers `attention_with_map` as the "pallas" attention implementation;
its "auto" gives it the U-Net's captured head-mean layers on GPU and TPU. Kernels import nothing
from the models (the registry imports them).
"""

from lusd_jax.kernels.attention import (
  BlockSizes,
  attention_with_map,
  block_sizes,
  reference_attention_with_map,
)

__all__ = ["BlockSizes", "attention_with_map", "block_sizes", "reference_attention_with_map"]
