"""Qwen2.5-VL vision tower: patch embedding, 2D rotary, window/full attention, 2x2 merger.

The reference reorders tokens into windows of 8x8 patches and runs variable-length attention.
Here every window is padded to exactly `window_len` slots, so window attention is a reshape to
[num_windows, window_len] with no per-layer gather, and all media items of a batch go through
the tower together. The padded arrangement is computed on the host from the grids
(`fourd_jax.model.layout.vision_layout`); the tower is then a static-shape function of
(patches, layout), which is what `jax.jit` wants. Full-attention blocks attend within one
temporal patch of one media item, as in the reference.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from fourd_jax.model.config import ModelConfig, VisionConfig
from fourd_jax.model.layers import Dense, GatedMLP, RMSNorm, apply_rotary, attention, remat_policy
from fourd_jax.model.layout import VisionLayout


def vision_rotary(pos: jax.Array, config: VisionConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin [Np, head_dim] of the 2D rotary: half the frequencies for rows, half for columns."""
    quarter = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs = pos.astype(jnp.float32)[..., None] * inv_freq  # [Np, 2, head_dim/4]
    freqs = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


class VisionAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, groups: int):
        """x: [Np, E]; attention runs within `groups` equal, contiguous blocks of slots."""
        vc = self.config.vision
        dtype, pdtype = self.config.jnp_dtype, self.config.jnp_param_dtype
        e, h, hd = vc.hidden_size, vc.num_heads, vc.head_dim
        qkv = Dense(
            (e,), (3, h, hd), ("vision_embed",), ("vision_qkv", "vision_heads", "head_dim"),
            True, dtype, pdtype, self.config.initializer_range, name="qkv",
        )(x)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # The reference applies the vision rotary in float32.
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(dtype)
        n = x.shape[0]
        split = lambda a: a.reshape(groups, n // groups, h, hd)  # noqa: E731
        out = attention(split(q), split(k), split(v), mask, hd**-0.5).reshape(n, h, hd)
        return Dense(
            (h, hd), (e,), ("vision_heads", "head_dim"), ("vision_embed",), True, dtype, pdtype,
            self.config.initializer_range, name="proj",
        )(out)


class VisionBlock(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, groups: int):
        vc = self.config.vision
        dtype, pdtype = self.config.jnp_dtype, self.config.jnp_param_dtype
        norm = lambda name: RMSNorm(vc.rms_norm_eps, dtype, pdtype, name=name)  # noqa: E731
        x = x + VisionAttention(self.config, name="attn")(norm("norm1")(x), cos, sin, mask, groups)
        mlp = GatedMLP(
            vc.hidden_size, vc.intermediate_size, True, dtype, pdtype, "vision_embed", "vision_mlp",
            self.config.initializer_range, name="mlp",
        )
        return x + mlp(norm("norm2")(x))


class PatchMerger(nn.Module):
    """RMSNorm, then 2x2 neighbouring patches concatenated and projected to the LLM width."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        vc = self.config.vision
        dtype, pdtype = self.config.jnp_dtype, self.config.jnp_param_dtype
        std = self.config.initializer_range
        merged = vc.hidden_size * vc.spatial_merge_size**2
        x = RMSNorm(vc.rms_norm_eps, dtype, pdtype, name="ln_q")(x).reshape(-1, merged)
        x = Dense((merged,), (merged,), ("vision_merge",), ("vision_merge_out",), True, dtype,
                  pdtype, std, name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return Dense((merged,), (vc.out_hidden_size,), ("vision_merge_out",), ("embed",), True,
                     dtype, pdtype, std, name="mlp_2")(x)


def flatten_examples(patches: jax.Array, layout: VisionLayout, merge_units: int) -> tuple[jax.Array, VisionLayout]:
    """Per-example media [B, P, C] with layouts [B, S] / [B, U] -> one flat layout over B * S slots.

    Each example gets its own zero row (its local index P), and its frame and unit ids are
    offset so examples never mix: an example's slots form whole windows and whole frames, so
    attention groups stay inside it, and a sharded leading batch axis stays sharded by example.
    The result reads the rows [B * (P + 1), C] returned alongside it.
    """
    b, p, c = patches.shape
    slots = layout.patch_index.shape[1]
    rows = jnp.concatenate([patches, jnp.zeros((b, 1, c), patches.dtype)], axis=1).reshape(b * (p + 1), c)
    example = jnp.arange(b)[:, None]
    flat = VisionLayout(
        patch_index=(layout.patch_index + example * (p + 1)).reshape(-1),
        valid=layout.valid.reshape(-1),
        rotary_pos=layout.rotary_pos.reshape(-1, 2),
        frame_id=(layout.frame_id + example * slots).reshape(-1),
        unit_slot=(layout.unit_slot + example * (slots // merge_units)).reshape(-1),
        frame_len=layout.frame_len,
    )
    return rows, flat


class VisionTower(nn.Module):
    """Merged visual tokens from patch rows and their layout.

    Flat: patches [N, C*T*P*P] + layout [S] -> [U, text hidden]. Per example: patches [B, P, ...]
    + layouts [B, S] / [B, U] -> [B, U, text hidden].
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, patches: jax.Array, layout: VisionLayout) -> jax.Array:
        vc = self.config.vision
        dtype, pdtype = self.config.jnp_dtype, self.config.jnp_param_dtype
        batch = None
        if patches.ndim == 3:  # per example: flatten, with each example's own zero row
            batch, units = patches.shape[0], layout.unit_slot.shape[1]
            padded, layout = flatten_examples(patches.astype(dtype), layout, vc.spatial_merge_size**2)
        else:  # flat: padding slots read row N, an all-zero patch
            padded = jnp.concatenate([patches.astype(dtype), jnp.zeros((1, vc.patch_dim), dtype)])
        chex.assert_shape(padded, (None, vc.patch_dim))
        chex.assert_shape(layout.rotary_pos, (layout.patch_index.shape[0], 2))
        x = padded[layout.patch_index]
        # A Conv3d with stride = kernel over (C, T, P, P) is a matmul on the flattened patch row.
        x = Dense((vc.patch_dim,), (vc.hidden_size,), ("vision_patch",), ("vision_embed",), False,
                  dtype, pdtype, self.config.initializer_range, name="patch_embed")(x)
        cos, sin = vision_rotary(layout.rotary_pos, vc)

        n = x.shape[0]
        windows = n // vc.window_len
        window_mask = layout.valid.reshape(windows, 1, vc.window_len)
        window_mask = jnp.broadcast_to(window_mask, (windows, vc.window_len, vc.window_len))
        if layout.frame_len:
            frames = n // layout.frame_len
            full_mask = layout.valid.reshape(frames, 1, layout.frame_len)
            full_mask = jnp.broadcast_to(full_mask, (frames, layout.frame_len, layout.frame_len))
        else:
            frames = 1
            full_mask = (layout.frame_id[:, None] == layout.frame_id[None, :]) & layout.valid[None]
            full_mask = full_mask[None]

        block = VisionBlock
        if self.config.remat_policy != "none":
            block = nn.remat(VisionBlock, policy=remat_policy(self.config.remat_policy),
                             static_argnums=(5,))  # `groups`; self counts as argument 0
        for i in range(vc.depth):
            full = i in vc.fullatt_block_indexes
            x = block(self.config, name=f"blocks_{i}")(
                x, cos, sin, full_mask if full else window_mask, frames if full else windows
            )
        merged = PatchMerger(self.config, name="merger")(x)[layout.unit_slot]
        return merged if batch is None else merged.reshape(batch, units, -1)

