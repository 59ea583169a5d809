"""Host-side input preparation: processor outputs and training batches -> what the jitted model takes.

Media layout and M-RoPE positions depend on data values (grids, placeholder runs), so they are
computed here in numpy, outside `jax.jit`; the results (`VisionInputs`, `PreparedInputs`) are
pytrees with static shapes that the traced model (`fourd_jax.model.vlm`) consumes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fourd_jax import families
from fourd_jax.errors import InputError
from fourd_jax.model.config import ModelConfig
from fourd_jax.model.layout import VisionLayout, num_patches
from fourd_jax.model.qwen3vl_layout import Qwen3VisionLayout

# The layouts are host numpy (JAX-free for the data pipeline); on their way into jit their arrays
# are leaves and frame_len is static.
jax.tree_util.register_dataclass(
    VisionLayout, data_fields=["patch_index", "valid", "rotary_pos", "frame_id", "unit_slot"],
    meta_fields=["frame_len"])
jax.tree_util.register_dataclass(
    Qwen3VisionLayout, data_fields=["rotary_pos", "frame_id", "interp_index", "interp_weight", "valid"],
    meta_fields=["frame_len"])


def rope_index(config: Any, input_ids: Any, image_grid_thw: Any = None, video_grid_thw: Any = None,
               second_per_grid_ts: Any = None, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions [3, B, L] and rope deltas [B] by the config's family (e.g.
    `fourd_jax.model.positions.get_rope_index` for Qwen2.5-VL)."""
    compute = families.resolve(families.family_of(config).rope_index)
    return compute(config, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask)


@flax.struct.dataclass
class VisionInputs:
    """The media of a batch, images first then videos, ready for the vision tower.

    Flat: patches [N, C*T*P*P] with a layout over all media (host `prepare_vision`). Per example:
    patches [B, P, C*T*P*P] with layouts [B, ...] (the training pipeline), so the batch axis can
    be sharded; example b's merged tokens then fill row b's placeholders.
    """

    patches: jax.Array
    layout: VisionLayout | Qwen3VisionLayout  # the family's tower layout
    # Static: the first num_image_tokens merged tokens fill image placeholders, the rest video
    # ones. Grids are not kept, so batches of different media sizes (padded to a bucket) reuse
    # one compiled program.
    num_image_tokens: int = flax.struct.field(pytree_node=False, default=0)


