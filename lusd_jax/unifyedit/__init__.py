"""UnifyEdit (Mao et al., "Tuning-Free Image Editing with Fidelity and Editability via Unified Latent
Diffusion Model"): attention-constrained latent optimization with an adaptive time-step scheduler.

`config` holds the hyperparameters and presets, `losses` the two constraints and the scheduler
(Eq. 7-16), `core` the denoising phase as the engine's `UnifyEdit` method, and `pipeline` the edit a
user asks for (`lusd_jax.unifyedit.edit`, the same as `lusd_jax.edit(..., config=UnifyEditConfig...)`).
"""

from lusd_jax.unifyedit.config import (
  EDIT_TYPES,
  GRADIENTS,
  UnifyEditConfig,
  UnifyEditNumeric,
  UnifyEditStatic,
  stack_numeric,
)
from lusd_jax.unifyedit.core import UnifyEdit, UnifyInputs, UnifyState, UnifyStats, word_weights

__all__ = [
  "EDIT_TYPES",
  "GRADIENTS",
  "UnifyEdit",
  "UnifyEditConfig",
  "UnifyEditNumeric",
  "UnifyEditStatic",
  "UnifyInputs",
  "UnifyState",
  "UnifyStats",
  "edit",
  "stack_numeric",
  "word_weights",
]


def __getattr__(name: str):
  # `edit` loads images and models (the pipeline's floor, above this package's algorithm modules):
  # imported on first use, so that importing the method never imports the pipeline.
  if name == "edit":
    from lusd_jax.unifyedit.pipeline import edit

    return edit
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
