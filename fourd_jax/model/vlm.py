"""The full Qwen2.5-VL network: vision features merged into text embeddings, decoder, LM head.

Call it with the arrays a `transformers` Qwen2.5-VL processor returns; media and position
bookkeeping that depends on data values (grids, placeholder runs) is done on the host by
`prepare_vision` and `rope.get_rope_index`. Under `jax.jit`, pass their results (`vision=`,
`position_ids=`) so the traced function has static shapes.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fourd_jax.errors import InputError
from fourd_jax.model import rope
from fourd_jax.model.config import ModelConfig
from fourd_jax.model.layers import Dense
from fourd_jax.model.text import KVCache, TextDecoder
from fourd_jax.model.vision import VisionLayout, VisionTower, num_patches, vision_layout


@flax.struct.dataclass
class VisionInputs:
    """The media of a batch, images first then videos, ready for the vision tower.

    Flat: patches [N, C*T*P*P] with a layout over all media (host `prepare_vision`). Per example:
    patches [B, P, C*T*P*P] with layouts [B, ...] (the training pipeline), so the batch axis can
    be sharded; example b's merged tokens then fill row b's placeholders.
    """

    patches: jax.Array
    layout: VisionLayout
    # Static: the first num_image_tokens merged tokens fill image placeholders, the rest video
    # ones. Grids are not kept, so batches of different media sizes (padded to a bucket) reuse
    # one compiled program.
    num_image_tokens: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, L, vocab] (None when compute_logits=False)
    hidden_states: jax.Array  # [B, L, hidden], final (post-norm) hidden states
    kv_cache: KVCache | None


def _host(x: Any, name: str) -> np.ndarray:
    """A concrete numpy copy of x, or one clear error when x is a tracer."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"`{name}` is traced (e.g. under jax.jit), but it must be concrete to compute positions "
            "and media layout; compute them outside the jitted function with "
            "fourd_jax.model.prepare_vision / fourd_jax.model.rope.get_rope_index and pass "
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
        grid = _host(grid, grid_name).astype(np.int64).reshape(-1, 3)
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
        layout=vision_layout(np.array(image_grids + video_grids), config.vision),
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
        if not np.array_equal(_host(mm_token_type_ids, "mm_token_type_ids"), expected):
            raise InputError("`mm_token_type_ids` disagrees with the image/video tokens in `input_ids`.")
    merge = config.vision.spatial_merge_size**2
    for kind, grid, token_id in (("image", image_grid_thw, config.image_token_id),
                                 ("video", video_grid_thw, config.video_token_id)):
        if grid is None:
            continue  # like transformers: placeholders without media keep their token embeddings
        n_tokens, n_features = int(np.sum(ids == token_id)), num_patches(_host(grid, f"{kind}_grid_thw")) // merge
        if n_tokens != n_features:
            raise InputError(f"input_ids has {n_tokens} {kind} placeholder tokens but the {kind} inputs give "
                             f"{n_features} features.")


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


def attention_mask_for(
    attention_mask: jax.Array | None, batch: int, length: int, cache_len: int | None, cache_index
) -> jax.Array:
    """Boolean [B, L, K] mask: causal, and keys that are not padding.

    Without a cache K = L and attention_mask is [B, L]; with a cache of K slots the queries sit
    at slots cache_index .. cache_index + L - 1 and attention_mask is [B, K] over the slots.
    """
    if cache_len is None:
        keys = jnp.arange(length)
        causal = keys[None, :] <= keys[:, None]
        ok = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask != 0
        return causal[None] & ok[:, None, :]
    slots = cache_index + jnp.arange(length)
    causal = jnp.arange(cache_len)[None, :] <= slots[:, None]
    ok = jnp.ones((batch, cache_len), bool) if attention_mask is None else attention_mask != 0
    return causal[None] & ok[:, None, :]


