"""Model families: what differs from one vision-language architecture to the next, in one table.

Each family names its config type and presets, its Linen module, its Hugging Face name table and
config mapping, the `model_type` its HF checkpoints declare, and the settings of its processor. Code
is named by dotted path ("module:attribute") and imported on first use, so this registry imports
neither JAX nor the model: the host-side data code reads it freely. Adding an architecture means
writing its modules and adding one entry to FAMILIES, as Qwen3-VL does (its own tower, media layout
and positions; the decoder, sampler and conversion code are shared).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from fourd_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class VideoRules:
    """How one family's processor samples, sizes and lays out a video (`fourd_jax.data.video_layout`)."""

    timestamps: bool  # each temporal patch its own vision block after "<t seconds>" (Qwen3-VL)
    clip_budget: bool  # the pixel limits bound frames x height x width, not each frame
    fps: float = 2.0  # frames sampled per second of video (timestamped families)
    min_frames: int = 4
    max_frames: int = 768


@dataclasses.dataclass(frozen=True)
class ProcessorSettings:
    """How a family's processor turns frames into patch rows and placeholder tokens.

    The video pixel limits are the reference processor's: per frame, or, when `video.clip_budget`,
    for the whole clip (frames x height x width). The data pipeline's own limits (`FeatureConfig`,
    `data.video_*_pixels`) are per frame for every family and become a clip budget of frames x limit.
    """

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_min_pixels: int
    image_max_pixels: int
    video_min_pixels: int  # per frame, or per clip when video.clip_budget
    video_max_pixels: int
    image_token: str
    video_token: str
    video: VideoRules

    @property
    def resize_factor(self) -> int:
        """Frame sides are resized to multiples of this: one merge unit of patches."""
        return self.patch_size * self.merge_size


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture; its code is named by "module:attribute" (or "module") paths, imported on
    first use."""

    name: str
    title: str  # as it appears in messages
    hf_model_type: str  # the `model_type` of its transformers config.json
    config: str  # the frozen config dataclass
    vision_config: str  # the vision tower's part of it (what the processor is given)
    presets: str  # {name: function(**overrides) -> config}
    module: str  # the Linen module, built as module(config)
    hf_names: str  # the `convert.tables.NameTable` of its HF tensors
    hf_config: str  # a module with config_from_hf(hf_config, source, **overrides) and config_to_hf(config)
    processor: ProcessorSettings
    # Host-side (numpy) bookkeeping that depends on grid values: the tower's media layout, called
    # as f(grid_thw, config.vision), and M-RoPE positions, called like positions.get_rope_index.
    vision_layout: str = "fourd_jax.model.layout:vision_layout"
    rope_index: str = "fourd_jax.model.positions:get_rope_index"
    # The per-example media arrays of a training batch (`fourd_jax.data.batching.media_arrays`).
    batch_media: str = "fourd_jax.data.batching:window_media_arrays"

    def config_type(self) -> type:
        return resolve(self.config)

    def preset_table(self) -> dict[str, Any]:
        return resolve(self.presets)

    def module_type(self) -> type:
        return resolve(self.module)

    def name_table(self) -> Any:
        return resolve(self.hf_names)

    def hf_config_mapping(self) -> Any:
        return resolve(self.hf_config)

    def owns(self, obj: Any) -> bool:
        """Whether obj is (an instance of) this family's config, vision config or module, judged by
        name so that nothing is imported."""
        cls = obj if isinstance(obj, type) else type(obj)
        ours = (self.config, self.vision_config, self.module)
        return any(f"{c.__module__}:{c.__qualname__}" in ours for c in cls.__mro__)


def resolve(dotted: str) -> Any:
    """The object a "module:attribute" path names (the module itself for a bare "module")."""
    module, _, attribute = dotted.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


QWEN2_5_VL = Family(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    hf_model_type="qwen2_5_vl",
    config="fourd_jax.model.config:ModelConfig",
    vision_config="fourd_jax.model.config:VisionConfig",
    presets="fourd_jax.model.config:PRESETS",
    module="fourd_jax.model.vlm:Qwen25VL",
    hf_names="fourd_jax.convert.qwen25vl:NAMES",
    hf_config="fourd_jax.convert.qwen25vl",
    # The reference processor: CLIP normalisation; images [56*56, 28*28*1280] pixels, videos
    # [128*28*28, 768*28*28] per frame.
    processor=ProcessorSettings(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
        image_min_pixels=56 * 56, image_max_pixels=28 * 28 * 1280,
        video_min_pixels=128 * 28 * 28, video_max_pixels=768 * 28 * 28,
        image_token="<|image_pad|>", video_token="<|video_pad|>",
        # one vision block per video; time enters the positions through second_per_grid_ts
        video=VideoRules(timestamps=False, clip_budget=False),
    ),
)

QWEN3_VL = Family(
    name="qwen3_vl",
    title="Qwen3-VL",
    hf_model_type="qwen3_vl",
    config="fourd_jax.model.qwen3vl_config:Qwen3VLConfig",
    vision_config="fourd_jax.model.qwen3vl_config:Qwen3VisionConfig",
    presets="fourd_jax.model.qwen3vl_config:PRESETS",
    module="fourd_jax.model.qwen3vl:Qwen3VL",
    hf_names="fourd_jax.convert.qwen3vl:NAMES",
    hf_config="fourd_jax.convert.qwen3vl",
    # The Qwen3-VL processor: mean/std 0.5; images [65536, 16777216] pixels (preprocessor_config.json
    # `size`); videos [128 * 32 * 32, 768 * 32 * 32] pixels per clip (the video processor's `size`, which
    # its smart_resize applies to frames x height x width), sampled at 2 fps, 4 to 768 frames, each
    # temporal patch its own block after its timestamp.
    processor=ProcessorSettings(
        patch_size=16, merge_size=2, temporal_patch_size=2,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        image_min_pixels=65536, image_max_pixels=16777216,
        video_min_pixels=128 * 32 * 32, video_max_pixels=768 * 32 * 32,
        image_token="<|image_pad|>", video_token="<|video_pad|>",
        video=VideoRules(timestamps=True, clip_budget=True, fps=2.0, min_frames=4, max_frames=768),
    ),
    vision_layout="fourd_jax.model.qwen3vl_layout:qwen3_vision_layout",
    rope_index="fourd_jax.model.qwen3vl_layout:get_rope_index",
    batch_media="fourd_jax.data.batching:row_media_arrays",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2_5_VL, QWEN3_VL)}
# What a checkpoint without a family of its own (an Orbax ModelConfig) and the processor defaults are.
DEFAULT = QWEN2_5_VL


def preset_names() -> tuple[str, ...]:
    """Every model preset of every family (`model.preset` of a run config)."""
    return tuple(name for f in FAMILIES.values() for name in f.preset_table())


def preset_model(name: str, config_transform: Callable[[Any], Any] | None = None, **overrides: Any) -> Any:
    """The Linen module of model preset `name` (any family's), its config built with `overrides`
    (e.g. dtype); `config_transform(config)`, when given, adapts the config first (a tokenizer's ids)."""
    transform = config_transform
    family = next((f for f in FAMILIES.values() if name in f.preset_table()), None)
    if family is None:
        raise InputError(f"model preset {name!r} is not one of {sorted(preset_names())}.")
    config = family.preset_table()[name](**overrides)
    return family.module_type()(transform(config) if transform else config)


def hf_model_types() -> tuple[str, ...]:
    """Every `model_type` a Hugging Face checkpoint may declare."""
    return tuple(f.hf_model_type for f in FAMILIES.values())


def for_hf_model_type(model_type: Any) -> Family | None:
    """The family whose HF checkpoints declare `model_type`, or None."""
    return next((f for f in FAMILIES.values() if f.hf_model_type == model_type), None)


def family_of(obj: Any) -> Family:
    """The family of a config, vision config or module (instance or type): the one that owns the most
    specific class of its MRO (Qwen3VL is a subclass of Qwen25VL, and a Qwen3-VL)."""
    cls = obj if isinstance(obj, type) else type(obj)
    family = next((f for c in cls.__mro__ for f in FAMILIES.values()
                   if f"{c.__module__}:{c.__qualname__}" in (f.config, f.vision_config, f.module)), None)
    if family is None:
        name = (obj if isinstance(obj, type) else type(obj)).__qualname__
        raise InputError(f"{name} belongs to no model family in fourd_jax.families.FAMILIES.")
    return family
