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
from fourd_jax.model.layers import Dense, GatedMLP, RMSNorm, apply_rotary, attention, remat_policy


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer: [layers, batch, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """A zero cache for `batch` sequences of up to `max_len` tokens (compute dtype by default)."""
    tc = config.text
    shape = (tc.num_layers, batch, max_len, tc.num_kv_heads, tc.head_dim)
    dtype = config.jnp_dtype if dtype is None else dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class DecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv, cache_index):
        """x [B, L, D] -> (x, new (k, v) for this layer or None). One scan step."""
        tc = self.config.text
        dtype, pdtype = self.config.jnp_dtype, self.config.jnp_param_dtype
        std = self.config.initializer_range
        d, h, kv, hd = tc.hidden_size, tc.num_heads, tc.num_kv_heads, tc.head_dim

        y = RMSNorm(tc.rms_norm_eps, dtype, pdtype, name="input_layernorm")(x)
        q = Dense((d,), (h, hd), ("embed",), ("heads", "head_dim"), True, dtype, pdtype, std,
                  name="q_proj")(y)
        k = Dense((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), True, dtype, pdtype, std,
                  name="k_proj")(y)
        v = Dense((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), True, dtype, pdtype, std,
                  name="v_proj")(y)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new_cache = None
        if cache_kv is not None:
            k_all, v_all = cache_kv
            k = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (0, cache_index, 0, 0))
            # The cache lives split like the batch and the KV heads, so decoding never gathers it.
            k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
            v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
            new_cache = (k, v)
        out = attention(q, k.astype(dtype), v.astype(dtype), mask, hd**-0.5, block=self.config.attention_block)
        out = Dense((h, hd), (d,), ("heads", "head_dim"), ("embed",), False, dtype, pdtype, std,
                    name="o_proj")(out)
        x = x + out
        y = RMSNorm(tc.rms_norm_eps, dtype, pdtype, name="post_attention_layernorm")(x)
        x = x + GatedMLP(d, tc.intermediate_size, False, dtype, pdtype, "embed", "mlp", std,
                         name="mlp")(y)
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
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=tc.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.config)
        self.norm = RMSNorm(tc.rms_norm_eps, self.config.jnp_dtype, self.config.jnp_param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Logits through the tied embedding table."""
        return self.embed_tokens.attend(hidden)

    def __call__(self, embeds, cos, sin, mask, kv_cache: KVCache | None, cache_index):
        cache_in = None if kv_cache is None else (kv_cache.k, kv_cache.v)
        # A None cache has no layer axis to scan over; scan's in_axes=0 maps over an empty pytree.
        x, cache_out = self.layers(embeds, cos, sin, mask, cache_in, cache_index)
        hidden = self.norm(x)
        new_cache = None if cache_out is None else KVCache(*cache_out)
        return hidden, new_cache
