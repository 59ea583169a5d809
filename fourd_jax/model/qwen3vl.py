"""Qwen3-VL in Flax Linen: its vision tower (learned + 2D rotary positions, DeepStack mergers) on
the shared Qwen decoder (`fourd_jax.model.text`, with QK-norm and interleaved M-RoPE) and the shared
multimodal wrapper (`fourd_jax.model.vlm.Qwen25VL`).

The tower attends within each temporal patch of each media item (the reference's `cu_seqlens`):
a reshape to [frames, frame_len] when all frames have the same size, a same-frame mask otherwise.
Its output stacks the merged tokens and one DeepStack feature per `deepstack_visual_indexes` block:
[U, 1 + K, D]; the DeepStack features are added to the hidden states of decoder layers 0 .. K-1
at the visual positions.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from fourd_jax.errors import InputError
from fourd_jax.model.inputs import VisionInputs
from fourd_jax.model.layers import Dense, LayerNorm, remat_policy
from fourd_jax.model.qwen3vl_config import Qwen3VLConfig
from fourd_jax.model.qwen3vl_layout import Qwen3VisionLayout
from fourd_jax.model.vision import VisionAttention, vision_rotary
from fourd_jax.model.vlm import Qwen25VL, place_media


class Qwen3VisionBlock(nn.Module):
    """Pre-LayerNorm ViT block: the shared vision attention, then fc1 -> GELU (tanh) -> fc2."""

    config: Qwen3VLConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, groups: int):
        vc = self.config.vision
        dtype, pdtype, std = self.config.jnp_dtype, self.config.jnp_param_dtype, self.config.initializer_range
        norm = lambda name: LayerNorm(vc.layer_norm_eps, dtype, pdtype, "vision_embed", name=name)  # noqa: E731
        x = x + VisionAttention(self.config, name="attn")(norm("norm1")(x), cos, sin, mask, groups)
        y = Dense((vc.hidden_size,), (vc.intermediate_size,), ("vision_embed",), ("vision_mlp",), True, dtype, pdtype,
                  std, name="linear_fc1")(norm("norm2")(x))
        y = jax.nn.gelu(y, approximate=True)  # "gelu_pytorch_tanh"
        return x + Dense((vc.intermediate_size,), (vc.hidden_size,), ("vision_mlp",), ("vision_embed",), True, dtype,
                         pdtype, std, name="linear_fc2")(y)


class Qwen3PatchMerger(nn.Module):
    """LayerNorm, 2x2 neighbouring patches concatenated, fc1 -> GELU -> fc2 to the decoder width.

    The main merger normalises each patch before concatenating; the DeepStack mergers
    (`postshuffle`) normalise the concatenated vector."""

    config: Qwen3VLConfig
    postshuffle: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        vc = self.config.vision
        dtype, pdtype, std = self.config.jnp_dtype, self.config.jnp_param_dtype, self.config.initializer_range
        merged = vc.hidden_size * vc.spatial_merge_size**2
        norm = LayerNorm(vc.layer_norm_eps, dtype, pdtype, "vision_merge" if self.postshuffle else "vision_embed",
                         name="norm")
        x = norm(x.reshape(-1, merged)) if self.postshuffle else norm(x).reshape(-1, merged)
        x = Dense((merged,), (merged,), ("vision_merge",), ("vision_merge_out",), True, dtype, pdtype, std,
                  name="linear_fc1")(x)
        x = jax.nn.gelu(x, approximate=False)
        return Dense((merged,), (vc.out_hidden_size,), ("vision_merge_out",), ("embed",), True, dtype, pdtype, std,
                     name="linear_fc2")(x)


def flatten_examples(patches: jax.Array, layout: Qwen3VisionLayout) -> tuple[jax.Array, Qwen3VisionLayout]:
    """Per-example patches [B, P, C] and layouts [B, P, ...] as one flat run of B * P rows, each
    example's frames kept apart (frame ids offset by P per example, as no example has more)."""
    b, p, c = patches.shape
    offset = (jnp.arange(b) * p)[:, None]
    flat = lambda a: a.reshape(b * p, *a.shape[2:])  # noqa: E731
    return patches.reshape(b * p, c), Qwen3VisionLayout(
        rotary_pos=flat(layout.rotary_pos), frame_id=flat(layout.frame_id + offset),
        interp_index=flat(layout.interp_index), interp_weight=flat(layout.interp_weight),
        valid=flat(layout.valid), frame_len=layout.frame_len)


