"""Examples -> fixed-shape batches: sequences padded to a bucket length, media to bucket sizes.

A training step compiles once per distinct batch shape, so every variable size is rounded up:
the sequence length to the next entry of `seq_buckets`, the media patch count and the padded
window slots to the next power-of-two multiple of a base size. Padding rows have zero
attention and zero loss; padded media slots are never attended to and their outputs unused.
Examples that failed to featurize arrive as `BadExample` and are dropped here and counted in
the batch (`num_skipped`), so the count survives worker processes.

Media are kept per example (a leading batch axis on patches and layouts) so a batch can be
sharded over devices by example: example b's video tokens fill row b's placeholders, and its
imagery targets (`imagery_segment`, local to the example) feed row b's latent pads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fourd_jax import families
from fourd_jax.model.config import ModelConfig
from fourd_jax.model.layout import VisionLayout, num_patches, vision_layout
from fourd_jax.model.qwen3vl_layout import qwen3_vision_layout, stack_layouts


@dataclasses.dataclass(frozen=True)
class BadExample:
    """A record that could not be used, and why (file and index when known)."""

    reason: str


def bucket(n: int, base: int) -> int:
    """Smallest base * 2**k >= n (at least base)."""
    size = base
    while size < n:
        size *= 2
    return size


def pad_layout(layout: VisionLayout, slots: int, units: int, zero_row: int) -> VisionLayout:
    """A layout grown to `slots` window slots and `units` merged tokens; new slots are invalid and
    read `zero_row` (an all-zero patch row); new units repeat unit 0 and are never used."""
    extra_slots, extra_units = slots - layout.patch_index.shape[0], units - layout.unit_slot.shape[0]
    if extra_slots < 0 or extra_units < 0:
        raise ValueError(f"layout of {layout.patch_index.shape[0]} slots does not fit in {slots}")
    fill = lambda a, n, v: np.concatenate([np.asarray(a), np.full((n, *np.shape(a)[1:]), v, np.asarray(a).dtype)])  # noqa: E731
    patch_index = np.where(np.asarray(layout.valid), np.asarray(layout.patch_index), zero_row)
    return VisionLayout(
        patch_index=fill(patch_index, extra_slots, zero_row),
        valid=fill(layout.valid, extra_slots, False),
        rotary_pos=fill(layout.rotary_pos, extra_slots, 0),
        frame_id=fill(layout.frame_id, extra_slots, int(np.max(layout.frame_id, initial=-1)) + 1),
        unit_slot=fill(layout.unit_slot, extra_units, 0),
        frame_len=layout.frame_len,
    )


def _empty_layout() -> VisionLayout:
    return VisionLayout(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros((0, 2), np.int32), np.zeros(0, np.int32),
                        np.zeros(0, np.int32), 0)


def media_arrays(patch_list: Sequence[np.ndarray], grid_list: Sequence[np.ndarray], batch_size: int,
                 model_config: ModelConfig, prefix: str) -> dict[str, Any]:
    """Per-example media as arrays with a leading batch axis, named `{prefix}_*`: patches [B, P, C],
    the family's tower layout [B, ...] (`Family.batch_media`), `{prefix}_valid` [B, slots],
    `{prefix}_frame_len` and `{prefix}_tokens` [B] (merged tokens per example)."""
    for count_grids, patches in zip(grid_list, patch_list, strict=True):
        described = num_patches(count_grids) if len(np.asarray(count_grids).reshape(-1)) else 0
        if patches.shape[0] != described:
            raise ValueError(f"{prefix}: {patches.shape[0]} patch rows for grids describing {described}")
    build = families.resolve(families.family_of(model_config).batch_media)
    return build(patch_list, grid_list, batch_size, model_config, prefix)


def _stack_patches(patch_list: Sequence[np.ndarray], batch_size: int, rows: int, patch_dim: int) -> np.ndarray:
    patches = np.zeros((batch_size, rows, patch_dim), np.float32)
    for b, p in enumerate(patch_list):
        patches[b, : p.shape[0]] = p
    return patches


def row_media_arrays(patch_list: Sequence[np.ndarray], grid_list: Sequence[np.ndarray], batch_size: int,
                     model_config: Any, prefix: str) -> dict[str, Any]:
    """`media_arrays` for a tower that reads patch rows in the processor's order (Qwen3-VL): the
    layout is per row, aligned with the patches ([B, P, ...], `qwen3vl_layout.batch_layouts`)."""
    vc = model_config.vision
    merge = vc.spatial_merge_size**2
    layouts = [qwen3_vision_layout(g, vc) for g in grid_list]
    counts = [lay.valid.shape[0] for lay in layouts]
    frame_lens = {lay.frame_len for lay, n in zip(layouts, counts, strict=True) if n}
    frame_len = frame_lens.pop() if len(frame_lens) == 1 else 0
    # Rows in whole frames when all frames share a size (padding then forms frames of its own and
    # attention stays a reshape). No media at all: one merge unit, so that padding to another
    # process's rows (pad_to_agreed) keeps that process's whole frames.
    rows = bucket(max([merge, *counts]), frame_len or (16 * merge if any(counts) else merge))
    layout = stack_layouts(layouts, rows, batch_size, frame_len)
    out = {f"{prefix}_patches": _stack_patches(patch_list, batch_size, rows, vc.patch_dim),
           f"{prefix}_frame_len": np.int32(layout.frame_len),
           f"{prefix}_tokens": (np.sum(layout.valid, axis=1) // merge).astype(np.int32)}
    for field in ("rotary_pos", "frame_id", "interp_index", "interp_weight", "valid"):
        out[f"{prefix}_{field}"] = getattr(layout, field)
    return out


def window_media_arrays(patch_list: Sequence[np.ndarray], grid_list: Sequence[np.ndarray], batch_size: int,
                        model_config: ModelConfig, prefix: str) -> dict[str, Any]:
    """`media_arrays` for the Qwen2.5-VL windowed tower.

    Example b's patches [n_b, C] and grids [k_b, 3] become patches [B, P, C] and a layout padded
    to [B, S] slots / [B, U] merged tokens (P, S rounded up to powers of two; U = P / merge^2).
    Rows past the examples hold nothing valid. All examples share `frame_len` when their frames
    have one padded size (the usual case), else 0 (segment-mask attention).
    """
    vc = model_config.vision
    merge = vc.spatial_merge_size**2
    grids = [np.asarray(g, np.int64).reshape(-1, 3) for g in grid_list]
    layouts = [vision_layout(g, vc) if len(g) else _empty_layout() for g in grids]
    counts = [num_patches(g) if len(g) else 0 for g in grids]
    frame_lens = {lay.frame_len for lay, n in zip(layouts, counts, strict=True) if n}
    frame_len = frame_lens.pop() if len(frame_lens) == 1 else 0
    rows = bucket(max([merge, *counts]), 4 * vc.window_len)
    base = max(frame_len, vc.window_len)
    slots = bucket(max([base, *(lay.patch_index.shape[0] for lay in layouts)]), base)
    layouts += [_empty_layout()] * (batch_size - len(layouts))
    padded = [pad_layout(VisionLayout(lay.patch_index, lay.valid, lay.rotary_pos, lay.frame_id, lay.unit_slot,
                                      frame_len), slots, rows // merge, zero_row=rows) for lay in layouts]
    out = {f"{prefix}_patches": _stack_patches(patch_list, batch_size, rows, vc.patch_dim),
           f"{prefix}_frame_len": np.int32(frame_len),
           f"{prefix}_tokens": np.array(counts + [0] * (batch_size - len(counts)), np.int32) // merge}
    for field in ("patch_index", "valid", "rotary_pos", "frame_id", "unit_slot"):
        out[f"{prefix}_{field}"] = np.stack([np.asarray(getattr(lay, field)) for lay in padded])
    return out


def imagery_segments(grids: np.ndarray, merge: int, latent_size: int, units: int) -> np.ndarray:
    """For each merged imagery token of one example: the target row (image * latent_size + chunk)
    it is averaged into, or -1 when it falls in an image's trimmed remainder or padding."""
    segments = np.full(units, -1, np.int32)
    start = 0
    for image, grid in enumerate(np.asarray(grids).reshape(-1, 3)):
        count = int(np.prod(grid)) // merge
        chunk = count // latent_size
        rank = np.arange(chunk * latent_size)
        segments[start:start + rank.size] = image * latent_size + rank // chunk
        start += count
    return segments


