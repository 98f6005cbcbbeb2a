"""lusd-jax: LUSD text-guided image editing on Stable Diffusion, in JAX/Flax.

model = lusd_jax.load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
res = lusd_jax.edit(model, "cat.png", "a cat", "a cat wearing a party hat", seeds=[0, 1, 2])
"""

__version__ = "0.1.0"

from lusd_jax import prompts  # noqa: E402
from lusd_jax.loading import ModelLoadError, SDModel, load_model  # noqa: E402
from lusd_jax.lusd.config import LUSDConfig  # noqa: E402
from lusd_jax.pipeline import EditJob, EditResult, edit, edit_many  # noqa: E402
from lusd_jax.sweeps import SweepResult, sweep  # noqa: E402

__all__ = [
  "EditJob",
  "EditResult",
  "LUSDConfig",
  "ModelLoadError",
  "SDModel",
  "SweepResult",
  "edit",
  "edit_many",
  "load_model",
  "prompts",
  "sweep",
]
