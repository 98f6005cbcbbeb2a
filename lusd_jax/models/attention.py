"""Multi-head attention shared by the U-Net, the VAE and the CLIP text encoder.

Two paths with one meaning: `dot_product_attention` picks the fastest path JAX offers
(`jax.nn.dot_product_attention`, cuDNN flash attention on GPU where it applies) for layers whose
maps nobody reads; `attention_with_probs` computes the softmax probabilities explicitly and returns
them, for the layers whose maps are captured. Both take and return `[B, T, N, H]` tensors
(batch, query tokens, heads, head dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "reference")


def attention_with_probs(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = False, upcast: bool = True):
  """Explicit softmax attention; returns (out_BTNH, probs_BNTS).

  `upcast` computes scores and softmax in float32 whatever the input dtype (diffusers'
  `upcast_attention` / `upcast_softmax`).
  """
  scale = q_BTNH.shape[-1] ** -0.5
  dtype = jnp.float32 if upcast else q_BTNH.dtype
  scores_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH.astype(dtype), k_BSNH.astype(dtype)) * scale
  if causal:
    t, s = scores_BNTS.shape[-2:]
    mask_TS = jnp.tril(jnp.ones((t, s), dtype=bool))
    scores_BNTS = jnp.where(mask_TS, scores_BNTS, jnp.finfo(dtype).min)
  probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
  out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS.astype(v_BSNH.dtype), v_BSNH)
  return out_BTNH, probs_BNTS


def dot_product_attention(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = False, impl: str = "xla"):
  """Attention without returning probabilities, through the fastest available path.

  Args:
    impl: "xla" (XLA's fused softmax attention), "cudnn" (flash attention on NVIDIA GPUs; needs
      fp16/bf16 and a supported head dim), or "reference" (explicit softmax, for debugging).
  """
  if impl == "reference":
    return attention_with_probs(q_BTNH, k_BSNH, v_BSNH, causal=causal)[0]
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
  return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=causal, implementation=impl)