# ----------------------------------------------------------------------------- the batch schema
# What `collate` returns: per-row arrays with the batch on axis 0 (position_ids [3, B, L] on axis 1);
# `{video,imagery}_*` media arrays whose `*_frame_len` scalars are static sizes of the compiled step;
# text fields (object arrays) that stay on the host for rewards and eval. A row holds one example, or
# several when packed (`segment_ids` 1, 2, ... per example, 0 = padding).

BATCH_AXIS = {"position_ids": 1}
MEDIA_PREFIXES = ("video", "imagery")
# The token axis of the arrays laid out along the sequence: a left-padded batch (prompts, which has
# `rope_deltas`) grows at the front of this axis, so every row keeps ending in its last token.
SEQUENCE_AXIS = {"input_ids": 1, "targets": 1, "attention_mask": 1, "segment_ids": 1, "loss_mask": 1,
                 "latent_mask": 1, "position_ids": 2}
# Arrays whose padding is not zero: a padding entry of `loss_positions` points nowhere, and a padding
# merged token of `imagery_segment` feeds no imagery target (-1, as `imagery_segments` marks them).
PAD_VALUE = {"loss_positions": -1, "imagery_segment": -1}


def batch_axis(key: str) -> int:
    """The axis of a per-example array that holds the batch."""
    return BATCH_AXIS.get(key, 0)


