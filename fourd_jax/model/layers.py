"""Building blocks shared by the vision tower and the decoder.

Every parameter is created through `param_init`, which attaches logical axis names; the mapping
of those names to mesh axes lives in `fourd_jax.sharding` and nowhere else.
Softmax and normalisation statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
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


def _attention_grads(q, k, v, probs, seen, d_out):
    """(d_q, d_k, d_v), float32, of probs v with probs = softmax(q k^T): the softmax-attention
    gradient written out, so every product stays a single-batch dot. `seen` [N, Q] marks the rows
    that may attend to something: the others are uniform whatever the scores, so no score gradient."""
    d_probs = _batched_dot(d_out, v, 2, 2)
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)) * seen[..., None]
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
    return _batched_dot(probs.astype(v.dtype), v, 2, 1).astype(v.dtype), (q, k, v, probs, jnp.any(mask, axis=-1))


def _attention_bwd(residuals, d_out):
    q, k, v, probs, seen = residuals
    d_q, d_k, d_v = _attention_grads(q, k, v, probs, seen, d_out)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


def _tile_mask(mask_tile: jax.Array, n: int, rows: int) -> jax.Array:
    """A tile's mask [B, block, block] (shared by the N / B heads of a batch row) -> [N, rows, block],
    rows = G x block in the folded query layout."""
    b, bq, bk = mask_tile.shape
    return jnp.broadcast_to(mask_tile[:, None, None], (b, n // b, rows // bq, bq, bk)).reshape(n, rows, bk)


def _key_tile(x: jax.Array, j: jax.Array, block: int) -> jax.Array:
    """Key tile j of x [N, S, D]: its slots [j x block, (j + 1) x block)."""
    return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise_attention_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, keys: int) -> jax.Array:
    """`_attention_core` one tile of (query block, key block) at a time: q [nq, N, Q, D] (N = batch x
    KV heads, Q = G x block), k/v [N, nk x block, D], mask [nq, B, block, nk x block] (shared by the
    N / B heads of a batch row); `keys`: how many key slots are real (the rest is padding).

    A tile the mask empties for every row of the batch is skipped (`lax.cond`), so a causal or
    packed mask costs the tiles it lets through, not the whole square. The softmax runs online
    across a block's key tiles, and the backward recomputes each tile's probabilities from the
    saved row max and sum: memory O(L x D + block^2), not O(L^2). A row that may attend to nothing
    outputs the mean of the real values, as the dense path's uniform softmax does."""
    return _blockwise_fwd(q, k, v, mask, keys)[0]


def _blockwise_fwd(q, k, v, mask, keys):
    # Under a scan over layers, jax hoists what depends on the scan's constants alone (the mask) out of
    # the loop, and would stack every tile's broadcast mask for all layers: O(L^2 x heads). Tying the
    # mask to q keeps the tiles inside the loop; the residual stays the untied mask, which a scan over
    # layers then does not stack.
    residual_mask = mask
    q, mask = jax.lax.optimization_barrier((q, mask))
    _, n, rows, d = q.shape
    block = mask.shape[2]
    nk = k.shape[1] // block
    mean_v = jnp.mean(v[:, :keys].astype(jnp.float32), axis=1, keepdims=True)

    def query_block(_, xs):
        q_blk, mask_blk = xs

        def key_tile(carry, j):
            mask_tile = jax.lax.dynamic_slice_in_dim(mask_blk, j * block, block, axis=2)

            def attend(carry):
                acc, peak, total = carry
                k_j, v_j, tile = _key_tile(k, j, block), _key_tile(v, j, block), _tile_mask(mask_tile, n, rows)
                scores = jnp.where(tile, _batched_dot(q_blk, k_j, 2, 2), jnp.finfo(jnp.float32).min)
                new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1))
                probs = jnp.where(tile, jnp.exp(scores - new_peak[..., None]), 0.0)
                rescale = jnp.exp(peak - new_peak)
                return (acc * rescale[..., None] + _batched_dot(probs.astype(v.dtype), v_j, 2, 1),
                        new_peak, total * rescale + jnp.sum(probs, axis=-1))

            return jax.lax.cond(jnp.any(mask_tile), attend, lambda c: c, carry), None

        init = (jnp.zeros((n, rows, d), jnp.float32), jnp.full((n, rows), jnp.finfo(jnp.float32).min),
                jnp.zeros((n, rows), jnp.float32))
        (acc, peak, total), _ = jax.lax.scan(key_tile, init, jnp.arange(nk))
        seen = total > 0  # a row that attends to something has total >= 1 (its max scores exp(0))
        out = jnp.where(seen[..., None], acc / jnp.where(seen, total, 1.0)[..., None], mean_v)
        return None, (out.astype(v.dtype), (peak, total))

    _, (out, stats) = jax.lax.scan(query_block, None, (q, mask))
    return out, (q, k, v, residual_mask, out, stats)


