"""sdjax: a JAX/Flax, TPU-first trainer for Stable Diffusion."""

__version__ = "0.1.0"
