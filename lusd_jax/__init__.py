"""lusd-jax: LUSD text-guided image editing on Stable Diffusion, in JAX/Flax."""

__version__ = "0.1.0"