def host_array(x: Any, name: str) -> np.ndarray:
    """A concrete numpy copy of x, or one clear error when x is a tracer."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"`{name}` is traced (e.g. under jax.jit), but it must be concrete to compute positions "
            "and media layout; compute them outside the jitted function with "
            "fourd_jax.model.inputs.prepare_vision / fourd_jax.model.positions.get_rope_index and pass "
            "`vision=` and `position_ids=`."
        )
    return np.asarray(x)


def prepare_vision(
    config: ModelConfig,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    pixel_values_videos: Any = None,
    video_grid_thw: Any = None,
) -> VisionInputs | None:
    """Check the media tensors against their grids and lay them out for the tower (host side)."""
    parts, grids = [], {}
    for pix_name, pix, grid_name, grid in (
        ("pixel_values", pixel_values, "image_grid_thw", image_grid_thw),
        ("pixel_values_videos", pixel_values_videos, "video_grid_thw", video_grid_thw),
    ):
        if pix is None and grid is None:
            continue
        if pix is None or grid is None:
            raise InputError(f"`{pix_name}` and `{grid_name}` must be given together.")
        grid = host_array(grid, grid_name).astype(np.int64).reshape(-1, 3)
        pix = jnp.asarray(pix)
        if pix.ndim != 2 or pix.shape[1] != config.vision.patch_dim:
            raise InputError(
                f"`{pix_name}` must have shape [patches, {config.vision.patch_dim}], got {tuple(pix.shape)}."
            )
        if pix.shape[0] != num_patches(grid):
            raise InputError(
                f"`{pix_name}` has {pix.shape[0]} rows but `{grid_name}` describes {num_patches(grid)} patches."
            )
        parts.append(pix)
        grids[grid_name] = tuple(tuple(int(v) for v in row) for row in grid.tolist())
    if not parts:
        return None
    image_grids, video_grids = grids.get("image_grid_thw", ()), grids.get("video_grid_thw", ())
    return VisionInputs(
        patches=jnp.concatenate(parts) if len(parts) > 1 else parts[0],
        layout=families.resolve(families.family_of(config).vision_layout)(np.array(image_grids + video_grids),
                                                                         config.vision),
        num_image_tokens=num_patches(np.array(image_grids)) // config.vision.spatial_merge_size**2
        if image_grids else 0,
    )


def check_placeholders(config: ModelConfig, input_ids: Any, image_grid_thw: Any = None, video_grid_thw: Any = None,
                       mm_token_type_ids: Any = None) -> None:
    """Host-side check that placeholder tokens match the media grids (skipped for traced ids)."""
    if isinstance(input_ids, jax.core.Tracer):
        return  # shapes are the caller's contract under jit (see replace_rows)
    ids = np.asarray(input_ids)
    if mm_token_type_ids is not None:
        expected = np.where(ids == config.image_token_id, 1, np.where(ids == config.video_token_id, 2, 0))
        if not np.array_equal(host_array(mm_token_type_ids, "mm_token_type_ids"), expected):
            raise InputError("`mm_token_type_ids` disagrees with the image/video tokens in `input_ids`.")
    merge = config.vision.spatial_merge_size**2
    for kind, grid, token_id in (("image", image_grid_thw, config.image_token_id),
                                 ("video", video_grid_thw, config.video_token_id)):
        if grid is None:
            continue  # like transformers: placeholders without media keep their token embeddings
        n_tokens, n_features = int(np.sum(ids == token_id)), num_patches(host_array(grid, f"{kind}_grid_thw")) // merge
        if n_tokens != n_features:
            raise InputError(f"input_ids has {n_tokens} {kind} placeholder tokens but the {kind} inputs give "
                             f"{n_features} features.")


@flax.struct.dataclass
class PreparedInputs:
    """A batch with everything that depends on data values computed on the host."""

    input_ids: jax.Array  # [B, L]
    attention_mask: jax.Array  # [B, L]
    position_ids: jax.Array  # [3, B, L]
    rope_deltas: jax.Array  # [B]; a token decoded into cache slot s sits at s + delta
    vision: VisionInputs | None = None


def prepare_inputs(
    config: ModelConfig,
    input_ids: Any,
    attention_mask: Any = None,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    pixel_values_videos: Any = None,
    video_grid_thw: Any = None,
    second_per_grid_ts: Any = None,
    mm_token_type_ids: Any = None,
) -> PreparedInputs:
    """Check processor outputs and compute media layout and M-RoPE positions (host, numpy)."""
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}.")
    vision = prepare_vision(config, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    check_placeholders(config, ids, image_grid_thw, video_grid_thw, mm_token_type_ids)
    positions, deltas = rope_index(config, ids, image_grid_thw, video_grid_thw, second_per_grid_ts, mask)
    return PreparedInputs(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                          jnp.asarray(positions, jnp.int32), jnp.asarray(deltas, jnp.int32), vision)


def vision_inputs(batch: dict[str, Any], prefix: str) -> VisionInputs:
    """The model's per-example VisionInputs for the `video` or `imagery` arrays of a batch
    (`fourd_jax.data.batching.media_arrays`; frame_len made static). The arrays the batch carries
    say whose layout it is: Qwen3-VL's has `{prefix}_interp_index`."""
    kind = Qwen3VisionLayout if f"{prefix}_interp_index" in batch else VisionLayout
    fields = [f.name for f in dataclasses.fields(kind) if f.name != "frame_len"]
    layout = kind(**{f: batch[f"{prefix}_{f}"] for f in fields}, frame_len=int(batch[f"{prefix}_frame_len"]))
    return VisionInputs(batch[f"{prefix}_patches"], layout, num_image_tokens=0)