class Qwen3VisionTower(nn.Module):
    """Patch rows and their layout -> merged tokens and their K DeepStack features.

    Flat: patches [N, C*T*P*P] in the processor's order -> [N / merge^2, 1 + K, D]. Per example
    (the training pipeline): patches [B, P, C*T*P*P] + layouts [B, P, ...] -> [B, P / merge^2, 1 + K, D].
    """

    config: Qwen3VLConfig

    @nn.compact
    def __call__(self, patches: jax.Array, layout: Qwen3VisionLayout) -> jax.Array:
        vc = self.config.vision
        dtype, pdtype, std = self.config.jnp_dtype, self.config.jnp_param_dtype, self.config.initializer_range
        if patches.ndim not in (2, 3):
            raise InputError(f"Qwen3-VL takes pixel rows [patches, {vc.patch_dim}] or per example "
                             f"[batch, patches, {vc.patch_dim}], got shape {tuple(patches.shape)}.")
        batch = None
        if patches.ndim == 3:  # per example: one flat run; attention never crosses examples
            batch = patches.shape[0]
            patches, layout = flatten_examples(patches, layout)
        chex.assert_shape(patches, (None, vc.patch_dim))
        n = patches.shape[0]
        chex.assert_shape([layout.interp_index, layout.interp_weight], (n, 4))
        chex.assert_shape(layout.valid, (n,))
        # A Conv3d with stride = kernel over (C, T, P, P) is a matmul on the flattened patch row.
        x = Dense((vc.patch_dim,), (vc.hidden_size,), ("vision_patch",), ("vision_embed",), True, dtype, pdtype, std,
                  name="patch_embed")(patches.astype(dtype))
        table = nn.Embed(vc.num_position_embeddings, vc.hidden_size, dtype=dtype, param_dtype=pdtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std),
                                                                     ("vision_pos", "vision_embed")),
                         name="pos_embed")
        # Learned positions, bilinearly resampled to the grid: four table rows blended per patch.
        blended = table(layout.interp_index).astype(jnp.float32) * layout.interp_weight[..., None]
        x = x + jnp.sum(blended, axis=1).astype(dtype)
        cos, sin = vision_rotary(layout.rotary_pos, vc)

        # Attention within each frame, never to padding rows (batch padding).
        if layout.frame_len:
            groups = n // layout.frame_len
            mask = jnp.broadcast_to(layout.valid.reshape(groups, 1, layout.frame_len),
                                    (groups, layout.frame_len, layout.frame_len))
        else:
            groups = 1
            mask = ((layout.frame_id[:, None] == layout.frame_id[None, :]) & layout.valid[None])[None]

        block = Qwen3VisionBlock
        if self.config.remat_policy != "none":
            block = nn.remat(Qwen3VisionBlock, policy=remat_policy(self.config.remat_policy),
                             static_argnums=(5,))  # `groups`; self counts as argument 0
        deepstack = []
        for i in range(vc.depth):
            x = block(self.config, name=f"blocks_{i}")(x, cos, sin, mask, groups)
            if i in vc.deepstack_visual_indexes:
                k = vc.deepstack_visual_indexes.index(i)
                deepstack.append(Qwen3PatchMerger(self.config, postshuffle=True, name=f"deepstack_merger_{k}")(x))
        merged = Qwen3PatchMerger(self.config, name="merger")(x)
        stacked = jnp.stack([merged, *deepstack], axis=1)
        return stacked if batch is None else stacked.reshape(batch, -1, *stacked.shape[1:])


class Qwen3VL(Qwen25VL):
    """Qwen3-VL for conditional generation: called like `Qwen25VL` (the processor's outputs, or
    prepared `vision=` / `position_ids=`, a KV cache for decoding). The inherited `encode_vision`
    returns the tower's [U, 1 + K, D] (merged tokens, then their DeepStack features; [B, U, 1 + K, D]
    per example), which is what `vision_features=` takes; `merged_tokens` is its first slice."""

    config: Qwen3VLConfig

    def vision_tower(self) -> nn.Module:
        return Qwen3VisionTower(self.config)

    def merge_vision(self, embeds: jax.Array, input_ids: jax.Array, vision: VisionInputs,
                     vision_features: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """Merged tokens at the placeholders, and DeepStack features [K, B, L, D] that are zero
        except at the visual positions (images and videos, in placeholder order)."""
        c = self.config
        stacked = self.visual(vision.patches, vision.layout) if vision_features is None else vision_features
        chex.assert_shape(stacked, (..., 1 + c.vision.num_deepstack, c.text.hidden_size))
        n_img = vision.num_image_tokens
        embeds = place_media(embeds, input_ids, stacked[..., 0, :], n_img, c)
        if not c.vision.num_deepstack:
            return embeds, None
        zeros = jnp.zeros_like(embeds)
        deepstack = jnp.stack([place_media(zeros, input_ids, stacked[..., 1 + k, :], n_img, c)
                               for k in range(c.vision.num_deepstack)])
        return embeds, deepstack

    def merged_tokens(self, vision: VisionInputs) -> jax.Array:
        """The merged visual tokens alone ([U, D], or [B, U, D] per example): what latent imagery
        targets are made of (SPEC 3.2), without the DeepStack features."""
        return self.encode_vision(vision)[..., 0, :]