class Qwen25VL(nn.Module):
    """Qwen2.5-VL for conditional generation, with latent-imagery inputs (SPEC 3.1-3.3)."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.visual = VisionTower(c)
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
        latent_embeds: jax.Array | None = None,
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
          latent_embeds: vectors that replace the input embeddings at the `<|latent_pad|>`
            positions: [N, hidden] in row-major order, or [B, N, hidden] per batch row.
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
                row_mask = _host(attention_mask, "attention_mask")[:, :length]
            if vision is not None and not media_given:
                raise InputError("With precomputed `vision=`, pass `position_ids=` too (see get_rope_index).")
            position_ids, _ = rope.get_rope_index(
                c, _host(host_ids, "input_ids"),
                _host(image_grid_thw, "image_grid_thw") if image_grid_thw is not None else None,
                _host(video_grid_thw, "video_grid_thw") if video_grid_thw is not None else None,
                _host(second_per_grid_ts, "second_per_grid_ts") if second_per_grid_ts is not None else None,
                None if row_mask is None else _host(row_mask, "attention_mask"),
            )
        input_ids = jnp.asarray(input_ids)
        position_ids = jnp.asarray(position_ids)
        if position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)

        embeds = self.language_model.embed(input_ids)
        if vision is not None:
            features = self.visual(vision.patches, vision.layout)  # [U, D] or per example [B, U, D]
            n_img = vision.num_image_tokens
            if n_img:
                embeds = replace_rows(embeds, input_ids == c.image_token_id, features[..., :n_img, :])
            if features.shape[-2] > n_img:
                embeds = replace_rows(embeds, input_ids == c.video_token_id, features[..., n_img:, :])
        if latent_embeds is not None:
            if c.latent_pad_token_id is None:
                raise InputError("`latent_embeds` given but the config has no latent_pad_token_id.")
            embeds = replace_rows(embeds, input_ids == c.latent_pad_token_id, latent_embeds)

        cache_len = None if kv_cache is None else kv_cache.max_len
        mask = attention_mask_for(attention_mask, batch, length, cache_len, cache_index)
        cos, sin = rope.mrope_cos_sin(position_ids, c.text)
        cos, sin = cos.astype(c.jnp_dtype), sin.astype(c.jnp_dtype)
        hidden, new_cache = self.language_model(embeds, cos, sin, mask, kv_cache, cache_index)
        logits = self.logits(hidden) if compute_logits else None
        return ModelOutput(logits=logits, hidden_states=hidden, kv_cache=new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits for final hidden states [..., hidden]."""
        if self.config.tie_word_embeddings:
            return self.language_model.attend(hidden.astype(self.config.jnp_dtype))
        return self.lm_head(hidden)

    def encode_vision(self, vision: VisionInputs) -> jax.Array:
        """Merged visual tokens [N / merge^2, hidden] for the media in `vision`."""
        return self.visual(vision.patches, vision.layout)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Input token embeddings [..., hidden]."""
        return self.language_model.embed(input_ids)


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
    positions, deltas = rope.get_rope_index(config, ids, image_grid_thw, video_grid_thw, second_per_grid_ts, mask)
    return PreparedInputs(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                          jnp.asarray(positions, jnp.int32), jnp.asarray(deltas, jnp.int32), vision)


def forward(
    model: Qwen25VL,
    params: Any,
    *processor_outputs: Any,
    latent_embeds: Any = None,
    compute_logits: bool = True,
    **processor_kwargs: Any,
) -> ModelOutput:
    """`model.apply` on processor outputs, with the device work jitted (cached per model).

    Takes the arguments of `prepare_inputs` (input_ids, attention_mask, pixel_values, ...). The
    host-side work runs in numpy; the rest is one compiled program, so repeated calls with the
    same shapes do not re-trace. Eager `model.apply` compiles every primitive separately, which
    is slow for more than a few calls.
    """
    batch = prepare_inputs(model.config, *processor_outputs, **processor_kwargs)
    return _jitted_apply(model, compute_logits)(params, batch, latent_embeds)


@functools.lru_cache(maxsize=16)
def _jitted_apply(model: Qwen25VL, compute_logits: bool):
    def apply(params, batch: PreparedInputs, latent_embeds):
        return model.apply({"params": params}, batch.input_ids, batch.attention_mask,
                           position_ids=batch.position_ids, vision=batch.vision, latent_embeds=latent_embeds,
                           compute_logits=compute_logits)

    return jax.jit(apply)


def encode_vision(model: Qwen25VL, params: Any, vision: VisionInputs) -> jax.Array:
    """Merged visual tokens for `vision` through a jitted tower (cached per model)."""
    return _jitted_encode(model)(params, vision)


@functools.lru_cache(maxsize=16)
def _jitted_encode(model: Qwen25VL):
    return jax.jit(lambda params, vision: model.apply({"params": params}, vision, method=Qwen25VL.encode_vision))


def dummy_inputs(config: ModelConfig) -> dict[str, Any]:
    """The smallest inputs that touch every parameter (one image of a single merged unit)."""
    m = config.vision.spatial_merge_size
    grid = np.array([[1, m, m]])
    ids = np.array([[config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]])
    return dict(
        input_ids=ids,
        position_ids=rope.get_rope_index(config, ids, grid)[0],
        vision=prepare_vision(config, np.zeros((m * m, config.vision.patch_dim), np.float32), grid),
    )


def init_params(model: Qwen25VL, rng: jax.Array, *, mesh=None, rules=None):
    """Randomly initialised parameters, from a jitted init (compiled once per model and mesh).

    With a `mesh`, every parameter is created already sharded by the logical rules (default
    `fourd_jax.sharding.DEFAULT_RULES`); no device ever holds the whole tree.
    """
    if mesh is None:
        return _jitted_init(model, None, None)(rng)
    from fourd_jax import sharding

    rules = sharding.DEFAULT_RULES if rules is None else tuple(rules)
    init = _jitted_init(model, mesh, rules)  # shardings are worked out outside the mesh context
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init(rng)


@functools.lru_cache(maxsize=8)
def _jitted_init(model: Qwen25VL, mesh, rules):
    inputs = dummy_inputs(model.config)

    def init(key):
        return nn.meta.unbox(model.init(key, **inputs)["params"])

    if mesh is None:
        return jax.jit(init)
    from fourd_jax import sharding

    return jax.jit(init, out_shardings=sharding.param_shardings(abstract_params(model), mesh, rules))


def abstract_params(model: Qwen25VL):
    """Shapes, dtypes and logical axis names of every parameter, without allocating any."""
    inputs = dummy_inputs(model.config)
    return jax.eval_shape(lambda key: model.init(key, **inputs), jax.random.key(0))["params"]
