"""Model configuration: the Qwen2.5-VL architecture plus this project's numerics and latent tokens.

One frozen dataclass tree describes a network completely, so it can be hashed, compared and used
as a static argument of `jax.jit`. Conversion to and from a `transformers` config lives in
`fourd_jax.convert.hf`; presets for the published sizes live here.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import ml_dtypes
import numpy as np

from fourd_jax.errors import InputError

# How text positions continue after an image or video in M-RoPE:
#   "max_position": next text position = largest vision position + 1 (Qwen's reference code and
#       transformers < 5.3; the released checkpoints were trained this way).
#   "spatial_extent": next text position = vision start + max(grid_h, grid_w) / merge
#       (transformers 5.3 - 5.23). Identical for images; differs for videos whose temporal
#       positions run past their spatial extent.
MropeTextStart = Literal["max_position", "spatial_extent"]

# The dtypes a config may name, as numpy dtypes (what `jnp.dtype` gives for these names).
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}

REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2.5-VL vision tower (ViT with window attention and a 2x2 patch merger)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # hard-coded in the reference vision blocks and merger

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * P * P (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_units(self) -> int:
        """Side of an attention window, in merged units (112 px / 14 / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_len(self) -> int:
        """Patches in one (padded) attention window: (window_units * merge)^2 = 64."""
        return (self.window_units * self.spatial_merge_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with M-RoPE."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128000
    # Read by the shared decoder layer and M-RoPE (Qwen3-VL's decoder sets them the other way).
    attention_bias: ClassVar[bool] = True
    qk_norm: ClassVar[bool] = False
    mrope_interleaved: ClassVar[bool] = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class NetworkConfig:
    """What the complete config of every family shares: dtype lookups, the checks of the parts all
    families have, copies and dicts. Each family's config is a frozen dataclass with `text` and
    `vision` parts and the fields param_dtype, dtype, remat_policy, attention_block and the latent
    token ids."""

    def shared_problems(self) -> list[str]:
        """What is wrong with the parts every family has (decoder heads and M-RoPE, vision heads, the
        merger's width, numerics and execution), one phrase each."""
        t, v = self.text, self.vision
        problems = []
        if t.num_heads % t.num_kv_heads:
            problems.append(f"text.num_heads {t.num_heads} is not divisible by num_kv_heads {t.num_kv_heads}")
        if sum(t.mrope_section) * 2 != t.head_dim:
            problems.append(f"text.mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads:
            problems.append(f"vision.hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
        if v.head_dim % 4:
            problems.append(f"vision head_dim {v.head_dim} must be divisible by 4 for the 2D rotary")
        if v.out_hidden_size != t.hidden_size:
            problems.append(f"vision.out_hidden_size {v.out_hidden_size} must equal text.hidden_size {t.hidden_size}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in tuple(DTYPES):
                problems.append(f"{name} must be float32, bfloat16 or float16, not {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy must be one of {REMAT_POLICIES}, not {self.remat_policy!r}")
        if self.attention_block < 0:
            problems.append(f"attention_block must be 0 (off) or a positive block size, not {self.attention_block}")
        return problems

    @property
    def jnp_param_dtype(self) -> np.dtype:
        return DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def latent_token_ids(self) -> tuple[int, int, int] | None:
        ids = (self.latent_start_token_id, self.latent_pad_token_id, self.latent_end_token_id)
        return None if any(i is None for i in ids) else ids  # type: ignore[return-value]

    def replace(self, **changes) -> NetworkConfig:  # the same class as self
        """A copy with top-level fields changed (use `dataclasses.replace` on `text`/`vision`)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (inverse of `from_dict`)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelConfig(NetworkConfig):
    """A complete Qwen2.5-VL network with the latent-imagery tokens and a dtype policy."""

    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    pad_token_id: int | None = None
    # 4DThinker latent imagery tokens (SPEC 3.1); None until a tokenizer is grown.
    latent_start_token_id: int | None = None
    latent_pad_token_id: int | None = None
    latent_end_token_id: int | None = None
    initializer_range: float = 0.02
    # Numerics and execution (not part of the checkpoint).
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"
    # Decoder queries attended per block (layers.attention); 0 = all at once. Blocks bound the
    # attention memory by L x block instead of L^2: set it for sequences of thousands of tokens.
    attention_block: int = 0
    # True: the decoder layers' parameters are stacked and run by one scanned layer (training, prefill;
    # one compiled layer). False: one module per layer, unrolled (`text.unstack_layers` converts the
    # parameters), what the sampler's token loop runs: a scanned layer copies its weights out of the
    # stack at every step, which doubles the bytes a weight-streaming decode step reads.
    scan_layers: bool = True
    mrope_text_start: MropeTextStart = "max_position"

    def __post_init__(self) -> None:
        t, v = self.text, self.vision
        problems = []
        if t.hidden_size % t.num_heads:
            problems.append(f"text.hidden_size {t.hidden_size} is not divisible by num_heads {t.num_heads}")
        if v.window_units < 1 or v.window_size % (v.spatial_merge_size * v.patch_size):
            problems.append(
                f"vision.window_size {v.window_size} must be a positive multiple of "
                f"patch_size * spatial_merge_size = {v.patch_size * v.spatial_merge_size}"
            )
        if any(i < 0 or i >= v.depth for i in v.fullatt_block_indexes):
            problems.append(f"vision.fullatt_block_indexes {v.fullatt_block_indexes} fall outside depth {v.depth}")
        problems += self.shared_problems()
        if self.mrope_text_start not in ("max_position", "spatial_extent"):
            problems.append(
                f"mrope_text_start must be 'max_position' or 'spatial_extent', not {self.mrope_text_start!r}"
            )
        if problems:
            raise InputError("Invalid model config: " + "; ".join(problems) + ".")

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Rebuild a config from `to_dict` output; unknown or missing fields are errors."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise InputError(f"Model config has unknown field(s) {unknown}.")
        text = dict(d.pop("text", {}))
        vision = dict(d.pop("vision", {}))
        text["mrope_section"] = tuple(text.get("mrope_section", TextConfig.mrope_section))
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = tuple(vision["fullatt_block_indexes"])
        return cls(text=TextConfig(**text), vision=VisionConfig(**vision), **d)


def qwen25vl_3b(**overrides) -> ModelConfig:
    """Qwen2.5-VL-3B-Instruct (SPEC 2): tied embeddings, 36 layers, GQA 16/2."""
    return ModelConfig(
        text=TextConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
            num_heads=16, num_kv_heads=2,
        ),
        vision=VisionConfig(out_hidden_size=2048),
        tie_word_embeddings=True,
        **overrides,
    )


def qwen25vl_7b(**overrides) -> ModelConfig:
    """Qwen2.5-VL-7B-Instruct (SPEC 2): untied embeddings, 28 layers, GQA 28/4."""
    return ModelConfig(
        text=TextConfig(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
            num_heads=28, num_kv_heads=4,
        ),
        vision=VisionConfig(out_hidden_size=3584),
        tie_word_embeddings=False,
        **overrides,
    )


def tiny(vocab_size: int = 512, **overrides) -> ModelConfig:
    """A small network with every architectural feature, for tests and the CPU demo.

    Special token ids sit at the top of the vocabulary, as in Qwen.
    """
    text = TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, rope_theta=10000.0, mrope_section=(2, 3, 3),
        rms_norm_eps=1e-6, max_position_embeddings=4096,
    )
    vision = VisionConfig(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        fullatt_block_indexes=(1, 3), window_size=56, tokens_per_second=2,
    )
    base = dict(
        text=text, vision=vision, tie_word_embeddings=True,
        vision_start_token_id=vocab_size - 8, vision_end_token_id=vocab_size - 7,
        image_token_id=vocab_size - 6, video_token_id=vocab_size - 5,
        bos_token_id=vocab_size - 4, eos_token_id=vocab_size - 3, pad_token_id=vocab_size - 4,
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny8(vocab_size: int = 512, **overrides) -> ModelConfig:
    """`tiny` with every sharded dimension divisible by 8 (8 heads, 8 KV heads) and a 2-block vision
    tower (one window, one full-attention block), for tests that split the model 8 ways."""
    base = tiny(vocab_size, **overrides)
    return base.replace(
        text=dataclasses.replace(base.text, num_heads=8, num_kv_heads=8, mrope_section=(2, 1, 1)),
        vision=dataclasses.replace(base.vision, depth=2, fullatt_block_indexes=(1,), hidden_size=64, num_heads=8,
                                   intermediate_size=128),
    )


PRESETS = {"tiny": tiny, "tiny8": tiny8, "qwen25vl_3b": qwen25vl_3b, "qwen25vl_7b": qwen25vl_7b}


def demo(vocab_size: int = 512, **overrides) -> ModelConfig:
    """`tiny` widened for the CPU demo: a 4-layer, 128-wide decoder and a 64-wide vision tower."""
    base = tiny(vocab_size, **overrides)
    return base.replace(
        text=dataclasses.replace(base.text, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                                 num_kv_heads=2, mrope_section=(4, 6, 6)),
        vision=dataclasses.replace(base.vision, hidden_size=64, intermediate_size=128, num_heads=4,
                                   out_hidden_size=128),
    )


PRESETS["demo"] = demo
