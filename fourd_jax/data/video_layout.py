"""How each model family samples a video's frames, times them and lays them out (numpy, host side).

Qwen2.5-VL: the frames go in as one vision block, the pixel limits bound each frame, and time
enters the positions through `second_per_grid_ts`. Qwen3-VL (transformers'
`Qwen3VLVideoProcessor` / `Qwen3VLProcessor`): frames are sampled at `fps` per second (at least
`min_frames`, at most `max_frames` and the video's own count, evenly spread, rounded), the pixel
limits bound the whole clip (`processor.clip_smart_resize`), and each temporal patch becomes its own
vision block after a "<t seconds>" text, t the mean time of the patch's first and last frame
(`processor.timestamped_video_blocks`). The reference video processor needs torchvision for its
resize and normalisation, which is not installed here: its frame sampling, resize sizes, patch
order and prompt text are compared directly (tests/test_processor_qwen3vl.py), its normalisation
through the image processor, which shares it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fourd_jax import families
from fourd_jax.errors import InputError
from fourd_jax.families import VideoRules


def video_rules(config: Any) -> VideoRules:
    """The video rules of the family a (vision) config or module belongs to (its ProcessorSettings)."""
    return families.family_of(config).processor.video


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = 2.0, min_frames: int = 4,
                         max_frames: int = 768, num_frames: int | None = None) -> np.ndarray:
    """Indices [n] of the frames Qwen3-VL's video processor keeps from a video of `total_frames`
    frames at `video_fps`: n = total / video_fps * fps (truncated) clamped to [min_frames, max_frames]
    and to total, or `num_frames` when given; evenly spread from the first frame to the last and
    rounded (so a video shorter than min_frames keeps every frame once)."""
    if total_frames < 1:
        raise InputError(f"a video needs at least one frame, got total_frames {total_frames}.")
    if num_frames is None:
        if not video_fps > 0 or not fps > 0:
            raise InputError(f"video_fps {video_fps} and sampling fps {fps} must be positive.")
        num_frames = min(max(int(total_frames / video_fps * fps), min_frames), max_frames, total_frames)
    elif num_frames < 1:
        raise InputError(f"num_frames must be at least 1, got {num_frames}.")
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int)


def temporal_patch_times(frame_times: Sequence[float], temporal_patch: int = 2) -> list[float]:
    """One time per temporal patch: the mean of its first and last frame's time, after the last frame
    is repeated up to a multiple of `temporal_patch` (as the frames themselves are padded)."""
    times = [float(t) for t in frame_times]
    if not times:
        raise InputError("a video needs at least one frame time.")
    times += [times[-1]] * (-len(times) % temporal_patch)
    return [(times[i] + times[i + temporal_patch - 1]) / 2 for i in range(0, len(times), temporal_patch)]
