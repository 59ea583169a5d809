"""4DThinker latent imagery (SPEC 3.1-3.2) on the model side: embeddings for the latent tokens, and
their targets.

A `<output_image>` marker in a reasoning trace becomes `<|latent_start|>`, `latent_size` x
`<|latent_pad|>`, `<|latent_end|>` (the tokens and their text live in `fourd_jax.data.latent_tokens`).
During DIFT the pad positions are fed the *imagery targets*: the imagery image through the frozen
vision tower and merger, cut into `latent_size` contiguous chunks, each mean-pooled.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fourd_jax.data.latent_tokens import DEFAULT_LATENT_SIZE, add_latent_tokens
from fourd_jax.errors import InputError
from fourd_jax.model.config import ModelConfig
from fourd_jax.model.inputs import prepare_vision
from fourd_jax.model.vlm import Qwen25VL


def grow_embeddings(
    config: ModelConfig, params: Any, token_ids: tuple[int, int, int], num_old_tokens: int
) -> tuple[ModelConfig, Any]:
    """Give the latent tokens embedding (and untied LM-head) rows initialised to the mean row.

    The mean is over the rows of the `num_old_tokens` tokens the tokenizer had before the latent
    tokens were added (Qwen's table has unused padding rows beyond them, which should not count).
    The table grows when a latent id falls past its end. Returns the new config (vocab size and
    latent ids set) and new params; the input params are not modified.
    """
    if not 0 < num_old_tokens <= config.text.vocab_size:
        raise InputError(f"num_old_tokens {num_old_tokens} must be in [1, vocab {config.text.vocab_size}].")
    vocab = max(config.text.vocab_size, max(token_ids) + 1)
    ids = jnp.asarray(token_ids)

    def grow(table: jax.Array) -> jax.Array:  # rows are tokens
        mean = jnp.mean(table[:num_old_tokens].astype(jnp.float32), axis=0).astype(table.dtype)
        if vocab > table.shape[0]:
            table = jnp.concatenate(
                [table, jnp.broadcast_to(mean, (vocab - table.shape[0], table.shape[1]))])
        return table.at[ids].set(mean)

    lm = dict(params["language_model"])
    lm["embed_tokens"] = {"embedding": grow(lm["embed_tokens"]["embedding"])}
    new = dict(params, language_model=lm)
    if not config.tie_word_embeddings:
        new["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"].T).T}
    new_config = config.replace(
        text=dataclasses.replace(config.text, vocab_size=vocab),
        latent_start_token_id=token_ids[0], latent_pad_token_id=token_ids[1],
        latent_end_token_id=token_ids[2],
    )
    return new_config, new


def add_latent_imagery(model: Qwen25VL, params: Any, tokenizer: Any) -> tuple[Qwen25VL, Any]:
    """Add the latent tokens to `tokenizer` and grow the model for them (SPEC 3.1)."""
    num_old = len(tokenizer)
    ids = add_latent_tokens(tokenizer)
    config, params = grow_embeddings(model.config, params, ids, min(num_old, model.config.text.vocab_size))
    return type(model)(config), params


def chunk_means(tokens: jax.Array, latent_size: int = DEFAULT_LATENT_SIZE) -> jax.Array:
    """[N, D] visual tokens of one image -> [latent_size, D]: trim N to a multiple of latent_size,
    split into latent_size contiguous chunks, mean-pool each (float32)."""
    n = tokens.shape[0]
    if n < latent_size:
        raise InputError(f"An imagery image gives {n} visual tokens, fewer than latent_size {latent_size}; "
                         "use a larger image.")
    chunk = n // latent_size
    return tokens[: chunk * latent_size].astype(jnp.float32).reshape(latent_size, chunk, -1).mean(axis=1)


def segment_means(tokens: jax.Array, segments: jax.Array, num_segments: int) -> jax.Array:
    """Mean of the tokens [U, D] in each segment (ids in [0, num_segments), -1 = unused), float32;
    per example for tokens [B, U, D] and segments [B, U].

    The jit-friendly form of `chunk_means` for a batch of imagery images of any sizes: the
    pipeline's `imagery_segment` gives each merged token its (image * latent_size + chunk) row.
    """
    if tokens.ndim == 3:  # per example: [B, U, D] with segments [B, U]
        return jax.vmap(lambda t, s: segment_means(t, s, num_segments))(tokens, segments)
    chex.assert_rank([tokens, segments], [2, 1])
    used = segments >= 0
    ids = jnp.where(used, segments, 0)
    sums = jax.ops.segment_sum(jnp.where(used[:, None], tokens.astype(jnp.float32), 0.0), ids, num_segments)
    counts = jax.ops.segment_sum(used.astype(jnp.float32), ids, num_segments)
    return sums / jnp.maximum(counts, 1.0)[:, None]


@functools.cache
def _merged_tokens(model: Qwen25VL):
    return jax.jit(lambda params, vision: model.apply({"params": params}, vision, method="merged_tokens"))


def imagery_targets(
    model: Qwen25VL, params: Any, pixel_values: Any, image_grid_thw: Any, latent_size: int = DEFAULT_LATENT_SIZE
) -> jax.Array:
    """Latent targets [num_images, latent_size, hidden] for imagery images (processor outputs).

    Each image's merged visual tokens from the frozen tower are reduced by `chunk_means`;
    gradients do not flow back.
    """
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    counts = [int(np.prod(g)) // model.config.vision.spatial_merge_size**2 for g in grids]
    vision = prepare_vision(model.config, pixel_values, grids)
    # the merged tokens alone (Qwen3-VL's tower also returns DeepStack features)
    tokens = jax.lax.stop_gradient(_merged_tokens(model)(params, vision))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    out = jnp.stack([chunk_means(tokens[s:s + n], latent_size) for s, n in zip(starts, counts, strict=True)])
    chex.assert_shape(out, (len(counts), latent_size, model.config.text.hidden_size))
    return out
