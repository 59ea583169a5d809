"""M-RoPE positions on the host: three position streams (t, h, w) per token, as Qwen2.5-VL lays them out.

Positions depend on grid values and placeholder runs, which are data, so they are computed here in
numpy outside `jax.jit`; `fourd_jax.model.rope` turns them into rotary angles on the device.
"""

from __future__ import annotations

import numpy as np

from fourd_jax.errors import InputError
from fourd_jax.model.config import ModelConfig


def get_rope_index(
    config: ModelConfig,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids [3, B, L] and rope deltas [B] for a batch.

    Text tokens advance all three streams together; each image/video placeholder run takes its
    grid's (t, h, w) coordinates offset by the running position, video t scaled by
    `tokens_per_second * second_per_grid_ts`. Padding (attention_mask == 0) is skipped and gets
    position 0. Media are consumed in order across the batch, as the processor lays them out.
    A token decoded into cache slot s (padding counted) sits at s + rope_delta, where
    rope_delta = (largest position + 1) - row length. How text continues after media is
    `config.mrope_text_start`; in its "spatial_extent" mode decoding continues one past the last
    prompt position, as transformers 5.x `generate` does.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    m = config.vision.spatial_merge_size
    grids = {
        config.image_token_id: iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist()
                                    if image_grid_thw is not None else []),
        config.video_token_id: iter(np.asarray(video_grid_thw).reshape(-1, 3).tolist()
                                    if video_grid_thw is not None else []),
    }
    n_videos = 0 if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3).shape[0]
    seconds = (np.ones(n_videos, np.float32) if second_per_grid_ts is None
               else np.asarray(second_per_grid_ts, np.float32).reshape(-1))
    if seconds.shape[0] != n_videos:
        raise InputError(
            f"second_per_grid_ts has {seconds.shape[0]} entries but video_grid_thw has {n_videos} videos."
        )
    video_seconds = iter(seconds.tolist())
    names = {config.image_token_id: "image", config.video_token_id: "video"}

    position_ids = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros(batch, np.int64)
    for b in range(batch):
        tokens = input_ids[b][mask[b]]
        pos = np.zeros((3, tokens.shape[0]), np.int64)
        i, current = 0, 0
        while i < tokens.shape[0]:
            tok = int(tokens[i])
            if tok not in grids:
                pos[:, i] = current
                current += 1
                i += 1
                continue
            grid = next(grids[tok], None)
            if grid is None:
                raise InputError(
                    f"input_ids row {b} has more {names[tok]} placeholder runs than "
                    f"{names[tok]}_grid_thw has {names[tok]}s."
                )
            t, h, w = grid
            n = t * (h // m) * (w // m)
            run = tokens[i:i + n]
            if run.shape[0] != n or np.any(run != tok):
                raise InputError(
                    f"input_ids row {b}: a {names[tok]} with grid ({t}, {h}, {w}) needs {n} consecutive "
                    f"placeholder tokens at position {i}, but the run is shorter."
                )
            video_s = next(video_seconds) if tok == config.video_token_id else None
            # One temporal patch sits at t = 0 whatever its interval (every Qwen3-VL video block).
            interval = (np.float32(config.vision.tokens_per_second) * np.float32(video_s)
                        if video_s is not None and t > 1 else np.float32(1.0))
            tt = (np.arange(t, dtype=np.float32) * interval).astype(np.int64)
            tt, hh, ww = np.meshgrid(tt, np.arange(h // m), np.arange(w // m), indexing="ij")
            block = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current
            pos[:, i:i + n] = block
            if config.mrope_text_start == "max_position":
                current = int(block.max()) + 1
            else:
                current = current + max(h, w) // m
            i += n
        position_ids[:, b, mask[b]] = pos
        if pos.size:
            # Decoding continues after the largest position (Qwen's reference), or, in
            # transformers 5.x `generate`, one past the last prompt token in each stream.
            nxt = int(pos.max()) + 1 if config.mrope_text_start == "max_position" else int(pos[0, -1]) + 1
        else:
            nxt = 0
        deltas[b] = nxt - length
    for tok, it in grids.items():
        if next(it, None) is not None:
            raise InputError(
                f"{names[tok]}_grid_thw has more {names[tok]}s than input_ids has placeholder runs."
            )
    return position_ids, deltas
