"""Micro-batches: a batch's rows split k ways, and a function's results summed over them under
`lax.scan`, so only one micro-batch's activations are live at a time (DIFT and GRPO alike).

The split is strided (micro-batch j holds row groups j, j + k, ...): a batch sharded by rows over
devices keeps every micro-batch spread over all of them, with no data moved to split it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def split_rows(x: jax.Array, k: int, axis: int = 0, group: int = 1) -> jax.Array:
    """x with its `axis` of R rows (in groups of `group` consecutive rows) as [k, ..., R / k, ...]:
    micro-batch j holds groups j, j + k, j + 2k, ..."""
    shape = x.shape
    rows = shape[axis]
    if rows % (k * group):
        raise ValueError(f"{rows} rows do not split into {k} micro-batches of whole groups of {group}")
    x = x.reshape(*shape[:axis], rows // (k * group), k, group, *shape[axis + 1:])
    return jnp.moveaxis(x, axis + 1, 0).reshape(k, *shape[:axis], rows // k, *shape[axis + 1:])


def merge_rows(x: jax.Array, axis: int = 0, group: int = 1) -> jax.Array:
    """The inverse of `split_rows`: [k, ..., R / k, ...] back to the rows in their batch order."""
    k, shape = x.shape[0], x.shape[1:]
    rows = shape[axis]
    x = x.reshape(k, *shape[:axis], rows // group, group, *shape[axis + 1:])
    x = jnp.moveaxis(x, 0, axis + 1)
    return x.reshape(*shape[:axis], rows * k, *shape[axis + 1:])


def accumulate(fn: Callable[[Any], tuple[Any, Any]], micro_batches: Any) -> tuple[Any, Any]:
    """(sum over j of fn(micro_j)[0], fn(micro_j)[1] stacked on a leading axis) for the micro-batches
    along the leading axis of every leaf of `micro_batches`, one at a time."""
    first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
    summed_shapes, _ = jax.eval_shape(fn, first)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), summed_shapes)

    def body(total, micro):
        summed, stacked = fn(micro)
        return jax.tree_util.tree_map(jnp.add, total, summed), stacked

    return jax.lax.scan(body, zeros, micro_batches)
