"""Qwen2 decoder: GQA with q/k/v bias, RMSNorm, SwiGLU, scanned layers, functional KV cache.

Layers are stacked with `nn.scan` (one compiled layer, parameters with a leading `layers` axis).
The KV cache is an explicit pytree passed in and returned, preallocated to its final length, so
prefill and every decode step have static shapes.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fourd_jax.model.config import ModelConfig
from fourd_jax.model.layers import Dense, GatedMLP, RMSNorm, apply_rotary, attention, decode_attention, remat_policy
from fourd_jax.model.lora import DROPOUT_RNG


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer: [layers, batch, kv_heads, max_len, head_dim], the layout the
    attention contracts over (no transposed copy of a layer's cache at each step).

    k and v are either stacked over the layers (the scanned decoder's layout) or tuples of one array
    per layer (`unstack`: the unrolled decoder's, each layer's cache a buffer of its own that a decode
    step updates in place).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]  # layer 0 of the stack or of the tuple: [B, KV, S, D]

    def unstack(self) -> KVCache:
        """One array per layer (copied once, before a decode loop)."""
        return KVCache(tuple(self.k), tuple(self.v))


CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # one layer's cache, logically


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """A zero cache for `batch` sequences of up to `max_len` tokens (compute dtype by default)."""
    tc = config.text
    shape = (tc.num_layers, batch, tc.num_kv_heads, max_len, tc.head_dim)
    dtype = config.jnp_dtype if dtype is None else dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class DecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv, cache_index, layer_index, deepstack):
        """x [B, L, D] -> (x, new (k, v) for this layer or None). One scan step.

        deepstack: None, or [K, B, L, D] visual features added to the output of layers 0 .. K-1
        (zero away from visual positions; Qwen3-VL's DeepStack). layer_index: this layer's index.
        """
        tc = self.config.text
        dtype, pdtype = self.config.jnp_dtype, self.config.jnp_param_dtype
        std = self.config.initializer_range
        d, h, kv, hd = tc.hidden_size, tc.num_heads, tc.num_kv_heads, tc.head_dim
        bias = tc.attention_bias

        y = RMSNorm(tc.rms_norm_eps, dtype, pdtype, name="input_layernorm")(x)
        q = Dense((d,), (h, hd), ("embed",), ("heads", "head_dim"), bias, dtype, pdtype, std,
                  name="q_proj")(y)
        k = Dense((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), bias, dtype, pdtype, std,
                  name="k_proj")(y)
        v = Dense((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), bias, dtype, pdtype, std,
                  name="v_proj")(y)
        if tc.qk_norm:  # Qwen3: RMSNorm over each head's vector, before the rotary
            q = RMSNorm(tc.rms_norm_eps, dtype, pdtype, axis_name="head_dim", name="q_norm")(q)
            k = RMSNorm(tc.rms_norm_eps, dtype, pdtype, axis_name="head_dim", name="k_norm")(k)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new_cache = None
        if cache_kv is None:
            out = attention(q, k.astype(dtype), v.astype(dtype), mask, hd**-0.5, block=self.config.attention_block)
        else:  # this chunk's keys and values written at `cache_index`, heads first
            k, v = (t.astype(c.dtype).transpose(0, 2, 1, 3) for c, t in zip(cache_kv, (k, v), strict=True))
            if x.shape[1] == 1:  # a decode step: the cache as it was and the token itself; the write stays in place
                out = decode_attention(q, *(c.astype(dtype) for c in cache_kv), mask, k.astype(dtype), v.astype(dtype),
                                       cache_index, hd**-0.5)
                # The write depends on the attention's result, so XLA orders it after the read and updates the
                # cache's buffer in place instead of copying it (0 x a value is kept: it would be NaN for NaN).
                after = (out[:1, :1, :1, :1] * 0).astype(k.dtype).transpose(0, 2, 1, 3)
                k, v = k + after, v + after
            # The cache lives split like the batch and the KV heads, so decoding never gathers it.
            new_cache = tuple(nn.with_logical_constraint(jax.lax.dynamic_update_slice(c, t, (0, 0, cache_index, 0)),
                                                         CACHE_AXES) for c, t in zip(cache_kv, (k, v), strict=True))
            if x.shape[1] != 1:
                out = attention(q, *(c.astype(dtype) for c in new_cache), mask, hd**-0.5,
                                block=self.config.attention_block, kv_heads_first=True)
        out = Dense((h, hd), (d,), ("heads", "head_dim"), ("embed",), False, dtype, pdtype, std,
                    name="o_proj")(out)
        x = x + out
        y = RMSNorm(tc.rms_norm_eps, dtype, pdtype, name="post_attention_layernorm")(x)
        x = x + GatedMLP(d, tc.intermediate_size, False, dtype, pdtype, "embed", "mlp", std,
                         name="mlp")(y)
        if deepstack is not None:
            # Layers past the DeepStack features add zeros: x + 0 is exact, and one scanned layer serves all.
            count = deepstack.shape[0]
            extra = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(layer_index, count - 1), keepdims=False)
            x = x + jnp.where(layer_index < count, extra, jnp.zeros_like(extra)).astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_cache


class TextDecoder(nn.Module):
    """Embedding table, scanned decoder layers and the final norm."""

    config: ModelConfig

    def setup(self) -> None:
        tc = self.config.text
        self.embed_tokens = nn.Embed(
            tc.vocab_size, tc.hidden_size, dtype=self.config.jnp_dtype,
            param_dtype=self.config.jnp_param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.config.initializer_range), ("vocab", "embed")),
        )
        layer = DecoderLayer
        if self.config.remat_policy != "none":
            layer = nn.remat(layer, policy=remat_policy(self.config.remat_policy), prevent_cse=False)
        if not self.config.scan_layers:
            self.unstacked = [layer(self.config) for _ in range(tc.num_layers)]
            self.norm = RMSNorm(tc.rms_norm_eps, self.config.jnp_dtype, self.config.jnp_param_dtype)
            return
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, DROPOUT_RNG: True},  # each layer its own LoRA dropout mask
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, nn.broadcast),
            length=tc.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.config)
        self.norm = RMSNorm(tc.rms_norm_eps, self.config.jnp_dtype, self.config.jnp_param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Logits through the tied embedding table."""
        return self.embed_tokens.attend(hidden)

    def __call__(self, embeds, cos, sin, mask, kv_cache: KVCache | None, cache_index,
                 deepstack: jax.Array | None = None):
        """Final hidden states and the updated cache; `deepstack` [K, B, L, D] is added after each of
        the first K layers (Qwen3-VL), None for none."""
        if not self.config.scan_layers:
            x, new = embeds, []
            for i, layer in enumerate(self.unstacked):
                x, kv = layer(x, cos, sin, mask, None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i]),
                              cache_index, i, deepstack)
                new.append(kv)
            return self.norm(x), None if kv_cache is None else KVCache(*map(tuple, zip(*new, strict=True)))
        cache_in = None if kv_cache is None else (kv_cache.k, kv_cache.v)
        layer_index = jnp.arange(self.config.text.num_layers)
        # A None cache has no layer axis to scan over; scan's in_axes=0 maps over an empty pytree.
        x, cache_out = self.layers(embeds, cos, sin, mask, cache_in, cache_index, layer_index, deepstack)
        return self.norm(x), None if cache_out is None else KVCache(*cache_out)


def unstack_layers(decoder_params: dict) -> dict:
    """A scanned decoder's parameters (`layers`: every leaf stacked over the layers) as the unstacked
    decoder's (`unstacked_0`, `unstacked_1`, ...; `ModelConfig.scan_layers` False)."""
    params = dict(decoder_params)
    stacked = params.pop("layers")
    count = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(count):
        params[f"unstacked_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return params
