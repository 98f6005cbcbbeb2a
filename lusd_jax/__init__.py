"""lusd-jax: LUSD and UnifyEdit text-guided image editing on Stable Diffusion, in JAX/Flax.

model = lusd_jax.load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
res = lusd_jax.edit(model, "cat.png", "a cat", "a cat wearing a party hat", seeds=[0, 1, 2])
res = lusd_jax.edit(model, "car.png", "a red car", "a blue car", config=lusd_jax.UnifyEditConfig.preset("color"),
                    mask="mask.png", edit_words="blue")
"""

from lusd_jax import prompts
from lusd_jax.loading import ModelLoadError, SDModel, load_model
from lusd_jax.lusd.config import LUSDConfig
from lusd_jax.pipeline import EditJob, EditResult, edit, edit_many
from lusd_jax.sweeps import SweepResult, sweep
from lusd_jax.unifyedit.config import UnifyEditConfig
from lusd_jax.version import __version__

__all__ = [
  "EditJob",
  "EditResult",
  "LUSDConfig",
  "ModelLoadError",
  "SDModel",
  "SweepResult",
  "UnifyEditConfig",
  "__version__",
  "edit",
  "edit_many",
  "load_model",
  "prompts",
  "sweep",
]
