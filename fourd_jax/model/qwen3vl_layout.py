"""Qwen3-VL host-side bookkeeping (numpy): the vision tower's media layout and M-RoPE positions.

The tower attends within each temporal patch (frame) of each media item and adds learned position
embeddings resampled to every grid; which rows that involves depends on grid values, so it is
computed here outside `jax.jit`, as `fourd_jax.model.layout` does for Qwen2.5-VL.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fourd_jax.errors import InputError
from fourd_jax.model import positions
from fourd_jax.model.qwen3vl_config import Qwen3VisionConfig, Qwen3VLConfig


@dataclasses.dataclass(frozen=True)
class Qwen3VisionLayout:
    """Per patch row (N rows, in the processor's order): what the tower needs besides the pixels.

    Flat ([N, ...], `qwen3_vision_layout`) or per example ([B, P, ...], `batch_layouts`: each
    example's rows padded to P, aligned with its patches [B, P, C]). `fourd_jax.model.inputs`
    registers it as a JAX pytree (arrays are leaves, frame_len static).
    """

    rotary_pos: np.ndarray  # [N, 2] (row, col) of the patch inside its frame
    frame_id: np.ndarray  # [N] id of the (media item, temporal patch) the row belongs to
    interp_index: np.ndarray  # [N, 4] rows of the learned position table to blend
    interp_weight: np.ndarray  # [N, 4] float32 bilinear weights of those rows
    valid: np.ndarray  # [N] bool: the row is a real patch (False: batch padding, never attended to)
    # Static: rows per frame when every frame has the same size (attention is then a reshape);
    # 0 when frames differ and attention uses a same-frame mask.
    frame_len: int = 0


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two bilinear taps into a `side`-long table and their weights for target `index`es on an
    axis of `size` (align_corners=True), in float32 as transformers computes them."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0)
    return taps, weights.astype(np.float32)


def qwen3_vision_layout(grid_thw: np.ndarray, config: Qwen3VisionConfig) -> Qwen3VisionLayout:
    """The layout of media items with grids [(t, h, w), ...] (in patches), rows in the processor's
    order: frames in turn, each as m x m merge blocks in row-major order."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m, side = config.spatial_merge_size, config.position_grid_side
    rotary, frames, index, weight = [], [], [], []
    frame_offset = 0
    for t, h, w in grid_thw.tolist():
        if h % m or w % m or t < 1:
            raise InputError(f"grid_thw ({t}, {h}, {w}) is not a valid vision grid: h and w must be multiples of "
                             f"spatial_merge_size {m} and t >= 1.")
        # (block_row, block_col, in_row, in_col) -> patch (row, col), the processor's row order.
        br, bc, ir, ic = np.meshgrid(np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m), indexing="ij")
        row, col = (br * m + ir).reshape(-1), (bc * m + ic).reshape(-1)
        h_taps, h_weights = _axis_taps(row, h, side)
        w_taps, w_weights = _axis_taps(col, w, side)
        taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        blend = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        rotary.append(np.tile(np.stack([row, col], -1), (t, 1)))
        index.append(np.tile(taps, (t, 1)))
        weight.append(np.tile(blend, (t, 1)))
        frames.append(frame_offset + np.repeat(np.arange(t), h * w))
        frame_offset += t
    sizes = {h * w for _, h, w in grid_thw.tolist()}
    join = lambda parts, shape: np.concatenate(parts) if parts else np.zeros(shape, np.int64)  # noqa: E731
    return Qwen3VisionLayout(
        rotary_pos=join(rotary, (0, 2)).astype(np.int32),
        frame_id=join(frames, (0,)).astype(np.int32),
        interp_index=join(index, (0, 4)).astype(np.int32),
        interp_weight=join(weight, (0, 4)).astype(np.float32),
        valid=np.ones(sum(int(np.prod(g)) for g in grid_thw.tolist()), bool),
        frame_len=sizes.pop() if len(sizes) == 1 else 0,
    )


def stack_layouts(layouts: list[Qwen3VisionLayout], rows: int, batch_size: int,
                  frame_len: int) -> Qwen3VisionLayout:
    """Per-example layouts as one [B, rows, ...] layout (`batching.row_media_arrays`): rows are the
    processor's, so they line up with patches [B, rows, C]. Padding rows (and rows of missing
    examples) are invalid, read table row 0 with weight 0, and sit in a frame of their own."""
    empty = Qwen3VisionLayout(np.zeros((0, 2), np.int32), np.zeros(0, np.int32), np.zeros((0, 4), np.int32),
                              np.zeros((0, 4), np.float32), np.zeros(0, bool))
    layouts = layouts + [empty] * (batch_size - len(layouts))

    def pad(a: np.ndarray, value) -> np.ndarray:
        return np.concatenate([a, np.full((rows - a.shape[0], *a.shape[1:]), value, a.dtype)])

    stacked = {
        "rotary_pos": np.stack([pad(lay.rotary_pos, 0) for lay in layouts]),
        "frame_id": np.stack([pad(lay.frame_id, int(np.max(lay.frame_id, initial=-1)) + 1) for lay in layouts]),
        "interp_index": np.stack([pad(lay.interp_index, 0) for lay in layouts]),
        "interp_weight": np.stack([pad(lay.interp_weight, 0) for lay in layouts]),
        "valid": np.stack([pad(lay.valid, False) for lay in layouts]),
    }
    return Qwen3VisionLayout(**stacked, frame_len=frame_len)


def split_video_grids(video_grid_thw: np.ndarray | None) -> np.ndarray | None:
    """One (1, h, w) grid per temporal patch: the Qwen3-VL processor writes each temporal patch of
    a video as its own vision block, with its timestamp as text in between."""
    if video_grid_thw is None:
        return None
    grids = np.asarray(video_grid_thw, np.int64).reshape(-1, 3)
    split = np.repeat(grids, grids[:, 0], axis=0)
    split[:, 0] = 1
    return split


def get_rope_index(
    config: Qwen3VLConfig,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL M-RoPE positions [3, B, L] and rope deltas [B] (see `positions.get_rope_index`).

    Each temporal patch of a video is a vision block of its own with temporal position 0 (time is
    carried by the timestamp text), so blocks are placed like single-frame images.
    `second_per_grid_ts` is accepted for the processor's signature and unused.
    """
    del second_per_grid_ts  # time lives in the timestamp text
    return positions.get_rope_index(config, input_ids, image_grid_thw, split_video_grids(video_grid_thw),
                                    None, attention_mask)
