"""Qwen3-VL configuration: vision tower, decoder and the complete network, with presets.

Host-only (no JAX), like `fourd_jax.model.config`. Attribute names follow the Qwen2.5-VL configs
wherever the meaning is the same (`text.num_layers`, `text.head_dim`, `vision.spatial_merge_size`,
`param_dtype`, ...), so the shared decoder, KV cache, sampler and position code read either.
Presets: the published 2B / 4B / 8B Instruct configs (their config.json files) and `tiny` for tests.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fourd_jax.errors import InputError
from fourd_jax.model.config import NetworkConfig


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig:
    """The Qwen3-VL vision tower: LayerNorm ViT with learned + 2D rotary positions, a 2x2 merger
    and DeepStack mergers after some blocks."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 4096
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304  # a square grid of learned positions (48 x 48)
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # hard-coded in the reference blocks and mergers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * P * P (1536 for Qwen3-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def position_grid_side(self) -> int:
        """Side of the square table of learned position embeddings."""
        return int(self.num_position_embeddings**0.5)

    @property
    def num_deepstack(self) -> int:
        return len(self.deepstack_visual_indexes)


@dataclasses.dataclass(frozen=True)
class Qwen3TextConfig:
    """The Qwen3 decoder: GQA without biases, QK-norm, interleaved M-RoPE, free head_dim."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 5e6
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    # What the shared decoder layer and M-RoPE read (fourd_jax.model.text / rope).
    attention_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = True
    mrope_interleaved: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(NetworkConfig):
    """A complete Qwen3-VL network with the latent-imagery tokens and a dtype policy."""

    text: Qwen3TextConfig = Qwen3TextConfig()
    vision: Qwen3VisionConfig = Qwen3VisionConfig()
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    pad_token_id: int | None = None
    latent_start_token_id: int | None = None
    latent_pad_token_id: int | None = None
    latent_end_token_id: int | None = None
    initializer_range: float = 0.02
    # Numerics and execution (not part of the checkpoint), as in ModelConfig.
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"
    attention_block: int = 0
    scan_layers: bool = True  # False: the unrolled decoder the sampler's token loop runs (ModelConfig)
    # Every Qwen3-VL vision block has one temporal patch, so text after it resumes at its largest
    # position + 1, which is also transformers' start + max(h, w) / merge: the two modes agree.
    mrope_text_start: ClassVar[str] = "max_position"

    def __post_init__(self) -> None:
        t, v = self.text, self.vision
        problems = []
        if v.position_grid_side**2 != v.num_position_embeddings:
            problems.append(f"vision.num_position_embeddings {v.num_position_embeddings} is not a square")
        if any(i < 0 or i >= v.depth for i in v.deepstack_visual_indexes):
            problems.append(f"vision.deepstack_visual_indexes {v.deepstack_visual_indexes} fall outside depth "
                            f"{v.depth}")
        if v.num_deepstack > t.num_layers:
            problems.append(f"{v.num_deepstack} DeepStack features need as many decoder layers, not {t.num_layers}")
        problems += self.shared_problems()
        if problems:
            raise InputError("Invalid Qwen3-VL config: " + "; ".join(problems) + ".")

    @classmethod
    def from_dict(cls, d: dict) -> Qwen3VLConfig:
        """Rebuild a config from `to_dict` output; unknown fields are errors."""
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"Qwen3-VL config has unknown field(s) {unknown}.")
        text = dict(d.pop("text", {}))
        vision = dict(d.pop("vision", {}))
        if "mrope_section" in text:
            text["mrope_section"] = tuple(text["mrope_section"])
        if "deepstack_visual_indexes" in vision:
            vision["deepstack_visual_indexes"] = tuple(vision["deepstack_visual_indexes"])
        return cls(text=Qwen3TextConfig(**text), vision=Qwen3VisionConfig(**vision), **d)


# The published dense Instruct configs (Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json): rope_theta
# 5e6, mrope_section (24, 20, 20) interleaved, head_dim 128, GQA with 8 KV heads, 262144 positions.
_TEXT = dict(vocab_size=151936, num_kv_heads=8, head_dim=128, rope_theta=5e6, mrope_section=(24, 20, 20),
             rms_norm_eps=1e-6, max_position_embeddings=262144)
_SMALL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                     deepstack_visual_indexes=(5, 11, 17))


def qwen3vl_2b(**overrides) -> Qwen3VLConfig:
    """Qwen3-VL-2B-Instruct: tied embeddings, 28 layers of width 2048, GQA 16/8."""
    return Qwen3VLConfig(
        text=Qwen3TextConfig(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, **_TEXT),
        vision=Qwen3VisionConfig(out_hidden_size=2048, **_SMALL_VISION),
        tie_word_embeddings=True, **overrides,
    )


def qwen3vl_4b(**overrides) -> Qwen3VLConfig:
    """Qwen3-VL-4B-Instruct: tied embeddings, 36 layers of width 2560, GQA 32/8."""
    return Qwen3VLConfig(
        text=Qwen3TextConfig(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, **_TEXT),
        vision=Qwen3VisionConfig(out_hidden_size=2560, **_SMALL_VISION),
        tie_word_embeddings=True, **overrides,
    )


def qwen3vl_8b(**overrides) -> Qwen3VLConfig:
    """Qwen3-VL-8B-Instruct: untied embeddings, 36 layers of width 4096, GQA 32/8, a 27-block tower."""
    return Qwen3VLConfig(
        text=Qwen3TextConfig(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, **_TEXT),
        vision=Qwen3VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                 out_hidden_size=4096, deepstack_visual_indexes=(8, 16, 24)),
        tie_word_embeddings=False, **overrides,
    )


def tiny(vocab_size: int = 512, **overrides) -> Qwen3VLConfig:
    """A small network with every architectural feature (head_dim != hidden / heads, DeepStack into
    the first two of three layers, a 6x6 learned position grid), for tests."""
    text = Qwen3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=24, rope_theta=10000.0, mrope_section=(4, 4, 4),
        max_position_embeddings=4096,
    )
    vision = Qwen3VisionConfig(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        num_position_embeddings=36, deepstack_visual_indexes=(0, 2),
    )
    base = dict(
        text=text, vision=vision, tie_word_embeddings=True,
        vision_start_token_id=vocab_size - 8, vision_end_token_id=vocab_size - 7,
        image_token_id=vocab_size - 6, video_token_id=vocab_size - 5,
        bos_token_id=vocab_size - 4, eos_token_id=vocab_size - 3, pad_token_id=vocab_size - 4,
    )
    base.update(overrides)
    return Qwen3VLConfig(**base)


PRESETS = {"qwen3vl_tiny": tiny, "qwen3vl_2b": qwen3vl_2b, "qwen3vl_4b": qwen3vl_4b, "qwen3vl_8b": qwen3vl_8b}
