"""The optimizer of both training stages: AdamW, warmup + cosine, clipping, decay and freeze masks.

Parameters are labelled by regexes over their '/'-joined paths: frozen ones (the vision tower
and merger by default) get no update and no Adam moments; weight decay applies to kernels and
embeddings only (never to norms or biases).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import traverse_util

from fourd_jax.errors import InputError
from fourd_jax.model import lora


def path_labels(params: Any, fn) -> Any:
    """A pytree like params whose leaves are fn('/'-joined path, leaf)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: fn("/".join(k), v) for k, v in flat.items()})


def trainable_mask(params: Any, freeze: Sequence[str]) -> Any:
    """True for parameters no `freeze` regex matches (re.search on the path)."""
    try:
        patterns = [re.compile(p) for p in freeze]
    except re.error as e:
        raise InputError(f"optim.freeze has an invalid regex ({e}).") from None
    return path_labels(params, lambda path, _: not any(p.search(path) for p in patterns))


def stop_frozen(params: Any, trainable: Any) -> Any:
    """params with the gradient stopped at every frozen leaf (`trainable_mask` False)."""
    return jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings, LoRA A and B), not on norm scales or biases."""
    return path_labels(params, lambda path, _: path.rsplit("/", 1)[-1] in ("kernel", "embedding", *lora.TRAINED))


def learning_rate(config: Any) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    total = max(int(config.total_steps), int(config.warmup_steps) + 1)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, int(config.warmup_steps), total,
                                              end_value=config.lr * config.min_lr_ratio)


def make_optimizer(config: Any, params: Any) -> optax.GradientTransformation:
    """AdamW for trainable parameters (after global-norm clipping), nothing for frozen ones."""
    mask = trainable_mask(params, tuple(config.freeze))
    if not any(jax.tree_util.tree_leaves(mask)):
        raise InputError(f"optim.freeze {tuple(config.freeze)} freezes every parameter.")
    adamw = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask),
    )
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", mask)
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
