"""The training state: one pytree, created already sharded, donated to each jitted step."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fourd_jax import sharding
from fourd_jax.model.vlm import Qwen25VL
from fourd_jax.train.lora import boxed_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data (checkpointable)
    nonfinite_streak: jax.Array  # int32 []: consecutive steps skipped for a non-finite loss or gradient
    nonfinite_total: jax.Array  # int32 []


def state_shardings(model: Qwen25VL, tx: optax.GradientTransformation, mesh: Mesh, rules,
                    lora: Any = None) -> TrainState:
    """Where every leaf of the state lives: params by the logical rules, Adam moments with their
    parameters, scalars replicated. `lora`: the run's `LoraSettings` (adapters among the params)."""
    boxed = boxed_params(model, lora)
    params = sharding.param_shardings(boxed, mesh, rules)
    opt = sharding.like_params(jax.eval_shape(tx.init, nn.meta.unbox(boxed)), params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=replicated, params=params, opt_state=opt, rng=replicated,
                      nonfinite_streak=replicated, nonfinite_total=replicated)


def new_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A state at step 0 (traceable: jit it with `state_shardings` as out_shardings)."""
    def zero():  # distinct buffers: the state is donated, and one buffer cannot be donated twice
        return jnp.zeros((), jnp.int32)

    return TrainState(step=zero(), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)), nonfinite_streak=zero(), nonfinite_total=zero())


def abstract_state(shardings: TrainState, model: Qwen25VL, tx: optax.GradientTransformation,
                   lora: Any = None) -> TrainState:
    """ShapeDtypeStructs with shardings, the restore target of a checkpoint on any mesh."""
    shapes = jax.eval_shape(lambda p: new_state(p, tx, 0), nn.meta.unbox(boxed_params(model, lora)))
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def state_bytes_per_device(state: TrainState) -> dict[int, int]:
    """Bytes of params + optimizer state held by each device (from the actual shards)."""
    held: dict[int, int] = {}
    for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state)):
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


def guarded_update(state: TrainState, grads: Any, loss: jax.Array, tx: optax.GradientTransformation
                   ) -> tuple[TrainState, jax.Array, jax.Array]:
    """Apply one optimizer update; returns (new state, gradient global norm, finite flag).

    A step whose loss or gradient norm is not finite leaves params and optimizer state as they
    were and bumps the non-finite counters (the loop stops after too many in a row).
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    # Only one branch runs: a finite step costs no extra pass over the state.
    params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
    new = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    return new, grad_norm, finite
