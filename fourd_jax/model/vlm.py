"""The full Qwen2.5-VL network: vision features merged into text embeddings, decoder, LM head.

Call it with the arrays a `transformers` Qwen2.5-VL processor returns; media and position
bookkeeping that depends on data values (grids, placeholder runs) is done on the host by
`fourd_jax.model.inputs` (`prepare_vision`, `prepare_inputs`) and `positions.get_rope_index`. Under
`jax.jit`, pass their results (`vision=`, `position_ids=`) so the traced function has static shapes;
`fourd_jax.model.apply` has the jitted entry points.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fourd_jax.errors import InputError
from fourd_jax.model import rope
from fourd_jax.model.config import ModelConfig
from fourd_jax.model.inputs import VisionInputs, check_placeholders, host_array, prepare_vision, rope_index
from fourd_jax.model.layers import Dense
from fourd_jax.model.text import KVCache, TextDecoder
from fourd_jax.model.vision import VisionTower


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, L, vocab] (None when compute_logits=False)
    hidden_states: jax.Array  # [B, L, hidden], final (post-norm) hidden states
    kv_cache: KVCache | None


def replace_rows(embeds: jax.Array, where: jax.Array, rows: jax.Array) -> jax.Array:
    """Put rows into embeds [B, L, D] at the True entries of where [B, L], in order.

    rows [N, D]: one sequence of rows consumed in row-major order over (batch, position), the
    order the processor writes placeholders in. rows [B, N, D]: each batch row consumes its own.
    Extra rows are ignored, so padded `rows` keep shapes static.
    """
    chex.assert_rank([embeds, where], [3, 2])
    chex.assert_shape(where, embeds.shape[:2])
    chex.assert_axis_dimension(rows, -1, embeds.shape[2])
    if rows.ndim == 3:
        index = jnp.clip(jnp.cumsum(where, axis=1) - 1, 0, max(rows.shape[1] - 1, 0))
        picked = jnp.take_along_axis(rows.astype(embeds.dtype), index[..., None], axis=1)
    else:
        chex.assert_rank(rows, 2)
        index = jnp.clip(jnp.cumsum(where.reshape(-1)) - 1, 0, max(rows.shape[0] - 1, 0))
        picked = rows.astype(embeds.dtype)[index].reshape(embeds.shape)
    return jnp.where(where[..., None], picked, embeds)


def place_media(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, num_image_tokens: int,
                config: ModelConfig) -> jax.Array:
    """Merged visual tokens [..., U, D] (images first, then videos) written into embeds [B, L, D] at
    the image and video placeholders of input_ids, in order."""
    if num_image_tokens:
        embeds = replace_rows(embeds, input_ids == config.image_token_id, features[..., :num_image_tokens, :])
    if features.shape[-2] > num_image_tokens:
        embeds = replace_rows(embeds, input_ids == config.video_token_id, features[..., num_image_tokens:, :])
    return embeds


def attention_mask_for(
    attention_mask: jax.Array | None, batch: int, length: int, cache_len: int | None, cache_index,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, L, K] mask: causal, and keys that are not padding.

    Without a cache K = L and attention_mask is [B, L]; with a cache of K slots the queries sit
    at slots cache_index .. cache_index + L - 1 and attention_mask is [B, K] over the slots.
    segment_ids [B, L] (no cache): packed rows, where a token attends only within its own segment.
    """
    if cache_len is None:
        keys = jnp.arange(length)
        causal = keys[None, :] <= keys[:, None]
        ok = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask != 0
        mask = causal[None] & ok[:, None, :]
        if segment_ids is not None:
            mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        return mask
    slots = cache_index + jnp.arange(length)
    causal = jnp.arange(cache_len)[None, :] <= slots[:, None]
    ok = jnp.ones((batch, cache_len), bool) if attention_mask is None else attention_mask != 0
    return causal[None] & ok[:, None, :]


