"""LUSD's optimization on latents and text embeddings (paper Sec. 3-4, Algorithms 1-2).

`config` holds the hyperparameters, `gradients` the score-distillation gradients (SBP, DDS, SDS),
`mask` the attention mask (Alg. 2), `core` the optimization (Alg. 1) as the engine's `LUSD` method.
"""

from lusd_jax.lusd.config import GRADIENTS, LUSDConfig, LUSDNumeric, LUSDStatic, stack_numeric
from lusd_jax.lusd.core import (
  LUSD,
  EditInputs,
  EditOutput,
  EditState,
  FlaxUNet,
  NonFiniteError,
  StepStats,
  default_noise,
  edit_latents,
  init_state,
  optimize,
  optimize_batch,
  run_steps,
)
from lusd_jax.lusd.mask import attention_mask, bicubic_resize

__all__ = [
  "GRADIENTS",
  "EditInputs",
  "EditOutput",
  "EditState",
  "FlaxUNet",
  "LUSD",
  "LUSDConfig",
  "LUSDNumeric",
  "LUSDStatic",
  "NonFiniteError",
  "StepStats",
  "attention_mask",
  "bicubic_resize",
  "default_noise",
  "edit_latents",
  "init_state",
  "optimize",
  "optimize_batch",
  "run_steps",
  "stack_numeric",
]
