"""Numpy Qwen2.5-VL processing of frames into patch rows, grids and placeholder tokens.

Frames [T, H, W, 3] uint8 are normalised with the CLIP mean/std, the time axis padded to a
multiple of the temporal patch by repeating the last frame, and cut into rows of
C * T_patch * P * P values in the order the reference processor uses: patches of one 2x2 merge
unit are consecutive, merge units row-major, temporal patches outermost.
"""

from __future__ import annotations

import numpy as np

from fourd_jax.errors import InputError
from fourd_jax.model.config import VisionConfig

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"


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
    x = (frames.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    x = x.transpose(0, 3, 1, 2)  # [T, C, H, W]
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, 3 * tp * p * p), (gt, gh, gw)


def expand_placeholders(
    text: str, image_grids=(), video_grids=(), merge: int = 2
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