def device_arrays(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """The numeric per-example arrays of a batch: what goes to the devices, split by example."""
    rows = batch["input_ids"].shape[0]
    return {key: value for key, value in batch.items()
            if isinstance(value, np.ndarray) and value.dtype != object and value.ndim
            and value.shape[batch_axis(key)] == rows}


def _padded_keys(batch: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object and v.ndim)


def shape_summary(batch: dict[str, Any]) -> np.ndarray:
    """One process's sizes, for `pad_to_agreed`: every numeric array's shape (padded to 4 axes),
    then (frame_len, any media used) per media prefix."""
    shapes = [list(batch[k].shape) + [0] * (4 - batch[k].ndim) for k in _padded_keys(batch)]
    media = [[int(batch[f"{p}_frame_len"]), int(batch[f"{p}_valid"].any())] for p in MEDIA_PREFIXES]
    return np.concatenate([np.ravel(np.array(shapes, np.int64)), np.ravel(media)]).astype(np.int64)


def pad_to_agreed(batch: dict[str, Any], summaries: np.ndarray) -> dict[str, Any]:
    """A process's batch padded to the largest shapes of every process's `shape_summary` [P, n].

    Padding is zeros (the pad token in `input_ids`) at the end of each axis: no attention, no loss,
    invalid media slots, rows past every example's media (which read padding patches that nothing
    attends to). A left-padded batch grows its sequences at the front instead, and its rows' rope
    deltas and loss positions move with their tokens, so it equals the batch one process would have
    collated from every process's rows. The largest bucket of any process is a bucket, so every
    process ends up on the same one. A process whose rows have no media of a kind has an empty
    layout, which fits any frame size. `loss_positions` grows with entries that point nowhere (-1).
    """
    keys = _padded_keys(batch)
    summaries = np.asarray(summaries)
    largest = summaries[:, :4 * len(keys)].max(axis=0).reshape(len(keys), 4)
    left = "rope_deltas" in batch
    out = dict(batch)
    for i, prefix in enumerate(MEDIA_PREFIXES):
        every = summaries[:, 4 * len(keys) + 2 * i: 4 * len(keys) + 2 * i + 2]
        sizes = {int(f) for f, used in every if used}
        if len(sizes) > 1:
            raise RuntimeError(f"processes hold {prefix} frames of different sizes {sorted(sizes)}; use one frame "
                               "size per run")
        out[f"{prefix}_frame_len"] = np.int32(sizes.pop() if sizes else 0)
    for key, want in zip(keys, largest, strict=True):
        value = batch[key]
        pad = [(0, int(w) - d) for d, w in zip(value.shape, want, strict=False)]
        if left and key in SEQUENCE_AXIS:
            pad[SEQUENCE_AXIS[key]] = pad[SEQUENCE_AXIS[key]][::-1]
        fill = int(batch.get("pad_token_id", 0)) if key == "input_ids" else PAD_VALUE.get(key, 0)
        out[key] = np.pad(value, pad, constant_values=fill) if any(a or b for a, b in pad) else value
    if left:
        grown = out["input_ids"].shape[1] - batch["input_ids"].shape[1]
        rows = np.asarray(batch["example_mask"], bool)
        # decoding slot s + delta is the same position when every slot moved right by `grown`
        out["rope_deltas"] = np.where(rows, batch["rope_deltas"] - grown, batch["rope_deltas"]).astype(np.int32)
        if "loss_positions" in out:
            positions = out["loss_positions"]
            out["loss_positions"] = np.where(positions >= 0, positions + grown, positions).astype(np.int32)
    return out


def pack(lengths: Sequence[int], rows: int) -> list[list[int]]:
    """Example indices per row for `rows` packed rows: longest first, each into the row with the
    fewest tokens so far (the longest row sets the bucket every row is padded to). Indices in a row
    keep their input order, so a packed row reads its examples in stream order."""
    filled, members = [0] * rows, [[] for _ in range(rows)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = min(range(rows), key=lambda r: (filled[r], r))
        filled[row] += lengths[i]
        members[row].append(i)
    return [sorted(m) for m in members]


# How the arrays of one example are joined when several share a row: along axis 0 unless named.
_JOIN_AXIS = {"position_ids": 1}
_GRID_KEYS = ("video_grid", "imagery_grids")


def merge_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several featurized examples as one packed sequence: tokens, labels, masks and M-RoPE positions
    (each example's own, from 0) end to end, with `segment_ids` 1, 2, ...; media and imagery
    targets in the same order, so each example's placeholders and latent pads read its own. The
    host-side fields (answer, sample_id, stream_position, ...) are the first example's: a packed row
    is for teacher-forced training, where only the tokens count."""
    if len(examples) == 1:
        return {**examples[0], "segment_ids": np.ones(len(examples[0]["input_ids"]), np.int32)}
    merged = dict(examples[0])
    for key in ("input_ids", "targets", "loss_mask", "latent_mask", "position_ids", "video_patches",
                "imagery_patches", *_GRID_KEYS):
        parts = [np.asarray(e[key]) for e in examples]
        if key in _GRID_KEYS:
            parts = [p.reshape(-1, 3) for p in parts]
        merged[key] = np.concatenate(parts, axis=_JOIN_AXIS.get(key, 0))
    merged["video_grid"] = merged["video_grid"].reshape(-1)
    if any("latent_targets" in e for e in examples):
        hidden = next(e["latent_targets"].shape[-1] for e in examples if "latent_targets" in e)
        merged["latent_targets"] = np.concatenate([e.get("latent_targets", np.zeros((0, hidden), np.float32))
                                                   for e in examples])
    merged["segment_ids"] = np.concatenate([np.full(len(e["input_ids"]), i + 1, np.int32)
                                            for i, e in enumerate(examples)])
    return merged


def collate(examples: Sequence[dict[str, Any] | BadExample], batch_size: int, seq_buckets: Sequence[int],
            model_config: ModelConfig, latent_size: int, left_pad: bool = False,
            packed_rows: int = 0) -> dict[str, Any]:
    """A fixed-shape batch of `batch_size` rows from the good examples (bad ones counted).

    left_pad puts each row's tokens at the right edge (prompts for generation) and adds
    `rope_deltas` [B]: a token decoded into cache slot s sits at M-RoPE position s + delta.
    packed_rows > 0 packs the examples (up to `batch_size` of them) into that many rows instead
    (`pack`, `merge_examples`): the bucket then fits the longest packed row, and attention stays
    within each example through `segment_ids`.
    """
    good = [e for e in examples if not isinstance(e, BadExample)]
    skipped = [e.reason for e in examples if isinstance(e, BadExample)]
    if packed_rows:
        if left_pad:
            raise ValueError("packed rows are for teacher-forced training; prompts (left_pad) are not packed")
        rows = pack([len(e["input_ids"]) for e in good], packed_rows)
        good = [merge_examples([good[i] for i in row]) for row in rows if row]
        batch_size = packed_rows
    longest = max((len(e["input_ids"]) for e in good), default=1)
    length = next((b for b in sorted(seq_buckets) if b >= longest), None)
    if length is None:
        raise ValueError(f"{'a packed row' if packed_rows else 'an example'} of {longest} tokens exceeds the "
                         f"largest sequence bucket {max(seq_buckets)}")
    pad_id = model_config.pad_token_id or 0
    batch: dict[str, Any] = {
        "input_ids": np.full((batch_size, length), pad_id, np.int32),
        "targets": np.zeros((batch_size, length), np.int32),
        "attention_mask": np.zeros((batch_size, length), np.int32),
        "segment_ids": np.zeros((batch_size, length), np.int32),
        "loss_mask": np.zeros((batch_size, length), np.float32),
        "latent_mask": np.zeros((batch_size, length), bool),
        "position_ids": np.zeros((3, batch_size, length), np.int32),
        "example_mask": np.zeros(batch_size, bool),
        # each row's position in the stream every process reads (-1: a padding row); see pipeline.StreamPosition
        "stream_position": np.full(batch_size, -1, np.int32),
        "pad_token_id": np.int32(pad_id),
    }
    if left_pad:
        batch["rope_deltas"] = np.zeros(batch_size, np.int32)
    for row, e in enumerate(good):
        n = len(e["input_ids"])
        cols = slice(length - n, length) if left_pad else slice(0, n)
        batch["input_ids"][row, cols] = e["input_ids"]
        batch["targets"][row, cols] = e["targets"]
        batch["attention_mask"][row, cols] = 1
        batch["segment_ids"][row, cols] = e.get("segment_ids", 1)
        batch["loss_mask"][row, cols] = e["loss_mask"]
        batch["latent_mask"][row, cols] = e["latent_mask"]
        batch["position_ids"][:, row, cols] = e["position_ids"]
        batch["example_mask"][row] = True
        batch["stream_position"][row] = e.get("stream_position", row)
        if left_pad:
            batch["rope_deltas"][row] = int(np.max(e["position_ids"])) + 1 - length
    batch.update(media_arrays([e["video_patches"] for e in good], [e["video_grid"] for e in good], batch_size,
                              model_config, "video"))
    batch.update(media_arrays([e["imagery_patches"] for e in good], [e["imagery_grids"] for e in good], batch_size,
                              model_config, "imagery"))
    merge = model_config.vision.spatial_merge_size**2
    units = batch["imagery_patches"].shape[1] // merge
    batch["imagery_segment"] = np.full((batch_size, units), -1, np.int32)
    for row, e in enumerate(good):
        batch["imagery_segment"][row] = imagery_segments(e["imagery_grids"], merge, latent_size, units)
    if any("latent_targets" in e for e in good):
        hidden = model_config.text.hidden_size
        k = bucket(max([latent_size, *(len(e.get("latent_targets", ())) for e in good)]), latent_size)
        batch["latent_targets"] = np.zeros((batch_size, k, hidden), np.float32)
        for row, e in enumerate(good):
            targets = e.get("latent_targets", np.zeros((0, hidden), np.float32))
            batch["latent_targets"][row, : len(targets)] = targets
    batch["loss_positions"] = loss_positions(batch["loss_mask"])
    batch["num_skipped"] = np.int32(len(skipped))
    batch["prompt_length"] = np.array([e["prompt_length"] for e in good] + [0] * (batch_size - len(good)), np.int32)
    for key in ("answer", "sample_id", "family", "subtask", "trace"):
        batch[key] = np.array([e.get(key, "") for e in good] + [""] * (batch_size - len(good)), dtype=object)
    batch["num_options"] = np.array([e.get("num_options", 4) for e in good] + [4] * (batch_size - len(good)),
                                    np.int32)
    return batch


MIN_LOSS_POSITIONS = 16


def loss_positions(loss_mask: np.ndarray) -> np.ndarray:
    """The supervised positions of each row [B, W], -1 past a row's last: the positions whose logits
    the loss needs (the assistant turns, not the prompts and their video tokens). W is a power of
    two (at least MIN_LOSS_POSITIONS, at most the row length), so it takes few distinct values."""
    supervised = [np.flatnonzero(mask) for mask in np.asarray(loss_mask)]
    most = max([1, *(s.size for s in supervised)])
    width = min(loss_mask.shape[1], max(MIN_LOSS_POSITIONS, 1 << (most - 1).bit_length()))
    out = np.full((len(supervised), width), -1, np.int32)
    for row, s in enumerate(supervised):
        out[row, : s.size] = s
    return out
