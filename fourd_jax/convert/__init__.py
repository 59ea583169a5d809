"""Checkpoint conversion at the project's edge (Hugging Face safetensors <-> JAX)."""
