"""Qwen2.5-VL in Flax Linen, with 4DThinker latent-imagery inputs."""

from fourd_jax.model.config import ModelConfig, TextConfig, VisionConfig, qwen25vl_3b, qwen25vl_7b, tiny
from fourd_jax.model.rope import get_rope_index
from fourd_jax.model.text import KVCache, init_kv_cache
from fourd_jax.model.vlm import (
    ModelOutput,
    PreparedInputs,
    Qwen25VL,
    VisionInputs,
    abstract_params,
    encode_vision,
    forward,
    init_params,
    prepare_inputs,
    prepare_vision,
)

__all__ = [
    "KVCache", "ModelConfig", "ModelOutput", "PreparedInputs", "Qwen25VL", "TextConfig", "VisionConfig",
    "VisionInputs", "abstract_params", "encode_vision", "forward", "get_rope_index", "init_kv_cache", "init_params",
    "prepare_inputs", "prepare_vision", "qwen25vl_3b", "qwen25vl_7b", "tiny",
]