def _blockwise_bwd(keys, residuals, d_out):
    q, k, v, mask, out, (peak, total) = residuals
    _, n, rows, d = q.shape
    block = mask.shape[2]
    nk = k.shape[1] // block
    seen = total > 0
    inv_total = 1.0 / jnp.where(seen, total, 1.0)
    # d softmax: d_scores = probs (d_probs - sum_k probs d_probs), and that row sum is d_out . out.
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def query_block(carry, xs):
        q_blk, mask_blk, d_out_blk, peak_blk, inv_total_blk, row_dot_blk = xs

        def key_tile(carry, j):
            d_q, d_k, d_v = carry
            mask_tile = jax.lax.dynamic_slice_in_dim(mask_blk, j * block, block, axis=2)

            def attend():
                k_j, v_j, tile = _key_tile(k, j, block), _key_tile(v, j, block), _tile_mask(mask_tile, n, rows)
                probs = jnp.where(tile, jnp.exp(_batched_dot(q_blk, k_j, 2, 2) - peak_blk[..., None])
                                  * inv_total_blk[..., None], 0.0)
                d_scores = probs * (_batched_dot(d_out_blk, v_j, 2, 2) - row_dot_blk[..., None])
                return (_batched_dot(d_scores.astype(q.dtype), k_j, 2, 1),
                        _batched_dot(d_scores.astype(q.dtype), q_blk, 1, 1),
                        _batched_dot(probs.astype(d_out_blk.dtype), d_out_blk, 1, 1))

            def skip():
                return (jnp.zeros((n, rows, d), jnp.float32),) + (jnp.zeros((n, block, d), jnp.float32),) * 2

            d_q_tile, d_k_tile, d_v_tile = jax.lax.cond(jnp.any(mask_tile), attend, skip)
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, _key_tile(acc, j, block) + x, j * block, axis=1)
            return (d_q + d_q_tile, add(d_k, d_k_tile), add(d_v, d_v_tile)), None

        (d_q, *carry), _ = jax.lax.scan(key_tile, (jnp.zeros((n, rows, d), jnp.float32), *carry), jnp.arange(nk))
        return tuple(carry), d_q.astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (d_k, d_v), d_q = jax.lax.scan(query_block, (zeros, zeros), (q, mask, d_out, peak, inv_total, row_dot))
    # The rows that see nothing output the mean of the real values, which each of those values gets 1 / keys of.
    unseen = jnp.sum(jnp.where(seen[..., None], 0.0, d_out.astype(jnp.float32)), axis=(0, 2))
    d_v = d_v.at[:, :keys].add(unseen[:, None] / keys)
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
    tile of `block` queries x `block` keys at a time and skips the tiles the mask empties (the same
    numbers; O(Lq x D + block^2) instead of O(Lq^2) memory for scores and saved probabilities, which
    makes 8K-16K-token training sequences fit, and a causal or packed mask's share of the FLOPs).
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
    g, nq, nk = h // kv, -(-lq // block), -(-lk // block)
    # Padded query rows and key slots are masked out; the padded rows are dropped at the end.
    q = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, nq * block - lq), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, nq * block - lq), (0, nk * block - lk)))
    q = q.reshape(b, nq, block, kv, g, d).transpose(1, 0, 3, 4, 2, 5).reshape(nq, b * kv, g * block, d)
    k, v = (_fold_kv_heads(jnp.pad(x, ((0, 0), (0, 0), (0, nk * block - lk), (0, 0))), q.dtype) for x in (k, v))
    mask = mask.reshape(b, nq, block, nk * block).transpose(1, 0, 2, 3)
    out = _blockwise_attention_core(q, k, v, mask, lk)
    out = out.reshape(nq, b, kv, g, block, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * block, h, d)
    return out[:, :lq]


def remat_policy(name: str):
    """The `jax.checkpoint_policies` entry for a config name (None = save nothing extra)."""
    if name in ("none", "full"):
        return None
    return getattr(jax.checkpoint_policies, name)