class Qwen25VL(nn.Module):
    """Qwen2.5-VL for conditional generation, with latent-imagery inputs (SPEC 3.1-3.3)."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.visual = self.vision_tower()
        self.language_model = TextDecoder(c)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(
                (c.text.hidden_size,), (c.text.vocab_size,), ("embed",), ("vocab",), False,
                c.jnp_dtype, c.jnp_param_dtype, c.initializer_range,
            )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        pixel_values_videos: jax.Array | None = None,
        video_grid_thw: jax.Array | None = None,
        second_per_grid_ts: jax.Array | None = None,
        mm_token_type_ids: jax.Array | None = None,
        *,
        position_ids: jax.Array | None = None,
        vision: VisionInputs | None = None,
        vision_features: jax.Array | None = None,
        latent_embeds: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        kv_cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Forward pass.

        Args:
          input_ids: [B, L] token ids (left or right padded).
          attention_mask: [B, L] (1 = token, 0 = padding); with `kv_cache`, [B, cache length]
            over the cache slots.
          pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts,
            mm_token_type_ids: as returned by the `transformers` processor (all optional).
          position_ids: [3, B, L] M-RoPE positions; computed from the inputs when omitted.
          vision: precomputed `prepare_vision(...)` (instead of the pixel arguments).
          vision_features: the merged visual tokens of `vision` (`encode_vision`), computed once
            outside, e.g. by a frozen tower shared by several calls: the tower is then not run.
          latent_embeds: vectors that replace the input embeddings at the `<|latent_pad|>`
            positions: [N, hidden] in row-major order, or [B, N, hidden] per batch row.
          segment_ids: [B, L] for rows packed with several sequences (1, 2, ... per sequence):
            attention stays within a sequence. Not with `kv_cache`.
          kv_cache: a cache to write this chunk into at slot `cache_index` and attend over.
          compute_logits: False returns only hidden states (e.g. for the latent loss).
        """
        c = self.config
        host_ids = input_ids  # the caller's array: concrete unless the caller is being traced
        batch, length = input_ids.shape
        media_given = any(a is not None for a in (pixel_values, pixel_values_videos, image_grid_thw, video_grid_thw))
        if media_given and vision is not None:
            raise InputError("Pass either pixel arguments or `vision=`, not both.")
        if media_given:
            vision = prepare_vision(c, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        check_placeholders(c, host_ids, image_grid_thw, video_grid_thw, mm_token_type_ids)

        if position_ids is None:
            if kv_cache is not None and not (isinstance(cache_index, int) and cache_index == 0):
                raise InputError("Decoding into a non-empty KV cache needs explicit `position_ids`.")
            row_mask = attention_mask
            if kv_cache is not None and attention_mask is not None:
                row_mask = host_array(attention_mask, "attention_mask")[:, :length]
            if vision is not None and not media_given:
                raise InputError("With precomputed `vision=`, pass `position_ids=` too (see get_rope_index).")
            position_ids, _ = rope_index(
                c, host_array(host_ids, "input_ids"),
                host_array(image_grid_thw, "image_grid_thw") if image_grid_thw is not None else None,
                host_array(video_grid_thw, "video_grid_thw") if video_grid_thw is not None else None,
                host_array(second_per_grid_ts, "second_per_grid_ts") if second_per_grid_ts is not None else None,
                None if row_mask is None else host_array(row_mask, "attention_mask"),
            )
        input_ids = jnp.asarray(input_ids)
        position_ids = jnp.asarray(position_ids)
        if position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)

        embeds = self.language_model.embed(input_ids)
        if vision_features is not None and vision is None:
            raise InputError("`vision_features` fill the placeholders `vision=` lays out: pass both.")
        deepstack = None
        if vision is not None:
            embeds, deepstack = self.merge_vision(embeds, input_ids, vision, vision_features)
        if latent_embeds is not None:
            if c.latent_pad_token_id is None:
                raise InputError("`latent_embeds` given but the config has no latent_pad_token_id.")
            embeds = replace_rows(embeds, input_ids == c.latent_pad_token_id, latent_embeds)

        cache_len = None if kv_cache is None else kv_cache.max_len
        if segment_ids is not None and kv_cache is not None:
            raise InputError("segment_ids (packed rows) cannot be combined with a KV cache.")
        mask = attention_mask_for(attention_mask, batch, length, cache_len, cache_index, segment_ids)
        cos, sin = rope.mrope_cos_sin(position_ids, c.text)
        cos, sin = cos.astype(c.jnp_dtype), sin.astype(c.jnp_dtype)
        hidden, new_cache = self.language_model(embeds, cos, sin, mask, kv_cache, cache_index, deepstack)
        logits = self.logits(hidden) if compute_logits else None
        return ModelOutput(logits=logits, hidden_states=hidden, kv_cache=new_cache)

    def vision_tower(self) -> nn.Module:
        """The family's vision tower (built in setup)."""
        return VisionTower(self.config)

    def merge_vision(self, embeds: jax.Array, input_ids: jax.Array, vision: VisionInputs,
                     vision_features: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """Input embeddings with the media's merged tokens at their placeholders, and the decoder's
        DeepStack features (None: Qwen2.5-VL has none)."""
        features = (self.visual(vision.patches, vision.layout) if vision_features is None
                    else vision_features)  # [U, D] or per example [B, U, D]
        return place_media(embeds, input_ids, features, vision.num_image_tokens, self.config), None

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits for final hidden states [..., hidden]."""
        if self.config.tie_word_embeddings:
            return self.language_model.attend(hidden.astype(self.config.jnp_dtype))
        return self.lm_head(hidden)

    def encode_vision(self, vision: VisionInputs) -> jax.Array:
        """Merged visual tokens [N / merge^2, hidden] for the media in `vision`."""
        return self.visual(vision.patches, vision.layout)

    def merged_tokens(self, vision: VisionInputs) -> jax.Array:
        """The merged visual tokens [U, D] (per example [B, U, D]) the latent imagery targets are
        pooled from (SPEC 3.2); for Qwen2.5-VL, `encode_vision` itself."""
        return self.encode_vision(vision)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Input token embeddings [..., hidden]."""
        return self.language_model.embed(input_ids)
