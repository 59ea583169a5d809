"""Attention: the blockwise path equals the dense one (values and gradients) with less memory; a decode step's
attention over the cache as it was plus the new token equals attending over the updated cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fourd_jax.errors import InputError
from fourd_jax.model.config import tiny
from fourd_jax.model.layers import attention, decode_attention


def inputs(batch=2, length=50, heads=4, kv_heads=2, dim=16, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dim), dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))
    valid = jnp.arange(length)[None] < jnp.array([[length], [length - 13]])[:batch]
    mask = causal[None] & valid[:, None, :]
    mask = mask.at[-1, length - 5:].set(False)  # query rows that may attend to nothing
    return q, k, v, mask


@pytest.mark.parametrize("block", [16, 7, 49])  # several blocks, a ragged last block, one short of the length
def test_blockwise_attention_equals_dense(block):
    q, k, v, mask = inputs()

    def loss(block):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, 0.25, block=block)))

    np.testing.assert_allclose(attention(q, k, v, mask, 0.25, block=block), attention(q, k, v, mask, 0.25),
                               atol=2e-6)
    dense = jax.grad(loss(0), argnums=(0, 1, 2))(q, k, v)
    blockwise = jax.grad(loss(block), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(blockwise, dense, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_blockwise_attention_in_bfloat16_stays_close():
    q, k, v, mask = inputs(dtype=jnp.bfloat16)
    dense = attention(q, k, v, mask, 0.25).astype(jnp.float32)
    blockwise = attention(q, k, v, mask, 0.25, block=16)
    assert blockwise.dtype == jnp.bfloat16
    np.testing.assert_allclose(blockwise.astype(jnp.float32), dense, atol=3e-2)


def test_blockwise_attention_needs_memory_linear_in_the_length():
    """The compiled gradient's scratch memory: dense keeps [heads, L, L] probabilities (quadratic in
    L), blocks keep [heads, block, L] scores at a time (linear)."""

    def scratch(length, block):
        q, k, v, mask = inputs(batch=1, length=length, heads=4, kv_heads=1, dim=16)
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, 0.25, block=block)),
                                argnums=(0, 1, 2)))
        return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    dense = [scratch(n, 0) for n in (1024, 2048)]
    blockwise = [scratch(n, 128) for n in (1024, 2048)]
    assert dense[0] >= 4 * 1024 * 1024 * 4  # heads x L x L float32 probabilities
    assert blockwise[0] < dense[0] / 3
    assert dense[1] / dense[0] > 3.5 and blockwise[1] / blockwise[0] < 2.5


def test_a_negative_attention_block_is_refused_in_one_sentence():
    with pytest.raises(InputError, match=r"^Invalid model config: attention_block must be 0 \(off\) or a positive "
                                         r"block size, not -4\.$"):
        tiny(attention_block=-4)


def test_decode_attention_equals_attention_over_the_updated_cache():
    """The cache as it was (holding a stale, nonzero entry at the new token's slot) plus the token's own key and
    value give what writing the token into the cache and attending over it gives; a finished row (its mask all
    False) gets the same uniform output both ways."""
    batch, slots, heads, kv_heads, dim, slot = 3, 20, 4, 2, 16, 11
    keys = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys[0], (batch, 1, heads, dim))
    k_cache, v_cache = (jax.random.normal(key, (batch, kv_heads, slots, dim)) for key in keys[1:3])
    k_new, v_new = (jax.random.normal(key, (batch, kv_heads, 1, dim)) for key in keys[3:5])
    mask = (jnp.arange(slots)[None, None, :] <= slot) & (jnp.arange(slots) >= jnp.array([0, 4, 0])[:, None, None])
    mask = mask.at[2].set(False)  # a finished row
    written = [jax.lax.dynamic_update_slice(c, t, (0, 0, slot, 0)) for c, t in ((k_cache, k_new), (v_cache, v_new))]
    want = attention(q, *written, mask, 0.25, kv_heads_first=True)
    got = decode_attention(q, k_cache, v_cache, mask, k_new, v_new, jnp.int32(slot), 0.25)
    np.testing.assert_allclose(got, want, atol=2e-6)
    # heads-first keys are the [B, S, KV, D] layout transposed: the same attention
    np.testing.assert_allclose(attention(q, *(c.transpose(0, 2, 1, 3) for c in written), mask, 0.25), want, atol=1e-6)
