"""fourd_jax: a JAX/Flax, TPU-native 4DThinker (VLMs that think with 4D imagery)."""

from fourd_jax.convert import hf

__all__ = ["hf"]
__version__ = "0.1.0"
