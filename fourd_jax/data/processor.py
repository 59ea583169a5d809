"""Numpy Qwen2.5-VL processing of frames into patch rows, grids and placeholder tokens.

Frames [T, H, W, 3] uint8 are resized (`smart_resize`: sides multiples of 28, pixel count within
[min_pixels, max_pixels], optionally longest side <= max_side; PIL bicubic as the reference image
processor), normalised with the family's mean/std (CLIP's for Qwen2.5-VL; `fourd_jax.families`
finds the family by the type of the vision config), the time axis padded to a multiple of the
temporal patch by repeating the last frame, and cut into rows of C * T_patch * P * P values in the order
the reference processor uses: patches of one 2x2 merge unit are consecutive, merge units
row-major, temporal patches outermost. Video frames go through the same resize as images (the
reference video processor needs torchvision, which is not available here).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from fourd_jax import families
from fourd_jax.errors import InputError
from fourd_jax.model.config import VisionConfig

# The default family's settings (Qwen2.5-VL): the defaults of the functions below.
DEFAULTS = families.DEFAULT.processor
IMAGE_PAD, VIDEO_PAD = DEFAULTS.image_token, DEFAULTS.video_token
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = DEFAULTS.image_min_pixels, DEFAULTS.image_max_pixels
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = DEFAULTS.video_min_pixels, DEFAULTS.video_max_pixels


def smart_resize(height: int, width: int, factor: int = DEFAULTS.resize_factor, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS, max_side: int = 0) -> tuple[int, int]:
    """The size Qwen2.5-VL resizes an image to: sides multiples of `factor`, aspect kept as well as
    possible, pixel count within [min_pixels, max_pixels].

    `max_side` > 0 also caps the longest side (4DThinker's RL frames: longest side <= 448, SPEC 2):
    when the size found above has a longer side, both sides are scaled by max_side / longest input
    side and floored to multiples of `factor` (at least `factor`). This cap is applied last and wins
    over `min_pixels`. 0 means no side cap.
    """
    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise InputError(f"image size {height}x{width} is empty or has an aspect ratio above 200.")
    if max_side and max_side < factor:
        raise InputError(f"max_side {max_side} must be 0 (no cap) or at least the resize factor {factor}.")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if max_side and max(h, w) > max_side:
        beta = max(height, width) / max_side
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    return h, w


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 frames [T, H, W, 3] resized to size (height, width) with PIL bicubic."""
    height, width = size
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def process(frames: np.ndarray, config: VisionConfig, min_pixels: int, max_pixels: int, max_side: int = 0
            ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize then patchify uint8 frames [T, H, W, 3] (T = 1 for an image): (rows, grid).

    The size is `smart_resize` with `min_pixels`, `max_pixels` and `max_side` (0: no side cap).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise InputError(f"frames must be [T, H, W, 3], got shape {frames.shape}.")
    factor = config.patch_size * config.spatial_merge_size
    size = smart_resize(frames.shape[1], frames.shape[2], factor, min_pixels, max_pixels, max_side)
    return patchify(resize_frames(frames, size), config)


def normalisation(config: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (mean, std) [3] float32 of the family `config` belongs to."""
    settings = families.family_of(config).processor
    return np.array(settings.image_mean, np.float32), np.array(settings.image_std, np.float32)


def patchify(frames: np.ndarray, config: VisionConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] (H, W multiples of patch * merge) -> (rows [N, C*T*P*P], grid).

    A single image is T = 1 and becomes two identical frames, as in the reference.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}.")
    t, h, w, _ = frames.shape
    p, tp, m = config.patch_size, config.temporal_patch_size, config.spatial_merge_size
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


def expand_placeholders(
    text: str, image_grids=(), video_grids=(), merge: int = DEFAULTS.merge_size
) -> str:
    """Repeat each `<|image_pad|>` / `<|video_pad|>` once per merged token of its grid, in order."""
    out = []
    grids = {IMAGE_PAD: iter(image_grids), VIDEO_PAD: iter(video_grids)}
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
        out.append(text[i:pos] + tok * (int(np.prod(grid)) // merge**2))
        i = pos + len(tok)
    for tok, rest in grids.items():
        if next(rest, None) is not None:
            raise InputError(f"More grids than {tok} placeholders in the text.")
    return "".join(out)
