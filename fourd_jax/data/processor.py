"""Numpy Qwen-VL processing of frames into patch rows, grids and placeholder tokens.

Frames [T, H, W, 3] uint8 are resized (`smart_resize`: sides multiples of patch * merge (28 for
Qwen2.5-VL, 32 for Qwen3-VL), pixel count within [min_pixels, max_pixels], optionally longest side
<= max_side; PIL bicubic as the reference image processor), normalised with the family's mean/std
(CLIP's for Qwen2.5-VL, 0.5 for Qwen3-VL; `fourd_jax.families` finds the family by the type of the
vision config), the time axis padded to a multiple of the temporal patch by repeating the last
frame, and cut into rows of C * T_patch * P * P values in the order the reference processor uses:
patches of one 2x2 merge unit are consecutive, merge units row-major, temporal patches outermost.

Videos: Qwen2.5-VL frames go through the image resize with per-frame limits. Qwen3-VL's video
processor bounds the whole clip instead (`clip_smart_resize`: frames x height x width within the
limits); `process(..., clip_budget=True)` does that. Qwen3-VL's frame sampling and timestamped
vision blocks are in `fourd_jax.data.video_layout`. The reference video processors resize with
torchvision, which is not available here, so video frames are resized with PIL bicubic like images;
the resize sizes, normalisation and patch order are checked against transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from fourd_jax import families
from fourd_jax.errors import InputError

# The default family's settings (Qwen2.5-VL): the defaults of the functions below.
DEFAULTS = families.DEFAULT.processor
IMAGE_PAD, VIDEO_PAD = DEFAULTS.image_token, DEFAULTS.video_token
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = DEFAULTS.image_min_pixels, DEFAULTS.image_max_pixels
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = DEFAULTS.video_min_pixels, DEFAULTS.video_max_pixels


class VisionGeometry(Protocol):
    """A family's vision config (VisionConfig, Qwen3VisionConfig): the patch layout; the mean/std
    come from the family it belongs to."""

    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int


# What the functions below take to lay out patches: a vision config or a family's ProcessorSettings.
VisionSpec = VisionGeometry | families.ProcessorSettings


def _fit(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int = 1,
         rounded_frames: int = 1) -> tuple[int, int]:
    """Sides rounded to multiples of `factor`, then scaled (aspect kept) until rounded_frames x h x w
    lies within [min_pixels, max_pixels]; the scale is computed from the unrounded `frames` as the
    reference does. frames = rounded_frames = 1 is an image."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if rounded_frames * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif rounded_frames * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _cap_side(height: int, width: int, size: tuple[int, int], factor: int, max_side: int) -> tuple[int, int]:
    """`size` scaled down so its longest side is at most max_side (0: unchanged); see smart_resize."""
    if max_side and max_side < factor:
        raise InputError(f"max_side {max_side} must be 0 (no cap) or at least the resize factor {factor}.")
    h, w = size
    if max_side and max(h, w) > max_side:
        beta = max(height, width) / max_side
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    return h, w


def _check_aspect(height: int, width: int) -> None:
    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise InputError(f"image size {height}x{width} is empty or has an aspect ratio above 200.")


def smart_resize(height: int, width: int, factor: int = DEFAULTS.resize_factor, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS, max_side: int = 0) -> tuple[int, int]:
    """The size the Qwen2-VL image processor (Qwen2.5-VL with factor 28, Qwen3-VL with factor 32)
    resizes an image to: sides multiples of `factor`, aspect kept as well as possible, pixel count
    within [min_pixels, max_pixels].

    `max_side` > 0 also caps the longest side (4DThinker's RL frames: longest side <= 448, SPEC 2):
    when the size found above has a longer side, both sides are scaled by max_side / longest input
    side and floored to multiples of `factor` (at least `factor`). This cap is applied last and wins
    over `min_pixels`. 0 means no side cap.
    """
    _check_aspect(height, width)
    return _cap_side(height, width, _fit(height, width, factor, min_pixels, max_pixels), factor, max_side)


def clip_smart_resize(num_frames: int, height: int, width: int, factor: int, temporal_factor: int,
                      min_pixels: int, max_pixels: int, max_side: int = 0) -> tuple[int, int]:
    """The frame size Qwen3-VL's video processor resizes a clip of `num_frames` frames to: like
    `smart_resize`, but the limits bound the whole clip, frames (rounded to a multiple of
    `temporal_factor`, Python's round) x height x width, so more frames get smaller ones. Frames
    with a side below `factor` are first scaled up (truncated to int) until both sides reach it.
    `max_side` caps the longest side last, as in `smart_resize`.
    """
    if num_frames < temporal_factor:
        raise InputError(f"a video needs at least temporal_patch_size = {temporal_factor} frames, got {num_frames}.")
    if min(height, width) < 1:
        raise InputError(f"frame size {height}x{width} is empty.")
    h, w = height, width
    if h < factor or w < factor:  # the reference scales tiny frames up before its aspect check
        scale = max(factor / h, factor / w)
        h, w = int(h * scale), int(w * scale)
    _check_aspect(h, w)
    rounded = round(num_frames / temporal_factor) * temporal_factor
    return _cap_side(h, w, _fit(h, w, factor, min_pixels, max_pixels, num_frames, rounded), factor, max_side)


