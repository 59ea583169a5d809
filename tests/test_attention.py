"""Attention: both paths' gradients are the formula's; the blockwise path equals the dense one (values and
gradients) with less memory and skips the tiles its mask empties; a decode step's
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


def reference_attention(q, k, v, mask, scale):
    """The formula, left to autodiff: softmax over the allowed keys (uniform where a row allows none) of q k^T."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("block", [0, 16])
def test_attention_gradients_are_the_formulas(block):
    """The hand-written gradients equal autodiff of the plain formula, rows that may attend to nothing included
    (they are uniform whatever the scores, so their queries and keys get no gradient from them)."""
    q, k, v, mask = inputs()
    grads = [jax.grad(lambda q, k, v, f=f: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))(q, k, v)
             for f in (lambda q, k, v: attention(q, k, v, mask, 0.25, block=block),
                       lambda q, k, v: reference_attention(q, k, v, mask, 0.25))]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_blockwise_attention_skips_the_tiles_its_mask_empties():
    """Key slots that no query may see, filling whole tiles, are never read: NaN keys and values there stay out of
    the output and the gradients. The dense path multiplies their zero probabilities, so NaN reaches it."""
    q, k, v, _ = inputs(length=64)
    hidden = (jnp.arange(64) >= 16) & (jnp.arange(64) < 32)  # tile 1 of 4 (block 16) for every query block
    # Causal, and every row sees some key (a row that sees none averages all the values, hidden ones too).
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((64, 64), bool)) & ~hidden[None, :], (2, 64, 64))
    poisoned = [jnp.where(hidden[None, :, None, None], jnp.nan, x) for x in (k, v)]
    cleaned = [jnp.where(hidden[None, :, None, None], 0.0, x) for x in (k, v)]
    assert np.isnan(attention(q, *poisoned, mask, 0.25)).any()

    def grads(k, v, block):
        return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, 0.25, block=block))),
                        argnums=(0, 1, 2))(q, k, v)

    np.testing.assert_allclose(attention(q, *poisoned, mask, 0.25, block=16), attention(q, *cleaned, mask, 0.25),
                               atol=2e-6)
    for got, want in zip(grads(*poisoned, 16), grads(*cleaned, 0), strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=2e-5)


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


def test_blockwise_attention_in_a_scan_over_layers_keeps_its_memory():
    """The decoder scans its layers with the mask as a constant of the scan. jax moves what depends on constants
    alone out of the loop, which would keep every tile's broadcast mask for all layers at once (7x the memory
    here); the gradient must need about what the same layers unrolled need."""
    length, layers = 1024, 4
    x = jax.random.normal(jax.random.key(0), (1, length, 64))
    weights = jax.random.normal(jax.random.key(1), (layers, 64, 64)) * 0.1
    mask = jnp.tril(jnp.ones((length, length), bool))[None]

    def layer(x, w):
        q = (x @ w).reshape(1, length, 4, 16)
        return x + attention(q, q[:, :, :1], q[:, :, :1], mask, 0.25, block=128).reshape(1, length, 64)

    def scanned(w, x):
        return jnp.sum(jax.lax.scan(lambda x, w: (layer(x, w), None), x, w)[0])

    def unrolled(w, x):
        for i in range(layers):
            x = layer(x, w[i])
        return jnp.sum(x)

    scratch = [jax.jit(jax.grad(f)).lower(weights, x).compile().memory_analysis().temp_size_in_bytes
               for f in (scanned, unrolled)]
    assert scratch[0] < 1.5 * scratch[1]


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
