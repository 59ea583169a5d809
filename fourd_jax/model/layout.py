"""The vision tower's media layout, computed on the host in numpy from the grids.

The tower pads every attention window to exactly `window_len` slots, so window attention is a
reshape; `vision_layout` says which patch row fills each slot, its 2D rotary coordinates, its
frame, and which slots the merged tokens come from. Being data-dependent, it is computed here,
outside `jax.jit`; the tower (`fourd_jax.model.vision`) is then a static-shape function of
(patches, layout).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fourd_jax.errors import InputError
from fourd_jax.model.config import VisionConfig


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Where each patch sits in the padded window arrangement (host-computed, jit-friendly).

    Np = padded slots (a multiple of window_len), N = real patches, U = N / merge^2 units.
    Numpy arrays on the host; `fourd_jax.model.inputs` registers the class as a JAX pytree (the
    arrays are its leaves, `frame_len` static), so a layout passes into jitted functions.
    """

    patch_index: np.ndarray  # [Np] source row in the HF patch order; N (a zero row) for padding
    valid: np.ndarray  # [Np] bool, slot holds a real patch
    rotary_pos: np.ndarray  # [Np, 2] (row, col) patch coordinates inside the frame
    frame_id: np.ndarray  # [Np] id of the (media item, temporal patch) a slot belongs to
    unit_slot: np.ndarray  # [U] slot-unit index of each merged token, in HF output order
    # Static: slots per frame when every frame has the same padded size (then full attention is a
    # reshape); 0 when frames differ and full attention falls back to a segment mask.
    frame_len: int = 0


def vision_layout(grid_thw: np.ndarray, config: VisionConfig) -> VisionLayout:
    """Compute the padded window layout for media items with grids [(t, h, w), ...] (patches)."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = config.spatial_merge_size
    wu = config.window_units
    patch_index, rotary_pos, frame_id, unit_slot = [], [], [], []
    patch_offset = slot_offset = frame_offset = 0
    frame_lens = set()
    for t, h, w in grid_thw.tolist():
        if h % m or w % m or t < 1:
            raise InputError(
                f"grid_thw ({t}, {h}, {w}) is not a valid vision grid: h and w must be multiples of "
                f"spatial_merge_size {m} and t >= 1."
            )
        units_h, units_w = h // m, w // m
        nwh, nww = -(-units_h // wu), -(-units_w // wu)
        frame_slots = nwh * nww * wu * wu * m * m
        frame_lens.add(frame_slots)
        # Every (t, unit_row, unit_col, sub_row, sub_col) patch, in HF order.
        tt, bh, bw, i, j = np.meshgrid(
            np.arange(t), np.arange(units_h), np.arange(units_w), np.arange(m), np.arange(m),
            indexing="ij",
        )
        window = (bh // wu) * nww + bw // wu
        in_window = (bh % wu) * wu + bw % wu
        unit_in_frame = window * wu * wu + in_window
        slot = (tt * nwh * nww * wu * wu + unit_in_frame) * (m * m) + i * m + j
        n_slots = t * frame_slots
        idx = np.full(n_slots, -1, np.int64)
        idx[slot.reshape(-1)] = patch_offset + np.arange(slot.size)
        pos = np.zeros((n_slots, 2), np.int64)
        pos[slot.reshape(-1), 0] = (bh * m + i).reshape(-1)
        pos[slot.reshape(-1), 1] = (bw * m + j).reshape(-1)
        patch_index.append(idx)
        rotary_pos.append(pos)
        frame_id.append(frame_offset + np.repeat(np.arange(t), frame_slots))
        # Units in HF order are the (t, bh, bw) grid in row-major order.
        unit_slot.append((slot_offset + slot[..., 0, 0].reshape(-1)) // (m * m))
        patch_offset += slot.size
        slot_offset += n_slots
        frame_offset += t
    patch_index = np.concatenate(patch_index) if patch_index else np.zeros(0, np.int64)
    is_valid = patch_index >= 0
    patch_index = np.where(is_valid, patch_index, patch_offset)
    return VisionLayout(
        patch_index=patch_index.astype(np.int32),
        valid=is_valid,
        rotary_pos=np.concatenate(rotary_pos).astype(np.int32),
        frame_id=np.concatenate(frame_id).astype(np.int32),
        unit_slot=np.concatenate(unit_slot).astype(np.int32),
        frame_len=frame_lens.pop() if len(frame_lens) == 1 else 0,
    )


def num_patches(grid_thw: np.ndarray) -> int:
    """Rows of pixel_values the grids describe."""
    return int(np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=-1).sum())
