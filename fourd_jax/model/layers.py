"""Building blocks shared by the vision tower and the decoder.

Every parameter is created through `param_init`, which attaches logical axis names; the mapping
of those names to mesh axes lives in `fourd_jax.sharding` and nowhere else.
Softmax and normalisation statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from fourd_jax.model import lora


def param_init(initializer, names: Sequence[str | None]):
    """An initializer whose parameter carries the given logical axis names."""
    return nn.with_logical_partitioning(initializer, tuple(names))


class RMSNorm(nn.Module):
    """Root-mean-square norm; statistics in float32, output in the compute dtype."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param(
            "weight", param_init(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * weight.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and a bias; statistics in float32, output in the compute dtype."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape, names = (x.shape[-1],), (self.axis_name,)
        weight = self.param("weight", param_init(nn.initializers.ones, names), shape, self.param_dtype)
        bias = self.param("bias", param_init(nn.initializers.zeros, names), shape, self.param_dtype)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (normed * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Dense(nn.Module):
    """y = x @ kernel (+ bias) over the last `len(in_names)` axes of x, with named axes.

    `in_shape`/`out_shape` may be multi-dimensional (e.g. [heads, head_dim]) so attention
    projections keep a head axis that the sharding rules can split.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            param_init(nn.initializers.normal(self.init_std), self.in_names + self.out_names),
            self.in_shape + self.out_shape,
            self.param_dtype,
        )
        # One 2-D matmul [rows, in] @ [in, out]: XLA's CPU backend differentiates a dot over several
        # leading axes by materialising transposed copies of its operands (a third slower here);
        # the reshapes are free in row-major layouts and keep the sharded axes outermost.
        lead = x.shape[: x.ndim - len(self.in_shape)]
        rows = x.astype(self.dtype).reshape(-1, math.prod(self.in_shape))
        matrix = kernel.astype(self.dtype).reshape(math.prod(self.in_shape), math.prod(self.out_shape))
        y = rows @ matrix
        adapted = lora.adapter_output(self, rows, self.dtype)  # a LoRA adapter, when this module holds one
        if adapted is not None:
            y = y + adapted
        y = y.reshape(*lead, *self.out_shape)
        if self.use_bias:
            bias = self.param(
                "bias", param_init(nn.initializers.zeros, self.out_names), self.out_shape,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    hidden_size: int
    intermediate_size: int
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    embed_name: str
    mlp_name: str
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(name, n_in, n_out, in_names, out_names):
            return Dense(
                (n_in,), (n_out,), in_names, out_names, self.use_bias, self.dtype,
                self.param_dtype, self.init_std, name=name,
            )

        d, f = self.hidden_size, self.intermediate_size
        e, m = (self.embed_name,), (self.mlp_name,)
        gate = dense("gate_proj", d, f, e, m)(x)
        up = dense("up_proj", d, f, e, m)(x)
        return dense("down_proj", f, d, m, e)(jax.nn.silu(gate) * up)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis (the rotary convention of the reference)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [..., L, heads, head_dim] by cos/sin [..., L, head_dim] (broadcast over heads)."""
    cos = cos[..., None, :]
    sin = sin[..., None, :]
    return x * cos + rotate_half(x) * sin


def _batched_dot(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
    """a @ b over one leading batch axis, float32 accumulation. XLA runs dots with a single batch
    dimension much faster on CPU than ones with several, so attention folds its axes into one."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))),
                               preferred_element_type=jnp.float32)


def _masked_scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 scores q k^T [N, Q, S], finfo.min where the mask [N, Q, S] is False."""
    return jnp.where(mask, _batched_dot(q, k, 2, 2), jnp.finfo(jnp.float32).min)


def _softmax_with_stats(scores: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """softmax over the last axis, and the row (max, sum of exp) that rebuild it from the scores.

    Max and sum are kept apart (not max + log sum): a row that may attend to nothing has max =
    finfo.min, where adding log(sum) is lost, and must stay uniform."""
    peak = jnp.max(scores, axis=-1)
    unnormalised = jnp.exp(scores - peak[..., None])
    total = jnp.sum(unnormalised, axis=-1)
    return unnormalised / total[..., None], (peak, total)


def _attention_grads(q, k, v, probs, d_out):
    """(d_q, d_k, d_v), float32, of probs v with probs = softmax(q k^T): the softmax-attention
    gradient written out, so every product stays a single-batch dot."""
    d_probs = _batched_dot(d_out, v, 2, 2)
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_q = _batched_dot(d_scores.astype(q.dtype), k, 2, 1)
    d_k = _batched_dot(d_scores.astype(q.dtype), q, 1, 1)
    d_v = _batched_dot(probs.astype(d_out.dtype), d_out, 1, 1)
    return d_q, d_k, d_v


@jax.custom_vjp
def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T, masked) v for q [N, Q, D], k/v [N, S, D], mask [N, Q, S]; scores in float32."""
    return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    probs, _ = _softmax_with_stats(_masked_scores(q, k, mask))
    return _batched_dot(probs.astype(v.dtype), v, 2, 1).astype(v.dtype), (q, k, v, probs)


def _attention_bwd(residuals, d_out):
    q, k, v, probs = residuals
    d_q, d_k, d_v = _attention_grads(q, k, v, probs, d_out)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


@jax.custom_vjp
def _blockwise_attention_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`_attention_core` one query block at a time: q [nb, N, Q, D] (N = batch x KV heads, Q = G x
    block), k/v [N, S, D], mask [nb, B, block, S] (shared by the N / B heads of a batch row).
    Only one block's [N, Q, S] scores exist at once; the backward recomputes them from the saved
    row max and sum instead of keeping every probability (memory O(L x block), not O(L^2))."""
    return _blockwise_fwd(q, k, v, mask)[0]


def _block_scores(q_blk, k, mask_blk):
    """Masked float32 scores [N, G x block, S] of one query block."""
    n, rows, s = q_blk.shape[0], q_blk.shape[1], k.shape[1]
    b, block = mask_blk.shape[0], mask_blk.shape[1]
    mask = jnp.broadcast_to(mask_blk[:, None, None], (b, n // b, rows // block, block, s)).reshape(n, rows, s)
    return _masked_scores(q_blk, k, mask)


def _blockwise_fwd(q, k, v, mask):
    def one_block(_, xs):
        q_blk, mask_blk = xs
        probs, stats = _softmax_with_stats(_block_scores(q_blk, k, mask_blk))
        return None, (_batched_dot(probs.astype(v.dtype), v, 2, 1).astype(v.dtype), stats)

    _, (out, stats) = jax.lax.scan(one_block, None, (q, mask))
    return out, (q, k, v, mask, stats)


def _blockwise_bwd(residuals, d_out):
    q, k, v, mask, (peak, total) = residuals

    def one_block(carry, xs):
        d_k, d_v = carry
        q_blk, mask_blk, d_out_blk, peak_blk, total_blk = xs
        probs = jnp.exp(_block_scores(q_blk, k, mask_blk) - peak_blk[..., None]) / total_blk[..., None]
        d_q, d_k_blk, d_v_blk = _attention_grads(q_blk, k, v, probs, d_out_blk)
        return (d_k + d_k_blk, d_v + d_v_blk), d_q.astype(q_blk.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (d_k, d_v), d_q = jax.lax.scan(one_block, (zeros, zeros), (q, mask, d_out, peak, total))
    return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), None


_blockwise_attention_core.defvjp(_blockwise_fwd, _blockwise_bwd)


def _fold_kv_heads(x: jax.Array, dtype) -> jax.Array:
    """k or v [B, KV, S, D] -> [B x KV, S, D], the layout both attention paths contract over."""
    b, kv, s, d = x.shape
    return x.astype(dtype).reshape(b * kv, s, d)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, block: int = 0,
    kv_heads_first: bool = False,
) -> jax.Array:
    """Grouped-query attention with a boolean mask; scores and softmax in float32.

    q: [B, Lq, H, D]; k, v: [B, Lk, KV, D] with H a multiple of KV; mask: [B, Lq, Lk]
    (True = may attend). A row with nothing to attend to gets a uniform distribution, never NaN.
    Returns [B, Lq, H, D] in q's dtype. The G = H / KV query heads that share a KV head are folded
    into the query axis, so K and V are never repeated. `block` > 0 with Lq > block attends one
    block of `block` queries at a time (the same numbers, with O(Lq x block) instead of O(Lq^2)
    memory for scores and saved probabilities: what makes 8K-16K-token training sequences fit).
    """
    chex.assert_rank([q, k, v, mask], [4, 4, 4, 3])
    chex.assert_equal_shape([k, v])
    if not kv_heads_first:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    chex.assert_shape(mask, (q.shape[0], q.shape[1], k.shape[2]))
    b, lq, h, d = q.shape
    kv, lk = k.shape[1], k.shape[2]
    g = h // kv
    if 0 < block < lq:
        return _blockwise_attention(q, k, v, mask, scale, block)
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, lq, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kv, g * lq, d)
    k, v = _fold_kv_heads(k, q.dtype), _fold_kv_heads(v, q.dtype)
    mask = jnp.broadcast_to(mask[:, None, None], (b, kv, g, lq, lk)).reshape(b * kv, g * lq, lk)
    out = _attention_core(q, k, v, mask)
    return out.reshape(b, kv, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array, k_new: jax.Array,
                     v_new: jax.Array, slot: jax.Array, scale: float) -> jax.Array:
    """`attention` of one new token per row over a KV cache that does not hold it yet, plus its own key
    and value: the same numbers as writing the token at `slot` and attending over the cache.

    q [B, 1, H, D]; k_cache, v_cache [B, KV, S, D] (heads first); k_new, v_new [B, KV, 1, D]; mask
    [B, 1, S] over the cache's slots, `slot` included. Reading the cache as it was lets a decode
    step write the token into the cache in place: when the attention reads the updated cache, XLA:CPU
    fuses the update into both the attention and the returned cache, and copies the cache for each.
    """
    b, _, h, d = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    g = h // kv
    chex.assert_shape([k_new, v_new], (b, kv, 1, d))
    chex.assert_shape(mask, (b, 1, s))
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b * kv, g, d)
    k_cache, v_cache = _fold_kv_heads(k_cache, q.dtype), _fold_kv_heads(v_cache, q.dtype)
    k_new, v_new = _fold_kv_heads(k_new, q.dtype), _fold_kv_heads(v_new, q.dtype)
    own = jax.lax.dynamic_index_in_dim(mask, slot, axis=2)  # [B, 1, 1]: whether the row attends at all
    expand = lambda m: jnp.broadcast_to(m[:, None], (b, kv, g, m.shape[-1])).reshape(b * kv, g, m.shape[-1])  # noqa: E731
    # The cache's stale entry at `slot` is out even of a row that may attend to nothing (uniform over the
    # updated cache's S entries): -inf, not the mask's finfo.min.
    cached = jnp.where(jnp.arange(s) == slot, -jnp.inf, _masked_scores(q, k_cache, expand(mask)))
    scores = jnp.concatenate([cached, _masked_scores(q, k_new, expand(own))], axis=-1)
    probs, _ = _softmax_with_stats(scores)
    out = (_batched_dot(probs[..., :s].astype(v_cache.dtype), v_cache, 2, 1)
           + _batched_dot(probs[..., s:].astype(v_new.dtype), v_new, 2, 1))
    return out.astype(q.dtype).reshape(b, kv, g, d).reshape(b, 1, h, d)


def _blockwise_attention(q, k, v, mask, scale, block):
    b, lq, h, d = q.shape
    kv, lk = k.shape[1], k.shape[2]
    g, nb = h // kv, -(-lq // block)
    pad = nb * block - lq  # padded query rows attend to nothing and are dropped
    q = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    q = q.reshape(b, nb, block, kv, g, d).transpose(1, 0, 3, 4, 2, 5).reshape(nb, b * kv, g * block, d)
    k, v = _fold_kv_heads(k, q.dtype), _fold_kv_heads(v, q.dtype)
    mask = mask.reshape(b, nb, block, lk).transpose(1, 0, 2, 3)
    out = _blockwise_attention_core(q, k, v, mask)
    out = out.reshape(nb, b, kv, g, block, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, nb * block, h, d)
    return out[:, :lq]


def remat_policy(name: str):
    """The `jax.checkpoint_policies` entry for a config name (None = save nothing extra)."""
    if name in ("none", "full"):
        return None
    return getattr(jax.checkpoint_policies, name)