def capped_clip_budget(num_frames: int, min_pixels: int, max_pixels: int, factor: int, max_frame_tokens: int = 768
                       ) -> int:
    """The clip pixel budget with Qwen3-VL's per-frame cap (qwen-vl-utils; transformers'
    `cap_pixels_per_frame=True`): each frame gets min(max_frame_tokens x factor^2, max_pixels / frames)
    pixels, at least 1.05 x min_pixels, times the frame count. Pass it as `clip_smart_resize`'s
    max_pixels."""
    per_frame = max(min(max_frame_tokens * factor * factor, max_pixels // num_frames), int(min_pixels * 1.05))
    return per_frame * num_frames


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 frames [T, H, W, 3] resized to size (height, width) with PIL bicubic."""
    height, width = size
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def patch_geometry(config: VisionSpec) -> tuple[int, int, int]:
    """(patch_size, temporal_patch_size, merge_size) of a vision config or ProcessorSettings."""
    if isinstance(config, families.ProcessorSettings):
        return config.patch_size, config.temporal_patch_size, config.merge_size
    return config.patch_size, config.temporal_patch_size, config.spatial_merge_size


def process(frames: np.ndarray, config: VisionSpec, min_pixels: int, max_pixels: int, max_side: int = 0,
            clip_budget: bool = False) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize then patchify uint8 frames [T, H, W, 3] (T = 1 for an image): (rows, grid).

    The size is `smart_resize` with `min_pixels`, `max_pixels` and `max_side` (0: no side cap), or,
    with `clip_budget` (Qwen3-VL videos), `clip_smart_resize`: the limits bound all T frames together.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise InputError(f"frames must be [T, H, W, 3], got shape {frames.shape}.")
    patch, temporal, merge = patch_geometry(config)
    t, h, w = frames.shape[:3]
    if clip_budget:
        size = clip_smart_resize(t, h, w, patch * merge, temporal, min_pixels, max_pixels, max_side)
    else:
        size = smart_resize(h, w, patch * merge, min_pixels, max_pixels, max_side)
    return patchify(resize_frames(frames, size), config)


def normalisation(config: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (mean, std) [3] float32 of ProcessorSettings or of the family `config` belongs to."""
    settings = config if isinstance(config, families.ProcessorSettings) else families.family_of(config).processor
    return np.array(settings.image_mean, np.float32), np.array(settings.image_std, np.float32)


def patchify(frames: np.ndarray, config: VisionSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] (H, W multiples of patch * merge) -> (rows [N, C*T*P*P], grid).

    A single image is T = 1 and becomes two identical frames, as in the reference.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}.")
    t, h, w, _ = frames.shape
    p, tp, m = patch_geometry(config)
    if h % (p * m) or w % (p * m):
        raise InputError(f"frame size {h}x{w} must be a multiple of {p * m} on both sides.")
    if t % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - t % tp, axis=0)])
    mean, std = normalisation(config)
    x = (frames.astype(np.float32) / 255.0 - mean) / std
    x = x.transpose(0, 3, 1, 2)  # [T, C, H, W]
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, 3 * tp * p * p), (gt, gh, gw)


def timestamped_video_blocks(timestamps: Sequence[float], grid: Sequence[int], merge: int = DEFAULTS.merge_size,
                             video_token: str = VIDEO_PAD) -> str:
    """Qwen3-VL's text for one video: per temporal patch, "<{t:.1f} seconds>" then
    `<|vision_start|>` + h * w / merge^2 video pads + `<|vision_end|>` (t: that patch's time)."""
    t, h, w = (int(v) for v in grid)
    if len(timestamps) != t:
        raise InputError(f"a video of grid {tuple(grid)} needs {t} timestamps (one per temporal patch), "
                         f"got {len(timestamps)}.")
    block = VISION_START + video_token * (h * w // merge**2) + VISION_END
    return "".join(f"<{float(seconds):.1f} seconds>" + block for seconds in timestamps)


def expand_placeholders(
    text: str, image_grids=(), video_grids=(), merge: int = DEFAULTS.merge_size,
    video_timestamps: Sequence[Sequence[float]] | None = None,
) -> str:
    """Repeat each `<|image_pad|>` / `<|video_pad|>` once per merged token of its grid, in order.

    With `video_timestamps` (Qwen3-VL: one list of temporal-patch times per video), each video
    instead becomes `timestamped_video_blocks`; the chat template's `<|vision_start|>` /
    `<|vision_end|>` around its `<|video_pad|>` are dropped, as each block carries its own.
    """
    out = []
    grids = {IMAGE_PAD: iter(image_grids), VIDEO_PAD: iter(video_grids)}
    times = iter(video_timestamps) if video_timestamps is not None else None
    i = 0
    while True:
        positions = {tok: text.find(tok, i) for tok in grids}
        found = {tok: pos for tok, pos in positions.items() if pos >= 0}
        if not found:
            out.append(text[i:])
            break
        tok = min(found, key=found.get)
        pos = found[tok]
        grid = next(grids[tok], None)
        if grid is None:
            raise InputError(f"The text has more {tok} placeholders than grids were given.")
        end = pos + len(tok)
        if tok == VIDEO_PAD and times is not None:
            seconds = next(times, None)
            if seconds is None:
                raise InputError("The text has more <|video_pad|> placeholders than video_timestamps were given.")
            wrapped = text[max(i, pos - len(VISION_START)):pos] == VISION_START and text.startswith(VISION_END, end)
            if wrapped:
                pos, end = pos - len(VISION_START), end + len(VISION_END)
            out.append(text[i:pos] + timestamped_video_blocks(seconds, grid, merge, tok))
        else:
            out.append(text[i:pos] + tok * (int(np.prod(grid)) // merge**2))
        i = end
    for tok, rest in grids.items():
        if next(rest, None) is not None:
            raise InputError(f"More grids than {tok} placeholders in the text.")
    if times is not None and next(times, None) is not None:
        raise InputError("More video_timestamps than <|video_pad|> placeholders in the text.")
    return "".join(out)
