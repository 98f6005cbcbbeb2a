"""Checkpoint conversion: diffusers folders / single-file SD checkpoints -> lusd-jax's format."""
