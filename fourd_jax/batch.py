"""Host batches onto devices and back: the global arrays every stage (DIFT, GRPO, eval) steps on.

The pipeline gives each process its own rows (`data/batching.collate`, whose schema says which
axis of each array holds the batch). Here they become global arrays split over the mesh's batch
axes, after every process has padded its batch to the shapes all processes agree on; results come
back as this process's rows.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fourd_jax import sharding
from fourd_jax.data.batching import batch_axis, device_arrays, pad_to_agreed, shape_summary
from fourd_jax.errors import InputError
from fourd_jax.model.inputs import PreparedInputs, vision_inputs


def check_batch_divides(global_batch: int, mesh: Mesh, what: str = "data.batch_size") -> None:
    """One sentence unless the global batch splits evenly over data x fsdp and over the processes."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % ways or global_batch % jax.process_count():
        raise InputError(f"{what} {global_batch} must be divisible by data x fsdp = {ways} and by the "
                         f"{jax.process_count()} processes.")


def agree_shapes(batch: dict[str, Any]) -> dict[str, Any]:
    """This process's batch padded to the largest shapes any process has (multi-host).

    Every process buckets its own rows, so sequence and media sizes can differ between hosts; the
    global arrays need one shape (`data.batching.pad_to_agreed` says how each array is padded).
    """
    if jax.process_count() == 1:
        return batch
    return pad_to_agreed(batch, np.asarray(multihost_utils.process_allgather(shape_summary(batch))))


def agree_batch_list(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A fixed list of host batches (e.g. validation) that every process can step through together.

    Each process keeps the number of batches the process with the fewest has, and each batch is
    padded to the shapes every process agrees on, so the collectives in the step line up.
    """
    if jax.process_count() == 1:
        return list(batches)
    count = int(np.min(multihost_utils.process_allgather(np.array([len(batches)]))))
    return [agree_shapes(batch) for batch in batches[:count]]


def shard_rows(value: np.ndarray, mesh: Mesh, rules: Any, axis: int = 0) -> jax.Array:
    """This process's rows of a per-example array as a global array split over the batch axes."""
    spec = [None] * value.ndim
    spec[axis] = sharding.batch_sharding(mesh, 1, rules).spec[0]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(*spec)), value)


def device_batch(batch: dict[str, Any], mesh: Mesh, rules: Any) -> dict[str, jax.Array]:
    """The numeric per-example arrays of a host batch as global arrays sharded over the batch axis.

    Each process passes its own rows; `make_array_from_process_local_data` assembles the global batch.
    """
    return {key: shard_rows(value, mesh, rules, batch_axis(key)) for key, value in device_arrays(batch).items()}


def row_sharding(mesh: Mesh, rules: Any) -> NamedSharding:
    """Where the rows of a per-example result live: split over the batch axes like the batch's rows,
    so each process holds the results of its own rows (`local_rows`)."""
    return sharding.batch_sharding(mesh, 1, rules)


def gather_rows(value: np.ndarray) -> np.ndarray:
    """Every process's rows of a host array, concatenated in process order (the same on every process):
    e.g. per-row rewards, scored where the rows live, for metrics every process logs alike."""
    if jax.process_count() == 1:
        return np.asarray(value)
    return np.asarray(multihost_utils.process_allgather(np.asarray(value), tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded over its first (batch) axis."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {shard.index[0].start or 0: np.asarray(shard.data) for shard in x.addressable_shards}
    return np.concatenate([shards[start] for start in sorted(shards)])


def prompt_inputs(batch: dict[str, Any], mesh: Mesh, rules: Any) -> PreparedInputs:
    """A left-padded host batch of prompts as sharded device inputs for the sampler."""
    arrays = device_batch(batch, mesh, rules)
    video = vision_inputs({**batch, **arrays}, "video")
    return PreparedInputs(arrays["input_ids"], arrays["attention_mask"], arrays["position_ids"],
                          arrays["rope_deltas"], video)


def completion_texts(tokenizer: Any, tokens: jax.Array, completion_mask: jax.Array) -> list[str]:
    """This process's completions (a rollout's tokens and mask) as texts with special tokens kept,
    which is what the rewards and the answer extraction read."""
    rows, masks = local_rows(tokens), local_rows(completion_mask)
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=False) for row, m in zip(rows, masks, strict=True)]
